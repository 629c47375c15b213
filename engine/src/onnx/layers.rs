//! The pieces every exported graph shares: the camera frame to the model's input (the same resize and scaling
//! Loupe applies), the backbone (its wiring is [`EfficientNetLite0::run_taps`], recorded), the anomaly map's
//! resize and blur, and the verdict.

use super::graph::{attr_float, attr_int, attr_ints, attr_string, Graph, Value};
use crate::backbone::depthwise::same_padding;
use crate::backbone::efficientnet_lite0::{
    Depthwise, EfficientNetLite0, LayerRunner, PointwiseConv, Stem, STEM_KERNEL, STEM_STRIDE, STRIDE16_BLOCK,
    STRIDE8_BLOCK,
};
use crate::backbone::Backbone;
use crate::dataset::resize;
use crate::maps::{gaussian_kernel, reflect_index};
use crate::methods::calibration::PositionCalibration;
use crate::methods::layers::{Conv, LEAKY_SLOPE};
use crate::methods::statistics::Standardise;
use crate::methods::RecordedScores;
use candle_core::{Device, Tensor};

fn values(tensor: &Tensor) -> candle_core::Result<Vec<f32>> {
    tensor.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()
}

fn shape4(batch: Option<usize>, channels: usize, height: usize, width: usize) -> Vec<Option<usize>> {
    vec![batch, Some(channels), Some(height), Some(width)]
}

/// `Conv` with a bias, explicit (possibly asymmetric) padding, then ReLU6 when asked.
#[allow(clippy::too_many_arguments)]
fn convolution(
    graph: &mut Graph,
    x: &Value,
    weight: &Tensor,
    bias: &Tensor,
    kernel: usize,
    stride: usize,
    groups: usize,
    relu6: bool,
) -> candle_core::Result<Value> {
    let (height, width) = (x.dim(2), x.dim(3));
    let (top, bottom) = same_padding(height, kernel, stride);
    let (left, right) = same_padding(width, kernel, stride);
    let out_channels = weight.dim(0)?;
    let in_per_group = weight.elem_count() / (out_channels * kernel * kernel);
    let w = graph.floats("weight", &[out_channels, in_per_group, kernel, kernel], &values(weight)?);
    let b = graph.floats("bias", &[out_channels], &values(bias)?);
    let out = graph.op(
        "Conv",
        &[x, &w, &b],
        vec![
            attr_ints("kernel_shape", &[kernel as i64, kernel as i64]),
            attr_ints("strides", &[stride as i64, stride as i64]),
            attr_ints("pads", &[top as i64, left as i64, bottom as i64, right as i64]),
            attr_int("group", groups as i64),
        ],
    );
    let out = if relu6 { clip(graph, &out, 0.0, 6.0) } else { out };
    Ok(out.with_shape(shape4(x.shape[0], out_channels, height.div_ceil(stride), width.div_ceil(stride))))
}

/// `Clip` to `[low, high]`.
pub fn clip(graph: &mut Graph, x: &Value, low: f32, high: f32) -> Value {
    let (low, high) = (graph.scalar("low", low), graph.scalar("high", high));
    graph.op("Clip", &[x, &low, &high], vec![]).with_shape(x.shape.clone())
}

/// Records the backbone's layers as ONNX nodes.
pub struct Recorder<'g> {
    pub graph: &'g mut Graph,
}

impl LayerRunner for Recorder<'_> {
    type Value = Value;

    fn stem(&mut self, stem: &Stem, x: &Value) -> candle_core::Result<Value> {
        convolution(self.graph, x, &stem.weight, &stem.bias, STEM_KERNEL, STEM_STRIDE, 1, true)
    }

    fn pointwise(&mut self, conv: &PointwiseConv, x: &Value, residual: Option<&Value>) -> candle_core::Result<Value> {
        let out = convolution(self.graph, x, &conv.weight, &conv.bias, 1, 1, 1, conv.relu6)?;
        Ok(match residual {
            Some(r) => self.graph.op("Add", &[&out, r], vec![]).with_shape(out.shape),
            None => out,
        })
    }

    fn depthwise(&mut self, conv: &Depthwise, x: &Value) -> candle_core::Result<Value> {
        let channels = x.dim(1);
        convolution(self.graph, x, &conv.weight, &conv.bias, conv.op.kernel, conv.op.stride, channels, conv.op.relu6)
    }
}

/// `a·x + b`, elementwise.
pub fn affine(graph: &mut Graph, x: &Value, scale: f32, shift: f32) -> Value {
    let scale = graph.scalar("scale", scale);
    let shift = graph.scalar("shift", shift);
    let scaled = graph.op("Mul", &[x, &scale], vec![]);
    graph.op("Add", &[&scaled, &shift], vec![]).with_shape(x.shape.clone())
}

/// The stride-8 and stride-16 backbone maps of images in [0, 1] `(N, 3, S, S)`: [`Backbone::features`] recorded.
pub fn backbone_features(graph: &mut Graph, backbone: &Backbone, images: &Value) -> anyhow::Result<(Value, Value)> {
    let mut maps = backbone_taps(graph, backbone, images, &[STRIDE8_BLOCK, STRIDE16_BLOCK])?.into_iter();
    let stride8 = maps.next().expect("two taps");
    let stride16 = maps.next().expect("two taps");
    Ok((stride8, stride16))
}

