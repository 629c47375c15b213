//! Per-position calibration of anomaly maps: the z-score of each position's raw value against the same
//! position in the maps of training images.
//!
//! A raw score is often not comparable across positions. A flow's NLL at border and corner features (zero
//! padding in the backbone) stays high even on good parts; an autoencoder's reconstruction error is highest
//! where the parts themselves always differ most (tile edges). Those positions then decide the image score
//! (the maximum). Scoring the z-score instead makes positions — and a flow's two levels — comparable.

use crate::dataset::TrainingImages;
use crate::methods::{images_to_tensor, outputs_from_cells_scored, AnomalyOutput, FitContext};
use crate::progress::check_cancelled;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Training images whose maps calibrate the positions (enough for stable per-position statistics).
pub const CALIBRATION_IMAGES: usize = 200;

/// Per level and position, the mean and 1/std of the raw map value on training images.
#[derive(Clone)]
pub struct PositionCalibration {
    /// Per level: (mean, 1/std), one value per position.
    levels: Vec<(Vec<f32>, Vec<f32>)>,
}

impl PositionCalibration {
    /// No level calibrated: what a model that does not calibrate (DRAEM with `calibrate` off) stores.
    pub fn none() -> Self {
        Self { levels: Vec::new() }
    }

    /// From each level's maps of several images, concatenated (`images × positions`).
    pub fn from_maps(maps: &[Vec<f32>], positions: &[usize]) -> Self {
        let levels = maps
            .iter()
            .zip(positions)
            .map(|(values, &positions)| {
                let images = (values.len() / positions).max(1) as f64;
                let mut mean = vec![0f64; positions];
                let mut square = vec![0f64; positions];
                for map in values.chunks_exact(positions) {
                    for (p, &v) in map.iter().enumerate() {
                        mean[p] += v as f64 / images;
                        square[p] += (v as f64).powi(2) / images;
                    }
                }
                let inverse_std = mean
                    .iter()
                    .zip(&square)
                    .map(|(m, s)| (1.0 / (s - m * m).max(0.0).sqrt().max(1e-3)) as f32)
                    .collect();
                (mean.into_iter().map(|m| m as f32).collect(), inverse_std)
            })
            .collect();
        Self { levels }
    }

    /// A one-level calibration from the raw maps (`positions` values per image) that `raw_maps` gives for the
    /// first [`CALIBRATION_IMAGES`] training images, in batches, with progress and cancellation.
    pub fn from_training_images(
        context: &FitContext,
        images: &TrainingImages,
        positions: usize,
        mut raw_maps: impl FnMut(&Tensor) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        let count = images.len().min(CALIBRATION_IMAGES);
        context.progress.begin("calibrating", count as u64);
        let mut maps = Vec::new();
        for chunk in images.batches(0..count, context.batch_size) {
            check_cancelled(context.progress)?;
            let chunk = chunk?;
            maps.extend(raw_maps(&images_to_tensor(&chunk, &context.device)?)?);
            context.progress.advance(chunk.len() as u64);
        }
        Ok(Self::from_maps(&[maps], &[positions]))
    }

    /// The `(mean, 1/std)` per position of `level`.
    pub fn level(&self, level: usize) -> (&[f32], &[f32]) {
        let (mean, inverse_std) = &self.levels[level];
        (mean, inverse_std)
    }

    /// Replaces a raw map of `level` by its z-scores.
    pub fn calibrate(&self, level: usize, map: &mut [f32]) {
        let (mean, inverse_std) = &self.levels[level];
        for ((v, m), s) in map.iter_mut().zip(mean).zip(inverse_std) {
            *v = (*v - m) * s;
        }
    }

    /// Outputs from one-level raw maps on a `grid × grid` grid, images after images: each z-scored per position
    /// when this calibration has a level (as is when it is [`Self::none`]), resized to `size²` and blurred; the
    /// score is the map's maximum.
    pub fn outputs(&self, raw_maps: &[f32], grid: usize, size: usize, blur_sigma: f32) -> Vec<AnomalyOutput> {
        self.outputs_scored(raw_maps, grid, size, blur_sigma, 0.0)
    }

    /// [`Self::outputs`] with the score the mean of the map's top `top_fraction` (0: the maximum).
    pub fn outputs_scored(
        &self,
        raw_maps: &[f32],
        grid: usize,
        size: usize,
        blur_sigma: f32,
        top_fraction: f64,
    ) -> Vec<AnomalyOutput> {
        let mut values = raw_maps.to_vec();
        if !self.levels.is_empty() {
            values.chunks_exact_mut(grid * grid).for_each(|map| self.calibrate(0, map));
        }
        outputs_from_cells_scored(&values, grid, size, blur_sigma, top_fraction)
    }

    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = Vec::new();
        for (level, (mean, inverse_std)) in self.levels.iter().enumerate() {
            state.push((format!("calibration.level{level}.mean"), Tensor::new(mean.as_slice(), &Device::Cpu)?));
            state.push((
                format!("calibration.level{level}.inverse_std"),
                Tensor::new(inverse_std.as_slice(), &Device::Cpu)?,
            ));
        }
        Ok(state)
    }

    /// Reads a calibration of `positions[level]` values per level out of a model file's tensors (removed from
    /// `tensors`).
    pub fn take(tensors: &mut HashMap<String, Tensor>, positions: &[usize]) -> Result<Self> {
        let mut levels = Vec::new();
        for (level, &positions) in positions.iter().enumerate() {
            let mut take = |what: &str| -> Result<Vec<f32>> {
                let name = format!("calibration.level{level}.{what}");
                let tensor =
                    tensors.remove(&name).ok_or_else(|| anyhow::anyhow!("model file has no `{name}` tensor"))?;
                if tensor.dims() != [positions] {
                    bail!("`{name}` has shape {:?}, expected [{positions}]", tensor.dims());
                }
                Ok(tensor.to_dtype(DType::F32)?.to_vec1()?)
            };
            levels.push((take("mean")?, take("inverse_std")?));
        }
        Ok(Self { levels })
    }
}
