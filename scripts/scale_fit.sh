#!/usr/bin/env bash
# Fit time and peak memory of one method as the training folder grows (issue 25's table):
#
#   scripts/scale_fit.sh BINARY OUT_DIR METHOD FOLDER [FOLDER ...] [-- FIT_ARGS ...]
#
# Each FOLDER is a folder of normal images or an MVTec category (its train/good), e.g. ../shared/datasets/mtd and
# the folders `loupe bench make-normals --count 5000|20000` writes. One line per folder: the images the fit used,
# the fit's own seconds (after decoding, before validation), and the whole `fit` command's wall time and peak
# resident memory (GNU time: decoding and validation scoring included). Run nothing else heavy meanwhile.
set -euo pipefail
usage="usage: $0 BINARY OUT_DIR METHOD FOLDER [FOLDER ...] [-- FIT_ARGS ...]"
binary=${1:?$usage}
out=${2:?$usage}
method=${3:?$usage}
shift 3
folders=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do folders+=("$1"); shift; done
[ $# -gt 0 ] && shift
mkdir -p "$out"
for folder in "${folders[@]}"; do
  name="$method-$(basename "$folder")"
  model="$out/$name.safetensors"
  /usr/bin/time -f '%e %M' -o "$out/$name.time" "$binary" fit --method "$method" --data "$folder" --out "$model" "$@" \
    >"$out/$name.log" 2>&1
  read -r seconds kilobytes <"$out/$name.time"
  # The fit's closing line: "<Method> fitted on N images (K skipped, V held out for validation) in S s; …".
  summary=$(grep -o 'fitted on [0-9]* images ([0-9]* skipped, [0-9]* held out for validation) in [0-9.]* s' "$out/$name.log" |
    sed -E 's/fitted on ([0-9]*) images \(([0-9]*) skipped, ([0-9]*) held out for validation\) in ([0-9.]*) s/images=\1 skipped=\2 validation=\3 fit_s=\4/' || echo "failed: see $out/$name.log")
  printf '%s %s command_s=%s peak_mb=%d\n' "$name" "$summary" "$seconds" "$((kilobytes / 1024))"
done
