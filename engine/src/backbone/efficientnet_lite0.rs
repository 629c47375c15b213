//! EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet"; the Lite variants drop squeeze-excitation and use ReLU6 so
//! they quantise well). Original code: tensorflow/tpu `models/official/efficientnet/lite`; the weights we load are
//! the PyTorch port in lukemelas naming (`_conv_stem`, `_blocks.N._expand_conv`, …).
//!
//! The net was trained in TensorFlow, so convolutions use TF "SAME" padding (asymmetric at stride 2) and
//! batch-norm ε = 1e-3; inputs are scaled `(x·255 − 127) / 128`. Batch norms are folded into the preceding
//! convolution at load time, 1×1 convolutions run as matmuls and depthwise ones as a direct kernel.
//!
//! Loupe uses it truncated: the output of block 4 (stride 8, 40 channels) and of block 10 (stride 16, 112
//! channels) are the feature maps the representation methods score.

use super::depthwise::{same_padding, DepthwiseConv};
use super::pointwise::{Im2Col, PointwiseKernel};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::sync::Arc;

const BATCH_NORM_EPS: f64 = 1e-3;

/// One stage of MBConv blocks: (repeats, kernel, first stride, expand ratio, input ch, output ch).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];
pub const NUM_BLOCKS: usize = 16;
/// Block whose output is the stride-8 feature map.
pub const STRIDE8_BLOCK: usize = 4;
/// Block whose output is the stride-16 feature map.
pub const STRIDE16_BLOCK: usize = 10;
pub const STRIDE8_CHANNELS: usize = 40;
pub const STRIDE16_CHANNELS: usize = 112;

#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub kernel: usize,
    pub stride: usize,
    pub expand_ratio: usize,
    pub in_channels: usize,
    pub out_channels: usize,
}

pub fn block_configs() -> Vec<BlockConfig> {
    let mut blocks = Vec::with_capacity(NUM_BLOCKS);
    for (repeats, kernel, stride, expand_ratio, in_channels, out_channels) in STAGES {
        for repeat in 0..repeats {
            blocks.push(BlockConfig {
                kernel,
                stride: if repeat == 0 { stride } else { 1 },
                expand_ratio,
                in_channels: if repeat == 0 { in_channels } else { out_channels },
                out_channels,
            });
        }
    }
    blocks
}

/// Per-output-channel scale and shift of an inference batch norm.
fn batch_norm_affine(vb: VarBuilder, channels: usize) -> Result<(Tensor, Tensor)> {
    let gamma = vb.get(channels, "weight")?;
    let beta = vb.get(channels, "bias")?;
    let mean = vb.get(channels, "running_mean")?;
    let var = vb.get(channels, "running_var")?;
    let scale = gamma.div(&(var + BATCH_NORM_EPS)?.sqrt()?)?;
    let shift = (beta - mean.mul(&scale)?)?;
    Ok((scale, shift))
}

/// A convolution weight `(out, in, k, k)` with its batch norm folded in.
fn folded_conv(conv: VarBuilder, bn: VarBuilder, shape: (usize, usize, usize, usize)) -> Result<(Tensor, Tensor)> {
    let weight = conv.get(shape, "weight")?;
    let (scale, shift) = batch_norm_affine(bn, shape.0)?;
    let weight = weight.broadcast_mul(&scale.reshape((shape.0, 1, 1, 1))?)?;
    Ok((weight, shift))
}

/// The three kinds of layer the backbone is made of. The network's wiring ([`EfficientNetLite0::run_taps`]:
/// blocks in order, expansion, residuals) is written once over this trait: [`Eager`] runs it on candle, the
/// ONNX exporter records it as graph nodes, so the exported network cannot drift from the one Loupe runs.
pub trait LayerRunner {
    type Value: Clone;
    fn stem(&mut self, stem: &Stem, x: &Self::Value) -> Result<Self::Value>;
    /// The 1×1 convolution of `x`, plus `residual` when given (after the ReLU6, which such layers never have).
    fn pointwise(
        &mut self,
        conv: &PointwiseConv,
        x: &Self::Value,
        residual: Option<&Self::Value>,
    ) -> Result<Self::Value>;
    fn depthwise(&mut self, conv: &Depthwise, x: &Self::Value) -> Result<Self::Value>;
}

