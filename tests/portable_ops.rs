//! The portable path — the compositions of candle ops a GPU runs in place of Loupe's CPU kernels — run on the
//! CPU, so that no branch a CUDA or Metal device takes is first met on a GPU. This binary forces that path for
//! its whole process (`device::force_portable_ops`), which is why these tests live apart from the others.

use candle_core::{Device, Tensor, Var};
use loupe_engine::backbone::depthwise::DepthwiseConv;
use loupe_engine::backbone::{weights, Backbone};
use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
use loupe_engine::dataset::{decode_all, scan_mvtec};
use loupe_engine::device::force_portable_ops;
use loupe_engine::methods::{MethodInfo, REGISTRY};
use loupe_engine::model_file;
use loupe_engine::pipeline::{fit, score_images, FitRequest};
use loupe_engine::progress::NoProgress;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loupe-portable-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The number of ops between `x` and `y` in candle's graph: one gradient per op output reached backwards.
fn ops_between(x: &Var, y: &Tensor) -> usize {
    y.sum_all().unwrap().backward().unwrap().get_ids().filter(|&&id| id != x.as_tensor().id()).count()
}

/// One test, in phases, because the portable switch is process-wide: (1) the op counts, (2) every registered
/// method fits and scores on the portable path, (3) the same saved models scored through the CPU kernels give
/// the same scores — the CPU-side half of the CPU-vs-GPU parity the device check measures.
#[test]
fn portable_path_fits_every_method_and_scores_as_the_cpu_kernels() {
    force_portable_ops(true);
    depthwise_ops_do_not_grow_with_channels();
    let backbone = Arc::new(Backbone::load(&weights::default_weights_path(), &Device::Cpu).unwrap());
    backbone_forward_is_a_bounded_number_of_ops(&backbone);

    let only = std::env::var("LOUPE_SMOKE").ok();
    let chosen = |name: &str| only.as_deref().is_none_or(|only| only.split(',').any(|n| n == name));
    let methods: Vec<&'static MethodInfo> = REGISTRY.iter().copied().filter(|m| chosen(m.name)).collect();
    let portable: Vec<(PathBuf, Vec<f32>)> = std::thread::scope(|scope| {
        let runs: Vec<_> = methods
            .iter()
            .map(|&method| {
                let backbone = backbone.clone();
                scope.spawn(move || fit_and_score_portably(method, backbone))
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });

    force_portable_ops(false);
    let kernel_backbone = Arc::new(Backbone::load(&weights::default_weights_path(), &Device::Cpu).unwrap());
    let mut mismatches = Vec::new();
    for (method, (dir, portable_scores)) in methods.iter().zip(&portable) {
        let kernel_scores = score_saved(dir, method.smoke.image_size, kernel_backbone.clone());
        let (low, high) = portable_scores.iter().fold((f32::MAX, f32::MIN), |(l, h), &s| (l.min(s), h.max(s)));
        let worst = portable_scores.iter().zip(&kernel_scores).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let relative = worst / (high - low).max(f32::EPSILON);
        eprintln!("{}: portable vs kernel scores, worst difference {relative:.2e} of the range", method.name);
        if relative > 1e-3 {
            mismatches.push(format!("{}: {relative:.2e} of the score range", method.name));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(mismatches.is_empty(), "the portable path scores differently:\n{}", mismatches.join("\n"));
}

/// A depthwise layer is the same few dozen ops at 8 channels and at 1,152 (candle's grouped convolution was
/// about three per channel: a GPU spent its time on launches).
fn depthwise_ops_do_not_grow_with_channels() {
    let count = |channels: usize, kernel: usize, stride: usize| {
        let x = Var::randn(0f32, 1.0, (1, channels, 12, 12), &Device::Cpu).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (channels, 1, kernel, kernel), &Device::Cpu).unwrap();
        let bias = Tensor::zeros(channels, candle_core::DType::F32, &Device::Cpu).unwrap();
        let op = DepthwiseConv { kernel, stride, relu6: true };
        ops_between(&x, &op.forward(x.as_tensor(), &weight, &bias).unwrap())
    };
    for (kernel, stride) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
        let (few, many) = (count(8, kernel, stride), count(1152, kernel, stride));
        assert_eq!(few, many, "k{kernel} s{stride}: {few} ops at 8 channels, {many} at 1,152");
        assert!(few <= 4 * kernel * kernel + 16, "k{kernel} s{stride}: {few} ops");
    }
}

/// The whole backbone forward, portable: a fixed budget of ops (about 70 per block), far below one per channel
/// (the 11 blocks up to stride 16 have 5,000 depthwise channels).
fn backbone_forward_is_a_bounded_number_of_ops(backbone: &Backbone) {
    let images = Var::rand(0f32, 1.0, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let maps = backbone.features(images.as_tensor()).unwrap();
    let both = (maps.stride8.sum_all().unwrap() + maps.stride16.sum_all().unwrap()).unwrap();
    let ops = ops_between(&images, &both);
    eprintln!("backbone forward, portable: {ops} ops");
    assert!(ops < 1500, "{ops} ops in a portable backbone forward");
}

/// Fits the method's smoke setting on the synthetic set with every op portable, checks it separates the
/// defects, saves the model, and returns its folder and its scores of the test images.
fn fit_and_score_portably(method: &'static MethodInfo, backbone: Arc<Backbone>) -> (PathBuf, Vec<f32>) {
    let dir = temp_dir(method.name);
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(1)).unwrap();
    let mut request = FitRequest::new(method, data.clone());
    request.image_size = method.smoke.image_size;
    request.settings = (method.smoke.settings)();
    let outcome = fit(backbone, &request, &NoProgress).unwrap_or_else(|e| panic!("{}: {e:#}", method.name));
    let benchmark = scan_mvtec(&data).unwrap();
    let (images, _) = decode_all(&benchmark.test, method.smoke.image_size, &|_| {});
    let (scores, _) = score_images(outcome.model.as_ref(), &images, 4, &Device::Cpu, &NoProgress).unwrap();
    let scores: Vec<f32> = scores.iter().map(|s| s.score).collect();
    model_file::save(&dir.join("model.safetensors"), outcome.model.as_ref(), &outcome.manifest).unwrap();
    let labels: Vec<bool> = benchmark.test.iter().map(|record| record.label.is_anomalous()).collect();
    assert_eq!(labels.len(), scores.len());
    let auroc = loupe_engine::metrics::auroc(&scores, &labels).unwrap();
    // The floor the registry-wide synthetic test holds the CPU kernels to.
    let floor = method.smoke.floors[0];
    assert!(auroc > floor, "{} on the portable path: image AUROC {auroc}, floor {floor}", method.name);
    (dir, scores)
}

fn score_saved(dir: &Path, image_size: u32, backbone: Arc<Backbone>) -> Vec<f32> {
    let loaded = model_file::load(&dir.join("model.safetensors"), backbone).unwrap();
    let benchmark = scan_mvtec(&dir.join("data")).unwrap();
    let (images, _) = decode_all(&benchmark.test, image_size, &|_| {});
    let (scores, _) = score_images(loaded.model.as_ref(), &images, 4, &Device::Cpu, &NoProgress).unwrap();
    scores.iter().map(|s| s.score).collect()
}
