//! Reverse distillation — Deng & Li 2022, "Anomaly Detection via Reverse Distillation from One-Class
//! Embedding" (CVPR); reference code: the authors' `RD4AD` and anomalib's `reverse_distillation`.
//!
//! The frozen teacher's stride-8 and stride-16 maps are fused and squeezed by a trainable one-class bottleneck
//! (OCBE: the finer map convolved down to the coarser's stride, concatenated with it, then a stride-2
//! convolution to a compact embedding at stride 32). A student decoder climbs back up — nearest ×2 upsampling
//! and 3×3 convolutions — and must reproduce the teacher's maps at both strides from that embedding alone.
//! Loss: 1 − cosine similarity per position (½|t̂ − ŝ|² of the unit vectors, as STFPM here), averaged over
//! positions and levels; AdamW with the paper's β₁ = 0.5. The student only ever learned to rebuild normal
//! features through the normal-only embedding, so where a defect changes the teacher's features the two
//! disagree. Map: per level that
//! discrepancy, the coarser ones upsampled to the finest level's grid, summed (the paper sums), z-scored per
//! position against the training images (`calibrate`, not in the paper), resized and blurred; score: the mean of
//! its top 0.3 % (`image_score_top`, not in the paper; 0 is the paper's maximum).
//!
//! Where it differs from the paper: the teacher there is a Wide-ResNet-50 (three levels of 256–1024 channels
//! at strides 4–16), the bottleneck a ResNet stage to 2048 channels and the decoder the mirrored ResNet,
//! trained 200 epochs on a GPU; here Lite0's stride-8 and stride-16 levels (40 and 112 channels; the stride-4
//! map, 24 channels, with `stride4_level`), a bottleneck of `embedding` channels and a plain convolutional
//! decoder of `width` channels, trained for a CPU.

