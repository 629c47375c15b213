//! Semi-orthogonal embedding — Kim, Jang, Kang & Kim 2021, "Semi-orthogonal Embedding for Efficient
//! Unsupervised Anomaly Localization" (arXiv 2105.14737); reference code: the authors' `semi-orthogonal`.
//!
//! PaDiM with one change: instead of keeping a random subset of the 152 channels, each patch's features are
//! projected by a random semi-orthogonal matrix W (152 × k, orthonormal columns: the Q of a seeded Gaussian
//! matrix's QR decomposition), which keeps the Mahalanobis distance's geometry better for the same k. At every
//! position of the stride-8 grid a Gaussian of the k-dimensional embedding; the map is the Mahalanobis distance
//! (upsampled, blurred), the score its maximum. The fit and the scoring are PaDiM's
//! ([`PositionGaussians`](crate::methods::gaussian::PositionGaussians)), only the reduction differs.

use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::features::PATCH_CHANNELS;
use crate::methods::gaussian::{grid_size, position_outputs, PositionGaussians};
use crate::methods::setting_docs::common;
use crate::methods::training::take_tensor;
use crate::methods::representation::padim::record_position_distances;
use crate::methods::{AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::{layers, Graph, Value};
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    SemiOrthogonal,
    SemiOrthogonalSettings,
    name: "semi-orthogonal",
    title: "Semi-orthogonal embedding",
    family: Family::Representation,
    summary: "PaDiM's per-position Gaussian on a random semi-orthogonal projection of the features; Mahalanobis distance.",
    guide: "Wins where PaDiM does, a little more faithfully for the same size. On 2 CPU cores, MTD (761 training images): fit 23 s, 48 images/s, image AUROC 0.967.",
    ranges: ["embedding_dim": 1..=152, "regularization": 0..=1000],
    docs: [
        "embedding_dim" => common("Embedding size", "dims", "Dimensions of the random semi-orthogonal projection of the 152 features (k in the paper).", false),
        "regularization" => common("Covariance ε", "", "Added to each position's covariance diagonal so it can be inverted.", true),
    ],
    smoke: ({} at 96, floors [0.9, 0.85, 0.5]),
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SemiOrthogonalSettings {
    /// k: columns of the projection.
    pub embedding_dim: usize,
    /// ε added to the covariance diagonal.
    pub regularization: f64,
    pub seed: u64,
    pub blur_sigma: f32,
}

impl Default for SemiOrthogonalSettings {
    fn default() -> Self {
        // Chosen on label-free validation (ARCHITECTURE.md, "New methods").
        Self { embedding_dim: 150, regularization: 0.01, seed: 0, blur_sigma: 4.0 }
    }
}

pub struct SemiOrthogonal {
    backbone: Arc<Backbone>,
    settings: SemiOrthogonalSettings,
    image_size: u32,
    /// `(152, k)` row-major, orthonormal columns.
    projection: Vec<f32>,
    gaussians: PositionGaussians,
}

/// W: the first `k` columns of Q in the QR decomposition of a seeded `152 × k` standard Gaussian matrix.
fn semi_orthogonal(k: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ 0x5e31_0f70);
    let gaussian = nalgebra::DMatrix::from_fn(PATCH_CHANNELS, k, |_, _| rng.normal() as f64);
    let q = gaussian.qr().q();
    (0..PATCH_CHANNELS).flat_map(|c| (0..k).map(move |j| (c, j))).map(|(c, j)| q[(c, j)] as f32).collect()
}

/// x = Wᵀ·row for a row of 152 features.
fn project(projection: &[f32], row: &[f32], x: &mut [f32]) {
    x.fill(0.0);
    for (&value, weights) in row.iter().zip(projection.chunks_exact(x.len())) {
        x.iter_mut().zip(weights).for_each(|(out, w)| *out += value * w);
    }
}

impl SemiOrthogonal {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: SemiOrthogonalSettings) -> Result<Self> {
        if images.len() < 2 {
            bail!("semi-orthogonal embedding needs at least two training images, got {}", images.len());
        }
        let k = settings.embedding_dim;
        if k == 0 || k > PATCH_CHANNELS {
            bail!("embedding_dim must be in 1..={PATCH_CHANNELS}, got {k}");
        }
        let projection = semi_orthogonal(k, settings.seed);
        let reduce = |row: &[f32], x: &mut [f32]| project(&projection, row, x);
        let gaussians = PositionGaussians::fit(context, images, k, reduce, settings.regularization)?;
        Ok(Self { backbone: context.backbone.clone(), settings, image_size: context.image_size, projection, gaussians })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: SemiOrthogonalSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let k = settings.embedding_dim;
        let positions = grid_size(image_size).pow(2);
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(take_tensor(&mut tensors, name, shape, &Device::Cpu)?.flatten_all()?.to_vec1()?)
        };
        let projection = take("projection", &[PATCH_CHANNELS, k])?;
        let mean = take("mean", &[positions, k])?;
        let whitening = take("whitening", &[positions, k, k])?;
        Ok(Self { backbone, settings, image_size, projection, gaussians: PositionGaussians { d: k, mean, whitening } })
    }
}

impl AnomalyModel for SemiOrthogonal {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let PositionGaussians { d, mean, whitening } = &self.gaussians;
        let reduce = |row: &[f32], x: &mut [f32]| project(&self.projection, row, x);
        position_outputs(&self.backbone, images, self.image_size, *d, mean, whitening, reduce, self.settings.blur_sigma)
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, false);
        let rows = layers::positions_as_rows(graph, &features);
        let PositionGaussians { d, mean, whitening } = &self.gaussians;
        let projection = graph.floats("projection", &[PATCH_CHANNELS, *d], &self.projection);
        let positions = grid_size(self.image_size).pow(2);
        let embedded =
            graph.op("MatMul", &[&rows, &projection], vec![]).with_shape(vec![rows.shape[0], Some(positions), Some(*d)]);
        let gaussians = (*d, mean.as_slice(), whitening.as_slice());
        Ok(record_position_distances(graph, &embedded, gaussians, self.image_size, self.settings.blur_sigma))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let PositionGaussians { d, mean, whitening } = &self.gaussians;
        let positions = mean.len() / d;
        Ok(vec![
            ("projection".into(), Tensor::from_vec(self.projection.clone(), (PATCH_CHANNELS, *d), &Device::Cpu)?),
            ("mean".into(), Tensor::from_vec(mean.clone(), (positions, *d), &Device::Cpu)?),
            ("whitening".into(), Tensor::from_vec(whitening.clone(), (positions, *d, *d), &Device::Cpu)?),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projection_has_orthonormal_columns_and_is_seeded() {
        let k = 20;
        let w = semi_orthogonal(k, 3);
        for i in 0..k {
            for j in 0..k {
                let dot: f32 = (0..PATCH_CHANNELS).map(|c| w[c * k + i] * w[c * k + j]).sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((dot - expected).abs() < 1e-5, "column {i} · column {j} = {dot}");
            }
        }
        assert_eq!(w, semi_orthogonal(k, 3));
        assert_ne!(w, semi_orthogonal(k, 4));
    }
}