/// The outputs of the backbone's `blocks` (ascending) for images in [0, 1], as `forward_taps` gives them.
pub fn backbone_taps(
    graph: &mut Graph,
    backbone: &Backbone,
    images: &Value,
    blocks: &[usize],
) -> anyhow::Result<Vec<Value>> {
    let (scale, shift) = EfficientNetLite0::NORMALIZE;
    let normalised = affine(graph, images, scale, shift);
    Ok(backbone.net.run_taps(&mut Recorder { graph }, &normalised, blocks)?)
}

/// An image-level method's map: each image's score `(N,)` everywhere on a `size²` map `(N, 1, size, size)`.
pub fn constant_map(graph: &mut Graph, score: &Value, size: usize) -> Value {
    let shape = graph.ints("shape", &[4], &[-1, 1, 1, 1]);
    let column = graph.op("Reshape", &[score, &shape], vec![]);
    let target = graph.ints("shape", &[4], &[1, 1, size as i64, size as i64]);
    graph.op("Expand", &[&column, &target], vec![]).with_shape(shape4(score.shape[0], 1, size, size))
}

/// [`crate::methods::features::local_average`]: the 3×3 mean with zero padding counted in the divisor.
pub fn local_average(graph: &mut Graph, x: &Value) -> Value {
    graph
        .op(
            "AveragePool",
            &[x],
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_int("count_include_pad", 1),
            ],
        )
        .with_shape(x.shape.clone())
}

/// Patch features `(N, 152, S/8, S/8)` from the two backbone maps, as
/// [`crate::methods::features`] makes them: each map 3×3-averaged (zero padding counted) when `local`, the
/// stride-16 map upsampled to the stride-8 grid, then both concatenated.
pub fn patch_features(graph: &mut Graph, fine: &Value, coarse: &Value, local: bool) -> Value {
    let mut average = |x: &Value| if local { local_average(graph, x) } else { x.clone() };
    let fine = average(fine);
    let coarse = average(coarse);
    let (height, width) = (fine.dim(2), fine.dim(3));
    let coarse = resize_bilinear(graph, &coarse, height, width);
    let channels = fine.dim(1) + coarse.dim(1);
    graph.op("Concat", &[&fine, &coarse], vec![attr_int("axis", 1)]).with_shape(shape4(
        fine.shape[0],
        channels,
        height,
        width,
    ))
}

/// `(N, C, H, W)` → `(N, H·W, C)`: one row per position, as [`crate::methods::features::patches_as_rows`]
/// (which flattens the batch too).
pub fn positions_as_rows(graph: &mut Graph, x: &Value) -> Value {
    let (channels, positions) = (x.dim(1), x.dim(2) * x.dim(3));
    let shape = graph.ints("shape", &[3], &[0, channels as i64, positions as i64]);
    let flat = graph.op("Reshape", &[x, &shape], vec![]);
    graph.op("Transpose", &[&flat], vec![attr_ints("perm", &[0, 2, 1])]).with_shape(vec![
        x.shape[0],
        Some(positions),
        Some(channels),
    ])
}

/// Squared distances of `rows (…, R, C)` to a bank given as `bank_t (C, M)` and its rows' squared norms
/// `(M,)`: `max(0, −2·q·b + |q|² + |b|²)`, `(…, R, M)` — PatchCore's `squared_distances`, in its order.
pub fn squared_distances(graph: &mut Graph, rows: &Value, bank_t: &Value, bank_norms: &Value) -> Value {
    let last = graph.ints("axis", &[1], &[-1]);
    let row_norms = graph.op("ReduceSumSquare", &[rows, &last], vec![attr_int("keepdims", 1)]);
    let dots = graph.op("MatMul", &[rows, bank_t], vec![]);
    let minus_two = graph.scalar("minus_two", -2.0);
    let scaled = graph.op("Mul", &[&dots, &minus_two], vec![]);
    let with_rows = graph.op("Add", &[&scaled, &row_norms], vec![]);
    let with_bank = graph.op("Add", &[&with_rows, bank_norms], vec![]);
    graph.op("Relu", &[&with_bank], vec![])
}

/// [`crate::methods::reconstruction::stfpm::discrepancy`] of channels-last maps `(N, H, W, C)`: ½·|t̂ − ŝ|² per
/// position (1 − cosine), `(N, H, W)`.
pub fn discrepancy(graph: &mut Graph, teacher: &Value, student: &Value) -> Value {
    let t = unit_rows_under_root(graph, teacher, 1e-12);
    let s = unit_rows_under_root(graph, student, 1e-12);
    let difference = graph.op("Sub", &[&t, &s], vec![]);
    let last = graph.ints("axis", &[1], &[-1]);
    let squared = graph.op("ReduceSumSquare", &[&difference, &last], vec![attr_int("keepdims", 0)]);
    let half = graph.scalar("half", 0.5);
    graph.op("Mul", &[&squared, &half], vec![]).with_shape(teacher.shape[..3].to_vec())
}

