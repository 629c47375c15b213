//! Trainable layers for the methods that learn convolutional networks (autoencoder, STFPM, DRAEM, FCDD, reverse
//! distillation, and the couplings of FastFlow and CS-Flow).
//!
//! Maps are channels-last `(B, H, W, C)`. A convolution is im2col — the k×k shifted views of the zero-padded
//! map concatenated along the channels — followed by one matrix product (candle's `conv2d` backward was 4–10×
//! slower than PyTorch's when the stack was chosen, issue 5). On the CPU the whole convolution, bias and
//! activation included, is one op with its own backward (`conv_kernel`, issue 24); on CUDA and Metal it is
//! composed from candle ops (narrow, cat, reshape, matmul), which candle differentiates.

use crate::methods::{conv_kernel, fused};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use rayon::prelude::*;

/// `(B·H'·W', k·k·C)`: row `(b, y, x)` holds the k×k neighbourhood (zero padding k/2) of output position
/// `(y, x)`, taken every `stride` pixels; the columns are ordered tap-major `(dy, dx, c)`.
pub fn patches(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if kernel.is_multiple_of(2) || !(1..=2).contains(&stride) {
        bail!("patches: kernel must be odd and stride 1 or 2 (got {kernel}, {stride})");
    }
    if kernel == 1 && stride == 1 {
        return Ok(x.reshape((b * h * w, c))?);
    }
    if crate::methods::fused::fused_on(x) {
        // Built from candle's narrow + cat this copy took 620 ms forward and as long backward for a batch of
        // 16 maps of 128² × 32 (most of an autoencoder step); as one kernel it is a few memcpy passes.
        return Ok(x.contiguous()?.apply_op1(Unfold { kernel, stride })?);
    }
    patches_portable(x, kernel, stride)
}

/// [`patches`] from candle's own ops: used on GPUs and as the reference the CPU kernel is tested against.
pub fn patches_portable(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (out_h, out_w) = (h.div_ceil(stride), w.div_ceil(stride));
    let pad = kernel / 2;
    // With stride 2 each view spans 2·out rows, so odd sizes get one more row/column of zeros at the end.
    let padded =
        x.pad_with_zeros(1, pad, pad + (stride * out_h - h))?.pad_with_zeros(2, pad, pad + (stride * out_w - w))?;
    let mut views = Vec::with_capacity(kernel * kernel);
    for dy in 0..kernel {
        for dx in 0..kernel {
            let view = padded.narrow(1, dy, stride * out_h)?.narrow(2, dx, stride * out_w)?;
            let view = if stride == 1 {
                view
            } else {
                view.contiguous()?.reshape((b, out_h, 2, out_w, 2, c))?.narrow(2, 0, 1)?.narrow(4, 0, 1)?
            };
            views.push(view.reshape((b, out_h, out_w, c))?);
        }
    }
    Ok(Tensor::cat(&views, 3)?.reshape((b * out_h * out_w, kernel * kernel * c))?)
}

/// The CPU kernel of [`patches`] (im2col, channels-last) with its backward, the matching fold (col2im).
#[derive(Debug, Clone, Copy)]
struct Unfold {
    kernel: usize,
    stride: usize,
}

/// Geometry shared by the unfold and the fold (and the fused convolution of `conv_kernel`).
pub(crate) struct UnfoldGeometry {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl UnfoldGeometry {
    pub fn new(kernel: usize, stride: usize, height: usize, width: usize, channels: usize) -> Self {
        let (out_h, out_w) = (height.div_ceil(stride), width.div_ceil(stride));
        Self { height, width, channels, out_h, out_w, kernel, stride }
    }

    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Output positions per image.
    pub fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Values per im2col row: k·k·C.
    pub fn row_len(&self) -> usize {
        self.kernel * self.kernel * self.channels
    }

    pub fn rows_len(&self) -> usize {
        self.positions() * self.row_len()
    }

