#!/usr/bin/env bash
# Opens a project in the real studio window under Xvfb on the gallery, waits until the import is done, then
# scrolls the gallery with the mouse wheel for SECONDS and prints: the seconds until the import finished, the
# frame times of the whole session (median, p99, max; import frames included) and the window's peak resident
# memory; the screen at the end of the scroll goes to $SCREENSHOT (default /tmp/gallery_scroll.png) when
# imagemagick is there. Needs Xvfb and xdotool (Debian: xvfb xdotool). Usage:
#   scripts/gallery_scroll.sh PROJECT.ron [LOUPE_BINARY] [SECONDS]
# The binary must have the studio (`cargo build --release -p loupe`; the test script last builds one without).
set -uo pipefail
project=$1
loupe=${2:-target/release/loupe}
seconds=${3:-30}
source "$(dirname "$0")/xvfb_session.sh" 80
start=$(date +%s.%N)
/usr/bin/time -f '%M' -o "$home/peak_kb" "$loupe" studio "$project" --view gallery --frame-stats "$home/stats.json" \
  >"$home/studio.log" 2>&1 &
studio=$!
trap 'kill $studio $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$home"' EXIT
# The import is a finished job once its stages are in the statistics (written every 5 s).
until python3 -c "
import json, sys
stages = json.load(open(sys.argv[1])).get('job_stages_seconds', [])
sys.exit(0 if any(stage == 'reading images' for _, stage, _ in stages) else 1)
" "$home/stats.json" 2>/dev/null; do
  sleep 0.5
  kill -0 $studio 2>/dev/null || { echo "studio exited"; cat "$home/studio.log"; exit 1; }
done
echo "import finished after: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s (statistics are written every 5 s)"
xdotool mousemove 700 500
end=$(( $(date +%s) + seconds ))
while [ "$(date +%s)" -lt "$end" ]; do
  xdotool click --repeat 5 --delay 10 5
  sleep 0.05
done
command -v import >/dev/null && import -window root "${SCREENSHOT:-/tmp/gallery_scroll.png}"
sleep 6  # one more statistics write
pkill -TERM -P $studio 2>/dev/null; wait $studio 2>/dev/null
python3 -c "
import json, sys
stats = json.load(open(sys.argv[1]))
frames = stats['frame_all']
print(f\"frames: {frames['frames']}, median {frames['median_ms']:.1f} ms, p99 {frames['p99_ms']:.1f} ms, max {frames['max_ms']:.1f} ms\")
for job, stage, seconds in stats.get('job_stages_seconds', []):
    print(f'  {job} / {stage}: {seconds:.2f} s')
" "$home/stats.json"
# GNU time writes "Command terminated by signal 15" before the figure.
echo "peak memory: $(( $(tail -n 1 "$home/peak_kb" 2>/dev/null || echo 0) / 1024 )) MB"
