//! Patch SVDD — Yi & Yoon 2020, "Patch SVDD: Patch-level SVDD for Anomaly Detection and Segmentation" (ACCV);
//! reference code: the authors' `Anomaly-Detection-PatchSVDD-PyTorch`.
//!
//! A hierarchical patch encoder learns, from good images alone, an embedding in which neighbouring patches lie
//! close together (the patch-level SVDD loss: the distance between a patch's and a one-step-shifted patch's
//! embeddings) while staying informative (the self-supervised position loss: from two patches' embedding
//! difference, a small classifier tells which of the 8 neighbouring positions the second one was taken from).
//! The small encoder embeds a patch; the big one embeds a patch twice as wide from its 2×2 small embeddings.
//! Scoring: each patch's distance to its nearest training patch embedding, at each of the two sizes, spread
//! over the cells the patch covers (averaged where patches overlap); the two maps multiplied (the paper's
//! best combination); the image score is the map's maximum.
//!
//! Backbone: the paper's encoder learns from the pixels (8 convolutions from scratch, 32- and 64-pixel
//! patches, 300 epochs on a GPU). Here it learns from Lite0's patch features (the 152 channels every patch
//! method shares, one cell per 8 pixels): the small patch is 4×4 cells (32 pixels of stride, though each cell
//! already sees more), the big one 8×8; the encoder is a 3×3 and a 2×2 convolution for the small patch and a
//! 2×2 convolution of dilation 4 and a 1×1 for the big one, so it trains in minutes on a CPU. The SVDD shift is
//! one cell (8 pixels; the paper jitters by 1 or 2 pixels) and the position task's patches are not colour-
//! jittered (the paper's guard against chromatic aberration, which the features do not carry at cell level).
//! The training patches' embeddings are reduced to a coreset per size (greedy k-center, as PatchCore's); the
//! paper keeps them all.

use super::coreset::{greedy_coreset, CoresetMethod};
use super::nearest::{index_lists, InvertedIndex, INDEX_MIN_BANK};
use super::patchcore::{NearestSearch, DEFAULT_PROBES};
use crate::backbone::Backbone;
use crate::dataset::record_store::{RecordStore, PER_IMAGE_VALUES_IN_MEMORY};
use crate::dataset::TrainingImages;
use crate::methods::features::{patch_feature_rows, PATCH_CHANNELS};
use crate::methods::gaussian::grid_size;
use crate::methods::layers::{linear_leaky, Conv};
use crate::methods::setting_docs::common;
use crate::methods::statistics::{channel_statistics, Standardise};
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord};
use crate::methods::{
    images_to_tensor, outputs_from_cells, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores,
};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use crate::rng::SplitMix64;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    PatchSvdd,
    PatchSvddSettings,
    name: "patch-svdd",
    title: "Patch SVDD",
    family: Family::Representation,
    summary: "A patch encoder trained so that neighbouring good patches embed close; nearest training patch at two patch sizes.",
    guide: "Wins on textures whose good patches all look alike: it learns its own patch embedding from the good images (self-supervised), at two patch sizes. On 2 CPU cores, MTD (761 training images): fit 2 min 10 s, 47 images/s, image AUROC 0.909 (PatchCore, on the same features untrained: 0.965).",
    ranges: [
        "embedding_dim": 2..=512,
        "hidden": 2..=1024,
        "svdd_weight": 0..=1000,
        "images_per_step": 1..=256,
        "pairs_per_step": 16..=1048576,
        "bank_ratio": 0.000001..=1,
        "search_probes": 1..=65536,
    ],
    docs: [
        "embedding_dim" => common("Embedding size", "channels", "Channels of a patch's embedding (D in the paper).", false),
        "hidden" => common("Hidden channels", "", "Width of the encoder's inner layers and of the position classifiers.", true),
        "svdd_weight" => common("SVDD weight", "", "Weight of the neighbouring-patches loss against the position loss (λ in the paper).", false),
        "images_per_step" => common("Images per step", "", "Training images whose every patch makes one optimisation step.", true),
        "pairs_per_step" => common("Position pairs per step", "", "Patch pairs the position classifier sees per step and patch size (a random choice of all of them).", true),
        "bank_ratio" => common("Memory bank share", "", "Fraction of the training patches' embeddings kept per patch size (greedy coreset).", true),
        "combine" => common("Patch sizes", "", "product (the paper), sum, small or big: how the two sizes' maps make one.", true),
        "search" => common("Nearest-entry search", "", "auto, exhaustive or inverted (an index: much faster on large banks; its distances can be slightly higher than the exhaustive search's, which is what the ONNX export computes).", true),
        "search_probes" => common("Index probes", "lists", "Lists of the inverted index each patch searches once a bank is large: more is closer to the exhaustive search, slower.", true),
    ],
    smoke: ({"epochs": 3} at 128, floors [0.9, 0.8, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => PatchSvddSettings::published],
);

