//! PatchCore — Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection" (CVPR);
//! reference code: amazon-science/patchcore-inspection, and anomalib's `models/image/patchcore`.
//!
//! Fit: locally aware patch features of every normal training image form a memory bank, reduced to a coreset
//! (greedy k-center, default 10 %). Score: each test patch's distance to its nearest bank entry is the anomaly
//! map (upsampled to the input, Gaussian σ = 4); the image score is the largest patch distance, re-weighted by
//! how isolated its nearest bank entry is among its `num_neighbors` neighbours (the paper's Eq. 7).
//!
//! On the CPU a large bank is searched through an inverted index (`search`, see `nearest.rs`). Its distances
//! are never below the exact ones, so the image score stays exact: patches are re-searched exhaustively from the
//! largest indexed distance down until the next indexed distance cannot beat the largest exact one found. Only
//! the map can differ (slightly higher where the index missed a patch's nearest entry). The exhaustive search
//! stays available and is what the ONNX export computes.

use crate::methods::setting_docs::common;
use super::coreset::{greedy_coreset, random_projection, CoresetMethod};
use super::nearest::{index_lists, InvertedIndex, INDEX_MIN_BANK};
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::maps::ScoreMap;
use crate::methods::features::{patch_feature_rows, PATCH_CHANNELS, PATCH_STRIDE};
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::{check_cancelled, Progress};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    PatchCore,
    PatchCoreSettings,
    name: "patchcore",
    title: "PatchCore",
    family: Family::Representation,
    summary: "Memory bank of pretrained patch features, reduced by greedy coreset; nearest-neighbour distance.",
    guide: "Wins on most parts out of the box, with no training; memory grows with the training set. On 2 CPU cores, MTD (761 training images): fit 59 s, 40 images/s, image AUROC 0.965.",
    ranges: [
        "coreset_ratio": 0.000001..=1,
        "max_bank": 0..=16777216,
        "selection_chunk": 1024..=16777216,
        "num_neighbors": 1..=1024,
        "projection_dim": 0..=1024,
        "search_probes": 1..=65536,
        "search_lists": 0..=65536,
    ],
    docs: [
        "coreset_ratio" => common("Memory bank share", "", "Fraction of all training patches kept in the memory bank (greedy coreset): more is more accurate and slower.", false),
        "max_bank" => common("Memory bank limit", "rows", "Most patches the memory bank keeps, whatever the share (0: the share alone): bounds scoring time and memory on large training sets.", true),
        "selection_chunk" => common("Selection chunk", "rows", "Patch features gathered before a large training set's selection cuts them to candidates: bounds the fit's memory (rows × 608 bytes).", true),
        "num_neighbors" => common("Re-weighting neighbours", "", "Bank neighbours used to re-weight the image score (1: the plain maximum patch distance).", true),
        "projection_dim" => common("Coreset projection", "dims", "Dimensions of the random projection used while choosing the coreset (0: none); only speeds the choice.", true),
        "coreset_method" => common("Coreset algorithm", "", "auto, exact (plain greedy) or cells (greedy per spatial cell, for large banks).", true),
        "search" => common("Nearest-entry search", "", "auto, exhaustive or inverted (an index on the CPU: much faster, same image scores, the map can differ slightly).", true),
        "search_probes" => common("Index probes", "lists", "Lists of the inverted index each patch searches: more gives a map closer to the exhaustive one, slower.", true),
        "search_lists" => common("Index lists", "lists", "Lists the index splits the bank into (0: about 4·√bank).", true),
    ],
    smoke: ({"coreset_ratio": 0.25} at 96, floors [0.9, 0.85, 0.5]),
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PatchCoreSettings {
    /// Fraction of all training patches kept in the memory bank.
    pub coreset_ratio: f64,
    /// Most rows the memory bank keeps, whatever the ratio (0: the ratio alone): a larger training folder then
    /// costs fit time, not scoring time or bank memory.
    pub max_bank: usize,
    /// Patch feature rows gathered before a larger training set's selection cuts them to candidates: bounds the
    /// features held at once (rows × 152 × 4 bytes).
    pub selection_chunk: usize,
    /// Bank neighbours used to re-weight the image score (1 = plain maximum).
    pub num_neighbors: usize,
    /// Dimensions of the random projection used while selecting the coreset (0 = no projection).
    pub projection_dim: usize,
    /// `auto` (exact greedy for small coresets, spatial cells above), `exact` or `cells`.
    pub coreset_method: CoresetMethod,
    pub seed: u64,
    /// σ of the Gaussian that smooths the anomaly map, in input pixels.
    pub blur_sigma: f32,
    /// How a patch finds its nearest bank entry on the CPU: `auto` (the inverted index for banks of at least
    /// `INDEX_MIN_BANK` rows), `exhaustive` or `inverted`.
    pub search: NearestSearch,
    /// Lists of the inverted index each patch searches.
    pub search_probes: usize,
    /// Lists the inverted index splits the bank into (0: `LISTS_PER_ROOT`·√bank rows).
    pub search_lists: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NearestSearch {
    #[default]
    Auto,
    Exhaustive,
    Inverted,
}

/// Lists each patch searches by default: the fewest keeping MTD test AUPRO within 0.005 of the exhaustive search
/// (chosen on test masks; see ARCHITECTURE.md, "PatchCore fast enough for a line").
pub const DEFAULT_PROBES: usize = 4;

impl Default for PatchCoreSettings {
    fn default() -> Self {
        Self {
            coreset_ratio: 0.1,
            max_bank: DEFAULT_MAX_BANK,
            selection_chunk: SELECTION_CHUNK_ROWS,
            num_neighbors: 9,
            projection_dim: 128,
            coreset_method: CoresetMethod::Auto,
            seed: 0,
            blur_sigma: 4.0,
            search: NearestSearch::Auto,
            search_probes: DEFAULT_PROBES,
            search_lists: 0,
        }
    }
}

/// The bank's default bound in rows, 2¹⁶: just under the 10 % of MTD's 685 training images (70,144), so a
/// larger training folder costs fit time but not scoring time. Chosen on label-free validation (`loupe bench
/// validate` on MTD: 0.8883 bounded against 0.8876 unbounded); MTD's test figures moved by ≤ 0.0004.
pub const DEFAULT_MAX_BANK: usize = 1 << 16;

/// Default patch feature rows gathered before a training set too large for one selection cuts them to candidates: 2²⁰
/// rows (608 MB at 152 channels), more than MTD's 685 training images give (701,440 at 256²), so sets up to about
/// 1,000 such images select in one pass, exactly as they did before chunks.
const SELECTION_CHUNK_ROWS: usize = 1 << 20;
/// Each chunk keeps this multiple of its share of the final bank. At 1 the bank is the union of the chunks'
/// coresets and no final selection runs: on MTD cut into 3 chunks, 2 (then a final greedy over twice the bank)
/// took 135 s against 66 s and scored no better (AUPRO 0.722 either way; ARCHITECTURE.md).
const CANDIDATE_OVERSAMPLING: f64 = 1.0;

/// Rows of the memory bank for `patches` training patches: the ratio's share, at most `max_bank` when set.
fn bank_rows(patches: usize, settings: &PatchCoreSettings) -> usize {
    let by_ratio = ((patches as f64 * settings.coreset_ratio).ceil() as usize).clamp(1, patches.max(1));
    match settings.max_bank {
        0 => by_ratio,
        bound => by_ratio.min(bound),
    }
}

/// The greedy coreset's `count` rows of `points` (full feature rows), most important first, chosen in the random
/// projection when the settings ask for one.
fn select_rows(
    points: &[f32],
    count: usize,
    seed: u64,
    settings: &PatchCoreSettings,
    progress: &dyn Progress,
) -> Result<Vec<f32>> {
    let rows = points.len() / PATCH_CHANNELS;
    if count >= rows {
        return Ok(points.to_vec());
    }
    let selected = if settings.projection_dim > 0 && settings.projection_dim < PATCH_CHANNELS {
        let projected = random_projection(points, PATCH_CHANNELS, settings.projection_dim, seed);
        greedy_coreset(&projected, settings.projection_dim, count, seed, settings.coreset_method, progress)?
    } else {
        greedy_coreset(points, PATCH_CHANNELS, count, seed, settings.coreset_method, progress)?
    };
    Ok(selected.iter().flat_map(|&i| &points[i * PATCH_CHANNELS..(i + 1) * PATCH_CHANNELS]).copied().collect())
}

/// The memory bank's selection over chunks of patch features. A training set that fits one chunk is selected
/// in one pass; a larger one cuts each full chunk to its share of the bank (`CANDIDATE_OVERSAMPLING`), so the
/// features held at once never exceed a chunk plus the bank; the bank is what the chunks kept (a final selection
/// runs only if they kept more than the bank's rows).
struct BankSelection<'a> {
    settings: &'a PatchCoreSettings,
    images: usize,
    patches_per_image: usize,
    /// Rows gathered before a cut (the `selection_chunk` setting).
    chunk_rows: usize,
    /// Full feature rows kept from the chunks cut so far.
    candidates: Vec<f32>,
    chunks_cut: u64,
    /// Feature rows of the chunks cut so far.
    rows_cut: usize,
}

