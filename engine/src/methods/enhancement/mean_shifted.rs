//! Mean-shifted contrastive learning — Reiss & Hoshen 2023, "Mean-Shifted Contrastive Loss for Anomaly
//! Detection" (AAAI; arXiv 2021); reference code: the authors' `MSAD` repository.
//!
//! The paper fine-tunes an ImageNet network so that normal images stay compact around their centre c: the
//! features are L2-normalised, c is their mean on the training set, fixed, and the contrastive (NT-Xent) loss
//! runs on the *mean-shifted* representations θ = (z − c) / ‖z − c‖ of two augmented views of each image.
//! Ordinary contrastive learning spreads normal data uniformly over the sphere (bad for one-class scoring);
//! shifting by c first spreads them around c instead, and the angle to c stays an anomaly score. Normalised
//! contrastive learning cannot collapse to a point, unlike Deep SVDD's compactness loss.
//!
//! Here it runs per patch, for a map: the frozen Lite0's locally aware stride-8 features of a patch go
//! through a residual adapter, z = normalise(x + MLP(x)), whose last layer starts at zero — so training
//! starts at the pretrained features, as the paper's fine-tuning does, while the backbone stays frozen (its
//! backward pass does not fit a CPU budget). The two views are brightness/contrast jitters of the image, the
//! second also mirrored (and its feature grid mirrored back, so patch positions pair up); each step draws
//! `positions_per_step` patch positions of the batch and contrasts their 2 × that many views (τ = 0.25).
//! Score: each patch's angular distance 1 − ⟨z, c_p⟩ to the normal centre c_p *of its position* (the mean
//! direction of the training images' embeddings there, after training), z-scored per position against
//! training images (see [`PositionCalibration`]), upsampled and blurred; image score: the map's maximum. One
//! centre per position rather than one for all patches: a part's border patches are normal but unlike its
//! middle (MTD, untrained adapter: image AUROC 0.756 with one centre, 0.814 per position).
//! Learning rate 1e-4 (the paper fine-tunes gently, 1e-5 with SGD): at 1e-3 the adapter drifted from the
//! pretrained features and scored worse (0.693 vs 0.756 with one centre).

