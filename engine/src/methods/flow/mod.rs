//! Normalizing-flow methods: a flow maps normal features to a standard Gaussian; the negative log-likelihood of a
//! feature under it is its anomaly score. Shared here: the affine coupling block (FrEIA's "all-in-one" block as
//! the reference implementations use it), the Gaussian log-likelihood, and the training loop (AdamW, progress,
//! cancel that keeps the best epoch).

family_methods!(fastflow, cflow, differnet, csflow);

use crate::backbone::efficientnet_lite0::{STRIDE16_CHANNELS, STRIDE8_CHANNELS};
use crate::backbone::Backbone;
use crate::dataset::record_store::{RecordStore, PER_IMAGE_VALUES_IN_MEMORY};
use crate::dataset::TrainingImages;
use crate::maps::ScoreMap;
use crate::methods::calibration::{PositionCalibration, CALIBRATION_IMAGES};
use crate::methods::statistics::{channel_scale, ColumnMoments, Standardise};
use crate::methods::{images_to_tensor, AnomalyOutput, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::{check_cancelled, Progress};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use std::collections::HashMap;

/// ln √(2π).
const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_7;
/// softplus_β(raw) · 0.1 with β = ½ is 1 at this raw value: the global scale starts as the identity.
const GLOBAL_SCALE_IDENTITY: f64 = 9.986_6;

/// A fixed permutation of `dim` channels from `seed` (Fisher–Yates on SplitMix64).
pub fn permutation(dim: usize, seed: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..dim as u32).collect();
    let mut rng = crate::rng::SplitMix64::new(seed ^ 0x51f1_0a3e);
    for i in (1..dim).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// The part of an affine coupling block that does not depend on how the coefficients are predicted: the second
/// half of the channels is scaled by exp(α·tanh(s)) and shifted by t (`a` holds s and t, scaled by 0.1 as in
/// FrEIA's all-in-one block), then a learned per-channel affine map (softplus scale) and a fixed permutation, so
/// every channel is transformed by some later block. Works on rows `(N, D)`.
pub struct AffineTail {
    clamp: f64,
    global_scale: Tensor,
    global_offset: Tensor,
    permutation: Tensor,
}

impl AffineTail {
    pub fn new(vb: &VarBuilder, dim: usize, clamp: f64, seed: u64) -> Result<Self> {
        let global_scale = vb.get_with_hints(dim, "global_scale", candle_nn::Init::Const(GLOBAL_SCALE_IDENTITY))?;
        let global_offset = vb.get_with_hints(dim, "global_offset", candle_nn::Init::Const(0.0))?;
        let permutation = Tensor::from_vec(permutation(dim, seed), dim, vb.device())?;
        Ok(Self { clamp, global_scale, global_offset, permutation })
    }

    /// The global scale: 0.1 · softplus_½(raw) = 0.2 · ln(1 + exp(raw / 2)).
    fn scale(&self) -> Result<Tensor> {
        Ok((((&self.global_scale * 0.5)?.exp()? + 1.0)?.log()? * 0.2)?)
    }

    /// Records [`Self::apply`] along the last axis (rows `(N, P, d)` or maps `(N, H, W, d)`): the global scale and its log-determinant are
    /// constants of the export, computed by the same candle expression.
    pub fn record(&self, graph: &mut Graph, x1: &Value, x2: &Value, a: &Value) -> Result<(Value, Value)> {
        let last_axis = x2.shape.len() - 1;
        let rest = x2.dim(last_axis);
        let tenth = graph.scalar("tenth", 0.1);
        let a = graph.op("Mul", &[a, &tenth], vec![]).with_shape(a.shape.clone());
        let raw_log_scale = layers::slice(graph, &a, last_axis, 0, rest);
        let bounded = graph.op("Tanh", &[&raw_log_scale], vec![]);
        let clamp = graph.scalar("clamp", self.clamp as f32);
        let log_scale = graph.op("Mul", &[&bounded, &clamp], vec![]);
        let factor = graph.op("Exp", &[&log_scale], vec![]);
        let scaled = graph.op("Mul", &[x2, &factor], vec![]);
        let shift = layers::slice(graph, &a, last_axis, rest, rest);
        let y2 = graph.op("Add", &[&scaled, &shift], vec![]).with_shape(x2.shape.clone());
        let scale = self.scale()?;
        let scale_log_sum = scale.log()?.sum_all()?.to_device(&Device::Cpu)?.to_scalar::<f32>()?;
        let last = graph.ints("axis", &[1], &[-1]);
        let log_scale_sum = graph.op("ReduceSum", &[&log_scale, &last], vec![attr_int("keepdims", 0)]);
        let constant = graph.scalar("scale_log_sum", scale_log_sum);
        let log_det = graph.op("Add", &[&log_scale_sum, &constant], vec![]);
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?) };
        let dim = scale.elem_count();
        let scale = graph.floats("global_scale", &[dim], &flat(&scale)?);
        let offset = graph.floats("global_offset", &[dim], &flat(&self.global_offset)?);
        let joined = layers::concat(graph, &[x1, &y2], last_axis);
        let scaled = graph.op("Mul", &[&joined, &scale], vec![]);
        let y = graph.op("Add", &[&scaled, &offset], vec![]);
        let order: Vec<i64> =
            self.permutation.to_device(&Device::Cpu)?.to_vec1::<u32>()?.into_iter().map(i64::from).collect();
        let order = graph.ints("permutation", &[dim], &order);
        let permuted =
            graph.op("Gather", &[&y, &order], vec![attr_int("axis", last_axis as i64)]).with_shape(joined.shape);
        Ok((permuted, log_det))
    }

    /// `(y, log|det J|)` per row, from the unchanged half `x1`, the transformed half `x2` and the predicted `a`.
    pub fn apply(&self, x1: &Tensor, x2: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        let rest = x2.dim(1)?;
        let a = (a * 0.1)?;
        let log_scale = (a.narrow(1, 0, rest)?.tanh()? * self.clamp)?;
        let y2 = x2.mul(&log_scale.exp()?)?.add(&a.narrow(1, rest, rest)?)?;
        let scale = self.scale()?;
        let log_det = log_scale.sum(1)?.broadcast_add(&scale.log()?.sum_all()?)?;
        let y = Tensor::cat(&[x1, &y2], 1)?.broadcast_mul(&scale)?.broadcast_add(&self.global_offset)?;
        Ok((y.index_select(&self.permutation, 1)?, log_det))
    }
}

