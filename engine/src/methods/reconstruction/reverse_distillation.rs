//! Reverse distillation — Deng & Li 2022, "Anomaly Detection via Reverse Distillation from One-Class
//! Embedding" (CVPR); reference code: the authors' `RD4AD` and anomalib's `reverse_distillation`.
//!
//! The frozen teacher's stride-8 and stride-16 maps are fused and squeezed by a trainable one-class bottleneck
//! (OCBE: the finer map convolved down to the coarser's stride, concatenated with it, then a stride-2
//! convolution to a compact embedding at stride 32). A student decoder climbs back up — nearest ×2 upsampling
//! and 3×3 convolutions — and must reproduce the teacher's maps at both strides from that embedding alone.
//! Loss: 1 − cosine similarity per position (½|t̂ − ŝ|² of the unit vectors, as STFPM here), averaged over
//! positions and levels. The student only ever learned to rebuild normal features through the normal-only
//! embedding, so where a defect changes the teacher's features the two disagree. Map: per level that
//! discrepancy, the coarse one upsampled to the stride-8 grid, summed (the paper sums), optionally z-scored per
//! position against the training images (`calibrate`, not in the paper), resized and blurred; score: its maximum.
//!
//! Where it differs from the paper: the teacher there is a Wide-ResNet-50 (three levels of 256–1024 channels
//! at strides 4–16), the bottleneck a ResNet stage to 2048 channels and the decoder the mirrored ResNet,
//! trained 200 epochs on a GPU; here Lite0's two levels (40 and 112 channels), a bottleneck of `embedding`
//! channels and a plain convolutional decoder of `width` channels, trained for a CPU.

use super::stfpm::{discrepancy, teacher_features, teacher_maps};
use crate::backbone::efficientnet_lite0::{STRIDE16_CHANNELS, STRIDE8_CHANNELS};
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::PositionCalibration;
use crate::methods::layers::{upsample2x, Conv};
use crate::methods::setting_docs::common;
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord};
use crate::methods::{AnomalyModel, AnomalyOutput, Family, FitContext};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    ReverseDistillation,
    ReverseDistillationSettings,
    name: "reverse_distillation",
    title: "Reverse distillation",
    family: Family::Reconstruction,
    summary: "A student decoder rebuilds the teacher's features from a one-class bottleneck; discrepancy map.",
    guide: "Wins where defects are local changes of texture or structure: the student cannot rebuild what the normal-only bottleneck never carried. On 2 CPU cores, MTD (761 training images): fit 7 min 54 s, 71 images/s, image AUROC 0.821 (below what the paper's three-level Wide-ResNet teacher reaches).",
    ranges: ["embedding": 8..=2048, "width": 8..=1024, "images_per_step": 1..=256],
    docs: [
        "embedding" => common("Bottleneck channels", "", "Channels of the one-class embedding at stride 32: narrower forgets more of what is not normal.", false),
        "width" => common("Decoder width", "channels", "Channels of the student decoder at stride 16 (half of it at stride 8).", true),
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
    pub calibrate: bool,
    pub blur_sigma: f32,
    /// Epochs, learning rate, weight decay, time budget and seed: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
}

impl Default for ReverseDistillationSettings {
    fn default() -> Self {
        Self {
            embedding: 256,
            width: 128,
            images_per_step: 8,
            calibrate: true,
            blur_sigma: 4.0,
            // Validation AUROC 0.710 after 2 epochs, 0.687 after 20, 0.717 after 60 (ARCHITECTURE.md).
            schedule: Schedule::new(60, 1e-3),
        }
    }
}

impl ReverseDistillationSettings {
    /// The paper's schedule: 200 epochs of 16 images at learning rate 5e-3 (Adam with β₁ = 0.5 there).
    pub fn published() -> Self {
        Self { images_per_step: 16, schedule: Schedule::new(200, 5e-3), ..Self::default() }
    }
}

/// The one-class bottleneck: the teacher's two maps → an embedding at stride 32.
struct Bottleneck {
    fine_down: Conv,
    fuse: Conv,
}

/// The student: the embedding → the teacher's stride-16 and stride-8 maps.
struct Decoder {
    to_stride16: Vec<Conv>,
    head16: Conv,
    to_stride8: Vec<Conv>,
    head8: Conv,
}

struct Networks {
    bottleneck: Bottleneck,
    decoder: Decoder,
}

impl Networks {
    fn new(vb: VarBuilder, settings: &ReverseDistillationSettings) -> Result<Self> {
        let (embedding, wide, narrow) = (settings.embedding, settings.width, (settings.width / 2).max(1));
        let conv = |name: &str, inputs: usize, outputs: usize, kernel: usize, stride: usize| {
            Conv::new(vb.pp(name), inputs, outputs, kernel, stride)
        };
        Ok(Self {
            bottleneck: Bottleneck {
                fine_down: conv("ocbe.fine_down", STRIDE8_CHANNELS, STRIDE16_CHANNELS, 3, 2)?,
                fuse: conv("ocbe.fuse", 2 * STRIDE16_CHANNELS, embedding, 3, 2)?,
            },
            decoder: Decoder {
                to_stride16: vec![conv("decoder.up16", embedding, wide, 3, 1)?, conv("decoder.conv16", wide, wide, 3, 1)?],
                head16: conv("decoder.head16", wide, STRIDE16_CHANNELS, 1, 1)?,
                to_stride8: vec![conv("decoder.up8", wide, narrow, 3, 1)?, conv("decoder.conv8", narrow, narrow, 3, 1)?],
                head8: conv("decoder.head8", narrow, STRIDE8_CHANNELS, 1, 1)?,
            },
        })
    }