/// candle-nn's `Linear` on the last axis: `x·Wᵀ + b`.
pub fn linear(graph: &mut Graph, x: &Value, layer: &candle_nn::Linear) -> candle_core::Result<Value> {
    let weight = layer.weight().to_device(&Device::Cpu)?;
    let (out, input) = weight.dims2()?;
    let weight_t = graph.floats("linear_weight_t", &[input, out], &weight.t()?.flatten_all()?.to_vec1::<f32>()?);
    let product = graph.op("MatMul", &[x, &weight_t], vec![]);
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = Some(out);
    }
    Ok(match layer.bias() {
        Some(bias) => {
            let bias = graph.floats("linear_bias", &[out], &values(bias)?);
            graph.op("Add", &[&product, &bias], vec![]).with_shape(shape)
        }
        None => product.with_shape(shape),
    })
}

/// [`Conv::forward`] on a channels-last map `(N, H, W, Cin)` → `(N, ⌈H/s⌉, ⌈W/s⌉, Cout)`: an ONNX `Conv` with
/// the im2col weights laid out as a kernel, padded as [`crate::methods::layers::patches`] pads (k/2 each side,
/// plus what a stride of 2 needs at the end).
pub fn conv_channels_last(graph: &mut Graph, x: &Value, conv: &Conv) -> candle_core::Result<Value> {
    conv_from_im2col(graph, x, &conv.linear, conv.kernel, conv.stride)
}

/// [`Conv::forward_leaky`]: [`conv_channels_last`] then [`leaky_relu`].
pub fn conv_leaky(graph: &mut Graph, x: &Value, conv: &Conv) -> candle_core::Result<Value> {
    let convolved = conv_channels_last(graph, x, conv)?;
    Ok(leaky_relu(graph, &convolved))
}

/// A convolution held as a `Linear` over im2col rows (columns tap-major `(dy, dx, c)`, zero padding k/2), on a
/// channels-last map — [`Conv`] and FastFlow's coupling sub-networks.
pub fn conv_from_im2col(
    graph: &mut Graph,
    x: &Value,
    linear: &candle_nn::Linear,
    k: usize,
    stride: usize,
) -> candle_core::Result<Value> {
    let out = linear.weight().dim(0)?;
    let (height, width, input) = (x.dim(1), x.dim(2), x.dim(3));
    let im2col = values(linear.weight())?;
    let weight: Vec<f32> = (0..out * input * k * k)
        .map(|index| {
            let (o, c, dy, dx) = (index / (input * k * k), index / (k * k) % input, index / k % k, index % k);
            im2col[o * k * k * input + (dy * k + dx) * input + c]
        })
        .collect();
    let weight = graph.floats("conv_weight", &[out, input, k, k], &weight);
    let bias = match linear.bias() {
        Some(bias) => graph.floats("conv_bias", &[out], &values(bias)?),
        None => graph.floats("conv_bias", &[out], &vec![0.0; out]),
    };
    let (out_h, out_w) = (height.div_ceil(stride), width.div_ceil(stride));
    let pad = (k / 2) as i64;
    let pads = [pad, pad, pad + (stride * out_h - height) as i64, pad + (stride * out_w - width) as i64];
    let planar = graph.op("Transpose", &[x], vec![attr_ints("perm", &[0, 3, 1, 2])]);
    let convolved = graph.op(
        "Conv",
        &[&planar, &weight, &bias],
        vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[stride as i64, stride as i64]),
            attr_ints("pads", &pads),
        ],
    );
    Ok(graph.op("Transpose", &[&convolved], vec![attr_ints("perm", &[0, 2, 3, 1])]).with_shape(vec![
        x.shape[0],
        Some(out_h),
        Some(out_w),
        Some(out),
    ]))
}

/// `Transpose` with `perm`, the shape permuted alike.
pub fn transpose(graph: &mut Graph, x: &Value, perm: &[usize]) -> Value {
    let shape = perm.iter().map(|&axis| x.shape[axis]).collect();
    let perm: Vec<i64> = perm.iter().map(|&axis| axis as i64).collect();
    graph.op("Transpose", &[x], vec![attr_ints("perm", &perm)]).with_shape(shape)
}

/// `(N, C, H, W)` → `(N, H, W, C)`.
pub fn channels_last(graph: &mut Graph, x: &Value) -> Value {
    transpose(graph, x, &[0, 2, 3, 1])
}

/// candle's `upsample_nearest2d` of the last two axes by a whole factor (source pixel ⌊out / factor⌋).
pub fn upsample_nearest(graph: &mut Graph, x: &Value, height: usize, width: usize) -> Value {
    let mode = vec![
        attr_string("mode", "nearest"),
        attr_string("coordinate_transformation_mode", "asymmetric"),
        attr_string("nearest_mode", "floor"),
    ];
    resize_last_two(graph, x, height, width, mode)
}

