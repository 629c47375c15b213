//! CFlow — Gudovskiy, Ishizaka & Kozuka 2022, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
//! Localization via Conditional Normalizing Flows" (WACV); reference code: anomalib's `models/image/cflow`.
//!
//! One conditional flow per backbone level (stride 8: 40 channels, stride 16: 112), each a chain of affine
//! coupling blocks whose sub-networks also see a sinusoidal code of the feature's position. The flows train by
//! maximum likelihood on feature vectors sampled from the normal images' maps — vectors, not maps, which is why
//! CFlow trains in minutes on a CPU. Anomaly map: the negative log-likelihood per dimension at each position,
//! upsampled and summed over the levels, Gaussian-blurred; image score: its maximum.
//! Unlike the reference, scores are not normalised by the batch's maximum likelihood, so an image scores the same
//! alone or in any batch.

use crate::methods::setting_docs::common;
use super::{
    both_levels, calibrate, check_levels, level_side, level_statistics, mean_over_levels, normalisation_state,
    positional_encoding, record_assemble, record_level_rows, take_calibration, take_standardise, training_rows,
    LevelScoring, VectorFlow, LEVEL_CHANNELS,
};
use crate::methods::statistics::Standardise;
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::PositionCalibration;
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, TrainingRecord};
use crate::methods::{AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::{layers, Graph, Value};
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Cflow,
    CflowSettings,
    name: "cflow",
    title: "CFlow",
    family: Family::NormalizingFlow,
    summary: "Conditional normalizing flows on feature vectors with a position code; negative log-likelihood.",
    guide: "Wins on aligned parts whose normal look depends on position. On 2 CPU cores, MTD (761 training images): fit 3 min 2 s, 36 images/s, image AUROC 0.930.",
    ranges: ["coupling_blocks": 1..=64, "condition_dim": 4..=1024, "clamp_alpha": 0.01..=20, "vectors_per_step": 2..=65536, "levels": 0..=1],
    docs: [
        "coupling_blocks" => common("Coupling blocks", "", "Affine coupling blocks of each flow: more is more expressive and slower.", false),
        "condition_dim" => common("Position code length", "", "Length of the positional code each vector is conditioned on (a multiple of 4).", true),
        "vectors_per_step" => common("Vectors per step", "", "Feature vectors per level per optimisation step.", true),
    ],
    smoke: ({"epochs": 3, "steps_per_epoch": 15, "vectors_per_step": 256, "coupling_blocks": 4} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => CflowSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CflowSettings {
    pub coupling_blocks: usize,
    /// Length of the position code (a multiple of 4).
    pub condition_dim: usize,
    /// α in exp(α·tanh(·)): bounds each block's scaling.
    pub clamp_alpha: f64,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// Feature vectors per level per optimisation step.
    pub vectors_per_step: usize,
    pub steps_per_epoch: usize,
    /// Model 3×3-averaged features (as PatchCore) instead of the raw maps.
    pub local_average: bool,
    /// Backbone levels modelled: 0 = stride 8 (40 channels), 1 = stride 16 (112 channels). On MTD the stride-16
    /// level alone scores better than both (see ARCHITECTURE.md) and trains in two thirds of the time.
    #[serde(default = "both_levels")]
    pub levels: Vec<usize>,
    pub blur_sigma: f32,
}

impl Default for CflowSettings {
    fn default() -> Self {
        Self {
            coupling_blocks: 8,
            condition_dim: 128,
            clamp_alpha: 1.9,
            schedule: Schedule::new(12, 1e-3),
            vectors_per_step: 1024,
            steps_per_epoch: 100,
            local_average: true,
            levels: vec![1],
            blur_sigma: 4.0,
        }
    }
}

impl CflowSettings {
    /// anomalib's CFlow schedule (50 epochs, fibre batches of 256, learning rate 1e-4) on the raw feature maps.
    pub fn published() -> Self {
        Self {
            schedule: Self::default().schedule.with(50, 1e-4),
            vectors_per_step: 256,
            steps_per_epoch: 400,
            local_average: false,
            ..Self::default()
        }
    }
}

pub struct Cflow {
    backbone: Arc<Backbone>,
    settings: CflowSettings,
    image_size: u32,
    varmap: VarMap,
    /// Per backbone level, its flow when the level is modelled.
    flows: Vec<Option<VectorFlow>>,
    /// Per level, `(H·W, condition_dim)` position codes on the model's device.
    conditions: Vec<Tensor>,
    /// Per level, the training features' per-channel statistics: the flows see standardised features (raw
    /// backbone projections reach tens, far from the unit Gaussian the flow starts as).
    standardise: Vec<Standardise>,
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

fn build_flows(vb: &VarBuilder, settings: &CflowSettings) -> Result<Vec<Option<VectorFlow>>> {
    LEVEL_CHANNELS
        .iter()
        .enumerate()
        .map(|(level, &channels)| {
            if !settings.levels.contains(&level) {
                return Ok(None);
            }
            VectorFlow::new(
                vb.pp(format!("level{level}")),
                channels,
                settings.condition_dim,
                settings.coupling_blocks,
                settings.clamp_alpha,
                settings.schedule.seed.wrapping_mul(31).wrapping_add(level as u64 * 1000),
            )
            .map(Some)
        })
        .collect()
}

fn position_codes(settings: &CflowSettings, image_size: u32, device: &Device) -> Result<Vec<Tensor>> {
    (0..LEVEL_CHANNELS.len())
        .map(|level| {
            let side = level_side(image_size, level);
            let code = positional_encoding(settings.condition_dim, side, side);
            Ok(Tensor::from_vec(code, (side * side, settings.condition_dim), device)?)
        })
        .collect()
}

fn check_settings(settings: &CflowSettings) -> Result<()> {
    if settings.condition_dim == 0 || !settings.condition_dim.is_multiple_of(4) {
        bail!("condition_dim must be a positive multiple of 4, got {}", settings.condition_dim);
    }
    check_levels(&settings.levels)
}

impl Cflow {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: CflowSettings) -> Result<Self> {
        check_settings(&settings)?;
        if images.is_empty() {
            bail!("CFlow needs training images");
        }
        let device = context.device.clone();
        let progress = context.progress;
        // The frozen backbone's features of every training image, once, as rows per level (CPU memory).
        let rows = training_rows(context, images, settings.local_average)?;
        let standardise = level_statistics(&rows, &device)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let flows = build_flows(&vb, &settings)?;
        let codes: Vec<Vec<f32>> = (0..LEVEL_CHANNELS.len())
            .map(|level| {
                let side = level_side(context.image_size, level);
                positional_encoding(settings.condition_dim, side, side)
            })
            .collect();
        let mut rng = SplitMix64::new(settings.schedule.seed ^ 0xcf10);
        let plan = settings.schedule.plan(settings.steps_per_epoch);
        let n = settings.vectors_per_step;
        let record = train(&varmap, &plan, progress, |_, _| {
            mean_over_levels(&settings.levels, |level| {
                let flow = flows[level].as_ref().expect("a flow for every modelled level");
                let channels = LEVEL_CHANNELS[level];
                let positions = level_side(context.image_size, level).pow(2);
                let count = rows[level].len() * positions;
                let mut x = vec![0f32; n * channels];
                let mut c = Vec::with_capacity(n * settings.condition_dim);
                for slot in x.chunks_exact_mut(channels) {
                    let row = rng.below(count);
                    let position = row % positions;
                    rows[level].read_part(row / positions, position * channels, slot)?;
                    c.extend_from_slice(&codes[level][position * settings.condition_dim..][..settings.condition_dim]);
                }
                let x = standardise[level].apply(&Tensor::from_vec(x, (n, channels), &device)?)?;
                let c = Tensor::from_vec(c, (n, settings.condition_dim), &device)?;
                let nll = flow.log_likelihood_per_dim(&x, Some(&c))?.mean_all()?.neg()?;
                Ok(nll)
            })
        })?;
        let conditions = position_codes(&settings, context.image_size, &device)?;
        let calibration =
            calibrate(&rows, &settings.levels, context.image_size, &device, progress, |level, x, count| {
                level_nll(&flows, &standardise, &conditions, level, x, count)
            })?;
        Ok(Self {
            backbone: context.backbone.clone(),
            settings,
            image_size: context.image_size,
            varmap,
            flows,
            conditions,
            standardise,
            calibration,
            record,
        })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: CflowSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        check_settings(&settings)?;
        let device = backbone.device.clone();
        let standardise = take_standardise(&mut tensors, &device)?;
        let calibration = take_calibration(&mut tensors, &settings.levels, image_size)?;
        let varmap = load_varmap(tensors, &device, "CFlow", |vb| build_flows(vb, &settings).map(|_| ()))?;
        let flows = build_flows(&VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let conditions = position_codes(&settings, image_size, &device)?;
        Ok(Self {
            backbone,
            settings,
            image_size,
            varmap,
            flows,
            conditions,
            standardise,
            calibration,
            record: TrainingRecord::default(),
        })
    }
}

impl Cflow {
    fn level_nll(&self, level: usize, rows: &Tensor, batch: usize) -> Result<Vec<f32>> {
        level_nll(&self.flows, &self.standardise, &self.conditions, level, rows, batch)
    }
}

/// Negative log-likelihood per dimension of a batch's rows at one level, `batch × positions` (before the
/// position calibration).
fn level_nll(
    flows: &[Option<VectorFlow>],
    standardise: &[Standardise],
    conditions: &[Tensor],
    level: usize,
    rows: &Tensor,
    batch: usize,
) -> Result<Vec<f32>> {
    let condition = conditions[level].repeat((batch, 1))?;
    let x = standardise[level].apply(rows)?;
    let Some(flow) = &flows[level] else { bail!("level {level} is not modelled") };
    Ok(flow.log_likelihood_per_dim(&x, Some(&condition))?.neg()?.to_device(&Device::Cpu)?.to_vec1()?)
}

impl AnomalyModel for Cflow {
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
            let code = self.conditions[level].to_device(&Device::Cpu)?;
            let (positions, dim) = code.dims2()?;
            let code = graph.floats("position_code", &[positions, dim], &code.flatten_all()?.to_vec1::<f32>()?);
            let likelihood = flow.record_log_likelihood_per_dim(graph, &x, Some(&code))?;
            let nll = graph.op("Neg", &[&likelihood], vec![]).with_shape(likelihood.shape);
            level_nll.push((level, nll));
        }
        Ok(record_assemble(graph, &level_nll, self.image_size, &self.calibration, self.settings.blur_sigma))
    }
}
