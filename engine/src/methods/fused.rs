//! CPU kernels with their own backward for the hot sequences of a training step (issue 24).
//!
//! Composed from candle's element-wise ops these sequences cost many full-size passes, each into freshly
//! allocated (and page-faulted) memory: leaky ReLU as `maximum(x, 0.2·x)` makes about ten in its backward, and
//! candle's backprop adds a `zeros_like` and an add for every gradient it accumulates. Each op here does its
//! forward in one pass and its backward in one or two, split across rayon's threads. Every op has a portable
//! composition (the same maths from candle ops) that GPUs run and that the tests compare against, gradients
//! included.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Values per rayon task: large enough that a task outweighs its scheduling, small enough to share work.
const CHUNK: usize = 1 << 14;

pub(crate) fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: only f32 is supported") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// A matrix in a slice, row-major or read transposed, for [`matmul_into`].
#[derive(Clone, Copy)]
pub(crate) struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    /// `data` holds `rows × cols` values row after row.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The same values read as the transposed matrix (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `out (m×n, row-major) = a (m×k) · b (k×n)`, added to what `out` holds when `accumulate`. `parallel` splits
/// the product across rayon's threads (for one large product; callers running many in parallel pass false).
pub(crate) fn matmul_into(out: &mut [f32], a: Matrix, b: Matrix, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && out.len() == m * n && a.fits() && b.fits(), "matmul_into: shapes do not agree");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let parallelism = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the assertion above keeps every index the strides reach inside its slice, and `out` is m×n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// True where the fused CPU kernels apply.
pub(crate) fn fused_on(x: &Tensor) -> bool {
    crate::device::cpu_kernels_on(x.device()) && x.dtype() == candle_core::DType::F32
}

/// `leaky_relu(rows + bias)` for `rows: (N, C)`, `bias: (C)`, with `slope` below zero.
pub fn bias_leaky_relu(rows: &Tensor, bias: &Tensor, slope: f32) -> candle_core::Result<Tensor> {
    if fused_on(rows) {
        return rows.contiguous()?.apply_op2(&bias.contiguous()?, BiasLeakyRelu { slope });
    }
    let shifted = rows.broadcast_add(bias)?;
    shifted.maximum(&(&shifted * slope as f64)?)
}

#[derive(Debug, Clone, Copy)]
struct BiasLeakyRelu {
    slope: f32,
}

impl CustomOp2 for BiasLeakyRelu {
    fn name(&self) -> &'static str {
        "bias-leaky-relu"
    }

    fn cpu_fwd(
        &self,
        rows: &CpuStorage,
        rows_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = contiguous_f32(self.name(), rows, rows_layout)?;
        let bias = contiguous_f32(self.name(), bias, bias_layout)?;
        let channels = bias.len();
        if channels == 0 || rows_layout.shape().dims().last() != Some(&channels) {
            candle_core::bail!("bias-leaky-relu: bias of {channels} for rows {:?}", rows_layout.shape());
        }
        let slope = self.slope;
        let mut output = vec![0f32; rows.len()];
        let per_task = (CHUNK / channels).max(1) * channels;
        output.par_chunks_mut(per_task).zip(rows.par_chunks(per_task)).for_each(|(out, rows)| {
            for (out, rows) in out.chunks_exact_mut(channels).zip(rows.chunks_exact(channels)) {
                for ((o, &r), &b) in out.iter_mut().zip(rows).zip(bias) {
                    let v = r + b;
                    *o = if v > 0.0 { v } else { v * slope };
                }
            }
        });
        Ok((CpuStorage::F32(output), rows_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _rows: &Tensor,
        bias: &Tensor,
        result: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_rows = result.apply_op2_no_bwd(&grad.contiguous()?, &LeakyReluGrad { slope: self.slope })?;
        let grad_bias = column_sums(&grad_rows.reshape(((), bias.elem_count()))?)?;
        Ok((Some(grad_rows), Some(grad_bias)))
    }
}

/// `(N, C)` → `(C)`: the sum of the rows (a bias's gradient). candle's `sum(0)` over a leading axis visits every
/// value with a division per axis; this adds whole rows, rows split across threads.
pub fn column_sums(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused_on(x) {
        return x.contiguous()?.apply_op1_no_bwd(&ColumnSums);
    }
    x.sum(0)
}

struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = contiguous_f32(self.name(), storage, layout)?;
        let (_, channels) = layout.shape().dims2()?;
        let add_rows = |mut total: Vec<f32>, rows: &[f32]| {
            for row in rows.chunks_exact(channels.max(1)) {
                total.iter_mut().zip(row).for_each(|(t, v)| *t += v);
            }
            total
        };
        let per_task = (CHUNK / channels.max(1)).max(1) * channels.max(1);
        let sums = values
            .par_chunks(per_task)
            .fold(|| vec![0f32; channels], add_rows)
            .reduce(|| vec![0f32; channels], |a, b| add_rows(a, &b));
        Ok((CpuStorage::F32(sums), Shape::from(channels)))
    }
}