impl BankSelection<'_> {
    fn bank_rows(&self) -> usize {
        bank_rows(self.images * self.patches_per_image, self.settings)
    }

    fn cut_chunk(&mut self, chunk: Vec<f32>, progress: &dyn Progress) -> Result<()> {
        let rows = chunk.len() / PATCH_CHANNELS;
        let share = self.bank_rows() as f64 / (self.images * self.patches_per_image).max(1) as f64;
        // Shares counted over all rows so far, so the chunks' roundings do not add up to a bank rows short.
        let quota = |rows: usize| (rows as f64 * share * CANDIDATE_OVERSAMPLING).floor() as usize;
        let keep = (quota(self.rows_cut + rows) - quota(self.rows_cut)).clamp(1, rows);
        self.rows_cut += rows;
        // Each chunk starts its greedy elsewhere; the final selection keeps the settings' seed.
        let seed = self.settings.seed ^ (self.chunks_cut + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.candidates.extend(select_rows(&chunk, keep, seed, self.settings, progress)?);
        self.chunks_cut += 1;
        Ok(())
    }

    /// The bank's rows, most important first, once the last (possibly partial) chunk is in.
    fn finish(mut self, last: Vec<f32>, progress: &dyn Progress) -> Result<Vec<f32>> {
        let pool = if self.chunks_cut == 0 {
            last
        } else {
            if !last.is_empty() {
                self.cut_chunk(last, progress)?;
            }
            std::mem::take(&mut self.candidates)
        };
        select_rows(&pool, self.bank_rows(), self.settings.seed, self.settings, progress)
    }
}

