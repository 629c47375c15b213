//! DifferNet — Rudolph, Wandt & Rosenhahn 2021, "Same Same But DifferNet: Semi-Supervised Defect Detection
//! with Normalizing Flows" (WACV); reference code: the authors' `differnet`.
//!
//! An image-level flow: the image at three scales (the input size, a half and a quarter of it) goes through the
//! frozen backbone, each scale's last feature map averaged over the image; the three vectors, concatenated and
//! standardised, are mapped to a standard Gaussian by a chain of affine coupling blocks trained by maximum
//! likelihood. Training sees each good image in its four rotations by 90° (`rotations`; the paper: random
//! rotations and colour changes); the score of an image is its negative log-likelihood averaged over the same
//! rotations (the paper: over 64 transforms). It judges the whole image: the paper's gradient maps are not
//! computed, so the map is the score everywhere. The flow has 2 coupling blocks by default where the paper has
//! 8 (the `published` preset): with a few hundred training images, 8 blocks learn them by heart.
//!
//! Backbone: the paper uses AlexNet's last convolution at 448, 224 and 112 pixels (3 × 256 values); here Lite0's
//! stride-16 map at the input size and its half and quarter (3 × 112). The features of the training images'
//! rotations are computed once (the backbone is frozen); the flow then trains on them alone.

