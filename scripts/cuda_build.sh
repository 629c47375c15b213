#!/usr/bin/env bash
# Builds the CUDA Loupe (`--features cuda`) on a machine with no GPU and no CUDA install, as CI does.
#
#   scripts/cuda_build.sh [COMPUTE_CAP]      # default 90 (H100/H200); 86 for RTX 30xx, 89 for RTX 40xx, 75 for T4
#
# The toolkit comes from PyPI into target/cuda-toolkit (about 1.2 GB, kept between runs). nvcc, nvvm and crt are
# pinned to CUDA 13.0: the driver a machine has decides the newest PTX it can load (driver 580 loads 13.0; a
# newer nvcc emits PTX it refuses). candle compiles its kernels to PTX for COMPUTE_CAP; a driver JIT-compiles
# that PTX for any newer card, so one build serves its capability and everything above it.
#
# candle links libcuda dynamically, and libcuda comes with the driver, not the toolkit: we link against a stub
# that defines every driver function cudarc declares (generated below); at run time the real driver's
# libcuda.so.1 is loaded instead. The binary is target/release/loupe-cuda; stripped, it is what travels to a GPU
# machine (scripts/gpu_pack.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
compute_cap="${1:-90}"
root="$PWD/target/cuda-toolkit"
if [ ! -x "$root/nvidia/cu13/bin/nvcc" ]; then
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
    --target "$root" nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
    nvidia-curand==10.4.0.35
fi
toolkit="$root/nvidia/cu13"

# A CUDA_HOME the build scripts understand: the wheel's bin, include and nvvm, and a lib holding unversioned
# names for the libraries the linker looks for, plus the driver stub.
home="$PWD/target/cuda-home"
mkdir -p "$home/lib"
for dir in bin include nvvm; do ln -sfn "$toolkit/$dir" "$home/$dir"; done
for lib in cublas cublasLt curand nvrtc cudart; do
  ln -sf "$(ls "$toolkit"/lib/lib$lib.so.* | head -1)" "$home/lib/lib$lib.so"
done
cargo fetch --quiet
driver_api="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)"
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$driver_api" | sort -u | sed 's/^pub unsafe fn \(.*\)/void \1(void) {}/' \
  >"$home/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/libcuda.so" "$home/cuda_stub.c"

export CUDA_HOME="$home" CUDA_ROOT="$home" CUDA_COMPUTE_CAP="$compute_cap" PATH="$home/bin:$PATH"
cargo build --release -p loupe --features cuda
cp target/release/loupe target/release/loupe-cuda
# The CPU binary back in place (cargo only relinks: its objects are kept apart from the CUDA build's).
cargo build --release -p loupe
echo "built target/release/loupe-cuda (CUDA 13.0, compute capability $compute_cap)"
