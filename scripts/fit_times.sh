#!/usr/bin/env bash
# Fit time, peak memory and test metrics of methods at their CPU defaults (seed 0), one after the other:
#
#   scripts/fit_times.sh BINARY DATA OUT_DIR [METHOD ...]   (default: every method that trains a network)
#
# DATA: an MVTec AD category folder (e.g. ../shared/datasets/mtd). Each method's model goes to OUT_DIR; one line per
# method: the whole `fit` command's wall time and peak resident memory (GNU time); the label-free validation image
# AUROC (`bench validate`: held-out good images against synthetic anomalies, what defaults are chosen on); the
# scoring speed at batch 1 (`bench score`, images/s, median of its passes); then `eval --json`'s image AUROC,
# pixel AUROC and AUPRO on DATA's test set. Extra `fit` arguments go in $FIT_ARGS (e.g. "--set levels=[4,10]").
# Run nothing else heavy meanwhile: the figures are wall-clock.
set -euo pipefail
binary=${1:?usage: $0 BINARY DATA OUT_DIR [METHOD ...]}
data=${2:?usage: $0 BINARY DATA OUT_DIR [METHOD ...]}
out=${3:?usage: $0 BINARY DATA OUT_DIR [METHOD ...]}
shift 3
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(autoencoder stfpm draem fcdd cutpaste mean_shifted cflow fastflow)
mkdir -p "$out"
for method in "${methods[@]}"; do
  model="$out/$method.safetensors"
  # shellcheck disable=SC2086 # FIT_ARGS is a list of arguments
  /usr/bin/time -f '%e %M' -o "$out/$method.time" "$binary" fit --method "$method" --data "$data" --out "$model" \
    ${FIT_ARGS:-} >"$out/$method.fit.log" 2>&1
  read -r seconds kilobytes <"$out/$method.time"
  metrics=$("$binary" eval --model "$model" --data "$data" --json 2>/dev/null |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(" ".join(f"{k}={m.get(k)}" for k in ("image_auroc","pixel_auroc","aupro")))')
  validation=$("$binary" bench validate --model "$model" --data "$data" 2>/dev/null | grep -o 'image AUROC [0-9.]*' | head -1)
  speed=$("$binary" bench score --model "$model" --data "$data/test" --passes 3 2>/dev/null | grep -o '[0-9.]* images/s' | tail -1)
  printf '%s fit_s=%s peak_mb=%d validation=[%s] batch1=[%s] %s\n' "$method" "$seconds" "$((kilobytes / 1024))" \
    "$validation" "$speed" "$metrics"
done