/// One affine coupling block on feature vectors `(N, D)` with an optional condition `(N, C)`; the coefficients
/// come from a two-layer perceptron of the first half (and the condition).
pub struct VectorCoupling {
    split: usize,
    first: Linear,
    second: Linear,
    tail: AffineTail,
}

impl VectorCoupling {
    pub fn new(vb: VarBuilder, dim: usize, condition_dim: usize, clamp: f64, seed: u64) -> Result<Self> {
        let split = dim / 2;
        let inputs = split + condition_dim;
        let hidden = 2 * inputs;
        let first = candle_nn::linear(inputs, hidden, vb.pp("first"))?;
        let second = candle_nn::linear(hidden, 2 * (dim - split), vb.pp("second"))?;
        let tail = AffineTail::new(&vb, dim, clamp, seed)?;
        Ok(Self { split, first, second, tail })
    }

    /// `(y, log|det J|)` with the log-determinant per row.
    pub fn forward(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let dim = x.dim(1)?;
        let x1 = x.narrow(1, 0, self.split)?;
        let x2 = x.narrow(1, self.split, dim - self.split)?;
        let input = match condition {
            Some(c) => Tensor::cat(&[&x1, c], 1)?,
            None => x1.clone(),
        };
        let a = self.second.forward(&self.first.forward(&input)?.relu()?)?;
        self.tail.apply(&x1, &x2, &a)
    }
}

/// A chain of coupling blocks: `x ↦ z` with the summed log-determinant.
pub struct VectorFlow {
    blocks: Vec<VectorCoupling>,
    dim: usize,
}

