//! The trained convolution as one CPU op with its own backward: im2col + matrix product + bias (+ leaky ReLU)
//! forward; bias, weight and input gradients backward (issue 24).
//!
//! Composed from candle ops (unfold, matmul, transpose, bias, activation, reshape) one convolution is five graph
//! nodes, and candle's backprop gives each a fresh zero tensor and an add — for the matmul's input that is the
//! whole im2col matrix, nine times the activation. Here the im2col rows of one image at a time live in a scratch
//! buffer reused across the batch and recomputed in the backward instead of kept, and the graph holds one node.
//! Images are spread over rayon's threads (each product single-threaded); a batch smaller than the thread count
//! splits each product instead. [`crate::methods::layers::Conv`] uses this on the CPU and the composition elsewhere.

use crate::methods::fused::{column_sums, contiguous_f32, matmul_into, LeakyReluGrad, Matrix};
use crate::methods::layers::UnfoldGeometry;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `(B, H, W, Cin)` convolved with `weight: (Cout, k·k·Cin)` (columns tap-major `(dy, dx, c)`) plus `bias`,
/// then a leaky ReLU with `slope` when given: `(B, ⌈H/s⌉, ⌈W/s⌉, Cout)`. CPU, f32.
pub fn conv_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    kernel: usize,
    stride: usize,
    slope: Option<f32>,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, ConvKernel { kernel, stride, slope })
}

#[derive(Debug, Clone, Copy)]
struct ConvKernel {
    kernel: usize,
    stride: usize,
    slope: Option<f32>,
}

/// Fewer images than threads: split each product across the threads instead of spreading the images.
fn split_products(batch: usize) -> bool {
    batch < rayon::current_num_threads()
}

/// Images per rayon task: one task per thread, so each scratch buffer (and partial sum) is made once per thread.
fn images_per_task(batch: usize) -> usize {
    batch.div_ceil(rayon::current_num_threads()).max(1)
}

/// The geometry of `x: (B, H, W, C)` for this op, with the weight's shape checked: (batch, geometry, Cout).
fn geometry(op: &ConvKernel, x: &Shape, weight: &Shape) -> candle_core::Result<(usize, UnfoldGeometry, usize)> {
    let (batch, height, width, channels) = x.dims4()?;
    let g = UnfoldGeometry::new(op.kernel, op.stride, height, width, channels);
    let (out_channels, row_len) = weight.dims2()?;
    if row_len != g.row_len() {
        candle_core::bail!("conv: weight {:?} does not fit {channels} channels and kernel {}", weight, op.kernel);
    }
    Ok((batch, g, out_channels))
}

/// Builds a `batch × output_len` buffer image by image: each image's slice is first filled by `fill`, then
/// `per_image(image, output, rows_scratch, parallel_product)` runs on it, images across threads (or one after the
/// other with split products); the scratch holds one image's im2col rows. The slices are never zeroed as a whole
/// first: that pass, and the page faults of fresh memory, would run on one thread.
fn map_images(
    g: &UnfoldGeometry,
    inputs: &[f32],
    input_len: usize,
    output_len: usize,
    fill: impl Fn(&mut [MaybeUninit<f32>]) + Sync,
    per_image: impl Fn(&[f32], &mut [f32], &mut [f32], bool) + Sync,
) -> Vec<f32> {
    let batch = inputs.len() / input_len.max(1);
    let total = batch * output_len;
    let rows_len = if g.is_pointwise() { 0 } else { g.rows_len() };
    let mut output = Vec::with_capacity(total);
    let run = |image: &[f32], out: &mut [MaybeUninit<f32>], rows: &mut [f32], parallel: bool| {
        fill(out);
        // SAFETY: `fill` wrote every slot of `out` (each caller's fill writes the whole slice), and f32 has no
        // invalid bit patterns.
        let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
        per_image(image, out, rows, parallel);
    };
    let slots = &mut output.spare_capacity_mut()[..total];
    if split_products(batch) {
        with_scratch(rows_len, |rows| {
            for (image, out) in inputs.chunks_exact(input_len).zip(slots.chunks_exact_mut(output_len)) {
                run(image, out, rows, true);
            }
        });
    } else {
        inputs
            .par_chunks_exact(input_len)
            .zip(slots.par_chunks_exact_mut(output_len))
            .with_min_len(images_per_task(batch))
            .for_each(|(image, out)| with_scratch(rows_len, |rows| run(image, out, rows, false)));
    }
    // SAFETY: every image's slice of the first `total` slots was written by `run`.
    unsafe { output.set_len(total) };
    output
}

