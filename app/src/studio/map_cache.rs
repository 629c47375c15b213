//! Reopening a project without scoring everything again: a model's evaluation — reports, scores and anomaly
//! maps — kept beside its model file (`<model>.maps.safetensors`) and used while what it was computed from is
//! unchanged: the model's weights (the file's tensor data, so a threshold written into its header does not
//! count), every image of the project (path, size, modification time, split) and the labels (they define the
//! "your labels" evaluation). Anything else — a missing, corrupt, foreign or stale file — is a miss: the
//! evaluation runs as before and the cache is written again. The file is Loupe's own but read as untrusted: size
//! bounded before reading, shapes checked against the data.

use super::workspace::{ids_by_reported_path, reported_path, Evaluated, StudioImage};
use anyhow::{anyhow, bail, Context, Result};
use loupe_engine::atomic_file::write_atomic;
use loupe_engine::labels::LabelSet;
use loupe_engine::maps::ScoreMap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Caches larger than this are neither written nor read (a 583-image MTD evaluation at 256² is 150 MB).
const MAX_CACHE_BYTES: u64 = 2 << 30;
const FORMAT: &str = "loupe-map-cache-1";

pub fn cache_path(model_path: &Path) -> PathBuf {
    model_path.with_extension("maps.safetensors")
}

/// SHA-256 of a safetensors file's tensor data (everything after its JSON header).
fn weights_identity(model_path: &Path) -> Result<String> {
    let bytes = std::fs::read(model_path).with_context(|| format!("{}: cannot read", model_path.display()))?;
    let header = bytes.get(..8).ok_or_else(|| anyhow!("{}: not a safetensors file", model_path.display()))?;
    let header_len = u64::from_le_bytes(header.try_into().expect("8 bytes"));
    let start = 8u64.checked_add(header_len).filter(|&s| s <= bytes.len() as u64);
    let start = start.ok_or_else(|| anyhow!("{}: header longer than the file", model_path.display()))?;
    Ok(hex(&Sha256::digest(&bytes[start as usize..])))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the evaluation saw of the project: each image's key, split, size and modification time, and the labels.
fn inputs_identity(images: &[StudioImage], labels: &LabelSet) -> Result<String> {
    let mut hasher = Sha256::new();
    for image in images {
        let metadata = std::fs::metadata(&image.path)?;
        let modified = metadata.modified()?.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        hasher.update(reported_path(&image.path).as_bytes());
        hasher.update([0, image.split as u8]);
        hasher.update(metadata.len().to_le_bytes());
        hasher.update(modified.to_le_bytes());
    }
    hasher.update(serde_json::to_vec(labels)?);
    Ok(hex(&hasher.finalize()))
}

/// The cached evaluation of the model at `model_path` on these images and labels, if it is still valid.
pub fn load(model_path: &Path, images: &[StudioImage], labels: &LabelSet) -> Option<Evaluated> {
    read(model_path, images, labels).ok()
}

fn read(model_path: &Path, images: &[StudioImage], labels: &LabelSet) -> Result<Evaluated> {
    let path = cache_path(model_path);
    if std::fs::metadata(&path)?.len() > MAX_CACHE_BYTES {
        bail!("{}: larger than any cache Loupe writes", path.display());
    }
    let bytes = std::fs::read(&path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{e}"))?;
    let meta = header.metadata().as_ref().ok_or_else(|| anyhow!("no metadata"))?;
    let field = |name: &str| meta.get(name).ok_or_else(|| anyhow!("no {name}"));
    if field("format")? != FORMAT
        || field("weights")? != &weights_identity(model_path)?
        || field("inputs")? != &inputs_identity(images, labels)?
    {
        bail!("stale");
    }
    let keys: Vec<String> = serde_json::from_str(field("map_keys")?)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{e}"))?;
    let id_of = ids_by_reported_path(images);
    let mut maps = HashMap::with_capacity(keys.len());
    for (i, key) in keys.into_iter().enumerate() {
        // The inputs' identity covers every image's path: a key naming none is a corrupt file.
        let id = *id_of.get(&key).ok_or_else(|| anyhow!("map.{i}: no such image"))?;
        let view = file.tensor(&format!("map.{i}")).map_err(|e| anyhow!("{e}"))?;
        let [height, width] = view.shape() else { bail!("map.{i}: not two-dimensional") };
        if view.dtype() != Dtype::F32 || view.data().len() != height * width * 4 {
            bail!("map.{i}: not {height}×{width} f32 values");
        }
        let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        maps.insert(id, Arc::new(ScoreMap::new(*width, *height, data)));
    }
    Ok(Evaluated {
        evaluations: serde_json::from_str(field("evaluations")?)?,
        inspected: serde_json::from_str(field("inspected")?)?,
        maps,
    })
}

/// Writes `evaluated` as the cache of the model at `model_path` (atomically); skipped when it would be too large.
pub fn store(model_path: &Path, images: &[StudioImage], labels: &LabelSet, evaluated: &Evaluated) -> Result<()> {
    let map_bytes: u64 = evaluated.maps.values().map(|m| m.data.len() as u64 * 4).sum();
    if map_bytes > MAX_CACHE_BYTES / 2 {
        return Ok(());
    }
    let mapped: Vec<(&StudioImage, &ScoreMap)> =
        images.iter().filter_map(|image| Some((image, evaluated.maps.get(&image.id)?.as_ref()))).collect();
    let keys: Vec<String> = mapped.iter().map(|(image, _)| reported_path(&image.path)).collect();
    let buffers: Vec<(Vec<usize>, Vec<u8>)> = mapped
        .iter()
        .map(|(_, map)| (vec![map.height, map.width], map.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let mut views = Vec::with_capacity(keys.len());
    for (i, (shape, data)) in buffers.iter().enumerate() {
        let view = TensorView::new(Dtype::F32, shape.clone(), data).map_err(|e| anyhow!("{e}"))?;
        views.push((format!("map.{i}"), view));
    }
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("weights".to_string(), weights_identity(model_path)?),
        ("inputs".to_string(), inputs_identity(images, labels)?),
        ("map_keys".to_string(), serde_json::to_string(&keys)?),
        ("evaluations".to_string(), serde_json::to_string(&evaluated.evaluations)?),
        ("inspected".to_string(), serde_json::to_string(&evaluated.inspected)?),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| anyhow!("{e}"))?;
    let path = cache_path(model_path);
    write_atomic(&path, &bytes).with_context(|| format!("{}: cannot write the map cache", path.display()))
}
