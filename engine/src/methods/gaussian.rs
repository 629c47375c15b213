//! Multivariate Gaussians of feature vectors, as the representation and augmentation methods use them: the
//! whitening matrix W = L⁻¹ of the Cholesky factor Σ = L·Lᵀ turns the Mahalanobis distance into a length,
//! |W·(x − μ)|.

use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::maps::ScoreMap;
use crate::methods::features::{plain_feature_rows, PATCH_CHANNELS, PATCH_STRIDE};
use crate::methods::{images_to_tensor, AnomalyOutput, FitContext};
use crate::progress::check_cancelled;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Mean and covariance of vectors of dimension `d`, accumulated in f64 (upper triangle of Σxxᵀ).
#[derive(Debug, Clone)]
pub struct MomentSums {
    d: usize,
    count: f64,
    sum: Vec<f64>,
    products: Vec<f64>,
}

impl MomentSums {
    pub fn new(d: usize) -> Self {
        Self { d, count: 0.0, sum: vec![0.0; d], products: vec![0.0; d * d] }
    }

    pub fn add(&mut self, x: &[f32]) {
        let d = self.d;
        let x: Vec<f64> = x[..d].iter().map(|&v| v as f64).collect();
        self.count += 1.0;
        for (i, &xi) in x.iter().enumerate() {
            self.sum[i] += xi;
            let row = &mut self.products[i * d + i..(i + 1) * d];
            row.iter_mut().zip(&x[i..]).for_each(|(product, &xj)| *product += xi * xj);
        }
    }

    pub fn count(&self) -> f64 {
        self.count
    }

    pub fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|s| s / self.count.max(1.0)).collect()
    }

    /// The unbiased covariance plus `ridge` on the diagonal.
    pub fn covariance(&self, ridge: f64) -> nalgebra::DMatrix<f64> {
        let (d, n) = (self.d, self.count);
        let mean = self.mean();
        nalgebra::DMatrix::from_fn(d, d, |i, j| {
            let (a, b) = if i <= j { (i, j) } else { (j, i) };
            let value = (self.products[a * d + b] - n * mean[a] * mean[b]) / (n - 1.0).max(1.0);
            if i == j {
                value + ridge
            } else {
                value
            }
        })
    }
}

/// W = L⁻¹ for Σ = L·Lᵀ, row-major `d × d` (lower-triangular), in f32.
pub fn whitening_matrix(covariance: &nalgebra::DMatrix<f64>) -> Result<Vec<f32>> {
    let d = covariance.nrows();
    let lower =
        covariance.clone().cholesky().context("a covariance is not positive definite (raise the regularisation)")?.l();
    let whitening = lower
        .solve_lower_triangular(&nalgebra::DMatrix::identity(d, d))
        .context("a covariance factor is singular (raise the regularisation)")?;
    Ok((0..d).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| whitening[(i, j)] as f32).collect())
}

/// A Gaussian at every position of the stride-8 grid over `d` values made from each patch's 152 features by a
/// `reduce(row, x)` (PaDiM: a channel subset; semi-orthogonal embedding: a projection). Fitting streams the
/// images: only per-position sums are kept, never the features.
pub struct PositionGaussians {
    pub d: usize,
    /// `(positions, d)` means.
    pub mean: Vec<f32>,
    /// `(positions, d, d)` row-major lower-triangular whitening matrices.
    pub whitening: Vec<f32>,
}

/// Side of the stride-8 grid of an `image_size²` input.
pub fn grid_size(image_size: u32) -> usize {
    (image_size as usize).div_ceil(PATCH_STRIDE)
}

impl PositionGaussians {
    pub fn fit(
        context: &FitContext,
        images: &TrainingImages,
        d: usize,
        reduce: impl Fn(&[f32], &mut [f32]) + Sync,
        regularization: f64,
    ) -> Result<Self> {
        let side = grid_size(context.image_size);
        let positions = side * side;
        let mut moments = vec![MomentSums::new(d); positions];
        let progress = context.progress;
        progress.begin("features", images.len() as u64);
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let rows: Vec<f32> = plain_feature_rows(&context.backbone, &images_to_tensor(&batch, &context.device)?)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            if rows.len() != batch.len() * positions * PATCH_CHANNELS {
                bail!("feature grid does not match image size {}", context.image_size);
            }
            moments.par_iter_mut().enumerate().for_each(|(p, moments)| {
                let mut x = vec![0f32; d];
                for b in 0..batch.len() {
                    reduce(&rows[(b * positions + p) * PATCH_CHANNELS..][..PATCH_CHANNELS], &mut x);
                    moments.add(&x);
                }
            });
            progress.advance(batch.len() as u64);
        }
        progress.begin("inverting covariances", 1);
        let per_position: Vec<Result<(Vec<f32>, Vec<f32>)>> = moments
            .par_iter()
            .map(|moments| {
                let whitening = whitening_matrix(&moments.covariance(regularization))?;
                Ok((moments.mean().iter().map(|&m| m as f32).collect(), whitening))
            })
            .collect();
        let mut mean = Vec::with_capacity(positions * d);
        let mut whitening = Vec::with_capacity(positions * d * d);
        for result in per_position {
            let (m, w) = result?;
            mean.extend(m);
            whitening.extend(w);
        }
        progress.advance(1);
        Ok(Self { d, mean, whitening })
    }
}