/// `f(a[i], b[i])` for every i, in chunks across threads, written once into fresh memory (no zeroing pass). The
/// chunk loop is branch-free for a select-style `f`, so it vectorises.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let len = a.len().min(b.len());
    let mut output = Vec::with_capacity(len);
    output.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(out, (a, b))| {
            // Indexed over equal lengths so that the compiler drops the bounds checks and vectorises.
            let (a, b) = (&a[..out.len()], &b[..out.len()]);
            for i in 0..out.len() {
                out[i].write(f(a[i], b[i]));
            }
        });
    // SAFETY: the chunks above cover the first `len` slots and each slot was written.
    unsafe { output.set_len(len) };
    output
}

/// The gradient through a leaky ReLU from its output: `grad` where the output is positive, `slope·grad` elsewhere.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeakyReluGrad {
    pub slope: f32,
}

impl CustomOp2 for LeakyReluGrad {
    fn name(&self) -> &'static str {
        "leaky-relu-grad"
    }

    fn cpu_fwd(
        &self,
        result: &CpuStorage,
        result_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let result = contiguous_f32(self.name(), result, result_layout)?;
        let grad = contiguous_f32(self.name(), grad, grad_layout)?;
        if result.len() != grad.len() {
            candle_core::bail!("leaky-relu-grad: {} outputs, {} gradients", result.len(), grad.len());
        }
        let slope = self.slope;
        // A factor chosen per value (a select, vectorised) rather than two branches: signs are random.
        let output = zip_map(result, grad, move |y, g| g * if y > 0.0 { 1.0 } else { slope });
        Ok((CpuStorage::F32(output), grad_layout.shape().clone()))
    }
}

/// Nearest-neighbour ×2 upsampling of `(B, H, W, C)`: each pixel becomes a 2×2 block. Backward: the sum of each
/// block (candle's broadcast backward sums over two strided axes value by value).
pub fn upsample2x(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !fused_on(x) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Upsample2x)?))
}

struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-2x"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let (batch, height, width, channels) = layout.shape().dims4()?;
        let row = width * channels;
        let mut output = vec![0f32; input.len() * 4];
        output.par_chunks_exact_mut(4 * row).zip(input.par_chunks_exact(row.max(1))).for_each(|(out, row_in)| {
            let (first, second) = out.split_at_mut(2 * row);
            for (pair, pixel) in first.chunks_exact_mut(2 * channels).zip(row_in.chunks_exact(channels)) {
                pair[..channels].copy_from_slice(pixel);
                pair[channels..].copy_from_slice(pixel);
            }
            second.copy_from_slice(first);
        });
        Ok((CpuStorage::F32(output), Shape::from((batch, 2 * height, 2 * width, channels))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&BlockSums2x)?))
    }
}

/// `(B, 2H, 2W, C)` → `(B, H, W, C)`: the sum of each 2×2 block, the adjoint of [`Upsample2x`].
struct BlockSums2x;

impl CustomOp1 for BlockSums2x {
    fn name(&self) -> &'static str {
        "block-sums-2x"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let (batch, height, width, channels) = layout.shape().dims4()?;
        if height % 2 != 0 || width % 2 != 0 {
            candle_core::bail!("block-sums-2x: odd size {height}×{width}");
        }
        let row = width / 2 * channels;
        let mut output = vec![0f32; input.len() / 4];
        output.par_chunks_exact_mut(row.max(1)).zip(input.par_chunks_exact(4 * row.max(1))).for_each(|(out, rows)| {
            let (first, second) = rows.split_at(2 * row);
            for (o, (a, b)) in out
                .chunks_exact_mut(channels)
                .zip(first.chunks_exact(2 * channels).zip(second.chunks_exact(2 * channels)))
            {
                for c in 0..channels {
                    o[c] = a[c] + a[channels + c] + b[c] + b[channels + c];
                }
            }
        });
        Ok((CpuStorage::F32(output), Shape::from((batch, height / 2, width / 2, channels))))
    }
}

