//! The Lite0 port against reference numbers computed once in PyTorch (shared/reference/efficientnet-lite0.json):
//! same weights, input `x[b][c][h][w] = 1.5·sin(0.05h + 0.07w + 1.3c + 0.9b)`. The numbers are copied as
//! printed by PyTorch (float32 values written with all their digits).
#![allow(clippy::excessive_precision)]

use candle_core::{Device, Tensor};
use loupe_engine::backbone::{weights, Backbone};

fn formula_input(size: usize) -> Tensor {
    let mut data = Vec::with_capacity(2 * 3 * size * size);
    for b in 0..2 {
        for c in 0..3 {
            for h in 0..size {
                for w in 0..size {
                    data.push(1.5 * (0.05 * h as f32 + 0.07 * w as f32 + 1.3 * c as f32 + 0.9 * b as f32).sin());
                }
            }
        }
    }
    Tensor::from_vec(data, (2, 3, size, size), &Device::Cpu).unwrap()
}

fn load_full() -> Backbone {
    let path = weights::default_weights_path();
    Backbone::load_truncated(&path, &Device::Cpu, 15, true).unwrap_or_else(|e| panic!("{e:#}"))
}

fn close(actual: f32, expected: f32, what: &str) {
    let tolerance = 2e-4 * expected.abs().max(1.0);
    assert!((actual - expected).abs() <= tolerance, "{what}: got {actual}, reference {expected}");
}

struct Case {
    size: usize,
    logits: [[f32; 8]; 2],
    top5: [[usize; 5]; 2],
    block4: Stats,
    block10: Stats,
}

struct Stats {
    shape: [usize; 4],
    mean: f32,
    std: f32,
    abs_max: f32,
    samples: [([usize; 4], f32); 4],
}

fn check_stats(tensor: &Tensor, stats: &Stats, what: &str) {
    assert_eq!(tensor.dims(), &stats.shape, "{what} shape");
    let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let abs_max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    close(mean as f32, stats.mean, &format!("{what} mean"));
    close(var.sqrt() as f32, stats.std, &format!("{what} std"));
    close(abs_max, stats.abs_max, &format!("{what} abs max"));
    let [_, c, h, w] = stats.shape;
    for (index, expected) in stats.samples {
        let flat = ((index[0] * c + index[1]) * h + index[2]) * w + index[3];
        close(values[flat], expected, &format!("{what}{index:?}"));
    }
}

fn check_case(backbone: &Backbone, case: &Case) {
    let input = formula_input(case.size);
    let logits: Vec<Vec<f32>> = backbone.net.logits(&input).unwrap().to_vec2().unwrap();
    for (b, (row, expected)) in logits.iter().zip(&case.logits).enumerate() {
        for (i, (&actual, &reference)) in row.iter().zip(expected).enumerate() {
            close(actual, reference, &format!("{} logit[{b}][{i}]", case.size));
        }
        let mut order: Vec<usize> = (0..1000).collect();
        order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
        assert_eq!(&order[..5], &case.top5[b], "{} top-5 of item {b}", case.size);
    }
    let maps = backbone.net.features(&input).unwrap();
    check_stats(&maps.stride8, &case.block4, &format!("{} block4", case.size));
    check_stats(&maps.stride16, &case.block10, &format!("{} block10", case.size));
}

