#!/usr/bin/env bash
# Packs what a GPU machine (no Rust, no network, at most 64 MiB carried per call) needs to run
# scripts/gpu_check.sh: the stripped CUDA binary (xz), the backbone weights and a 256² copy of an MVTec-layout
# folder (JPEG images, PNG masks: MTD itself, 51 MB, does not fit beside the binary).
#
#   scripts/gpu_pack.sh [BIN] [DATA] [PACK]
#
# Defaults: target/release/loupe-cuda, ../shared/datasets/mtd, target/gpu-pack. Then, with the device tool
# (carry the pack folder; the scripts travel as tracked files):
#   run --carry target/gpu-pack -- target/gpu-pack/run.sh        # writes $OUT/summary.md and $OUT/logs.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/loupe-cuda}"
data="${2:-../shared/datasets/mtd}"
pack="${3:-target/gpu-pack}"
weights="${LOUPE_WEIGHTS:-${XDG_CACHE_HOME:-$HOME/.cache}/loupe/efficientnet-lite0.safetensors}"
rm -rf "$pack"
mkdir -p "$pack"
strip -o "$pack/loupe" "$bin"
xz -T2 -6 "$pack/loupe"
cp "$weights" "$pack/efficientnet-lite0.safetensors"
python3 - "$data" "$pack/data" <<'EOF'
import pathlib, sys
from PIL import Image
source, target = map(pathlib.Path, sys.argv[1:])
for path in sorted(source.rglob("*")):
    if path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}:
        continue
    relative = path.relative_to(source)
    out = target / relative
    out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(path)
    if relative.parts[0] == "ground_truth":  # masks stay lossless and binary
        image.convert("L").resize((256, 256), Image.NEAREST).save(out, optimize=True)
    else:  # same name (masks are found by it), same format; JPEG at quality 90
        image = image.convert("L" if image.mode == "L" else "RGB").resize((256, 256), Image.BILINEAR)
        image.save(out, **({"quality": 90} if out.suffix.lower() in {".jpg", ".jpeg"} else {}))
EOF
cat >"$pack/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: unpack the binary, run the check, keep what comes back small.
set -euo pipefail
pack="$(cd "$(dirname "$0")" && pwd)"
python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
  "$pack/loupe.xz" /tmp/loupe-cuda
chmod +x /tmp/loupe-cuda
# The CUDA libraries the binary links (cuBLAS, cuRAND, the runtime) come from the machine: its CUDA install or
# the pip wheels PyTorch brought (nvidia/cu13/lib); the driver's libcuda is on the loader's path already.
for dir in /usr/local/cuda/lib64 $(python3 -c "import nvidia, os; print(' '.join(os.path.join(p, 'cu13', 'lib') for p in nvidia.__path__))" 2>/dev/null); do
  [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
if ldd /tmp/loupe-cuda | grep -q "not found"; then
  echo "missing libraries:"; ldd /tmp/loupe-cuda | grep "not found"
fi
scripts/gpu_check.sh /tmp/loupe-cuda "$pack/efficientnet-lite0.safetensors" "$pack/data" "${OUT:-/tmp/gpu-check}"
EOF
chmod +x "$pack/run.sh"
size="$(du -sb "$pack" | cut -f1)"
du -sh "$pack"/*
echo "pack: $((size / 1024 / 1024)) MiB in $pack (the limit per call is 64 MiB)"
[ "$size" -le $((64 * 1024 * 1024)) ] || { echo "too large to carry" >&2; exit 1; }