use super::stfpm::{discrepancy, teacher_features, teacher_levels};
use crate::backbone::efficientnet_lite0::{STRIDE16_BLOCK, STRIDE16_CHANNELS, STRIDE8_BLOCK, STRIDE8_CHANNELS};
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::PositionCalibration;
use crate::methods::layers::{upsample2x, Conv};
use crate::methods::setting_docs::common;
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord};
use crate::methods::{AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::{layers, Graph, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    ReverseDistillation,
    ReverseDistillationSettings,
    name: "reverse-distillation",
    title: "Reverse distillation",
    family: Family::Reconstruction,
    summary: "A student decoder rebuilds the teacher's features from a one-class bottleneck; discrepancy map.",
    guide: "Wins where defects are local changes of texture or structure: the student cannot rebuild what the normal-only bottleneck never carried. On 2 CPU cores, MTD (761 training images): fit 8 min 20 s, 81 images/s, image AUROC 0.865 (below what the paper's three-level Wide-ResNet teacher reaches).",
    ranges: ["embedding": 8..=2048, "width": 8..=1024, "images_per_step": 1..=256],
    docs: [
        "embedding" => common("Bottleneck channels", "", "Channels of the one-class embedding at stride 32: narrower forgets more of what is not normal.", false),
        "width" => common("Decoder width", "channels", "Channels of the student decoder at stride 16 (half of it at stride 8).", true),
        "stride4_level" => common("Stride-4 level", "", "Also distil the backbone's stride-4 map: finer defects, about half again the training time.", true),
        "calibrate" => common("Per-position calibration", "", "Z-score the map per position against the training images' (not in the paper).", true),
    ],
    smoke: ({"epochs": 8, "images_per_step": 4, "embedding": 64, "width": 32} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => ReverseDistillationSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ReverseDistillationSettings {
    pub embedding: usize,
    pub width: usize,
    pub images_per_step: usize,
    /// Also distil Lite0's stride-4 map (24 channels), as the paper distils its teacher's first stage.
    pub stride4_level: bool,
    pub calibrate: bool,
    pub blur_sigma: f32,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    /// The image score: the mean of the map's top fraction; 0 is its maximum, as files saved before this
    /// setting existed score (hence the field's own default).
    #[serde(default)]
    pub image_score_top: f64,
    #[serde(flatten)]
    pub schedule: Schedule,
}

impl Default for ReverseDistillationSettings {
    fn default() -> Self {
        Self {
            embedding: 256,
            width: 128,
            images_per_step: 8,
            stride4_level: false,
            calibrate: true,
            blur_sigma: 4.0,
            // Chosen on validation over two paired runs (ARCHITECTURE.md, "New methods").
            image_score_top: 0.003,
            // Validation AUROC 0.710 after 2 epochs, 0.687 after 20, 0.717 and 0.747 after 60; the paper's
            // β₁ = 0.5 (ARCHITECTURE.md).
            schedule: Schedule { adam_beta1: 0.5, ..Schedule::new(60, 1e-3) },
        }
    }
}

impl ReverseDistillationSettings {
    /// The paper's schedule: 200 epochs of 16 images at learning rate 5e-3, β₁ = 0.5.
    pub fn published() -> Self {
        Self { images_per_step: 16, schedule: Self::default().schedule.with(200, 5e-3), ..Self::default() }
    }
}

/// The teacher's levels: the backbone block, its stride and its channels, finest first.
const LEVELS: [(usize, usize, usize); 3] =
    [(STRIDE4_BLOCK, 4, 24), (STRIDE8_BLOCK, 8, STRIDE8_CHANNELS), (STRIDE16_BLOCK, 16, STRIDE16_CHANNELS)];
/// Lite0's block whose output is the stride-4 map (24 channels).
const STRIDE4_BLOCK: usize = 2;

/// The levels a model uses (indices into [`LEVELS`], finest first).
fn levels(settings: &ReverseDistillationSettings) -> &'static [usize] {
    if settings.stride4_level { &[0, 1, 2] } else { &[1, 2] }
}

fn teacher_blocks(settings: &ReverseDistillationSettings) -> Vec<usize> {
    levels(settings).iter().map(|&level| LEVELS[level].0).collect()
}

/// The one-class bottleneck (every finer level convolved down to stride 16 by stride-2 convolutions,
/// concatenated with the stride-16 map, then a stride-2 convolution to the embedding at stride 32) and the
/// student decoder (per level, coarsest first: nearest ×2 upsampling, two 3×3 convolutions and a 1×1 head to
/// the teacher's channels; `width` channels at stride 16, half of it at each finer level).
struct Networks {
    /// Per finer level (finest first): the convolutions to stride 16.
    down: Vec<Vec<Conv>>,
    fuse: Conv,
    /// Per level, coarsest first: the convolutions and the head.
    decoder: Vec<(Vec<Conv>, Conv)>,
}

impl Networks {
    fn new(vb: VarBuilder, settings: &ReverseDistillationSettings) -> Result<Self> {
        let levels = levels(settings);
        let conv = |name: String, inputs: usize, outputs: usize, kernel: usize, stride: usize| {
            Conv::new(vb.pp(name), inputs, outputs, kernel, stride)
        };
        let mut down = Vec::new();
        for &level in &levels[..levels.len() - 1] {
            let mut convs = Vec::new();
            let mut channels = LEVELS[level].2;
            for step in level..LEVELS.len() - 1 {
                let next = LEVELS[step + 1].2;
                convs.push(conv(format!("ocbe.down{level}.{step}"), channels, next, 3, 2)?);
                channels = next;
            }
            down.push(convs);
        }
        let fuse = conv("ocbe.fuse".into(), levels.len() * STRIDE16_CHANNELS, settings.embedding, 3, 2)?;
        let mut decoder = Vec::new();
        let (mut inputs, mut width) = (settings.embedding, settings.width);
        for &level in levels.iter().rev() {
            let convs = vec![conv(format!("decoder.up{level}"), inputs, width, 3, 1)?, conv(format!("decoder.conv{level}"), width, width, 3, 1)?];
            decoder.push((convs, conv(format!("decoder.head{level}"), width, LEVELS[level].2, 1, 1)?));
            inputs = width;
            width = (width / 2).max(1);
        }
        Ok(Self { down, fuse, decoder })
    }

    /// The student's maps rebuilt from the teacher's (both finest first, channels-last).
    fn forward(&self, teacher: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut fused = Vec::with_capacity(teacher.len());
        for (map, convs) in teacher.iter().zip(&self.down) {
            let mut h = map.clone();
            for conv in convs {
                h = conv.forward_leaky(&h)?;
            }
            fused.push(h);
        }
        fused.push(teacher[teacher.len() - 1].clone());
        let mut h = self.fuse.forward_leaky(&Tensor::cat(&fused, 3)?)?;
        let mut student = Vec::with_capacity(teacher.len());
        for (convs, head) in &self.decoder {
            h = upsample2x(&h)?;
            for conv in convs {
                h = conv.forward_leaky(&h)?;
            }
            student.push(head.forward(&h)?);
        }
        student.reverse();
        Ok(student)
    }

    /// Per level (finest first) the student's discrepancy to the teacher `(B, H, W)`.
    fn discrepancies(&self, teacher: &[Tensor]) -> Result<Vec<Tensor>> {
        let student = self.forward(teacher)?;
        teacher.iter().zip(&student).map(|(t, s)| discrepancy(t, s)).collect()
    }
}

/// The bottleneck halves the stride-16 map once more and the decoder doubles it back to each level: every
/// level's side must be the stride-32 side times a power of two.
fn check_image_size(image_size: u32) -> Result<()> {
    if !image_size.is_multiple_of(32) {
        bail!("reverse distillation needs an image size that is a multiple of 32, got {image_size}");
    }
    Ok(())
}

/// The side of the finest level's grid, where the maps are summed.
fn grid_side(image_size: u32, settings: &ReverseDistillationSettings) -> usize {
    image_size as usize / LEVELS[levels(settings)[0]].1
}

/// The discrepancy maps summed on the finest level's grid, images after images (before any calibration).
fn raw_maps(backbone: &Backbone, networks: &Networks, blocks: &[usize], images: &Tensor) -> Result<Vec<f32>> {
    let maps = networks.discrepancies(&teacher_levels(backbone, images, blocks)?)?;
    let (_, h, w) = maps[0].dims3()?;
    let mut sum = maps[0].clone();
    for coarse in &maps[1..] {
        sum = (sum + coarse.unsqueeze(1)?.upsample_nearest2d(h, w)?.squeeze(1)?)?;
    }
    Ok(sum.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

pub struct ReverseDistillation {
    backbone: Arc<Backbone>,
    settings: ReverseDistillationSettings,
    image_size: u32,
    varmap: VarMap,
    networks: Networks,
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

impl ReverseDistillation {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: ReverseDistillationSettings) -> Result<Self> {
        check_image_size(context.image_size)?;
        if images.is_empty() {
            bail!("reverse distillation needs training images");
        }
        let device = context.device.clone();
        let progress = context.progress;
        let blocks = teacher_blocks(&settings);
        let teacher = teacher_features(context, images, "reverse distillation teacher maps", &blocks)?;
        let varmap = VarMap::new();
        let networks = Networks::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, settings.schedule.seed ^ 0x4d);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let record = train(&varmap, &plan, progress, |_, step| {
            let chosen = batches.batch(step);
            let targets = teacher.iter().map(|level| level.gather(chosen, &device)).collect::<Result<Vec<_>>>()?;
            let mut total = Tensor::zeros((), DType::F32, &device)?;
            for level in networks.discrepancies(&targets)? {
                total = (total + level.mean_all()?)?;
            }
            Ok((total / targets.len() as f64)?)
        })?;
        let calibration = if settings.calibrate {
            let positions = grid_side(context.image_size, &settings).pow(2);
            PositionCalibration::from_training_images(context, images, positions, |batch| {
                raw_maps(&context.backbone, &networks, &blocks, batch)
            })?
        } else {
            PositionCalibration::none()
        };
        let backbone = context.backbone.clone();
        let image_size = context.image_size;
        Ok(Self { backbone, settings, image_size, varmap, networks, calibration, record })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: ReverseDistillationSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        check_image_size(image_size)?;
        let device = backbone.device.clone();
        let calibration = match settings.calibrate {
            true => PositionCalibration::take(&mut tensors, &[grid_side(image_size, &settings).pow(2)])?,
            false => PositionCalibration::none(),
        };
        let build = |vb: &VarBuilder| Networks::new(vb.clone(), &settings).map(|_| ());
        let varmap = load_varmap(tensors, &device, "reverse distillation", build)?;
        let networks = Networks::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let record = TrainingRecord::default();
        Ok(Self { backbone, settings, image_size, varmap, networks, calibration, record })
    }
}

impl AnomalyModel for ReverseDistillation {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let maps = raw_maps(&self.backbone, &self.networks, &teacher_blocks(&self.settings), images)?;
        let (side, size) = (grid_side(self.image_size, &self.settings), self.image_size as usize);
        let (blur, top) = (self.settings.blur_sigma, self.settings.image_score_top);
        Ok(self.calibration.outputs_scored(&maps, side, size, blur, top))
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        if self.settings.stride4_level {
            bail!("reverse distillation with `stride4_level` does not export to ONNX yet: the export's backbone gives the stride-8 and stride-16 maps only");
        }
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let teacher = [layers::channels_last(graph, &fine), layers::channels_last(graph, &coarse)];
        // The student, as `Networks::forward`.
        let mut fused = Vec::with_capacity(teacher.len());
        for (map, convs) in teacher.iter().zip(&self.networks.down) {
            let mut h = map.clone();
            for conv in convs {
                h = layers::conv_leaky(graph, &h, conv)?;
            }
            fused.push(h);
        }
        fused.push(teacher[teacher.len() - 1].clone());
        let fused = layers::concat(graph, &fused.iter().collect::<Vec<_>>(), 3);
        let mut h = layers::conv_leaky(graph, &fused, &self.networks.fuse)?;
        let mut student = Vec::with_capacity(teacher.len());
        for (convs, head) in &self.networks.decoder {
            h = layers::upsample2x_channels_last(graph, &h);
            for conv in convs {
                h = layers::conv_leaky(graph, &h, conv)?;
            }
            student.push(layers::conv_channels_last(graph, &h, head)?);
        }
        student.reverse();
        // The levels' discrepancies summed on the finest grid, as `raw_maps`.
        let side = grid_side(self.image_size, &self.settings);
        let mut sum = layers::discrepancy(graph, &teacher[0], &student[0]);
        for (t, s) in teacher.iter().zip(&student).skip(1) {
            let level = layers::discrepancy(graph, t, s);
            let level = layers::upsample_nearest(graph, &level, side, side);
            sum = graph.op("Add", &[&sum, &level], vec![]).with_shape(sum.shape.clone());
        }
        let flat = graph.ints("shape", &[2], &[0, (side * side) as i64]);
        let cells = graph.op("Reshape", &[&sum, &flat], vec![]).with_shape(vec![images.shape[0], Some(side * side)]);
        let cells = match self.settings.calibrate {
            true => layers::calibrate(graph, &cells, &self.calibration, 0),
            false => cells,
        };
        let size = self.image_size as usize;
        let (blur, top) = (self.settings.blur_sigma, self.settings.image_score_top);
        Ok(layers::map_and_top_score(graph, &cells, side, size, blur, top))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(self.calibration.state()?);
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files saved before the top-share score and β₁ 0.5 keep scoring by the maximum (their threshold was chosen
    /// on it) and read as trained with β₁ 0.9; the default now is both.
    #[test]
    fn settings_saved_before_the_score_and_beta_keep_their_meaning() {
        let mut saved = serde_json::to_value(ReverseDistillationSettings::default()).unwrap();
        saved.as_object_mut().unwrap().retain(|key, _| key != "image_score_top" && key != "adam_beta1");
        let old: ReverseDistillationSettings = serde_json::from_value(saved).unwrap();
        assert_eq!((old.image_score_top, old.schedule.adam_beta1), (0.0, 0.9));
        let now = ReverseDistillationSettings::default();
        assert_eq!((now.image_score_top, now.schedule.adam_beta1), (0.003, 0.5));
        assert_eq!(ReverseDistillationSettings::published().schedule.adam_beta1, 0.5);
    }

    #[test]
    fn the_student_rebuilds_every_teacher_level_at_its_size() {
        for stride4_level in [false, true] {
            let settings = ReverseDistillationSettings { embedding: 16, width: 8, stride4_level, ..Default::default() };
            let varmap = VarMap::new();
            let networks =
                Networks::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &settings).unwrap();
            let teacher: Vec<Tensor> = levels(&settings)
                .iter()
                .map(|&l| Tensor::randn(0f32, 1.0, (2, 96 / LEVELS[l].1, 96 / LEVELS[l].1, LEVELS[l].2), &Device::Cpu).unwrap())
                .collect();
            let student = networks.forward(&teacher).unwrap();
            assert_eq!(student.len(), teacher.len());
            for (s, t) in student.iter().zip(&teacher) {
                assert_eq!(s.dims(), t.dims());
            }
            // The discrepancy is 1 − cosine: within [0, 2].
            for d in networks.discrepancies(&teacher).unwrap() {
                let values = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(values.iter().all(|v| (-1e-5..=2.0 + 1e-5).contains(v)), "{values:?}");
            }
        }
        assert!(check_image_size(96).is_ok() && check_image_size(80).is_err());
    }
}