/// Each image's map of per-position Mahalanobis distances (`mean` and `whitening` as in [`PositionGaussians`],
/// `reduce` as it was fitted with), upsampled and blurred by `blur_sigma`; the score is its maximum.
#[allow(clippy::too_many_arguments)]
pub fn position_outputs(
    backbone: &Backbone,
    images: &Tensor,
    image_size: u32,
    d: usize,
    mean: &[f32],
    whitening: &[f32],
    reduce: impl Fn(&[f32], &mut [f32]) + Sync,
    blur_sigma: f32,
) -> Result<Vec<AnomalyOutput>> {
    let rows: Vec<f32> = plain_feature_rows(backbone, images)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    let side = grid_size(image_size);
    let positions = side * side;
    let batch = rows.len() / (positions * PATCH_CHANNELS);
    let size = image_size as usize;
    (0..batch)
        .map(|b| {
            let distances: Vec<f32> = (0..positions)
                .into_par_iter()
                .map(|p| {
                    let mut x = vec![0f32; d];
                    reduce(&rows[(b * positions + p) * PATCH_CHANNELS..][..PATCH_CHANNELS], &mut x);
                    x.iter_mut().zip(&mean[p * d..(p + 1) * d]).for_each(|(v, m)| *v -= m);
                    mahalanobis(&whitening[p * d * d..(p + 1) * d * d], &x)
                })
                .collect();
            let map = ScoreMap::new(side, side, distances).resized(size, size).blurred(blur_sigma);
            Ok(AnomalyOutput { score: map.max(), map })
        })
        .collect()
}

/// Mean and Ledoit–Wolf shrunk covariance of `n` vectors of dimension `d` (row-major, `n × d`): the sample
/// covariance pulled towards a multiple of the identity by the shrinkage that minimises the expected squared
/// error (Ledoit & Wolf 2004, as scikit-learn's `ledoit_wolf` computes it), plus `ridge` on the diagonal. With
/// fewer images than dimensions the sample covariance is singular; the shrunk one is not.
pub fn ledoit_wolf(vectors: &[f32], d: usize, ridge: f64) -> (Vec<f64>, nalgebra::DMatrix<f64>) {
    let n = (vectors.len() / d.max(1)).max(1);
    let mut mean = vec![0f64; d];
    for row in vectors.chunks_exact(d) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64 / n as f64);
    }
    let centred = nalgebra::DMatrix::from_fn(n, d, |i, j| vectors[i * d + j] as f64 - mean[j]);
    let sample = centred.transpose() * &centred / n as f64;
    let squares = centred.map(|v| v * v);
    let trace_mean = sample.trace() / d as f64;
    // β: the variance of the sample covariance's entries; δ: their distance from trace_mean·I.
    let beta_sum = (squares.transpose() * &squares).sum();
    let delta_sum = sample.map(|v| v * v).sum();
    let beta = (beta_sum / n as f64 - delta_sum) / (d * n) as f64;
    let delta = (delta_sum - 2.0 * trace_mean * sample.trace() + d as f64 * trace_mean * trace_mean) / d as f64;
    let shrinkage = if delta > 0.0 { (beta.min(delta) / delta).max(0.0) } else { 1.0 };
    let mut covariance = sample * (1.0 - shrinkage);
    for i in 0..d {
        covariance[(i, i)] += shrinkage * trace_mean + ridge;
    }
    (mean, covariance)
}