    /// True when the im2col rows are the image itself (1×1, stride 1).
    pub fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1
    }

    /// One image's im2col rows into `rows`, every entry written (padding as zeros): a reused buffer may be dirty.
    pub fn unfold_into(&self, image: &[f32], rows: &mut [f32]) {
        let c = self.channels;
        self.for_each_tap(|row, at| match at {
            Some(at) => rows[row..row + c].copy_from_slice(&image[at..at + c]),
            None => rows[row..row + c].fill(0.0),
        });
    }

    /// Adds one image's im2col rows back onto the positions they were copied from (the adjoint of the unfold).
    pub fn fold_into(&self, rows: &[f32], image: &mut [f32]) {
        let c = self.channels;
        self.for_each_tap(|row, at| {
            if let Some(at) = at {
                for (target, value) in image[at..at + c].iter_mut().zip(&rows[row..row + c]) {
                    *target += value;
                }
            }
        });
    }

    /// Calls `visit(row_offset, Some(input_offset))` for every tap of one image that lies inside it (`channels`
    /// consecutive values at both offsets correspond) and `visit(row_offset, None)` for every tap in the padding.
    fn for_each_tap(&self, mut visit: impl FnMut(usize, Option<usize>)) {
        let (k, c, pad) = (self.kernel, self.channels, self.kernel / 2);
        let inside = |position: usize, tap: usize, size: usize| {
            (position * self.stride + tap).checked_sub(pad).filter(|&i| i < size)
        };
        for oy in 0..self.out_h {
            for ox in 0..self.out_w {
                let row = (oy * self.out_w + ox) * k * k * c;
                for dy in 0..k {
                    let iy = inside(oy, dy, self.height);
                    for dx in 0..k {
                        let at = iy.zip(inside(ox, dx, self.width)).map(|(iy, ix)| (iy * self.width + ix) * c);
                        visit(row + (dy * k + dx) * c, at);
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "unfold-channels-last"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = fused::contiguous_f32(self.name(), storage, layout)?;
        let (batch, height, width, channels) = layout.shape().dims4()?;
        let g = UnfoldGeometry::new(self.kernel, self.stride, height, width, channels);
        let mut output = vec![0f32; batch * g.rows_len()];
        output
            .par_chunks_exact_mut(g.rows_len())
            .zip(input.par_chunks_exact(g.image_len()))
            .for_each(|(rows, image)| g.unfold_into(image, rows));
        let shape = Shape::from((batch * g.out_h * g.out_w, self.kernel * self.kernel * channels));
        Ok((CpuStorage::F32(output), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let fold = Fold { unfold: *self, input_dims: arg.dims4()? };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&fold)?))
    }
}

/// The adjoint of [`Unfold`]: sums each row value back onto the input position it was copied from.
#[derive(Debug, Clone, Copy)]
struct Fold {
    unfold: Unfold,
    input_dims: (usize, usize, usize, usize),
}

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "fold-channels-last"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = fused::contiguous_f32(self.name(), storage, layout)?;
        let (batch, height, width, channels) = self.input_dims;
        let g = UnfoldGeometry::new(self.unfold.kernel, self.unfold.stride, height, width, channels);
        let mut output = vec![0f32; batch * g.image_len()];
        output
            .par_chunks_exact_mut(g.image_len())
            .zip(rows.par_chunks_exact(g.rows_len()))
            .for_each(|(image, rows)| g.fold_into(rows, image));
        Ok((CpuStorage::F32(output), Shape::from(self.input_dims)))
    }
}

/// A k×k convolution (odd k, "same" zero padding) with bias, stride 1 or 2, on channels-last maps.
pub struct Conv {
    /// `(out, k·k·in)`, columns tap-major `(dy, dx, c)` as [`patches`] lays them out.
    pub linear: Linear,
    pub kernel: usize,
    pub stride: usize,
    pub out_channels: usize,
}

impl Conv {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Result<Self> {
        let linear = candle_nn::linear(kernel * kernel * in_channels, out_channels, vb)?;
        Ok(Self { linear, kernel, stride, out_channels })
    }