/// How the small and big patches' maps make one.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PatchSizes {
    /// Their product (the paper's best).
    Product,
    Sum,
    Small,
    Big,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PatchSvddSettings {
    pub embedding_dim: usize,
    /// Channels inside the encoder and the position classifiers.
    pub hidden: usize,
    /// λ: the SVDD loss's weight; the position losses weigh 1.
    pub svdd_weight: f64,
    pub images_per_step: usize,
    pub pairs_per_step: usize,
    pub bank_ratio: f64,
    pub combine: PatchSizes,
    /// `auto`: the inverted index from `INDEX_MIN_BANK` rows, else the exhaustive search.
    pub search: NearestSearch,
    pub search_probes: usize,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub blur_sigma: f32,
}

impl Default for PatchSvddSettings {
    fn default() -> Self {
        // λ = 0.1, 8 epochs, the product of the two sizes' maps: chosen on label-free validation
        // (ARCHITECTURE.md, "New methods").
        Self {
            embedding_dim: 64,
            hidden: 128,
            svdd_weight: 0.1,
            images_per_step: 8,
            pairs_per_step: 4096,
            bank_ratio: 0.1,
            combine: PatchSizes::Product,
            search: NearestSearch::Auto,
            search_probes: DEFAULT_PROBES,
            schedule: Schedule::new(8, 1e-3),
            blur_sigma: 4.0,
        }
    }
}

impl PatchSvddSettings {
    /// The paper's length: 300 epochs at learning rate 1e-4 (Adam there; AdamW here).
    pub fn published() -> Self {
        Self { schedule: Self::default().schedule.with(300, 1e-4), ..Self::default() }
    }
}

/// Side of the small patch in grid cells; the big patch is 2×2 small ones.
const SMALL_CELLS: usize = 4;
const BIG_CELLS: usize = 2 * SMALL_CELLS;
/// The 8 neighbouring directions (dy, dx) of the position task; a label is an index into this list.
const DIRECTIONS: [(isize, isize); 8] = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)];
/// The SVDD loss's one-cell shifts: each pair of neighbours once.
const SVDD_SHIFTS: [(isize, isize); 4] = [(0, 1), (1, 0), (1, 1), (1, -1)];

/// The grid of patch cells and of both patch sizes' embeddings for one input size.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    grid: usize,
    small: usize,
    big: usize,
}

impl Geometry {
    fn new(image_size: u32) -> Result<Self> {
        let grid = grid_size(image_size);
        // The position task takes a big patch's neighbour up to BIG_CELLS − 1 cells away.
        if grid < 2 * BIG_CELLS - 1 {
            bail!(
                "Patch SVDD cannot use {image_size}-pixel input: its big patches need a grid of at least {} cells (use {} pixels or more)",
                2 * BIG_CELLS - 1,
                (2 * BIG_CELLS - 1) * 8
            );
        }
        let small = grid + 1 - SMALL_CELLS;
        Ok(Self { grid, small, big: small - SMALL_CELLS })
    }
}

/// `(B, H − step, W − step, 4·C)`: at each position the 2×2 grid of `x` at offsets 0 and `step`, row-major —
/// a 2×2 convolution of dilation `step` without padding is a linear layer over these rows.
fn two_by_two(x: &Tensor, step: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let (h, w) = (h - step, w - step);
    let at = |y: usize, x0: usize| x.narrow(1, y, h).and_then(|t| t.narrow(2, x0, w));
    Ok(Tensor::cat(&[at(0, 0)?, at(0, step)?, at(step, 0)?, at(step, step)?], 3)?)
}

