//! Convolutional autoencoder — the survey's reconstruction baseline (Cui, Liu & Lian 2023, Fig. 3), with the
//! structural-similarity loss and map of Bergmann et al. 2019 ("Improving Unsupervised Defect Segmentation by
//! Applying Structural Similarity to Autoencoders").
//!
//! The network sees the image average-pooled by `downsample` (default 256 → 64 px): an encoder of stride-2
//! 3×3 convolutions down to 1/16 of its side (4×4), a dense bottleneck of `latent_dim` values (so it cannot
//! learn the identity), and a mirrored decoder (nearest ×2 upsampling + 3×3 convolutions, a pixel shuffle
//! last) ending in a sigmoid. Trained on normal images with L2 + (1 − SSIM).
//!
//! Why 64 px and 32 epochs by default: on MTD, at 128 px the network spends the CPU budget on reconstructing
//! fine texture it never gets right, and good tiles' texture then scores as high as defects (image AUROC 0.651
//! at 8 epochs, 0.685 at 16); pooled to 64 px a step is 4× cheaper, the texture is averaged away before the
//! network sees it, and 32 epochs fit the same budget: 0.803. Small defects lose pixels (pixel AUROC of
//! blowholes 0.945 → 0.921) but every type's image AUROC rises.
//! Anomaly map: (1 − SSIM) + squared error, averaged over the colour channels, z-scored per pixel against the
//! maps of training images (see [`PositionCalibration`]), resized to the input and Gaussian-blurred; image
//! score: the map's maximum.

use crate::methods::setting_docs::common;
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::calibration::{PositionCalibration, CALIBRATION_IMAGES};
use crate::methods::layers::{channels_last, linear_leaky, pixel_shuffle, upsample2x, Conv};
use crate::methods::per_image::PerImageTensors;
use crate::methods::ssim::{mean_ssim, ssim_map};
use crate::methods::training::{
    load_varmap, train, varmap_state, BenchStep, Schedule, ShuffledBatches, TrainingRecord,
};
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Autoencoder,
    AutoencoderSettings,
    name: "autoencoder",
    title: "Autoencoder (SSIM)",
    family: Family::Reconstruction,
    summary: "Convolutional autoencoder trained on good images; reconstruction error + SSIM map.",
    guide: "Wins when defects change texture or shading over a plain surface, and scores fast. On 2 CPU cores, MTD (761 training images): fit 2 min 35 s for 128 epochs, 466 images/s, image AUROC 0.856.",
    ranges: ["downsample": 1..=4, "width": 1..=256, "latent_dim": 1..=4096],
    docs: [
        "downsample" => common("Input reduction", "×", "The network sees the image average-pooled by this factor (1, 2 or 4): smaller trains faster, sees less detail.", false),
        "width" => common("Network width", "channels", "Channels of the first encoder stage; later stages double it (at most 4×).", false),
        "latent_dim" => common("Bottleneck size", "channels", "Channels of the bottleneck: too wide reconstructs defects too.", false),
    ],
    smoke: ({"epochs": 30, "batch_size": 4, "width": 16, "latent_dim": 32, "downsample": 1} at 96, floors [0.8, 0.85, 0.5]),
    presets: ["published": "a GPU-length schedule (200 epochs, learning rate 2e-4)" => AutoencoderSettings::published],
);

/// Stride-2 stages of the encoder: the dense bottleneck sees the network's input side / 16 (8×8 at 128 px).
const STAGES: usize = 4;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AutoencoderSettings {
    /// The network works on the image average-pooled by this factor (1, 2 or 4).
    pub downsample: usize,
    /// Channels of the first encoder stage; later stages double it (at most 4×).
    pub width: usize,
    pub latent_dim: usize,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub batch_size: usize,
    /// σ of the map's Gaussian blur, in input pixels.
    pub blur_sigma: f32,
}

impl Default for AutoencoderSettings {
    fn default() -> Self {
        Self {
            downsample: 4,
            width: 16,
            latent_dim: 100,
            // The cosine decay chosen on validation (ARCHITECTURE.md, "Spending the 10-minute budget").
            schedule: Schedule { final_learning_rate_share: 0.0, ..Schedule::new(128, 2e-3) },
            batch_size: 16,
            blur_sigma: 4.0,
        }
    }
}

