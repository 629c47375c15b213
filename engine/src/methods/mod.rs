//! The methods, grouped by the survey's five families, behind one small trait. A method is one file that
//! provides a [`MethodInfo`] (`method_info!`: name, family, defaults, ranges, words for its settings, a smoke
//! setting, `fit`, `load`); naming it in its family's `family_methods!` registers it: it appears in the CLI and
//! the studio, and the registry-wide tests train, save, load and document it.

/// Declares a method's registry entry `INFO`. The model type provides `fit(context, images, settings)` and
/// `load(backbone, image_size, settings, tensors)`; its settings type has serde and `Default`, and arrives
/// parsed from the JSON the user and the model file give, after every value was checked against its range
/// (`ranges`: the method's own settings; the shared ones are in [`settings::COMMON_RANGES`]). `docs` are the
/// words for its own settings (the shared ones: [`setting_docs::COMMON`]); `smoke` is a few seconds of training
/// on the synthetic set at an input size, and the floors it must beat there ([`Smoke`]).
macro_rules! method_info {
    ($model:ident, $settings:ty, name: $name:expr, title: $title:expr, family: $family:expr, summary: $summary:expr,
     guide: $guide:expr, ranges: [$($key:literal: $min:literal..=$max:literal),* $(,)?],
     docs: [$($doc_key:literal => $doc:expr),* $(,)?],
     smoke: ($smoke:tt at $smoke_size:literal, floors $floors:expr)
     $(, localises: $localises:literal)?
     $(, presets: [$($preset:literal: $about:literal => $make:path),* $(,)?])? $(,)?) => {
        pub static INFO: $crate::methods::MethodInfo = $crate::methods::MethodInfo {
            name: $name,
            title: $title,
            family: $family,
            summary: $summary,
            guide: $guide,
            ranges: &[$($crate::methods::settings::SettingRange::new($key, $min as f64, $max as f64)),*],
            docs: &[$(($doc_key, $doc)),*],
            localises: true $(&& $localises)?,
            smoke: $crate::methods::Smoke {
                settings: || serde_json::json!($smoke),
                image_size: $smoke_size,
                floors: $floors,
            },
            check: |settings| {
                $crate::methods::settings::check_ranges($name, INFO.ranges, settings)?;
                let parsed = serde_json::from_value::<$settings>(settings.clone())
                    .map_err(|e| anyhow::anyhow!("{} settings: {e}", $name))?;
                $crate::methods::settings::check_known_keys($name, &parsed, settings)
            },
            default_settings: || serde_json::to_value(<$settings>::default()).expect("settings serialise"),
            presets: &[$($($crate::methods::Preset {
                name: $preset,
                about: $about,
                settings: || serde_json::to_value($make()).expect("settings serialise"),
            }),*)?],
            fit: |context, images, settings| {
                (INFO.check)(settings)?;
                Ok(Box::new($model::fit(context, images, serde_json::from_value(settings.clone())?)?))
            },
            load: |backbone, image_size, settings, tensors| {
                (INFO.check)(settings)?;
                Ok(Box::new($model::load(backbone, image_size, serde_json::from_value(settings.clone())?, tensors)?))
            },
        };
    };
}

/// Declares a family's method files and lists their registry entries in display order: the one line that
/// registers a method (the family's `mod.rs`; [`REGISTRY`] gathers the families).
macro_rules! family_methods {
    ($($method:ident),* $(,)?) => {
        $(pub mod $method;)*
        /// This family's methods, in display order.
        pub static METHODS: &[&$crate::methods::MethodInfo] = &[$(&$method::INFO),*];
    };
}

/// The `AnomalyModel` methods every model implements the same way, from its `settings` and `image_size` fields
/// and its file's `INFO`.
macro_rules! model_basics {
    () => {
        fn info(&self) -> &'static $crate::methods::MethodInfo {
            &INFO
        }

        fn settings(&self) -> serde_json::Value {
            serde_json::to_value(&self.settings).expect("settings serialise")
        }

        fn image_size(&self) -> u32 {
            self.image_size
        }
    };
}

pub mod augmentation;
pub mod calibration;
pub mod conv_kernel;
#[cfg(test)]
mod diagnostics;
pub mod enhancement;
pub mod features;
pub mod flow;
pub mod fused;
pub mod gaussian;
pub mod layers;
pub mod per_image;
pub mod reconstruction;
pub mod representation;
pub mod setting_docs;
pub mod settings;
pub mod ssim;
pub mod ssim_kernel;
pub mod statistics;
pub mod training;

use crate::backbone::Backbone;
use crate::dataset::{DecodedImage, TrainingImages};
use crate::maps::ScoreMap;
use crate::progress::Progress;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// The five families of Cui, Liu & Lian (IEEE Access 2023).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Family {
    Reconstruction,
    NormalizingFlow,
    Representation,
    DataAugmentation,
    AlgorithmEnhancement,
}