use super::VectorFlow;
use crate::backbone::efficientnet_lite0::STRIDE16_CHANNELS;
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::maps::ScoreMap;
use crate::methods::setting_docs::common;
use crate::methods::statistics::{channel_statistics, Standardise};
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord};
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Differnet,
    DifferNetSettings,
    name: "differnet",
    title: "DifferNet",
    family: Family::NormalizingFlow,
    summary: "A normalizing flow on multi-scale image-averaged features; negative log-likelihood over rotations.",
    guide: "Wins when a defect changes the whole part's statistics and only the verdict matters; does not localise. On 2 CPU cores, MTD (761 training images): fit 2 min 31 s, 18 images/s, image AUROC 0.971.",
    ranges: ["coupling_blocks": 1..=64, "clamp_alpha": 0.01..=20, "vectors_per_step": 2..=4096, "rotations": 1..=4],
    docs: [
        "coupling_blocks" => common("Coupling blocks", "", "Affine coupling blocks of the flow: more is more expressive and slower.", false),
        "vectors_per_step" => common("Vectors per step", "", "Image feature vectors (rotations included) per optimisation step.", true),
        "rotations" => common("Rotations", "", "Quarter turns each image is seen in, in training and scoring (1: as is; 4: the paper's spirit, for parts that come in any orientation).", false),
    ],
    smoke: ({"epochs": 20} at 96, floors [0.9, 0.0, 0.0]),
    localises: false,
    presets: ["published": "the paper's training length, for a GPU" => DifferNetSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DifferNetSettings {
    pub coupling_blocks: usize,
    /// α in exp(α·tanh(·)): bounds each block's scaling.
    pub clamp_alpha: f64,
    pub vectors_per_step: usize,
    /// Quarter turns (1 to 4) of each image that train and that are averaged in scoring.
    pub rotations: usize,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
}

impl Default for DifferNetSettings {
    fn default() -> Self {
        // 2 blocks, 480 epochs: chosen on label-free validation; the paper's 8 blocks overfit 685 training
        // images (ARCHITECTURE.md, "New methods").
        Self { coupling_blocks: 2, clamp_alpha: 3.0, vectors_per_step: 64, rotations: 4, schedule: Schedule::new(480, 2e-4) }
    }
}

impl DifferNetSettings {
    /// The paper's flow and length: 8 coupling blocks, 192 epochs (24 meta-epochs of 8) at learning rate 2e-4.
    pub fn published() -> Self {
        Self { coupling_blocks: 8, schedule: Schedule { epochs: 192, ..Self::default().schedule }, ..Self::default() }
    }
}

/// Input scales: the image, its half and its quarter.
const SCALES: usize = 3;
const DIM: usize = SCALES * STRIDE16_CHANNELS;

/// Each image's multi-scale vector `(B, DIM)` for images `(B, 3, S, S)`.
fn image_vectors(backbone: &Backbone, images: &Tensor) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(SCALES);
    let mut scaled = images.clone();
    for scale in 0..SCALES {
        if scale > 0 {
            scaled = scaled.avg_pool2d(2)?;
        }
        parts.push(backbone.features(&scaled)?.stride16.mean((2, 3))?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// `images` rotated by `quarter` × 90° (counter-clockwise).
fn rotated(images: &Tensor, quarter: usize) -> Result<Tensor> {
    Ok(match quarter % 4 {
        0 => images.clone(),
        1 => images.transpose(2, 3)?.contiguous()?.flip(&[2])?,
        2 => images.flip(&[2, 3])?,
        _ => images.transpose(2, 3)?.contiguous()?.flip(&[3])?,
    }
    .contiguous()?)
}

/// [`rotated`] as graph nodes.
fn record_rotated(graph: &mut Graph, images: &Value, quarter: usize) -> Value {
    let transposed = |graph: &mut Graph| layers::transpose(graph, images, &[0, 1, 3, 2]);
    match quarter % 4 {
        0 => images.clone(),
        1 => {
            let t = transposed(graph);
            layers::flip(graph, &t, 2)
        }
        2 => {
            let flipped = layers::flip(graph, images, 2);
            layers::flip(graph, &flipped, 3)
        }
        _ => {
            let t = transposed(graph);
            layers::flip(graph, &t, 3)
        }
    }
}

pub struct Differnet {
    backbone: Arc<Backbone>,
    settings: DifferNetSettings,
    image_size: u32,
    varmap: VarMap,
    flow: VectorFlow,
    standardise: Standardise,
    pub record: TrainingRecord,
}

impl Differnet {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: DifferNetSettings) -> Result<Self> {
        if images.len() < 2 {
            bail!("DifferNet needs at least two training images, got {}", images.len());
        }
        let device = context.device.clone();
        let progress = context.progress;
        progress.begin("features of the rotations", images.len() as u64);
        let rotations = settings.rotations.clamp(1, 4);
        let mut vectors = Vec::with_capacity(images.len() * rotations * DIM);
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let tensor = images_to_tensor(&batch, &device)?;
            for quarter in 0..rotations {
                let v = image_vectors(&context.backbone, &rotated(&tensor, quarter)?)?;
                vectors.extend(v.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
            }
            progress.advance(batch.len() as u64);
        }
        let standardise = channel_statistics(&vectors, DIM, &device)?;
        let count = vectors.len() / DIM;
        let all = standardise.apply(&Tensor::from_vec(vectors, (count, DIM), &device)?)?.contiguous()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let seed = settings.schedule.seed;
        let flow = VectorFlow::new(vb, DIM, 0, settings.coupling_blocks, settings.clamp_alpha, seed ^ 0xd1ff)?;
        let mut batches = ShuffledBatches::new(count, settings.vectors_per_step, seed ^ 0xd1f);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let record = train(&varmap, &plan, progress, |_, step| {
            let chosen: Vec<u32> = batches.batch(step).iter().map(|&i| i as u32).collect();
            let x = all.index_select(&Tensor::new(chosen.as_slice(), &device)?, 0)?;
            Ok(flow.log_likelihood_per_dim(&x, None)?.mean_all()?.neg()?)
        })?;
        let backbone = context.backbone.clone();
        Ok(Self { backbone, settings, image_size: context.image_size, varmap, flow, standardise, record })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: DifferNetSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let device = backbone.device.clone();
        let standardise = Standardise::take(&mut tensors, "standardise", DIM, &device)?;
        let (blocks, clamp, seed) = (settings.coupling_blocks, settings.clamp_alpha, settings.schedule.seed ^ 0xd1ff);
        let build = |vb: &VarBuilder| VectorFlow::new(vb.clone(), DIM, 0, blocks, clamp, seed).map(|_| ());
        let varmap = load_varmap(tensors, &device, "DifferNet", build)?;
        let flow = VectorFlow::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), DIM, 0, blocks, clamp, seed)?;
        let record = TrainingRecord::default();
        Ok(Self { backbone, settings, image_size, varmap, flow, standardise, record })
    }
}

