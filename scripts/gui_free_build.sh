#!/usr/bin/env bash
# The build without the studio (for line PCs): no GUI crate in its dependency tree, and the command-line tests
# pass on it. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
gui_crates='^(eframe|egui|egui_plot|egui-wgpu|egui-winit|epaint|wgpu|wgpu-core|wgpu-hal|winit|rfd|glow|glutin) '
if cargo tree -p loupe --no-default-features -e normal --prefix none | grep -E "$gui_crates"; then
  echo "the build without the studio pulls in the GUI crates above" >&2
  exit 1
fi
cargo test --release -p loupe --no-default-features --test cli --test watch