    /// `(B, H, W, Cin)` → `(B, ⌈H/stride⌉, ⌈W/stride⌉, Cout)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.convolve(x, None)
    }

    /// `leaky_relu(self.forward(x))`.
    pub fn forward_leaky(&self, x: &Tensor) -> Result<Tensor> {
        self.convolve(x, Some(LEAKY_SLOPE as f32))
    }

    /// On the CPU one fused op (`conv_kernel`); elsewhere im2col, candle's matrix product, bias and activation.
    fn convolve(&self, x: &Tensor, slope: Option<f32>) -> Result<Tensor> {
        if let (true, Some(bias)) = (fused::fused_on(x), self.linear.bias()) {
            let weight = self.linear.weight();
            return Ok(conv_kernel::conv_forward(x, weight, bias, self.kernel, self.stride, slope)?);
        }
        let (b, h, w, _) = x.dims4()?;
        let rows = patches(x, self.kernel, self.stride)?;
        let rows = match slope {
            Some(_) => linear_leaky(&self.linear, &rows)?,
            None => self.linear.forward(&rows)?,
        };
        Ok(rows.reshape((b, h.div_ceil(self.stride), w.div_ceil(self.stride), self.out_channels))?)
    }
}

/// `leaky_relu(linear.forward(rows))` for `rows: (N, in)`: the matrix product, then bias and activation fused.
pub fn linear_leaky(linear: &Linear, rows: &Tensor) -> Result<Tensor> {
    let Some(bias) = linear.bias() else { return leaky_relu(&linear.forward(rows)?) };
    let product = rows.matmul(&linear.weight().t()?)?;
    Ok(fused::bias_leaky_relu(&product, bias, LEAKY_SLOPE as f32)?)
}

/// Nearest-neighbour ×2 upsampling of a channels-last map (differentiable: candle has no backward for bilinear).
pub fn upsample2x(x: &Tensor) -> Result<Tensor> {
    if let Some(fused) = fused::upsample2x(x)? {
        return Ok(fused);
    }
    let (b, h, w, c) = x.dims4()?;
    Ok(x.reshape((b, h, 1, w, 1, c))?.broadcast_as((b, h, 2, w, 2, c))?.contiguous()?.reshape((b, 2 * h, 2 * w, c))?)
}

/// `(B, H, W, 2·2·C)` → `(B, 2H, 2W, C)`: channel group `(dy, dx)` becomes the pixel at offset (dy, dx).
pub fn pixel_shuffle(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let c = c / 4;
    Ok(x.reshape((b, h, w, 2, 2, c))?.permute((0, 1, 3, 2, 4, 5))?.contiguous()?.reshape((b, 2 * h, 2 * w, c))?)
}

/// Slope of [`leaky_relu`] below zero.
pub const LEAKY_SLOPE: f64 = 0.2;

/// max(x, 0.2·x).
pub fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(&(x * LEAKY_SLOPE)?)?)
}

/// `(B, C, H, W)` → `(B, H, W, C)`, contiguous.
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 2, 3, 1))?.contiguous()?)
}

