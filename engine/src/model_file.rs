//! The model file: one `.safetensors` per trained model. Tensors hold the learned state (a memory bank,
//! network weights); the safetensors metadata key `loupe` holds a JSON [`Manifest`]: format version, method
//! and settings, backbone and the hash of its weights, input size and normalisation, the decision thresholds
//! and the validation score statistics they were chosen from. Loading checks the version and the backbone hash.
//! safetensors holds only data, so opening an untrusted model file can never run code.

use crate::atomic_file::write_atomic;
use crate::backbone::efficientnet_lite0::STRIDE16_BLOCK;
use crate::backbone::torch_pth::PthTensor;
use crate::backbone::weights::{weights_hash, NamedTensors};
use crate::backbone::{Backbone, BACKBONE_NAME};
use crate::geometry::InputGeometry;
use crate::methods::{find_method, AnomalyModel};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Version 2 added the input geometry (tiles, kept aspect ratio, region of interest). A model that scores the
/// whole image is still written as version 1, so every Loupe before it opens it; a tiled one is version 2, which
/// they refuse rather than score it as a whole image.
pub const FORMAT_VERSION: u32 = 2;
const WHOLE_IMAGE_FORMAT_VERSION: u32 = 1;
pub const METADATA_KEY: &str = "loupe";
/// Input sizes a model may declare (the backbone needs at least one stride-16 cell).
pub const MIN_IMAGE_SIZE: u32 = 16;
pub const MAX_IMAGE_SIZE: u32 = 4096;
/// Model files larger than this are refused before reading: loading takes about three times the file's size
/// (its bytes, the tensors, a transposed copy), and no model Loupe trains comes near it.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;
/// Where a bundle's backbone tensors are named (`backbone/<name in the weights file>`).
pub const BUNDLED_BACKBONE_PREFIX: &str = "backbone/";
pub const NORMALIZATION: &str = "rgb in [0,1], resized to image_size², then (x*255-127)/128";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    /// Images scoring at or above this are rejected; `None` until one is chosen (no validation images).
    pub decision: Option<f32>,
    /// Optional lower edge of a review band: scores in [review, decision) go to a person.
    pub review: Option<f32>,
    /// How `decision` was chosen, for people reading the file.
    pub rule: String,
    /// Who chose it: the studio adopts a threshold a command set after the project's (and says so) instead of
    /// writing the project's over it.
    #[serde(default)]
    pub chosen_by: ChosenBy,
}

