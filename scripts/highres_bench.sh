#!/usr/bin/env bash
# Whole-image resizing against tiling on high-resolution parts (issue 20's table), for one method:
#
#   scripts/highres_bench.sh BINARY DATA OUT_DIR METHOD [TILE OVERLAP] [-- FIT_ARGS ...]
#
# DATA is an MVTec folder, e.g. from `loupe bench make-highres --out DATA` (4096×3072 parts). For each geometry
# (whole image at 256², tiles of TILE pixels (default 512) with OVERLAP (default 64)) it fits, evaluates and
# prints one line: image AUROC, pixel AUROC, AUPRO, recall at FAR ≤ 1 % on the test goods, fit seconds, test
# images/s, and the peak resident memory of fit and eval (GNU time). Run nothing else heavy meanwhile.
set -euo pipefail
usage="usage: $0 BINARY DATA OUT_DIR METHOD [TILE OVERLAP] [-- FIT_ARGS ...]"
binary=${1:?$usage}
data=${2:?$usage}
out=${3:?$usage}
method=${4:?$usage}
shift 4
tile=512
overlap=64
if [ $# -ge 2 ] && [ "$1" != "--" ]; then tile=$1; overlap=$2; shift 2; fi
[ $# -gt 0 ] && [ "$1" == "--" ] && shift
mkdir -p "$out"
for geometry in whole tiles; do
  name="$method-$geometry"
  flags=()
  [ "$geometry" == tiles ] && flags=(--tile "$tile" --overlap "$overlap")
  /usr/bin/time -f '%e %M' -o "$out/$name.fit.time" "$binary" fit --method "$method" --data "$data" \
    --out "$out/$name.safetensors" "${flags[@]}" "$@" >"$out/$name.fit.log" 2>&1
  /usr/bin/time -f '%e %M' -o "$out/$name.eval.time" "$binary" eval --model "$out/$name.safetensors" --data "$data" \
    --choose-threshold far:0.01 --json >"$out/$name.json" 2>"$out/$name.eval.log"
  python3 - "$out/$name" "$name" <<'PY'
import json, re, sys
base, name = sys.argv[1], sys.argv[2]
report = json.load(open(base + ".json"))
fit_log = open(base + ".fit.log").read()
fit_s = re.search(r"in ([0-9.]+) s;", fit_log).group(1)
fit_peak = int(open(base + ".fit.time").read().split()[1]) // 1024
eval_peak = int(open(base + ".eval.time").read().split()[1]) // 1024
goods = sum(1 for i in report["images"] if i["defect_type"] == "good")
fmt = lambda v: "–" if v is None else f"{v:.3f}"
print(f"{name}: image AUROC {fmt(report['image_auroc'])}, pixel AUROC {fmt(report['pixel_auroc'])}, "
      f"AUPRO {fmt(report['aupro'])}, recall at FAR <= 1 % ({goods} goods) {fmt(1 - report['mar'])}, "
      f"fit {fit_s} s, {report['test_images_per_s']:.2f} test images/s, peak fit {fit_peak} MB / eval {eval_peak} MB")
PY
done
