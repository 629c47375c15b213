//! Depthwise convolution with TensorFlow "SAME" padding, fused bias and ReLU6.
//!
//! candle runs a grouped convolution as one convolution per group, which for a depthwise layer (one group per
//! channel) is several times slower than a direct loop. On the CPU this is a custom op with a direct kernel over
//! each channel plane; on other devices the same maths runs as candle tensor ops (k² shifted multiply-adds), and
//! both are tested against candle's grouped `conv2d`.

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
        if crate::device::cpu_kernels_on(input.device()) {
            input.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, self)
        } else {
            self.forward_portable(input, weight, bias)
        }
    }

    /// The same computation from candle's own ops, used on GPUs: k² shifted multiply-adds over the whole
    /// tensor. candle's grouped `conv2d` would be one convolution per channel — up to 1,152 kernel launches for
    /// one layer, which left the GPU waiting on the host — while this is a fixed number of ops whatever the
    /// channel count. A stride-2 input is first split into its s² phase planes, so every tap is a plain window.
    pub fn forward_portable(&self, input: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = input.dims4()?;
        let (kernel, stride) = (self.kernel, self.stride);
        let (out_h, out_w) = (height.div_ceil(stride), width.div_ceil(stride));
        let (top, _) = same_padding(height, kernel, stride);
        let (left, _) = same_padding(width, kernel, stride);
        // Each phase plane holds out + (k − 1)/s rows: enough for every tap's window. That covers TF's own
        // bottom padding, and the rows added beyond it are zeros no tap reads.
        let reach = (kernel - 1) / stride;
        let (phase_h, phase_w) = (out_h + reach, out_w + reach);
        let padded = input.pad_with_zeros(2, top, stride * phase_h - top - height)?.pad_with_zeros(
            3,
            left,
            stride * phase_w - left - width,
        )?;
        let phases: Vec<Vec<Tensor>> = if stride == 1 {
            vec![vec![padded]]
        } else {
            let split = padded.reshape((batch, channels, phase_h, stride, phase_w, stride))?;
            (0..stride)
                .map(|py| {
                    (0..stride)
                        .map(|px| split.narrow(3, py, 1)?.narrow(5, px, 1)?.squeeze(5)?.squeeze(3)?.contiguous())
                        .collect::<Result<_>>()
                })
                .collect::<Result<_>>()?
        };
        // (k·k, 1, C, 1, 1) → one (1, C, 1, 1) weight per tap.
        let taps = weight.reshape((channels, kernel * kernel))?.t()?.reshape((kernel * kernel, 1, channels, 1, 1))?;
        let mut out = bias.reshape((1, channels, 1, 1))?.broadcast_as((batch, channels, out_h, out_w))?.contiguous()?;
        for dy in 0..kernel {
            for dx in 0..kernel {
                let plane = &phases[dy % stride][dx % stride];
                let window = plane.narrow(2, dy / stride, out_h)?.narrow(3, dx / stride, out_w)?;
                out = (out + window.broadcast_mul(&taps.get(dy * kernel + dx)?)?)?;
            }
        }
        if self.relu6 {
            out.clamp(0f32, 6f32)
        } else {
            Ok(out)
        }
    }
}

/// What one channel plane's convolution needs to know.
struct PlaneGeometry {
    height: usize,
    width: usize,
    out_h: usize,
    out_w: usize,
    kernel: usize,
    stride: usize,
    pad_top: usize,
    pad_left: usize,
    relu6: bool,
}

/// Runs the plane kernel compiled for AVX2+FMA when the processor has them (decided at run time, so the same
/// binary still runs on older line PCs), else for the baseline instruction set.
fn convolve_plane(
    geometry: &PlaneGeometry,
    plane: &[f32],
    kernel: &[f32],
    bias: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features this function is compiled for were just detected.
            unsafe { convolve_plane_avx2(geometry, plane, kernel, bias, out, scratch) };
            return;
        }
    }
    convolve_plane_portable(geometry, plane, kernel, bias, out, scratch);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn convolve_plane_avx2(
    geometry: &PlaneGeometry,
    plane: &[f32],
    kernel: &[f32],
    bias: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    convolve_plane_portable(geometry, plane, kernel, bias, out, scratch);
}