/// Runs the layers on candle (the fused CPU kernels where there are some).
pub struct Eager;

impl LayerRunner for Eager {
    type Value = Tensor;

    fn stem(&mut self, stem: &Stem, x: &Tensor) -> Result<Tensor> {
        stem.forward(x)
    }

    fn pointwise(&mut self, conv: &PointwiseConv, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        conv.forward_with(x, residual)
    }

    fn depthwise(&mut self, conv: &Depthwise, x: &Tensor) -> Result<Tensor> {
        conv.forward(x)
    }
}

/// 1×1 convolution + folded batch norm: a fused kernel on the CPU, a batched matmul elsewhere.
#[derive(Debug, Clone)]
pub struct PointwiseConv {
    /// `(out, in)`.
    pub weight: Tensor,
    /// `(1, out, 1)`.
    pub bias: Tensor,
    pub relu6: bool,
    cpu_kernel: Option<PointwiseKernel>,
}

impl PointwiseConv {
    fn new(conv: VarBuilder, bn: VarBuilder, in_channels: usize, out_channels: usize, relu6: bool) -> Result<Self> {
        let (weight, bias) = folded_conv(conv, bn, (out_channels, in_channels, 1, 1))?;
        let weight = weight.reshape((out_channels, in_channels))?;
        let cpu_kernel = if crate::device::cpu_kernels_on(weight.device()) {
            Some(PointwiseKernel {
                weight: Arc::new(weight.flatten_all()?.to_vec1()?),
                bias: Arc::new(bias.to_vec1()?),
                in_channels,
                out_channels,
                relu6,
            })
        } else {
            None
        };
        Ok(Self { weight, bias: bias.reshape((1, out_channels, 1))?, relu6, cpu_kernel })
    }

    /// The convolution of `x`, plus `residual` when given.
    fn forward_with(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(kernel) = &self.cpu_kernel {
            return kernel.forward(x, residual);
        }
        let (batch, channels, height, width) = x.dims4()?;
        let flat = x.reshape((batch, channels, height * width))?;
        let out = self.weight.broadcast_left(batch)?.matmul(&flat)?.broadcast_add(&self.bias)?;
        let out = if self.relu6 { out.clamp(0f32, 6f32)? } else { out };
        let out = out.reshape((batch, (), height, width))?;
        match residual {
            Some(r) => out + r,
            None => Ok(out),
        }
    }

    /// The same maths through candle's ops, as the kernel's test reference.
    #[cfg(test)]
    fn forward_portable(&self, x: &Tensor) -> Result<Tensor> {
        Self { cpu_kernel: None, ..self.clone() }.forward_with(x, None)
    }
}

impl Module for PointwiseConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }
}

/// k×k depthwise convolution with TF "SAME" padding, folded batch norm and ReLU6.
#[derive(Debug, Clone)]
pub struct Depthwise {
    /// `(channels, 1, k, k)`.
    pub weight: Tensor,
    /// `(channels,)`.
    pub bias: Tensor,
    pub op: DepthwiseConv,
}

impl Module for Depthwise {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.op.forward(x, &self.weight, &self.bias)
    }
}

/// Mobile inverted bottleneck: expand (1×1) → depthwise (k×k) → project (1×1), residual when shapes match.
#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<PointwiseConv>,
    depthwise: Depthwise,
    project: PointwiseConv,
    residual: bool,
}

impl MbConv {
    fn new(vb: VarBuilder, config: BlockConfig) -> Result<Self> {
        let hidden = config.in_channels * config.expand_ratio;
        let expand = if config.expand_ratio != 1 {
            Some(PointwiseConv::new(vb.pp("_expand_conv"), vb.pp("_bn0"), config.in_channels, hidden, true)?)
        } else {
            None
        };
        let (weight, bias) =
            folded_conv(vb.pp("_depthwise_conv"), vb.pp("_bn1"), (hidden, 1, config.kernel, config.kernel))?;
        let depthwise =
            Depthwise { weight, bias, op: DepthwiseConv { kernel: config.kernel, stride: config.stride, relu6: true } };
        let project = PointwiseConv::new(vb.pp("_project_conv"), vb.pp("_bn2"), hidden, config.out_channels, false)?;
        let residual = config.stride == 1 && config.in_channels == config.out_channels;
        Ok(Self { expand, depthwise, project, residual })
    }
}