#[test]
fn lite0_matches_pytorch_reference_at_224_and_256() {
    let backbone = load_full();
    check_case(
        &backbone,
        &Case {
            size: 224,
            logits: [
                [
                    -0.809_177_9,
                    0.642_439_8,
                    -1.021_999_1,
                    0.081_101_42,
                    -1.586_473_3,
                    0.452_461_1,
                    -1.625_206_2,
                    -0.569_195_6,
                ],
                [
                    -0.722_842_6,
                    0.723_428_7,
                    -0.910_843_8,
                    0.159_505_19,
                    -1.509_495_7,
                    0.402_682_7,
                    -1.655_965_3,
                    -0.423_822_6,
                ],
            ],
            top5: [[418, 767, 902, 696, 800], [418, 767, 696, 800, 902]],
            block4: Stats {
                shape: [2, 40, 28, 28],
                mean: 0.458_000_4,
                std: 11.512_245,
                abs_max: 45.606,
                samples: [
                    ([0, 0, 0, 0], -23.908_65),
                    ([0, 5, 3, 7], 12.446_362),
                    ([1, 39, 27, 27], -12.442_741),
                    ([1, 17, 10, 2], 10.513_817),
                ],
            },
            block10: Stats {
                shape: [2, 112, 14, 14],
                mean: -0.300_824_6,
                std: 6.765_862,
                abs_max: 39.049_706,
                samples: [
                    ([0, 0, 0, 0], 9.266_851),
                    ([0, 5, 3, 7], 2.221_737_4),
                    ([1, 111, 13, 13], 8.207_268),
                    ([1, 17, 10, 2], -1.513_153_6),
                ],
            },
        },
    );
    check_case(
        &backbone,
        &Case {
            size: 256,
            logits: [
                [
                    -1.040_943_9,
                    0.485_184_28,
                    -1.165_672_1,
                    0.242_358_33,
                    -1.796_813_8,
                    0.562_389_85,
                    -2.018_483_2,
                    -0.685_273_2,
                ],
                [
                    -1.033_252_9,
                    0.525_690_97,
                    -1.095_878_9,
                    0.236_236_81,
                    -1.727_088_2,
                    0.568_143_55,
                    -1.972_457_6,
                    -0.800_982_4,
                ],
            ],
            top5: [[418, 767, 604, 902, 696], [418, 767, 604, 902, 696]],
            block4: Stats {
                shape: [2, 40, 32, 32],
                mean: 0.439_596_5,
                std: 11.484_996,
                abs_max: 44.451_23,
                samples: [
                    ([0, 0, 0, 0], -23.908_646),
                    ([0, 5, 3, 7], 12.446_353),
                    ([1, 39, 31, 31], 7.284_760_5),
                    ([1, 17, 10, 2], 10.513_815),
                ],
            },
            block10: Stats {
                shape: [2, 112, 16, 16],
                mean: -0.304_780_3,
                std: 6.702_964,
                abs_max: 39.049_706,
                samples: [
                    ([0, 0, 0, 0], 9.266_857),
                    ([0, 5, 3, 7], 2.403_825_3),
                    ([1, 111, 15, 15], 2.581_381_3),
                    ([1, 17, 10, 2], -0.840_885_4),
                ],
            },
        },
    );
}

#[test]
fn pth_and_converted_safetensors_hash_alike() {
    let path = weights::default_weights_path();
    let tensors = weights::read_weights(&path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(tensors.len(), 247, "float tensors in Lite0 (batch counters excluded)");
    let stem = &tensors["_conv_stem.weight"];
    assert_eq!(stem.shape, vec![32, 3, 3, 3]);
    let copy = std::env::temp_dir().join(format!("loupe-weights-copy-{}.safetensors", std::process::id()));
    weights::write_safetensors(&tensors, &copy).unwrap();
    let reread = weights::read_weights(&copy).unwrap();
    std::fs::remove_file(&copy).unwrap();
    assert_eq!(weights::weights_hash(&tensors), weights::weights_hash(&reread));
}

#[test]
fn fused_patch_rows_equal_the_candle_path() {
    use loupe_engine::methods::features::{patch_feature_rows, patch_features, patches_as_rows};
    let backbone = Backbone::load(&weights::default_weights_path(), &Device::Cpu).unwrap();
    let images = (formula_input(64).affine(0.3, 0.5).unwrap()).clamp(0f32, 1f32).unwrap();
    let fused = patch_feature_rows(&backbone, &images).unwrap();
    let reference = patches_as_rows(&patch_features(&backbone, &images).unwrap()).unwrap();
    assert_eq!(fused.dims(), reference.dims());
    let diff = (fused - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "max diff {diff}");
}
