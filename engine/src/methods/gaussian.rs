//! Multivariate Gaussians of feature vectors, as the representation and augmentation methods use them: the
//! whitening matrix W = L⁻¹ of the Cholesky factor Σ = L·Lᵀ turns the Mahalanobis distance into a length,
//! |W·(x − μ)|.

use anyhow::{Context, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

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
