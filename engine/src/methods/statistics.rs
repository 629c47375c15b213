//! Column statistics of feature rows, shared by every method that standardises features before a head or a
//! flow (CFlow, FastFlow, CutPaste, DRAEM, FCDD, the position statistics of the patch features): running moments
//! over rows added in parts, and the standardisation they give, with its model-file state and ONNX values.

use crate::methods::training::take_tensor;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// Per-column standardisation: `(x − mean) · inverse_std`, one mean and scale per channel (or per position and
/// channel).
#[derive(Clone)]
pub struct Standardise {
    mean: Tensor,
    inverse_std: Tensor,
}

/// Per-channel mean and 1/std of rows `(N, channels)` (flattened).
pub fn channel_statistics(rows: &[f32], channels: usize, device: &Device) -> Result<Standardise> {
    let mut moments = ColumnMoments::new(channels);
    moments.add(rows);
    moments.standardise(channel_scale, device)
}

/// A channel's scale from its standard deviation (a constant channel stays finite).
pub fn channel_scale(std: f64) -> f64 {
    1.0 / (std + 1e-6)
}

/// Running sums of rows of `columns` values, for a [`Standardise`] of each column.
pub struct ColumnMoments {
    sum: Vec<f64>,
    squares: Vec<f64>,
    rows: usize,
}

impl ColumnMoments {
    pub fn new(columns: usize) -> Self {
        Self { sum: vec![0.0; columns], squares: vec![0.0; columns], rows: 0 }
    }

    /// Adds whole rows (flattened; a trailing partial row is ignored).
    pub fn add(&mut self, rows: &[f32]) {
        for row in rows.chunks_exact(self.sum.len()) {
            for ((s, q), &v) in self.sum.iter_mut().zip(&mut self.squares).zip(row) {
                *s += v as f64;
                *q += (v as f64) * (v as f64);
            }
            self.rows += 1;
        }
    }

    /// Each column's mean, and `inverse(std)` as its scale.
    pub fn standardise(&self, inverse: impl Fn(f64) -> f64, device: &Device) -> Result<Standardise> {
        let count = self.rows.max(1) as f64;
        let mean: Vec<f32> = self.sum.iter().map(|s| (s / count) as f32).collect();
        let inverse_std: Vec<f32> = self
            .sum
            .iter()
            .zip(&self.squares)
            .map(|(s, q)| inverse((q / count - (s / count).powi(2)).max(0.0).sqrt()) as f32)
            .collect();
        let columns = mean.len();
        Ok(Standardise {
            mean: Tensor::from_vec(mean, columns, device)?,
            inverse_std: Tensor::from_vec(inverse_std, columns, device)?,
        })
    }
}

impl Standardise {
    pub fn from_tensors(mean: Tensor, inverse_std: Tensor) -> Self {
        Self { mean, inverse_std }
    }

    pub fn apply(&self, rows: &Tensor) -> Result<Tensor> {
        Ok(rows.broadcast_sub(&self.mean)?.broadcast_mul(&self.inverse_std)?)
    }

    /// `(mean, 1/std)` as flat host vectors, for the ONNX export.
    pub fn values(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?) };
        Ok((flat(&self.mean)?, flat(&self.inverse_std)?))
    }

    /// `{prefix}.mean` and `{prefix}.inverse_std` on the CPU, for the model file (read back by [`Self::take`]).
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (format!("{prefix}.mean"), self.mean.to_device(&Device::Cpu)?),
            (format!("{prefix}.inverse_std"), self.inverse_std.to_device(&Device::Cpu)?),
        ])
    }

    /// Reads `{prefix}.mean` and `{prefix}.inverse_std` of `channels` values out of a model file's tensors.
    pub fn take(tensors: &mut HashMap<String, Tensor>, prefix: &str, channels: usize, device: &Device) -> Result<Self> {
        let mut take = |what: &str| take_tensor(tensors, &format!("{prefix}.{what}"), &[channels], device);
        Ok(Self { mean: take("mean")?, inverse_std: take("inverse_std")? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_moments_standardise_each_column_added_in_parts() {
        // Columns (1, 3, 5) and (10, 10, 10), the third row added separately: means 3 and 10, population
        // stds √(8/3) and 0; the floored inverse keeps the constant column finite.
        let mut moments = ColumnMoments::new(2);
        moments.add(&[1.0, 10.0, 3.0, 10.0]);
        moments.add(&[5.0, 10.0, 99.0]); // the trailing partial row is ignored
        let standardise = moments.standardise(|std| 1.0 / std.max(0.1), &Device::Cpu).unwrap();
        let rows = Tensor::new(&[[5.0f32, 10.5]], &Device::Cpu).unwrap();
        let z = standardise.apply(&rows).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((z[0] - 2.0 / (8.0f32 / 3.0).sqrt()).abs() < 1e-5, "{z:?}");
        assert!((z[1] - 5.0).abs() < 1e-5, "{z:?}");
    }
}
