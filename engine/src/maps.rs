//! Anomaly maps as plain arrays: resizing and Gaussian smoothing, done on the CPU after scoring (the maps are
//! small, and the same code then serves every method and device).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How many of `len` values the top `fraction` is, rounded, at least one (the export's `TopK` takes the same count).
pub fn top_count(len: usize, fraction: f64) -> usize {
    ((len as f64 * fraction).round() as usize).clamp(1, len.max(1))
}

/// A row-major score map; higher is more anomalous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl ScoreMap {
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), width * height, "map data must be width × height");
        Self { width, height, data }
    }

    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// The mean of the map's largest values, `top_fraction` of them (at least one, so 0 gives the maximum):
    /// an image score a defect of a few dozen pixels outweighs more than one hot pixel of a good part does.
    pub fn top_mean(&self, top_fraction: f64) -> f32 {
        let count = top_count(self.data.len(), top_fraction);
        if count == 1 {
            return self.max();
        }
        let mut values = self.data.clone();
        let first = values.len() - count;
        values.select_nth_unstable_by(first, f32::total_cmp);
        values[first..].iter().sum::<f32>() / count as f32
    }

    /// Bilinear resize with half-pixel centres (PyTorch's `align_corners=False`).
    pub fn resized(&self, width: usize, height: usize) -> ScoreMap {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let columns: Vec<_> = (0..width).map(|x| half_pixel_source(x, width, self.width)).collect();
        let mut data = Vec::with_capacity(width * height);
        for y in 0..height {
            let (y0, y1, ty) = half_pixel_source(y, height, self.height);
            let row0 = &self.data[y0 * self.width..(y0 + 1) * self.width];
            let row1 = &self.data[y1 * self.width..(y1 + 1) * self.width];
            for &(x0, x1, tx) in &columns {
                let top = row0[x0] + (row0[x1] - row0[x0]) * tx;
                let bottom = row1[x0] + (row1[x1] - row1[x0]) * tx;
                data.push(top + (bottom - top) * ty);
            }
        }
        ScoreMap::new(width, height, data)
    }

    /// FCDD's receptive-field upsampling (Liznerski et al. 2021): each cell of a `width × height` grid with the
    /// given stride spreads its value over the input pixels with a Gaussian of `sigma` centred on the cell — a
    /// transposed convolution with a fixed Gaussian kernel, computed here as one impulse per cell centre,
    /// blurred. Divided by the same blur of the impulses alone (a normalised convolution), so a constant grid
    /// upsamples to exactly that constant, borders included.
    pub fn receptive_upsample(width: usize, height: usize, cells: &[f32], stride: usize, sigma: f32) -> ScoreMap {
        assert_eq!(cells.len(), width * height, "cells must be width × height");
        let spread = Self::cell_impulses(width, height, cells, stride).blurred(sigma);
        let weights = Self::receptive_upsample_weights(width, height, stride, sigma);
        let data = spread.data.iter().zip(&weights).map(|(v, w)| v / w).collect();
        ScoreMap::new(width * stride, height * stride, data)
    }

    /// The divisor of [`Self::receptive_upsample`]: the blur of the impulses alone, at least
    /// `f32::MIN_POSITIVE`. It depends only on the geometry, so an exported graph holds it as a constant.
    pub fn receptive_upsample_weights(width: usize, height: usize, stride: usize, sigma: f32) -> Vec<f32> {
        let ones = vec![1.0; width * height];
        let weight = Self::cell_impulses(width, height, &ones, stride).blurred(sigma);
        weight.data.into_iter().map(|w| w.max(f32::MIN_POSITIVE)).collect()
    }

    /// A `(width·stride) × (height·stride)` map of zeros with each cell's value at its centre.
    fn cell_impulses(width: usize, height: usize, cells: &[f32], stride: usize) -> ScoreMap {
        let (out_width, out_height) = (width * stride, height * stride);
        let mut impulses = vec![0f32; out_width * out_height];
        for (y, row) in cells.chunks_exact(width).enumerate() {
            for (x, &value) in row.iter().enumerate() {
                impulses[(y * stride + stride / 2) * out_width + x * stride + stride / 2] = value;
            }
        }
        ScoreMap::new(out_width, out_height, impulses)
    }

    /// Separable Gaussian blur, kernel size `2·⌊4σ + 0.5⌋ + 1`, reflected borders (as anomalib/kornia).
    pub fn blurred(&self, sigma: f32) -> ScoreMap {
        if sigma <= 0.0 {
            return self.clone();
        }
        let kernel = gaussian_kernel(sigma);
        let radius = kernel.len() / 2;
        let (w, h) = (self.width, self.height);
        // Horizontal pass over reflect-padded rows, then the vertical pass as weighted sums of whole rows, so
        // both inner loops run over contiguous memory.
        let mut horizontal = vec![0f32; w * h];
        horizontal.par_chunks_mut(w).enumerate().for_each(|(y, out_row)| {
            let row = &self.data[y * w..(y + 1) * w];
            let padded: Vec<f32> =
                (0..w + 2 * radius).map(|i| row[reflect_index(i as isize - radius as isize, w)]).collect();
            for (x, out) in out_row.iter_mut().enumerate() {
                *out = kernel.iter().zip(&padded[x..]).map(|(k, v)| k * v).sum();
            }
        });
        let mut out = vec![0f32; w * h];
        out.par_chunks_mut(w).enumerate().for_each(|(y, out_row)| {
            for (k, weight) in kernel.iter().enumerate() {
                let source = reflect_index(y as isize + k as isize - radius as isize, h);
                for (o, v) in out_row.iter_mut().zip(&horizontal[source * w..(source + 1) * w]) {
                    *o += weight * v;
                }
            }
        });
        ScoreMap::new(w, h, out)
    }
}