impl Family {
    pub const ALL: [Family; 5] = [
        Family::Reconstruction,
        Family::NormalizingFlow,
        Family::Representation,
        Family::DataAugmentation,
        Family::AlgorithmEnhancement,
    ];

    /// The family's methods, in display order.
    pub fn methods(self) -> &'static [&'static MethodInfo] {
        match self {
            Family::Reconstruction => reconstruction::METHODS,
            Family::NormalizingFlow => flow::METHODS,
            Family::Representation => representation::METHODS,
            Family::DataAugmentation => augmentation::METHODS,
            Family::AlgorithmEnhancement => enhancement::METHODS,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Family::Reconstruction => "Reconstruction",
            Family::NormalizingFlow => "Normalizing flow",
            Family::Representation => "Representation",
            Family::DataAugmentation => "Data augmentation",
            Family::AlgorithmEnhancement => "Algorithm enhancement",
        }
    }
}

/// What a model says about one image.
#[derive(Debug, Clone)]
pub struct AnomalyOutput {
    /// Raw image score: higher is more anomalous.
    pub score: f32,
    /// Anomaly map at the model's input size.
    pub map: ScoreMap,
}

/// A trained model, ready to score images.
pub trait AnomalyModel: Send + Sync {
    fn info(&self) -> &'static MethodInfo;
    /// The settings it was trained with (stored in the model file).
    fn settings(&self) -> serde_json::Value;
    /// Side of the square input images.
    fn image_size(&self) -> u32;
    /// Scores a batch `(B, 3, S, S)` of images in [0, 1] on the model's device.
    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>>;
    /// The tensors that, with the settings, rebuild the model.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Records [`Self::score_batch`] into an ONNX graph, from images in [0, 1] `(N, 3, S, S)` to the maps
    /// `(N, 1, S, S)` and scores `(N,)` it returns. Built from [`crate::onnx::layers`], which share their wiring
    /// with the code that scores; the parity tests hold the rest to `score_batch`.
    fn record_onnx(&self, _graph: &mut crate::onnx::Graph, _images: &crate::onnx::Value) -> Result<RecordedScores> {
        bail!(
            "{} cannot be exported to ONNX yet: its scoring has not been written as graph operations",
            self.info().title
        )
    }
}

/// What [`AnomalyModel::record_onnx`] leaves in the graph.
pub struct RecordedScores {
    /// `(N, 1, S, S)`, after the blur Loupe applies.
    pub map: crate::onnx::Value,
    /// `(N,)`.
    pub score: crate::onnx::Value,
}

/// What fitting needs besides the images.
pub struct FitContext<'a> {
    pub backbone: Arc<Backbone>,
    pub device: Device,
    pub batch_size: usize,
    pub image_size: u32,
    pub progress: &'a dyn Progress,
}

pub type FitFn = fn(&FitContext, &TrainingImages, &serde_json::Value) -> Result<Box<dyn AnomalyModel>>;
pub type LoadFn = fn(Arc<Backbone>, u32, &serde_json::Value, HashMap<String, Tensor>) -> Result<Box<dyn AnomalyModel>>;

/// A short training that separates the engine's synthetic defects (`SyntheticSpec::tiny`) in seconds: what the
/// registry-wide tests train every method with (`tests/methods_synthetic.rs`), and what it must reach there.
pub struct Smoke {
    /// Overrides of the defaults.
    pub settings: fn() -> serde_json::Value,
    pub image_size: u32,
    /// Image AUROC, pixel AUROC and AUPRO@0.3 it must beat (the last two unused where it does not localise).
    pub floors: [f64; 3],
}

/// A named full setting besides the default, e.g. the paper's training schedule for a GPU.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    pub settings: fn() -> serde_json::Value,
}

pub struct MethodInfo {
    /// CLI name, e.g. `patchcore`.
    pub name: &'static str,
    pub title: &'static str,
    pub family: Family,
    pub summary: &'static str,
    /// When it wins and what it costs on a CPU, measured on MTD (761 training images, 2 cores; ARCHITECTURE.md
    /// "Measured"): the second line of its description in the Train view and `loupe methods`.
    pub guide: &'static str,
    /// The ranges of the method's own numeric settings (the shared ones: [`settings::COMMON_RANGES`]).
    pub ranges: &'static [settings::SettingRange],
    /// What the method's own settings mean (the shared ones: [`setting_docs::COMMON`]).
    pub docs: &'static [(&'static str, setting_docs::SettingDoc)],
    /// Whether its map says where an image is abnormal. An image-level method (`localises: false` in its
    /// `method_info!`) draws its score over the whole image, and no pixel metric is computed for it.
    pub localises: bool,
    pub smoke: Smoke,
    /// Checks complete settings: every value in its range, and the shape the method's settings type reads.
    pub check: fn(&serde_json::Value) -> Result<()>,
    /// The default: what finishes on an MVTec-sized category within 10 minutes on a 2-core CPU.
    pub default_settings: fn() -> serde_json::Value,
    pub presets: &'static [Preset],
    pub fit: FitFn,
    pub load: LoadFn,
}