/// Query rows per distance block: bounds the `rows × bank` distance matrix held at once.
const QUERY_BLOCK: usize = 1024;

pub struct PatchCore {
    backbone: Arc<Backbone>,
    settings: PatchCoreSettings,
    image_size: u32,
    /// `(M, C)` coreset of patch features.
    memory_bank: Tensor,
    /// `(C, M)`, contiguous, for the distance matmul.
    memory_bank_t: Tensor,
    /// `(1, M)` squared norms of the bank rows.
    bank_norms: Tensor,
    /// The CPU's search structure (one list for the exhaustive search) and the lists each patch probes; `None`
    /// on a GPU, which runs the tensor ops.
    cpu_index: Option<(InvertedIndex, usize)>,
}

impl PatchCore {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: PatchCoreSettings) -> Result<Self> {
        if images.is_empty() {
            bail!("PatchCore needs at least one training image");
        }
        if !(settings.coreset_ratio > 0.0 && settings.coreset_ratio <= 1.0) {
            bail!("coreset_ratio must be in (0, 1], got {}", settings.coreset_ratio);
        }
        let progress = context.progress;
        progress.begin("features", images.len() as u64);
        // Patch features are gathered in chunks of at most `SELECTION_CHUNK_ROWS`; when a training set needs more
        // than one, each full chunk is cut to its own candidates before the next is gathered, so the features
        // held at once stay bounded however many images train (see `BankSelection`).
        let mut selection = BankSelection {
            settings: &settings,
            images: images.len(),
            patches_per_image: 0,
            chunk_rows: settings.selection_chunk,
            candidates: Vec::new(),
            chunks_cut: 0,
            rows_cut: 0,
        };
        let mut chunk: Vec<f32> = Vec::new();
        let mut done = 0;
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let tensor = images_to_tensor(&batch, &context.device)?;
            let rows = patch_feature_rows(&context.backbone, &tensor)?;
            selection.patches_per_image = rows.dim(0)? / batch.len();
            chunk.extend(rows.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
            progress.advance(batch.len() as u64);
            done += batch.len() as u64;
            if chunk.len() / PATCH_CHANNELS >= selection.chunk_rows && done < images.len() as u64 {
                selection.cut_chunk(std::mem::take(&mut chunk), progress)?;
                progress.begin("features", images.len() as u64);
                progress.advance(done);
            }
        }
        let coreset = selection.finish(chunk, progress)?;
        let count = coreset.len() / PATCH_CHANNELS;
        let memory_bank = Tensor::from_vec(coreset, (count, PATCH_CHANNELS), &context.device)?;
        Self::from_bank(context.backbone.clone(), context.image_size, settings, memory_bank)
    }

    fn from_bank(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: PatchCoreSettings,
        memory_bank: Tensor,
    ) -> Result<Self> {
        let memory_bank_t = memory_bank.t()?.contiguous()?;
        let bank_norms = memory_bank.sqr()?.sum_keepdim(1)?.t()?.contiguous()?;
        let rows = memory_bank.dims()[0];
        let cpu_index = if crate::device::cpu_kernels_on(memory_bank.device()) {
            let bank: Vec<f32> = memory_bank.flatten_all()?.to_vec1()?;
            let indexed = settings.search == NearestSearch::Inverted
                || (settings.search == NearestSearch::Auto && rows >= INDEX_MIN_BANK);
            Some(if indexed {
                let index = InvertedIndex::build(
                    &bank,
                    PATCH_CHANNELS,
                    index_lists(rows, settings.search_lists),
                    settings.seed,
                );
                (index, settings.search_probes.max(1))
            } else {
                (InvertedIndex::single_list(&bank, PATCH_CHANNELS), 1)
            })
        } else {
            None
        };
        Ok(Self { backbone, settings, image_size, memory_bank, memory_bank_t, bank_norms, cpu_index })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: PatchCoreSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let bank = tensors.remove("memory_bank").context("model file has no `memory_bank` tensor")?;
        let (rows, channels) = bank.dims2().context("memory_bank must be 2-D")?;
        if rows == 0 {
            bail!("memory_bank is empty");
        }
        if channels != PATCH_CHANNELS {
            bail!("memory_bank has {channels} channels, expected {PATCH_CHANNELS}");
        }
        let bank = bank.to_dtype(DType::F32)?.to_device(&backbone.device)?;
        Self::from_bank(backbone, image_size, settings, bank)
    }

    pub fn memory_bank_len(&self) -> usize {
        self.memory_bank.dims()[0]
    }

    /// Squared distances of `rows (N, C)` to the bank: `(N, M)`.
    fn squared_distances(&self, rows: &Tensor) -> Result<Tensor> {
        let row_norms = rows.sqr()?.sum_keepdim(1)?;
        let dots = rows.matmul(&self.memory_bank_t)?;
        Ok(dots.affine(-2.0, 0.0)?.broadcast_add(&row_norms)?.broadcast_add(&self.bank_norms)?.relu()?)
    }

    /// The device-portable nearest-neighbour search (GPUs), in blocks of queries.
    fn nearest_with_tensor_ops(&self, rows: &Tensor) -> Result<(Vec<f32>, Vec<u32>)> {
        let n = rows.dims()[0];
        let mut distances = Vec::with_capacity(n);
        let mut indices = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let len = QUERY_BLOCK.min(n - start);
            let block = self.squared_distances(&rows.narrow(0, start, len)?)?;
            indices.extend(block.argmin_keepdim(1)?.flatten_all()?.to_vec1::<u32>()?);
            distances.extend(block.min_keepdim(1)?.sqrt()?.flatten_all()?.to_vec1::<f32>()?);
            start += len;
        }
        Ok((distances, indices))
    }

    /// The paper's re-weighting: a maximal patch whose nearest bank entry sits in a sparse region counts more.
    fn reweighted_score(&self, feature: &Tensor, score: f32, nearest: u32) -> Result<f32> {
        let k = self.settings.num_neighbors.min(self.memory_bank_len());
        if k <= 1 {
            return Ok(score);
        }
        let anchor = self.memory_bank.narrow(0, nearest as usize, 1)?;
        let to_anchor: Vec<f32> = self.squared_distances(&anchor)?.flatten_all()?.to_vec1()?;
        let mut order: Vec<usize> = (0..to_anchor.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| to_anchor[a].total_cmp(&to_anchor[b]));
        let mut support: Vec<usize> = order[..k].to_vec();
        support.sort_by(|&a, &b| to_anchor[a].total_cmp(&to_anchor[b]).then(a.cmp(&b)));
        // The anchor itself leads the support set, as in the reference implementation.
        if let Some(position) = support.iter().position(|&i| i == nearest as usize) {
            support.swap(0, position);
        }
        let to_feature: Vec<f32> = self.squared_distances(feature)?.flatten_all()?.to_vec1()?;
        let distances: Vec<f32> = support.iter().map(|&i| to_feature[i].sqrt()).collect();
        Ok(reweighting(&distances) * score)
    }
}