use crate::methods::setting_docs::common;
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::{PositionCalibration, CALIBRATION_IMAGES};
use crate::methods::features::{patch_feature_rows, PATCH_CHANNELS, PATCH_STRIDE};
use crate::methods::training::{
    load_varmap, take_tensor, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord,
};
use crate::methods::{
    images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores,
};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, Linear, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    MeanShifted,
    MeanShiftedSettings,
    name: "mean-shifted",
    title: "Mean-shifted contrastive",
    family: Family::AlgorithmEnhancement,
    summary: "Contrastive adaptation around the normal centre; angular distance to it per patch.",
    guide: "Wins when pretrained features need a light adaptation to the parts. On 2 CPU cores, MTD (761 training images): fit 1 min 56 s, 65 images/s, image AUROC 0.820.",
    ranges: ["positions_per_step": 2..=65536, "hidden": 1..=4096, "temperature": 0.001..=100],
    docs: [
        "positions_per_step" => common("Positions per step", "", "Patch positions contrasted per step (each with its two views).", true),
        "hidden" => common("Adapter width", "channels", "Hidden width of the adapter trained on the features.", true),
        "temperature" => common("Temperature τ", "", "Temperature of the contrastive loss: lower separates views more sharply.", true),
    ],
    smoke: ({"epochs": 4, "steps_per_epoch": 10, "images_per_step": 4, "positions_per_step": 256, "learning_rate": 1e-3} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => MeanShiftedSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MeanShiftedSettings {
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub steps_per_epoch: usize,
    pub images_per_step: usize,
    /// Patch positions contrasted per step (each with its two views).
    pub positions_per_step: usize,
    /// Hidden width of the adapter.
    pub hidden: usize,
    /// Temperature τ of the contrastive loss.
    pub temperature: f64,
    pub blur_sigma: f32,
}

impl Default for MeanShiftedSettings {
    fn default() -> Self {
        Self {
            schedule: Schedule::new(8, 1e-4),
            steps_per_epoch: 25,
            images_per_step: 8,
            positions_per_step: 512,
            hidden: 256,
            temperature: 0.25,
            blur_sigma: 4.0,
        }
    }
}

impl MeanShiftedSettings {
    /// The paper's length for a GPU: 20 epochs of batch 64 over an MVTec-sized set.
    pub fn published() -> Self {
        Self {
            schedule: Schedule { epochs: 20, ..Self::default().schedule },
            steps_per_epoch: 4,
            images_per_step: 64,
            positions_per_step: 2048,
            ..Self::default()
        }
    }
}

/// z = normalise(x + MLP(x)) over patch feature rows `(N, PATCH_CHANNELS)`.
struct Adapter {
    hidden: Linear,
    out: Linear,
}

impl Adapter {
    fn new(vb: VarBuilder, hidden: usize) -> Result<Self> {
        let zero = Init::Const(0.0);
        let out = Linear::new(
            vb.pp("out").get_with_hints((PATCH_CHANNELS, hidden), "weight", zero)?,
            Some(vb.pp("out").get_with_hints(PATCH_CHANNELS, "bias", zero)?),
        );
        Ok(Self { hidden: candle_nn::linear(PATCH_CHANNELS, hidden, vb.pp("hidden"))?, out })
    }

    fn forward(&self, rows: &Tensor) -> Result<Tensor> {
        normalise(&(rows + self.out.forward(&self.hidden.forward(rows)?.relu()?)?)?)
    }
}

/// Rows scaled to unit length.
fn normalise(rows: &Tensor) -> Result<Tensor> {
    Ok(rows.broadcast_div(&(rows.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-8)?)?)
}

/// NT-Xent (SimCLR) over views `(2P, d)` where rows i and i + P are the two views of one patch.
fn contrastive_loss(views: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = views.dim(0)?;
    let half = n / 2;
    let device = views.device();
    let similarity = (views.matmul(&views.t()?)? / temperature)?;
    // A view is not its own negative.
    let self_mask = (Tensor::eye(n, DType::F32, device)? * 1e4)?;
    let log_probabilities = candle_nn::ops::log_softmax(&(similarity - self_mask)?, 1)?;
    let partners: Vec<u32> = (0..n).map(|i| ((i + half) % n) as u32).collect();
    let partners = Tensor::new(partners.as_slice(), device)?.unsqueeze(1)?;
    Ok(log_probabilities.gather(&partners, 1)?.mean_all()?.neg()?)
}

/// A brightness/contrast jitter of a channel-planar image, optionally mirrored left–right.
fn view(image: &[f32], size: usize, mirror: bool, rng: &mut SplitMix64) -> Vec<f32> {
    let (gain, offset) = (rng.range_f32(0.8, 1.2), rng.range_f32(-0.1, 0.1));
    let mut out = vec![0f32; image.len()];
    for (plane_in, plane_out) in image.chunks_exact(size * size).zip(out.chunks_exact_mut(size * size)) {
        for (row_in, row_out) in plane_in.chunks_exact(size).zip(plane_out.chunks_exact_mut(size)) {
            for (x, out) in row_out.iter_mut().enumerate() {
                let source = if mirror { row_in[size - 1 - x] } else { row_in[x] };
                *out = (source * gain + offset).clamp(0.0, 1.0);
            }
        }
    }
    out
}

pub struct MeanShifted {
    backbone: Arc<Backbone>,
    settings: MeanShiftedSettings,
    image_size: u32,
    varmap: VarMap,
    adapter: Adapter,
    /// Per patch position, the normal centre: `(positions, PATCH_CHANNELS)`, unit rows.
    centre: Tensor,
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

/// The settings' ranges were checked with INFO's; what remains depends on the image size.
fn check_image_size(image_size: u32) -> Result<usize> {
    if !(image_size as usize).is_multiple_of(PATCH_STRIDE) {
        bail!("mean-shifted needs an image size that is a multiple of {PATCH_STRIDE}; got {image_size}");
    }
    Ok(image_size as usize / PATCH_STRIDE)
}

/// The unit mean direction `(1, d)` of unit rows `(N, d)`.
fn centre_of(embeddings: &Tensor) -> Result<Tensor> {
    normalise(&embeddings.mean_keepdim(0)?)
}

impl MeanShifted {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: MeanShiftedSettings) -> Result<Self> {
        let grid = check_image_size(context.image_size)?;
        if images.len() < 2 {
            bail!("mean-shifted needs at least two training images, got {}", images.len());
        }
        let device = context.device.clone();
        let progress = context.progress;
        let size = context.image_size as usize;
        let varmap = VarMap::new();
        let adapter = Adapter::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), settings.hidden)?;

        // The centre, fixed while training: the pretrained (adapter = identity) features' mean direction.
        progress.begin("normal centre", 1);
        let sample = images.select(0..images.len().min(32))?;
        let training_centre = centre_of(
            &adapter.forward(&patch_feature_rows(&context.backbone, &images_to_tensor(&sample, &device)?)?)?,
        )?;
        progress.advance(1);

        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, settings.schedule.seed ^ 0x5e);
        let mut rng = SplitMix64::new(settings.schedule.seed ^ 0x3ea7);
        let plan = settings.schedule.plan(settings.steps_per_epoch);
        let mirrored_columns: Vec<u32> = (0..grid as u32).rev().collect();
        let mirrored_columns = Tensor::new(mirrored_columns.as_slice(), &device)?;
        let record = train(&varmap, &plan, progress, |epoch, step| {
            let chosen = batches.cycling(epoch, settings.steps_per_epoch, step).to_vec();
            let batch = chosen.len();
            let (mut first, mut second) = (Vec::new(), Vec::new());
            for &i in &chosen {
                let image = images.get(i)?.to_chw_f32();
                first.extend(view(&image, size, false, &mut rng));
                second.extend(view(&image, size, true, &mut rng));
            }
            let rows_of = |data: Vec<f32>| -> Result<Tensor> {
                patch_feature_rows(&context.backbone, &Tensor::from_vec(data, (batch, 3, size, size), &device)?)
            };
            let first = rows_of(first)?;
            // Mirror the second view's grid back so that row r of both views is the same patch.
            let second = rows_of(second)?
                .reshape((batch, grid, grid, PATCH_CHANNELS))?
                .index_select(&mirrored_columns, 2)?
                .reshape((batch * grid * grid, PATCH_CHANNELS))?;
            let positions: Vec<u32> =
                (0..settings.positions_per_step).map(|_| rng.below(batch * grid * grid) as u32).collect();
            let positions = Tensor::new(positions.as_slice(), &device)?;
            let z = adapter.forward(&Tensor::cat(
                &[first.index_select(&positions, 0)?, second.index_select(&positions, 0)?],
                0,
            )?)?;
            let shifted = normalise(&z.broadcast_sub(&training_centre)?)?;
            contrastive_loss(&shifted, settings.temperature)
        })?;

        let count = images.len().min(CALIBRATION_IMAGES);
        progress.begin("centre and calibration", 2 * count as u64);
        let mut embeddings = Vec::new();
        for chunk in images.batches(0..count, context.batch_size) {
            check_cancelled(progress)?;
            let chunk = chunk?;
            let rows = patch_feature_rows(&context.backbone, &images_to_tensor(&chunk, &device)?)?;
            embeddings.push(adapter.forward(&rows)?);
            progress.advance(chunk.len() as u64);
        }
        let all = Tensor::cat(&embeddings, 0)?.reshape((count, grid * grid, PATCH_CHANNELS))?;
        let centre = normalise(&all.mean(0)?)?;
        let mut maps = Vec::new();
        for z in &embeddings {
            maps.extend(angular_distance(z, &centre)?);
            progress.advance((z.dim(0)? / (grid * grid)) as u64);
        }
        let calibration = PositionCalibration::from_maps(&[maps], &[grid * grid]);
        Ok(Self {
            backbone: context.backbone.clone(),
            settings,
            image_size: context.image_size,
            varmap,
            adapter,
            centre,
            calibration,
            record,
        })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: MeanShiftedSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let grid = check_image_size(image_size)?;
        let device = backbone.device.clone();
        let calibration = PositionCalibration::take(&mut tensors, &[grid * grid])?;
        let centre = take_tensor(&mut tensors, "centre", &[grid * grid, PATCH_CHANNELS], &device)?;
        let varmap =
            load_varmap(tensors, &device, "mean-shifted", |vb| Adapter::new(vb.clone(), settings.hidden).map(|_| ()))?;
        let adapter = Adapter::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), settings.hidden)?;
        Ok(Self {
            backbone,
            settings,
            image_size,
            varmap,
            adapter,
            centre,
            calibration,
            record: TrainingRecord::default(),
        })
    }

    /// Unit patch embeddings z `(B·g·g, PATCH_CHANNELS)` of images `(B, 3, S, S)`.
    pub fn embeddings(&self, images: &Tensor) -> Result<Tensor> {
        self.adapter.forward(&patch_feature_rows(&self.backbone, images)?)
    }
}