/// `linear` over the last dimension of a channels-last map.
fn per_position(linear: &Linear, x: &Tensor, leaky: bool) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let rows = x.reshape((b * h * w, c))?;
    let rows = if leaky { linear_leaky(linear, &rows)? } else { linear.forward(&rows)? };
    Ok(rows.reshape((b, h, w, ()))?)
}

/// The hierarchical encoder: standardised patch features `(B, G, G, 152)` → small embeddings
/// `(B, G − 3, G − 3, D)` and big ones `(B, G − 7, G − 7, D)`, each in (−1, 1).
struct Encoder {
    small_conv: Conv,
    small_out: Linear,
    big_conv: Linear,
    big_out: Linear,
}

impl Encoder {
    fn new(vb: VarBuilder, hidden: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            small_conv: Conv::new(vb.pp("small_conv"), PATCH_CHANNELS, hidden, 3, 1)?,
            small_out: candle_nn::linear(4 * hidden, dim, vb.pp("small_out"))?,
            big_conv: candle_nn::linear(4 * dim, hidden, vb.pp("big_conv"))?,
            big_out: candle_nn::linear(hidden, dim, vb.pp("big_out"))?,
        })
    }

    fn forward(&self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, g, _, _) = features.dims4()?;
        // The padded convolution's border rows saw zeros: keep the valid (unpadded) part, as the paper's
        // convolutions have no padding.
        let h = self.small_conv.forward_leaky(features)?.narrow(1, 1, g - 2)?.narrow(2, 1, g - 2)?;
        let small = per_position(&self.small_out, &two_by_two(&h, 1)?, false)?.tanh()?;
        let big = per_position(&self.big_conv, &two_by_two(&small, SMALL_CELLS)?, true)?;
        let big = per_position(&self.big_out, &big, false)?.tanh()?;
        Ok((small, big))
    }
}

/// Records [`two_by_two`] on a channels-last map whose shape is known.
fn record_two_by_two(graph: &mut Graph, x: &Value, step: usize) -> Value {
    let (h, w) = (x.dim(1) - step, x.dim(2) - step);
    let mut at = |y: usize, x0: usize| {
        let rows = layers::slice(graph, x, 1, y, h);
        layers::slice(graph, &rows, 2, x0, w)
    };
    let parts = [at(0, 0), at(0, step), at(step, 0), at(step, step)];
    layers::concat(graph, &parts.iter().collect::<Vec<_>>(), 3)
}

impl Encoder {
    /// Records [`Self::forward`].
    fn record(&self, graph: &mut Graph, features: &Value) -> Result<(Value, Value)> {
        let g = features.dim(1);
        let h = layers::conv_leaky(graph, features, &self.small_conv)?;
        let h = layers::slice(graph, &h, 1, 1, g - 2);
        let h = layers::slice(graph, &h, 2, 1, g - 2);
        let taps = record_two_by_two(graph, &h, 1);
        let small = layers::linear(graph, &taps, &self.small_out)?;
        let small = graph.op("Tanh", &[&small], vec![]).with_shape(small.shape.clone());
        let taps = record_two_by_two(graph, &small, SMALL_CELLS);
        let big = layers::linear(graph, &taps, &self.big_conv)?;
        let big = layers::leaky_relu(graph, &big);
        let big = layers::linear(graph, &big, &self.big_out)?;
        let big = graph.op("Tanh", &[&big], vec![]).with_shape(big.shape.clone());
        Ok((small, big))
    }
}

/// Tells from `h1 − h2` which of the 8 neighbouring positions the second patch came from. As in the reference,
/// the last layer's weight is normalised per input and not trained (only its bias is).
struct PositionClassifier {
    first: Linear,
    second: Linear,
    last: Linear,
}

impl PositionClassifier {
    fn new(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            first: candle_nn::linear(dim, hidden, vb.pp("first"))?,
            second: candle_nn::linear(hidden, hidden, vb.pp("second"))?,
            last: candle_nn::linear(hidden, DIRECTIONS.len(), vb.pp("last"))?,
        })
    }

    /// Logits `(N, 8)` for embedding differences `(N, D)`.
    fn forward(&self, differences: &Tensor) -> Result<Tensor> {
        let h = linear_leaky(&self.second, &linear_leaky(&self.first, differences)?)?;
        let weight = self.last.weight().detach();
        let weight = weight.broadcast_div(&weight.sqr()?.sum_keepdim(0)?.sqrt()?)?;
        let logits = h.matmul(&weight.t()?)?;
        Ok(match self.last.bias() {
            Some(bias) => logits.broadcast_add(bias)?,
            None => logits,
        })
    }
}

