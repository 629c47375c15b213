//! FastFlow — Yu et al. 2021, "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing
//! Flows"; reference code: anomalib's `models/image/fastflow`.
//!
//! One 2-D flow per modelled backbone level (`levels`: stride 8, 40 channels; stride 16, 112 channels — by
//! default stride 16 alone) over the whole feature map: a chain of affine coupling blocks whose sub-networks
//! are two convolutions, 3×3 in every block (the paper's "3-3" variant, default) or 3×3 and 1×1 alternating
//! (hidden channels = input channels × `hidden_ratio`). Trained by maximum likelihood on the frozen backbone's
//! maps of normal images. Anomaly map: the negative log-likelihood per dimension at each position, calibrated
//! per position, upsampled and averaged over the levels, Gaussian-blurred; image score: its maximum.
//! Features are standardised per channel with the training set's statistics (the reference uses a learned
//! LayerNorm over C×H×W, which ties the model to one input size). Convolutions run as im2col + matrix product
//! in channels-last rows, which candle differentiates and multiplies fast on the CPU.

use crate::methods::setting_docs::common;
use super::{
    both_levels, calibrate, check_levels, gaussian_log_density, level_side, level_statistics, mean_over_levels,
    normalisation_state, record_assemble, record_level_rows, record_per_dim, take_calibration, take_standardise,
    training_rows, AffineTail, LevelScoring, LEVEL_CHANNELS,
};
use crate::methods::statistics::Standardise;
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::PositionCalibration;
use crate::methods::layers::patches;
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord};
use crate::methods::{AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::{layers, Graph, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Fastflow,
    FastflowSettings,
    name: "fastflow",
    title: "FastFlow",
    family: Family::NormalizingFlow,
    summary: "2-D normalizing flows on feature maps (convolutional couplings); likelihood.",
    guide: "Wins when good parts vary smoothly in texture: a likelihood per location. On 2 CPU cores, MTD (761 training images): fit 7 min 18 s, 26 images/s, image AUROC 0.910.",
    ranges: ["flow_steps": 1..=64, "hidden_ratio": 0.01..=8, "clamp_alpha": 0.01..=20, "levels": 0..=1],
    docs: [
        "flow_steps" => common("Flow steps", "", "Coupling steps of the 2-D flow: more is more expressive and slower.", false),
        "hidden_ratio" => common("Hidden width ratio", "", "Width of each coupling's sub-network relative to its input channels.", true),
        "conv3x3_only" => common("All 3×3 blocks", "", "Every block 3×3 (the paper's 3-3 variant) instead of alternating 3×3 and 1×1.", true),
    ],
    smoke: ({"epochs": 4, "flow_steps": 4, "images_per_step": 4} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => FastflowSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FastflowSettings {
    pub flow_steps: usize,
    pub hidden_ratio: f64,
    /// α in exp(α·tanh(·)).
    pub clamp_alpha: f64,
    /// Every block 3×3 — the paper's "3-3" variant, which it reports for ResNet-18 next to the alternating
    /// "3-1" one (used when false). On MTD (stride 16, 12 epochs) 3-3 scores 0.917 image AUROC, 3-1 0.896.
    pub conv3x3_only: bool,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub images_per_step: usize,
    /// Model 3×3-averaged features (as PatchCore) instead of the raw maps.
    pub local_average: bool,
    /// Backbone levels modelled: 0 = stride 8 (40 channels), 1 = stride 16 (112 channels). On MTD the stride-16
    /// level alone scores better than both (see ARCHITECTURE.md) and trains in two thirds of the time.
    #[serde(default = "both_levels")]
    pub levels: Vec<usize>,
    pub blur_sigma: f32,
}

impl Default for FastflowSettings {
    fn default() -> Self {
        Self {
            flow_steps: 8,
            hidden_ratio: 1.0,
            clamp_alpha: 2.0,
            conv3x3_only: true,
            schedule: Schedule::new(12, 1e-3),
            images_per_step: 8,
            local_average: true,
            levels: vec![1],
            blur_sigma: 4.0,
        }
    }
}

impl FastflowSettings {
    /// anomalib's FastFlow schedule (500 epochs, batch 32) on the raw feature maps.
    pub fn published() -> Self {
        Self {
            schedule: Schedule { epochs: 500, ..Self::default().schedule },
            images_per_step: 32,
            local_average: false,
            levels: both_levels(),
            ..Self::default()
        }
    }
}

/// A coupling block over a map held as rows `(B·H·W, C)`: the sub-network is conv → ReLU → conv with `kernel`
/// 3 or 1 ("same" padding).
struct MapCoupling {
    split: usize,
    kernel: usize,
    first: Linear,
    second: Linear,
    tail: AffineTail,
}

impl MapCoupling {
    fn new(vb: VarBuilder, dim: usize, kernel: usize, hidden_ratio: f64, clamp: f64, seed: u64) -> Result<Self> {
        let split = dim / 2;
        let hidden = ((split as f64 * hidden_ratio).round() as usize).max(1);
        let taps = kernel * kernel;
        let first = candle_nn::linear(taps * split, hidden, vb.pp("first"))?;
        let second = candle_nn::linear(taps * hidden, 2 * (dim - split), vb.pp("second"))?;
        let tail = AffineTail::new(&vb, dim, clamp, seed)?;
        Ok(Self { split, kernel, first, second, tail })
    }

    fn conv(&self, layer: &Linear, rows: &Tensor, shape: (usize, usize, usize)) -> Result<Tensor> {
        let (b, h, w) = shape;
        let input =
            if self.kernel == 1 { rows.clone() } else { patches(&rows.reshape((b, h, w, rows.dim(1)?))?, self.kernel, 1)? };
        Ok(layer.forward(&input)?)
    }

    fn forward(&self, x: &Tensor, shape: (usize, usize, usize)) -> Result<(Tensor, Tensor)> {
        let dim = x.dim(1)?;
        let x1 = x.narrow(1, 0, self.split)?.contiguous()?;
        let x2 = x.narrow(1, self.split, dim - self.split)?;
        let hidden = self.conv(&self.first, &x1, shape)?.relu()?;
        let a = self.conv(&self.second, &hidden, shape)?;
        self.tail.apply(&x1, &x2, &a)
    }
}

struct MapFlow {
    blocks: Vec<MapCoupling>,
}

impl MapFlow {
    fn new(vb: VarBuilder, dim: usize, settings: &FastflowSettings, seed: u64) -> Result<Self> {
        let blocks = (0..settings.flow_steps)
            .map(|i| {
                let kernel = if i % 2 == 1 && !settings.conv3x3_only { 1 } else { 3 };
                MapCoupling::new(
                    vb.pp(format!("block{i}")),
                    dim,
                    kernel,
                    settings.hidden_ratio,
                    settings.clamp_alpha,
                    seed + i as u64,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// Records [`Self::log_likelihood_per_dim`] on rows `(N, side², C)`: `(N, side²)`.
    fn record_log_likelihood_per_dim(&self, graph: &mut Graph, x: &Value, side: usize) -> Result<Value> {
        let (positions, channels) = (x.dim(1), x.dim(2));
        let map_shape = graph.ints("shape", &[4], &[0, side as i64, side as i64, channels as i64]);
        let mut z = graph.op("Reshape", &[x, &map_shape], vec![]).with_shape(vec![
            x.shape[0],
            Some(side),
            Some(side),
            Some(channels),
        ]);
        let mut log_det: Option<Value> = None;
        for block in &self.blocks {
            let x1 = layers::slice(graph, &z, 3, 0, block.split);
            let x2 = layers::slice(graph, &z, 3, block.split, channels - block.split);
            let hidden = layers::conv_from_im2col(graph, &x1, &block.first, block.kernel, 1)?;
            let hidden = graph.op("Relu", &[&hidden], vec![]).with_shape(hidden.shape);
            let a = layers::conv_from_im2col(graph, &hidden, &block.second, block.kernel, 1)?;
            let (y, block_log_det) = block.tail.record(graph, &x1, &x2, &a)?;
            z = y;
            log_det = Some(match log_det {
                None => block_log_det,
                Some(total) => graph.op("Add", &[&total, &block_log_det], vec![]),
            });
        }
        let per_dim = record_per_dim(graph, &z, log_det, channels);
        let rows = graph.ints("shape", &[2], &[0, positions as i64]);
        Ok(graph.op("Reshape", &[&per_dim, &rows], vec![]).with_shape(vec![x.shape[0], Some(positions)]))
    }

    /// Per-position log-likelihood divided by the channel count, `(B·H·W)`.
    fn log_likelihood_per_dim(&self, x: &Tensor, shape: (usize, usize, usize)) -> Result<Tensor> {
        let mut z = x.clone();
        let mut log_det = Tensor::zeros(x.dim(0)?, DType::F32, x.device())?;
        for block in &self.blocks {
            let (y, block_log_det) = block.forward(&z, shape)?;
            z = y;
            log_det = (log_det + block_log_det)?;
        }
        Ok(((gaussian_log_density(&z)? + log_det)? / x.dim(1)? as f64)?)
    }
}

pub struct Fastflow {
    backbone: Arc<Backbone>,
    settings: FastflowSettings,
    image_size: u32,
    varmap: VarMap,
    /// Per backbone level, its flow when the level is modelled.
    flows: Vec<Option<MapFlow>>,
    standardise: Vec<Standardise>,
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

fn build_flows(vb: &VarBuilder, settings: &FastflowSettings) -> Result<Vec<Option<MapFlow>>> {
    LEVEL_CHANNELS
        .iter()
        .enumerate()
        .map(|(level, &channels)| {
            if !settings.levels.contains(&level) {
                return Ok(None);
            }
            MapFlow::new(
                vb.pp(format!("level{level}")),
                channels,
                settings,
                settings.schedule.seed * 31 + level as u64 * 1000,
            )
            .map(Some)
        })
        .collect()
}

fn check_settings(settings: &FastflowSettings) -> Result<()> {
    check_levels(&settings.levels)
}

impl Fastflow {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: FastflowSettings) -> Result<Self> {
        check_settings(&settings)?;
        if images.is_empty() {
            bail!("FastFlow needs training images");
        }
        let device = context.device.clone();
        let progress = context.progress;
        let rows = training_rows(context, images, settings.local_average)?;
        let standardise = level_statistics(&rows, &device)?;
        let varmap = VarMap::new();
        let flows = build_flows(&VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, settings.schedule.seed ^ 0xfa57);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let record = train(&varmap, &plan, progress, |_, step| {
            let chosen = batches.batch(step);
            mean_over_levels(&settings.levels, |level| {
                let flow = flows[level].as_ref().expect("a flow for every modelled level");
                let channels = LEVEL_CHANNELS[level];
                let side = level_side(context.image_size, level);
                let x = Tensor::from_vec(rows[level].gather(chosen)?, (chosen.len() * side * side, channels), &device)?;
                let x = standardise[level].apply(&x)?;
                let nll = flow.log_likelihood_per_dim(&x, (chosen.len(), side, side))?.mean_all()?.neg()?;
                Ok(nll)
            })
        })?;
        let calibration =
            calibrate(&rows, &settings.levels, context.image_size, &device, progress, |level, x, count| {
                level_nll(&flows, &standardise, context.image_size, level, x, count)
            })?;
        Ok(Self {
            backbone: context.backbone.clone(),
            settings,
            image_size: context.image_size,
            varmap,
            flows,
            standardise,
            calibration,
            record,
        })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: FastflowSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        check_settings(&settings)?;
        let device = backbone.device.clone();
        let standardise = take_standardise(&mut tensors, &device)?;
        let calibration = take_calibration(&mut tensors, &settings.levels, image_size)?;
        let varmap = load_varmap(tensors, &device, "FastFlow", |vb| build_flows(vb, &settings).map(|_| ()))?;
        let flows = build_flows(&VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        Ok(Self {
            backbone,
            settings,
            image_size,
            varmap,
            flows,
            standardise,
            calibration,
            record: TrainingRecord::default(),
        })
    }
}

impl Fastflow {
    fn level_nll(&self, level: usize, rows: &Tensor, batch: usize) -> Result<Vec<f32>> {
        level_nll(&self.flows, &self.standardise, self.image_size, level, rows, batch)
    }
}

/// Negative log-likelihood per dimension of a batch's rows at one level, `batch × positions` (before the
/// position calibration).
fn level_nll(
    flows: &[Option<MapFlow>],
    standardise: &[Standardise],
    image_size: u32,
    level: usize,
    rows: &Tensor,
    batch: usize,
) -> Result<Vec<f32>> {
    let side = level_side(image_size, level);
    let x = standardise[level].apply(rows)?;
    let Some(flow) = &flows[level] else { bail!("level {level} is not modelled") };
    Ok(flow.log_likelihood_per_dim(&x, (batch, side, side))?.neg()?.to_device(&Device::Cpu)?.to_vec1()?)
}

impl AnomalyModel for Fastflow {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let scoring = LevelScoring {
            backbone: &self.backbone,
            local_average: self.settings.local_average,
            levels: &self.settings.levels,
            image_size: self.image_size,
            calibration: &self.calibration,
            blur_sigma: self.settings.blur_sigma,
        };
        scoring.score(images, |level, rows, batch| self.level_nll(level, rows, batch))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(normalisation_state(&self.standardise, &self.calibration)?);
        Ok(state)
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let rows = record_level_rows(graph, &self.backbone, images, self.settings.local_average)?;
        let mut level_nll = Vec::new();
        for &level in &self.settings.levels {
            let Some(flow) = &self.flows[level] else { bail!("level {level} is not modelled") };
            let x = layers::standardise(graph, &rows[level], &self.standardise[level])?;
            let likelihood = flow.record_log_likelihood_per_dim(graph, &x, level_side(self.image_size, level))?;
            let nll = graph.op("Neg", &[&likelihood], vec![]).with_shape(likelihood.shape);
            level_nll.push((level, nll));
        }
        Ok(record_assemble(graph, &level_nll, self.image_size, &self.calibration, self.settings.blur_sigma))
    }
}
