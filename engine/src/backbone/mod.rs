//! The frozen ImageNet backbone that feeds the feature-based methods, and its weights.

pub mod depthwise;
pub mod efficientnet_lite0;
pub mod pointwise;
pub mod torch_pth;
pub mod weights;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
pub use efficientnet_lite0::{EfficientNetLite0, FeatureMaps};
use std::collections::HashMap;
use std::path::Path;

pub const BACKBONE_NAME: &str = "efficientnet-lite0";

/// The backbone, truncated after the last block the methods use, with the hash of the weights it was built from.
pub struct Backbone {
    pub net: EfficientNetLite0,
    pub weights_hash: String,
    pub device: Device,
}

impl Backbone {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_truncated(path, device, efficientnet_lite0::STRIDE16_BLOCK, false)
    }

    pub fn load_truncated(path: &Path, device: &Device, last_block: usize, with_head: bool) -> Result<Self> {
        let named = weights::read_weights(path)?;
        Self::from_named(named, device, last_block, with_head)
            .with_context(|| format!("{}: not EfficientNet-Lite0 weights", path.display()))
    }

    /// The backbone from weights already read (a weights file, or the copy a model bundle carries).
    pub fn from_named(
        named: weights::NamedTensors,
        device: &Device,
        last_block: usize,
        with_head: bool,
    ) -> Result<Self> {
        let weights_hash = weights::weights_hash(&named);
        let tensors = named
            .into_iter()
            .map(|(name, t)| Ok((name, Tensor::from_vec(t.data, t.shape, device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let net = EfficientNetLite0::new(vb, last_block, with_head)?;
        Ok(Self { net, weights_hash, device: device.clone() })
    }

    /// A backbone with all-zero weights, for unit tests of code that only needs one to exist.
    #[cfg(test)]
    pub(crate) fn without_weights_for_tests() -> Self {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let net = EfficientNetLite0::new(vb, efficientnet_lite0::STRIDE16_BLOCK, false).expect("zero weights build");
        Self { net, weights_hash: String::new(), device: Device::Cpu }
    }

    /// Feature maps of images in [0, 1], shape (B, 3, H, W).
    pub fn features(&self, images: &Tensor) -> Result<FeatureMaps> {
        Ok(self.net.features(&EfficientNetLite0::normalize(images)?)?)
    }
}
