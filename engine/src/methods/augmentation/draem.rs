//! DRAEM — Zavrtanik et al. 2021, "DRAEM — A discriminatively trained reconstruction embedding for surface
//! anomaly detection" (ICCV); reference code: the authors' `DRAEM` repository and anomalib's `models/image/draem`.
//!
//! Training images get synthetic anomalies: a Perlin-noise blob mask through which a texture is blended in
//! (see [`perlin_blend`]); half the samples stay clean. There is no DTD texture set here, so the texture is
//! another training image, strongly augmented (rotated by a multiple of 90°, mirrored, intensities rescaled,
//! half the time inverted) — or, for half of the anomalies by default (`brightness_anomalies`), the image's
//! own surface made brighter or darker, since uneven-brightness defects have no foreign texture.
//! `contour_masks` makes half of the masks thin bands along a level line of the noise (crack-like; off by
//! default). A reconstructive sub-network (a fully convolutional encoder–decoder on the image average-pooled by
//! `downsample`) learns to restore the clean image (L2 + 1 − SSIM), and a discriminative sub-network — a small
//! U-Net — learns the anomaly mask (focal loss, γ = 2); both train together.
//!
//! Where this differs from the paper: the paper's U-Net learns from raw pixels of the augmented image and its
//! reconstruction over 700 GPU epochs; trained from scratch for the few hundred steps a CPU affords, that did
//! not separate even synthetic defects. Here the U-Net works on the 8×8-patch grid and sees only *deviations*
//! ([`Deviations::cells`]): each backbone level's z-scores against good parts at that position (the "normal
//! reference" that the reconstruction is in the paper, in feature space), and the image's distance from its
//! reconstruction (squared error and 1 − SSIM, each patch's mean and maximum). It predicts the mask per patch,
//! and with `deviation_prior` its "anomalous" logit starts from the feature deviation, so training learns a
//! correction to it. The reconstruction reaches the discriminator detached. Every variant tried, with its MTD
//! figure, is in ARCHITECTURE.md ("Measured", DRAEM).
//! Anomaly map: the discriminative probability of "anomalous", z-scored per position against 200 training
//! images (see [`PositionCalibration`]), upsampled and blurred; image score: its maximum.