impl AnomalyModel for Differnet {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let rotations = self.settings.rotations.clamp(1, 4);
        let mut total: Option<Tensor> = None;
        for quarter in 0..rotations {
            let x = self.standardise.apply(&image_vectors(&self.backbone, &rotated(images, quarter)?)?)?;
            let nll = self.flow.log_likelihood_per_dim(&x, None)?.neg()?;
            total = Some(match total {
                None => nll,
                Some(sum) => (sum + nll)?,
            });
        }
        let scores: Vec<f32> = match total {
            Some(sum) => (sum / rotations as f64)?.to_device(&Device::Cpu)?.to_vec1()?,
            None => Vec::new(),
        };
        let size = self.image_size as usize;
        Ok(scores
            .into_iter()
            .map(|score| AnomalyOutput { score, map: ScoreMap::new(size, size, vec![score; size * size]) })
            .collect())
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let rotations = self.settings.rotations.clamp(1, 4);
        // Every rotation of the batch in one batch, rotation-major, so each scale's backbone is recorded once.
        let turned: Vec<Value> = (0..rotations).map(|quarter| record_rotated(graph, images, quarter)).collect();
        let mut scaled = graph
            .op("Concat", &turned.iter().collect::<Vec<_>>(), vec![attr_int("axis", 0)])
            .with_shape([&[None], &images.shape[1..]].concat());
        let mut parts = Vec::with_capacity(SCALES);
        for scale in 0..SCALES {
            if scale > 0 {
                scaled = layers::pool(graph, &scaled, 2, false);
            }
            let (_, stride16) = layers::backbone_features(graph, &self.backbone, &scaled)?;
            let spatial = graph.ints("axes", &[2], &[2, 3]);
            parts.push(graph.op("ReduceMean", &[&stride16, &spatial], vec![attr_int("keepdims", 0)]));
        }
        let rows = graph.op("Concat", &parts.iter().collect::<Vec<_>>(), vec![attr_int("axis", 1)]);
        let as_positions = graph.ints("shape", &[3], &[-1, 1, DIM as i64]);
        let rows = graph.op("Reshape", &[&rows, &as_positions], vec![]).with_shape(vec![None, Some(1), Some(DIM)]);
        let x = layers::standardise(graph, &rows, &self.standardise)?;
        let likelihood = self.flow.record_log_likelihood_per_dim(graph, &x, None)?;
        // (rotations·N, 1) → (rotations, N), averaged over the rotations and negated.
        let by_rotation = graph.ints("shape", &[2], &[rotations as i64, -1]);
        let likelihood = graph.op("Reshape", &[&likelihood, &by_rotation], vec![]);
        let first = graph.ints("axis", &[1], &[0]);
        let mean = graph.op("ReduceMean", &[&likelihood, &first], vec![attr_int("keepdims", 0)]);
        let score = graph.op("Neg", &[&mean], vec![]).with_shape(vec![images.shape[0]]);
        Ok(RecordedScores { map: layers::constant_map(graph, &score, self.image_size as usize), score })
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(self.standardise.state("standardise")?);
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_quarter_turns_are_the_identity_and_one_turns_a_corner() {
        let images = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 4.0, &Device::Cpu).unwrap().reshape((2, 3, 4, 4)).unwrap();
        let mut turned = images.clone();
        for _ in 0..4 {
            turned = rotated(&turned, 1).unwrap();
        }
        let same = (turned - &images).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(same, 0.0);
        // Counter-clockwise: the top-right pixel goes to the top-left.
        let once = rotated(&images, 1).unwrap();
        let at = |t: &Tensor, y: usize, x: usize| t.get(0).unwrap().get(0).unwrap().get(y).unwrap().get(x).unwrap();
        let (moved, from) = (at(&once, 0, 0), at(&images, 0, 3));
        assert_eq!(moved.to_scalar::<f32>().unwrap(), from.to_scalar::<f32>().unwrap());
    }
}
