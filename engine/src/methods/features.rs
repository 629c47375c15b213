//! Locally aware patch features shared by the representation methods (PatchCore, PaDiM): each backbone map is
//! averaged over a 3×3 neighbourhood, the stride-16 map is upsampled to the stride-8 grid and the two are
//! concatenated — 40 + 112 = 152 channels per patch, one patch per 8×8 pixels.

use crate::backbone::efficientnet_lite0::{STRIDE16_CHANNELS, STRIDE8_CHANNELS};
use crate::backbone::Backbone;
use candle_core::{Result, Tensor};

pub const PATCH_CHANNELS: usize = STRIDE8_CHANNELS + STRIDE16_CHANNELS;
pub const PATCH_STRIDE: usize = 8;

/// 3×3 average with zero padding counted in the divisor (PyTorch `AvgPool2d(3, 1, 1)`).
fn local_average(map: &Tensor) -> Result<Tensor> {
    map.pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride(3, 1)
}

/// `(B, 152, S/8, S/8)` patch features of images in [0, 1].
pub fn patch_features(backbone: &Backbone, images: &Tensor) -> anyhow::Result<Tensor> {
    let maps = backbone.features(images)?;
    let fine = local_average(&maps.stride8)?;
    let (_, _, height, width) = fine.dims4()?;
    let coarse = local_average(&maps.stride16)?.upsample_bilinear2d(height, width, false)?;
    Ok(Tensor::cat(&[&fine, &coarse], 1)?)
}

/// `(B·H·W, C)` rows, one per patch, image-major then row-major.
pub fn patches_as_rows(features: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = features.dims4()?;
    features
        .permute((0, 2, 3, 1))?
        .reshape((batch * height * width, channels))
}
