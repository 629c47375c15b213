#!/usr/bin/env bash
# The inspector on a high-resolution part (issue 20): makes a 5000×5000 (25-megapixel) benchmark part set, opens
# the real studio window under Xvfb on a project that trains PaDiM on tiles of 512 / 64, waits until the model is
# trained and the test parts scored, then zooms and pans the first test part (with its stitched map) with the
# mouse for SECONDS and prints the frame times of those frames (no job running; median, p99, max), the frames
# that uploaded image tiles, and the window's peak resident memory. The screen at the end goes to $SCREENSHOT
# (default /tmp/inspector_highres.png). Needs Xvfb, xdotool and imagemagick. Usage:
#   scripts/inspector_highres.sh [LOUPE_BINARY] [SECONDS] [SIDE]
# The binary must have the studio (`cargo build --release -p loupe`; the test script last builds one without).
set -uo pipefail
loupe=$(realpath "${1:-target/release/loupe}")
seconds=${2:-30}
side=${3:-5000}
source "$(dirname "$0")/xvfb_session.sh" 90
trap 'kill $studio $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$home"' EXIT
"$loupe" bench make-highres --out "$home/data" --width "$side" --height "$side" --train 4 --test-good 1 \
  --per-defect 1 >/dev/null || exit 1
cat >"$home/highres.ron" <<RON
(
  format_version: 1,
  name: "High-resolution parts",
  sources: [NormalFolder("data/train/good"), Inspect("data/test")],
  models: [],
  active_model: None,
  training: (
    method: "padim",
    settings_json: "{}",
    image_size: 256,
    device: "cpu",
    target_far: 0.05,
    geometry: (layout: tiles(tile: 512, overlap: 64), region: None),
  ),
)
RON
/usr/bin/time -f '%M' -o "$home/peak_kb" "$loupe" studio "$home/highres.ron" --view inspector --auto-train \
  --frame-stats "$home/stats.json" >"$home/studio.log" 2>&1 &
studio=$!
start=$(date +%s)
# Training is a finished job once its stages are in the statistics (written every 5 s).
until python3 -c "
import json, sys
stages = json.load(open(sys.argv[1])).get('job_stages_seconds', [])
sys.exit(0 if any(job.startswith('Training') for job, _, _ in stages) else 1)
" "$home/stats.json" 2>/dev/null; do
  sleep 1
  kill -0 $studio 2>/dev/null || { echo "studio exited"; cat "$home/studio.log"; exit 1; }
done
echo "trained and scored after $(( $(date +%s) - start )) s"
sleep 6  # the image decoded and uploaded
xdotool mousemove 800 560
end=$(( $(date +%s) + seconds ))
while [ "$(date +%s)" -lt "$end" ]; do
  xdotool click --repeat 8 --delay 30 4    # zoom in under the pointer
  xdotool mousedown 3 mousemove_relative --sync -- 120 80 mousemove_relative --sync -- -60 -140 mouseup 3
  xdotool click --repeat 8 --delay 30 5    # and out again
  xdotool click --repeat 2 --delay 60 1    # a double-click fits the whole part again
done
xdotool click --repeat 2 --delay 60 1
sleep 1
command -v import >/dev/null && import -window root "${SCREENSHOT:-/tmp/inspector_highres.png}"
sleep 6  # one more statistics write
pkill -TERM -P $studio 2>/dev/null; wait $studio 2>/dev/null
python3 -c "
import json, sys
stats = json.load(open(sys.argv[1]))
for key, what in [('frame_without_a_job', 'zoom and pan (no job running)'), ('frame_uploading_image_tiles', 'frames uploading image tiles'), ('frame_while_a_job_ran', 'while training')]:
    f = stats[key]
    if f['frames']:
        print(f\"{what}: {f['frames']} frames, median {f['median_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, max {f['max_ms']:.1f} ms\")
for job, stage, seconds in stats.get('job_stages_seconds', []):
    print(f'  {job} / {stage}: {seconds:.2f} s')
" "$home/stats.json"
echo "peak memory: $(( $(tail -n 1 "$home/peak_kb" 2>/dev/null || echo 0) / 1024 )) MB"