/// `(B, H, W, C)` → `(B, C, H, W)`, contiguous.
pub fn channels_first(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 3, 1, 2))?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn ramp(shape: (usize, usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The im2col convolution equals candle's conv2d (NCHW, same weights) for both strides and odd sizes.
    #[test]
    fn convolution_matches_candle_conv2d() {
        for (size, stride) in [(7, 1), (7, 2), (8, 2), (6, 1)] {
            let varmap = VarMap::new();
            let conv = Conv::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), 3, 5, 3, stride).unwrap();
            let x = ramp((2, size, size, 3));
            let ours = conv.forward(&x).unwrap();
            // Linear weight (out, dy·dx·c) → conv kernel (out, c, dy, dx).
            let kernel = conv.linear.weight().reshape((5, 3, 3, 3)).unwrap().permute((0, 3, 1, 2)).unwrap();
            let reference = channels_first(&x)
                .unwrap()
                .conv2d(&kernel.contiguous().unwrap(), 1, stride, 1, 1)
                .unwrap()
                .broadcast_add(&conv.linear.bias().unwrap().reshape((1, 5, 1, 1)).unwrap())
                .unwrap();
            let reference = channels_last(&reference).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "size {size} stride {stride}");
            let difference = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(difference < 1e-4, "size {size} stride {stride}: max difference {difference}");
        }
    }

    /// The CPU kernel and its backward equal the portable narrow + cat version and its autograd.
    #[test]
    fn unfold_kernel_matches_the_portable_version_and_its_gradient() {
        for (size, stride, kernel) in [(7, 1, 3), (7, 2, 3), (8, 2, 3), (6, 1, 5)] {
            let x = candle_core::Var::from_tensor(&ramp((2, size, size, 3))).unwrap();
            let weights = ramp((1, 1, 1, 2 * size.div_ceil(stride).pow(2) * kernel * kernel * 3))
                .reshape((2 * size.div_ceil(stride).pow(2), kernel * kernel * 3))
                .unwrap();
            let fast = patches(x.as_tensor(), kernel, stride).unwrap();
            let slow = patches_portable(x.as_tensor(), kernel, stride).unwrap();
            assert_eq!(fast.to_vec2::<f32>().unwrap(), slow.to_vec2::<f32>().unwrap(), "{size} {stride} {kernel}");
            let gradient = |rows: &Tensor| {
                let grads = (rows * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (g_fast, g_slow) = (gradient(&fast), gradient(&slow));
            for (a, b) in g_fast.iter().zip(&g_slow) {
                assert!((a - b).abs() < 1e-4, "{size} {stride} {kernel}: gradient {a} vs {b}");
            }
        }
    }

    #[test]
    fn upsampling_repeats_each_pixel_and_has_a_gradient() {
        let x = candle_core::Var::from_tensor(&ramp((1, 2, 3, 2))).unwrap();
        let up = upsample2x(x.as_tensor()).unwrap();
        assert_eq!(up.dims(), [1, 4, 6, 2]);
        let up_values: Vec<f32> = up.flatten_all().unwrap().to_vec1().unwrap();
        let x_values: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for y in 0..4 {
            for xx in 0..6 {
                for c in 0..2 {
                    assert_eq!(up_values[(y * 6 + xx) * 2 + c], x_values[((y / 2) * 3 + xx / 2) * 2 + c]);
                }
            }
        }
        let gradient = up.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = gradient.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|&v| v == 4.0), "each input pixel feeds four outputs: {g:?}");
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    #[ignore]
    fn conv_timing() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        for (side, cin, cout, stride) in [(128, 3, 32, 2), (64, 32, 32, 1), (128, 32, 32, 1), (128, 32, 3, 1)] {
            let conv = Conv::new(vb.pp(format!("c{side}{cin}{cout}{stride}")), cin, cout, 3, stride).unwrap();
            let x = Tensor::rand(0f32, 1f32, (16, side, side, cin), &Device::Cpu).unwrap();
            let t = std::time::Instant::now();
            let p = patches(&x, 3, stride).unwrap();
            let t1 = t.elapsed();
            let y = conv.linear.forward(&p).unwrap();
            let t2 = t.elapsed();
            let _ = y.sum_all().unwrap().backward().unwrap();
            let t3 = t.elapsed();
            eprintln!(
                "{side} {cin}->{cout} s{stride}: patches {t1:?} matmul {:?} backward {:?} rows {:?}",
                t2 - t1,
                t3 - t2,
                p.dims()
            );
        }
    }
}