/// ONNX `Resize` of the last two axes to `height × width` with the given mode attributes.
fn resize_last_two(
    graph: &mut Graph,
    x: &Value,
    height: usize,
    width: usize,
    mut attributes: Vec<super::proto::AttributeProto>,
) -> Value {
    let sizes = graph.ints("sizes", &[2], &[height as i64, width as i64]);
    let rank = x.shape.len();
    let mut shape = x.shape.clone();
    shape[rank - 2] = Some(height);
    shape[rank - 1] = Some(width);
    attributes.push(attr_ints("axes", &[rank as i64 - 2, rank as i64 - 1]));
    graph.op("Resize", &[x, &Value::absent(), &Value::absent(), &sizes], attributes).with_shape(shape)
}

/// [`crate::methods::layers::upsample2x`] of a channels-last map `(N, H, W, C)`: each pixel repeated into a
/// 2×2 block by the same reshape and broadcast.
pub fn upsample2x_channels_last(graph: &mut Graph, x: &Value) -> Value {
    let (height, width, channels) = (x.dim(1) as i64, x.dim(2) as i64, x.dim(3) as i64);
    let split = graph.ints("shape", &[6], &[0, height, 1, width, 1, channels]);
    let split = graph.op("Reshape", &[x, &split], vec![]);
    let blocks = graph.ints("shape", &[6], &[1, 1, 2, 1, 2, 1]);
    let repeated = graph.op("Expand", &[&split, &blocks], vec![]);
    let joined = graph.ints("shape", &[4], &[0, 2 * height, 2 * width, channels]);
    graph.op("Reshape", &[&repeated, &joined], vec![]).with_shape(vec![
        x.shape[0],
        Some(2 * height as usize),
        Some(2 * width as usize),
        Some(channels as usize),
    ])
}

/// [`crate::methods::layers::pixel_shuffle`]: `(N, H, W, 4C)` → `(N, 2H, 2W, C)`.
pub fn pixel_shuffle(graph: &mut Graph, x: &Value) -> Value {
    let (height, width, channels) = (x.dim(1), x.dim(2), x.dim(3) / 4);
    let split = graph.ints("shape", &[6], &[0, height as i64, width as i64, 2, 2, channels as i64]);
    let split = graph.op("Reshape", &[x, &split], vec![]);
    let moved = graph.op("Transpose", &[&split], vec![attr_ints("perm", &[0, 1, 3, 2, 4, 5])]);
    let joined = graph.ints("shape", &[4], &[0, 2 * height as i64, 2 * width as i64, channels as i64]);
    graph.op("Reshape", &[&moved, &joined], vec![]).with_shape(vec![
        x.shape[0],
        Some(2 * height),
        Some(2 * width),
        Some(channels),
    ])
}

/// [`crate::methods::ssim::ssim_map`] of channels-last maps `(N, H, W, C)`, step for step: mirror-padded by
/// gathering, each windowed mean the same sum of shifted slices times the taps, width then height.
pub fn ssim_map(graph: &mut Graph, x: &Value, y: &Value) -> Value {
    use crate::methods::ssim::{gaussian_taps, reflect_pad_indices, RADIUS, STABILISERS};
    let mut pad = |v: &Value| {
        let mut padded = v.clone();
        for axis in [1usize, 2] {
            let indices: Vec<i64> = reflect_pad_indices(v.dim(axis)).into_iter().map(i64::from).collect();
            let mut shape = padded.shape.clone();
            shape[axis] = Some(indices.len());
            let indices = graph.ints("reflect", &[indices.len()], &indices);
            padded = graph.op("Gather", &[&padded, &indices], vec![attr_int("axis", axis as i64)]).with_shape(shape);
        }
        padded
    };
    let shape = x.shape.clone();
    let (x, y) = (pad(x), pad(y));
    // Each windowed mean keeps the padded length minus the window's reach: the image's own size.
    let (height, width) = (x.dim(1) - 2 * RADIUS, x.dim(2) - 2 * RADIUS);
    let taps: Vec<f32> = gaussian_taps().into_iter().map(|t| t as f32).collect();
    let window_mean = |graph: &mut Graph, v: &Value| {
        let mut out = v.clone();
        for (axis, length) in [(2i64, width), (1, height)] {
            let mut sum: Option<Value> = None;
            for (k, &tap) in taps.iter().enumerate() {
                let starts = graph.ints("start", &[1], &[k as i64]);
                let ends = graph.ints("end", &[1], &[k as i64 + length as i64]);
                let axes = graph.ints("axis", &[1], &[axis]);
                let view = graph.op("Slice", &[&out, &starts, &ends, &axes], vec![]);
                let tap = graph.scalar("tap", tap);
                let weighted = graph.op("Mul", &[&view, &tap], vec![]);
                sum = Some(match sum {
                    None => weighted,
                    Some(total) => graph.op("Add", &[&total, &weighted], vec![]),
                });
            }
            out = sum.expect("taps");
        }
        out
    };
    let (mean_x, mean_y) = (window_mean(graph, &x), window_mean(graph, &y));
    let xx = graph.op("Mul", &[&x, &x], vec![]);
    let yy = graph.op("Mul", &[&y, &y], vec![]);
    let xy = graph.op("Mul", &[&x, &y], vec![]);
    let (mean_xx, mean_yy, mean_xy) = (window_mean(graph, &xx), window_mean(graph, &yy), window_mean(graph, &xy));
    let mean_x2 = graph.op("Mul", &[&mean_x, &mean_x], vec![]);
    let mean_y2 = graph.op("Mul", &[&mean_y, &mean_y], vec![]);
    let mean_x_mean_y = graph.op("Mul", &[&mean_x, &mean_y], vec![]);
    let variance_x = graph.op("Sub", &[&mean_xx, &mean_x2], vec![]);
    let variance_y = graph.op("Sub", &[&mean_yy, &mean_y2], vec![]);
    let covariance = graph.op("Sub", &[&mean_xy, &mean_x_mean_y], vec![]);
    let (c1, c2) = STABILISERS;
    let luminance = affine(graph, &mean_x_mean_y, 2.0, c1);
    let structure = affine(graph, &covariance, 2.0, c2);
    let means = graph.op("Add", &[&mean_x2, &mean_y2], vec![]);
    let c1 = graph.scalar("c1", c1);
    let luminance_norm = graph.op("Add", &[&means, &c1], vec![]);
    let variances = graph.op("Add", &[&variance_x, &variance_y], vec![]);
    let c2 = graph.scalar("c2", c2);
    let structure_norm = graph.op("Add", &[&variances, &c2], vec![]);
    let numerator = graph.op("Mul", &[&luminance, &structure], vec![]);
    let denominator = graph.op("Mul", &[&luminance_norm, &structure_norm], vec![]);
    graph.op("Div", &[&numerator, &denominator], vec![]).with_shape(shape)
}