impl AutoencoderSettings {
    /// A GPU-length schedule in the range Bergmann et al. train for: 200 epochs at learning rate 2e-4, on their
    /// 128 px inputs.
    pub fn published() -> Self {
        // Constant rate, as the paper trains.
        let schedule = Schedule { final_learning_rate_share: 1.0, ..Self::default().schedule.with(200, 2e-4) };
        Self { downsample: 2, schedule, ..Self::default() }
    }
}

/// The encoder–decoder, channels-last. The decoder ends at half the input side with a convolution to 2·2·3
/// channels that a pixel shuffle (Shi et al. 2016) rearranges into the full-size image: no convolution runs at
/// full resolution, where im2col rows would be 4× as many (the costliest part of a step on a CPU).
pub(crate) struct Network {
    encoder: Vec<Conv>,
    to_latent: Linear,
    from_latent: Linear,
    /// Per stage: the convolution after the ×2 upsampling, then one at the same size.
    decoder: Vec<(Conv, Conv)>,
    output: Conv,
    bottleneck_side: usize,
    bottleneck_channels: usize,
}

/// Channels of encoder/decoder stage `stage` (0 = half the input side): the width doubling per stage, ≤ 4×.
fn stage_channels(width: usize, stage: usize) -> usize {
    width << stage.min(2)
}

impl Network {
    pub(crate) fn new(vb: VarBuilder, side: usize, settings: &AutoencoderSettings) -> Result<Self> {
        let w = settings.width;
        let mut encoder = Vec::new();
        let mut channels = 3;
        for stage in 0..STAGES {
            let out = stage_channels(w, stage);
            encoder.push(Conv::new(vb.pp(format!("encoder{stage}a")), channels, out, 3, 2)?);
            encoder.push(Conv::new(vb.pp(format!("encoder{stage}b")), out, out, 3, 1)?);
            channels = out;
        }
        let bottleneck_channels = w;
        encoder.push(Conv::new(vb.pp("encoder_out"), channels, bottleneck_channels, 3, 1)?);
        let bottleneck_side = side >> STAGES;
        let flat = bottleneck_side * bottleneck_side * bottleneck_channels;
        let to_latent = candle_nn::linear(flat, settings.latent_dim, vb.pp("to_latent"))?;
        let from_latent = candle_nn::linear(settings.latent_dim, flat, vb.pp("from_latent"))?;
        let mut decoder = Vec::new();
        channels = bottleneck_channels;
        // The bottleneck is at stage STAGES − 1's size; each decoder stage doubles the side up to stage 0's.
        for stage in (0..STAGES - 1).rev() {
            let out = stage_channels(w, stage);
            decoder.push((
                Conv::new(vb.pp(format!("decoder{stage}a")), channels, out, 3, 1)?,
                Conv::new(vb.pp(format!("decoder{stage}b")), out, out, 3, 1)?,
            ));
            channels = out;
        }
        let output = Conv::new(vb.pp("output"), channels, 4 * 3, 3, 1)?;
        Ok(Self { encoder, to_latent, from_latent, decoder, output, bottleneck_side, bottleneck_channels })
    }