/// Fills with zeros.
fn zeros(slots: &mut [MaybeUninit<f32>]) {
    slots.iter_mut().for_each(|slot| {
        slot.write(0.0);
    });
}

thread_local! {
    /// Each thread's im2col buffer, kept between calls: allocated fresh, megabytes of rows per image would be
    /// zeroed and page-faulted in at every convolution of every step.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `work` with this thread's scratch buffer, at least `len` long (contents left from earlier calls).
fn with_scratch<R>(len: usize, work: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            work(&mut buffer[..len])
        }
        // Re-entered on this thread (rayon may run another task while one waits): a buffer of its own.
        Err(_) => work(&mut vec![0f32; len]),
    })
}

/// One image's im2col rows: the image itself for a 1×1 stride-1 kernel, else unfolded into `scratch`.
fn rows_of<'a>(g: &UnfoldGeometry, image: &'a [f32], scratch: &'a mut [f32]) -> &'a [f32] {
    if g.is_pointwise() {
        image
    } else {
        g.unfold_into(image, scratch);
        scratch
    }
}

impl CustomOp3 for ConvKernel {
    fn name(&self) -> &'static str {
        "conv-channels-last"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, g, out_channels) = geometry(self, x_layout.shape(), weight_layout.shape())?;
        let x = contiguous_f32(self.name(), x, x_layout)?;
        let weight = contiguous_f32(self.name(), weight, weight_layout)?;
        let bias = contiguous_f32(self.name(), bias, bias_layout)?;
        if bias.len() != out_channels {
            candle_core::bail!("conv: {} biases for {out_channels} output channels", bias.len());
        }
        let positions = g.positions();
        let transposed_weight = Matrix::row_major(weight, out_channels, g.row_len()).t();
        let slope = self.slope;
        // Started from the bias, the product accumulates onto it: no separate pass adds it.
        let start_from_bias = |slots: &mut [MaybeUninit<f32>]| {
            for position in slots.chunks_exact_mut(out_channels) {
                position.iter_mut().zip(bias).for_each(|(slot, &b)| {
                    slot.write(b);
                });
            }
        };
        let output = map_images(
            &g,
            x,
            g.image_len(),
            positions * out_channels,
            start_from_bias,
            |image, out, scratch, parallel| {
                let rows = rows_of(&g, image, scratch);
                matmul_into(out, Matrix::row_major(rows, positions, g.row_len()), transposed_weight, true, parallel);
                if let Some(slope) = slope {
                    out.iter_mut().for_each(|v| *v *= if *v > 0.0 { 1.0 } else { slope });
                }
            },
        );
        Ok((CpuStorage::F32(output), Shape::from((batch, g.out_h, g.out_w, out_channels))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        result: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Through the activation first: from then on it is a plain convolution's backward.
        let grad = match self.slope {
            Some(slope) => result.apply_op2_no_bwd(&grad, &LeakyReluGrad { slope })?,
            None => grad,
        };
        let out_channels = weight.dim(0)?;
        let grad_bias = column_sums(&grad.reshape(((), out_channels))?)?;
        let grad_weight = grad.apply_op2_no_bwd(x, &WeightGrad { conv: *self })?;
        // A network's first convolution reads data: its input needs no gradient.
        let grad_input = match x.track_op() {
            true => Some(grad.apply_op2_no_bwd(weight, &InputGrad { conv: *self, input_dims: x.dims4()? })?),
            false => None,
        };
        Ok((grad_input, Some(grad_weight), Some(grad_bias)))
    }
}