/// The aligned views `(a, b)` of a channels-last map such that `b[p]` is the patch `(dy, dx)` cells from `a[p]`,
/// over every position where both exist.
fn shifted_pair(map: &Tensor, dy: isize, dx: isize) -> Result<(Tensor, Tensor)> {
    let (_, h, w, _) = map.dims4()?;
    let (ay, by) = if dy >= 0 { (0, dy as usize) } else { ((-dy) as usize, 0) };
    let (ax, bx) = if dx >= 0 { (0, dx as usize) } else { ((-dx) as usize, 0) };
    let (h, w) = (h - dy.unsigned_abs(), w - dx.unsigned_abs());
    let view = |y: usize, x: usize| map.narrow(1, y, h).and_then(|t| t.narrow(2, x, w));
    Ok((view(ay, ax)?, view(by, bx)?))
}

/// The patch-level SVDD loss: the mean distance between one-cell neighbours' embeddings.
fn svdd_loss(map: &Tensor) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (dy, dx) in SVDD_SHIFTS {
        let (a, b) = shifted_pair(map, dy, dx)?;
        // The small constant keeps the square root's gradient finite where two embeddings coincide.
        let distance = ((a - b)?.sqr()?.sum(D::Minus1)? + 1e-8)?.sqrt()?.mean_all()?;
        total = Some(match total {
            None => distance,
            Some(sum) => (sum + distance)?,
        });
    }
    Ok((total.context("no SVDD shifts")? / SVDD_SHIFTS.len() as f64)?)
}

/// The position loss at one patch size (`cells` wide): for each direction, every pair of patches `cells`·3/4 to
/// `cells` − 1 cells apart along it (the distance drawn once per step), a random `pairs` of them classified.
fn position_loss(
    map: &Tensor,
    classifier: &PositionClassifier,
    cells: usize,
    pairs: usize,
    rng: &mut SplitMix64,
) -> Result<Tensor> {
    let dim = map.dim(3)?;
    let (mut differences, mut labels) = (Vec::with_capacity(DIRECTIONS.len()), Vec::new());
    for (label, &(dy, dx)) in DIRECTIONS.iter().enumerate() {
        let distance = (3 * cells / 4 + rng.below(cells / 4)) as isize;
        let (a, b) = shifted_pair(map, dy * distance, dx * distance)?;
        let rows = (a - b)?.reshape(((), dim))?;
        labels.extend(std::iter::repeat_n(label as u32, rows.dim(0)?));
        differences.push(rows);
    }
    let differences = Tensor::cat(&differences, 0)?;
    let chosen: Vec<u32> = SplitMix64::new(rng.next_u64()).subset(labels.len(), pairs).iter().map(|&i| i as u32).collect();
    let device = map.device();
    let chosen_labels: Vec<u32> = chosen.iter().map(|&i| labels[i as usize]).collect();
    let logits = classifier.forward(&differences.index_select(&Tensor::new(chosen.as_slice(), device)?, 0)?)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &Tensor::new(chosen_labels.as_slice(), device)?)?)
}

/// Every network of the fit: the encoder and one position classifier per patch size.
struct Networks {
    encoder: Encoder,
    small_classifier: PositionClassifier,
    big_classifier: PositionClassifier,
}

impl Networks {
    fn new(vb: VarBuilder, settings: &PatchSvddSettings) -> Result<Self> {
        let (hidden, dim) = (settings.hidden, settings.embedding_dim);
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), hidden, dim)?,
            small_classifier: PositionClassifier::new(vb.pp("small_classifier"), dim, hidden)?,
            big_classifier: PositionClassifier::new(vb.pp("big_classifier"), dim, hidden)?,
        })
    }
}

/// Each patch size's training embeddings, reduced to a coreset, and the index that searches them.
struct Bank {
    rows: Tensor,
    /// The rows on the host, for the exact distance to the nearest one.
    values: Vec<f32>,
    index: InvertedIndex,
    probes: usize,
}