/// Every method Loupe can train, in display order: family by family, each family's `family_methods!` order.
pub static REGISTRY: std::sync::LazyLock<Vec<&'static MethodInfo>> =
    std::sync::LazyLock::new(|| Family::ALL.iter().flat_map(|family| family.methods()).copied().collect());

pub fn find_method(name: &str) -> Result<&'static MethodInfo> {
    match REGISTRY.iter().find(|m| m.name.eq_ignore_ascii_case(name)) {
        Some(info) => Ok(info),
        None => {
            let known: Vec<&str> = REGISTRY.iter().map(|m| m.name).collect();
            bail!("unknown method `{name}` (available: {})", known.join(", "))
        }
    }
}

impl MethodInfo {
    /// The settings of preset `name` ("default" is the default).
    pub fn preset(&self, name: &str) -> Result<serde_json::Value> {
        if name == "default" {
            return Ok((self.default_settings)());
        }
        match self.presets.iter().find(|p| p.name == name) {
            Some(preset) => Ok((preset.settings)()),
            None => {
                let known: Vec<&str> = std::iter::once("default").chain(self.presets.iter().map(|p| p.name)).collect();
                bail!("{} has no preset `{name}` (available: {})", self.title, known.join(", "))
            }
        }
    }
}

impl MethodInfo {
    /// The default settings overlaid with `overrides` (a preset's or the user's), checked: the settings a fit
    /// starts from. Unknown keys, values of the wrong kind and values outside their ranges are errors naming the
    /// setting.
    pub fn settings_with(&self, overrides: &serde_json::Value) -> Result<serde_json::Value> {
        let merged = merge_settings((self.default_settings)(), overrides)?;
        (self.check)(&merged)?;
        Ok(merged)
    }

    /// The range of setting `name` (own or shared), for editors and help text.
    pub fn range_of(&self, name: &str) -> Option<settings::SettingRange> {
        settings::range_of(self.ranges, name)
    }
}

/// Defaults overlaid with the user's settings; unknown keys are an error so typos do not pass silently.
pub fn merge_settings(defaults: serde_json::Value, overrides: &serde_json::Value) -> Result<serde_json::Value> {
    let mut merged = defaults;
    if let (Some(target), Some(source)) = (merged.as_object_mut(), overrides.as_object()) {
        for (key, value) in source {
            if !target.contains_key(key) {
                let known: Vec<&String> = target.keys().collect();
                bail!("unknown setting `{key}` (known: {known:?})");
            }
            target.insert(key.clone(), value.clone());
        }
    }
    Ok(merged)
}

/// Outputs of images from their square grids of cell values (one `grid × grid` block per image, row-major,
/// blocks after one another): each grid resized to `size²` and blurred is the map; its maximum is the score.
pub fn outputs_from_cells(values: &[f32], grid: usize, size: usize, blur_sigma: f32) -> Vec<AnomalyOutput> {
    outputs_from_cells_scored(values, grid, size, blur_sigma, 0.0)
}

/// [`outputs_from_cells`] with the image score the mean of the map's top `top_fraction` ([`ScoreMap::top_mean`];
/// 0 is the maximum).
pub fn outputs_from_cells_scored(
    values: &[f32],
    grid: usize,
    size: usize,
    blur_sigma: f32,
    top_fraction: f64,
) -> Vec<AnomalyOutput> {
    values
        .chunks_exact(grid * grid)
        .map(|cells| {
            let map = ScoreMap::new(grid, grid, cells.to_vec()).resized(size, size).blurred(blur_sigma);
            AnomalyOutput { score: map.top_mean(top_fraction), map }
        })
        .collect()
}

/// Stacks channel-planar images (`3 × S × S` values each, e.g. augmented copies) into a `(B, 3, S, S)` tensor.
pub fn planar_to_tensor(planar: &[Vec<f32>], size: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = planar.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(data, (planar.len(), 3, size, size), device)?)
}

/// Stacks decoded images (owned or borrowed) into a `(B, 3, S, S)` tensor in [0, 1].
pub fn images_to_tensor<I: std::borrow::Borrow<DecodedImage>>(images: &[I], device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else { bail!("no images in batch") };
    let size = first.borrow().size as usize;
    let mut data = Vec::with_capacity(images.len() * 3 * size * size);
    for image in images {
        data.extend(image.borrow().to_chw_f32());
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, size, size), device)?)
}
