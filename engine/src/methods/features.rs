//! Locally aware patch features shared by the representation methods (PatchCore, PaDiM): each backbone map is
//! averaged over a 3×3 neighbourhood, the stride-16 map is upsampled to the stride-8 grid and the two are
//! concatenated — 40 + 112 = 152 channels per patch, one patch per 8×8 pixels.
//!
//! On the CPU the pooling, upsampling and layout change run as one pass in plain Rust (as candle ops they were
//! five passes and a fifth of the scoring time at batch 1); elsewhere as candle ops.

use crate::backbone::efficientnet_lite0::{STRIDE16_CHANNELS, STRIDE8_CHANNELS};
use crate::backbone::Backbone;
use crate::maps::ScoreMap;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

pub const PATCH_CHANNELS: usize = STRIDE8_CHANNELS + STRIDE16_CHANNELS;
pub const PATCH_STRIDE: usize = 8;

/// 3×3 average with zero padding counted in the divisor (PyTorch `AvgPool2d(3, 1, 1)`).
pub fn local_average(map: &Tensor) -> Result<Tensor> {
    map.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)
}

/// `(B, 152, S/8, S/8)` patch features of images in [0, 1], through candle's ops.
pub fn patch_features(backbone: &Backbone, images: &Tensor) -> anyhow::Result<Tensor> {
    features_through_candle(backbone, images, true)
}

fn features_through_candle(backbone: &Backbone, images: &Tensor, local: bool) -> anyhow::Result<Tensor> {
    let maps = backbone.features(images)?;
    let average = |map: &Tensor| if local { local_average(map) } else { Ok(map.clone()) };
    let fine = average(&maps.stride8)?;
    let (_, _, height, width) = fine.dims4()?;
    let coarse = average(&maps.stride16)?.upsample_bilinear2d(height, width, false)?;
    Ok(Tensor::cat(&[&fine, &coarse], 1)?)
}

/// `(B·H·W, C)` rows, one per patch, image-major then row-major.
pub fn patches_as_rows(features: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = features.dims4()?;
    features.permute((0, 2, 3, 1))?.reshape((batch * height * width, channels))
}

/// 3×3 zero-padded average of one channel plane.
fn local_average_plane(plane: &[f32], width: usize, height: usize) -> Vec<f32> {
    let mut out = vec![0f32; plane.len()];
    for y in 0..height {
        for x in 0..width {
            let mut sum = 0f32;
            for yy in y.saturating_sub(1)..(y + 2).min(height) {
                for xx in x.saturating_sub(1)..(x + 2).min(width) {
                    sum += plane[yy * width + xx];
                }
            }
            out[y * width + x] = sum / 9.0;
        }
    }
    out
}

/// Patch feature rows `(B·H·W, 152)` of images in [0, 1]: the same values as
/// `patches_as_rows(patch_features(..))`, computed in one CPU pass when the backbone runs on the CPU.
pub fn patch_feature_rows(backbone: &Backbone, images: &Tensor) -> anyhow::Result<Tensor> {
    feature_rows(backbone, images, true)
}

/// Like [`patch_feature_rows`] but without the 3×3 neighbourhood average (PaDiM models each position as is).
pub fn plain_feature_rows(backbone: &Backbone, images: &Tensor) -> anyhow::Result<Tensor> {
    feature_rows(backbone, images, false)
}