impl Bank {
    fn new(rows: Tensor, settings: &PatchSvddSettings) -> Result<Self> {
        let (count, dim) = rows.dims2()?;
        let values: Vec<f32> = rows.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let indexed = settings.search == NearestSearch::Inverted
            || (settings.search == NearestSearch::Auto && count >= INDEX_MIN_BANK);
        let (index, probes) = match indexed {
            true => {
                let index = InvertedIndex::build(&values, dim, index_lists(count, 0), settings.schedule.seed);
                (index, settings.search_probes.max(1))
            }
            false => (InvertedIndex::single_list(&values, dim), 1),
        };
        Ok(Self { rows, values, index, probes })
    }

    /// Records the exhaustive search: each row of `queries` `(N, R, D)`'s distance to its nearest bank row.
    fn record_nearest(&self, graph: &mut Graph, queries: &Value) -> Result<Value> {
        let (count, dim) = self.rows.dims2()?;
        let host = self.rows.to_device(&Device::Cpu)?;
        let bank_t = graph.floats("bank_t", &[dim, count], &host.t()?.flatten_all()?.to_vec1::<f32>()?);
        let norms = graph.floats("bank_norms", &[count], &host.sqr()?.sum(1)?.to_vec1::<f32>()?);
        let squared = layers::squared_distances(graph, queries, &bank_t, &norms);
        // As `nearest`: the row by the expanded form, the distance to it directly.
        let nearest = graph.op("ArgMin", &[&squared], vec![attr_int("axis", -1), attr_int("keepdims", 0)]);
        let bank = graph.floats("bank", &[count, dim], &self.values);
        let rows = graph.op("Gather", &[&bank, &nearest], vec![attr_int("axis", 0)]);
        let difference = graph.op("Sub", &[queries, &rows], vec![]);
        let last = graph.ints("axis", &[1], &[-1]);
        let squared = graph.op("ReduceSumSquare", &[&difference, &last], vec![attr_int("keepdims", 0)]);
        Ok(graph.op("Sqrt", &[&squared], vec![]).with_shape(queries.shape[..2].to_vec()))
    }

    /// Distance to the nearest bank row for each row of `queries` `(N, D)`. The search finds the row through
    /// |q|² + |b|² − 2 q·b; the distance is then taken as |q − b| itself: the embeddings' norms are far larger
    /// than the distances between neighbours, and the expanded form's rounding (1e-3 relative, depending on
    /// the summation order) would make Loupe and an exported model disagree.
    fn nearest(&self, queries: &Tensor) -> Result<Vec<f32>> {
        let queries: Vec<f32> = queries.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let (_, nearest) = self.index.nearest_squared(&queries, self.probes);
        let dim = self.rows.dim(1)?;
        Ok(queries
            .chunks_exact(dim)
            .zip(nearest)
            .map(|(query, row)| {
                let row = &self.values[row as usize * dim..][..dim];
                query.iter().zip(row).map(|(q, b)| (q - b) * (q - b)).sum::<f32>().sqrt()
            })
            .collect())
    }
}

/// A `grid²` cell map from the scores of `side²` patches `cells` wide at every cell: each cell the mean score of
/// the patches covering it.
fn spread_over_cells(scores: &[f32], side: usize, cells: usize, grid: usize) -> Vec<f32> {
    let (mut sum, mut count) = (vec![0f32; grid * grid], vec![0u32; grid * grid]);
    for (i, row) in scores.chunks_exact(side).enumerate() {
        for (j, &score) in row.iter().enumerate() {
            for y in i..(i + cells).min(grid) {
                for x in j..(j + cells).min(grid) {
                    sum[y * grid + x] += score;
                    count[y * grid + x] += 1;
                }
            }
        }
    }
    sum.iter().zip(&count).map(|(&s, &n)| if n == 0 { 0.0 } else { s / n as f32 }).collect()
}

/// [`spread_over_cells`] as a matrix `(side², grid²)`: scores `(…, side²)` times it are the cell map.
fn spreading_matrix(side: usize, cells: usize, grid: usize) -> Vec<f32> {
    let mut matrix = vec![0f32; side * side * grid * grid];
    for patch in 0..side * side {
        let mut one = vec![0f32; side * side];
        one[patch] = 1.0;
        // Each column (cell) averages the patches covering it; a unit score shows each patch's weight there.
        for (cell, weight) in spread_over_cells(&one, side, cells, grid).into_iter().enumerate() {
            matrix[patch * grid * grid + cell] = weight;
        }
    }
    matrix
}

