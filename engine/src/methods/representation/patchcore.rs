//! PatchCore — Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection" (CVPR);
//! reference code: amazon-science/patchcore-inspection, and anomalib's `models/image/patchcore`.
//!
//! Fit: locally aware patch features of every normal training image form a memory bank, reduced to a coreset
//! (greedy k-center, default 10 %). Score: each test patch's distance to its nearest bank entry is the anomaly
//! map (upsampled to the input, Gaussian σ = 4); the image score is the largest patch distance, re-weighted by
//! how isolated its nearest bank entry is among its `num_neighbors` neighbours (the paper's Eq. 7).

use super::coreset::{greedy_coreset, random_projection, CoresetMethod};
use crate::backbone::Backbone;
use crate::dataset::DecodedImage;
use crate::maps::ScoreMap;
use crate::methods::features::{patch_feature_rows, PATCH_CHANNELS, PATCH_STRIDE};
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
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
    ranges: ["coreset_ratio": 0.000001..=1, "num_neighbors": 1..=1024, "projection_dim": 0..=1024],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PatchCoreSettings {
    /// Fraction of all training patches kept in the memory bank.
    pub coreset_ratio: f64,
    /// Bank neighbours used to re-weight the image score (1 = plain maximum).
    pub num_neighbors: usize,
    /// Dimensions of the random projection used while selecting the coreset (0 = no projection).
    pub projection_dim: usize,
    /// `auto` (exact greedy for small coresets, spatial cells above), `exact` or `cells`.
    pub coreset_method: CoresetMethod,
    pub seed: u64,
    /// σ of the Gaussian that smooths the anomaly map, in input pixels.
    pub blur_sigma: f32,
}

