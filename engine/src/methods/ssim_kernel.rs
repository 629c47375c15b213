//! The mean SSIM of image pairs as one CPU op with its own backward: the training loss of the autoencoder and
//! DRAEM (issue 24). Composed from candle ops the SSIM is five window means and about fifteen element-wise ops,
//! each a graph node whose backward allocates and adds full-size gradients; here the forward is five separable
//! filters and one pass, and the backward recomputes the window statistics and runs three adjoint filters.
//!
//! Per valid position, with μ, S the window means of x, y and their products: s = A₁A₂ / (B₁B₂),
//! A₁ = 2μₓμᵧ + C₁, A₂ = 2(Sₓᵧ − μₓμᵧ) + C₂, B₁ = μₓ² + μᵧ² + C₁, B₂ = Sₓₓ − μₓ² + Sᵧᵧ − μᵧ² + C₂. Then
//! ∂s/∂μᵧ = s·(2μₓ/A₁ − 2μₓ/A₂ − 2μᵧ/B₁ + 2μᵧ/B₂), ∂s/∂Sᵧᵧ = −s/B₂, ∂s/∂Sₓᵧ = 2s/A₂, and with Wᵀ the
//! adjoint window: ∂L/∂y = Wᵀ[ḡ·∂s/∂μᵧ] + 2y·Wᵀ[ḡ·∂s/∂Sᵧᵧ] + x·Wᵀ[ḡ·∂s/∂Sₓᵧ]. s is symmetric in x and y, so
//! x's gradient is the same with the two swapped.

use crate::methods::fused::{contiguous_f32, filter_image};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Mean SSIM per image of `(B, H, W, C)` pairs, `(B)`, with the window `taps` (applied along both axes, valid
/// positions only) and stabilisers `c1`, `c2`. CPU, f32.
pub fn mean_ssim(x: &Tensor, y: &Tensor, taps: &[f64], c1: f32, c2: f32) -> candle_core::Result<Tensor> {
    let op = MeanSsim { taps: taps.iter().map(|&t| t as f32).collect(), c1, c2 };
    x.contiguous()?.apply_op2(&y.contiguous()?, op)
}

#[derive(Debug, Clone)]
struct MeanSsim {
    taps: Vec<f32>,
    c1: f32,
    c2: f32,
}

/// Shapes of one image: (height, width, channels) in, (valid height, valid width) out.
struct Geometry {
    image: (usize, usize, usize),
    valid: (usize, usize),
}

impl Geometry {
    fn of(op: &MeanSsim, layout: &Layout) -> candle_core::Result<(usize, Self)> {
        let (batch, height, width, channels) = layout.shape().dims4()?;
        let span = op.taps.len() - 1;
        if height <= span || width <= span {
            candle_core::bail!("ssim: a {height}×{width} image is smaller than the {}-tap window", span + 1);
        }
        Ok((batch, Self { image: (height, width, channels), valid: (height - span, width - span) }))
    }

    fn image_len(&self) -> usize {
        self.image.0 * self.image.1 * self.image.2
    }

    fn valid_len(&self) -> usize {
        self.valid.0 * self.valid.1 * self.image.2
    }
}

/// The five window means of one image pair, each `valid_len` long.
struct WindowStats {
    mean_x: Vec<f32>,
    mean_y: Vec<f32>,
    xx: Vec<f32>,
    yy: Vec<f32>,
    xy: Vec<f32>,
}

impl WindowStats {
    fn new(op: &MeanSsim, g: &Geometry, x: &[f32], y: &[f32]) -> Self {
        let window = |values: &[f32]| {
            let mut out = vec![0f32; g.valid_len()];
            filter_image(values, &mut out, &op.taps, g.image, g.valid, false);
            out
        };
        let product = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| a * b).collect::<Vec<f32>>();
        Self {
            mean_x: window(x),
            mean_y: window(y),
            xx: window(&product(x, x)),
            yy: window(&product(y, y)),
            xy: window(&product(x, y)),
        }
    }

    /// (A₁, A₂, B₁, B₂) at position `i`.
    fn terms(&self, op: &MeanSsim, i: usize) -> (f32, f32, f32, f32) {
        let (mx, my) = (self.mean_x[i], self.mean_y[i]);
        let a1 = 2.0 * mx * my + op.c1;
        let a2 = 2.0 * (self.xy[i] - mx * my) + op.c2;
        let b1 = mx * mx + my * my + op.c1;
        let b2 = (self.xx[i] - mx * mx) + (self.yy[i] - my * my) + op.c2;
        (a1, a2, b1, b2)
    }
}