impl VectorFlow {
    pub fn new(vb: VarBuilder, dim: usize, condition_dim: usize, blocks: usize, clamp: f64, seed: u64) -> Result<Self> {
        let blocks = (0..blocks)
            .map(|k| VectorCoupling::new(vb.pp(format!("block{k}")), dim, condition_dim, clamp, seed + k as u64))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks, dim })
    }

    /// Records [`Self::log_likelihood_per_dim`] on rows `(N, P, d)` with a condition `(P, c)` shared by every
    /// image: `(N, P)`.
    pub fn record_log_likelihood_per_dim(
        &self,
        graph: &mut Graph,
        x: &Value,
        condition: Option<&Value>,
    ) -> Result<Value> {
        let condition = condition.map(|c| {
            // The same code for every image: broadcast to (N, P, c) from x's batch.
            let shape = graph.op("Shape", &[x], vec![]);
            let starts = graph.ints("start", &[1], &[0]);
            let ends = graph.ints("end", &[1], &[1]);
            let batch = graph.op("Slice", &[&shape, &starts, &ends], vec![]);
            let rest = graph.ints("shape", &[2], &[c.dim(0) as i64, c.dim(1) as i64]);
            let target = graph.op("Concat", &[&batch, &rest], vec![attr_int("axis", 0)]);
            graph.op("Expand", &[c, &target], vec![]).with_shape(vec![x.shape[0], c.shape[0], c.shape[1]])
        });
        let mut z = x.clone();
        let mut log_det: Option<Value> = None;
        for block in &self.blocks {
            let dim = z.dim(2);
            let x1 = layers::slice(graph, &z, 2, 0, block.split);
            let x2 = layers::slice(graph, &z, 2, block.split, dim - block.split);
            let input = match &condition {
                Some(c) => layers::concat(graph, &[&x1, c], 2),
                None => x1.clone(),
            };
            let hidden = layers::linear(graph, &input, &block.first)?;
            let hidden = graph.op("Relu", &[&hidden], vec![]).with_shape(hidden.shape);
            let a = layers::linear(graph, &hidden, &block.second)?;
            let (y, block_log_det) = block.tail.record(graph, &x1, &x2, &a)?;
            z = y;
            log_det = Some(match log_det {
                None => block_log_det,
                Some(total) => graph.op("Add", &[&total, &block_log_det], vec![]),
            });
        }
        Ok(record_per_dim(graph, &z, log_det, self.dim).with_shape(vec![x.shape[0], x.shape[1]]))
    }

    /// Log-likelihood of each row under the flow, divided by the dimension (comparable across levels).
    pub fn log_likelihood_per_dim(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let mut z = x.clone();
        let mut log_det = Tensor::zeros(x.dim(0)?, DType::F32, x.device())?;
        for block in &self.blocks {
            let (y, block_log_det) = block.forward(&z, condition)?;
            z = y;
            log_det = (log_det + block_log_det)?;
        }
        let gaussian = gaussian_log_density(&z)?;
        Ok(((gaussian + log_det)? / self.dim as f64)?)
    }
}

/// log N(z; 0, I) of each row of `z`.
pub fn gaussian_log_density(z: &Tensor) -> Result<Tensor> {
    let dim = z.dim(1)?;
    Ok(((z.sqr()?.sum(1)? * -0.5)? - LN_SQRT_2PI * dim as f64)?)
}

/// Channels of the two backbone levels both flows model (stride 8 and stride 16).
pub const LEVEL_CHANNELS: [usize; 2] = [STRIDE8_CHANNELS, STRIDE16_CHANNELS];
const LEVEL_STRIDES: [usize; 2] = [8, 16];

/// Positions of each level's feature map for `image_size` inputs.
pub fn level_positions(image_size: u32) -> Vec<usize> {
    (0..LEVEL_CHANNELS.len()).map(|level| level_side(image_size, level).pow(2)).collect()
}

/// Side of a level's square feature map for `image_size` inputs.
pub fn level_side(image_size: u32, level: usize) -> usize {
    (image_size as usize).div_ceil(LEVEL_STRIDES[level])
}

/// Per level, a batch's feature maps as channels-last rows `(B·H·W, C)`, image-major then row-major; with
/// `local`, each map is first averaged over 3×3 neighbourhoods (PatchCore's locally aware features).
pub fn level_rows(backbone: &Backbone, images: &Tensor, local: bool) -> Result<[Tensor; 2]> {
    let maps = backbone.features(images)?;
    let rows = |map: &Tensor| -> Result<Tensor> {
        let map = if local { crate::methods::features::local_average(map)? } else { map.clone() };
        let (b, c, h, w) = map.dims4()?;
        Ok(map.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?)
    };
    Ok([rows(&maps.stride8)?, rows(&maps.stride16)?])
}

