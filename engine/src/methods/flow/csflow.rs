//! CS-Flow — Rudolph, Wehrbein, Rosenhahn & Wandt 2022, "Fully Convolutional Cross-Scale-Flows for Image-based
//! Defect Detection" (WACV); reference code: the authors' `cs-flow` and anomalib's `csflow`.
//!
//! One flow over three feature maps at once: the backbone's stride-16 map of the image, of its half and of its
//! quarter. Each coupling block permutes every scale's channels (one fixed permutation per block), splits them
//! in two halves and transforms each half by an affine map whose coefficients come from the other half of *all
//! three scales*: a cross-convolution — per scale a convolution and a LeakyReLU, then per scale a convolution of
//! its own hidden map plus one of the coarser scale's hidden map (bilinearly upsampled) and one of the finer
//! scale's (strided), times a learned factor per scale that starts at zero, so every block starts as the
//! identity. Kernels are 3×3, the last block's 5×5 (as the reference). Trained by maximum likelihood: ½|z|²
//! minus the log-determinant, per dimension, on features computed once (the backbone is frozen).
//!
//! Image score: the mean of ½z² over every position and channel of the three scales (the paper), or the map's
//! maximum (`image_score`). Map: per scale the mean of ½z² over channels at each position, upsampled to the
//! input, averaged over the scales, blurred.
//!
//! Where it differs from the paper: it uses EfficientNet-B5's stride-32 map (304 channels) of 768-pixel
//! images, 1024 hidden channels and 240 epochs on a GPU; here Lite0's stride-16 map (112 channels) of the
//! input size, 64 hidden channels and a CPU schedule. The log-scale's soft clamp is α·tanh(s/α) where the
//! reference has α·0.636·atan(s/α): both bound it by ±α, this one with slope 1 at zero where the reference's
//! has 0.636 (candle has no atan). The LeakyReLU's slope is the shared layers' 0.2 where the reference has 0.1.