impl CustomOp2 for MeanSsim {
    fn name(&self) -> &'static str {
        "mean-ssim"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if x_layout.shape() != y_layout.shape() {
            candle_core::bail!("ssim: shapes {:?} and {:?} differ", x_layout.shape(), y_layout.shape());
        }
        let (batch, g) = Geometry::of(self, x_layout)?;
        let (x, y) = (contiguous_f32(self.name(), x, x_layout)?, contiguous_f32(self.name(), y, y_layout)?);
        let means: Vec<f32> = x
            .par_chunks_exact(g.image_len())
            .zip(y.par_chunks_exact(g.image_len()))
            .map(|(x, y)| {
                let stats = WindowStats::new(self, &g, x, y);
                let total: f64 = (0..g.valid_len())
                    .map(|i| {
                        let (a1, a2, b1, b2) = stats.terms(self, i);
                        ((a1 * a2) / (b1 * b2)) as f64
                    })
                    .sum();
                (total / g.valid_len() as f64) as f32
            })
            .collect();
        Ok((CpuStorage::F32(means), Shape::from(batch)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _result: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Only what the graph needs: the autoencoder's input is data, not a parameter.
        let gradient = |first: &Tensor, second: &Tensor| -> candle_core::Result<Option<Tensor>> {
            if !second.track_op() {
                return Ok(None);
            }
            Ok(Some(first.apply_op3_no_bwd(second, &grad, &MeanSsimGrad { ssim: self.clone() })?))
        };
        Ok((gradient(y, x)?, gradient(x, y)?))
    }
}

/// The gradient of the per-image mean SSIM with respect to its second argument, given the output gradient `(B)`.
struct MeanSsimGrad {
    ssim: MeanSsim,
}

impl CustomOp3 for MeanSsimGrad {
    fn name(&self) -> &'static str {
        "mean-ssim-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = &self.ssim;
        let (batch, g) = Geometry::of(op, x_layout)?;
        let (x, y) = (contiguous_f32(self.name(), x, x_layout)?, contiguous_f32(self.name(), y, y_layout)?);
        let grad = contiguous_f32(self.name(), grad, grad_layout)?;
        if grad.len() != batch || y.len() != x.len() {
            candle_core::bail!("mean-ssim-grad: {} gradients for {batch} images", grad.len());
        }
        let mut output = vec![0f32; x.len()];
        output
            .par_chunks_exact_mut(g.image_len())
            .zip(x.par_chunks_exact(g.image_len()).zip(y.par_chunks_exact(g.image_len())))
            .zip(grad.par_iter())
            .for_each(|((out, (x, y)), &grad)| {
                let stats = WindowStats::new(op, &g, x, y);
                let scale = grad / g.valid_len() as f32;
                let n = g.valid_len();
                let (mut by_mean, mut by_square, mut by_product) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                for i in 0..n {
                    let (a1, a2, b1, b2) = stats.terms(op, i);
                    let s = scale * (a1 * a2) / (b1 * b2);
                    let (mx, my) = (stats.mean_x[i], stats.mean_y[i]);
                    by_mean[i] = s * (2.0 * mx / a1 - 2.0 * mx / a2 - 2.0 * my / b1 + 2.0 * my / b2);
                    by_square[i] = -s / b2;
                    by_product[i] = 2.0 * s / a2;
                }
                let adjoint = |values: &[f32]| {
                    let mut full = vec![0f32; g.image_len()];
                    filter_image(
                        values,
                        &mut full,
                        &op.taps,
                        (g.valid.0, g.valid.1, g.image.2),
                        (g.image.0, g.image.1),
                        true,
                    );
                    full
                };
                let (by_mean, by_square, by_product) = (adjoint(&by_mean), adjoint(&by_square), adjoint(&by_product));
                for (i, o) in out.iter_mut().enumerate() {
                    *o = by_mean[i] + 2.0 * y[i] * by_square[i] + x[i] * by_product[i];
                }
            });
        Ok((CpuStorage::F32(output), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::fused::separable_filter_portable;
    use candle_core::{Device, Var};

    const TAPS: [f64; 5] = [0.1, 0.2, 0.4, 0.2, 0.1];
    const C1: f32 = 1e-4;
    const C2: f32 = 9e-4;

    fn image(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| 0.5 + 0.4 * (((i + seed) * 37 % 101) as f32 / 101.0 - 0.5)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The same formula from candle ops, differentiated by candle.
    fn composed(x: &Tensor, y: &Tensor) -> Tensor {
        let w = |t: &Tensor| separable_filter_portable(t, &TAPS).unwrap();
        let (mx, my) = (w(x), w(y));
        let vx = (w(&x.sqr().unwrap()) - mx.sqr().unwrap()).unwrap();
        let vy = (w(&y.sqr().unwrap()) - my.sqr().unwrap()).unwrap();
        let cov = (w(&(x * y).unwrap()) - (&mx * &my).unwrap()).unwrap();
        let a1 = (((&mx * &my).unwrap() * 2.0).unwrap() + C1 as f64).unwrap();
        let a2 = ((cov * 2.0).unwrap() + C2 as f64).unwrap();
        let b1 = ((mx.sqr().unwrap() + my.sqr().unwrap()).unwrap() + C1 as f64).unwrap();
        let b2 = ((vx + vy).unwrap() + C2 as f64).unwrap();
        let s = (a1 * a2).unwrap().div(&(b1 * b2).unwrap()).unwrap();
        s.reshape((x.dim(0).unwrap(), ())).unwrap().mean(1).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn fused_mean_ssim_matches_the_composition_and_both_gradients() {
        let x = Var::from_tensor(&image(&[3, 9, 12, 2], 0)).unwrap();
        let y = Var::from_tensor(&image(&[3, 9, 12, 2], 17)).unwrap();
        let weights = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let fused = mean_ssim(x.as_tensor(), y.as_tensor(), &TAPS, C1, C2).unwrap();
        let reference = composed(x.as_tensor(), y.as_tensor());
        for (a, b) in values(&fused).iter().zip(values(&reference)) {
            assert!((a - b).abs() < 1e-5, "mean SSIM {a} vs {b}");
        }
        let gradients = |s: &Tensor| {
            let grads = (s * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            [&x, &y].map(|v| values(grads.get(v.as_tensor()).unwrap()))
        };
        let (ours, theirs) = (gradients(&fused), gradients(&reference));
        for (which, (a, b)) in ["x", "y"].iter().zip(ours.iter().zip(&theirs)) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= 1e-3 * scale, "{which}[{i}]: {p} vs {q} (largest {scale})");
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences_and_skips_data() {
        let x = image(&[1, 8, 8, 1], 3);
        let y = Var::from_tensor(&image(&[1, 8, 8, 1], 40)).unwrap();
        let loss = |y: &Tensor| mean_ssim(&x, y, &TAPS, C1, C2).unwrap().sum_all().unwrap();
        let grads = loss(y.as_tensor()).backward().unwrap();
        assert!(grads.get(&x).is_none(), "the data input gets no gradient");
        let analytic = values(grads.get(y.as_tensor()).unwrap());
        let base = values(y.as_tensor());
        for i in [0, 9, 27, 63] {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, (1, 8, 8, 1), &Device::Cpu).unwrap()).to_scalar::<f32>().unwrap()
            };
            let numeric = (at(1e-2) - at(-1e-2)) / 2e-2;
            assert!((analytic[i] - numeric).abs() < 2e-3, "[{i}] {} vs {numeric}", analytic[i]);
        }
    }
}
