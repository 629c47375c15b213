//! Structural similarity (Wang et al. 2004) as Bergmann et al. 2019 use it for autoencoders: 11×11 Gaussian
//! window (σ = 1.5), C₁ = (0.01·L)², C₂ = (0.03·L)² with L = 1, population (co)variances. Built from candle
//! ops on channels-last `(B, H, W, C)` tensors so it serves both as a differentiable training loss and as the
//! anomaly map. Matches scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False, data_range=1)`, reflect-padded borders included (test below).

use anyhow::Result;
use candle_core::{Device, Tensor};

const SIGMA: f64 = 1.5;
/// scipy's `gaussian_filter` truncates at 3.5σ: radius ⌊3.5·1.5 + ½⌋ = 5, an 11-tap window.
pub const RADIUS: usize = 5;
const C1: f64 = 0.01 * 0.01;
const C2: f64 = 0.03 * 0.03;

pub fn gaussian_taps() -> Vec<f64> {
    let taps: Vec<f64> =
        (0..=2 * RADIUS).map(|k| (-((k as f64 - RADIUS as f64).powi(2)) / (2.0 * SIGMA * SIGMA)).exp()).collect();
    let total: f64 = taps.iter().sum();
    taps.into_iter().map(|t| t / total).collect()
}

/// Gaussian-weighted local means over the window, without padding: `(B, H−10, W−10, C)`.
fn window_mean(x: &Tensor) -> Result<Tensor> {
    Ok(crate::methods::fused::separable_filter_valid(x, &gaussian_taps())?)
}

/// The SSIM at every position whose window lies inside both images: `(B, H−10, W−10, C)`.
fn ssim_valid(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (mean_x, mean_y) = (window_mean(x)?, window_mean(y)?);
    let variance_x = (window_mean(&x.sqr()?)? - mean_x.sqr()?)?;
    let variance_y = (window_mean(&y.sqr()?)? - mean_y.sqr()?)?;
    let covariance = (window_mean(&(x * y)?)? - (&mean_x * &mean_y)?)?;
    let luminance = (((&mean_x * &mean_y)? * 2.0)? + C1)?;
    let structure = ((covariance * 2.0)? + C2)?;
    let luminance_norm = ((mean_x.sqr()? + mean_y.sqr()?)? + C1)?;
    let structure_norm = ((variance_x + variance_y)? + C2)?;
    Ok((luminance * structure)?.div(&(luminance_norm * structure_norm)?)?)
}

/// The source index of each position of an axis of `n` mirror-padded by [`RADIUS`] (the edge repeats).
pub fn reflect_pad_indices(n: usize) -> Vec<u32> {
    let n = n as i64;
    (-(RADIUS as i64)..n + RADIUS as i64)
        .map(|i| {
            let reflected = if i < 0 {
                -i - 1
            } else if i >= n {
                2 * n - i - 1
            } else {
                i
            };
            reflected.clamp(0, n - 1) as u32
        })
        .collect()
}

/// Mirror padding by `RADIUS` on the two spatial axes (scipy's "reflect": the edge pixel repeats).
fn reflect_pad(x: &Tensor) -> Result<Tensor> {
    let pad_axis = |x: &Tensor, dim: usize| -> Result<Tensor> {
        let index = reflect_pad_indices(x.dim(dim)?);
        let index = Tensor::new(index.as_slice(), &Device::Cpu)?.to_device(x.device())?;
        Ok(x.index_select(&index, dim)?)
    };
    pad_axis(&pad_axis(x, 1)?, 2)
}

/// C₁ and C₂ of the SSIM formula.
pub const STABILISERS: (f32, f32) = (C1 as f32, C2 as f32);

/// The SSIM map at full size, `(B, H, W, C)`: 1 where the images agree structurally.
pub fn ssim_map(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    ssim_valid(&reflect_pad(x)?, &reflect_pad(y)?)
}

/// Mean SSIM of each image pair over the positions whose window lies inside the image, `(B)`. On the CPU one
/// fused op with its own backward (`ssim_kernel`); elsewhere composed from candle ops.
pub fn mean_ssim(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if crate::methods::fused::fused_on(x) && crate::methods::fused::fused_on(y) {
        return Ok(crate::methods::ssim_kernel::mean_ssim(x, y, &gaussian_taps(), C1 as f32, C2 as f32)?);
    }
    let valid = ssim_valid(x, y)?;
    let batch = valid.dim(0)?;
    Ok(valid.reshape((batch, ()))?.mean(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two 20×23 images from a formula; the expected numbers are scikit-image 0.26's
    /// `structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    /// data_range=1.0, full=True)` on the same arrays (float64).
    fn pair() -> (Tensor, Tensor) {
        let (h, w) = (20usize, 23usize);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..h {
            for j in 0..w {
                let value = 0.5 + 0.4 * (0.3 * i as f64 + 0.2 * j as f64).sin();
                x.push(value);
                y.push((value + 0.15 * (0.07 * (i * j) as f64).cos() - 0.05).clamp(0.0, 1.0));
            }
        }
        let t = |v: Vec<f64>| Tensor::from_vec(v, (1, h, w, 1), &Device::Cpu).unwrap();
        (t(x), t(y))
    }

    #[test]
    fn mean_and_map_match_scikit_image() {
        let (x, y) = pair();
        let mean = mean_ssim(&x, &y).unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((mean - 0.620_372_851_216_372_2).abs() < 1e-9, "mean SSIM {mean}");
        let map = ssim_map(&x, &y).unwrap().squeeze(0).unwrap().squeeze(2).unwrap().to_vec2::<f64>().unwrap();
        for (i, j, expected) in [
            (0, 0, 0.989_404_306_403_161_2),
            (10, 11, 0.471_363_446_590_386_54),
            (19, 22, 0.801_342_911_213_156_5),
            (5, 17, 0.366_239_863_153_637_66),
            (0, 12, 0.900_533_961_952_960_2),
        ] {
            assert!((map[i][j] - expected).abs() < 1e-9, "SSIM at ({i}, {j}): {} vs {expected}", map[i][j]);
        }
    }

    /// In f32 on the CPU the fused kernel runs; it gives scikit-image's mean to f32 precision.
    #[test]
    fn fused_f32_mean_matches_scikit_image() {
        let (x, y) = pair();
        let f32_of = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let mean = mean_ssim(&f32_of(&x), &f32_of(&y)).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((mean as f64 - 0.620_372_851_216_372_2).abs() < 1e-5, "mean SSIM {mean}");
    }

    #[test]
    fn identical_images_have_ssim_one() {
        let (x, _) = pair();
        let mean = mean_ssim(&x, &x).unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((mean - 1.0).abs() < 1e-12);
    }
}