/// |W·δ| for a row-major lower-triangular W, compiled for AVX2+FMA when the processor has them.
pub fn mahalanobis(whitening: &[f32], delta: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features this function is compiled for were just detected.
            return unsafe { mahalanobis_avx2(whitening, delta) };
        }
    }
    mahalanobis_portable(whitening, delta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn mahalanobis_avx2(whitening: &[f32], delta: &[f32]) -> f32 {
    mahalanobis_portable(whitening, delta)
}

#[inline(always)]
fn mahalanobis_portable(whitening: &[f32], delta: &[f32]) -> f32 {
    let d = delta.len();
    let mut squared = 0f32;
    for (i, row) in whitening.chunks_exact(d).enumerate() {
        // Eight partial sums so the dot product vectorises.
        let mut lanes = [0f32; 8];
        let (row, delta) = (&row[..=i], &delta[..=i]);
        let chunks = row.chunks_exact(8).zip(delta.chunks_exact(8));
        let tail: f32 =
            row.chunks_exact(8).remainder().iter().zip(delta.chunks_exact(8).remainder()).map(|(a, b)| a * b).sum();
        for (w, x) in chunks {
            for lane in 0..8 {
                lanes[lane] += w[lane] * x[lane];
            }
        }
        let z = lanes.iter().sum::<f32>() + tail;
        squared += z * z;
    }
    squared.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn whitened_distance_equals_the_inverse_covariance_form() {
        let d = 11;
        let mut rng = SplitMix64::new(5);
        let a = nalgebra::DMatrix::from_fn(d, d, |_, _| rng.normal() as f64);
        let covariance = &a * a.transpose() + nalgebra::DMatrix::identity(d, d) * 0.1;
        let delta = nalgebra::DVector::from_fn(d, |_, _| rng.normal() as f64);
        let expected = (delta.transpose() * covariance.clone().try_inverse().unwrap() * &delta)[(0, 0)].sqrt();
        let whitening =
            covariance.cholesky().unwrap().l().solve_lower_triangular(&nalgebra::DMatrix::identity(d, d)).unwrap();
        let row_major: Vec<f32> =
            (0..d).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| whitening[(i, j)] as f32).collect();
        let delta: Vec<f32> = delta.iter().map(|&v| v as f32).collect();
        let actual = mahalanobis(&row_major, &delta) as f64;
        assert!((actual - expected).abs() < 1e-3 * expected, "{actual} vs {expected}");
    }

    #[test]
    fn ledoit_wolf_matches_scikit_learn() {
        // sklearn.covariance.ledoit_wolf (1.x) on these five 3-vectors: shrinkage 0.3967, this covariance.
        let points = [1.0f32, 2.0, 0.5, 2.0, 1.0, -0.5, 0.0, 0.5, 1.5, 1.5, 2.5, 0.7, 0.5, 0.0, 2.0];
        let (mean, covariance) = ledoit_wolf(&points, 3, 0.0);
        assert!((mean[0] - 1.0).abs() < 1e-6 && (mean[2] - 0.84).abs() < 1e-6, "{mean:?}");
        let expected = [
            [0.5796594500806148, 0.21115135693119935, -0.31974348335295905],
            [0.21115135693119935, 0.7968437029241342, -0.24614215322265529],
            [-0.31974348335295905, -0.24614215322265529, 0.7258968469952511],
        ];
        for i in 0..3 {
            for j in 0..3 {
                assert!((covariance[(i, j)] - expected[i][j]).abs() < 1e-6, "{covariance} vs {expected:?}");
            }
        }
    }

    #[test]
    fn moments_and_whitening_match_a_direct_computation() {
        let points = [[1.0f32, 2.0, 0.5], [2.0, 1.0, -0.5], [0.0, 0.5, 1.5], [1.5, 2.5, 0.7], [0.5, 0.0, 2.0]];
        let mut sums = MomentSums::new(3);
        points.iter().for_each(|p| sums.add(p));
        let mean = sums.mean();
        let covariance = sums.covariance(0.0);
        for i in 0..3 {
            let expected_mean = points.iter().map(|p| p[i] as f64).sum::<f64>() / 5.0;
            assert!((mean[i] - expected_mean).abs() < 1e-12);
            for j in 0..3 {
                let expected =
                    points.iter().map(|p| (p[i] as f64 - mean[i]) * (p[j] as f64 - mean[j])).sum::<f64>() / 4.0;
                assert!((covariance[(i, j)] - expected).abs() < 1e-12);
            }
        }
        // |W·δ|² = δᵀ·Σ⁻¹·δ.
        let w = whitening_matrix(&covariance).unwrap();
        let delta = [0.3f64, -0.7, 1.1];
        let whitened: f64 = (0..3).map(|i| (0..3).map(|j| w[i * 3 + j] as f64 * delta[j]).sum::<f64>().powi(2)).sum();
        let inverse = covariance.try_inverse().unwrap();
        let d = nalgebra::DVector::from_row_slice(&delta);
        let expected = (d.transpose() * inverse * &d)[(0, 0)];
        assert!((whitened - expected).abs() < 1e-4 * expected, "{whitened} vs {expected}");
    }
}
