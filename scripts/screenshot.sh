#!/usr/bin/env bash
# Runs the real studio window under Xvfb on the demo project, trains PatchCore, and saves a PNG of each view in
# out/screenshots/ for people to look at. Needs (Debian): xvfb mesa-vulkan-drivers libvulkan1 imagemagick —
# installed here when missing and running as root.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v Xvfb >/dev/null || need+=(xvfb)
command -v import >/dev/null || need+=(imagemagick)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers libvulkan1)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "missing: ${need[*]} (install them with apt-get)" >&2
    exit 1
  fi
fi
cargo build --release --quiet -p loupe
cargo run --release --quiet -p loupe -- weights fetch

out=out/screenshots
mkdir -p "$out"
home=$(mktemp -d)
export LOUPE_HOME="$home/loupe" XDG_RUNTIME_DIR="$home/run"
mkdir -m 700 "$XDG_RUNTIME_DIR"
display=:$((90 + RANDOM % 9))
Xvfb "$display" -screen 0 1400x900x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $xvfb 2>/dev/null; rm -rf "$home"' EXIT
export DISPLAY=$display
sleep 1

shoot() { # view, seconds to wait, extra arguments
  local view=$1 wait=$2
  shift 2
  target/release/loupe studio --view "$view" "$@" >"$out/$view.log" 2>&1 &
  local pid=$!
  sleep "$wait"
  import -window root "$out/$view.png"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "$out/$view.png"
}

# First run: import the demo set and train; wait for the model file to appear.
target/release/loupe studio --view threshold --auto-train >"$out/train-run.log" 2>&1 &
pid=$!
for _ in $(seq 240); do
  ls "$LOUPE_HOME"/demo/models/*.safetensors >/dev/null 2>&1 && break
  sleep 0.5
done
sleep 4
import -window root "$out/threshold.png"
echo "$out/threshold.png"
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true

for view in inspector gallery benchmark train; do
  shoot "$view" 10
done

# Presentation mode (F5) as a projector shows it: 1920×1080, and 3840×2160 at 2 pixels per point (hi-DPI).
present_shot() { # name, width, height, scale factor
  local screen=:$((80 + RANDOM % 9))
  Xvfb "$screen" -screen 0 "${2}x${3}x24" >/dev/null 2>&1 &
  local server=$!
  sleep 1
  DISPLAY=$screen WINIT_X11_SCALE_FACTOR=$4 target/release/loupe studio --present >"$out/$1.log" 2>&1 &
  local pid=$!
  sleep 15
  DISPLAY=$screen import -window root "$out/$1.png"
  kill "$pid" "$server" 2>/dev/null || true
  wait "$pid" "$server" 2>/dev/null || true
  echo "$out/$1.png"
}
present_shot present-1080p 1920 1080 1
present_shot present-4k 3840 2160 2