fn feature_rows(backbone: &Backbone, images: &Tensor, local: bool) -> anyhow::Result<Tensor> {
    if !crate::device::cpu_kernels_on(&backbone.device) {
        return Ok(patches_as_rows(&features_through_candle(backbone, images, local)?)?);
    }
    let maps = backbone.features(images)?;
    let (batch, fine_channels, height, width) = maps.stride8.dims4()?;
    let (_, coarse_channels, coarse_height, coarse_width) = maps.stride16.dims4()?;
    let fine: Vec<f32> = maps.stride8.flatten_all()?.to_vec1()?;
    let coarse: Vec<f32> = maps.stride16.flatten_all()?.to_vec1()?;
    let channels = fine_channels + coarse_channels;
    let pixels = height * width;
    // Channel planes are pooled in parallel, then interleaved into rows.
    let planes: Vec<Vec<f32>> = (0..batch * channels)
        .into_par_iter()
        .map(|index| {
            let (b, c) = (index / channels, index % channels);
            let average = |plane: &[f32], w: usize, h: usize| {
                if local {
                    local_average_plane(plane, w, h)
                } else {
                    plane.to_vec()
                }
            };
            if c < fine_channels {
                let plane = &fine[(b * fine_channels + c) * pixels..][..pixels];
                average(plane, width, height)
            } else {
                let coarse_pixels = coarse_height * coarse_width;
                let plane = &coarse[(b * coarse_channels + c - fine_channels) * coarse_pixels..][..coarse_pixels];
                let averaged = average(plane, coarse_width, coarse_height);
                ScoreMap::new(coarse_width, coarse_height, averaged).resized(width, height).data
            }
        })
        .collect();
    let mut rows = vec![0f32; batch * pixels * channels];
    for (index, plane) in planes.iter().enumerate() {
        let (b, c) = (index / channels, index % channels);
        let image_rows = &mut rows[b * pixels * channels..(b + 1) * pixels * channels];
        for (p, &value) in plane.iter().enumerate() {
            image_rows[p * channels + c] = value;
        }
    }
    Ok(Tensor::from_vec(rows, (batch * pixels, channels), &backbone.device)?)
}

/// Per-channel standardisation of the patch features, from the first 32 training images: the heads trained on
/// the frozen features (CutPaste, DRAEM, FCDD) start from unit-scale inputs. Those methods pair images (an
/// image and another one's texture), so fewer than two training images is an error naming `method`.
pub fn patch_standardisation(
    context: &crate::methods::FitContext,
    images: &crate::dataset::TrainingImages,
    method: &str,
) -> anyhow::Result<crate::methods::statistics::Standardise> {
    if images.len() < 2 {
        anyhow::bail!("{method} needs at least two training images, got {}", images.len());
    }
    context.progress.begin("feature statistics", 1);
    let sample = images.select(0..images.len().min(32))?;
    let rows = patch_feature_rows(&context.backbone, &crate::methods::images_to_tensor(&sample, &context.device)?)?;
    let rows = rows.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let standardise = crate::methods::statistics::channel_statistics(&rows, PATCH_CHANNELS, &context.device)?;
    context.progress.advance(1);
    Ok(standardise)
}

/// Per position and channel, the mean and 1/std of the channel-standardised patch features of the first
/// [`CALIBRATION_IMAGES`](crate::methods::calibration::CALIBRATION_IMAGES) training images, as one
/// [`Standardise`](crate::methods::statistics::Standardise) over each image's `positions × channels` values: applied to
/// a whole image's features it gives each patch's deviation from what good parts show at that place. The std
/// has a floor of 0.1 (in channel-standardised units) so that a channel that is always zero at a position does
/// not turn a trace of it into a huge deviation.
pub fn position_standardisation(
    context: &crate::methods::FitContext,
    images: &crate::dataset::TrainingImages,
    channel: &crate::methods::statistics::Standardise,
) -> anyhow::Result<crate::methods::statistics::Standardise> {
    let count = images.len().min(crate::methods::calibration::CALIBRATION_IMAGES);
    context.progress.begin("position statistics", count as u64);
    let positions = (context.image_size as usize / PATCH_STRIDE).pow(2);
    let mut moments = crate::methods::statistics::ColumnMoments::new(positions * PATCH_CHANNELS);
    for chunk in images.batches(0..count, context.batch_size) {
        crate::progress::check_cancelled(context.progress)?;
        let chunk = chunk?;
        let batch = crate::methods::images_to_tensor(&chunk, &context.device)?;
        let rows = channel.apply(&patch_feature_rows(&context.backbone, &batch)?)?;
        moments.add(&rows.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
        context.progress.advance(chunk.len() as u64);
    }
    moments.standardise(|std| 1.0 / std.max(0.1), &context.device)
}