/// Where output sample `out` of `out_size` reads in an input of `in_size` under bilinear resizing with
/// half-pixel centres (PyTorch's `align_corners=False`): the two input samples and the weight of the second.
pub fn half_pixel_source(out: usize, out_size: usize, in_size: usize) -> (usize, usize, f32) {
    let scale = in_size as f32 / out_size as f32;
    let position = ((out as f32 + 0.5) * scale - 0.5).max(0.0);
    let low = (position.floor() as usize).min(in_size - 1);
    let high = (low + 1).min(in_size - 1);
    (low, high, position - low as f32)
}

/// The normalised 1-D Gaussian of [`ScoreMap::blurred`]: `2·⌊4σ + 0.5⌋ + 1` taps.
pub fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as usize;
    let mut kernel: Vec<f32> =
        (0..=2 * radius).map(|i| (-((i as f32 - radius as f32).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    kernel
}

/// Index `i` reflected into `0..n` without repeating the edge (PyTorch/kornia "reflect"), folding as often as a
/// kernel wider than a small map needs.
pub fn reflect_index(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let folded = i.rem_euclid(period);
    if folded < n as isize {
        folded as usize
    } else {
        (period - folded) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_mean_is_the_mean_of_the_largest_share() {
        let map = ScoreMap::new(10, 10, (1..=100).rev().map(|v| v as f32).collect());
        assert_eq!(map.top_mean(0.0), 100.0, "0 is the maximum");
        assert_eq!(map.top_mean(0.03), 99.0, "the mean of 100, 99 and 98");
        assert_eq!(map.top_mean(1.0), 50.5);
        assert_eq!(top_count(100, 0.005), 1);
        assert_eq!(top_count(100, 2.0), 100);
    }

    #[test]
    fn bilinear_matches_pytorch_half_pixel() {
        // torch.nn.functional.interpolate([[0, 1], [2, 3]], size=4, mode="bilinear", align_corners=False)
        let map = ScoreMap::new(2, 2, vec![0.0, 1.0, 2.0, 3.0]);
        let up = map.resized(4, 4);
        let expected_first_row = [0.0, 0.25, 0.75, 1.0];
        let expected_second_row = [0.5, 0.75, 1.25, 1.5];
        assert_eq!(&up.data[..4], &expected_first_row);
        assert_eq!(&up.data[4..8], &expected_second_row);
    }

    #[test]
    fn reflection_does_not_repeat_the_edge() {
        let reflected: Vec<usize> = (-3..7).map(|i| reflect_index(i, 4)).collect();
        assert_eq!(reflected, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
    }

    #[test]
    fn blur_keeps_mass_of_a_constant_and_spreads_a_peak() {
        let flat = ScoreMap::new(9, 7, vec![2.0; 63]).blurred(1.5);
        assert!(flat.data.iter().all(|v| (v - 2.0).abs() < 1e-5));
        let mut peak = vec![0.0; 81];
        peak[40] = 1.0;
        let blurred = ScoreMap::new(9, 9, peak).blurred(1.0);
        assert!(blurred.data[40] < 1.0 && blurred.data[40] > blurred.data[41] && blurred.data[41] > 0.0);
        assert!((blurred.data[39] - blurred.data[41]).abs() < 1e-7, "symmetric");
    }

    #[test]
    fn receptive_upsampling_keeps_a_constant_and_centres_each_cell() {
        let flat = ScoreMap::receptive_upsample(8, 8, &[3.0; 64], 8, 14.0);
        assert_eq!((flat.width, flat.height), (64, 64));
        assert!(flat.data.iter().all(|v| (v - 3.0).abs() < 1e-4), "{:?}", &flat.data[..8]);
        let mut cells = vec![0.0; 64];
        cells[2 * 8 + 5] = 1.0;
        let spot = ScoreMap::receptive_upsample(8, 8, &cells, 8, 4.0);
        let peak = spot.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!((peak % 64, peak / 64), (5 * 8 + 4, 2 * 8 + 4));
    }
}
