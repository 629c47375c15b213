//! SPADE — Cohen & Hoshen 2020, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences" (arXiv
//! 2005.02357); reference code: the authors' `spade` description and its public re-implementations.
//!
//! Two stages of nearest neighbours, no training. Retrieval: each image's features averaged over the image (the
//! 152 patch channels) are compared with the training images'; the `neighbours` nearest training images are
//! its references (the paper also scores the image by the mean distance to them: `image_score = neighbours`;
//! by default here the map's maximum is the score). Correspondence: each
//! patch of the stride-8 grid is compared with every patch of those references; its distance to the nearest is
//! the anomaly map (upsampled, blurred). The references' patches are a gallery of at most `gallery_images`
//! training images (a seeded choice when there are more), held in half precision in memory (f32 in the model
//! file): SPADE's memory grows with its gallery, by design.
//!
//! Backbone: the paper uses a Wide-ResNet-50's last three stages; here Lite0's stride-8 and stride-16 maps,
//! 3×3-averaged as PatchCore's (the features every patch method here shares).

use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::maps::ScoreMap;
use crate::methods::features::{patch_feature_rows, PATCH_CHANNELS};
use crate::methods::gaussian::grid_size;
use crate::methods::setting_docs::common;
use crate::methods::training::take_tensor;
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Spade,
    SpadeSettings,
    name: "spade",
    title: "SPADE",
    family: Family::Representation,
    summary: "Nearest training images by their average features, then each patch's nearest patch among theirs.",
    guide: "Wins on parts with a few distinct good appearances (variants, lighting): each test image is compared with the good images most like it. No training; memory grows with the gallery. On 2 CPU cores, MTD (761 training images): fit 34 s, 3.6 images/s, image AUROC 0.946, the best pixel AUROC (0.824).",
    ranges: ["neighbours": 1..=256, "gallery_images": 2..=4096],
    docs: [
        "neighbours" => common("Reference images", "", "Nearest training images retrieved per test image (K in the paper); its patches are compared with theirs.", false),
        "gallery_images" => common("Gallery size", "images", "Most training images whose patches are kept (a seeded choice beyond it): bounds the model's memory, 0.3 MB per image at 256².", true),
        "image_score" => common("Image score", "", "neighbours: the mean distance to the reference images (the paper); map: the map's maximum.", true),
    ],
    smoke: ({"neighbours": 5} at 96, floors [0.9, 0.85, 0.5]),
);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SpadeImageScore {
    /// Mean distance of the image's average features to its reference images' (the paper).
    Neighbours,
    /// The anomaly map's maximum.
    Map,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SpadeSettings {
    pub neighbours: usize,
    pub gallery_images: usize,
    pub image_score: SpadeImageScore,
    pub seed: u64,
    pub blur_sigma: f32,
}

impl Default for SpadeSettings {
    fn default() -> Self {
        // The map's maximum as the image score: chosen on label-free validation, where the paper's retrieval
        // distance ranked images far worse (ARCHITECTURE.md, "New methods").
        Self { neighbours: 50, gallery_images: 400, image_score: SpadeImageScore::Map, seed: 0, blur_sigma: 4.0 }
    }
}

pub struct Spade {
    backbone: Arc<Backbone>,
    settings: SpadeSettings,
    image_size: u32,
    /// `(images, 152)`: each gallery image's average features.
    averages: Tensor,
    /// `(images, positions, 152)`: each gallery image's patch features.
    gallery: Tensor,
}

/// Patch rows `(B, positions, 152)` and their averages over each image `(B, 152)`.
fn features(backbone: &Backbone, images: &Tensor, positions: usize) -> Result<(Tensor, Tensor)> {
    let rows = patch_feature_rows(backbone, images)?.reshape((images.dim(0)?, positions, PATCH_CHANNELS))?;
    let averages = rows.mean(1)?;
    Ok((rows, averages))
}

/// Squared Euclidean distances between the rows of `a` `(n, c)` and of `b` `(m, c)`: `(n, m)`, never negative.
fn squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a_norms = a.sqr()?.sum_keepdim(1)?;
    let b_norms = b.sqr()?.sum_keepdim(1)?.t()?;
    let products = a.matmul(&b.t()?)?;
    Ok(a_norms.broadcast_add(&b_norms)?.broadcast_sub(&(products * 2.0)?)?.relu()?)
}