/// Dispatches to a copy with the kernel size and stride fixed at compile time, so the tap loops unroll.
#[inline(always)]
fn convolve_plane_portable(
    geometry: &PlaneGeometry,
    plane: &[f32],
    kernel: &[f32],
    bias: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    match (geometry.kernel, geometry.stride) {
        (3, 1) => convolve_plane_fixed::<3, 1>(geometry, plane, kernel, bias, out, scratch),
        (3, 2) => convolve_plane_fixed::<3, 2>(geometry, plane, kernel, bias, out, scratch),
        (5, 1) => convolve_plane_fixed::<5, 1>(geometry, plane, kernel, bias, out, scratch),
        (5, 2) => convolve_plane_fixed::<5, 2>(geometry, plane, kernel, bias, out, scratch),
        _ => convolve_plane_fixed::<0, 0>(geometry, plane, kernel, bias, out, scratch),
    }
}

/// One channel plane. The input is first copied into `scratch`, zero-padded and split by column phase
/// (x mod stride), so that for every tap the inputs of a whole output row are one contiguous run: the inner
/// loop has no bounds logic and vectorises at stride 2 as at stride 1. `K`/`S` = 0 means "as in `geometry`".
#[inline(always)]
fn convolve_plane_fixed<const K: usize, const S: usize>(
    geometry: &PlaneGeometry,
    plane: &[f32],
    kernel: &[f32],
    bias: f32,
    out_plane: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let PlaneGeometry { height, width, out_h, out_w, pad_top, pad_left, relu6, .. } = *geometry;
    let k = if K == 0 { geometry.kernel } else { K };
    let stride = if S == 0 { geometry.stride } else { S };
    let padded_h = (out_h - 1) * stride + k;
    let padded_w = (out_w - 1) * stride + k;
    // Each phase row gets LANES spare zeros so the last block of outputs can read a full vector.
    let phase_w = padded_w.div_ceil(stride) + LANES;
    scratch.clear();
    scratch.resize(stride * padded_h * phase_w, 0.0);
    for r in 0..padded_h {
        let iy = r as isize - pad_top as isize;
        if iy < 0 || iy >= height as isize {
            continue;
        }
        let row = &plane[iy as usize * width..(iy as usize + 1) * width];
        for phase in 0..stride {
            // Phase column j holds padded column j·stride + phase, i.e. input column j·stride + phase − pad_left.
            let first = pad_left.saturating_sub(phase).div_ceil(stride);
            let end = (width + pad_left).min(padded_w).saturating_sub(phase).div_ceil(stride);
            if first >= end {
                continue;
            }
            let target = &mut scratch[(phase * padded_h + r) * phase_w..][first..end];
            let source = row[first * stride + phase - pad_left..].iter().step_by(stride);
            for (slot, &value) in target.iter_mut().zip(source) {
                *slot = value;
            }
        }
    }
    // Outputs in blocks of LANES held in registers while all k² taps accumulate into them.
    for oy in 0..out_h {
        let out_row = &mut out_plane[oy * out_w..(oy + 1) * out_w];
        for x0 in (0..out_w).step_by(LANES) {
            let mut acc = [bias; LANES];
            for ky in 0..k {
                let row_start = (oy * stride + ky) * phase_w + x0;
                for kx in 0..k {
                    let w = kernel[ky * k + kx];
                    let start = (kx % stride) * padded_h * phase_w + row_start + kx / stride;
                    let inputs: &[f32; LANES] = scratch[start..start + LANES].try_into().expect("LANES inputs");
                    for lane in 0..LANES {
                        acc[lane] += w * inputs[lane];
                    }
                }
            }
            if relu6 {
                acc.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
            }
            let n = LANES.min(out_w - x0);
            out_row[x0..x0 + n].copy_from_slice(&acc[..n]);
        }
    }
}

