#!/usr/bin/env bash
# Everything issue 23 measures on a GPU, in one command, for a machine that has the card but no Rust and no
# network: the backbone and scoring benchmarks, PyTorch's EfficientNet-Lite0 beside them, every method's fit and
# AUROC on the device, and the CPU-vs-device parity of each saved model's scores. Writes OUT/summary.md (and the
# raw logs beside it). Try it on the CPU first (DEVICE=cpu) with a small data folder.
#
#   scripts/gpu_check.sh BIN WEIGHTS DATA OUT
#
# BIN: a loupe binary (the CUDA build, scripts/cuda_build.sh); WEIGHTS: the backbone .safetensors; DATA: an
# MVTec-layout folder (scripts/gpu_pack.sh makes MTD's 256² copy). Environment:
#   DEVICE=cuda            the device under test (cpu to rehearse here)
#   METHODS="a b …"        default: every method `BIN methods` lists
#   PRESETS="default published"
#   FIT_LIMIT_S=120        a fit still running after this is stopped and reported as such
#   FIT_ARGS="…"           extra `fit` arguments for every fit (e.g. `--set epochs=1` to rehearse)
#   PYTHON=python3         for PyTorch's side (torch + timm) and the parity comparison
set -uo pipefail
[ $# -eq 4 ] || { sed -n 2,20p "$0"; exit 2; }
bin="$1" weights="$2" data="$3" out="$4"
device="${DEVICE:-cuda}"
presets="${PRESETS:-default published}"
limit="${FIT_LIMIT_S:-120}"
python="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out/models" "$out/logs"
summary="$out/summary.md"
loupe() { "$bin" "$@" --weights "$weights"; }
now() { date +%s.%N; }
seconds_since() { echo "$(now) $1" | awk '{printf "%.1f", $1 - $2}'; }
json_field() { # FILE KEY [DIGITS]
  "$python" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print('–' if v is None else (f'{v:.{sys.argv[3]}f}' if isinstance(v,float) else v))" "$1" "$2" "${3:-4}" 2>/dev/null || echo –
}

{
  echo "# Loupe device check — $(date -u +%FT%TZ)"
  echo
  echo "- device: \`$device\`; binary: \`$("$bin" --version 2>&1)\`; data: \`$data\`"
  if command -v nvidia-smi >/dev/null; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  fi
  echo "- CPU: $(nproc) cores"
  echo
  echo "## Backbone (256², \`bench backbone\`)"
  echo
  echo "| side | batch 1 | batch 32 |"
  echo "|---|---|---|"
} >"$summary"

backbone_line() { # the bench's own summary line for one batch size
  loupe bench backbone --device "$device" --batch "$1" --repeats 20 >"$out/logs/backbone-b$1.log" 2>&1
  tail -1 "$out/logs/backbone-b$1.log" | sed -E 's/.*median ([0-9.]+ ms).*\(([0-9.]+ images\/s)\).*/\1 (\2)/'
}
echo "| Loupe ($device) | $(backbone_line 1) | $(backbone_line 32) |" >>"$summary"
"$python" "$here/torch_backbone.py" --device "$device" >"$out/logs/torch.log" 2>&1
torch_line() { grep "^batch $1:" "$out/logs/torch.log" | sed -E 's/^batch [0-9]+: median //' || echo –; }
echo "| PyTorch + timm efficientnet_lite0 | $(torch_line 1) | $(torch_line 32) |" >>"$summary"
grep -q '^batch' "$out/logs/torch.log" || echo "(PyTorch side: $(tail -1 "$out/logs/torch.log"))" >>"$summary"

{
  echo
  echo "## Methods (fit on \`$device\`; parity: the saved model's image scores on the CPU against \`$device\`)"
  echo
  echo "| method | preset | fit s | image AUROC | pixel AUROC | AUPRO | img/s b1 | img/s b32 | score rel. err | verdicts equal |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
} >>"$summary"

methods="${METHODS:-$("$bin" methods 2>/dev/null | awk '/^  [a-z]/ {print $1}')}"
for method in $methods; do
  for preset in $presets; do
    name="$method-$preset"
    model="$out/models/$name.safetensors"
    preset_args=()
    [ "$preset" = default ] || preset_args=(--preset "$preset")
    started="$(now)"
    # shellcheck disable=SC2086 # FIT_ARGS is a list of arguments
    timeout "$limit" "$bin" fit --method "$method" "${preset_args[@]}" --data "$data" --out "$model" \
      --device "$device" --weights "$weights" ${FIT_ARGS:-} >"$out/logs/$name-fit.log" 2>&1
    status=$?
    fit_s="$(seconds_since "$started")"
    if grep -q "has no preset" "$out/logs/$name-fit.log"; then
      continue # a method without that preset (e.g. PaDiM trains nothing: it has one setting)
    elif [ $status -ne 0 ]; then
      why="failed ($status)"; [ $status -eq 124 ] && why="stopped at ${limit} s"
      echo "| $method | $preset | $fit_s | $why: \`$(tail -1 "$out/logs/$name-fit.log" | tr '|' '/' | cut -c1-120)\` | | | | | | |" >>"$summary"
      continue
    fi
    loupe eval --model "$model" --data "$data" --device "$device" --json >"$out/logs/$name-eval1.json" 2>"$out/logs/$name-eval1.err"
    loupe eval --model "$model" --data "$data" --device "$device" --json --batch-size 32 \
      >"$out/logs/$name-eval32.json" 2>"$out/logs/$name-eval32.err"
    loupe infer --model "$model" "$data/test" --device "$device" --json >"$out/logs/$name-infer-device.jsonl" 2>/dev/null
    loupe infer --model "$model" "$data/test" --device cpu --json >"$out/logs/$name-infer-cpu.jsonl" 2>/dev/null
    parity="$("$python" "$here/gpu_parity.py" "$out/logs/$name-infer-cpu.jsonl" "$out/logs/$name-infer-device.jsonl")"
    e1="$out/logs/$name-eval1.json" e32="$out/logs/$name-eval32.json"
    echo "| $method | $preset | $fit_s | $(json_field "$e1" image_auroc) | $(json_field "$e1" pixel_auroc) | $(json_field "$e1" aupro) | $(json_field "$e1" test_images_per_s 1) | $(json_field "$e32" test_images_per_s 1) | $parity |" >>"$summary"
    rm -f "$model" # the models stay on the device machine's disk only as long as they are compared
  done
done
echo >>"$summary"
# Few files come back from a device machine: the logs travel as one archive.
tar czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs" "$out/models"
echo "Logs: \`logs.tar.gz\` beside this file." >>"$summary"
cat "$summary"
