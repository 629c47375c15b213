//! The methods, grouped by the survey's five families, behind one small trait. A method is one file that
//! provides a [`MethodInfo`] (name, family, defaults, `fit`, `load`); adding one to [`REGISTRY`] makes it appear
//! in the CLI and the studio.

/// Declares a method's registry entry `INFO`. The model type provides `fit(context, images, settings)` and
/// `load(backbone, image_size, settings, tensors)`; its settings type has serde and `Default`, and arrives
/// parsed from the JSON the user and the model file give, after every value was checked against its range
/// (`ranges`: the method's own settings; the shared ones are in [`settings::COMMON_RANGES`]).
macro_rules! method_info {
    ($model:ident, $settings:ty, name: $name:expr, title: $title:expr, family: $family:expr, summary: $summary:expr,
     guide: $guide:expr, ranges: [$($key:literal: $min:literal..=$max:literal),* $(,)?]
     $(, presets: [$($preset:literal: $about:literal => $make:path),* $(,)?])? $(,)?) => {
        pub static INFO: $crate::methods::MethodInfo = $crate::methods::MethodInfo {
            name: $name,
            title: $title,
            family: $family,
            summary: $summary,
            guide: $guide,
            ranges: &[$($crate::methods::settings::SettingRange::new($key, $min as f64, $max as f64)),*],
            check: |settings| {
                $crate::methods::settings::check_ranges($name, INFO.ranges, settings)?;
                serde_json::from_value::<$settings>(settings.clone())
                    .map_err(|e| anyhow::anyhow!("{} settings: {e}", $name))?;
                Ok(())
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

/// The `TrainingPlan` of a trained method's settings (fields `epochs`, `learning_rate`, `weight_decay`,
/// `time_budget_seconds`), with `steps` steps per epoch.
macro_rules! training_plan {
    ($settings:expr, $steps:expr) => {
        $crate::methods::training::TrainingPlan {
            epochs: $settings.epochs,
            steps_per_epoch: $steps,
            learning_rate: $settings.learning_rate,
            weight_decay: $settings.weight_decay,
            time_budget_seconds: $settings.time_budget_seconds,
        }
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
    /// Checks complete settings: every value in its range, and the shape the method's settings type reads.
    pub check: fn(&serde_json::Value) -> Result<()>,
    /// The default: what finishes on an MVTec-sized category within 10 minutes on a 2-core CPU.
    pub default_settings: fn() -> serde_json::Value,
    pub presets: &'static [Preset],
    pub fit: FitFn,
    pub load: LoadFn,
}

/// Every method Loupe can train, in display order.
pub static REGISTRY: &[&MethodInfo] = &[
    &reconstruction::autoencoder::INFO,
    &reconstruction::stfpm::INFO,
    &flow::fastflow::INFO,
    &flow::cflow::INFO,
    &representation::patchcore::INFO,
    &representation::padim::INFO,
    &augmentation::draem::INFO,
    &augmentation::cutpaste::INFO,
    &enhancement::fcdd::INFO,
    &enhancement::mean_shifted::INFO,
];

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
    values
        .chunks_exact(grid * grid)
        .map(|cells| {
            let map = ScoreMap::new(grid, grid, cells.to_vec()).resized(size, size).blurred(blur_sigma);
            AnomalyOutput { score: map.max(), map }
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

/// What the ignored benchmark diagnostics of the trained methods start from.
#[cfg(test)]
pub(crate) mod diagnostic {
    use crate::backbone::Backbone;
    use crate::dataset::{decode_all, scan_mvtec, DecodedImage};
    use crate::methods::calibration::CALIBRATION_IMAGES;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A trained model file and a benchmark folder, named by environment variables, read for a diagnostic.
    pub struct Diagnostic<S> {
        pub backbone: Arc<Backbone>,
        pub image_size: u32,
        pub settings: S,
        pub tensors: HashMap<String, Tensor>,
        /// The first [`CALIBRATION_IMAGES`] training images (what the methods calibrate on).
        pub train_images: Vec<DecodedImage>,
        pub test_images: Vec<DecodedImage>,
        /// Per test image: whether it is defective.
        pub labels: Vec<bool>,
    }

    /// Reads the model file at `$model_variable` and the MVTec-layout folder at `$data_variable`.
    pub fn load<S: serde::de::DeserializeOwned>(model_variable: &str, data_variable: &str) -> Diagnostic<S> {
        let variable =
            |name: &str| std::path::PathBuf::from(std::env::var(name).unwrap_or_else(|_| panic!("set {name}")));
        let (path, data) = (variable(model_variable), variable(data_variable));
        let backbone =
            Arc::new(Backbone::load(&crate::backbone::weights::default_weights_path(), &Device::Cpu).unwrap());
        let manifest = crate::model_file::load(&path, backbone.clone()).unwrap().manifest;
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let benchmark = scan_mvtec(&data).unwrap();
        let train_records = &benchmark.train[..benchmark.train.len().min(CALIBRATION_IMAGES)];
        let (train_images, _) = decode_all(train_records, manifest.image_size, &|_| {});
        let (test_images, _) = decode_all(&benchmark.test, manifest.image_size, &|_| {});
        let labels = test_images.iter().map(|i| benchmark.test[i.index].label.is_anomalous()).collect();
        Diagnostic {
            backbone,
            image_size: manifest.image_size,
            settings: serde_json::from_value(manifest.settings).unwrap(),
            tensors,
            train_images,
            test_images,
            labels,
        }
    }
}