    /// The student's stride-8 and stride-16 maps rebuilt from the teacher's, channels-last.
    fn forward(&self, teacher: &[Tensor; 2]) -> Result<[Tensor; 2]> {
        let fine = self.bottleneck.fine_down.forward_leaky(&teacher[0])?;
        let embedding = self.bottleneck.fuse.forward_leaky(&Tensor::cat(&[&fine, &teacher[1]], 3)?)?;
        let mut h = upsample2x(&embedding)?;
        for conv in &self.decoder.to_stride16 {
            h = conv.forward_leaky(&h)?;
        }
        let stride16 = self.decoder.head16.forward(&h)?;
        h = upsample2x(&h)?;
        for conv in &self.decoder.to_stride8 {
            h = conv.forward_leaky(&h)?;
        }
        Ok([self.decoder.head8.forward(&h)?, stride16])
    }

    /// Per level the student's discrepancy to the teacher `(B, H, W)`.
    fn discrepancies(&self, teacher: &[Tensor; 2]) -> Result<[Tensor; 2]> {
        let student = self.forward(teacher)?;
        Ok([discrepancy(&teacher[0], &student[0])?, discrepancy(&teacher[1], &student[1])?])
    }
}

/// The bottleneck halves the stride-16 map once more and the decoder doubles it back twice: the stride-8 map's
/// side must be a multiple of 4.
fn check_image_size(image_size: u32) -> Result<()> {
    if !image_size.is_multiple_of(32) {
        bail!("reverse distillation needs an image size that is a multiple of 32, got {image_size}");
    }
    Ok(())
}

fn grid_side(image_size: u32) -> usize {
    image_size as usize / 8
}

/// The summed discrepancy maps on the stride-8 grid, images after images (before any calibration).
fn raw_maps(backbone: &Backbone, networks: &Networks, images: &Tensor) -> Result<Vec<f32>> {
    let [fine, coarse] = networks.discrepancies(&teacher_maps(backbone, images)?)?;
    let (_, h, w) = fine.dims3()?;
    let coarse = coarse.unsqueeze(1)?.upsample_nearest2d(h, w)?.squeeze(1)?;
    Ok((fine + coarse)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)
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
        let teacher = teacher_features(context, images, "reverse distillation teacher maps")?;
        let varmap = VarMap::new();
        let networks = Networks::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, settings.schedule.seed ^ 0x4d);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let record = train(&varmap, &plan, progress, |_, step| {
            let chosen = batches.batch(step);
            let targets = [teacher[0].gather(chosen, &device)?, teacher[1].gather(chosen, &device)?];
            let [fine, coarse] = networks.discrepancies(&targets)?;
            Ok(((fine.mean_all()? + coarse.mean_all()?)? / 2.0)?)
        })?;
        let calibration = if settings.calibrate {
            let positions = grid_side(context.image_size).pow(2);
            PositionCalibration::from_training_images(context, images, positions, |batch| {
                raw_maps(&context.backbone, &networks, batch)
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
            true => PositionCalibration::take(&mut tensors, &[grid_side(image_size).pow(2)])?,
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
        let maps = raw_maps(&self.backbone, &self.networks, images)?;
        let (side, size) = (grid_side(self.image_size), self.image_size as usize);
        Ok(self.calibration.outputs(&maps, side, size, self.settings.blur_sigma))
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

    #[test]
    fn the_student_rebuilds_both_teacher_levels_at_their_sizes() {
        let settings = ReverseDistillationSettings { embedding: 16, width: 8, ..Default::default() };
        let varmap = VarMap::new();
        let networks = Networks::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &settings).unwrap();
        let teacher = [
            Tensor::randn(0f32, 1.0, (2, 12, 12, STRIDE8_CHANNELS), &Device::Cpu).unwrap(),
            Tensor::randn(0f32, 1.0, (2, 6, 6, STRIDE16_CHANNELS), &Device::Cpu).unwrap(),
        ];
        let [fine, coarse] = networks.forward(&teacher).unwrap();
        assert_eq!(fine.dims(), teacher[0].dims());
        assert_eq!(coarse.dims(), teacher[1].dims());
        // The discrepancy is 1 − cosine: within [0, 2].
        let [d_fine, d_coarse] = networks.discrepancies(&teacher).unwrap();
        for d in [d_fine, d_coarse] {
            let values = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|v| (-1e-5..=2.0 + 1e-5).contains(v)), "{values:?}");
        }
        assert!(check_image_size(96).is_ok() && check_image_size(80).is_err());
    }
}