use crate::backbone::efficientnet_lite0::STRIDE16_CHANNELS;
use crate::backbone::Backbone;
use crate::dataset::record_store::{RecordStore, PER_IMAGE_VALUES_IN_MEMORY};
use crate::dataset::TrainingImages;
use crate::maps::{half_pixel_source, ScoreMap};
use crate::methods::layers::Conv;
use crate::methods::setting_docs::common;
use crate::methods::statistics::{channel_scale, ColumnMoments, Standardise};
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
    CsFlow,
    CsFlowSettings,
    name: "csflow",
    title: "CS-Flow",
    family: Family::NormalizingFlow,
    summary: "One fully convolutional flow over three scales at once, each coupling looking across scales; likelihood.",
    guide: "Wins on textured surfaces where a defect shows at one scale and not another (the paper's MTD record): the flow sees the image, its half and its quarter together. On 2 CPU cores, MTD (761 training images): fit 8 min 42 s, 34 images/s, image AUROC 0.992 (the best here); its maps localise coarsely (AUPRO 0.30).",
    ranges: ["coupling_blocks": 1..=16, "hidden_channels": 4..=1024, "clamp_alpha": 0.01..=20, "images_per_step": 1..=256],
    docs: [
        "coupling_blocks" => common("Coupling blocks", "", "Cross-scale coupling blocks of the flow: more is more expressive and slower.", false),
        "hidden_channels" => common("Hidden channels", "", "Width of each cross-convolution's hidden layer (the paper: 1024 on a GPU).", true),
        "image_score" => common("Image score", "", "mean: the mean of ½z² over every position of the three scales (the paper); max: the map's maximum.", true),
    ],
    smoke: ({"epochs": 6, "images_per_step": 8} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's schedule and width, for a GPU" => CsFlowSettings::published],
);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CsFlowImageScore {
    /// The mean of ½z² over every position and channel of the three scales (the paper).
    Mean,
    /// The anomaly map's maximum.
    Max,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CsFlowSettings {
    pub coupling_blocks: usize,
    pub hidden_channels: usize,
    /// α of the log-scale's soft clamp α·tanh(s/α).
    pub clamp_alpha: f64,
    pub images_per_step: usize,
    pub image_score: CsFlowImageScore,
    pub blur_sigma: f32,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
}

impl Default for CsFlowSettings {
    fn default() -> Self {
        Self {
            coupling_blocks: 4,
            hidden_channels: 64,
            clamp_alpha: 3.0,
            images_per_step: 16,
            image_score: CsFlowImageScore::Mean,
            blur_sigma: 4.0,
            // 28 epochs fit MTD's 685 training images in 9 minutes on 2 cores; 40 validate slightly better
            // (0.854 against 0.848) and take 13 (ARCHITECTURE.md, "New methods").
            schedule: Schedule::new(28, 1e-3),
        }
    }
}

impl CsFlowSettings {
    /// The paper's schedule: 240 epochs at learning rate 2e-4, 1024 hidden channels.
    pub fn published() -> Self {
        Self { hidden_channels: 1024, schedule: Schedule::new(240, 2e-4), ..Self::default() }
    }
}

const SCALES: usize = 3;
const CHANNELS: usize = STRIDE16_CHANNELS;

/// The sides of the three scales' maps for an input side, and the bilinear upsampling between neighbours.
struct Geometry {
    sides: [usize; SCALES],
    /// Per scale s < 2: `(P_s, P_{s+1})`, bilinear upsampling (half-pixel centres) from scale s+1 to s.
    upsample: Vec<Tensor>,
}

impl Geometry {
    fn new(image_size: u32, dtype: DType, device: &Device) -> Result<Self> {
        let mut input = image_size as usize;
        let mut sides = [0; SCALES];
        for side in &mut sides {
            *side = input.div_ceil(16);
            input /= 2;
        }
        // A stride-2 convolution takes each scale's map to the next one's size: true for every input size but
        // those one more than a multiple of 32 (or 64), where halving the image rounds the other way.
        if sides[SCALES - 1] == 0 || sides.windows(2).any(|pair| pair[0].div_ceil(2) != pair[1]) {
            bail!("CS-Flow cannot use {image_size}-pixel input: its three maps ({sides:?}) must halve exactly (use e.g. 256 or 320)");
        }
        let mut upsample = Vec::new();
        for s in 0..SCALES - 1 {
            let (fine, coarse) = (sides[s], sides[s + 1]);
            let weights = |out: usize| {
                let (low, high, t) = half_pixel_source(out, fine, coarse);
                let mut row = vec![0f32; coarse];
                row[low] += 1.0 - t;
                row[high] += t;
                row
            };
            let one_axis: Vec<Vec<f32>> = (0..fine).map(weights).collect();
            let mut matrix = Vec::with_capacity(fine * fine * coarse * coarse);
            for y in 0..fine {
                for x in 0..fine {
                    for cy in 0..coarse {
                        matrix.extend(one_axis[x].iter().map(|wx| one_axis[y][cy] * wx));
                    }
                }
            }
            upsample.push(Tensor::from_vec(matrix, (fine * fine, coarse * coarse), device)?.to_dtype(dtype)?);
        }
        Ok(Self { sides, upsample })
    }

    fn positions(&self, scale: usize) -> usize {
        self.sides[scale].pow(2)
    }
}

/// The three scales' maps `(B, side, side, 112)`, channels-last.
fn scale_maps(backbone: &Backbone, images: &Tensor) -> Result<Vec<Tensor>> {
    let mut maps = Vec::with_capacity(SCALES);
    let mut scaled = images.clone();
    for scale in 0..SCALES {
        if scale > 0 {
            scaled = scaled.avg_pool2d(2)?;
        }
        maps.push(backbone.features(&scaled)?.stride16.permute((0, 2, 3, 1))?.contiguous()?);
    }
    Ok(maps)
}

/// The sub-network of a cross-scale coupling: from `inputs` channels at three scales to `outputs` at each.
/// Per scale a convolution to the hidden width and a LeakyReLU; then each scale's output is a convolution of its
/// own hidden map, plus one of the coarser scale's upsampled, plus a stride-2 one of the finer scale's, times
/// the scale's gamma. The reference upsamples the coarser hidden map and convolves it at the finer scale; here
/// it is convolved at the coarse scale and the result upsampled (both linear maps of the same inputs; a quarter
/// of the work), in one convolution with the coarse scale's own.
struct CrossConvolution {
    outputs: usize,
    hidden: Vec<Conv>,
    /// Per scale: its own output, and for every scale but the finest also its part of the finer scale's.
    own_and_finer: Vec<Conv>,
    /// Per scale s < 2: a stride-2 convolution of scale s's hidden map, added at scale s+1.
    to_coarser: Vec<Conv>,
    gamma: Tensor,
}

impl CrossConvolution {
    fn new(vb: VarBuilder, inputs: usize, outputs: usize, hidden: usize, kernel: usize) -> Result<Self> {
        let conv = |name: String, inputs: usize, outputs: usize, stride: usize| {
            Conv::new(vb.pp(name), inputs, outputs, kernel, stride)
        };
        Ok(Self {
            outputs,
            hidden: (0..SCALES).map(|s| conv(format!("hidden{s}"), inputs, hidden, 1)).collect::<Result<_>>()?,
            own_and_finer: (0..SCALES)
                .map(|s| conv(format!("out{s}"), hidden, if s == 0 { outputs } else { 2 * outputs }, 1))
                .collect::<Result<_>>()?,
            to_coarser: (0..SCALES - 1).map(|s| conv(format!("down{s}"), hidden, outputs, 2)).collect::<Result<_>>()?,
            gamma: vb.get_with_hints(SCALES, "gamma", candle_nn::Init::Const(0.0))?,
        })
    }

    /// Each scale's output map `(B, side_s, side_s, outputs)` from its input map `(B, side_s, side_s, inputs)`.
    fn forward(&self, maps: &[Tensor], geometry: &Geometry) -> Result<Vec<Tensor>> {
        let hidden = maps.iter().zip(&self.hidden).map(|(m, conv)| conv.forward_leaky(m)).collect::<Result<Vec<_>>>()?;
        let own_and_finer =
            hidden.iter().zip(&self.own_and_finer).map(|(h, conv)| conv.forward(h)).collect::<Result<Vec<_>>>()?;
        let mut outputs = Vec::with_capacity(SCALES);
        for s in 0..SCALES {
            let mut out = own_and_finer[s].narrow(3, 0, self.outputs)?;
            if s + 1 < SCALES {
                let coarse = own_and_finer[s + 1].narrow(3, self.outputs, self.outputs)?;
                let batch = coarse.dim(0)?;
                let coarse = coarse.reshape((batch, geometry.positions(s + 1), self.outputs))?;
                let up = geometry.upsample[s].broadcast_matmul(&coarse)?;
                let up = up.reshape(out.shape())?;
                out = (out + up)?;
            }
            if s > 0 {
                out = (out + self.to_coarser[s - 1].forward(&hidden[s - 1])?)?;
            }
            outputs.push(out.broadcast_mul(&self.gamma.narrow(0, s, 1)?)?);
        }
        Ok(outputs)
    }
}

impl CrossConvolution {
    /// Records [`Self::forward`].
    fn record(&self, graph: &mut Graph, maps: &[Value], geometry: &Geometry) -> Result<Vec<Value>> {
        let hidden =
            maps.iter().zip(&self.hidden).map(|(m, conv)| layers::conv_leaky(graph, m, conv)).collect::<Result<Vec<_>, _>>()?;
        let own_and_finer = hidden
            .iter()
            .zip(&self.own_and_finer)
            .map(|(h, conv)| layers::conv_channels_last(graph, h, conv))
            .collect::<Result<Vec<_>, _>>()?;
        let gamma: Vec<f32> = self.gamma.to_device(&Device::Cpu)?.to_vec1()?;
        let mut outputs = Vec::with_capacity(SCALES);
        for s in 0..SCALES {
            let mut out = layers::slice(graph, &own_and_finer[s], 3, 0, self.outputs);
            if s + 1 < SCALES {
                let coarse = layers::slice(graph, &own_and_finer[s + 1], 3, self.outputs, self.outputs);
                let rows = graph.ints("shape", &[3], &[0, geometry.positions(s + 1) as i64, self.outputs as i64]);
                let coarse = graph.op("Reshape", &[&coarse, &rows], vec![]);
                let matrix: Vec<f32> = geometry.upsample[s].to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
                let matrix = graph.floats("upsample", &[geometry.positions(s), geometry.positions(s + 1)], &matrix);
                let up = graph.op("MatMul", &[&matrix, &coarse], vec![]);
                let side = geometry.sides[s] as i64;
                let map = graph.ints("shape", &[4], &[0, side, side, self.outputs as i64]);
                let up = graph.op("Reshape", &[&up, &map], vec![]);
                out = graph.op("Add", &[&out, &up], vec![]).with_shape(out.shape.clone());
            }
            if s > 0 {
                let finer = layers::conv_channels_last(graph, &hidden[s - 1], &self.to_coarser[s - 1])?;
                out = graph.op("Add", &[&out, &finer], vec![]).with_shape(out.shape.clone());
            }
            let gamma = graph.scalar("gamma", gamma[s]);
            outputs.push(graph.op("Mul", &[&out, &gamma], vec![]).with_shape(out.shape.clone()));
        }
        Ok(outputs)
    }
}

/// One cross-scale coupling block: a fixed channel permutation, then the first half of every scale's channels
/// transformed from the second halves, then the second from the transformed first halves.
struct CrossScaleCoupling {
    permutation: Tensor,
    channels: usize,
    split: usize,
    clamp: f64,
    to_first: CrossConvolution,
    to_second: CrossConvolution,
}

impl CrossScaleCoupling {
    fn new(vb: VarBuilder, channels: usize, hidden: usize, kernel: usize, clamp: f64, seed: u64) -> Result<Self> {
        let split = channels / 2;
        let rest = channels - split;
        Ok(Self {
            permutation: Tensor::from_vec(super::permutation(channels, seed), channels, vb.device())?,
            channels,
            split,
            clamp,
            to_first: CrossConvolution::new(vb.pp("to_first"), rest, 2 * split, hidden, kernel)?,
            to_second: CrossConvolution::new(vb.pp("to_second"), split, 2 * rest, hidden, kernel)?,
        })
    }

    /// `half · exp(log_scale) + shift` with the soft-clamped log-scale, and the log-scale summed per image.
    fn affine(&self, half: &Tensor, coefficients: &Tensor, batch: usize) -> Result<(Tensor, Tensor)> {
        let width = half.dim(3)?;
        let log_scale = ((coefficients.narrow(3, 0, width)? / self.clamp)?.tanh()? * self.clamp)?;
        let shift = coefficients.narrow(3, width, width)?;
        let out = (half * log_scale.exp()?)?.add(&shift)?;
        Ok((out, log_scale.reshape((batch, ()))?.sum(1)?))
    }

    /// Records [`Self::affine`]'s output (scoring needs no log-determinant).
    fn record_affine(&self, graph: &mut Graph, half: &Value, coefficients: &Value) -> Value {
        let width = half.dim(3);
        let raw = layers::slice(graph, coefficients, 3, 0, width);
        let bounded = layers::affine(graph, &raw, 1.0 / self.clamp as f32, 0.0);
        let bounded = graph.op("Tanh", &[&bounded], vec![]);
        let log_scale = layers::affine(graph, &bounded, self.clamp as f32, 0.0);
        let factor = graph.op("Exp", &[&log_scale], vec![]);
        let scaled = graph.op("Mul", &[half, &factor], vec![]);
        let shift = layers::slice(graph, coefficients, 3, width, width);
        graph.op("Add", &[&scaled, &shift], vec![]).with_shape(half.shape.clone())
    }

    /// Records [`Self::forward`]'s maps.
    fn record(&self, graph: &mut Graph, maps: &[Value], geometry: &Geometry) -> Result<Vec<Value>> {
        let order: Vec<i64> = self.permutation.to_device(&Device::Cpu)?.to_vec1::<u32>()?.into_iter().map(i64::from).collect();
        let order = graph.ints("permutation", &[order.len()], &order);
        let permuted: Vec<Value> = maps
            .iter()
            .map(|x| graph.op("Gather", &[x, &order], vec![attr_int("axis", 3)]).with_shape(x.shape.clone()))
            .collect();
        let rest = self.channels - self.split;
        let first: Vec<Value> = permuted.iter().map(|x| layers::slice(graph, x, 3, 0, self.split)).collect();
        let second: Vec<Value> = permuted.iter().map(|x| layers::slice(graph, x, 3, self.split, rest)).collect();
        let coefficients = self.to_first.record(graph, &second, geometry)?;
        let new_first: Vec<Value> =
            first.iter().zip(&coefficients).map(|(half, c)| self.record_affine(graph, half, c)).collect();
        let coefficients = self.to_second.record(graph, &new_first, geometry)?;
        Ok(second
            .iter()
            .zip(&coefficients)
            .zip(&new_first)
            .map(|((half, c), done)| {
                let out = self.record_affine(graph, half, c);
                layers::concat(graph, &[done, &out], 3)
            })
            .collect())
    }

    /// Each scale's map `(B, side, side, C)` transformed, and the log-determinant per image `(B,)`.
    fn forward(&self, maps: &[Tensor], geometry: &Geometry) -> Result<(Vec<Tensor>, Tensor)> {
        let batch = maps[0].dim(0)?;
        let permuted = maps.iter().map(|x| Ok(x.index_select(&self.permutation, 3)?)).collect::<Result<Vec<_>>>()?;
        let first: Vec<Tensor> = permuted.iter().map(|x| x.narrow(3, 0, self.split)).collect::<Result<_, _>>()?;
        let second: Vec<Tensor> =
            permuted.iter().map(|x| x.narrow(3, self.split, self.channels - self.split)).collect::<Result<_, _>>()?;
        let mut log_det = Tensor::zeros(batch, maps[0].dtype(), maps[0].device())?;
        let coefficients = self.to_first.forward(&second, geometry)?;
        let mut new_first = Vec::with_capacity(SCALES);
        for (half, c) in first.iter().zip(&coefficients) {
            let (out, scale_log_det) = self.affine(half, c, batch)?;
            new_first.push(out);
            log_det = (log_det + scale_log_det)?;
        }
        let coefficients = self.to_second.forward(&new_first, geometry)?;
        let mut outputs = Vec::with_capacity(SCALES);
        for ((half, c), done) in second.iter().zip(&coefficients).zip(&new_first) {
            let (out, scale_log_det) = self.affine(half, c, batch)?;
            outputs.push(Tensor::cat(&[done, &out], 3)?);
            log_det = (log_det + scale_log_det)?;
        }
        Ok((outputs, log_det))
    }
}

struct CrossScaleFlow {
    blocks: Vec<CrossScaleCoupling>,
}

impl CrossScaleFlow {
    fn new(vb: VarBuilder, channels: usize, settings: &CsFlowSettings) -> Result<Self> {
        let count = settings.coupling_blocks;
        let blocks = (0..count)
            .map(|k| {
                let kernel = if k + 1 == count { 5 } else { 3 };
                let seed = settings.schedule.seed ^ (0xc5f1 + k as u64);
                CrossScaleCoupling::new(vb.pp(format!("block{k}")), channels, settings.hidden_channels, kernel, settings.clamp_alpha, seed)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// `z` per scale (maps `(B, side, side, C)`) and the summed log-determinant per image.
    fn forward(&self, maps: &[Tensor], geometry: &Geometry) -> Result<(Vec<Tensor>, Tensor)> {
        let mut z = maps.to_vec();
        let mut log_det = Tensor::zeros(maps[0].dim(0)?, maps[0].dtype(), maps[0].device())?;
        for block in &self.blocks {
            let (next, block_log_det) = block.forward(&z, geometry)?;
            z = next;
            log_det = (log_det + block_log_det)?;
        }
        Ok((z, log_det))
    }
}

pub struct CsFlow {
    backbone: Arc<Backbone>,
    settings: CsFlowSettings,
    image_size: u32,
    varmap: VarMap,
    flow: CrossScaleFlow,
    geometry: Geometry,
    standardise: Vec<Standardise>,
    pub record: TrainingRecord,
}

/// Every scale's map standardised per channel.
fn standardised(maps: &[Tensor], standardise: &[Standardise]) -> Result<Vec<Tensor>> {
    maps.iter().zip(standardise).map(|(map, standardise)| standardise.apply(map)).collect()
}

impl CsFlow {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: CsFlowSettings) -> Result<Self> {
        if images.len() < 2 {
            bail!("CS-Flow needs at least two training images, got {}", images.len());
        }
        let device = context.device.clone();
        let geometry = Geometry::new(context.image_size, DType::F32, &device)?;
        let progress = context.progress;
        progress.begin("features of three scales", images.len() as u64);
        let record_len: usize = (0..SCALES).map(|s| geometry.positions(s) * CHANNELS).sum();
        let mut features = RecordStore::new("CS-Flow training features", record_len, PER_IMAGE_VALUES_IN_MEMORY);
        let mut moments: Vec<ColumnMoments> = (0..SCALES).map(|_| ColumnMoments::new(CHANNELS)).collect();
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let maps = scale_maps(&context.backbone, &images_to_tensor(&batch, &device)?)?;
            let host: Vec<Vec<f32>> =
                maps.iter().map(|m| Ok(m.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)).collect::<Result<_>>()?;
            let mut record = Vec::with_capacity(record_len);
            for image in 0..batch.len() {
                record.clear();
                for (s, values) in host.iter().enumerate() {
                    let len = geometry.positions(s) * CHANNELS;
                    let part = &values[image * len..][..len];
                    moments[s].add(part);
                    record.extend_from_slice(part);
                }
                features.extend(&record)?;
            }
            progress.advance(batch.len() as u64);
        }
        let standardise =
            moments.iter().map(|m| m.standardise(channel_scale, &device)).collect::<Result<Vec<_>>>()?;
        let varmap = VarMap::new();
        let flow = CrossScaleFlow::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), CHANNELS, &settings)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, settings.schedule.seed ^ 0xc5);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let dims = record_len as f64;
        let record = train(&varmap, &plan, progress, |_, step| {
            let chosen = batches.batch(step).to_vec();
            let batch = chosen.len();
            let all = Tensor::from_vec(features.gather(&chosen)?, (batch, record_len), &device)?;
            let mut offset = 0;
            let mut maps = Vec::with_capacity(SCALES);
            for s in 0..SCALES {
                let len = geometry.positions(s) * CHANNELS;
                maps.push(all.narrow(1, offset, len)?.reshape((batch, geometry.sides[s], geometry.sides[s], CHANNELS))?);
                offset += len;
            }
            let (z, log_det) = flow.forward(&standardised(&maps, &standardise)?, &geometry)?;
            let mut half_squares = Tensor::zeros(batch, DType::F32, &device)?;
            for zs in &z {
                half_squares = (half_squares + (zs.sqr()?.reshape((batch, ()))?.sum(1)? * 0.5)?)?;
            }
            Ok(((half_squares - log_det)? / dims)?.mean_all()?)
        })?;
        let backbone = context.backbone.clone();
        Ok(Self { backbone, settings, image_size: context.image_size, varmap, flow, geometry, standardise, record })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: CsFlowSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let device = backbone.device.clone();
        let geometry = Geometry::new(image_size, DType::F32, &device)?;
        let standardise = (0..SCALES)
            .map(|s| Standardise::take(&mut tensors, &format!("standardise.scale{s}"), CHANNELS, &device))
            .collect::<Result<Vec<_>>>()?;
        let build = |vb: &VarBuilder| CrossScaleFlow::new(vb.clone(), CHANNELS, &settings).map(|_| ());
        let varmap = load_varmap(tensors, &device, "CS-Flow", build)?;
        let flow = CrossScaleFlow::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), CHANNELS, &settings)?;
        let record = TrainingRecord::default();
        Ok(Self { backbone, settings, image_size, varmap, flow, geometry, standardise, record })
    }
}