/// Every training image's rows per level, one record of `positions × channels` values per image (computed once:
/// the backbone is frozen; beyond the stores' memory budget, in their temporary files).
pub fn training_rows(context: &FitContext, images: &TrainingImages, local: bool) -> Result<[RecordStore<f32>; 2]> {
    let progress = context.progress;
    progress.begin("features", images.len() as u64);
    let positions = level_positions(context.image_size);
    let mut rows = [0, 1].map(|level| {
        RecordStore::new("flow training features", positions[level] * LEVEL_CHANNELS[level], PER_IMAGE_VALUES_IN_MEMORY)
    });
    for batch in images.all_batches(context.batch_size) {
        check_cancelled(progress)?;
        let batch = batch?;
        for (level, tensor) in
            level_rows(&context.backbone, &images_to_tensor(&batch, &context.device)?, local)?.iter().enumerate()
        {
            rows[level].extend(&tensor.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)?;
        }
        progress.advance(batch.len() as u64);
    }
    Ok(rows)
}

/// Per-level standardisation from the training rows.
pub fn level_statistics(rows: &[RecordStore<f32>; 2], device: &Device) -> Result<Vec<Standardise>> {
    LEVEL_CHANNELS
        .iter()
        .zip(rows)
        .map(|(&channels, rows)| {
            let mut moments = ColumnMoments::new(channels);
            for image in 0..rows.len() {
                moments.add(&rows.record(image)?);
            }
            moments.standardise(channel_scale, device)
        })
        .collect()
}

/// The per-level standardisation as model-file tensors.
pub fn standardise_state(levels: &[Standardise]) -> Result<Vec<(String, Tensor)>> {
    let mut state = Vec::new();
    for (level, standardise) in levels.iter().enumerate() {
        state.extend(standardise.state(&format!("standardise.level{level}"))?);
    }
    Ok(state)
}

/// The per-level standardisation out of a model file's tensors (removed from `tensors`).
pub fn take_standardise(tensors: &mut HashMap<String, Tensor>, device: &Device) -> Result<Vec<Standardise>> {
    (0..LEVEL_CHANNELS.len())
        .map(|level| Standardise::take(tensors, &format!("standardise.level{level}"), LEVEL_CHANNELS[level], device))
        .collect()
}

/// Calibrates a trained flow on the first `CALIBRATION_IMAGES` training images, whose feature rows per level are
/// `rows`; `level_nll(level, rows, images)` gives the NLL per dimension of those rows, `images × positions`.
/// Entry k of the calibration belongs to `levels[k]`.
pub fn calibrate(
    rows: &[RecordStore<f32>; 2],
    levels: &[usize],
    image_size: u32,
    device: &Device,
    progress: &dyn Progress,
    level_nll: impl Fn(usize, &Tensor, usize) -> Result<Vec<f32>>,
) -> Result<PositionCalibration> {
    const BATCH: usize = 8;
    let positions = level_positions(image_size);
    let images = rows[0].len().min(CALIBRATION_IMAGES);
    progress.begin("calibrating", images as u64);
    let mut maps = vec![Vec::new(); levels.len()];
    let mut first = 0;
    // Not cancellable: a run stopped during training still needs this (seconds) to be a usable model.
    while first < images {
        let count = BATCH.min(images - first);
        for (map, &level) in maps.iter_mut().zip(levels) {
            let x = rows[level].range(first..first + count)?;
            let x = Tensor::from_vec(x, (count * positions[level], LEVEL_CHANNELS[level]), device)?;
            map.extend(level_nll(level, &x, count)?);
        }
        progress.advance(count as u64);
        first += count;
    }
    let active_positions: Vec<usize> = levels.iter().map(|&level| positions[level]).collect();
    Ok(PositionCalibration::from_maps(&maps, &active_positions))
}

/// The calibration of `levels` out of a model file's tensors (entry k belongs to `levels[k]`).
pub fn take_calibration(
    tensors: &mut HashMap<String, Tensor>,
    levels: &[usize],
    image_size: u32,
) -> Result<PositionCalibration> {
    let positions = level_positions(image_size);
    PositionCalibration::take(tensors, &levels.iter().map(|&level| positions[level]).collect::<Vec<_>>())
}