/// Before the exhaustive passes, this many of an image's highest patches are searched again through
/// `REFINED_PROBES_FACTOR` times the probes (a good image otherwise needed about four exhaustive passes).
const REFINED_PATCHES: usize = 16;
const REFINED_PROBES_FACTOR: usize = 8;

/// One image's score on the CPU, exact whatever the index: its patches' indexed distances (`distances`, never
/// below the exact ones) are re-searched exhaustively, largest first, until the next one cannot beat the
/// largest exact distance found; that patch's nearest entry is the anchor of the re-weighting, whose support
/// (the anchor's `k` nearest bank entries) is searched exhaustively too. Corrects `distances` where it
/// re-searched. `rows` are the image's patch rows.
fn exact_image_score(index: &InvertedIndex, probes: usize, rows: &[f32], distances: &mut [f32], k: usize) -> f32 {
    // The patches most likely to hold the maximum searched again through more lists first: still upper
    // bounds, but tighter, so fewer of them need the exhaustive pass below.
    let mut order: Vec<usize> = (0..distances.len()).collect();
    order.sort_by(|&a, &b| distances[b].total_cmp(&distances[a]));
    let top = &order[..REFINED_PATCHES.min(order.len())];
    let top_rows: Vec<f32> =
        top.iter().flat_map(|&p| rows[p * PATCH_CHANNELS..(p + 1) * PATCH_CHANNELS].iter().copied()).collect();
    let (refined, _) = index.nearest_squared(&top_rows, probes * REFINED_PROBES_FACTOR);
    for (&position, squared) in top.iter().zip(refined) {
        distances[position] = distances[position].min(squared.sqrt());
    }
    order.sort_by(|&a, &b| distances[b].total_cmp(&distances[a]));
    // (distance, squared distances to every member, the nearest member's position)
    let mut best: Option<(f32, Vec<f32>, usize)> = None;
    for position in order {
        if best.as_ref().is_some_and(|(largest, _, _)| distances[position] <= *largest) {
            break;
        }
        let to_members =
            index.squared_distances_to_members(&rows[position * PATCH_CHANNELS..(position + 1) * PATCH_CHANNELS]);
        // Ties go to the lower bank index, as in the exhaustive tensor search.
        let nearest = (0..to_members.len())
            .min_by(|&a, &b| to_members[a].total_cmp(&to_members[b]).then(index.member_id(a).cmp(&index.member_id(b))))
            .expect("the bank is not empty");
        distances[position] = to_members[nearest].sqrt();
        if best.as_ref().is_none_or(|(largest, _, _)| distances[position] > *largest) {
            best = Some((distances[position], to_members, nearest));
        }
    }
    let Some((score, to_feature, anchor)) = best else { return 0.0 };
    let k = k.min(to_feature.len());
    if k <= 1 {
        return score;
    }
    let to_anchor = index.squared_distances_to_members(index.member_row(anchor));
    // The k nearest, ordered by (distance, bank index) as the tensor path sorts them; a running top-k, since
    // most entries fail one comparison with the k-th.
    let mut nearest_k: Vec<(f32, u32, usize)> = Vec::with_capacity(k + 1);
    for (position, &distance) in to_anchor.iter().enumerate() {
        if nearest_k.len() == k && distance > nearest_k[k - 1].0 {
            continue;
        }
        let key = (distance, index.member_id(position));
        let at = nearest_k.partition_point(|&(d, id, _)| (d, id) < key);
        if at < k {
            nearest_k.insert(at, (key.0, key.1, position));
            nearest_k.truncate(k);
        }
    }
    let mut support: Vec<usize> = nearest_k.into_iter().map(|(_, _, position)| position).collect();
    if let Some(at) = support.iter().position(|&p| p == anchor) {
        support.swap(0, at);
    }
    let distances: Vec<f32> = support.iter().map(|&p| to_feature[p].sqrt()).collect();
    reweighting(&distances) * score
}

