//! 1×1 convolution (+ folded batch norm bias, optional ReLU6, optional residual) as one fused CPU kernel.
//!
//! Through candle's ops this is a matmul followed by a bias add, a clamp and a residual add — four passes over
//! a feature map that does not fit in cache, each on candle's spinning thread pool. Here the output is
//! initialised with bias (+ residual) and the gemm accumulates into it: one pass, then an in-place clamp.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct PointwiseKernel {
    /// `(out, in)` row-major.
    pub weight: Arc<Vec<f32>>,
    pub bias: Arc<Vec<f32>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub relu6: bool,
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("pointwise conv: only f32 is supported") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("pointwise conv: input must be contiguous"),
    }
}

impl PointwiseKernel {
    /// `x` (B, Cin, H, W) → (B, Cout, H, W), plus `residual` (same shape as the output) when given. A residual
    /// is added before the activation, so it is only accepted without ReLU6 (as in MBConv's linear projection).
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if residual.is_some() && self.relu6 {
            candle_core::bail!("pointwise conv: a residual cannot be fused with ReLU6");
        }
        let x = x.contiguous()?;
        match residual {
            Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, self),
            None => x.apply_op1_no_bwd(self),
        }
    }

    fn run(&self, input: &[f32], layout: &Layout, residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if channels != self.in_channels {
            candle_core::bail!("pointwise conv: expected {} channels, got {channels}", self.in_channels);
        }
        let pixels = height * width;
        let (cin, cout) = (self.in_channels, self.out_channels);
        // Built by appending bias (+ residual) rather than zero-filling first: one write pass fewer.
        let mut output = Vec::with_capacity(batch * cout * pixels);
        for b in 0..batch {
            for c in 0..cout {
                match residual {
                    Some(r) => output.extend(r[(b * cout + c) * pixels..][..pixels].iter().map(|r| r + self.bias[c])),
                    None => output.extend(std::iter::repeat_n(self.bias[c], pixels)),
                }
            }
        }
        for b in 0..batch {
            let out = &mut output[b * cout * pixels..(b + 1) * cout * pixels];
            let x = &input[b * cin * pixels..(b + 1) * cin * pixels];
            // SAFETY: all three buffers are row-major with the strides given and sized m×n, m×k, k×n.
            unsafe {
                gemm::gemm(
                    cout,
                    pixels,
                    cin,
                    out.as_mut_ptr(),
                    1,
                    pixels as isize,
                    true,
                    self.weight.as_ptr(),
                    1,
                    cin as isize,
                    x.as_ptr(),
                    1,
                    pixels as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        if self.relu6 {
            output.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
        }
        Ok((CpuStorage::F32(output), Shape::from((batch, cout, height, width))))
    }
}

impl CustomOp1 for PointwiseKernel {
    fn name(&self) -> &'static str {
        "pointwise-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(contiguous(storage, layout)?, layout, None)
    }
}

impl CustomOp2 for PointwiseKernel {
    fn name(&self) -> &'static str {
        "pointwise-conv-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let residual = contiguous(s2, l2)?;
        let (batch, _, height, width) = l1.shape().dims4()?;
        if residual.len() != batch * self.out_channels * height * width {
            candle_core::bail!("pointwise conv: residual does not match the output shape");
        }
        self.run(contiguous(s1, l1)?, l1, Some(residual))
    }
}

/// Unfolds k×k patches (TF "SAME" padding) into channels, `(B, C, H, W)` → `(B, C·k·k, H', W')`, so a small
/// dense convolution (the 3-channel stem) runs as a [`PointwiseKernel`].
#[derive(Debug, Clone, Copy)]
pub struct Im2Col {
    pub kernel: usize,
    pub stride: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-same"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous(storage, layout)?;
        let (batch, channels, height, width) = layout.shape().dims4()?;
        let (k, stride) = (self.kernel, self.stride);
        let (pad_top, _) = super::depthwise::same_padding(height, k, stride);
        let (pad_left, _) = super::depthwise::same_padding(width, k, stride);
        let (out_h, out_w) = (height.div_ceil(stride), width.div_ceil(stride));
        let mut output = vec![0f32; batch * channels * k * k * out_h * out_w];
        for (row_index, out_plane) in output.chunks_exact_mut(out_h * out_w).enumerate() {
            let (image_channel, tap) = (row_index / (k * k), row_index % (k * k));
            let (ky, kx) = (tap / k, tap % k);
            let plane = &input[image_channel * height * width..(image_channel + 1) * height * width];
            for oy in 0..out_h {
                let iy = (oy * stride + ky) as isize - pad_top as isize;
                if iy < 0 || iy >= height as isize {
                    continue;
                }
                let row = &plane[iy as usize * width..(iy as usize + 1) * width];
                // Outputs whose input column ox·stride + kx − pad_left lies inside the row.
                let first = pad_left.saturating_sub(kx).div_ceil(stride);
                let end = (width + pad_left).saturating_sub(kx).div_ceil(stride).min(out_w);
                if first < end {
                    let source = row[first * stride + kx - pad_left..].iter().step_by(stride);
                    for (out, &value) in out_plane[oy * out_w + first..oy * out_w + end].iter_mut().zip(source) {
                        *out = value;
                    }
                }
            }
        }
        Ok((CpuStorage::F32(output), Shape::from((batch, channels * k * k, out_h, out_w))))
    }
}