/// `Σ_images gradᵀ · rows`: the weight's gradient `(Cout, k·k·Cin)` from the output gradient and the input.
#[derive(Debug, Clone, Copy)]
struct WeightGrad {
    conv: ConvKernel,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv-weight-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, height, width, channels) = x_layout.shape().dims4()?;
        let g = UnfoldGeometry::new(self.conv.kernel, self.conv.stride, height, width, channels);
        let (grad_batch, out_h, out_w, out_channels) = grad_layout.shape().dims4()?;
        if (grad_batch, out_h, out_w) != (batch, g.out_h, g.out_w) {
            candle_core::bail!("conv-weight-grad: gradient {:?} for input {:?}", grad_layout.shape(), x_layout.shape());
        }
        let grad = contiguous_f32(self.name(), grad, grad_layout)?;
        let x = contiguous_f32(self.name(), x, x_layout)?;
        let (positions, row_len) = (g.positions(), g.row_len());
        let per_image_grad = positions * out_channels;
        let rows_len = if g.is_pointwise() { 0 } else { g.rows_len() };
        let product = |image: &[f32], grad: &[f32], total: &mut [f32], parallel| {
            with_scratch(rows_len, |scratch| {
                let rows = rows_of(&g, image, scratch);
                let grad = Matrix::row_major(grad, positions, out_channels).t();
                matmul_into(total, grad, Matrix::row_major(rows, positions, row_len), true, parallel);
            })
        };
        let total = if split_products(batch) {
            let mut total = vec![0f32; out_channels * row_len];
            for (image, grad) in x.chunks_exact(g.image_len()).zip(grad.chunks_exact(per_image_grad)) {
                product(image, grad, &mut total, true);
            }
            total
        } else {
            // One partial sum per rayon task, added up at the end.
            x.par_chunks_exact(g.image_len())
                .zip(grad.par_chunks_exact(per_image_grad))
                .with_min_len(images_per_task(batch))
                .fold(
                    || vec![0f32; out_channels * row_len],
                    |mut total, (image, grad)| {
                        product(image, grad, &mut total, false);
                        total
                    },
                )
                .reduce_with(|mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                })
                .unwrap_or_else(|| vec![0f32; out_channels * row_len])
        };
        Ok((CpuStorage::F32(total), Shape::from((out_channels, row_len))))
    }
}