/// The training loss over the modelled levels: the mean of `level_loss(level)`.
pub fn mean_over_levels(levels: &[usize], mut level_loss: impl FnMut(usize) -> Result<Tensor>) -> Result<Tensor> {
    let mut total = level_loss(levels[0])?;
    for &level in &levels[1..] {
        total = (total + level_loss(level)?)?;
    }
    Ok((total / levels.len() as f64)?)
}

/// Which backbone levels a flow models: 0 = stride 8 (40 channels), 1 = stride 16 (112 channels).
pub fn check_levels(levels: &[usize]) -> Result<()> {
    let valid = !levels.is_empty() && levels.windows(2).all(|w| w[0] < w[1]) && levels.iter().all(|&l| l < 2);
    if !valid {
        bail!("levels must be [0], [1] or [0, 1] (0 = stride 8, 1 = stride 16), got {levels:?}");
    }
    Ok(())
}

/// What settings files written before `levels` existed meant: both levels.
pub fn both_levels() -> Vec<usize> {
    vec![0, 1]
}

/// What both flows store besides their variables: feature standardisation and position calibration.
pub fn normalisation_state(
    standardise: &[Standardise],
    calibration: &PositionCalibration,
) -> Result<Vec<(String, Tensor)>> {
    let mut state = standardise_state(standardise)?;
    state.extend(calibration.state()?);
    Ok(state)
}

/// What a flow's `score_batch` does: the backbone rows of `images`, each modelled level's NLL from
/// `level_nll(level, rows, batch)`, assembled into calibrated maps and scores.
pub struct LevelScoring<'a> {
    pub backbone: &'a Backbone,
    pub local_average: bool,
    pub levels: &'a [usize],
    pub image_size: u32,
    pub calibration: &'a PositionCalibration,
    pub blur_sigma: f32,
}