impl MbConv {
    fn run<R: LayerRunner>(&self, runner: &mut R, x: &R::Value) -> Result<R::Value> {
        let hidden = match &self.expand {
            Some(expand) => runner.pointwise(expand, x, None)?,
            None => x.clone(),
        };
        let residual = self.residual.then_some(x);
        let spread = runner.depthwise(&self.depthwise, &hidden)?;
        runner.pointwise(&self.project, &spread, residual)
    }
}

/// 3×3 stride-2 stem convolution with TF "SAME" padding, folded batch norm and ReLU6; on the CPU as im2col +
/// fused 1×1 kernel.
#[derive(Debug, Clone)]
pub struct Stem {
    /// `(32, 3, 3, 3)`.
    pub weight: Tensor,
    /// `(32,)`.
    pub bias: Tensor,
    cpu_kernel: Option<PointwiseKernel>,
}

pub const STEM_KERNEL: usize = 3;
pub const STEM_STRIDE: usize = 2;

impl Stem {
    fn new(conv: VarBuilder, bn: VarBuilder) -> Result<Self> {
        let (weight, bias) = folded_conv(conv, bn, (32, 3, 3, 3))?;
        let cpu_kernel = if crate::device::cpu_kernels_on(weight.device()) {
            Some(PointwiseKernel {
                // (out, in, ky, kx) flattens to (out, in·9) in the order Im2Col unfolds patches.
                weight: Arc::new(weight.flatten_all()?.to_vec1()?),
                bias: Arc::new(bias.to_vec1()?),
                in_channels: 27,
                out_channels: 32,
                relu6: true,
            })
        } else {
            None
        };
        Ok(Self { weight, bias, cpu_kernel })
    }
}

impl Module for Stem {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(kernel) = &self.cpu_kernel {
            let patches = x.contiguous()?.apply_op1_no_bwd(&Im2Col { kernel: STEM_KERNEL, stride: STEM_STRIDE })?;
            return kernel.forward(&patches, None);
        }
        let (_, _, height, width) = x.dims4()?;
        let (top, bottom) = same_padding(height, STEM_KERNEL, STEM_STRIDE);
        let (left, right) = same_padding(width, STEM_KERNEL, STEM_STRIDE);
        let padded = x.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?;
        let out = padded.conv2d(&self.weight, 0, STEM_STRIDE, 1, 1)?;
        out.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?.clamp(0f32, 6f32)
    }
}

/// Classifier head, only loaded to check the port against ImageNet logits.
#[derive(Debug, Clone)]
struct Head {
    conv: PointwiseConv,
    fc: candle_nn::Linear,
}

/// The stride-8 and stride-16 feature maps of a batch.
#[derive(Debug, Clone)]
pub struct FeatureMaps {
    pub stride8: Tensor,
    pub stride16: Tensor,
}

#[derive(Debug, Clone)]
pub struct EfficientNetLite0 {
    stem: Stem,
    blocks: Vec<MbConv>,
    head: Option<Head>,
}

impl EfficientNetLite0 {
    /// Loads the blocks up to and including `last_block`; the classifier head only when `with_head`.
    pub fn new(vb: VarBuilder, last_block: usize, with_head: bool) -> Result<Self> {
        let stem = Stem::new(vb.pp("_conv_stem"), vb.pp("_bn0"))?;
        let configs = block_configs();
        let last_block = if with_head { NUM_BLOCKS - 1 } else { last_block.min(NUM_BLOCKS - 1) };
        let blocks = configs[..=last_block]
            .iter()
            .enumerate()
            .map(|(index, &config)| MbConv::new(vb.pp("_blocks").pp(index), config))
            .collect::<Result<Vec<_>>>()?;
        let head = if with_head {
            Some(Head {
                conv: PointwiseConv::new(vb.pp("_conv_head"), vb.pp("_bn1"), 320, 1280, true)?,
                fc: candle_nn::linear(1280, 1000, vb.pp("_fc"))?,
            })
        } else {
            None
        };
        Ok(Self { stem, blocks, head })
    }

