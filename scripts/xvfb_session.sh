# Sourced by the scripts that open the real studio window: a throwaway LOUPE_HOME and XDG_RUNTIME_DIR under
# $home, and an Xvfb server on the first free display from $1, as $DISPLAY ($server: its pid).
home=$(mktemp -d)
export LOUPE_HOME="$home/loupe" XDG_RUNTIME_DIR="$home/run"
mkdir -m 700 "$XDG_RUNTIME_DIR"
n=${1:-70}
while [ -e "/tmp/.X$n-lock" ]; do n=$((n + 1)); done
Xvfb ":$n" -screen 0 1400x900x24 >/dev/null 2>&1 &
server=$!
export DISPLAY=":$n"
sleep 1