pub struct PatchSvdd {
    backbone: Arc<Backbone>,
    settings: PatchSvddSettings,
    image_size: u32,
    geometry: Geometry,
    varmap: VarMap,
    encoder: Encoder,
    standardise: Standardise,
    small_bank: Bank,
    big_bank: Bank,
    pub record: TrainingRecord,
}

/// Standardised features `(B, G, G, 152)` of images `(B, 3, S, S)`.
fn encoder_input(backbone: &Backbone, standardise: &Standardise, images: &Tensor, grid: usize) -> Result<Tensor> {
    let rows = standardise.apply(&patch_feature_rows(backbone, images)?)?;
    Ok(rows.reshape((images.dim(0)?, grid, grid, PATCH_CHANNELS))?)
}

impl PatchSvdd {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: PatchSvddSettings) -> Result<Self> {
        if images.len() < 2 {
            bail!("Patch SVDD needs at least two training images, got {}", images.len());
        }
        let geometry = Geometry::new(context.image_size)?;
        let device = context.device.clone();
        let progress = context.progress;
        let grid = geometry.grid;
        let positions = grid * grid;
        // The patch features of every training image, once (the backbone is frozen).
        progress.begin("features", images.len() as u64);
        let mut features =
            RecordStore::new("Patch SVDD training features", positions * PATCH_CHANNELS, PER_IMAGE_VALUES_IN_MEMORY);
        let mut sample = Vec::new();
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let rows = patch_feature_rows(&context.backbone, &images_to_tensor(&batch, &device)?)?;
            let values = rows.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            // Every 16th patch estimates the channels' statistics: plenty for 152 channels.
            values.chunks_exact(PATCH_CHANNELS).step_by(16).for_each(|row| sample.extend_from_slice(row));
            features.extend(&values)?;
            progress.advance(batch.len() as u64);
        }
        let standardise = channel_statistics(&sample, PATCH_CHANNELS, &device)?;
        let input = |chosen: &[usize]| -> Result<Tensor> {
            let x = Tensor::from_vec(features.gather(chosen)?, (chosen.len() * positions, PATCH_CHANNELS), &device)?;
            Ok(standardise.apply(&x)?.reshape((chosen.len(), grid, grid, PATCH_CHANNELS))?)
        };

        let varmap = VarMap::new();
        let networks = Networks::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &settings)?;
        let seed = settings.schedule.seed;
        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, seed ^ 0x5dd);
        let mut rng = SplitMix64::new(seed ^ 0x5dd0);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let pairs = settings.pairs_per_step;
        let record = train(&varmap, &plan, progress, |_, step| {
            let (small, big) = networks.encoder.forward(&input(batches.batch(step))?)?;
            let position = (position_loss(&small, &networks.small_classifier, SMALL_CELLS, pairs, &mut rng)?
                + position_loss(&big, &networks.big_classifier, BIG_CELLS, pairs, &mut rng)?)?;
            let svdd = (svdd_loss(&small)? + svdd_loss(&big)?)?;
            Ok((position + (svdd * settings.svdd_weight)?)?)
        })?;

        // The memory banks: every training patch's embedding, at both sizes, reduced to a coreset.
        progress.begin("embeddings", images.len() as u64);
        let dim = settings.embedding_dim;
        let (mut small_rows, mut big_rows) = (Vec::new(), Vec::new());
        let all: Vec<usize> = (0..images.len()).collect();
        for chosen in all.chunks(context.batch_size.max(1)) {
            check_cancelled(progress)?;
            let (small, big) = networks.encoder.forward(&input(chosen)?)?;
            small_rows.extend(small.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?);
            big_rows.extend(big.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?);
            progress.advance(chosen.len() as u64);
        }
        let reduce = |rows: Vec<f32>, salt: u64| -> Result<Bank> {
            let count = ((rows.len() / dim) as f64 * settings.bank_ratio).ceil().max(1.0) as usize;
            let picks = greedy_coreset(&rows, dim, count, seed ^ salt, CoresetMethod::Auto, progress)?;
            let kept: Vec<f32> = picks.iter().flat_map(|&i| rows[i * dim..(i + 1) * dim].iter().copied()).collect();
            Bank::new(Tensor::from_vec(kept, (picks.len(), dim), &Device::Cpu)?, &settings)
        };
        let small_bank = reduce(small_rows, 0x5a11)?;
        let big_bank = reduce(big_rows, 0xb16)?;
        let encoder = networks.encoder;
        let (backbone, image_size) = (context.backbone.clone(), context.image_size);
        Ok(Self { backbone, settings, image_size, geometry, varmap, encoder, standardise, small_bank, big_bank, record })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: PatchSvddSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let geometry = Geometry::new(image_size)?;
        let device = backbone.device.clone();
        let standardise = Standardise::take(&mut tensors, "standardise", PATCH_CHANNELS, &device)?;
        let dim = settings.embedding_dim;
        let mut take_bank = |name: &str| -> Result<Bank> {
            let rows = tensors.remove(name).with_context(|| format!("model file has no `{name}` tensor"))?;
            match rows.dims2() {
                Ok((count, columns)) if count > 0 && columns == dim => {}
                _ => bail!("`{name}` has shape {:?}, expected (rows ≥ 1, {dim})", rows.dims()),
            }
            Bank::new(rows.to_dtype(DType::F32)?, &settings)
        };
        let small_bank = take_bank("small_bank")?;
        let big_bank = take_bank("big_bank")?;
        // The classifiers only train: the model file keeps the encoder.
        let build = |vb: &VarBuilder| Encoder::new(vb.pp("encoder"), settings.hidden, dim).map(|_| ());
        let varmap = load_varmap(tensors, &device, "Patch SVDD", build)?;
        let encoder = Encoder::new(VarBuilder::from_varmap(&varmap, DType::F32, &device).pp("encoder"), settings.hidden, dim)?;
        let record = TrainingRecord::default();
        Ok(Self { backbone, settings, image_size, geometry, varmap, encoder, standardise, small_bank, big_bank, record })
    }
}