/// Outputs computed together in registers (two AVX vectors).
const LANES: usize = 16;

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
        let (CpuStorage::F32(input), CpuStorage::F32(weight), CpuStorage::F32(bias)) = (input, weight, bias) else {
            candle_core::bail!("depthwise conv: only f32 is supported");
        };
        let (Some((i0, i1)), Some((w0, w1)), Some((b0, b1))) =
            (input_layout.contiguous_offsets(), weight_layout.contiguous_offsets(), bias_layout.contiguous_offsets())
        else {
            candle_core::bail!("depthwise conv: inputs must be contiguous");
        };
        let (input, weight, bias) = (&input[i0..i1], &weight[w0..w1], &bias[b0..b1]);
        let (batch, channels, height, width) = input_layout.shape().dims4()?;
        let k = self.kernel;
        if weight.len() != channels * k * k || bias.len() != channels {
            candle_core::bail!("depthwise conv: weight/bias do not match {channels} channels of {k}x{k}");
        }
        let stride = self.stride;
        let (pad_top, _) = same_padding(height, k, stride);
        let (pad_left, _) = same_padding(width, k, stride);
        let (out_h, out_w) = (height.div_ceil(stride), width.div_ceil(stride));
        let mut output = vec![0f32; batch * channels * out_h * out_w];
        let geometry =
            PlaneGeometry { height, width, out_h, out_w, kernel: k, stride, pad_top, pad_left, relu6: self.relu6 };
        // Several small planes per task, so scheduling and the scratch buffer are paid per task, not per plane.
        let planes_per_task = (4096 / (out_h * out_w)).max(1);
        output.par_chunks_mut(out_h * out_w * planes_per_task).enumerate().for_each(|(task, out_planes)| {
            let mut scratch = Vec::new();
            for (offset, out_plane) in out_planes.chunks_exact_mut(out_h * out_w).enumerate() {
                let plane_index = task * planes_per_task + offset;
                let channel = plane_index % channels;
                let plane = &input[plane_index * height * width..(plane_index + 1) * height * width];
                let kernel = &weight[channel * k * k..(channel + 1) * k * k];
                convolve_plane(&geometry, plane, kernel, bias[channel], out_plane, &mut scratch);
            }
        });
        Ok((CpuStorage::F32(output), Shape::from((batch, channels, out_h, out_w))))
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

    /// The layer by its definition: TF "SAME" padding, then candle's grouped convolution, bias and ReLU6.
    fn grouped_conv(op: &DepthwiseConv, input: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = input.dims4()?;
        let (top, bottom) = same_padding(height, op.kernel, op.stride);
        let (left, right) = same_padding(width, op.kernel, op.stride);
        let padded = input.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?;
        let out =
            padded.conv2d(weight, 0, op.stride, 1, channels)?.broadcast_add(&bias.reshape((1, channels, 1, 1))?)?;
        if op.relu6 {
            out.clamp(0f32, 6f32)
        } else {
            Ok(out)
        }
    }

    #[test]
    fn kernel_and_portable_ops_match_the_grouped_convolution() -> Result<()> {
        let device = Device::Cpu;
        for &(kernel, stride, size) in
            &[(3, 1, 9), (3, 2, 10), (5, 2, 11), (5, 1, 8), (3, 2, 7), (3, 2, 33), (5, 1, 20), (5, 2, 1)]
        {
            let input = Tensor::randn(0f32, 1.0, (2, 3, size, size + 1), &device)?;
            let weight = Tensor::randn(0f32, 1.0, (3, 1, kernel, kernel), &device)?;
            let bias = Tensor::randn(0f32, 1.0, 3, &device)?;
            for relu6 in [false, true] {
                let op = DepthwiseConv { kernel, stride, relu6 };
                let reference = grouped_conv(&op, &input, &weight, &bias)?;
                for (path, out) in [
                    ("kernel", input.apply_op3_no_bwd(&weight, &bias, &op)?),
                    ("portable", op.forward_portable(&input, &weight, &bias)?),
                ] {
                    assert_eq!(out.dims(), reference.dims(), "{path}");
                    let diff = (out - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff < 1e-5, "{path} k{kernel} s{stride} n{size}: max diff {diff}");
                }
            }
        }
        Ok(())
    }
}