use crate::methods::setting_docs::{TRAINING_EPOCHS, common, paper};
use super::synthetic_anomalies::{
    brightness_changed, foreign_texture, patch_labels, perlin_blend, perlin_contour_blend,
};
use crate::backbone::efficientnet_lite0::STRIDE8_CHANNELS;
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::PositionCalibration;
use crate::methods::features::{
    patch_feature_rows, patch_standardisation, position_standardisation, PATCH_CHANNELS, PATCH_STRIDE,
};
use crate::methods::layers::{channels_first, channels_last, pixel_shuffle, upsample2x, Conv};
use crate::methods::ssim::{mean_ssim, ssim_map};
use crate::methods::statistics::Standardise;
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord};
use crate::methods::{
    planar_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores,
};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Draem,
    DraemSettings,
    name: "draem",
    title: "DRAEM",
    family: Family::DataAugmentation,
    summary: "Reconstructive + discriminative networks trained on Perlin-noise synthetic anomalies.",
    guide: "Wins where defects look like foreign texture pasted on the part; localises them sharply. On 2 CPU cores, MTD (761 training images): fit 3 min 42 s, 28 images/s, image AUROC 0.779.",
    ranges: ["downsample": 1..=4, "reconstructive_width": 1..=256, "discriminative_width": 1..=512],
    docs: [
        "downsample" => common("Input reduction", "×", "The reconstructive network sees the image average-pooled by this factor (1, 2 or 4).", false),
        "reconstructive_width" => common("Reconstructive width", "channels", "Channels of the reconstructive network's first stage; later stages double it.", true),
        "discriminative_width" => common("Discriminative width", "channels", "Channels of the discriminative U-Net's first stage; later stages double it.", true),
        "brightness_anomalies" => common("Brightness anomalies", "", "Half of the synthetic defects change the part's own brightness instead of pasting a foreign texture.", true),
        "contour_masks" => common("Crack-like masks", "", "Half of the synthetic defect shapes are thin bands (crack-like) instead of blobs.", true),
        "calibrate" => common("Per-position calibration", "", "Standardise the map per position against 200 training images (needs that many).", true),
        "deviation_prior" => common("Deviation prior", "", "The discriminator starts from the patch's feature deviation and learns the correction.", true),
        "epochs" => paper(TRAINING_EPOCHS, "700"),
    ],
    smoke: ({"epochs": 8, "steps_per_epoch": 40, "batch_size": 4, "discriminative_width": 32} at 192, floors [0.85, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => DraemSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DraemSettings {
    /// The reconstructive network works on the image average-pooled by this factor (1, 2 or 4).
    pub downsample: usize,
    /// Channels of the reconstructive network's first stage; later stages double it (at most 4×).
    pub reconstructive_width: usize,
    /// Channels of the discriminative U-Net's first stage; later stages double it.
    pub discriminative_width: usize,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub steps_per_epoch: usize,
    pub batch_size: usize,
    pub blur_sigma: f32,
    /// Half of the synthetic anomalies take the image's own surface with its brightness changed as their
    /// texture instead of a foreign one (uneven-brightness defects have no foreign texture).
    pub brightness_anomalies: bool,
    /// Half of the Perlin masks are thin bands along a level line of the noise (crack-like) instead of blobs.
    pub contour_masks: bool,
    /// z-score the map per position against 200 training images. It needs that many: on MTD (761 images) it
    /// raised image AUROC from 0.737 to 0.765 (with the earlier, feature-fed discriminator); on a set of a few
    /// dozen the per-position spread is too noisy.
    pub calibrate: bool,
    /// The discriminator's "anomalous" logit starts from the patch's feature deviation (the sum of its two
    /// deviation inputs) and the network learns the correction; off, the network's logits alone (MTD image
    /// AUROC, seeds 0 / 1 / 2: 0.792 / 0.744 / 0.689 without, 0.790 / 0.799 / 0.801 with).
    pub deviation_prior: bool,
}

impl Default for DraemSettings {
    fn default() -> Self {
        Self {
            downsample: 4,
            reconstructive_width: 16,
            discriminative_width: 64,
            schedule: Schedule::new(8, 1e-3),
            steps_per_epoch: 40,
            batch_size: 8,
            blur_sigma: 4.0,
            brightness_anomalies: true,
            contour_masks: false,
            calibrate: true,
            deviation_prior: true,
        }
    }
}

impl DraemSettings {
    /// The paper's length for a GPU: 700 epochs of batch 8 at learning rate 1e-4, full resolution
    /// (`steps_per_epoch` ≈ an MVTec category's 250 images / 8).
    pub fn published() -> Self {
        Self {
            downsample: 1,
            reconstructive_width: 32,
            schedule: Self::default().schedule.with(700, 1e-4),
            steps_per_epoch: 32,
            ..Self::default()
        }
    }
}

/// Stride-2 stages of the reconstructive network.
const RECONSTRUCTIVE_STAGES: usize = 3;

/// Fully convolutional encoder–decoder: reconstructs the clean image `(B, s, s, 3)`, channels-last.
pub(crate) struct Reconstructive {
    encoder: Vec<(Conv, Conv)>,
    /// Per stage: the convolution after the ×2 upsampling, then one at the same size.
    decoder: Vec<(Conv, Conv)>,
    output: Conv,
}

impl Reconstructive {
    fn new(vb: VarBuilder, width: usize) -> Result<Self> {
        let stage_channels = |stage: usize| width << stage.min(2);
        let mut encoder = Vec::new();
        let mut channels = 3;
        for stage in 0..RECONSTRUCTIVE_STAGES {
            let out = stage_channels(stage);
            encoder.push((
                Conv::new(vb.pp(format!("encoder{stage}a")), channels, out, 3, 2)?,
                Conv::new(vb.pp(format!("encoder{stage}b")), out, out, 3, 1)?,
            ));
            channels = out;
        }
        let mut decoder = Vec::new();
        for stage in (0..RECONSTRUCTIVE_STAGES - 1).rev() {
            let out = stage_channels(stage);
            decoder.push((
                Conv::new(vb.pp(format!("decoder{stage}a")), channels, out, 3, 1)?,
                Conv::new(vb.pp(format!("decoder{stage}b")), out, out, 3, 1)?,
            ));
            channels = out;
        }
        // Ends at half the input side; a pixel shuffle makes the full-size image (as the autoencoder's).
        Ok(Self { encoder, decoder, output: Conv::new(vb.pp("output"), channels, 4 * 3, 3, 1)? })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (down, same) in &self.encoder {
            h = same.forward_leaky(&down.forward_leaky(&h)?)?;
        }
        for (after_upsampling, same) in &self.decoder {
            h = after_upsampling.forward_leaky(&upsample2x(&h)?)?;
            h = same.forward_leaky(&h)?;
        }
        Ok(candle_nn::ops::sigmoid(&pixel_shuffle(&self.output.forward(&h)?)?)?)
    }
}

/// Channels the discriminative network sees per patch: the deviation of each of the two backbone levels from
/// good parts at that position, then four reconstruction-error channels (see [`Deviations::cells`]).
pub(crate) const DISCRIMINATIVE_INPUT: usize = 2 + 4;

/// U-Net over the patch grid `(B, g, g, DISCRIMINATIVE_INPUT)` → two-class logits `(B, g, g, 2)`.
struct Discriminative {
    input: (Conv, Conv),
    /// Two stride-2 stages.
    encoder: Vec<(Conv, Conv)>,
    /// Per stage: the convolution over (upsampled, skip), then one more.
    decoder: Vec<(Conv, Conv)>,
    output: Conv,
    deviation_prior: bool,
}

impl Discriminative {
    fn new(vb: VarBuilder, width: usize, deviation_prior: bool) -> Result<Self> {
        let input = (
            Conv::new(vb.pp("input_a"), DISCRIMINATIVE_INPUT, width, 1, 1)?,
            Conv::new(vb.pp("input_b"), width, width, 3, 1)?,
        );
        let mut encoder = Vec::new();
        for stage in 1..=2 {
            let (from, to) = (width << (stage - 1), width << stage);
            encoder.push((
                Conv::new(vb.pp(format!("encoder{stage}a")), from, to, 3, 2)?,
                Conv::new(vb.pp(format!("encoder{stage}b")), to, to, 3, 1)?,
            ));
        }
        let mut decoder = Vec::new();
        for stage in (0..2).rev() {
            let (deeper, out) = (width << (stage + 1), width << stage);
            decoder.push((
                Conv::new(vb.pp(format!("decoder{stage}a")), deeper + out, out, 3, 1)?,
                Conv::new(vb.pp(format!("decoder{stage}b")), out, out, 3, 1)?,
            ));
        }
        Ok(Self { input, encoder, decoder, output: Conv::new(vb.pp("output"), width, 2, 1, 1)?, deviation_prior })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.input.1.forward_leaky(&self.input.0.forward_leaky(x)?)?;
        let mut skips = vec![h.clone()];
        for (down, same) in &self.encoder {
            h = same.forward_leaky(&down.forward_leaky(&h)?)?;
            skips.push(h.clone());
        }
        skips.pop();
        for (merge, same) in &self.decoder {
            let skip = skips.pop().expect("one skip per decoder stage");
            h = merge.forward_leaky(&Tensor::cat(&[&upsample2x(&h)?, &skip], 3)?)?;
            h = same.forward_leaky(&h)?;
        }
        let logits = self.output.forward(&h)?;
        // A fixed skip from the deviation inputs to the "anomalous" logit: the focal loss on synthetic anomalies
        // then trains a correction to "far from good parts is anomalous" instead of a detector of the synthetic
        // anomalies alone, which on MTD ranked real defects worse than its own input did.
        if !self.deviation_prior {
            return Ok(logits);
        }
        let prior = x.narrow(3, 0, 2)?.sum_keepdim(3)?;
        Ok(Tensor::cat(&[&logits.narrow(3, 0, 1)?, &(logits.narrow(3, 1, 1)? + prior)?], 3)?)
    }
}

/// −(1 − p_t)^γ·ln p_t averaged over rows, γ = 2, from two-class logits `(N, 2)` and targets `(N)`.
fn focal_loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, 1)?.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let weight = (1.0 - log_p.exp()?)?.sqr()?;
    Ok(weight.mul(&log_p)?.mean_all()?.neg()?)
}