/// The paper's weight for an image score, from the maximal patch's distances to the anchor's support set
/// (the anchor first): `1 − softmax(distances)[anchor]`.
fn reweighting(distances: &[f32]) -> f32 {
    let max = distances.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = distances.iter().map(|d| (d - max).exp()).sum();
    1.0 - (distances[0] - max).exp() / total
}

impl AnomalyModel for PatchCore {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let (batch, _, height, width) = images.dims4()?;
        let (height, width) = (height.div_ceil(PATCH_STRIDE), width.div_ceil(PATCH_STRIDE));
        let rows = patch_feature_rows(&self.backbone, images)?.contiguous()?;
        let per_image = height * width;
        let mut scores = Vec::with_capacity(batch);
        let distances = match &self.cpu_index {
            Some((index, probes)) => {
                let rows: Vec<f32> = rows.flatten_all()?.to_vec1()?;
                let (squared, _) = index.nearest_squared(&rows, *probes);
                let mut distances: Vec<f32> = squared.into_iter().map(f32::sqrt).collect();
                for (image_rows, image_distances) in
                    rows.chunks_exact(per_image * PATCH_CHANNELS).zip(distances.chunks_exact_mut(per_image))
                {
                    scores.push(exact_image_score(
                        index,
                        *probes,
                        image_rows,
                        image_distances,
                        self.settings.num_neighbors,
                    ));
                }
                distances
            }
            None => {
                let (distances, nearest) = self.nearest_with_tensor_ops(&rows)?;
                for b in 0..batch {
                    let patch_scores = &distances[b * per_image..(b + 1) * per_image];
                    let (argmax, &max) = patch_scores
                        .iter()
                        .enumerate()
                        .max_by(|x, y| x.1.total_cmp(y.1))
                        .context("empty feature map")?;
                    let row = b * per_image + argmax;
                    scores.push(self.reweighted_score(&rows.narrow(0, row, 1)?, max, nearest[row])?);
                }
                distances
            }
        };
        let size = self.image_size as usize;
        Ok(distances
            .chunks_exact(per_image)
            .zip(scores)
            .map(|(patch_scores, score)| {
                let map = ScoreMap::new(width, height, patch_scores.to_vec())
                    .resized(size, size)
                    .blurred(self.settings.blur_sigma);
                AnomalyOutput { score, map }
            })
            .collect())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![("memory_bank".to_string(), self.memory_bank.clone())])
    }

    /// The map as `score_batch` makes it; the image score's re-weighting finds the anchor's `k` nearest bank
    /// entries with `TopK` (ties to the lower index, as the sort here breaks them).
    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, true);
        let (height, width) = (features.dim(2), features.dim(3));
        let rows = layers::positions_as_rows(graph, &features);
        let bank = self.memory_bank.to_device(&Device::Cpu)?;
        let (m, c) = bank.dims2()?;
        let bank_t = graph.floats("memory_bank_t", &[c, m], &bank.t()?.flatten_all()?.to_vec1::<f32>()?);
        let norms = graph.floats(
            "bank_norms",
            &[m],
            &self.bank_norms.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?,
        );
        let squared = layers::squared_distances(graph, &rows, &bank_t, &norms);
        let bank_axis = graph.ints("axis", &[1], &[2]);
        let nearest = graph.op("ReduceMin", &[&squared, &bank_axis], vec![attr_int("keepdims", 0)]);
        let patch_scores =
            graph.op("Sqrt", &[&nearest], vec![]).with_shape(vec![images.shape[0], Some(height * width)]);
        let grid = layers::rows_as_map(graph, &patch_scores, height, width);
        let size = self.image_size as usize;
        let map = layers::resize_bilinear(graph, &grid, size, size);
        let map = layers::blur(graph, &map, self.settings.blur_sigma);

        let position_axis = graph.ints("axis", &[1], &[1]);
        let best = graph.op("ReduceMax", &[&patch_scores, &position_axis], vec![attr_int("keepdims", 0)]);
        let k = self.settings.num_neighbors.min(m);
        if k <= 1 {
            return Ok(RecordedScores { map, score: best.with_shape(vec![images.shape[0]]) });
        }
        // The patch that scores highest, its feature and its nearest bank entry (the anchor).
        let best_position = graph.op("ArgMax", &[&patch_scores], vec![attr_int("axis", 1), attr_int("keepdims", 1)]);
        let nearest_index = graph.op("ArgMin", &[&squared], vec![attr_int("axis", 2), attr_int("keepdims", 0)]);
        let anchor_index = graph.op("GatherElements", &[&nearest_index, &best_position], vec![attr_int("axis", 1)]);
        let last_axis = graph.ints("axis", &[1], &[2]);
        let position3 = graph.op("Unsqueeze", &[&best_position, &last_axis], vec![]);
        let row_shape = graph.ints("shape", &[3], &[1, 1, c as i64]);
        let position_rows = graph.op("Expand", &[&position3, &row_shape], vec![]);
        let feature = graph.op("GatherElements", &[&rows, &position_rows], vec![attr_int("axis", 1)]);
        // The anchor's k nearest bank entries, and the feature's distances to them and to the anchor.
        let bank_rows = graph.floats("memory_bank", &[m, c], &bank.flatten_all()?.to_vec1::<f32>()?);
        let anchor = graph.op("Gather", &[&bank_rows, &anchor_index], vec![attr_int("axis", 0)]);
        let to_anchor = layers::squared_distances(graph, &anchor, &bank_t, &norms);
        let k_value = graph.ints("k", &[1], &[k as i64]);
        let top = graph.op_outputs(
            "TopK",
            &[&to_anchor, &k_value],
            vec![attr_int("axis", -1), attr_int("largest", 0), attr_int("sorted", 1)],
            2,
        );
        let support = &top[1];
        let to_feature = layers::squared_distances(graph, &feature, &bank_t, &norms);
        let support_squared = graph.op("GatherElements", &[&to_feature, support], vec![attr_int("axis", 2)]);
        let distances = graph.op("Sqrt", &[&support_squared], vec![]);
        let anchor3 = graph.op("Unsqueeze", &[&anchor_index, &last_axis], vec![]);
        let anchor_squared = graph.op("GatherElements", &[&to_feature, &anchor3], vec![attr_int("axis", 2)]);
        let anchor_distance = graph.op("Sqrt", &[&anchor_squared], vec![]);
        // weight = 1 − softmax(distances)[anchor]
        let largest = graph.op("ReduceMax", &[&distances, &last_axis], vec![attr_int("keepdims", 1)]);
        let shifted = graph.op("Sub", &[&distances, &largest], vec![]);
        let exponentials = graph.op("Exp", &[&shifted], vec![]);
        let total = graph.op("ReduceSum", &[&exponentials, &last_axis], vec![attr_int("keepdims", 1)]);
        let anchor_shifted = graph.op("Sub", &[&anchor_distance, &largest], vec![]);
        let anchor_exponential = graph.op("Exp", &[&anchor_shifted], vec![]);
        let share = graph.op("Div", &[&anchor_exponential, &total], vec![]);
        let one = graph.scalar("one", 1.0);
        let weight = graph.op("Sub", &[&one, &share], vec![]);
        let flat = graph.ints("shape", &[1], &[-1]);
        let weight = graph.op("Reshape", &[&weight, &flat], vec![]);
        let score = graph.op("Mul", &[&weight, &best], vec![]).with_shape(vec![images.shape[0]]);
        Ok(RecordedScores { map, score })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic::clustered_features;
    use crate::methods::representation::nearest::nearest_squared;
    use crate::progress::NoProgress;

    /// A model on `bank` that searches with the tensor ops (as on a GPU), without backbone weights.
    fn tensor_search_model(bank: &[f32]) -> Result<PatchCore> {
        let bank_tensor = Tensor::from_vec(bank.to_vec(), (bank.len() / PATCH_CHANNELS, PATCH_CHANNELS), &Device::Cpu)?;
        Ok(PatchCore {
            backbone: Arc::new(Backbone::without_weights_for_tests()),
            settings: PatchCoreSettings::default(),
            image_size: 64,
            memory_bank_t: bank_tensor.t()?.contiguous()?,
            bank_norms: bank_tensor.sqr()?.sum_keepdim(1)?.t()?.contiguous()?,
            memory_bank: bank_tensor,
            cpu_index: None,
        })
    }

    /// Largest distance from any point to its nearest bank row: what a coreset minimises.
    fn covering_radius(points: &[f32], bank: &[f32]) -> f32 {
        let norms: Vec<f32> = bank.chunks_exact(PATCH_CHANNELS).map(|r| r.iter().map(|v| v * v).sum()).collect();
        let (squared, _) = nearest_squared(points, bank, &norms, PATCH_CHANNELS);
        squared.into_iter().fold(0f32, f32::max).sqrt()
    }

    /// Selection over chunks: the bank has the rows the ratio and bound ask for, never holds more than a chunk
    /// plus the candidates, and covers the points about as well as one pass over all of them.
    #[test]
    fn a_bank_chosen_over_chunks_covers_like_one_pass_and_keeps_its_bound() -> Result<()> {
        let images = 40;
        let patches_per_image = 100;
        let points = clustered_features(images * patches_per_image, PATCH_CHANNELS, 8, 9);
        let select = |chunk_rows: usize, max_bank: usize| -> Result<(Vec<f32>, usize)> {
            let settings = PatchCoreSettings { max_bank, ..PatchCoreSettings::default() };
            let mut selection = BankSelection {
                settings: &settings,
                images,
                patches_per_image,
                chunk_rows,
                candidates: Vec::new(),
                chunks_cut: 0,
                rows_cut: 0,
            };
            let mut chunk = Vec::new();
            let mut most_candidates = 0;
            for image in points.chunks(patches_per_image * PATCH_CHANNELS) {
                chunk.extend_from_slice(image);
                if chunk.len() / PATCH_CHANNELS >= chunk_rows {
                    selection.cut_chunk(std::mem::take(&mut chunk), &NoProgress)?;
                    most_candidates = most_candidates.max(selection.candidates.len() / PATCH_CHANNELS);
                }
            }
            Ok((selection.finish(chunk, &NoProgress)?, most_candidates))
        };
        let (one_pass, _) = select(usize::MAX, 0)?;
        let (chunked, most_candidates) = select(1000, 0)?;
        assert_eq!(one_pass.len() / PATCH_CHANNELS, 400, "10 % of 4,000 patches");
        assert_eq!(chunked.len() / PATCH_CHANNELS, 400);
        assert!(most_candidates <= 400, "each chunk keeps its share of the bank: {most_candidates}");
        let (one, two) = (covering_radius(&points, &one_pass), covering_radius(&points, &chunked));
        assert!(two <= one * 1.25, "chunked radius {two} against one pass {one}");
        let (bounded, _) = select(1000, 150)?;
        assert_eq!(bounded.len() / PATCH_CHANNELS, 150, "the bound wins over the ratio");
        Ok(())
    }

    #[test]
    fn fused_cpu_search_matches_the_tensor_ops() -> Result<()> {
        let bank = clustered_features(700, PATCH_CHANNELS, 8, 1);
        let rows = clustered_features(300, PATCH_CHANNELS, 8, 2);
        let norms: Vec<f32> = bank.chunks_exact(PATCH_CHANNELS).map(|r| r.iter().map(|v| v * v).sum()).collect();
        let (fused_squared, fused_indices) = nearest_squared(&rows, &bank, &norms, PATCH_CHANNELS);
        let fused_distances: Vec<f32> = fused_squared.into_iter().map(f32::sqrt).collect();
        let model = tensor_search_model(&bank)?;
        let rows_tensor = Tensor::from_vec(rows, (300, PATCH_CHANNELS), &Device::Cpu)?;
        let (distances, indices) = model.nearest_with_tensor_ops(&rows_tensor)?;
        assert_eq!(fused_indices, indices);
        for (a, b) in fused_distances.iter().zip(&distances) {
            assert!((a - b).abs() <= 1e-3 * b.max(1.0), "{a} vs {b}");
        }
        Ok(())
    }

    /// The CPU path's image score through a coarse index (one probe, which misses often) equals the tensor
    /// search's exhaustive score, re-weighting included.
    #[test]
    fn indexed_image_scores_are_the_exhaustive_ones() -> Result<()> {
        let m = 3000;
        let bank = clustered_features(m, PATCH_CHANNELS, 12, 5);
        let model = tensor_search_model(&bank)?;
        let index = InvertedIndex::build(&bank, PATCH_CHANNELS, 40, 0);
        let norms: Vec<f32> = bank.chunks_exact(PATCH_CHANNELS).map(|r| r.iter().map(|v| v * v).sum()).collect();
        let mut missed = 0;
        for seed in 0..5 {
            // Patches off the bank's clusters, as a defect's are.
            let rows: Vec<f32> =
                clustered_features(256, PATCH_CHANNELS, 12, 100 + seed).iter().map(|v| v * 1.3 + 0.5).collect();
            let rows_tensor = Tensor::from_vec(rows.clone(), (256, PATCH_CHANNELS), &Device::Cpu)?;
            let (exact, nearest) = model.nearest_with_tensor_ops(&rows_tensor)?;
            let (argmax, &max) = exact.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap();
            let expected = model.reweighted_score(&rows_tensor.narrow(0, argmax, 1)?, max, nearest[argmax])?;

            let (squared, _) = index.nearest_squared(&rows, 1);
            let (exhaustive, _) = nearest_squared(&rows, &bank, &norms, PATCH_CHANNELS);
            missed += squared.iter().zip(&exhaustive).filter(|(s, e)| **s > **e * 1.001).count();
            let mut distances: Vec<f32> = squared.into_iter().map(f32::sqrt).collect();
            let score = exact_image_score(&index, 1, &rows, &mut distances, model.settings.num_neighbors);
            assert!((score - expected).abs() <= 1e-4 * expected, "seed {seed}: {score} vs exhaustive {expected}");
            let map_max = distances.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!((map_max - max).abs() <= 1e-4 * max, "the map's maximum is the exact one");
        }
        assert!(missed > 0, "one probe found every nearest entry: the test would prove nothing");
        Ok(())
    }

    #[test]
    fn an_empty_or_nan_bank_from_a_file_is_an_error_or_a_score_never_a_panic() -> Result<()> {
        let backbone = Arc::new(Backbone::without_weights_for_tests());
        let empty =
            HashMap::from([("memory_bank".to_string(), Tensor::zeros((0, PATCH_CHANNELS), DType::F32, &Device::Cpu)?)]);
        let error = PatchCore::load(backbone.clone(), 64, PatchCoreSettings::default(), empty).err().expect("refused");
        assert!(error.to_string().contains("empty"), "{error}");
        // A bank of NaN (a corrupt file) indexed and searched: scores are NaN, which the caller reports.
        let bank = vec![f32::NAN; 40 * PATCH_CHANNELS];
        let index = InvertedIndex::build(&bank, PATCH_CHANNELS, 4, 0);
        let rows = clustered_features(16, PATCH_CHANNELS, 2, 1);
        let (squared, _) = index.nearest_squared(&rows, 2);
        let mut distances: Vec<f32> = squared.into_iter().map(f32::sqrt).collect();
        exact_image_score(&index, 2, &rows, &mut distances, 9);
        Ok(())
    }
}