/// 1 − ⟨z, c_p⟩ for unit rows `z` `(B·P, d)` of whole images and per-position centres `(P, d)`, on the CPU.
fn angular_distance(z: &Tensor, centres: &Tensor) -> Result<Vec<f32>> {
    let (positions, d) = centres.dims2()?;
    let z = z.reshape(((), positions, d))?;
    let cosine = z.broadcast_mul(centres)?.sum(2)?;
    Ok(cosine.affine(-1.0, 1.0)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

impl AnomalyModel for MeanShifted {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let batch = images.dim(0)?;
        let mut distances = angular_distance(&self.embeddings(images)?, &self.centre)?;
        let size = self.image_size as usize;
        let grid = size / PATCH_STRIDE;
        distances.truncate(batch * grid * grid);
        Ok(self.calibration.outputs(&distances, grid, size, self.settings.blur_sigma))
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, true);
        let grid = self.image_size as usize / PATCH_STRIDE;
        if (features.dim(2), features.dim(3)) != (grid, grid) {
            bail!("mean-shifted: a {grid}×{grid} grid was expected from the image size");
        }
        let rows = layers::positions_as_rows(graph, &features);
        // The adapter: rows + out(relu(hidden(rows))), scaled to unit length.
        let hidden = layers::linear(graph, &rows, &self.adapter.hidden)?;
        let hidden = graph.op("Relu", &[&hidden], vec![]);
        let shift = layers::linear(graph, &hidden.with_shape(rows.shape.clone()), &self.adapter.out)?;
        let shifted = graph.op("Add", &[&rows, &shift], vec![]);
        let last = graph.ints("axis", &[1], &[-1]);
        let squared = graph.op("ReduceSumSquare", &[&shifted, &last], vec![attr_int("keepdims", 1)]);
        let length = graph.op("Sqrt", &[&squared], vec![]);
        let epsilon = graph.scalar("epsilon", 1e-8);
        let length = graph.op("Add", &[&length, &epsilon], vec![]);
        let unit = graph.op("Div", &[&shifted, &length], vec![]);
        // 1 − ⟨z, c_p⟩, calibrated per position.
        let centre = self.centre.to_device(&Device::Cpu)?;
        let (positions, d) = centre.dims2()?;
        let centre = graph.floats("centre", &[positions, d], &centre.flatten_all()?.to_vec1::<f32>()?);
        let products = graph.op("Mul", &[&unit, &centre], vec![]);
        let cosine = graph.op("ReduceSum", &[&products, &last], vec![attr_int("keepdims", 0)]);
        let distance = layers::affine(graph, &cosine, -1.0, 1.0).with_shape(vec![images.shape[0], Some(positions)]);
        let cells = layers::calibrate(graph, &distance, &self.calibration, 0);
        Ok(layers::map_and_score(graph, &cells, grid, self.image_size as usize, self.settings.blur_sigma))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.push(("centre".into(), self.centre.to_device(&Device::Cpu)?));
        state.extend(self.calibration.state()?);
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contrastive_loss_matches_its_formula() {
        // Two patches, two views each: rows 0/2 and 1/3 are partners.
        let views = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8]], &Device::Cpu).unwrap();
        let loss = contrastive_loss(&views, 0.5).unwrap().to_scalar::<f32>().unwrap();
        let rows = views.to_vec2::<f32>().unwrap();
        let dot = |a: usize, b: usize| (rows[a][0] * rows[b][0] + rows[a][1] * rows[b][1]) / 0.5;
        let mut expected = 0.0;
        for i in 0..4 {
            let partner = (i + 2) % 4;
            let denominator: f32 = (0..4).filter(|&j| j != i).map(|j| dot(i, j).exp()).sum();
            expected -= (dot(i, partner).exp() / denominator).ln() / 4.0;
        }
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn a_mirrored_view_reverses_each_row() {
        let image: Vec<f32> = (0..3 * 4 * 4).map(|i| i as f32 / 48.0).collect();
        let mut rng = SplitMix64::new(3);
        let plain = view(&image, 4, false, &mut SplitMix64::new(3));
        let mirrored = view(&image, 4, true, &mut rng);
        for (a, b) in plain.chunks_exact(4).zip(mirrored.chunks_exact(4)) {
            assert_eq!(a.iter().rev().copied().collect::<Vec<_>>(), b);
        }
    }
}