/// Rows scaled to unit length along the last axis: `x / √(Σx² + epsilon)`.
pub fn unit_rows_under_root(graph: &mut Graph, x: &Value, epsilon: f32) -> Value {
    let last = graph.ints("axis", &[1], &[-1]);
    let squared = graph.op("ReduceSumSquare", &[x, &last], vec![attr_int("keepdims", 1)]);
    let epsilon = graph.scalar("epsilon", epsilon);
    let padded = graph.op("Add", &[&squared, &epsilon], vec![]);
    let length = graph.op("Sqrt", &[&padded], vec![]);
    graph.op("Div", &[x, &length], vec![]).with_shape(x.shape.clone())
}

/// `len` entries of `axis` from `start`.
pub fn slice(graph: &mut Graph, x: &Value, axis: usize, start: usize, len: usize) -> Value {
    let starts = graph.ints("start", &[1], &[start as i64]);
    let ends = graph.ints("end", &[1], &[(start + len) as i64]);
    let axes = graph.ints("axis", &[1], &[axis as i64]);
    let mut shape = x.shape.clone();
    shape[axis] = Some(len);
    graph.op("Slice", &[x, &starts, &ends, &axes], vec![]).with_shape(shape)
}

/// candle's `flip` of one axis: a `Slice` from the last element backwards.
pub fn flip(graph: &mut Graph, x: &Value, axis: usize) -> Value {
    let starts = graph.ints("start", &[1], &[-1]);
    let ends = graph.ints("end", &[1], &[i64::MIN]);
    let axes = graph.ints("axis", &[1], &[axis as i64]);
    let steps = graph.ints("step", &[1], &[-1]);
    graph.op("Slice", &[x, &starts, &ends, &axes, &steps], vec![]).with_shape(x.shape.clone())
}

/// `Concat` along `axis` (shapes known).
pub fn concat(graph: &mut Graph, parts: &[&Value], axis: usize) -> Value {
    let mut shape = parts[0].shape.clone();
    shape[axis] = Some(parts.iter().map(|p| p.dim(axis)).sum());
    graph.op("Concat", parts, vec![attr_int("axis", axis as i64)]).with_shape(shape)
}

/// `factor × factor` average (or maximum) pooling of a planar map `(N, C, H, W)`, as candle's `avg_pool2d` /
/// `max_pool2d` with the stride equal to the window; `factor` 1 leaves it as it is.
pub fn pool(graph: &mut Graph, x: &Value, factor: usize, maximum: bool) -> Value {
    if factor == 1 {
        return x.clone();
    }
    let f = factor as i64;
    let op = if maximum { "MaxPool" } else { "AveragePool" };
    graph.op(op, &[x], vec![attr_ints("kernel_shape", &[f, f]), attr_ints("strides", &[f, f])]).with_shape(shape4(
        x.shape[0],
        x.dim(1),
        x.dim(2) / factor,
        x.dim(3) / factor,
    ))
}

/// The mean over the last axis, kept as an axis of 1.
pub fn mean_last_keep(graph: &mut Graph, x: &Value) -> Value {
    let last = graph.ints("axis", &[1], &[-1]);
    let mut shape = x.shape.clone();
    if let Some(l) = shape.last_mut() {
        *l = Some(1);
    }
    graph.op("ReduceMean", &[x, &last], vec![attr_int("keepdims", 1)]).with_shape(shape)
}