impl AnomalyModel for PatchSvdd {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let Geometry { grid, small, big } = self.geometry;
        let x = encoder_input(&self.backbone, &self.standardise, images, grid)?;
        let (small_map, big_map) = self.encoder.forward(&x)?;
        let dim = self.settings.embedding_dim;
        let small_scores = self.small_bank.nearest(&small_map.reshape(((), dim))?)?;
        let big_scores = self.big_bank.nearest(&big_map.reshape(((), dim))?)?;
        let mut cells = Vec::with_capacity(images.dim(0)? * grid * grid);
        for (small_image, big_image) in small_scores.chunks_exact(small * small).zip(big_scores.chunks_exact(big * big)) {
            let small_cells = spread_over_cells(small_image, small, SMALL_CELLS, grid);
            let big_cells = spread_over_cells(big_image, big, BIG_CELLS, grid);
            cells.extend(small_cells.iter().zip(&big_cells).map(|(&s, &b)| match self.settings.combine {
                PatchSizes::Product => s * b,
                PatchSizes::Sum => s + b,
                PatchSizes::Small => s,
                PatchSizes::Big => b,
            }));
        }
        Ok(outputs_from_cells(&cells, grid, self.image_size as usize, self.settings.blur_sigma))
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let Geometry { grid, small, big } = self.geometry;
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, true);
        let rows = layers::positions_as_rows(graph, &features);
        let rows = layers::standardise(graph, &rows, &self.standardise)?;
        let as_map = graph.ints("shape", &[4], &[0, grid as i64, grid as i64, PATCH_CHANNELS as i64]);
        let x = graph.op("Reshape", &[&rows, &as_map], vec![]).with_shape(vec![
            images.shape[0],
            Some(grid),
            Some(grid),
            Some(PATCH_CHANNELS),
        ]);
        let (small_map, big_map) = self.encoder.record(graph, &x)?;
        let dim = self.settings.embedding_dim as i64;
        let cells = |graph: &mut Graph, map: &Value, bank: &Bank, side: usize, cells: usize| -> Result<Value> {
            let as_rows = graph.ints("shape", &[3], &[0, (side * side) as i64, dim]);
            let queries = graph.op("Reshape", &[map, &as_rows], vec![]).with_shape(vec![
                images.shape[0],
                Some(side * side),
                Some(dim as usize),
            ]);
            let distances = bank.record_nearest(graph, &queries)?;
            let spreading = graph.floats("spreading", &[side * side, grid * grid], &spreading_matrix(side, cells, grid));
            Ok(graph.op("MatMul", &[&distances, &spreading], vec![]).with_shape(vec![images.shape[0], Some(grid * grid)]))
        };
        let small_cells = cells(graph, &small_map, &self.small_bank, small, SMALL_CELLS)?;
        let big_cells = cells(graph, &big_map, &self.big_bank, big, BIG_CELLS)?;
        let combined = match self.settings.combine {
            PatchSizes::Product => graph.op("Mul", &[&small_cells, &big_cells], vec![]),
            PatchSizes::Sum => graph.op("Add", &[&small_cells, &big_cells], vec![]),
            PatchSizes::Small => small_cells.clone(),
            PatchSizes::Big => big_cells.clone(),
        }
        .with_shape(small_cells.shape.clone());
        Ok(layers::map_and_score(graph, &combined, grid, self.image_size as usize, self.settings.blur_sigma))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state: Vec<(String, Tensor)> =
            varmap_state(&self.varmap)?.into_iter().filter(|(name, _)| name.starts_with("encoder.")).collect();
        state.extend(self.standardise.state("standardise")?);
        state.push(("small_bank".into(), self.small_bank.rows.to_device(&Device::Cpu)?));
        state.push(("big_bank".into(), self.big_bank.rows.to_device(&Device::Cpu)?));
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_score_spreads_over_the_cells_it_covers() {
        // Two 2-cell patches side by side on a 3-cell row: the middle cell averages them.
        let cells = spread_over_cells(&[1.0, 3.0, 5.0, 7.0], 2, 2, 3);
        assert_eq!(cells, vec![1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn shifted_pairs_line_up_neighbours() {
        let map = Tensor::arange(0f32, 16.0, &Device::Cpu).unwrap().reshape((1, 4, 4, 1)).unwrap();
        let (a, b) = shifted_pair(&map, 1, -2).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) =
            (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
        // a at (y, x) pairs with b at (y + 1, x − 2).
        assert_eq!(a, vec![2.0, 3.0, 6.0, 7.0, 10.0, 11.0]);
        assert_eq!(b, vec![4.0, 5.0, 8.0, 9.0, 12.0, 13.0]);
    }

    #[test]
    fn the_svdd_loss_vanishes_only_where_neighbours_embed_alike() {
        let loss = |map: &Tensor| svdd_loss(map).unwrap().to_scalar::<f32>().unwrap();
        let constant = Tensor::ones((1, 5, 5, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(loss(&constant) < 1e-3);
        // The one channel counts the columns: neighbours across columns differ by 1, down a column by 0.
        let columns = Tensor::arange(0f32, 5.0, &Device::Cpu).unwrap().reshape((1, 1, 5, 1)).unwrap();
        let map = columns.broadcast_as((1, 5, 5, 1)).unwrap().contiguous().unwrap();
        let expected = (0.0 + 1.0 + 1.0 + 1.0) / 4.0;
        assert!((loss(&map) - expected).abs() < 1e-3, "{}", loss(&map));
    }

    #[test]
    fn the_position_classifiers_last_weight_does_not_train() {
        let varmap = VarMap::new();
        let classifier =
            PositionClassifier::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), 4, 8).unwrap();
        let differences = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let labels = Tensor::new(&[0u32, 3, 7], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&classifier.forward(&differences).unwrap(), &labels).unwrap();
        let gradients = loss.backward().unwrap();
        assert!(gradients.get(classifier.last.weight()).is_none());
        assert!(gradients.get(classifier.last.bias().unwrap()).is_some());
        assert!(gradients.get(classifier.first.weight()).is_some());
    }

    #[test]
    fn the_encoder_embeds_every_valid_patch_and_refuses_small_inputs() {
        let geometry = Geometry::new(256).unwrap();
        assert_eq!((geometry.grid, geometry.small, geometry.big), (32, 29, 25));
        assert!(Geometry::new(96).unwrap_err().to_string().contains("96-pixel"));
        let varmap = VarMap::new();
        let encoder = Encoder::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), 8, 4).unwrap();
        let features = Tensor::zeros((2, 15, 15, PATCH_CHANNELS), DType::F32, &Device::Cpu).unwrap();
        let (small, big) = encoder.forward(&features).unwrap();
        assert_eq!(small.dims(), &[2, 12, 12, 4]);
        assert_eq!(big.dims(), &[2, 8, 8, 4]);
    }
}
