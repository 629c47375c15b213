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
            input.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, self)
        } else {
            self.forward_portable(input, weight, bias)
        }
    }

    /// The same computation from candle's own ops: used on GPUs and as the test reference.
    pub fn forward_portable(&self, input: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = input.dims4()?;
        let (top, bottom) = same_padding(height, self.kernel, self.stride);
        let (left, right) = same_padding(width, self.kernel, self.stride);
        let padded = input.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?;
        let out = padded.conv2d(weight, 0, self.stride, 1, channels)?;
        let out = out.broadcast_add(&bias.reshape((1, channels, 1, 1))?)?;
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
fn convolve_plane(geometry: &PlaneGeometry, plane: &[f32], kernel: &[f32], bias: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features this function is compiled for were just detected.
            unsafe { convolve_plane_avx2(geometry, plane, kernel, bias, out) };
            return;
        }
    }
    convolve_plane_portable(geometry, plane, kernel, bias, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn convolve_plane_avx2(geometry: &PlaneGeometry, plane: &[f32], kernel: &[f32], bias: f32, out: &mut [f32]) {
    convolve_plane_portable(geometry, plane, kernel, bias, out);
}

/// Dispatches to a copy with the kernel size and stride fixed at compile time, so the tap loops unroll.
#[inline(always)]
fn convolve_plane_portable(geometry: &PlaneGeometry, plane: &[f32], kernel: &[f32], bias: f32, out: &mut [f32]) {
    match (geometry.kernel, geometry.stride) {
        (3, 1) => convolve_plane_fixed::<3, 1>(geometry, plane, kernel, bias, out),
        (3, 2) => convolve_plane_fixed::<3, 2>(geometry, plane, kernel, bias, out),
        (5, 1) => convolve_plane_fixed::<5, 1>(geometry, plane, kernel, bias, out),
        (5, 2) => convolve_plane_fixed::<5, 2>(geometry, plane, kernel, bias, out),
        _ => convolve_plane_fixed::<0, 0>(geometry, plane, kernel, bias, out),
    }
}

/// `K`/`S` = 0 means "as in `geometry`".
#[inline(always)]
fn convolve_plane_fixed<const K: usize, const S: usize>(
    geometry: &PlaneGeometry,
    plane: &[f32],
    kernel: &[f32],
    bias: f32,
    out_plane: &mut [f32],
) {
    let PlaneGeometry { height, width, out_h, out_w, pad_top, pad_left, relu6, .. } = *geometry;
    let k = if K == 0 { geometry.kernel } else { K };
    let stride = if S == 0 { geometry.stride } else { S };
    // Columns split by phase (x mod stride), so every tap reads a contiguous run of inputs and the inner loop
    // vectorises at stride 2 as it does at stride 1 (where the plane itself is the only phase).
    let phase_width: Vec<usize> = (0..stride).map(|p| (width + stride - 1 - p) / stride).collect();
    let split: Vec<Vec<f32>> = if stride == 1 {
        Vec::new()
    } else {
        (0..stride)
            .map(|p| {
                let mut columns = Vec::with_capacity(height * phase_width[p]);
                for row in plane.chunks_exact(width) {
                    columns.extend(row.iter().skip(p).step_by(stride));
                }
                columns
            })
            .collect()
    };
    let phases: Vec<&[f32]> = if stride == 1 { vec![plane] } else { split.iter().map(Vec::as_slice).collect() };
    for oy in 0..out_h {
        let out_row = &mut out_plane[oy * out_w..(oy + 1) * out_w];
        out_row.fill(bias);
        for ky in 0..k {
            let iy = (oy * stride + ky) as isize - pad_top as isize;
            if iy < 0 || iy >= height as isize {
                continue;
            }
            for kx in 0..k {
                let w = kernel[ky * k + kx];
                // Input column of output `ox` is `ox·stride + offset` = phase column `ox + shift`.
                let offset = kx as isize - pad_left as isize;
                let phase = offset.rem_euclid(stride as isize) as usize;
                let shift = offset.div_euclid(stride as isize);
                let columns = phase_width[phase] as isize;
                let first = (-shift).max(0) as usize;
                let last = (columns - shift).clamp(0, out_w as isize) as usize;
                if first >= last {
                    continue;
                }
                let row = &phases[phase][iy as usize * phase_width[phase]..][..phase_width[phase]];
                let start = (first as isize + shift) as usize;
                for (o, &x) in out_row[first..last].iter_mut().zip(&row[start..]) {
                    *o += w * x;
                }
            }
        }
        if relu6 {
            out_row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
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
        output.par_chunks_mut(out_h * out_w).enumerate().for_each(|(plane_index, out_plane)| {
            let channel = plane_index % channels;
            let plane = &input[plane_index * height * width..(plane_index + 1) * height * width];
            let kernel = &weight[channel * k * k..(channel + 1) * k * k];
            convolve_plane(&geometry, plane, kernel, bias[channel], out_plane);
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

    #[test]
    fn kernel_matches_portable_ops() -> Result<()> {
        let device = Device::Cpu;
        for &(kernel, stride, size) in &[(3, 1, 9), (3, 2, 10), (5, 2, 11), (5, 1, 8), (3, 2, 7)] {
            let input = Tensor::randn(0f32, 1.0, (2, 3, size, size + 1), &device)?;
            let weight = Tensor::randn(0f32, 1.0, (3, 1, kernel, kernel), &device)?;
            let bias = Tensor::randn(0f32, 1.0, 3, &device)?;
            for relu6 in [false, true] {
                let op = DepthwiseConv { kernel, stride, relu6 };
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