/// A separable filter along the two spatial axes of a channels-last map `(B, H, W, C)`, valid positions only:
/// `(B, H − k + 1, W − k + 1, C)` with `k = taps.len()`. Its backward is the adjoint, the "full" filter with the
/// taps reversed. The SSIM's Gaussian window means run through this.
pub fn separable_filter_valid(x: &Tensor, taps: &[f64]) -> candle_core::Result<Tensor> {
    if fused_on(x) {
        let taps = taps.iter().map(|&t| t as f32).collect();
        return x.contiguous()?.apply_op1(SeparableFilter { taps, adjoint: false, input: None });
    }
    separable_filter_portable(x, taps)
}

/// [`separable_filter_valid`] from candle's narrow, multiply and add: GPUs run it; the tests compare with it.
pub fn separable_filter_portable(x: &Tensor, taps: &[f64]) -> candle_core::Result<Tensor> {
    let along = |x: &Tensor, dim: usize| -> candle_core::Result<Tensor> {
        let out = x.dim(dim)? + 1 - taps.len();
        let mut sum = (x.narrow(dim, 0, out)? * taps[0])?;
        for (k, &t) in taps.iter().enumerate().skip(1) {
            sum = (sum + (x.narrow(dim, k, out)? * t)?)?;
        }
        Ok(sum)
    };
    along(&along(x, 2)?, 1)
}

/// The forward (valid correlation) or, with `adjoint`, its transpose back to `input`'s `(H, W)`.
#[derive(Debug, Clone)]
struct SeparableFilter {
    taps: Vec<f32>,
    adjoint: bool,
    /// For the adjoint: the forward's input height and width.
    input: Option<(usize, usize)>,
}

/// One pass along an axis whose consecutive positions are `line` values apart. Valid: `lines_out` positions,
/// `out[i] = Σ_k t[k]·src[i + k]`; adjoint: `out[j] = Σ_k t[k]·src[j − k]` over `lines_in` source positions. In
/// channels-last maps both are one long multiply-add per tap (a shift by `k` positions is a shift by `k·line`).
fn filter_axis(
    source: &[f32],
    target: &mut [f32],
    taps: &[f32],
    lines_out: usize,
    lines_in: usize,
    line: usize,
    adjoint: bool,
) {
    let target = &mut target[..lines_out * line];
    target.fill(0.0);
    for (k, &t) in taps.iter().enumerate() {
        let (to, from) = if adjoint {
            (&mut target[k * line..(k + lines_in) * line], &source[..lines_in * line])
        } else {
            (&mut *target, &source[k * line..(k + lines_out) * line])
        };
        to.iter_mut().zip(from).for_each(|(o, &v)| *o += t * v);
    }
}

/// One channels-last image `(height, width, channels)` filtered along W (each row), then along H (whole rows),
/// into `out: (out_h, out_w, channels)`: valid positions, or with `adjoint` the transpose back to the full size.
pub(crate) fn filter_image(
    image: &[f32],
    out: &mut [f32],
    taps: &[f32],
    (height, width, channels): (usize, usize, usize),
    (out_h, out_w): (usize, usize),
    adjoint: bool,
) {
    let mut along_w = vec![0f32; height * out_w * channels];
    for (row_out, row_in) in along_w.chunks_exact_mut(out_w * channels).zip(image.chunks_exact(width * channels)) {
        filter_axis(row_in, row_out, taps, out_w, width, channels, adjoint);
    }
    filter_axis(&along_w, out, taps, out_h, height, out_w * channels, adjoint);
}

