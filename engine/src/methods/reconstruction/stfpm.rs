//! STFPM — Wang et al. 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection" (BMVC);
//! reference code: anomalib's `models/image/stfpm`.
//!
//! The teacher is the frozen ImageNet Lite0; a student from random initialisation learns, on normal images
//! only, to reproduce the teacher's stride-8 (40 channels) and stride-16 (112 channels) maps after both are
//! L2-normalised along the channels; loss: ½·|t̂ − ŝ|² summed over channels, averaged over positions and levels.
//! Where the student was never taught — anomalies — the two disagree. Anomaly map: per level ½·|t̂ − ŝ|²
//! (= 1 − cosine similarity) upsampled to the stride-8 grid, multiplied over the levels (as anomalib), z-scored
//! per position against training images (see [`PositionCalibration`]), resized to the input and blurred;
//! image score: the mean of its top 3 % (`image_score_top`; the maximum with 0, as anomalib).
//!
//! The student is not a second Lite0, as in the paper (student = teacher architecture): a Lite0 student would
//! run its 96-channel expansion at 128² and 5×5 depthwise convolutions through candle's autograd, several
//! seconds a step on a CPU — a handful of epochs in 10 minutes. It is a compact plain convolutional network
//! instead (3×3 convolutions, stride 2 to the two teacher strides, 1×1 heads to the teacher's channels), the
//! choice EfficientAD (Batzner et al. 2024) made for its student-teacher "patch description network".
//! The teacher's stride-16 map sees about 340 px of the input; a student with one 3×3 convolution at 1/16 sees
//! 87, and cannot predict what depends on the rest. Four convolutions there (`coarse_depth`; 16² positions, so
//! ~20 % more multiply-adds per step) see 183 px, and validate higher (ARCHITECTURE.md, "Spending the 10-minute budget").