    /// `(B, S, S, 3)` in [0, 1] → its reconstruction, same shape.
    /// Each pixel's anomaly at the network's size, before the position calibration, on the CPU.
    fn anomaly(&self, input: &Tensor) -> Result<Tensor> {
        let reconstruction = self.forward(input)?;
        Ok(pixel_anomaly(input, &reconstruction)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let mut h = x.clone();
        for conv in &self.encoder {
            h = conv.forward_leaky(&h)?;
        }
        let latent = self.to_latent.forward(&h.reshape((batch, ()))?)?;
        let side = self.bottleneck_side;
        let mut h = linear_leaky(&self.from_latent, &latent)?.reshape((batch, side, side, self.bottleneck_channels))?;
        for (after_upsampling, same_size) in &self.decoder {
            h = after_upsampling.forward_leaky(&upsample2x(&h)?)?;
            h = same_size.forward_leaky(&h)?;
        }
        Ok(candle_nn::ops::sigmoid(&pixel_shuffle(&self.output.forward(&h)?)?)?)
    }
}

pub struct Autoencoder {
    pub(crate) settings: AutoencoderSettings,
    image_size: u32,
    varmap: VarMap,
    network: Network,
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

fn check_settings(settings: &AutoencoderSettings, image_size: u32) -> Result<usize> {
    if ![1, 2, 4].contains(&settings.downsample) {
        bail!("downsample must be 1, 2 or 4, got {}", settings.downsample);
    }
    let side = image_size as usize / settings.downsample;
    if !(image_size as usize).is_multiple_of(settings.downsample) || !side.is_multiple_of(1 << STAGES) {
        bail!(
            "the autoencoder needs image size / downsample to be a multiple of 16 (e.g. 256 / 2 = 128); got {image_size} / {}",
            settings.downsample
        );
    }
    Ok(side)
}

/// `(B, 3, S, S)` images → the network's channels-last input at `S / downsample`.
fn network_input(images: &Tensor, downsample: usize) -> Result<Tensor> {
    let pooled = if downsample > 1 { images.avg_pool2d(downsample)? } else { images.clone() };
    channels_last(&pooled)
}

/// (1 − SSIM) + squared error per pixel, averaged over the colour channels: `(B, S, S)`.
fn pixel_anomaly(input: &Tensor, reconstruction: &Tensor) -> Result<Tensor> {
    let dissimilarity = ssim_map(input, reconstruction)?.affine(-1.0, 1.0)?;
    let error = (input - reconstruction)?.sqr()?;
    Ok((dissimilarity + error)?.mean(3)?)
}

impl Network {
    /// Mean squared error plus (1 − mean SSIM) between a batch and its reconstruction.
    fn training_loss(&self, x: &Tensor) -> Result<Tensor> {
        let reconstruction = self.forward(x)?;
        let l2 = (x - &reconstruction)?.sqr()?.mean_all()?;
        let ssim = mean_ssim(x, &reconstruction)?.mean_all()?;
        Ok((l2 + ssim.affine(-1.0, 1.0)?)?)
    }
}

/// The autoencoder's training step with the default settings on a random `(batch, side, side, 3)` batch.
pub fn bench_step(batch: usize, side: usize, device: &Device) -> Result<BenchStep> {
    let settings = AutoencoderSettings::default();
    if side == 0 || !side.is_multiple_of(1 << STAGES) {
        bail!("the autoencoder's input side must be a multiple of 16, got {side}");
    }
    let varmap = VarMap::new();
    let network = Network::new(VarBuilder::from_varmap(&varmap, DType::F32, device), side, &settings)?;
    let x = Tensor::rand(0f32, 1f32, (batch, side, side, 3), device)?;
    Ok(BenchStep {
        varmap,
        learning_rate: settings.schedule.learning_rate,
        weight_decay: settings.schedule.weight_decay,
        loss: Box::new(move || network.training_loss(&x)),
        geometry: format!("batch {batch}, {side}² input"),
    })
}

impl Autoencoder {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: AutoencoderSettings) -> Result<Self> {
        let side = check_settings(&settings, context.image_size)?;
        if images.is_empty() {
            bail!("the autoencoder needs training images");
        }
        let device = context.device.clone();
        let progress = context.progress;
        // Every training image once, pooled to the network's size and channels-last (761 MTD images at 128²:
        // 150 MB; beyond the store's memory budget, in its temporary file).
        progress.begin("preparing images", images.len() as u64);
        let mut inputs = PerImageTensors::new("autoencoder inputs");
        for chunk in images.all_batches(32) {
            check_cancelled(progress)?;
            let chunk = chunk?;
            inputs.push(&network_input(&images_to_tensor(&chunk, &Device::Cpu)?, settings.downsample)?)?;
            progress.advance(chunk.len() as u64);
        }
        let inputs_of = |chosen: &[usize]| inputs.gather(chosen, &device);
        let varmap = VarMap::new();
        let network = Network::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), side, &settings)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.batch_size, settings.schedule.seed ^ 0xae);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let record =
            train(&varmap, &plan, progress, |_, step| network.training_loss(&inputs_of(batches.batch(step))?))?;
        let count = images.len().min(CALIBRATION_IMAGES);
        progress.begin("calibrating", count as u64);
        let mut maps = Vec::new();
        for first in (0..count).step_by(16) {
            let batch: Vec<usize> = (first..count.min(first + 16)).collect();
            maps.extend(network.anomaly(&inputs_of(&batch)?)?.flatten_all()?.to_vec1::<f32>()?);
            progress.advance(batch.len() as u64);
        }
        let calibration = PositionCalibration::from_maps(&[maps], &[side * side]);
        Ok(Self { settings, image_size: context.image_size, varmap, network, calibration, record })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: AutoencoderSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let side = check_settings(&settings, image_size)?;
        let device = backbone.device.clone();
        let calibration = PositionCalibration::take(&mut tensors, &[side * side])?;
        let varmap =
            load_varmap(tensors, &device, "autoencoder", |vb| Network::new(vb.clone(), side, &settings).map(|_| ()))?;
        let network = Network::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), side, &settings)?;
        Ok(Self { settings, image_size, varmap, network, calibration, record: TrainingRecord::default() })
    }

    /// The reconstruction of a batch `(B, 3, S, S)`, at the network's size, channels-last.
    pub fn reconstruct(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let input = network_input(images, self.settings.downsample)?;
        let reconstruction = self.network.forward(&input)?;
        Ok((input, reconstruction))
    }

    /// Uncalibrated maps `(B, s, s)` on the CPU of network inputs `(B, s, s, 3)`.
    fn raw_maps(&self, input: &Tensor) -> Result<Tensor> {
        self.network.anomaly(input)
    }
}