/// [`crate::methods::layers::leaky_relu`].
pub fn leaky_relu(graph: &mut Graph, x: &Value) -> Value {
    graph.op("LeakyRelu", &[x], vec![attr_float("alpha", LEAKY_SLOPE as f32)]).with_shape(x.shape.clone())
}

/// [`Standardise::apply`] on rows `(…, C)` (or, with `positions × C` values, on whole images' rows `(N, P, C)`).
pub fn standardise(graph: &mut Graph, rows: &Value, standardise: &Standardise) -> anyhow::Result<Value> {
    let (mean, inverse_std) = standardise.values()?;
    let channels = rows.dim(rows.shape.len() - 1);
    let shape = if mean.len() == channels { vec![channels] } else { vec![mean.len() / channels, channels] };
    let mean = graph.floats("standardise_mean", &shape, &mean);
    let inverse_std = graph.floats("standardise_inverse_std", &shape, &inverse_std);
    let centred = graph.op("Sub", &[rows, &mean], vec![]);
    Ok(graph.op("Mul", &[&centred, &inverse_std], vec![]).with_shape(rows.shape.clone()))
}

/// [`PositionCalibration::calibrate`] of `level` on cells `(N, P)`: `(x − mean) · (1/std)` per position.
pub fn calibrate(graph: &mut Graph, cells: &Value, calibration: &PositionCalibration, level: usize) -> Value {
    let (mean, inverse_std) = calibration.level(level);
    let mean = graph.floats("calibration_mean", &[mean.len()], mean);
    let inverse_std = graph.floats("calibration_inverse_std", &[inverse_std.len()], inverse_std);
    let centred = graph.op("Sub", &[cells, &mean], vec![]);
    graph.op("Mul", &[&centred, &inverse_std], vec![]).with_shape(cells.shape.clone())
}

/// [`crate::methods::outputs_from_cells`]: cells `(N, grid·grid)` upsampled to `size`, blurred; the score is
/// the map's maximum.
pub fn map_and_score(graph: &mut Graph, cells: &Value, grid: usize, size: usize, blur_sigma: f32) -> RecordedScores {
    map_and_top_score(graph, cells, grid, size, blur_sigma, 0.0)
}

/// [`map_and_score`] with the score the mean of the map's top `top_fraction`, as `ScoreMap::top_mean`.
pub fn map_and_top_score(
    graph: &mut Graph,
    cells: &Value,
    grid: usize,
    size: usize,
    blur_sigma: f32,
    top_fraction: f64,
) -> RecordedScores {
    let grid_map = rows_as_map(graph, cells, grid, grid);
    let map = resize_bilinear(graph, &grid_map, size, size);
    let map = blur(graph, &map, blur_sigma);
    let score = top_mean_score(graph, &map, size, top_fraction);
    RecordedScores { map, score }
}

/// `(N, 1, size, size)` → `(N)`: the mean of each map's `top_count(size², top_fraction)` largest values (the
/// maximum when that is one).
pub fn top_mean_score(graph: &mut Graph, map: &Value, size: usize, top_fraction: f64) -> Value {
    let count = crate::maps::top_count(size * size, top_fraction);
    if count == 1 {
        return max_score(graph, map);
    }
    let flat = graph.ints("shape", &[2], &[0, (size * size) as i64]);
    let rows = graph.op("Reshape", &[map, &flat], vec![]).with_shape(vec![map.shape[0], Some(size * size)]);
    let k = graph.ints("k", &[1], &[count as i64]);
    let largest = graph.op_outputs(
        "TopK",
        &[&rows, &k],
        vec![attr_int("axis", 1), attr_int("largest", 1), attr_int("sorted", 0)],
        2,
    );
    let axes = graph.ints("axes", &[1], &[1]);
    graph.op("ReduceMean", &[&largest[0], &axes], vec![attr_int("keepdims", 0)]).with_shape(vec![map.shape[0]])
}

/// Cell maps `(N, side²)` of several grids, each resized to `size²` (bilinear) and averaged: `(N, 1, size, size)`.
pub fn mean_of_resized(graph: &mut Graph, cells: &[(Value, usize)], size: usize) -> Value {
    let share = graph.scalar("share", 1.0 / cells.len() as f32);
    let mut sum: Option<Value> = None;
    for (grid_cells, side) in cells {
        let grid = rows_as_map(graph, grid_cells, *side, *side);
        let map = resize_bilinear(graph, &grid, size, size);
        let part = graph.op("Mul", &[&map, &share], vec![]).with_shape(map.shape.clone());
        sum = Some(match sum {
            None => part,
            Some(total) => graph.op("Add", &[&total, &part], vec![]).with_shape(part.shape),
        });
    }
    sum.expect("at least one grid")
}

/// `(N, H·W)` → `(N, 1, H, W)`.
pub fn rows_as_map(graph: &mut Graph, x: &Value, height: usize, width: usize) -> Value {
    let shape = graph.ints("shape", &[4], &[0, 1, height as i64, width as i64]);
    graph.op("Reshape", &[x, &shape], vec![]).with_shape(shape4(x.shape[0], 1, height, width))
}