impl Thresholds {
    /// What these thresholds say of `score`; `None` until a decision threshold is chosen.
    pub fn verdict(&self, score: f32) -> Option<crate::verdict::Verdict> {
        Some(crate::verdict::verdict(score, self.decision?, self.review))
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChosenBy {
    /// At fit time, from the held-out good images.
    #[default]
    Fit,
    /// In the studio's threshold view.
    Studio,
    /// By `loupe eval --choose-threshold … --save-threshold`.
    Command,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ScoreStats {
    pub count: usize,
    pub mean: f32,
    pub std: f32,
    pub min: f32,
    pub max: f32,
    /// The raw validation scores (normal images held out from training), sorted.
    pub scores: Vec<f32>,
}

impl ScoreStats {
    pub fn from_scores(scores: &[f32]) -> Self {
        if scores.is_empty() {
            return Self::default();
        }
        let mut sorted = scores.to_vec();
        sorted.sort_by(f32::total_cmp);
        let n = sorted.len() as f32;
        let mean = sorted.iter().sum::<f32>() / n;
        let var = sorted.iter().map(|s| (s - mean).powi(2)).sum::<f32>() / n;
        Self {
            count: sorted.len(),
            mean,
            std: var.sqrt(),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            scores: sorted,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TrainingInfo {
    /// Files trained on.
    pub images_used: usize,
    /// Model inputs trained on: the files' tiles for a tiled model, else the files.
    #[serde(default)]
    pub inputs_used: usize,
    pub images_skipped: usize,
    pub fit_seconds: f64,
    pub source: String,
    /// Trained on the Folder shape's training part of `source` (`fit --normal`): the images `eval --normal`
    /// tests were held out. False: trained on every image there.
    #[serde(default)]
    pub folder_test_held_out: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub loupe_version: String,
    pub method: String,
    pub settings: serde_json::Value,
    pub backbone: String,
    pub backbone_weights_sha256: String,
    pub image_size: u32,
    pub normalization: String,
    pub thresholds: Thresholds,
    pub validation: ScoreStats,
    pub training: TrainingInfo,
    /// A bundle: the backbone weights travel in the file (tensors under [`BUNDLED_BACKBONE_PREFIX`]), so it runs
    /// where they were never fetched.
    #[serde(default)]
    pub backbone_embedded: bool,
    /// How the model sees a camera image (`geometry.rs`); absent (whole image) in every file before version 2.
    #[serde(default)]
    pub geometry: InputGeometry,
}

impl Manifest {
    pub fn for_model(model: &dyn AnomalyModel, backbone: &Backbone, thresholds: Thresholds) -> Self {
        Self {
            format_version: WHOLE_IMAGE_FORMAT_VERSION,
            loupe_version: env!("CARGO_PKG_VERSION").to_string(),
            method: model.info().name.to_string(),
            settings: model.settings(),
            backbone: BACKBONE_NAME.to_string(),
            backbone_weights_sha256: backbone.weights_hash.clone(),
            image_size: model.image_size(),
            normalization: NORMALIZATION.to_string(),
            thresholds,
            validation: ScoreStats::default(),
            training: TrainingInfo::default(),
            backbone_embedded: false,
            geometry: InputGeometry::default(),
        }
    }

    /// Sets the geometry, and the format version a reader needs to honour it.
    pub fn set_geometry(&mut self, geometry: InputGeometry) {
        self.format_version = if geometry.is_whole_image() { WHOLE_IMAGE_FORMAT_VERSION } else { FORMAT_VERSION };
        self.geometry = geometry;
    }
}

impl Manifest {
    /// Every number that must read back is finite: JSON has no NaN or infinity (serde_json writes `null`, which
    /// does not read back as a number), so a file holding one could never be opened again.
    fn check_finite(&self) -> Result<()> {
        let thresholds =
            [("decision threshold", self.thresholds.decision), ("review threshold", self.thresholds.review)];
        for (what, value) in thresholds {
            if value.is_some_and(|v| !v.is_finite()) {
                bail!("the {what} is {}, not a number a model file can hold", value.unwrap_or_default());
            }
        }
        let stats = &self.validation;
        let summary = [stats.mean, stats.std, stats.min, stats.max];
        if summary.iter().chain(&stats.scores).any(|v| !v.is_finite()) {
            bail!("a validation score is not finite (NaN or infinite); the model is broken");
        }
        if !self.training.fit_seconds.is_finite() {
            bail!("the fit time is not finite");
        }
        Ok(())
    }
}

/// Writes the model file atomically. Refuses a manifest with a non-finite number rather than write a file that
/// cannot be read back.
pub fn save(path: &Path, model: &dyn AnomalyModel, manifest: &Manifest) -> Result<()> {
    let mut manifest = manifest.clone();
    manifest.backbone_embedded = false;
    write_file(path, &manifest, model_tensors(model)?)
}

/// Writes a bundle: the model file with the backbone weights it was trained with inside (checked against the
/// manifest's hash), so `loupe infer` runs it on a machine where they were never fetched.
pub fn save_bundle(path: &Path, model: &dyn AnomalyModel, manifest: &Manifest, weights: &NamedTensors) -> Result<()> {
    let hash = weights_hash(weights);
    if manifest.backbone_weights_sha256 != hash {
        bail!(
            "{}: not written: the model was trained with backbone weights {}, but the weights given are {}; use \
             the weights it was trained with",
            path.display(),
            short(&manifest.backbone_weights_sha256, 12),
            short(&hash, 12)
        );
    }
    let mut tensors = model_tensors(model)?;
    for (name, tensor) in weights {
        tensors.push((format!("{BUNDLED_BACKBONE_PREFIX}{name}"), tensor.shape.clone(), tensor.data.clone()));
    }
    let mut manifest = manifest.clone();
    manifest.backbone_embedded = true;
    write_file(path, &manifest, tensors)
}

/// Named tensors as written: name, shape, values.
type FileTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn model_tensors(model: &dyn AnomalyModel) -> Result<FileTensors> {
    model
        .state()?
        .into_iter()
        .map(|(name, t)| {
            let t = t.to_device(&Device::Cpu)?.contiguous()?;
            Ok((name, t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
        })
        .collect()
}

fn write_file(path: &Path, manifest: &Manifest, tensors: FileTensors) -> Result<()> {
    manifest.check_finite().with_context(|| format!("{}: not written", path.display()))?;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, values)| (name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| anyhow!("{name}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(manifest)?)]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| anyhow!("serialising model: {e}"))?;
    write_atomic(path, &bytes)
}

fn f32_values(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    if view.dtype() != safetensors::Dtype::F32 {
        bail!("a tensor is {:?}, expected F32", view.dtype());
    }
    Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Reads a model file whole, refusing one over [`MAX_MODEL_BYTES`] before reading it.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let size = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?.len();
    if size > MAX_MODEL_BYTES {
        bail!(
            "{}: {size} bytes is larger than any model file Loupe writes ({MAX_MODEL_BYTES} at most)",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Reads only the manifest (cheap; used to find which backbone a model needs).
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let bytes = read_bounded(path)?;
    manifest_from_bytes(&bytes).with_context(|| format!("{}: not a Loupe model file", path.display()))
}

fn manifest_from_bytes(bytes: &[u8]) -> Result<Manifest> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{e}"))?;
    let text = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| anyhow!("no `{METADATA_KEY}` manifest in its metadata"))?;
    let manifest: Manifest = serde_json::from_str(text).context("its manifest is malformed")?;
    if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&manifest.image_size) {
        bail!("image size {} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}", manifest.image_size);
    }
    if manifest.format_version > FORMAT_VERSION {
        bail!(
            "model format version {} is newer than this Loupe understands ({FORMAT_VERSION}); update Loupe",
            manifest.format_version
        );
    }
    manifest.geometry.check().context("its input geometry")?;
    Ok(manifest)
}

pub struct LoadedModel {
    pub model: Box<dyn AnomalyModel>,
    pub manifest: Manifest,
}

/// Loads a model file, checking it was trained on the same backbone weights.
pub fn load(path: &Path, backbone: Arc<Backbone>) -> Result<LoadedModel> {
    let bytes = read_bounded(path)?;
    let context = || format!("{}: cannot load model", path.display());
    load_bytes(&bytes, backbone).with_context(context)
}

/// Loads a model file with the backbone a bundle carries, or else with `installed()` (the weights fetched on
/// this machine), which is then the only place a plain model file's backbone can come from.
pub fn open(path: &Path, device: &Device, installed: impl FnOnce() -> Result<Arc<Backbone>>) -> Result<LoadedModel> {
    let bytes = read_bounded(path)?;
    let context = || format!("{}: cannot load model", path.display());
    let manifest = manifest_from_bytes(&bytes).with_context(context)?;
    let backbone = if manifest.backbone_embedded {
        Arc::new(bundled_backbone(&bytes, device).with_context(context)?)
    } else {
        installed()?
    };
    load_bytes(&bytes, backbone).with_context(context)
}

/// The backbone a bundle carries.
fn bundled_backbone(bytes: &[u8], device: &Device) -> Result<Backbone> {
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{e}"))?;
    let mut named = NamedTensors::new();
    for (name, view) in file.tensors() {
        if let Some(weight_name) = name.strip_prefix(BUNDLED_BACKBONE_PREFIX) {
            let data = f32_values(&view).with_context(|| format!("tensor {name}"))?;
            named.insert(weight_name.to_string(), PthTensor { shape: view.shape().to_vec(), data });
        }
    }
    Backbone::from_named(named, device, STRIDE16_BLOCK, false).context("its bundled backbone weights are incomplete")
}

/// [`load`] from the file's bytes (the fuzz target's entry).
pub fn load_bytes(bytes: &[u8], backbone: Arc<Backbone>) -> Result<LoadedModel> {
    load_bytes_with_settings(bytes, backbone, |_| {})
}

/// [`load_bytes`] with the method's settings edited first (benchmarks compare settings that need no refit,
/// such as PatchCore's search, on one file).
pub fn load_bytes_with_settings(
    bytes: &[u8],
    backbone: Arc<Backbone>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<LoadedModel> {
    let mut manifest = manifest_from_bytes(bytes)?;
    edit(&mut manifest.settings);
    if manifest.backbone != BACKBONE_NAME || manifest.backbone_weights_sha256 != backbone.weights_hash {
        bail!(
            "the model was trained with backbone {} (weights {}), but the loaded weights are {} ({}); \
             use the weights it was trained with",
            short(&manifest.backbone, 64),
            short(&manifest.backbone_weights_sha256, 12),
            BACKBONE_NAME,
            short(&backbone.weights_hash, 12)
        );
    }
    let info = find_method(&manifest.method)?;
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{e}"))?;
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        if name.starts_with(BUNDLED_BACKBONE_PREFIX) {
            continue;
        }
        let values = f32_values(&view).with_context(|| format!("tensor {name}"))?;
        tensors.insert(name, Tensor::from_vec(values, view.shape().to_vec(), &backbone.device)?);
    }
    let model = (info.load)(backbone, manifest.image_size, &manifest.settings, tensors)?;
    Ok(LoadedModel { model, manifest })
}

/// The first `count` characters of a name or hash read from a file (any text: cut on a character boundary).
fn short(text: &str, count: usize) -> String {
    text.chars().take(count).collect()
}