/// The gallery: every training image when there are at most `limit`, else a seeded choice of `limit`, sorted.
fn gallery_indices(count: usize, limit: usize, seed: u64) -> Vec<usize> {
    SplitMix64::new(seed ^ 0x59ade).subset(count, limit)
}

impl Spade {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: SpadeSettings) -> Result<Self> {
        if images.len() < 2 {
            bail!("SPADE needs at least two training images, got {}", images.len());
        }
        let positions = grid_size(context.image_size).pow(2);
        let chosen = gallery_indices(images.len(), settings.gallery_images, settings.seed);
        let progress = context.progress;
        progress.begin("features", chosen.len() as u64);
        let (mut rows, mut averages) = (Vec::new(), Vec::new());
        for batch in chosen.chunks(context.batch_size.max(1)) {
            check_cancelled(progress)?;
            let batch = images.select(batch)?;
            let (batch_rows, batch_averages) =
                features(&context.backbone, &images_to_tensor(&batch, &context.device)?, positions)?;
            // Half precision: the gallery is most of the model's memory and file.
            rows.push(batch_rows.to_dtype(DType::F16)?);
            averages.push(batch_averages);
            progress.advance(batch.len() as u64);
        }
        let gallery = Tensor::cat(&rows, 0)?;
        let averages = Tensor::cat(&averages, 0)?;
        Ok(Self { backbone: context.backbone.clone(), settings, image_size: context.image_size, averages, gallery })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: SpadeSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let positions = grid_size(image_size).pow(2);
        let device = backbone.device.clone();
        let count = tensors.get("averages").map_or(0, |t| t.dims().first().copied().unwrap_or(0));
        if !(2..=settings.gallery_images.max(2)).contains(&count) {
            bail!("SPADE's gallery has {count} images, outside 2..={}", settings.gallery_images);
        }
        let averages = take_tensor(&mut tensors, "averages", &[count, PATCH_CHANNELS], &device)?;
        let gallery =
            take_tensor(&mut tensors, "gallery", &[count, positions, PATCH_CHANNELS], &device)?.to_dtype(DType::F16)?;
        Ok(Self { backbone, settings, image_size, averages, gallery })
    }
}