/// `Resize` of the last two axes to `height × width`, bilinear with half-pixel centres and no antialiasing:
/// [`crate::maps::ScoreMap::resized`] and candle's `upsample_bilinear2d(.., false)`.
pub fn resize_bilinear(graph: &mut Graph, x: &Value, height: usize, width: usize) -> Value {
    let mode = vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")];
    resize_last_two(graph, x, height, width, mode)
}

/// The camera's frames `(N, H, W, 3)` uint8 to the model's input `(N, 3, S, S)` in [0, 1]: the resize of
/// [`crate::dataset::resize`], step for step — columns, then rows, each a `MatMul` with integer weights built from
/// the frame's own `H` and `W`, every sum an integer below 2²⁴, so the runtime's summation order cannot move a
/// byte.
pub fn camera_to_input(graph: &mut Graph, frames: &Value, size: usize) -> Value {
    let float = graph.op("Cast", &[frames], vec![attr_int("to", super::graph::FLOAT as i64)]);
    let planar = graph.op("Transpose", &[&float], vec![attr_ints("perm", &[0, 3, 1, 2])]);
    let shape = graph.op("Shape", &[frames], vec![]);
    let mut side_taps = |axis: i64, unit: f32| {
        let index = graph.ints("axis", &[], &[axis]);
        let length = graph.op("Gather", &[&shape, &index], vec![attr_int("axis", 0)]);
        triangle_taps(graph, &length, size, unit)
    };
    let (rows, columns) = (side_taps(1, resize::ROW_UNIT), side_taps(2, resize::COLUMN_UNIT));
    // (N, 3, H, W) · (W, S) → (N, 3, H, S), then (S, H) · that → (N, 3, S, S).
    let columns_t = graph.op("Transpose", &[&columns], vec![attr_ints("perm", &[1, 0])]);
    let narrowed = graph.op("MatMul", &[&planar, &columns_t], vec![]);
    let narrowed = shift_right(graph, &narrowed, resize::COLUMN_SHIFT);
    let resized = graph.op("MatMul", &[&rows, &narrowed], vec![]);
    let bytes = shift_right(graph, &resized, resize::ROW_SHIFT).with_shape(shape4(frames.shape[0], 3, size, size));
    let bytes = clip(graph, &bytes, 0.0, 255.0);
    let scale = graph.scalar("full_scale", 255.0);
    graph.op("Div", &[&bytes, &scale], vec![]).with_shape(bytes.shape)
}

/// `(x + 2^(shift−1)) >> shift` of non-negative integers held exactly in floats.
fn shift_right(graph: &mut Graph, x: &Value, shift: u32) -> Value {
    let half = graph.scalar("half_step", (1u32 << (shift - 1)) as f32);
    let step = graph.scalar("step", (1u32 << shift) as f32);
    let shifted = graph.op("Add", &[x, &half], vec![]);
    let scaled = graph.op("Div", &[&shifted, &step], vec![]);
    graph.op("Floor", &[&scaled], vec![])
}

/// The `(S, L)` integer weights of [`resize::side_taps`] for a side of `length` (an int64 scalar) pixels, as
/// floats: `num = 2·S·i + S − (2o + 1)·L` in int64, the raw weight `max(0, 4096 − ⌊2048·|num| / max(L, S) + ½⌋)`,
/// then `⌊raw · unit / Σ raw + ½⌋` per row.
fn triangle_taps(graph: &mut Graph, length: &Value, size: usize, unit: f32) -> Value {
    let float = |graph: &mut Graph, x: &Value| graph.op("Cast", &[x], vec![attr_int("to", super::graph::FLOAT as i64)]);
    let zero = graph.ints("zero", &[], &[0]);
    let one = graph.ints("one", &[], &[1]);
    let inputs = graph.op("Range", &[&zero, length, &one], vec![]);
    let twice_size = graph.ints("twice_size", &[], &[2 * size as i64]);
    let scaled_inputs = graph.op("Mul", &[&inputs, &twice_size], vec![]);
    let odd: Vec<i64> = (0..size as i64).map(|o| 2 * o + 1).collect();
    let odd = graph.ints("odd_outputs", &[size, 1], &odd);
    let size_value = graph.ints("size", &[], &[size as i64]);
    let centres = graph.op("Mul", &[&odd, length], vec![]);
    let centres = graph.op("Sub", &[&centres, &size_value], vec![]);
    let num = graph.op("Sub", &[&scaled_inputs, &centres], vec![]);
    let distance = graph.op("Abs", &[&num], vec![]);
    let distance = float(graph, &distance);
    let longer = graph.op("Max", &[length, &size_value], vec![]);
    let longer = float(graph, &longer);
    let ratio = graph.op("Div", &[&distance, &longer], vec![]);
    let half_unit = graph.scalar("half_raw_unit", resize::RAW_UNIT / 2.0);
    let scaled = graph.op("Mul", &[&ratio, &half_unit], vec![]);
    let half = graph.scalar("half", 0.5);
    let rounded = graph.op("Add", &[&scaled, &half], vec![]);
    let rounded = graph.op("Floor", &[&rounded], vec![]);
    let raw_unit = graph.scalar("raw_unit", resize::RAW_UNIT);
    let falling = graph.op("Sub", &[&raw_unit, &rounded], vec![]);
    let raw = graph.op("Relu", &[&falling], vec![]);
    let axis = graph.ints("axis", &[1], &[1]);
    let total = graph.op("ReduceSum", &[&raw, &axis], vec![attr_int("keepdims", 1)]);
    let unit = graph.scalar("unit", unit);
    let weighted = graph.op("Mul", &[&raw, &unit], vec![]);
    let normalised = graph.op("Div", &[&weighted, &total], vec![]);
    let normalised = graph.op("Add", &[&normalised, &half], vec![]);
    graph.op("Floor", &[&normalised], vec![])
}