impl AnomalyModel for CsFlow {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let batch = images.dim(0)?;
        let maps = standardised(&scale_maps(&self.backbone, images)?, &self.standardise)?;
        let (z, _) = self.flow.forward(&maps, &self.geometry)?;
        // Per scale, ½z² averaged over channels at each position: `(B, P_s)` on the host.
        let cells = z
            .iter()
            .map(|zs| Ok((zs.sqr()?.mean(3)? * 0.5)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let size = self.image_size as usize;
        let total_positions: usize = (0..SCALES).map(|s| self.geometry.positions(s)).sum();
        Ok((0..batch)
            .map(|b| {
                let mut sum = vec![0f32; size * size];
                let mut mean = 0f64;
                for (s, cells) in cells.iter().enumerate() {
                    let (side, positions) = (self.geometry.sides[s], self.geometry.positions(s));
                    let image_cells = cells[b * positions..(b + 1) * positions].to_vec();
                    mean += image_cells.iter().map(|&v| v as f64).sum::<f64>();
                    let map = ScoreMap::new(side, side, image_cells).resized(size, size);
                    sum.iter_mut().zip(&map.data).for_each(|(t, v)| *t += v / SCALES as f32);
                }
                let map = ScoreMap::new(size, size, sum).blurred(self.settings.blur_sigma);
                let score = match self.settings.image_score {
                    CsFlowImageScore::Mean => (mean / total_positions as f64) as f32,
                    CsFlowImageScore::Max => map.max(),
                };
                AnomalyOutput { score, map }
            })
            .collect())
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        // The three scales' standardised stride-16 maps, channels-last, as `scale_maps`.
        let mut z = Vec::with_capacity(SCALES);
        let mut scaled = images.clone();
        for (s, standardise) in self.standardise.iter().enumerate() {
            if s > 0 {
                scaled = layers::pool(graph, &scaled, 2, false);
            }
            let (_, stride16) = layers::backbone_features(graph, &self.backbone, &scaled)?;
            let map = layers::channels_last(graph, &stride16);
            z.push(layers::standardise(graph, &map, standardise)?);
        }
        for block in &self.flow.blocks {
            z = block.record(graph, &z, &self.geometry)?;
        }
        // Per scale ½z² averaged over the channels, resized to the input and averaged over the scales; blurred.
        let channels = graph.ints("axis", &[1], &[-1]);
        let mut cells = Vec::with_capacity(SCALES);
        let mut total: Option<Value> = None;
        for (s, zs) in z.iter().enumerate() {
            let squared = graph.op("Mul", &[zs, zs], vec![]);
            let mean = graph.op("ReduceMean", &[&squared, &channels], vec![attr_int("keepdims", 0)]);
            let side = self.geometry.sides[s];
            let flat = graph.ints("shape", &[2], &[0, (side * side) as i64]);
            let mean = graph.op("Reshape", &[&mean, &flat], vec![]).with_shape(vec![images.shape[0], Some(side * side)]);
            let scale_cells = layers::affine(graph, &mean, 0.5, 0.0);
            let cells_sum = graph.op("ReduceSum", &[&scale_cells, &channels], vec![attr_int("keepdims", 0)]);
            total = Some(match total {
                None => cells_sum,
                Some(previous) => graph.op("Add", &[&previous, &cells_sum], vec![]),
            });
            cells.push((scale_cells, side));
        }
        let mean = layers::mean_of_resized(graph, &cells, self.image_size as usize);
        let map = layers::blur(graph, &mean, self.settings.blur_sigma);
        let score = match self.settings.image_score {
            CsFlowImageScore::Max => layers::max_score(graph, &map),
            CsFlowImageScore::Mean => {
                let positions: usize = (0..SCALES).map(|s| self.geometry.positions(s)).sum();
                let total = total.expect("three scales");
                layers::affine(graph, &total, 1.0 / positions as f32, 0.0).with_shape(vec![images.shape[0]])
            }
        };
        Ok(RecordedScores { map, score })
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        for (s, standardise) in self.standardise.iter().enumerate() {
            state.extend(standardise.state(&format!("standardise.scale{s}"))?);
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scales_halve_and_the_upsampling_matrix_is_bilinear() {
        let geometry = Geometry::new(256, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(geometry.sides, [16, 8, 4]);
        // A constant coarse map upsamples to the same constant: every row of the matrix sums to one.
        let sums = geometry.upsample[0].sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
        // The matrix does what ScoreMap's bilinear resize does.
        let coarse: Vec<f32> = (0..64).map(|i| ((i * 37) % 11) as f32).collect();
        let expected = ScoreMap::new(8, 8, coarse.clone()).resized(16, 16).data;
        let column = Tensor::from_vec(coarse, (64, 1), &Device::Cpu).unwrap();
        let got = geometry.upsample[0].matmul(&column).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(got.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-5));
        // 96-pixel input: 6, 3 and 2 halve (with rounding up) as a stride-2 convolution does; 33 does not.
        assert_eq!(Geometry::new(96, DType::F32, &Device::Cpu).unwrap().sides, [6, 3, 2]);
        assert!(Geometry::new(33, DType::F32, &Device::Cpu).is_err());
    }

    #[test]
    fn a_fresh_flow_is_the_identity_and_the_log_determinant_matches_the_jacobian() {
        // Four channels at a 64-pixel input (4×4, 2×2 and 1×1 maps): 84 dimensions, small enough for the
        // finite-difference Jacobian of the whole flow, in f64.
        let (device, channels) = (Device::Cpu, 4);
        let geometry = Geometry::new(64, DType::F64, &device).unwrap();
        let settings = CsFlowSettings { coupling_blocks: 2, hidden_channels: 6, ..CsFlowSettings::default() };
        let varmap = VarMap::new();
        let flow = CrossScaleFlow::new(VarBuilder::from_varmap(&varmap, DType::F64, &device), channels, &settings)
            .unwrap();
        let sizes: Vec<usize> = (0..SCALES).map(|s| geometry.positions(s) * channels).collect();
        let total: usize = sizes.iter().sum();
        let run = |x: &[f64]| -> (Vec<f64>, f64) {
            let mut offset = 0;
            let maps: Vec<Tensor> = (0..SCALES)
                .map(|s| {
                    let part = &x[offset..offset + sizes[s]];
                    offset += sizes[s];
                    let side = geometry.sides[s];
                    Tensor::from_slice(part, (1, side, side, channels), &device).unwrap()
                })
                .collect();
            let (z, log_det) = flow.forward(&maps, &geometry).unwrap();
            let z = z.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect();
            (z, log_det.to_vec1::<f64>().unwrap()[0])
        };
        let x: Vec<f64> = (0..total).map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0).collect();
        // The gammas start at zero: a fresh flow only permutes channels.
        let (z, log_det) = run(&x);
        assert_eq!(log_det, 0.0);
        let square_sum = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!((square_sum(&z) - square_sum(&x)).abs() < 1e-9);
        for var in varmap.all_vars() {
            if var.dims() == [SCALES] {
                var.set(&Tensor::new(&[0.7f64, -0.4, 0.9], &device).unwrap()).unwrap();
            }
        }
        let (_, log_det) = run(&x);
        let h = 1e-6;
        let mut jacobian = nalgebra::DMatrix::<f64>::zeros(total, total);
        for j in 0..total {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus[j] += h;
            minus[j] -= h;
            let (zp, _) = run(&plus);
            let (zm, _) = run(&minus);
            for i in 0..total {
                jacobian[(i, j)] = (zp[i] - zm[i]) / (2.0 * h);
            }
        }
        let expected = jacobian.determinant().abs().ln();
        assert!(log_det.abs() > 0.1, "the gammas make the flow non-trivial: {log_det}");
        assert!((log_det - expected).abs() < 1e-5, "log det {log_det} vs finite differences {expected}");
    }
}