impl AnomalyModel for Spade {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let side = grid_size(self.image_size);
        let (rows, averages) = features(&self.backbone, images, side * side)?;
        // Retrieval by the distances themselves (a few hundred gallery images): a near-tie among the nearest
        // then orders the same in Loupe and in an export, which the expanded form's rounding did not ensure.
        let image_distances =
            averages.unsqueeze(1)?.broadcast_sub(&self.averages.unsqueeze(0)?)?.sqr()?.sum(D::Minus1)?.sqrt()?;
        let k = self.settings.neighbours.min(self.averages.dim(0)?);
        let nearest = image_distances.arg_sort_last_dim(true)?.narrow(1, 0, k)?.contiguous()?;
        let size = self.image_size as usize;
        (0..images.dim(0)?)
            .map(|b| {
                let references = nearest.get(b)?;
                let distances = image_distances.get(b)?.gather(&references, 0)?;
                let reference_rows = self.gallery.index_select(&references, 0)?.to_dtype(DType::F32)?;
                let reference_rows = reference_rows.reshape(((), PATCH_CHANNELS))?;
                // The nearest patch by the expanded form, the distance to it directly: near zero the expanded
                // form's rounding, magnified by the square root, would make an export's map differ.
                let image_rows = rows.get(b)?;
                let nearest = squared_distances(&image_rows, &reference_rows)?.argmin(D::Minus1)?;
                let patch = (image_rows - reference_rows.index_select(&nearest, 0)?)?.sqr()?.sum(1)?.sqrt()?;
                let cells: Vec<f32> = patch.to_device(&Device::Cpu)?.to_vec1()?;
                let map = ScoreMap::new(side, side, cells).resized(size, size).blurred(self.settings.blur_sigma);
                let score = match self.settings.image_score {
                    SpadeImageScore::Neighbours => distances.mean_all()?.to_scalar::<f32>()?,
                    SpadeImageScore::Map => map.max(),
                };
                Ok(AnomalyOutput { score, map })
            })
            .collect()
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let side = grid_size(self.image_size);
        let positions = side * side;
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, true);
        let rows = layers::positions_as_rows(graph, &features);
        let positions_axis = graph.ints("axis", &[1], &[1]);
        let averages = graph.op("ReduceMean", &[&rows, &positions_axis], vec![attr_int("keepdims", 0)]);
        // Retrieval: the distances to the gallery's averages, the `neighbours` nearest (ascending, as arg_sort).
        let count = self.averages.dim(0)?;
        let gallery_averages: Vec<f32> = self.averages.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let gallery_averages = graph.floats("gallery_averages", &[count, PATCH_CHANNELS], &gallery_averages);
        let averages = graph.op("Unsqueeze", &[&averages, &positions_axis], vec![]);
        let differences = graph.op("Sub", &[&averages, &gallery_averages], vec![]);
        let last = graph.ints("axis", &[1], &[-1]);
        let squared = graph.op("ReduceSumSquare", &[&differences, &last], vec![attr_int("keepdims", 0)]);
        let image_distances = graph.op("Sqrt", &[&squared], vec![]);
        let k = self.settings.neighbours.min(count);
        let k_value = graph.ints("k", &[1], &[k as i64]);
        let nearest = graph.op_outputs(
            "TopK",
            &[&image_distances, &k_value],
            vec![attr_int("axis", 1), attr_int("largest", 0), attr_int("sorted", 1)],
            2,
        );
        // Correspondence: each patch's nearest patch among the references' `(N, k·P, C)`.
        let gallery: Vec<f32> = self.gallery.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let gallery = graph.floats("gallery", &[count, positions, PATCH_CHANNELS], &gallery);
        let references = graph.op("Gather", &[&gallery, &nearest[1]], vec![attr_int("axis", 0)]);
        let flat = graph.ints("shape", &[3], &[0, (k * positions) as i64, PATCH_CHANNELS as i64]);
        let references = graph.op("Reshape", &[&references, &flat], vec![]).with_shape(vec![
            images.shape[0],
            Some(k * positions),
            Some(PATCH_CHANNELS),
        ]);
        let references_t = layers::transpose(graph, &references, &[0, 2, 1]);
        let dots = graph.op("MatMul", &[&rows, &references_t], vec![]);
        let minus_two = graph.scalar("minus_two", -2.0);
        let dots = graph.op("Mul", &[&dots, &minus_two], vec![]);
        let last = graph.ints("axis", &[1], &[-1]);
        let row_norms = graph.op("ReduceSumSquare", &[&rows, &last], vec![attr_int("keepdims", 1)]);
        let reference_norms = graph.op("ReduceSumSquare", &[&references, &last], vec![attr_int("keepdims", 0)]);
        let reference_norms = graph.op("Unsqueeze", &[&reference_norms, &positions_axis], vec![]);
        let with_rows = graph.op("Add", &[&dots, &row_norms], vec![]);
        let squared = graph.op("Add", &[&with_rows, &reference_norms], vec![]);
        let squared = graph.op("Relu", &[&squared], vec![]);
        // As `score_batch`: the nearest reference patch by the expanded form, the distance to it directly.
        let nearest_patch = graph.op("ArgMin", &[&squared], vec![attr_int("axis", -1), attr_int("keepdims", 1)]);
        let row_shape = graph.op("Shape", &[&rows], vec![]);
        let nearest_patch = graph.op("Expand", &[&nearest_patch, &row_shape], vec![]);
        let nearest_rows = graph.op("GatherElements", &[&references, &nearest_patch], vec![attr_int("axis", 1)]);
        let difference = graph.op("Sub", &[&rows, &nearest_rows], vec![]);
        let squared = graph.op("ReduceSumSquare", &[&difference, &last], vec![attr_int("keepdims", 0)]);
        let cells = graph.op("Sqrt", &[&squared], vec![]).with_shape(vec![images.shape[0], Some(positions)]);
        let scores = layers::map_and_score(graph, &cells, side, self.image_size as usize, self.settings.blur_sigma);
        Ok(match self.settings.image_score {
            SpadeImageScore::Map => scores,
            SpadeImageScore::Neighbours => {
                let mean = graph.op("ReduceMean", &[&nearest[0], &last], vec![attr_int("keepdims", 0)]);
                RecordedScores { map: scores.map, score: mean.with_shape(vec![images.shape[0]]) }
            }
        })
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("averages".into(), self.averages.to_device(&Device::Cpu)?),
            // The model file holds f32 only; the gallery is kept in half precision once loaded.
            ("gallery".into(), self.gallery.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
        ])
    }
}
