#!/usr/bin/env bash
# Loupe's training steps side by side with the PyTorch replica (../shared/peer/torch_train_step.py), alternating
# the two sides ROUNDS times per geometry, and a table of each side's median step (median over rounds of each
# round's median of STEPS steps), the range of the round medians and the ratio.
#
#   scripts/train_step_vs_torch.sh PEER_PYTHON [THREADS=2] [ROUNDS=3] [STEPS=20]
#
# PEER_PYTHON: a Python with torch (python3 -m venv v && v/bin/pip install --only-binary=:all: torch numpy).
# The binary is target/release/loupe (cargo build --release -p loupe).
set -euo pipefail
cd "$(dirname "$0")/.."
peer_python=${1:?usage: $0 PEER_PYTHON [THREADS] [ROUNDS] [STEPS]}
threads=${2:-2}
rounds=${3:-3}
steps=${4:-20}
peer_script=${PEER_SCRIPT:-../shared/peer/torch_train_step.py}
loupe=target/release/loupe

# label | loupe arguments | peer arguments
geometries=(
  "autoencoder default: batch 16, 64²|--method autoencoder --batch 16 --size 64|ae 16 64"
  "autoencoder 128² (published geometry)|--method autoencoder --batch 16 --size 128|ae 16 128"
  "STFPM student: batch 8, 256²|--method stfpm --batch 8 --size 256|stfpm 8 256"
)

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
step_median() { grep -o 'step_med_ms=[0-9.]*' | cut -d= -f2; }

echo "| step | Loupe | PyTorch (NCHW) | ratio | PyTorch channels-last | ratio |"
echo "|---|---|---|---|---|---|"
for geometry in "${geometries[@]}"; do
  IFS='|' read -r label loupe_args peer_args <<<"$geometry"
  ours=() theirs=() theirs_cl=()
  for _ in $(seq "$rounds"); do
    # shellcheck disable=SC2086
    ours+=("$($loupe bench train-step $loupe_args --threads "$threads" --steps "$steps" | step_median)")
    # shellcheck disable=SC2086
    theirs+=("$("$peer_python" "$peer_script" $peer_args "$threads" "$steps" | step_median)")
    # shellcheck disable=SC2086
    theirs_cl+=("$("$peer_python" "$peer_script" $peer_args "$threads" "$steps" --cl | step_median)")
  done
  summary() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%s", a[1] "–" a[NR]}'; }
  m_ours=$(printf '%s\n' "${ours[@]}" | median)
  m_theirs=$(printf '%s\n' "${theirs[@]}" | median)
  m_cl=$(printf '%s\n' "${theirs_cl[@]}" | median)
  printf '| %s | %.0f ms (%s) | %.0f ms (%s) | %.2f× | %.0f ms (%s) | %.2f× |\n' "$label" \
    "$m_ours" "$(summary "${ours[@]}")" "$m_theirs" "$(summary "${theirs[@]}")" \
    "$(echo "$m_ours / $m_theirs" | bc -l)" "$m_cl" "$(summary "${theirs_cl[@]}")" "$(echo "$m_ours / $m_cl" | bc -l)"
done
echo
echo "threads=$threads rounds=$rounds steps=$steps (ratio: Loupe's median step / PyTorch's; below 1 Loupe is faster)"
