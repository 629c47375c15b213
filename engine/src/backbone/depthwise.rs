//! Depthwise convolution with TensorFlow "SAME" padding, fused bias and ReLU6.
//!
//! candle runs a grouped convolution as one convolution per group, which for a depthwise layer (one group per
//! channel) is several times slower than a direct loop. On the CPU this is a custom op with a direct kernel over
//! each channel plane; on other devices the same maths runs as candle tensor ops (pad + grouped conv2d), which is
//! also the reference the kernel is tested against.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Padding that reproduces TensorFlow's "SAME": output size `ceil(n / stride)`, with the odd pixel at the end.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let output = input.div_ceil(stride);
    let total = ((output - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

#[derive(Debug, Clone, Copy)]
pub struct DepthwiseConv {
    pub kernel: usize,
    pub stride: usize,
    pub relu6: bool,
}

impl DepthwiseConv {
    /// `input` (B, C, H, W), `weight` (C, 1, k, k), `bias` (C).
    pub fn forward(&self, input: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        if input.device().is_cpu() {
            input
                .contiguous()?
                .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, self)
        } else {
            self.forward_portable(input, weight, bias)
        }
    }

    /// The same computation from candle's own ops: used on GPUs and as the test reference.
    pub fn forward_portable(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let (_, channels, height, width) = input.dims4()?;
        let (top, bottom) = same_padding(height, self.kernel, self.stride);
        let (left, right) = same_padding(width, self.kernel, self.stride);
        let padded = input
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let out = padded.conv2d(weight, 0, self.stride, 1, channels)?;
        let out = out.broadcast_add(&bias.reshape((1, channels, 1, 1))?)?;
        if self.relu6 {
            out.clamp(0f32, 6f32)
        } else {
            Ok(out)
        }
    }
}

impl CustomOp3 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv-same"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(input), CpuStorage::F32(weight), CpuStorage::F32(bias)) =
            (input, weight, bias)
        else {
            candle_core::bail!("depthwise conv: only f32 is supported");
        };
        let (Some((i0, i1)), Some((w0, w1)), Some((b0, b1))) = (
            input_layout.contiguous_offsets(),
            weight_layout.contiguous_offsets(),
            bias_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("depthwise conv: inputs must be contiguous");
        };
        let (input, weight, bias) = (&input[i0..i1], &weight[w0..w1], &bias[b0..b1]);
        let (batch, channels, height, width) = input_layout.shape().dims4()?;
        let k = self.kernel;
        if weight.len() != channels * k * k || bias.len() != channels {
            candle_core::bail!(
                "depthwise conv: weight/bias do not match {channels} channels of {k}x{k}"
            );
        }
        let stride = self.stride;
        let (pad_top, _) = same_padding(height, k, stride);
        let (pad_left, _) = same_padding(width, k, stride);
        let (out_h, out_w) = (height.div_ceil(stride), width.div_ceil(stride));
        let mut output = vec![0f32; batch * channels * out_h * out_w];
        let relu6 = self.relu6;
        output
            .par_chunks_mut(out_h * out_w)
            .enumerate()
            .for_each(|(plane_index, out_plane)| {
                let channel = plane_index % channels;
                let plane =
                    &input[plane_index * height * width..(plane_index + 1) * height * width];
                let kernel = &weight[channel * k * k..(channel + 1) * k * k];
                let b = bias[channel];
                for oy in 0..out_h {
                    let out_row = &mut out_plane[oy * out_w..(oy + 1) * out_w];
                    out_row.fill(b);
                    for ky in 0..k {
                        let iy = (oy * stride + ky) as isize - pad_top as isize;
                        if iy < 0 || iy >= height as isize {
                            continue;
                        }
                        let in_row = &plane[iy as usize * width..(iy as usize + 1) * width];
                        for kx in 0..k {
                            let w = kernel[ky * k + kx];
                            // Output columns whose input column lies inside the row.
                            let first = (pad_left.saturating_sub(kx)).div_ceil(stride);
                            let last = ((width + pad_left).saturating_sub(kx))
                                .div_ceil(stride)
                                .min(out_w);
                            if stride == 1 {
                                let start = first + kx - pad_left;
                                for (o, &x) in out_row[first..last].iter_mut().zip(&in_row[start..])
                                {
                                    *o += w * x;
                                }
                            } else {
                                for (ox, o) in out_row.iter_mut().enumerate().take(last).skip(first)
                                {
                                    *o += w * in_row[ox * stride + kx - pad_left];
                                }
                            }
                        }
                    }
                    if relu6 {
                        out_row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
                    }
                }
            });
        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, channels, out_h, out_w)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(256, 3, 2), (0, 1));
        assert_eq!(same_padding(256, 5, 2), (1, 2));
        assert_eq!(same_padding(255, 3, 2), (1, 1));
        assert_eq!(same_padding(32, 5, 1), (2, 2));
    }

    #[test]
    fn kernel_matches_portable_ops() -> Result<()> {
        let device = Device::Cpu;
        for &(kernel, stride, size) in &[(3, 1, 9), (3, 2, 10), (5, 2, 11), (5, 1, 8), (3, 2, 7)] {
            let input = Tensor::randn(0f32, 1.0, (2, 3, size, size + 1), &device)?;
            let weight = Tensor::randn(0f32, 1.0, (3, 1, kernel, kernel), &device)?;
            let bias = Tensor::randn(0f32, 1.0, 3, &device)?;
            for relu6 in [false, true] {
                let op = DepthwiseConv {
                    kernel,
                    stride,
                    relu6,
                };
                let fast = op.forward(&input, &weight, &bias)?;
                let reference = op.forward_portable(&input, &weight, &bias)?;
                assert_eq!(fast.dims(), reference.dims());
                let diff = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "k{kernel} s{stride} n{size}: max diff {diff}");
            }
        }
        Ok(())
    }
}