impl LevelScoring<'_> {
    pub fn score(
        &self,
        images: &Tensor,
        level_nll: impl Fn(usize, &Tensor, usize) -> Result<Vec<f32>>,
    ) -> Result<Vec<AnomalyOutput>> {
        let batch = images.dim(0)?;
        let rows = level_rows(self.backbone, images, self.local_average)?;
        let nll = self
            .levels
            .iter()
            .map(|&level| Ok((level, level_nll(level, &rows[level], batch)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(assemble_outputs(&nll, batch, self.image_size, self.calibration, self.blur_sigma))
    }
}

/// Anomaly maps and scores from the modelled levels' NLL (`(level, batch × positions)`, in the calibration's
/// order): calibrated per position, upsampled to the input size, averaged over levels, blurred; the score is the
/// map's maximum.
pub fn assemble_outputs(
    level_nll: &[(usize, Vec<f32>)],
    batch: usize,
    image_size: u32,
    calibration: &PositionCalibration,
    blur_sigma: f32,
) -> Vec<AnomalyOutput> {
    let size = image_size as usize;
    (0..batch)
        .map(|b| {
            let mut sum = vec![0f32; size * size];
            for (entry, (level, nll)) in level_nll.iter().enumerate() {
                let side = level_side(image_size, *level);
                let mut map = nll[b * side * side..(b + 1) * side * side].to_vec();
                calibration.calibrate(entry, &mut map);
                let map = ScoreMap::new(side, side, map).resized(size, size);
                sum.iter_mut().zip(&map.data).for_each(|(t, v)| *t += v / level_nll.len() as f32);
            }
            let map = ScoreMap::new(size, size, sum).blurred(blur_sigma);
            AnomalyOutput { score: map.max(), map }
        })
        .collect()
}

/// The recorded end of a flow's log-likelihood: the Gaussian log-density −½|z|² − d·ln√(2π) along the last
/// axis, plus the blocks' log-determinants, over d ([`VectorFlow::log_likelihood_per_dim`]).
pub fn record_per_dim(graph: &mut Graph, z: &Value, log_det: Option<Value>, dim: usize) -> Value {
    let last = graph.ints("axis", &[1], &[-1]);
    let squared = graph.op("ReduceSumSquare", &[z, &last], vec![attr_int("keepdims", 0)]);
    let gaussian = layers::affine(graph, &squared, -0.5, -(LN_SQRT_2PI * dim as f64) as f32);
    let total = match log_det {
        Some(log_det) => graph.op("Add", &[&gaussian, &log_det], vec![]),
        None => gaussian,
    };
    let dim = graph.scalar("dim", dim as f32);
    graph.op("Div", &[&total, &dim], vec![])
}

/// Records [`assemble_outputs`]: each modelled level's NLL `(N, positions)` calibrated, upsampled to the input
/// size and averaged over levels, then blurred; the score is the map's maximum.
pub fn record_assemble(
    graph: &mut Graph,
    level_nll: &[(usize, Value)],
    image_size: u32,
    calibration: &PositionCalibration,
    blur_sigma: f32,
) -> RecordedScores {
    let calibrated: Vec<(Value, usize)> = level_nll
        .iter()
        .enumerate()
        .map(|(entry, (level, nll))| {
            (layers::calibrate(graph, nll, calibration, entry), level_side(image_size, *level))
        })
        .collect();
    let mean = layers::mean_of_resized(graph, &calibrated, image_size as usize);
    let map = layers::blur(graph, &mean, blur_sigma);
    let score = layers::max_score(graph, &map);
    RecordedScores { map, score }
}

/// Each backbone level's rows `(N, positions, channels)` ([`level_rows`], recorded).
pub fn record_level_rows(graph: &mut Graph, backbone: &Backbone, images: &Value, local: bool) -> Result<[Value; 2]> {
    let (fine, coarse) = layers::backbone_features(graph, backbone, images)?;
    let mut rows = |map: &Value| {
        let map = if local { layers::local_average(graph, map) } else { map.clone() };
        layers::positions_as_rows(graph, &map)
    };
    Ok([rows(&fine), rows(&coarse)])
}

/// Sinusoidal 2-D position code, `(height·width, dim)` row-major (CFlow's condition): the first half of the
/// channels encodes the column, the second half the row, alternating sin and cos at geometric frequencies.
pub fn positional_encoding(dim: usize, height: usize, width: usize) -> Vec<f32> {
    let half = dim / 2;
    let mut code = vec![0f32; height * width * dim];
    for y in 0..height {
        for x in 0..width {
            let row = &mut code[(y * width + x) * dim..][..dim];
            for k in (0..half).step_by(2) {
                let frequency = (-(k as f64) * (1e4f64.ln() / half as f64)).exp();
                row[k] = (x as f64 * frequency).sin() as f32;
                row[k + 1] = (x as f64 * frequency).cos() as f32;
                row[half + k] = (y as f64 * frequency).sin() as f32;
                row[half + k + 1] = (y as f64 * frequency).cos() as f32;
            }
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    #[test]
    fn coupling_log_determinant_matches_the_jacobian() {
        // For a 4-dim block, compare log|det J| with the determinant of a finite-difference Jacobian.
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let block = VectorCoupling::new(vb, 4, 2, 1.9, 3).unwrap();
        let x = [0.3f64, -1.2, 0.7, 2.0];
        let condition = Tensor::new(&[[0.5f64, -0.25]], &Device::Cpu).unwrap();
        let run = |v: &[f64]| -> (Vec<f64>, f64) {
            let t = Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let (y, log_det) = block.forward(&t, Some(&condition)).unwrap();
            (y.squeeze(0).unwrap().to_vec1().unwrap(), log_det.squeeze(0).unwrap().to_scalar().unwrap())
        };
        let (_, log_det) = run(&x);
        let h = 1e-6;
        let mut jacobian = nalgebra::DMatrix::<f64>::zeros(4, 4);
        for j in 0..4 {
            let (mut plus, mut minus) = (x, x);
            plus[j] += h;
            minus[j] -= h;
            let (yp, _) = run(&plus);
            let (ym, _) = run(&minus);
            for i in 0..4 {
                jacobian[(i, j)] = (yp[i] - ym[i]) / (2.0 * h);
            }
        }
        let expected = jacobian.determinant().abs().ln();
        assert!((log_det - expected).abs() < 1e-6, "log det {log_det} vs finite differences {expected}");
    }

    #[test]
    fn positional_code_is_distinct_per_position_and_bounded() {
        let code = positional_encoding(8, 3, 4);
        assert_eq!(code.len(), 3 * 4 * 8);
        assert!(code.iter().all(|v| v.abs() <= 1.0));
        let rows: Vec<&[f32]> = code.chunks(8).collect();
        for i in 0..rows.len() {
            for j in i + 1..rows.len() {
                assert!(rows[i].iter().zip(rows[j]).any(|(a, b)| (a - b).abs() > 1e-3), "positions {i} and {j}");
            }
        }
    }
}
