#!/usr/bin/env bash
# The fuzzing campaign over Loupe's untrusted-input readers (loupe_engine::untrusted): each target runs for
# MINUTES (default 10) under libFuzzer with an RSS limit, from a seed corpus of small valid files of its kind.
#
#   scripts/fuzz.sh [MINUTES] [TARGET …]      targets: checkpoint model project labelme image (default: all)
#
# Needs a nightly toolchain (rustup installs it) and cargo-fuzz (installed if missing); the model target needs
# the backbone weights (`loupe weights fetch`). Each run appends "target minutes executions crashes" to
# out/fuzz/summary.txt; a crashing input lands in fuzz/artifacts/<target>/ — copy it into
# tests/data/untrusted/<target>/ (the ordinary suite reads it back), fix the reader, run again.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(checkpoint model project labelme image)
# Most memory one input may take (MiB): above every reader's stated bound (README, "What is guaranteed").
rss_limit_mb=3072

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

corpus="$PWD/fuzz/corpus"
if [ ! -d "$corpus/model" ]; then
  LOUPE_FUZZ_CORPUS="$corpus" cargo test --release -p loupe-engine --test untrusted_inputs -- --ignored \
    write_fuzz_seeds --exact --nocapture
fi
mkdir -p out/fuzz
for target in "${targets[@]}"; do
  mkdir -p "fuzz/artifacts/$target"
  log="out/fuzz/$target.log"
  (cd fuzz && cargo +nightly fuzz run --release "$target" "corpus/$target" -- \
      -max_total_time=$((minutes * 60)) -rss_limit_mb=$rss_limit_mb -malloc_limit_mb=$rss_limit_mb \
      -timeout=30 -max_len=1048576 -print_final_stats=1 -artifact_prefix="artifacts/$target/") 2>&1 | tee "$log" \
    || true
  executions=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find "fuzz/artifacts/$target" -type f | wc -l)
  echo "$target $minutes min ${executions:-?} executions, $crashes crashing inputs" | tee -a out/fuzz/summary.txt
done
