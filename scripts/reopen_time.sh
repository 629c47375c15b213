#!/usr/bin/env bash
# Times opening a project in the real studio window under Xvfb until the studio is idle (images imported, the
# active model reloaded — from the map cache when nothing changed —, autosave done): `loupe studio PROJECT
# --exit-when-idle`. Prints "open until idle: S s", then each job stage's seconds (import, decoding, scoring…).
# Needs Xvfb (Debian: xvfb). Usage:
#   scripts/reopen_time.sh PROJECT.ron [LOUPE_BINARY]
# The binary must have the studio (`cargo build --release -p loupe`; the test script last builds one without).
# Compare two builds side by side with the timing tool, e.g. A = this script with the new binary, B = the old.
set -uo pipefail
project=$1
loupe=${2:-target/release/loupe}
source "$(dirname "$0")/xvfb_session.sh" 70
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$home"' EXIT
start=$(date +%s.%N)
"$loupe" studio "$project" --exit-when-idle --frame-stats "$home/stats.json" >"$home/studio.log" 2>&1 || { echo "studio exited $?"; cat "$home/studio.log"; }
end=$(date +%s.%N)
echo "open until idle: $(python3 -c "print(round($end - $start, 2))") s"
python3 -c "
import json, sys
for job, stage, seconds in json.load(open(sys.argv[1])).get('job_stages_seconds', []):
    print(f'  {job} / {stage}: {seconds:.2f} s')
" "$home/stats.json" 2>/dev/null || true