/// [`crate::maps::ScoreMap::blurred`] of maps `(N, 1, H, W)`: the Gaussian's horizontal pass, then its vertical
/// one, each as a product with the `(n, n)` matrix that folds the kernel over reflected borders — so a kernel
/// wider than the map folds as often as Loupe's does (ONNX `Pad` reflects once).
pub fn blur(graph: &mut Graph, map: &Value, sigma: f32) -> Value {
    if sigma <= 0.0 {
        return map.clone();
    }
    let kernel = gaussian_kernel(sigma);
    let (height, width) = (map.dim(2), map.dim(3));
    let horizontal_t = transposed(&blur_matrix(width, &kernel), width);
    let horizontal_t = graph.floats("blur_rows_t", &[width, width], &horizontal_t);
    let vertical = graph.floats("blur_columns", &[height, height], &blur_matrix(height, &kernel));
    let rows = graph.op("MatMul", &[map, &horizontal_t], vec![]);
    graph.op("MatMul", &[&vertical, &rows], vec![]).with_shape(map.shape.clone())
}

/// `(n, n)`: output `i` = Σ_k kernel[k] · input[reflect(i + k − radius)].
fn blur_matrix(n: usize, kernel: &[f32]) -> Vec<f32> {
    let radius = (kernel.len() / 2) as isize;
    let mut matrix = vec![0f32; n * n];
    for i in 0..n {
        for (k, &weight) in kernel.iter().enumerate() {
            let source = reflect_index(i as isize + k as isize - radius, n);
            matrix[i * n + source] += weight;
        }
    }
    matrix
}

fn transposed(matrix: &[f32], n: usize) -> Vec<f32> {
    (0..n * n).map(|index| matrix[(index % n) * n + index / n]).collect()
}

/// [`crate::maps::ScoreMap::receptive_upsample`] of cells `(N, g·g)`: each cell an impulse at its centre in a
/// `(g·stride)²` map (a `ConvTranspose` with a one-hot kernel), blurred, divided by the blur of the impulses
/// alone (a constant of the export).
pub fn receptive_upsample(graph: &mut Graph, cells: &Value, grid: usize, stride: usize, sigma: f32) -> Value {
    let grid_map = rows_as_map(graph, cells, grid, grid);
    let mut one_hot = vec![0f32; stride * stride];
    one_hot[(stride / 2) * stride + stride / 2] = 1.0;
    let kernel = graph.floats("impulse", &[1, 1, stride, stride], &one_hot);
    let size = grid * stride;
    let impulses = graph
        .op("ConvTranspose", &[&grid_map, &kernel], vec![attr_ints("strides", &[stride as i64, stride as i64])])
        .with_shape(shape4(cells.shape[0], 1, size, size));
    let spread = blur(graph, &impulses, sigma);
    let weights = crate::maps::ScoreMap::receptive_upsample_weights(grid, grid, stride, sigma);
    let weight = graph.floats("receptive_weight", &[size, size], &weights);
    graph.op("Div", &[&spread, &weight], vec![]).with_shape(spread.shape)
}

/// The maximum of each map `(N, 1, H, W)` → `(N,)`.
pub fn max_score(graph: &mut Graph, map: &Value) -> Value {
    let axes = graph.ints("axes", &[3], &[1, 2, 3]);
    graph.op("ReduceMax", &[map, &axes], vec![attr_int("keepdims", 0)]).with_shape(vec![map.shape[0]])
}

/// 0 pass, 1 review, 2 reject: reject at `score ≥ decision`, review at `review ≤ score < decision` (Loupe's rule;
/// a review threshold at or above the decision makes the band empty).
pub fn verdict(graph: &mut Graph, score: &Value, decision: &Value, review: &Value) -> Value {
    let rejected = graph.op("GreaterOrEqual", &[score, decision], vec![]);
    let in_band = graph.op("GreaterOrEqual", &[score, review], vec![]);
    let reviewed = graph.op("Or", &[&rejected, &in_band], vec![]);
    let to_int = || attr_int("to", super::graph::INT64 as i64);
    let rejected = graph.op("Cast", &[&rejected], vec![to_int()]);
    let reviewed = graph.op("Cast", &[&reviewed], vec![to_int()]);
    graph.op("Add", &[&rejected, &reviewed], vec![]).with_shape(score.shape.clone())
}