    /// `(scale, shift)` taking images in [0, 1] to the network's inputs: `(x·255 − 127) / 128`.
    pub const NORMALIZE: (f32, f32) = (255.0 / 128.0, -127.0 / 128.0);

    /// Scales images in [0, 1] the way the network was trained.
    pub fn normalize(images: &Tensor) -> Result<Tensor> {
        images.affine(Self::NORMALIZE.0 as f64, Self::NORMALIZE.1 as f64)
    }

    /// Runs the stem and blocks, returning the output of every block listed in `taps` (in order).
    pub fn forward_taps(&self, x: &Tensor, taps: &[usize]) -> Result<Vec<Tensor>> {
        self.run_taps(&mut Eager, x, taps)
    }

    /// [`Self::forward_taps`] through any [`LayerRunner`].
    pub fn run_taps<R: LayerRunner>(&self, runner: &mut R, x: &R::Value, taps: &[usize]) -> Result<Vec<R::Value>> {
        let mut x = runner.stem(&self.stem, x)?;
        let mut outputs = Vec::with_capacity(taps.len());
        for (index, block) in self.blocks.iter().enumerate() {
            x = block.run(runner, &x)?;
            if taps.contains(&index) {
                outputs.push(x.clone());
            }
            if outputs.len() == taps.len() && self.head.is_none() {
                break;
            }
        }
        if outputs.len() != taps.len() {
            candle_core::bail!("requested block outputs {taps:?} beyond the loaded {} blocks", self.blocks.len());
        }
        Ok(outputs)
    }

    /// The stride-8 (block 4) and stride-16 (block 10) maps of already normalised images.
    pub fn features(&self, x: &Tensor) -> Result<FeatureMaps> {
        let mut maps = self.forward_taps(x, &[STRIDE8_BLOCK, STRIDE16_BLOCK])?;
        let stride16 = maps.pop().expect("two taps");
        let stride8 = maps.pop().expect("two taps");
        Ok(FeatureMaps { stride8, stride16 })
    }

    /// ImageNet logits of already normalised images (needs the head).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let Some(head) = &self.head else { candle_core::bail!("the classifier head was not loaded") };
        let mut x = self.stem.forward(x)?;
        for block in &self.blocks {
            x = block.run(&mut Eager, &x)?;
        }
        let pooled = head.conv.forward(&x)?.mean(D::Minus1)?.mean(D::Minus1)?;
        head.fc.forward(&pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    #[test]
    fn fused_pointwise_kernel_matches_candle_ops() -> Result<()> {
        let device = Device::Cpu;
        let (cin, cout) = (5, 7);
        let mut tensors = HashMap::new();
        tensors.insert("conv.weight".to_string(), Tensor::randn(0f32, 1.0, (cout, cin, 1, 1), &device)?);
        for (name, offset) in [("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.5)] {
            let values = (Tensor::randn(0f32, 0.3, cout, &device)? + offset)?;
            tensors.insert(format!("bn.{name}"), if name == "running_var" { values.abs()? } else { values });
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let x = Tensor::randn(0f32, 2.0, (2, cin, 3, 4), &device)?;
        let residual = Tensor::randn(0f32, 1.0, (2, cout, 3, 4), &device)?;
        // The network only adds a residual after a linear (no ReLU6) projection; that is what is fused.
        for (relu6, residual) in [(false, Some(&residual)), (false, None), (true, None)] {
            let conv = PointwiseConv::new(vb.pp("conv"), vb.pp("bn"), cin, cout, relu6)?;
            let fused = conv.forward_with(&x, residual)?;
            let reference = match residual {
                Some(r) => (conv.forward_portable(&x)? + r)?,
                None => conv.forward_portable(&x)?,
            };
            let diff = (fused - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "relu6 {relu6}: max diff {diff}");
        }
        Ok(())
    }
}