impl AnomalyModel for Autoencoder {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let maps = self.raw_maps(&network_input(images, self.settings.downsample)?)?;
        let side = maps.dim(1)?;
        let values = maps.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.calibration.outputs(&values, side, self.image_size as usize, self.settings.blur_sigma))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(self.calibration.state()?);
        Ok(state)
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let downsample = self.settings.downsample;
        let side = self.image_size as usize / downsample;
        // `network_input`: pooled, channels-last.
        let pooled = layers::pool(graph, images, downsample, false);
        let input = layers::channels_last(graph, &pooled);
        // `Network::forward`.
        let network = &self.network;
        let mut h = input.clone();
        for conv in &network.encoder {
            h = layers::conv_leaky(graph, &h, conv)?;
        }
        let flat_len = h.dim(1) * h.dim(2) * h.dim(3);
        let flat = graph.ints("shape", &[2], &[0, flat_len as i64]);
        let flat = graph.op("Reshape", &[&h, &flat], vec![]).with_shape(vec![images.shape[0], Some(flat_len)]);
        let latent = layers::linear(graph, &flat, &network.to_latent)?;
        let expanded = layers::linear(graph, &latent, &network.from_latent)?;
        let expanded = layers::leaky_relu(graph, &expanded);
        let (bottleneck, channels) = (network.bottleneck_side, network.bottleneck_channels);
        let grid = graph.ints("shape", &[4], &[0, bottleneck as i64, bottleneck as i64, channels as i64]);
        let mut h = graph.op("Reshape", &[&expanded, &grid], vec![]).with_shape(vec![
            images.shape[0],
            Some(bottleneck),
            Some(bottleneck),
            Some(channels),
        ]);
        for (after_upsampling, same_size) in &network.decoder {
            let upsampled = layers::upsample2x_channels_last(graph, &h);
            let convolved = layers::conv_channels_last(graph, &upsampled, after_upsampling)?;
            let activated = layers::leaky_relu(graph, &convolved);
            let convolved = layers::conv_channels_last(graph, &activated, same_size)?;
            h = layers::leaky_relu(graph, &convolved);
        }
        let output = layers::conv_channels_last(graph, &h, &network.output)?;
        let shuffled = layers::pixel_shuffle(graph, &output);
        let reconstruction = graph.op("Sigmoid", &[&shuffled], vec![]).with_shape(shuffled.shape);
        // `pixel_anomaly`: (1 − SSIM) + squared error, averaged over the colour channels.
        let ssim = layers::ssim_map(graph, &input, &reconstruction);
        let dissimilarity = layers::affine(graph, &ssim, -1.0, 1.0);
        let difference = graph.op("Sub", &[&input, &reconstruction], vec![]);
        let error = graph.op("Mul", &[&difference, &difference], vec![]);
        let total = graph.op("Add", &[&dissimilarity, &error], vec![]);
        let channel_axis = graph.ints("axis", &[1], &[3]);
        let per_pixel = graph.op("ReduceMean", &[&total, &channel_axis], vec![attr_int("keepdims", 0)]);
        let flat = graph.ints("shape", &[2], &[0, (side * side) as i64]);
        let cells =
            graph.op("Reshape", &[&per_pixel, &flat], vec![]).with_shape(vec![images.shape[0], Some(side * side)]);
        let cells = layers::calibrate(graph, &cells, &self.calibration, 0);
        Ok(layers::map_and_score(graph, &cells, side, self.image_size as usize, self.settings.blur_sigma))
    }
}

