//! Runtime choice of compute device. CUDA and Metal exist only when the binary was built with the matching
//! cargo feature; asking for one that is not built in is a clear error, not a silent CPU fallback.

use anyhow::{bail, Result};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

impl DeviceChoice {
    pub const ALL: [DeviceChoice; 3] = [DeviceChoice::Cpu, DeviceChoice::Cuda, DeviceChoice::Metal];

    pub fn is_built(self) -> bool {
        match self {
            DeviceChoice::Cpu => true,
            DeviceChoice::Cuda => cfg!(feature = "cuda"),
            DeviceChoice::Metal => cfg!(feature = "metal"),
        }
    }

    pub fn open(self) -> Result<Device> {
        if !self.is_built() {
            match self {
                DeviceChoice::Cuda => bail!(
                    "this Loupe is the CPU build: CUDA is in the separate `loupe-cuda` build \
                     (`scripts/cuda_build.sh`, or `cargo build --release --features cuda`)"
                ),
                _ => bail!("this build of Loupe has no {self} support: rebuild with `--features {self}`"),
            }
        }
        Ok(match self {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda => Device::new_cuda(0).map_err(|error| {
                anyhow::anyhow!(
                    "CUDA could not start on GPU 0 ({}). Check that the NVIDIA driver is installed and sees the \
                     card (`nvidia-smi`), or run on the processor with `--device cpu`",
                    without_backtrace(error)
                )
            })?,
            DeviceChoice::Metal => Device::new_metal(0).map_err(|error| {
                anyhow::anyhow!(
                    "Metal could not start ({}); run on the processor with `--device cpu`",
                    without_backtrace(error)
                )
            })?,
        })
    }
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set; a user's message needs only the cause.
fn without_backtrace(error: candle_core::Error) -> candle_core::Error {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        other => other,
    }
}

/// Set by [`force_portable_ops`] or by `LOUPE_PORTABLE_OPS=1` in the environment.
static PORTABLE_OPS_FORCED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether Loupe's hand-written CPU kernels (custom ops over host memory: depthwise and fused convolutions,
/// im2col, SSIM, the PatchCore index…) run for tensors on `device`. Elsewhere the same maths runs as
/// compositions of candle ops — the path GPUs take. Forcing that portable path on the CPU is how the test suite
/// runs every branch a GPU would, on a machine without one.
pub fn cpu_kernels_on(device: &Device) -> bool {
    static FROM_ENVIRONMENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let from_environment =
        *FROM_ENVIRONMENT.get_or_init(|| std::env::var("LOUPE_PORTABLE_OPS").is_ok_and(|v| v == "1"));
    device.is_cpu() && !from_environment && !PORTABLE_OPS_FORCED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs the portable (GPU) compositions on the CPU too, for this process. For tests and diagnosis only: the CPU
/// kernels are several times faster.
pub fn force_portable_ops(on: bool) {
    PORTABLE_OPS_FORCED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// candle's CPU thread pool spins 25,000 times before parking; on a 2-core machine those spinning workers
/// steal the cores from the rayon and gemm threads doing the real work (measured: backbone at batch 1,
/// 35 ms → 20 ms with 1,000). Call at the start of `main`, before any thread exists; an explicit setting wins.
pub fn configure_cpu_thread_pools() {
    const VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VARIABLE).is_none() {
        std::env::set_var(VARIABLE, "1000");
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Metal => "metal",
        })
    }
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "metal" => Ok(DeviceChoice::Metal),
            other => bail!("unknown device `{other}` (expected cpu, cuda or metal)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbuilt_device_is_a_clear_error() {
        assert!(DeviceChoice::Cpu.open().is_ok());
        if !cfg!(feature = "cuda") {
            let message = DeviceChoice::Cuda.open().unwrap_err().to_string();
            assert!(message.contains("--features cuda"), "{message}");
        }
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }
}