impl Default for PatchCoreSettings {
    fn default() -> Self {
        Self {
            coreset_ratio: 0.1,
            num_neighbors: 9,
            projection_dim: 128,
            coreset_method: CoresetMethod::Auto,
            seed: 0,
            blur_sigma: 4.0,
        }
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
    /// Host copy of the bank and its norms for the fused CPU nearest-neighbour search.
    cpu_bank: Option<(Vec<f32>, Vec<f32>)>,
}

impl PatchCore {
    pub fn fit(context: &FitContext, images: &[DecodedImage], settings: PatchCoreSettings) -> Result<Self> {
        if images.is_empty() {
            bail!("PatchCore needs at least one training image");
        }
        if !(settings.coreset_ratio > 0.0 && settings.coreset_ratio <= 1.0) {
            bail!("coreset_ratio must be in (0, 1], got {}", settings.coreset_ratio);
        }
        let progress = context.progress;
        progress.begin("features", images.len() as u64);
        let mut bank: Vec<f32> = Vec::new();
        for batch in images.chunks(context.batch_size.max(1)) {
            check_cancelled(progress)?;
            let refs: Vec<&DecodedImage> = batch.iter().collect();
            let tensor = images_to_tensor(&refs, &context.device)?;
            let rows = patch_feature_rows(&context.backbone, &tensor)?;
            bank.extend(rows.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
            progress.advance(batch.len() as u64);
        }
        let patches = bank.len() / PATCH_CHANNELS;
        let count = ((patches as f64 * settings.coreset_ratio).ceil() as usize).clamp(1, patches);
        let selected = if count == patches {
            (0..patches).collect()
        } else if settings.projection_dim > 0 && settings.projection_dim < PATCH_CHANNELS {
            let projected = random_projection(&bank, PATCH_CHANNELS, settings.projection_dim, settings.seed);
            greedy_coreset(
                &projected,
                settings.projection_dim,
                count,
                settings.seed,
                settings.coreset_method,
                progress,
            )?
        } else {
            greedy_coreset(&bank, PATCH_CHANNELS, count, settings.seed, settings.coreset_method, progress)?
        };
        let mut coreset = Vec::with_capacity(count * PATCH_CHANNELS);
        for i in selected {
            coreset.extend_from_slice(&bank[i * PATCH_CHANNELS..(i + 1) * PATCH_CHANNELS]);
        }
        drop(bank);
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
        let cpu_bank = if memory_bank.device().is_cpu() {
            Some((memory_bank.flatten_all()?.to_vec1()?, bank_norms.flatten_all()?.to_vec1()?))
        } else {
            None
        };
        Ok(Self { backbone, settings, image_size, memory_bank, memory_bank_t, bank_norms, cpu_bank })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: PatchCoreSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let bank = tensors.remove("memory_bank").context("model file has no `memory_bank` tensor")?;
        let (_, channels) = bank.dims2().context("memory_bank must be 2-D")?;
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

    /// Nearest bank entry of every row: (distance, index).
    fn nearest(&self, rows: &Tensor) -> Result<(Vec<f32>, Vec<u32>)> {
        if let Some((bank, bank_norms)) = &self.cpu_bank {
            return Ok(nearest_on_cpu(&rows.flatten_all()?.to_vec1()?, bank, bank_norms));
        }
        self.nearest_with_tensor_ops(rows)
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
        let max = distances.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = distances.iter().map(|d| (d - max).exp()).sum();
        let weight = 1.0 - (distances[0] - max).exp() / total;
        Ok(weight * score)
    }
}

/// Nearest bank row of every query row, fused: one gemm per block of queries into a buffer that stays in cache,
/// then min/argmin of `|b|² − 2 q·b` over it (`|q|²` is added after). Blocks run in parallel.
fn nearest_on_cpu(rows: &[f32], bank: &[f32], bank_norms: &[f32]) -> (Vec<f32>, Vec<u32>) {
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    let (m, c) = (bank_norms.len(), PATCH_CHANNELS);
    let n = rows.len() / c;
    let mut distances = vec![0f32; n];
    let mut indices = vec![0u32; n];
    distances.par_chunks_mut(BLOCK).zip(indices.par_chunks_mut(BLOCK)).enumerate().for_each(
        |(block, (block_distances, block_indices))| {
            let queries = &rows[block * BLOCK * c..(block * BLOCK + block_distances.len()) * c];
            let q = block_distances.len();
            let mut dots = vec![0f32; q * m];
            // SAFETY: row-major q×c times (m×c)ᵀ into q×m, all buffers sized accordingly.
            unsafe {
                gemm::gemm(
                    q,
                    m,
                    c,
                    dots.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    queries.as_ptr(),
                    1,
                    c as isize,
                    bank.as_ptr(),
                    c as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row_dots) in dots.chunks_exact(m).enumerate() {
                let (mut best, mut best_index) = (f32::INFINITY, 0u32);
                for (j, (&dot, &norm)) in row_dots.iter().zip(bank_norms).enumerate() {
                    let partial = norm - 2.0 * dot;
                    if partial < best {
                        best = partial;
                        best_index = j as u32;
                    }
                }
                let query = &queries[i * c..(i + 1) * c];
                let query_norm: f32 = query.iter().map(|v| v * v).sum();
                block_distances[i] = (best + query_norm).max(0.0).sqrt();
                block_indices[i] = best_index;
            }
        },
    );
    (distances, indices)
}

impl AnomalyModel for PatchCore {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let (batch, _, height, width) = images.dims4()?;
        let (height, width) = (height.div_ceil(PATCH_STRIDE), width.div_ceil(PATCH_STRIDE));
        let rows = patch_feature_rows(&self.backbone, images)?.contiguous()?;
        let (distances, nearest) = self.nearest(&rows)?;
        let per_image = height * width;
        let size = self.image_size as usize;
        let mut outputs = Vec::with_capacity(batch);
        for b in 0..batch {
            let patch_scores = &distances[b * per_image..(b + 1) * per_image];
            let (argmax, &max) =
                patch_scores.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).context("empty feature map")?;
            let row = b * per_image + argmax;
            let score = self.reweighted_score(&rows.narrow(0, row, 1)?, max, nearest[row])?;
            let map = ScoreMap::new(width, height, patch_scores.to_vec())
                .resized(size, size)
                .blurred(self.settings.blur_sigma);
            outputs.push(AnomalyOutput { score, map });
        }
        Ok(outputs)
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

    #[test]
    fn fused_cpu_search_matches_the_tensor_ops() -> Result<()> {
        let bank = clustered_features(700, PATCH_CHANNELS, 8, 1);
        let rows = clustered_features(300, PATCH_CHANNELS, 8, 2);
        let bank_tensor = Tensor::from_vec(bank.clone(), (700, PATCH_CHANNELS), &Device::Cpu)?;
        let norms: Vec<f32> = bank.chunks_exact(PATCH_CHANNELS).map(|r| r.iter().map(|v| v * v).sum()).collect();
        let (fused_distances, fused_indices) = nearest_on_cpu(&rows, &bank, &norms);
        let model = PatchCore {
            backbone: Arc::new(Backbone::without_weights_for_tests()),
            settings: PatchCoreSettings::default(),
            image_size: 64,
            memory_bank_t: bank_tensor.t()?.contiguous()?,
            bank_norms: bank_tensor.sqr()?.sum_keepdim(1)?.t()?.contiguous()?,
            memory_bank: bank_tensor,
            cpu_bank: None,
        };
        let rows_tensor = Tensor::from_vec(rows, (300, PATCH_CHANNELS), &Device::Cpu)?;
        let (distances, indices) = model.nearest_with_tensor_ops(&rows_tensor)?;
        assert_eq!(fused_indices, indices);
        for (a, b) in fused_distances.iter().zip(&distances) {
            assert!((a - b).abs() <= 1e-3 * b.max(1.0), "{a} vs {b}");
        }
        Ok(())
    }
}