pub struct Draem {
    pub(crate) settings: DraemSettings,
    image_size: u32,
    varmap: VarMap,
    pub(crate) reconstructive: Reconstructive,
    discriminative: Discriminative,
    pub(crate) deviations: Deviations,
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

fn check_settings(settings: &DraemSettings, image_size: u32) -> Result<()> {
    if ![1, 2, 4].contains(&settings.downsample) {
        bail!("downsample must be 1, 2 or 4, got {}", settings.downsample);
    }
    let size = image_size as usize;
    // The patch grid is halved twice by the U-Net; the reconstructive network halves its input three times.
    if !size.is_multiple_of(4 * PATCH_STRIDE) {
        bail!("DRAEM needs an image size that is a multiple of {}; got {image_size}", 4 * PATCH_STRIDE);
    }
    Ok(())
}

fn build(vb: &VarBuilder, settings: &DraemSettings) -> Result<(Reconstructive, Discriminative)> {
    Ok((
        Reconstructive::new(vb.pp("reconstructive"), settings.reconstructive_width)?,
        Discriminative::new(vb.pp("discriminative"), settings.discriminative_width, settings.deviation_prior)?,
    ))
}

/// `(B, 3, S, S)` images → channels-last `(B, S/f, S/f, 3)`, average-pooled by `factor`.
/// The discriminative probability of "anomalous" per patch, `grid × grid` per image, on the CPU (before the
/// position calibration).
fn probability_cells(
    reconstructive: &Reconstructive,
    discriminative: &Discriminative,
    deviations: &Deviations,
    downsample: usize,
    images: &Tensor,
) -> Result<Vec<f32>> {
    let input = pooled_channels_last(images, downsample)?;
    let reconstruction = reconstructive.forward(&input)?;
    let logits = discriminative.forward(&deviations.cells(images, &input, &reconstruction, downsample)?)?;
    let probability = candle_nn::ops::softmax_last_dim(&logits)?.narrow(3, 1, 1)?;
    Ok(probability.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

pub(crate) fn pooled_channels_last(images: &Tensor, factor: usize) -> Result<Tensor> {
    channels_last(&if factor > 1 { images.avg_pool2d(factor)? } else { images.clone() })
}

impl Draem {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: DraemSettings) -> Result<Self> {
        check_settings(&settings, context.image_size)?;
        let standardise = patch_standardisation(context, images, "DRAEM")?;
        let position_standardise = position_standardisation(context, images, &standardise)?;
        let deviations = Deviations { backbone: context.backbone.clone(), standardise, position_standardise };
        let device = context.device.clone();
        let progress = context.progress;
        let size = context.image_size as usize;

        let varmap = VarMap::new();
        let (reconstructive, discriminative) =
            build(&VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.batch_size, settings.schedule.seed ^ 0xd7);
        let mut rng = SplitMix64::new(settings.schedule.seed ^ 0xd7ae);
        let plan = settings.schedule.plan(settings.steps_per_epoch);
        let record = train(&varmap, &plan, progress, |epoch, step| {
            let chosen = batches.cycling(epoch, settings.steps_per_epoch, step).to_vec();
            let (mut clean, mut augmented, mut labels) = (Vec::new(), Vec::new(), Vec::new());
            for &i in &chosen {
                let image = images.get(i)?.to_chw_f32();
                if rng.below(2) == 0 {
                    labels.extend(std::iter::repeat_n(0, (size / PATCH_STRIDE).pow(2)));
                    augmented.push(image.clone());
                } else {
                    let texture = if settings.brightness_anomalies && rng.below(2) == 0 {
                        brightness_changed(&image, &mut rng)
                    } else {
                        let other = (i + 1 + rng.below(images.len() - 1)) % images.len();
                        foreign_texture(&images.get(other)?.to_chw_f32(), size, &mut rng)
                    };
                    let anomaly = if settings.contour_masks && rng.below(2) == 0 {
                        perlin_contour_blend(&image, &texture, size, &mut rng)
                    } else {
                        perlin_blend(&image, &texture, size, &mut rng)
                    };
                    labels.extend(patch_labels(&anomaly.mask, size, 1));
                    augmented.push(anomaly.image);
                }
                clean.push(image);
            }
            let (clean, augmented) =
                (planar_to_tensor(&clean, size, &device)?, planar_to_tensor(&augmented, size, &device)?);
            let clean_input = pooled_channels_last(&clean, settings.downsample)?;
            let augmented_input = pooled_channels_last(&augmented, settings.downsample)?;
            let reconstruction = reconstructive.forward(&augmented_input)?;
            let l2 = (&reconstruction - &clean_input)?.sqr()?.mean_all()?;
            let ssim = mean_ssim(&reconstruction, &clean_input)?.mean_all()?.affine(-1.0, 1.0)?;
            let input = deviations.cells(&augmented, &augmented_input, &reconstruction, settings.downsample)?;
            let logits = discriminative.forward(&input)?.reshape((labels.len(), 2))?;
            let focal = focal_loss(&logits, &Tensor::new(labels.as_slice(), &device)?)?;
            Ok(((l2 + ssim)? + focal)?)
        })?;
        let calibration = if settings.calibrate {
            let positions = (size / PATCH_STRIDE).pow(2);
            PositionCalibration::from_training_images(context, images, positions, |batch| {
                probability_cells(&reconstructive, &discriminative, &deviations, settings.downsample, batch)
            })?
        } else {
            PositionCalibration::none()
        };
        let image_size = context.image_size;
        Ok(Self { settings, image_size, varmap, reconstructive, discriminative, deviations, calibration, record })
    }

    /// The discriminative probability of "anomalous" per patch, `grid × grid` per image, on the CPU.
    pub(crate) fn probability_cells(&self, images: &Tensor) -> Result<Vec<f32>> {
        let (reconstructive, discriminative) = (&self.reconstructive, &self.discriminative);
        probability_cells(reconstructive, discriminative, &self.deviations, self.settings.downsample, images)
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: DraemSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        check_settings(&settings, image_size)?;
        let device = backbone.device.clone();
        let standardise = Standardise::take(&mut tensors, "standardise", PATCH_CHANNELS, &device)?;
        let grid = image_size as usize / PATCH_STRIDE;
        if !tensors.contains_key("position_standardise.mean") {
            bail!(
                "this DRAEM model was trained by an earlier Loupe, whose discriminator saw the features themselves \
                 (no per-position statistics in the file); train it again"
            );
        }
        let position_standardise =
            Standardise::take(&mut tensors, "position_standardise", grid * grid * PATCH_CHANNELS, &device)?;
        let calibrated_positions = if settings.calibrate { vec![grid * grid] } else { Vec::new() };
        let calibration = PositionCalibration::take(&mut tensors, &calibrated_positions)?;
        let varmap = load_varmap(tensors, &device, "DRAEM", |vb| build(vb, &settings).map(|_| ()))?;
        let (reconstructive, discriminative) =
            build(&VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        Ok(Self {
            settings,
            image_size,
            varmap,
            reconstructive,
            discriminative,
            deviations: Deviations { backbone, standardise, position_standardise },
            calibration,
            record: TrainingRecord::default(),
        })
    }
}

/// What the discriminative network's input is measured against: the frozen backbone and the statistics of
/// good parts' patch features.
pub(crate) struct Deviations {
    backbone: Arc<Backbone>,
    standardise: Standardise,
    /// Per position and channel (`grid² × PATCH_CHANNELS` values), after `standardise`.
    position_standardise: Standardise,
}

impl Deviations {
    /// What the discriminative network sees, `(B, g, g, DISCRIMINATIVE_INPUT)` on the patch grid g = S / 8, for
    /// images `(B, 3, S, S)`, the reconstructive network's input `(B, s, s, 3)` (s = S / downsample) and its
    /// reconstruction: per patch, ln(1 + mean z²) of each backbone level's features z-scored against good parts
    /// at that position (stride 8, then stride 16), and the channels of [`reconstruction_error_cells`].
    pub(crate) fn cells(
        &self,
        images: &Tensor,
        reconstruction_input: &Tensor,
        reconstruction: &Tensor,
        downsample: usize,
    ) -> Result<Tensor> {
        let (batch, _, size, _) = images.dims4()?;
        let grid = size / PATCH_STRIDE;
        let features = self.standardise.apply(&patch_feature_rows(&self.backbone, images)?)?;
        let squares = self
            .position_standardise
            .apply(&features.reshape((batch, ()))?)?
            .reshape((batch, grid, grid, ()))?
            .sqr()?;
        let level = |from: usize, channels: usize| -> Result<Tensor> {
            Ok((squares.narrow(3, from, channels)?.mean_keepdim(3)? + 1.0)?.log()?)
        };
        Ok(Tensor::cat(
            &[
                level(0, STRIDE8_CHANNELS)?,
                level(STRIDE8_CHANNELS, PATCH_CHANNELS - STRIDE8_CHANNELS)?,
                reconstruction_error_cells(reconstruction_input, reconstruction, PATCH_STRIDE / downsample)?,
            ],
            3,
        )?)
    }
}

/// Per patch of `cell × cell` pixels: the root of the mean and of the largest squared error, and the mean and
/// largest 1 − SSIM, between an input and its reconstruction (both `(B, s, s, 3)`) → `(B, s/cell, s/cell, 4)`.
/// The reconstruction is detached: the reconstructive network learns only to restore the clean image, so the
/// error stays an autoencoder's reconstruction error instead of becoming a learnt flag for the synthetic
/// anomalies. Scaled so that typical values are of order one for the first layer.
fn reconstruction_error_cells(input: &Tensor, reconstruction: &Tensor, cell: usize) -> Result<Tensor> {
    let reconstruction = reconstruction.detach();
    let error = (input - &reconstruction)?.sqr()?.mean_keepdim(3)?;
    let dissimilarity = ssim_map(input, &reconstruction)?.affine(-1.0, 1.0)?.mean_keepdim(3)?;
    let planes = channels_first(&Tensor::cat(&[&error, &dissimilarity], 3)?)?;
    let (mean, max) = (planes.avg_pool2d(cell)?, planes.max_pool2d(cell)?);
    let root_and_scale = |t: &Tensor| -> Result<Tensor> {
        Ok(Tensor::cat(&[&(t.narrow(1, 0, 1)?.sqrt()? * 10.0)?, &(t.narrow(1, 1, 1)? * 4.0)?], 1)?)
    };
    channels_last(&Tensor::cat(&[&root_and_scale(&mean)?, &root_and_scale(&max)?], 1)?)
}

/// A channels-last convolution followed by the leaky ReLU, recorded.
fn conv_leaky(graph: &mut Graph, x: &Value, conv: &Conv) -> Result<Value> {
    let convolved = layers::conv_channels_last(graph, x, conv)?;
    Ok(layers::leaky_relu(graph, &convolved))
}

/// [`reconstruction_error_cells`], recorded.
fn record_error_cells(graph: &mut Graph, input: &Value, reconstruction: &Value, cell: usize) -> Value {
    let difference = graph.op("Sub", &[input, reconstruction], vec![]);
    let squared = graph.op("Mul", &[&difference, &difference], vec![]).with_shape(input.shape.clone());
    let error = layers::mean_last_keep(graph, &squared);
    let ssim = layers::ssim_map(graph, input, reconstruction);
    let dissimilarity = layers::affine(graph, &ssim, -1.0, 1.0);
    let dissimilarity = layers::mean_last_keep(graph, &dissimilarity);
    let joined = layers::concat(graph, &[&error, &dissimilarity], 3);
    let planes = layers::transpose(graph, &joined, &[0, 3, 1, 2]);
    let root_and_scale = |graph: &mut Graph, t: &Value| {
        let error = layers::slice(graph, t, 1, 0, 1);
        let root = graph.op("Sqrt", &[&error], vec![]);
        let ten = graph.scalar("ten", 10.0);
        let root = graph.op("Mul", &[&root, &ten], vec![]).with_shape(error.shape.clone());
        let dissimilarity = layers::slice(graph, t, 1, 1, 1);
        let four = graph.scalar("four", 4.0);
        let dissimilarity = graph.op("Mul", &[&dissimilarity, &four], vec![]).with_shape(error.shape);
        layers::concat(graph, &[&root, &dissimilarity], 1)
    };
    let mean = layers::pool(graph, &planes, cell, false);
    let max = layers::pool(graph, &planes, cell, true);
    let (mean, max) = (root_and_scale(graph, &mean), root_and_scale(graph, &max));
    let cells = layers::concat(graph, &[&mean, &max], 1);
    layers::channels_last(graph, &cells)
}

impl AnomalyModel for Draem {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let cells = self.probability_cells(images)?;
        let size = self.image_size as usize;
        Ok(self.calibration.outputs(&cells, size / PATCH_STRIDE, size, self.settings.blur_sigma))
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let size = self.image_size as usize;
        let grid = size / PATCH_STRIDE;
        let downsample = self.settings.downsample;
        // The reconstructive network on the pooled image (`Reconstructive::forward`).
        let pooled = layers::pool(graph, images, downsample, false);
        let input = layers::channels_last(graph, &pooled);
        let network = &self.reconstructive;
        let mut h = input.clone();
        for (down, same) in &network.encoder {
            h = conv_leaky(graph, &h, down)?;
            h = conv_leaky(graph, &h, same)?;
        }
        for (after_upsampling, same) in &network.decoder {
            let upsampled = layers::upsample2x_channels_last(graph, &h);
            h = conv_leaky(graph, &upsampled, after_upsampling)?;
            h = conv_leaky(graph, &h, same)?;
        }
        let output = layers::conv_channels_last(graph, &h, &network.output)?;
        let shuffled = layers::pixel_shuffle(graph, &output);
        let reconstruction = graph.op("Sigmoid", &[&shuffled], vec![]).with_shape(shuffled.shape);

        // `Deviations::cells`: each level's ln(1 + mean z²) per patch, then the reconstruction-error cells.
        let (fine, coarse) = layers::backbone_features(graph, &self.deviations.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, true);
        let rows = layers::positions_as_rows(graph, &features);
        let rows = layers::standardise(graph, &rows, &self.deviations.standardise)?;
        let z = layers::standardise(graph, &rows, &self.deviations.position_standardise)?;
        let squares = graph.op("Mul", &[&z, &z], vec![]);
        let shape = graph.ints("shape", &[4], &[0, grid as i64, grid as i64, PATCH_CHANNELS as i64]);
        let squares = graph.op("Reshape", &[&squares, &shape], vec![]).with_shape(vec![
            images.shape[0],
            Some(grid),
            Some(grid),
            Some(PATCH_CHANNELS),
        ]);
        let one = graph.scalar("one", 1.0);
        let mut level = |from: usize, channels: usize| {
            let part = layers::slice(graph, &squares, 3, from, channels);
            let mean = layers::mean_last_keep(graph, &part);
            let shifted = graph.op("Add", &[&mean, &one], vec![]);
            graph.op("Log", &[&shifted], vec![]).with_shape(mean.shape)
        };
        let level8 = level(0, STRIDE8_CHANNELS);
        let level16 = level(STRIDE8_CHANNELS, PATCH_CHANNELS - STRIDE8_CHANNELS);
        let errors = record_error_cells(graph, &input, &reconstruction, PATCH_STRIDE / downsample);
        let cells = layers::concat(graph, &[&level8, &level16, &errors], 3);

        // `Discriminative::forward`.
        let network = &self.discriminative;
        let first = conv_leaky(graph, &cells, &network.input.0)?;
        let mut h = conv_leaky(graph, &first, &network.input.1)?;
        let mut skips = vec![h.clone()];
        for (down, same) in &network.encoder {
            h = conv_leaky(graph, &h, down)?;
            h = conv_leaky(graph, &h, same)?;
            skips.push(h.clone());
        }
        skips.pop();
        for (merge, same) in &network.decoder {
            let skip = skips.pop().expect("one skip per decoder stage");
            let upsampled = layers::upsample2x_channels_last(graph, &h);
            let joined = layers::concat(graph, &[&upsampled, &skip], 3);
            h = conv_leaky(graph, &joined, merge)?;
            h = conv_leaky(graph, &h, same)?;
        }
        let logits = layers::conv_channels_last(graph, &h, &network.output)?;
        let logits = if network.deviation_prior {
            let deviations = layers::slice(graph, &cells, 3, 0, 2);
            let last = graph.ints("axis", &[1], &[-1]);
            let prior = graph.op("ReduceSum", &[&deviations, &last], vec![attr_int("keepdims", 1)]);
            let normal = layers::slice(graph, &logits, 3, 0, 1);
            let anomalous = layers::slice(graph, &logits, 3, 1, 1);
            let anomalous = graph.op("Add", &[&anomalous, &prior], vec![]).with_shape(normal.shape.clone());
            layers::concat(graph, &[&normal, &anomalous], 3)
        } else {
            logits
        };
        let probabilities = graph.op("Softmax", &[&logits], vec![attr_int("axis", -1)]).with_shape(logits.shape);
        let anomalous = layers::slice(graph, &probabilities, 3, 1, 1);
        let flat = graph.ints("shape", &[2], &[0, (grid * grid) as i64]);
        let cells =
            graph.op("Reshape", &[&anomalous, &flat], vec![]).with_shape(vec![images.shape[0], Some(grid * grid)]);
        let cells =
            if self.settings.calibrate { layers::calibrate(graph, &cells, &self.calibration, 0) } else { cells };
        Ok(layers::map_and_score(graph, &cells, grid, size, self.settings.blur_sigma))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(self.deviations.standardise.state("standardise")?);
        state.extend(self.deviations.position_standardise.state("position_standardise")?);
        state.extend(self.calibration.state()?);
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn focal_loss_matches_its_formula() {
        let logits = Tensor::new(&[[2.0f32, -1.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        let loss = focal_loss(&logits, &targets).unwrap().to_scalar::<f32>().unwrap();
        let p1 = 1.0 / (1.0 + 3f32.exp()); // softmax of class 1 for logits (2, −1)
        let expected = (-(1.0 - p1).powi(2) * p1.ln() - (0.5f32).powi(2) * 0.5f32.ln()) / 2.0;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }
}