use crate::methods::setting_docs::common;
use crate::backbone::efficientnet_lite0::{
    EfficientNetLite0, STRIDE16_BLOCK, STRIDE16_CHANNELS, STRIDE8_BLOCK, STRIDE8_CHANNELS,
};
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::PositionCalibration;
use crate::methods::layers::{channels_last, Conv};
use crate::methods::per_image::PerImageTensors;
use crate::methods::training::{
    load_varmap, train, varmap_state, BenchStep, Schedule, ShuffledBatches, TrainingRecord,
};
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Stfpm,
    StfpmSettings,
    name: "stfpm",
    title: "STFPM",
    family: Family::Reconstruction,
    summary: "A student network learns the pretrained teacher's feature pyramid on good images; discrepancy map.",
    guide: "Wins on structured parts once trained long (the paper: 100 epochs; GPU). On 2 CPU cores, MTD (761 training images): fit 7 min 18 s for 24 epochs, 55 images/s, image AUROC 0.843.",
    ranges: ["width": 1..=512, "coarse_depth": 1..=16],
    docs: [
        "width" => common("Student width", "channels", "Channels of the student's first stage; later stages double it (at most 4×).", false),
        "coarse_depth" => common("Student depth at 1/16", "layers", "3×3 convolutions of the student at the coarse level: each widens what it sees by 32 px, towards the teacher's view of the whole image.", true),
    ],
    smoke: ({"epochs": 15, "batch_size": 4, "width": 16} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => StfpmSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StfpmSettings {
    /// Channels of the student's first stage; later stages double it (at most 4×).
    pub width: usize,
    /// 3×3 convolutions after the student's step down to 1/16 (files saved before the setting existed: 1).
    #[serde(default = "coarse_depth_before_setting")]
    pub coarse_depth: usize,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub batch_size: usize,
    pub blur_sigma: f32,
    /// The image score: the mean of the map's top fraction; 0 is its maximum, as files saved before this
    /// setting existed score (hence the field's own default).
    #[serde(default)]
    pub image_score_top: f64,
}

impl Default for StfpmSettings {
    fn default() -> Self {
        // Chosen on validation (ARCHITECTURE.md, "STFPM's image score" and "Spending the 10-minute budget").
        Self {
            width: 32,
            coarse_depth: 4,
            schedule: Schedule::new(24, 2e-3),
            batch_size: 8,
            blur_sigma: 4.0,
            image_score_top: 0.03,
        }
    }
}

const fn coarse_depth_before_setting() -> usize {
    1
}

impl StfpmSettings {
    /// The paper's length for a GPU: 100 epochs of batch 32 (SGD at 0.4 there; AdamW here).
    pub fn published() -> Self {
        Self { schedule: Self::default().schedule.with(100, 1e-3), batch_size: 32, ..Self::default() }
    }
}

/// The student: stride 2 to 1/8 (→ 40 channels), then 1/16 and `coarse_depth` convolutions (→ 112 channels).
/// Channels-last.
struct Student {
    to_stride8: Vec<Conv>,
    head8: Conv,
    to_stride16: Vec<Conv>,
    head16: Conv,
}

impl Student {
    fn new(vb: VarBuilder, settings: &StfpmSettings) -> Result<Self> {
        let width = settings.width;
        let (w1, w2, w4) = (width, 2 * width, 4 * width);
        let to_stride8 = vec![
            Conv::new(vb.pp("conv1"), 3, w1, 3, 2)?,
            Conv::new(vb.pp("conv2"), w1, w2, 3, 2)?,
            Conv::new(vb.pp("conv3"), w2, w2, 3, 1)?,
            Conv::new(vb.pp("conv4"), w2, w4, 3, 2)?,
            Conv::new(vb.pp("conv5"), w4, w4, 3, 1)?,
        ];
        let mut to_stride16 = vec![Conv::new(vb.pp("conv6"), w4, w4, 3, 2)?];
        for index in 0..settings.coarse_depth {
            to_stride16.push(Conv::new(vb.pp(format!("conv{}", 7 + index)), w4, w4, 3, 1)?);
        }
        Ok(Self {
            to_stride8,
            head8: Conv::new(vb.pp("head8"), w4, STRIDE8_CHANNELS, 1, 1)?,
            to_stride16,
            head16: Conv::new(vb.pp("head16"), w4, STRIDE16_CHANNELS, 1, 1)?,
        })
    }

    /// `(B, S, S, 3)` images in [0, 1] → stride-8 and stride-16 maps, channels-last.
    fn forward(&self, x: &Tensor) -> Result<[Tensor; 2]> {
        let mut h = x.affine(2.0, -1.0)?;
        for conv in &self.to_stride8 {
            h = conv.forward_leaky(&h)?;
        }
        let stride8 = self.head8.forward(&h)?;
        for conv in &self.to_stride16 {
            h = conv.forward_leaky(&h)?;
        }
        Ok([stride8, self.head16.forward(&h)?])
    }
}

impl Student {
    /// The mean discrepancy to the teacher's maps, averaged over the two levels.
    fn training_loss(&self, input: &Tensor, teacher: &[Tensor; 2]) -> Result<Tensor> {
        let [fine, coarse] = self.forward(input)?;
        let fine = discrepancy(&teacher[0], &fine)?.mean_all()?;
        let coarse = discrepancy(&teacher[1], &coarse)?.mean_all()?;
        Ok(((fine + coarse)? / 2.0)?)
    }
}

/// The student's training step on a random `(batch, side, side, 3)` batch, against random teacher maps (the
/// frozen teacher's forward is not part of a step). The student is the PyTorch replica's
/// (`../shared/peer/torch_train_step.py`): the default's but for one convolution at 1/16 instead of
/// `coarse_depth`, so that the two sides stay the same network.
pub fn bench_step(batch: usize, side: usize, device: &Device) -> Result<BenchStep> {
    check_image_size(side as u32)?;
    let settings = StfpmSettings { coarse_depth: 1, ..StfpmSettings::default() };
    let varmap = VarMap::new();
    let student = Student::new(VarBuilder::from_varmap(&varmap, DType::F32, device), &settings)?;
    let input = Tensor::rand(0f32, 1f32, (batch, side, side, 3), device)?;
    let teacher = [
        Tensor::randn(0f32, 1f32, (batch, side / 8, side / 8, STRIDE8_CHANNELS), device)?,
        Tensor::randn(0f32, 1f32, (batch, side / 16, side / 16, STRIDE16_CHANNELS), device)?,
    ];
    Ok(BenchStep {
        varmap,
        learning_rate: settings.schedule.learning_rate,
        weight_decay: settings.schedule.weight_decay,
        loss: Box::new(move || student.training_loss(&input, &teacher)),
        geometry: format!("batch {batch}, {side}² input"),
    })
}

/// Unit length along the last axis.
fn normalise(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(3)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// The product of the two levels' discrepancy maps on the stride-8 grid, images after images (before the
/// position calibration).
fn raw_maps(backbone: &Backbone, student: &Student, images: &Tensor) -> Result<Vec<f32>> {
    let teacher = teacher_maps(backbone, images)?;
    let student = student.forward(&channels_last(images)?)?;
    let fine = discrepancy(&teacher[0], &student[0])?;
    let coarse = discrepancy(&teacher[1], &student[1])?;
    let (_, h, w) = fine.dims3()?;
    let coarse = coarse.unsqueeze(1)?.upsample_nearest2d(h, w)?.squeeze(1)?;
    Ok(fine.mul(&coarse)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

/// ½·|t̂ − ŝ|² per position of channels-last maps, `(B, H, W)`: 1 − the cosine similarity.
pub(super) fn discrepancy(teacher: &Tensor, student: &Tensor) -> Result<Tensor> {
    Ok(((normalise(teacher)? - normalise(student)?)?.sqr()?.sum(3)? * 0.5)?)
}

/// The backbone blocks STFPM's teacher gives: stride 8 and stride 16.
const TEACHER_BLOCKS: [usize; 2] = [STRIDE8_BLOCK, STRIDE16_BLOCK];

/// The teacher's two maps (the frozen backbone's stride 8 and 16), channels-last.
fn teacher_maps(backbone: &Backbone, images: &Tensor) -> Result<[Tensor; 2]> {
    let maps = backbone.features(images)?;
    Ok([channels_last(&maps.stride8)?, channels_last(&maps.stride16)?])
}

/// The frozen backbone's outputs of `blocks` (in order), channels-last.
pub(super) fn teacher_levels(backbone: &Backbone, images: &Tensor, blocks: &[usize]) -> Result<Vec<Tensor>> {
    let maps = backbone.net.forward_taps(&EfficientNetLite0::normalize(images)?, blocks)?;
    maps.iter().map(channels_last).collect()
}

pub struct Stfpm {
    backbone: Arc<Backbone>,
    settings: StfpmSettings,
    image_size: u32,
    varmap: VarMap,
    student: Student,
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

/// The settings' ranges were checked with INFO's; what remains depends on the image size.
fn check_image_size(image_size: u32) -> Result<()> {
    if !image_size.is_multiple_of(16) {
        bail!("STFPM needs an image size that is a multiple of 16, got {image_size}");
    }
    Ok(())
}

/// The frozen teacher's maps (outputs of `blocks`) of every training image, computed once (MTD at 256 px,
/// strides 8 and 16: ≈ 190 MB).
pub(super) fn teacher_features(
    context: &FitContext,
    images: &TrainingImages,
    what: &'static str,
    blocks: &[usize],
) -> Result<Vec<PerImageTensors>> {
    let progress = context.progress;
    progress.begin("teacher features", images.len() as u64);
    let mut teacher: Vec<PerImageTensors> = blocks.iter().map(|_| PerImageTensors::new(what)).collect();
    for batch in images.all_batches(context.batch_size) {
        check_cancelled(progress)?;
        let batch = batch?;
        let maps = teacher_levels(&context.backbone, &images_to_tensor(&batch, &context.device)?, blocks)?;
        for (level, map) in maps.iter().enumerate() {
            teacher[level].push(map)?;
        }
        progress.advance(batch.len() as u64);
    }
    Ok(teacher)
}

fn grid_side(image_size: u32) -> usize {
    image_size as usize / 8
}

impl Stfpm {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: StfpmSettings) -> Result<Self> {
        check_image_size(context.image_size)?;
        if images.is_empty() {
            bail!("STFPM needs training images");
        }
        let device = context.device.clone();
        let progress = context.progress;
        let teacher = teacher_features(context, images, "STFPM teacher maps", &TEACHER_BLOCKS)?;
        let varmap = VarMap::new();
        let student = Student::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.batch_size, settings.schedule.seed ^ 0x57f);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let record = train(&varmap, &plan, progress, |_, step| {
            let chosen = batches.batch(step);
            let input = channels_last(&images_to_tensor(&images.select(chosen)?, &device)?)?;
            let targets = [teacher[0].gather(chosen, &device)?, teacher[1].gather(chosen, &device)?];
            student.training_loss(&input, &targets)
        })?;
        let positions = grid_side(context.image_size).pow(2);
        let calibration = PositionCalibration::from_training_images(context, images, positions, |batch| {
            raw_maps(&context.backbone, &student, batch)
        })?;
        let backbone = context.backbone.clone();
        Ok(Self { backbone, settings, image_size: context.image_size, varmap, student, calibration, record })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: StfpmSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        check_image_size(image_size)?;
        let device = backbone.device.clone();
        let calibration = PositionCalibration::take(&mut tensors, &[grid_side(image_size).pow(2)])?;
        let varmap = load_varmap(tensors, &device, "STFPM", |vb| Student::new(vb.clone(), &settings).map(|_| ()))?;
        let student = Student::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        Ok(Self { backbone, settings, image_size, varmap, student, calibration, record: TrainingRecord::default() })
    }

    fn raw_maps(&self, images: &Tensor) -> Result<Vec<f32>> {
        raw_maps(&self.backbone, &self.student, images)
    }
}

impl AnomalyModel for Stfpm {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let maps = self.raw_maps(images)?;
        let (side, size) = (grid_side(self.image_size), self.image_size as usize);
        let (blur, top) = (self.settings.blur_sigma, self.settings.image_score_top);
        Ok(self.calibration.outputs_scored(&maps, side, size, blur, top))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(self.calibration.state()?);
        Ok(state)
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let teacher = [layers::channels_last(graph, &fine), layers::channels_last(graph, &coarse)];
        // The student, as `Student::forward`.
        let planar = layers::channels_last(graph, images);
        let mut h = layers::affine(graph, &planar, 2.0, -1.0);
        for conv in &self.student.to_stride8 {
            h = layers::conv_leaky(graph, &h, conv)?;
        }
        let student8 = layers::conv_channels_last(graph, &h, &self.student.head8)?;
        for conv in &self.student.to_stride16 {
            h = layers::conv_leaky(graph, &h, conv)?;
        }
        let student16 = layers::conv_channels_last(graph, &h, &self.student.head16)?;
        // ½·|t̂ − ŝ|² per position at both strides, the coarse one upsampled, multiplied.
        let fine = layers::discrepancy(graph, &teacher[0], &student8);
        let coarse = layers::discrepancy(graph, &teacher[1], &student16);
        let side = grid_side(self.image_size);
        let coarse = layers::upsample_nearest(graph, &coarse, side, side);
        let product = graph.op("Mul", &[&fine, &coarse], vec![]);
        let flat = graph.ints("shape", &[2], &[0, (side * side) as i64]);
        let cells =
            graph.op("Reshape", &[&product, &flat], vec![]).with_shape(vec![images.shape[0], Some(side * side)]);
        let cells = layers::calibrate(graph, &cells, &self.calibration, 0);
        let size = self.image_size as usize;
        let (blur, top) = (self.settings.blur_sigma, self.settings.image_score_top);
        Ok(layers::map_and_top_score(graph, &cells, side, size, blur, top))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files saved before the coarse depth, the top-share score and the learning-rate decay rebuild the student
    /// they were trained with (one 3×3 convolution at 1/16) and score by the maximum.
    #[test]
    fn settings_saved_before_the_coarse_depth_keep_their_meaning() {
        let mut saved = serde_json::to_value(StfpmSettings::default()).unwrap();
        let new_keys = ["coarse_depth", "image_score_top", "final_learning_rate_share"];
        saved.as_object_mut().unwrap().retain(|key, _| !new_keys.contains(&key.as_str()));
        let old: StfpmSettings = serde_json::from_value(saved).unwrap();
        assert_eq!((old.coarse_depth, old.image_score_top, old.schedule.final_learning_rate_share), (1, 0.0, 1.0));
        let varmap = VarMap::new();
        let student = Student::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &old).unwrap();
        assert_eq!(student.to_stride16.len(), 2, "conv6 (stride 2) and conv7, as before");
        assert!(varmap.data().lock().unwrap().contains_key("conv7.weight"));
        assert!(!varmap.data().lock().unwrap().contains_key("conv8.weight"));
    }
}