/// The input's gradient: each image's `grad · weight` rows folded back onto the positions they came from.
#[derive(Debug, Clone, Copy)]
struct InputGrad {
    conv: ConvKernel,
    input_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv-input-grad"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        grad_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, g, out_channels) = geometry(&self.conv, &Shape::from(self.input_dims), weight_layout.shape())?;
        if grad_layout.shape().dims4()? != (batch, g.out_h, g.out_w, out_channels) {
            candle_core::bail!("conv-input-grad: gradient {:?} for input {:?}", grad_layout.shape(), self.input_dims);
        }
        let grad = contiguous_f32(self.name(), grad, grad_layout)?;
        let weight = Matrix::row_major(contiguous_f32(self.name(), weight, weight_layout)?, out_channels, g.row_len());
        let positions = g.positions();
        let output =
            map_images(&g, grad, positions * out_channels, g.image_len(), zeros, |grad, image, scratch, parallel| {
                let grad = Matrix::row_major(grad, positions, out_channels);
                if g.is_pointwise() {
                    matmul_into(image, grad, weight, false, parallel);
                } else {
                    matmul_into(scratch, grad, weight, false, parallel);
                    g.fold_into(scratch, image);
                }
            });
        Ok((CpuStorage::F32(output), Shape::from(self.input_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::layers::{leaky_relu, patches_portable};
    use candle_core::{Device, Var};

    fn ramp(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| ((((i + seed) * 37 % 101) as f32) - 50.3) / 50.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tolerance * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// The portable composition: candle's own ops, differentiated by candle.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, kernel: usize, stride: usize, slope: Option<f32>) -> Tensor {
        let (batch, h, wd, _) = x.dims4().unwrap();
        let rows = patches_portable(x, kernel, stride).unwrap().matmul(&w.t().unwrap()).unwrap();
        let y = rows.broadcast_add(b).unwrap();
        let y = y.reshape((batch, h.div_ceil(stride), wd.div_ceil(stride), w.dim(0).unwrap())).unwrap();
        match slope {
            Some(_) => leaky_relu(&y).unwrap(),
            None => y,
        }
    }

    /// Forward and all three gradients equal the composition's, for both strides, odd sizes, a 1×1 kernel,
    /// with and without the activation, with the images spread over threads and with one image.
    #[test]
    fn fused_convolution_matches_the_composition_and_its_gradients() {
        for (batch, size, cin, cout, kernel, stride, slope) in [
            (3, 7, 3, 5, 3, 1, Some(0.2)),
            (4, 7, 4, 6, 3, 2, Some(0.2)),
            (2, 8, 2, 3, 3, 2, None),
            (1, 6, 5, 4, 3, 1, Some(0.2)),
            (3, 5, 6, 7, 1, 1, None),
            (2, 6, 3, 2, 5, 1, Some(0.2)),
        ] {
            let what = format!("batch {batch} size {size} {cin}->{cout} k{kernel} s{stride} {slope:?}");
            let x = Var::from_tensor(&ramp(&[batch, size, size, cin], 1)).unwrap();
            let w = Var::from_tensor(&ramp(&[cout, kernel * kernel * cin], 2)).unwrap();
            let b = Var::from_tensor(&ramp(&[cout], 3)).unwrap();
            let fused = conv_forward(x.as_tensor(), w.as_tensor(), b.as_tensor(), kernel, stride, slope).unwrap();
            let reference = composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), kernel, stride, slope);
            assert_eq!(fused.dims(), reference.dims(), "{what}");
            assert_close(&values(&fused), &values(&reference), 1e-5, &format!("{what}: forward"));
            let weights = ramp(fused.dims(), 7);
            let gradients = |y: &Tensor| {
                let grads = (y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                [&x, &w, &b].map(|v| values(grads.get(v.as_tensor()).unwrap()))
            };
            let (ours, theirs) = (gradients(&fused), gradients(&reference));
            for (name, (a, b)) in ["input", "weight", "bias"].iter().zip(ours.iter().zip(&theirs)) {
                assert_close(a, b, 1e-4, &format!("{what}: {name} gradient"));
            }
        }
    }

    /// At a real layer's size (FCDD's first head layer: 152 → 128 channels, 3×3, on the 32×32 grid of a
    /// 256-pixel image, a step's 8 images) the fused op still equals the composition, gradients included.
    #[test]
    fn fused_convolution_matches_the_composition_at_a_real_layers_size() {
        let scaled = |shape: &[usize], seed: usize, scale: f64| (ramp(shape, seed) * scale).unwrap();
        let x = Var::from_tensor(&scaled(&[8, 32, 32, 152], 1, 1.0)).unwrap();
        let w = Var::from_tensor(&scaled(&[128, 9 * 152], 2, 0.03)).unwrap();
        let b = Var::from_tensor(&scaled(&[128], 3, 0.1)).unwrap();
        let fused = conv_forward(x.as_tensor(), w.as_tensor(), b.as_tensor(), 3, 1, Some(0.2)).unwrap();
        let reference = composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), 3, 1, Some(0.2));
        let weights = ramp(fused.dims(), 7);
        let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let (f, r) = (values(&fused), values(&reference));
        let scale = largest(&r);
        assert!(f.iter().zip(&r).all(|(a, b)| (a - b).abs() <= 1e-5 * scale), "forward");
        let gradients = |y: &Tensor| {
            let grads = (y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            [&x, &w, &b].map(|v| values(grads.get(v.as_tensor()).unwrap()))
        };
        let (ours, theirs) = (gradients(&fused), gradients(&reference));
        for (name, (a, b)) in ["input", "weight", "bias"].iter().zip(ours.iter().zip(&theirs)) {
            let scale = largest(b);
            let worst = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-4 * scale, "{name} gradient: largest difference {worst} of {scale}");
        }
    }

    /// The weight gradient agrees with central differences of the fused forward itself.
    #[test]
    fn fused_convolution_gradient_matches_finite_differences() {
        let x = ramp(&[2, 6, 6, 3], 1);
        let w = Var::from_tensor(&ramp(&[4, 27], 2)).unwrap();
        let b = ramp(&[4], 3);
        let weights = ramp(&[2, 3, 3, 4], 5);
        let loss =
            |w: &Tensor| (conv_forward(&x, w, &b, 3, 2, Some(0.2)).unwrap() * &weights).unwrap().sum_all().unwrap();
        let analytic = values(loss(w.as_tensor()).backward().unwrap().get(w.as_tensor()).unwrap());
        let base = values(w.as_tensor());
        for i in [0, 13, 50, 107] {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, (4, 27), &Device::Cpu).unwrap()).to_scalar::<f32>().unwrap()
            };
            let numeric = (at(1e-2) - at(-1e-2)) / 2e-2;
            assert!((analytic[i] - numeric).abs() < 1e-2 * (1.0 + numeric.abs()), "[{i}] {} vs {numeric}", analytic[i]);
        }
    }
}