impl CustomOp1 for SeparableFilter {
    fn name(&self) -> &'static str {
        "separable-filter"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let (batch, height, width, channels) = layout.shape().dims4()?;
        let span = self.taps.len() - 1;
        let (out_h, out_w) = match (self.adjoint, self.input) {
            (false, _) if height > span && width > span => (height - span, width - span),
            (true, Some((h, w))) if h == height + span && w == width + span => (h, w),
            _ => candle_core::bail!("separable-filter: a {height}×{width} map does not fit {} taps", span + 1),
        };
        let mut output = vec![0f32; batch * out_h * out_w * channels];
        output
            .par_chunks_exact_mut(out_h * out_w * channels)
            .zip(input.par_chunks_exact(height * width * channels))
            .for_each(|(out, image)| {
                filter_image(image, out, &self.taps, (height, width, channels), (out_h, out_w), self.adjoint)
            });
        Ok((CpuStorage::F32(output), Shape::from((batch, out_h, out_w, channels))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.adjoint {
            candle_core::bail!("separable-filter: the adjoint has no backward");
        }
        let (_, height, width, _) = arg.dims4()?;
        let adjoint = SeparableFilter { taps: self.taps.clone(), adjoint: true, input: Some((height, width)) };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&adjoint)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn ramp(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 25.0).collect();
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

    /// The gradient of Σ w·f(x) with respect to each input, by central differences, for a few positions.
    fn finite_difference(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, weights: &Tensor, at: &[usize]) -> Vec<f32> {
        let base = values(x);
        let eps = 1e-2f32;
        at.iter()
            .map(|&i| {
                let shifted = |delta: f32| {
                    let mut v = base.clone();
                    v[i] += delta;
                    let t = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
                    (f(&t) * weights).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
                };
                (shifted(eps) - shifted(-eps)) / (2.0 * eps)
            })
            .collect()
    }

    #[test]
    fn bias_leaky_relu_matches_the_composition_and_finite_differences() {
        let rows = Var::from_tensor(&ramp(&[37, 5], 0)).unwrap();
        // Offset so that no sum is exactly 0, where candle's `maximum` splits the gradient between its arguments.
        let bias = Var::from_tensor(&(ramp(&[5], 3) + 0.01).unwrap()).unwrap();
        let weights = ramp(&[37, 5], 11);
        let fused = bias_leaky_relu(rows.as_tensor(), bias.as_tensor(), 0.2).unwrap();
        let shifted = rows.as_tensor().broadcast_add(bias.as_tensor()).unwrap();
        let composed = shifted.maximum(&(&shifted * 0.2).unwrap()).unwrap();
        assert_close(&values(&fused), &values(&composed), 1e-6, "forward");
        let gradients = |y: &Tensor| {
            let g = (y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            (values(g.get(rows.as_tensor()).unwrap()), values(g.get(bias.as_tensor()).unwrap()))
        };
        let (fused_rows, fused_bias) = gradients(&fused);
        let (composed_rows, composed_bias) = gradients(&composed);
        assert_close(&fused_rows, &composed_rows, 1e-6, "rows gradient");
        assert_close(&fused_bias, &composed_bias, 1e-5, "bias gradient");
        let at = [0, 7, 50, 184];
        let numeric =
            finite_difference(&|r| bias_leaky_relu(r, bias.as_tensor(), 0.2).unwrap(), rows.as_tensor(), &weights, &at);
        let analytic: Vec<f32> = at.iter().map(|&i| fused_rows[i]).collect();
        assert_close(&analytic, &numeric, 1e-2, "finite differences");
    }

    #[test]
    fn upsampling_matches_the_broadcast_and_its_gradient() {
        let x = Var::from_tensor(&ramp(&[2, 3, 5, 4], 1)).unwrap();
        let (b, h, w, c) = x.dims4().unwrap();
        let fused = upsample2x(x.as_tensor()).unwrap().unwrap();
        let composed = x
            .reshape((b, h, 1, w, 1, c))
            .unwrap()
            .broadcast_as((b, h, 2, w, 2, c))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, 2 * h, 2 * w, c))
            .unwrap();
        assert_eq!(values(&fused), values(&composed));
        let weights = ramp(fused.dims(), 9);
        let gradient = |y: &Tensor| {
            values((y * &weights).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap())
        };
        assert_close(&gradient(&fused), &gradient(&composed), 1e-6, "gradient");
    }

    #[test]
    fn column_sums_add_the_rows() {
        let x = ramp(&[1000, 7], 2);
        assert_close(&values(&column_sums(&x).unwrap()), &values(&x.sum(0).unwrap()), 1e-5, "sums");
    }

    #[test]
    fn separable_filter_matches_the_composition_and_finite_differences() {
        let taps = [0.1, 0.25, 0.3, 0.2, 0.15];
        for dims in [[2, 9, 11, 3], [1, 5, 5, 1], [3, 12, 7, 4]] {
            let x = Var::from_tensor(&ramp(&dims, 1)).unwrap();
            let fused = separable_filter_valid(x.as_tensor(), &taps).unwrap();
            let composed = separable_filter_portable(x.as_tensor(), &taps).unwrap();
            assert_eq!(fused.dims(), composed.dims());
            assert_close(&values(&fused), &values(&composed), 1e-5, "forward");
            let weights = ramp(fused.dims(), 5);
            let gradient = |y: &Tensor| {
                values((y * &weights).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap())
            };
            let (g_fused, g_composed) = (gradient(&fused), gradient(&composed));
            assert_close(&g_fused, &g_composed, 1e-5, "gradient");
            let at = [0, 4, x.elem_count() / 2, x.elem_count() - 1];
            let numeric =
                finite_difference(&|t| separable_filter_valid(t, &taps).unwrap(), x.as_tensor(), &weights, &at);
            let analytic: Vec<f32> = at.iter().map(|&i| g_fused[i]).collect();
            assert_close(&analytic, &numeric, 1e-2, "finite differences");
        }
    }
}
