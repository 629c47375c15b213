//! Every registered method end to end on the engine's synthetic set: it separates the defects, survives bad
//! files, and a saved model scores exactly as the one in memory.

use candle_core::Device;
use loupe_engine::backbone::{weights, Backbone};
use loupe_engine::dataset::scan_mvtec;
use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
use loupe_engine::evaluate::evaluate;
use loupe_engine::methods::training::Schedule;
use loupe_engine::methods::{find_method, MethodInfo, REGISTRY};
use loupe_engine::model_file;
use loupe_engine::pipeline::{fit, score_images, FitRequest};
use loupe_engine::progress::NoProgress;
use std::path::PathBuf;
use std::sync::Arc;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loupe-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn backbone() -> Arc<Backbone> {
    Arc::new(Backbone::load(&weights::default_weights_path(), &Device::Cpu).unwrap_or_else(|e| panic!("{e:#}")))
}

/// Every registered method — read from the registry, so a new one is tested without naming it here — trains
/// its smoke setting on the synthetic set (bad files among it), beats its floors, and scores the same after
/// saving and loading. The methods run side by side, each on its own copy of the set. `LOUPE_SMOKE=name,name`
/// runs only those.
#[test]
fn every_registered_method_separates_synthetic_defects_and_round_trips() {
    let only = std::env::var("LOUPE_SMOKE").ok();
    let chosen = |name: &str| only.as_deref().is_none_or(|only| only.split(',').any(|n| n == name));
    std::thread::scope(|scope| {
        let runs: Vec<_> = REGISTRY
            .iter()
            .filter(|method| chosen(method.name))
            .map(|method| (method.name, scope.spawn(move || separates_synthetic_defects_and_round_trips(method))))
            .collect();
        let failed: Vec<String> = runs
            .into_iter()
            .filter_map(|(name, run)| run.join().err().map(|panic| format!("{name}: {}", panic_text(&panic))))
            .collect();
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    });
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// A method's smoke setting (its registry entry's), complete, as its settings type.
fn smoke<S: serde::de::DeserializeOwned>(method: &str) -> S {
    let info = find_method(method).unwrap();
    serde_json::from_value(info.settings_with(&(info.smoke.settings)()).unwrap()).unwrap()
}

/// A DRAEM file from before the discriminator saw deviations has no per-position statistics: refused with the
/// reason and what to do, not a tensor-shape error.
#[test]
fn an_earlier_draem_file_is_refused_with_the_reason() {
    use loupe_engine::methods::augmentation::draem::{Draem, DraemSettings};
    let channels = loupe_engine::methods::features::PATCH_CHANNELS;
    let tensors = std::collections::HashMap::from([
        (
            "standardise.mean".to_string(),
            candle_core::Tensor::zeros(channels, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "standardise.inverse_std".to_string(),
            candle_core::Tensor::ones(channels, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    let error = Draem::load(backbone(), 256, DraemSettings::default(), tensors).err().expect("refused");
    assert!(error.to_string().contains("earlier Loupe") && error.to_string().contains("train it again"), "{error}");
}

fn separates_synthetic_defects_and_round_trips(method: &MethodInfo) {
    let smoke = &method.smoke;
    separates_synthetic_defects_at_size_and_round_trips(
        method.name,
        (smoke.settings)(),
        smoke.image_size,
        Some(smoke.floors),
    );
}

/// Fits on the synthetic set (bad files among it), checks the floors when given, saves, loads, and compares.
fn separates_synthetic_defects_at_size_and_round_trips(
    method: &str,
    settings: serde_json::Value,
    image_size: u32,
    floors: Option<[f64; 3]>,
) {
    let dir = temp_dir(method);
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(1)).unwrap();
    // Bad files among the normal images are skipped and reported, not fatal.
    std::fs::write(data.join("train/good/empty.png"), b"").unwrap();
    std::fs::write(data.join("train/good/notes.jpg"), b"not an image").unwrap();
    let backbone = backbone();
    let mut request = FitRequest::new(find_method(method).unwrap(), data.clone());
    request.image_size = image_size;
    request.settings = settings;
    let outcome = fit(backbone.clone(), &request, &NoProgress).unwrap();
    assert_eq!(outcome.skipped.len(), 2, "{:?}", outcome.skipped);
    assert!(outcome.skipped.iter().any(|s| s.path.ends_with("empty.png") && s.reason.contains("empty file")));
    assert_eq!(outcome.manifest.training.images_used + outcome.manifest.validation.count, 24);

    let benchmark = scan_mvtec(&data).unwrap();
    let report = evaluate(outcome.model.as_ref(), &outcome.manifest, &benchmark, 4, &Device::Cpu, &NoProgress).unwrap();
    eprintln!("{method}: image AUROC {}, pixel {:?}, AUPRO {:?}", report.image_auroc, report.pixel_auroc, report.aupro);
    let floors = floors.unwrap_or([0.0; 3]);
    assert!(
        report.image_auroc > floors[0],
        "{method}: image AUROC {} ({:?})",
        report.image_auroc,
        report.per_defect_type
    );
    if find_method(method).unwrap().localises {
        assert!(report.pixel_auroc.unwrap() > floors[1], "{method}: pixel AUROC {:?}", report.pixel_auroc);
        assert!(report.aupro.unwrap() > floors[2], "{method}: AUPRO {:?}", report.aupro);
    } else {
        assert_eq!((report.pixel_auroc, report.aupro), (None, None), "{method} does not localise");
    }
    assert_eq!(report.per_defect_type.len(), 3);

    let path = dir.join("model.safetensors");
    model_file::save(&path, outcome.model.as_ref(), &outcome.manifest).unwrap();
    let loaded = model_file::load(&path, backbone).unwrap();
    assert_eq!(loaded.manifest, outcome.manifest);
    let (images, _) = loupe_engine::dataset::decode_all(&benchmark.test, image_size, &|_| {});
    let (before, _) = score_images(outcome.model.as_ref(), &images, 4, &Device::Cpu, &NoProgress).unwrap();
    let (after, _) = score_images(loaded.model.as_ref(), &images, 4, &Device::Cpu, &NoProgress).unwrap();
    for (a, b) in before.iter().zip(&after) {
        assert_eq!(a.score, b.score);
        assert_eq!(a.map, b.map);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn damaged_or_foreign_model_files_are_clear_errors() {
    let dir = temp_dir("badmodel");
    let backbone = backbone();
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let message = format!("{:#}", model_file::load(&garbage, backbone.clone()).err().unwrap());
    assert!(message.contains("garbage.safetensors"), "{message}");

    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec { train_good: 6, test_good: 0, test_per_defect: 0, ..SyntheticSpec::tiny(2) })
        .unwrap();
    let mut request = FitRequest::new(find_method("patchcore").unwrap(), data.join("train/good"));
    request.image_size = 64;
    let outcome = fit(backbone.clone(), &request, &NoProgress).unwrap();
    let mut manifest = outcome.manifest.clone();
    manifest.backbone_weights_sha256 = "0123456789abcdef".into();
    let foreign = dir.join("foreign.safetensors");
    model_file::save(&foreign, outcome.model.as_ref(), &manifest).unwrap();
    let message = format!("{:#}", model_file::load(&foreign, backbone.clone()).err().unwrap());
    assert!(message.contains("0123456789ab"), "{message}");

    // A hash that is not ASCII is cut on a character boundary in the message, not a panic.
    manifest.backbone_weights_sha256 = "ééééééééééééééé".into();
    model_file::save(&foreign, outcome.model.as_ref(), &manifest).unwrap();
    let message = format!("{:#}", model_file::load(&foreign, backbone.clone()).err().unwrap());
    assert!(message.contains("(weights éééééééééééé)"), "{message}");

    let bytes = std::fs::read(&foreign).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(model_file::load(&truncated, backbone.clone()).is_err());

    // A bundle is written only with the weights the model was trained with, and a bundle that claims to carry
    // its backbone but does not is a clear error, never the installed weights in its place.
    let mut other_weights = weights::read_weights(&weights::default_weights_path()).unwrap();
    other_weights.values_mut().next().unwrap().data[0] += 1.0;
    let bundle = dir.join("bundle.safetensors");
    let message = format!(
        "{:#}",
        model_file::save_bundle(&bundle, outcome.model.as_ref(), &outcome.manifest, &other_weights).unwrap_err()
    );
    assert!(message.contains("use the weights it was trained with"), "{message}");
    let weights = weights::read_weights(&weights::default_weights_path()).unwrap();
    model_file::save_bundle(&bundle, outcome.model.as_ref(), &outcome.manifest, &weights).unwrap();
    let mut bytes = std::fs::read(&bundle).unwrap();
    let renamed = bytes.windows(9).position(|w| w == b"backbone/").unwrap();
    bytes[renamed..renamed + 9].copy_from_slice(b"backbonX/");
    std::fs::write(&bundle, &bytes).unwrap();
    let opened = model_file::open(&bundle, &Device::Cpu, || Ok(backbone.clone()));
    let message = format!("{:#}", opened.err().unwrap());
    assert!(message.contains("bundle.safetensors") && message.contains("bundled backbone"), "{message}");

    // Any setting read from a file is untrusted: a blur of σ 1e9 once made `infer` allocate 24 GB.
    let mut manifest = outcome.manifest.clone();
    manifest.settings["blur_sigma"] = serde_json::json!(1e9);
    let huge_blur = dir.join("huge-blur.safetensors");
    model_file::save(&huge_blur, outcome.model.as_ref(), &manifest).unwrap();
    let message = format!("{:#}", model_file::load(&huge_blur, backbone.clone()).err().unwrap());
    assert!(message.contains("`blur_sigma` = 1000000000") && message.contains("0..=32"), "{message}");

    // A file that could not be read back is never written: JSON has no NaN.
    let mut manifest = outcome.manifest.clone();
    manifest.validation.scores.push(f32::NAN);
    let nan = dir.join("nan.safetensors");
    let message = format!("{:#}", model_file::save(&nan, outcome.model.as_ref(), &manifest).unwrap_err());
    assert!(message.contains("not finite") && !nan.exists(), "{message}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Asks to stop as soon as the first stage starts.
struct CancelAtOnce(loupe_engine::progress::CancelFlag);

impl loupe_engine::progress::Progress for CancelAtOnce {
    fn begin(&self, _stage: &str, _total: u64) {
        self.0.cancel();
    }
    fn advance(&self, _steps: u64) {}
    fn is_cancelled(&self) -> bool {
        self.0.is_set()
    }
}

#[test]
fn a_cancelled_fit_stops_with_cancelled() {
    let dir = temp_dir("cancel");
    generate_mvtec(&dir, &SyntheticSpec { train_good: 8, test_good: 0, test_per_defect: 0, ..SyntheticSpec::tiny(4) })
        .unwrap();
    let mut request = FitRequest::new(find_method("patchcore").unwrap(), dir.clone());
    request.image_size = 64;
    let progress = CancelAtOnce(Default::default());
    let error = fit(backbone(), &request, &progress).err().expect("cancelled");
    assert!(error.downcast_ref::<loupe_engine::progress::Cancelled>().is_some(), "{error:#}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Cancels once `after` training steps are done.
struct CancelDuringTraining {
    flag: loupe_engine::progress::CancelFlag,
    training: std::sync::atomic::AtomicBool,
    steps: std::sync::atomic::AtomicU64,
    after: u64,
}

impl loupe_engine::progress::Progress for CancelDuringTraining {
    fn begin(&self, stage: &str, _total: u64) {
        self.training.store(stage == "training", std::sync::atomic::Ordering::Relaxed);
    }
    fn advance(&self, steps: u64) {
        if self.training.load(std::sync::atomic::Ordering::Relaxed)
            && self.steps.fetch_add(steps, std::sync::atomic::Ordering::Relaxed) + steps >= self.after
        {
            self.flag.cancel();
        }
    }
    fn is_cancelled(&self) -> bool {
        self.flag.is_set()
    }
}

#[test]
fn flows_train_by_likelihood_and_a_cancelled_run_keeps_its_best_epoch() {
    use loupe_engine::methods::flow::cflow::{Cflow, CflowSettings};
    use loupe_engine::methods::flow::fastflow::{Fastflow, FastflowSettings};
    use loupe_engine::methods::FitContext;
    let dir = temp_dir("flow");
    generate_mvtec(&dir, &SyntheticSpec { train_good: 12, test_good: 0, test_per_defect: 0, ..SyntheticSpec::tiny(5) })
        .unwrap();
    let records = loupe_engine::dataset::scan_normal_folder(&dir).unwrap();
    let (images, _) = loupe_engine::dataset::decode_all(&records, 64, &|_| {});
    let images = loupe_engine::dataset::TrainingImages::from_decoded(&images).unwrap();
    let settings: CflowSettings = smoke("cflow");
    let context = |progress: &'static dyn loupe_engine::progress::Progress| FitContext {
        backbone: backbone(),
        device: Device::Cpu,
        batch_size: 4,
        image_size: 64,
        progress,
    };
    let model = Cflow::fit(
        &context(&NoProgress),
        &images,
        CflowSettings { schedule: Schedule { epochs: 5, ..settings.schedule }, ..settings.clone() },
    )
    .unwrap();
    let mut fastflow_settings: FastflowSettings = smoke("fastflow");
    fastflow_settings.schedule.epochs = 5;
    let fastflow = Fastflow::fit(&context(&NoProgress), &images, fastflow_settings).unwrap();
    for (name, losses) in [("CFlow", &model.record.epoch_losses), ("FastFlow", &fastflow.record.epoch_losses)] {
        assert_eq!(losses.len(), 5);
        assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
        assert!(losses[4] < losses[0], "{name}: the negative log-likelihood falls: {losses:?}");
    }

    // Cancel in the middle of epoch 3: training stops and the best finished epoch is kept.
    let progress: &'static CancelDuringTraining = Box::leak(Box::new(CancelDuringTraining {
        flag: Default::default(),
        training: Default::default(),
        steps: Default::default(),
        after: 2 * 15 + 5,
    }));
    let stopped = Cflow::fit(
        &context(progress),
        &images,
        CflowSettings { schedule: Schedule { epochs: 5, ..settings.schedule }, ..settings },
    )
    .unwrap();
    assert_eq!(stopped.record.epoch_losses.len(), 2);
    assert!(stopped.record.stopped_early.as_deref().is_some_and(|r| r.contains("cancelled")));
    let expected_best = if stopped.record.epoch_losses[1] < stopped.record.epoch_losses[0] { 1 } else { 0 };
    assert_eq!(stopped.record.best_epoch, expected_best);

    // Through the pipeline, a run stopped during training still yields its model, without a threshold.
    let mut request = FitRequest::new(find_method("cflow").unwrap(), dir.clone());
    request.image_size = 64;
    request.settings =
        serde_json::json!({"epochs": 5, "steps_per_epoch": 15, "vectors_per_step": 256, "coupling_blocks": 4});
    let progress = CancelDuringTraining {
        flag: Default::default(),
        training: Default::default(),
        steps: Default::default(),
        after: 20,
    };
    let outcome = fit(backbone(), &request, &progress).unwrap();
    assert_eq!(outcome.manifest.thresholds.decision, None);
    assert_eq!(outcome.manifest.validation.count, 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn trained_losses_fall() {
    use loupe_engine::methods::augmentation::cutpaste::{Cutpaste, CutpasteSettings};
    use loupe_engine::methods::augmentation::draem::{Draem, DraemSettings};
    use loupe_engine::methods::enhancement::fcdd::{Fcdd, FcddSettings};
    use loupe_engine::methods::enhancement::mean_shifted::{MeanShifted, MeanShiftedSettings};
    use loupe_engine::methods::reconstruction::autoencoder::{Autoencoder, AutoencoderSettings};
    use loupe_engine::methods::FitContext;
    let dir = temp_dir("losses");
    generate_mvtec(&dir, &SyntheticSpec { train_good: 12, test_good: 0, test_per_defect: 0, ..SyntheticSpec::tiny(6) })
        .unwrap();
    let records = loupe_engine::dataset::scan_normal_folder(&dir).unwrap();
    let (images, _) = loupe_engine::dataset::decode_all(&records, 64, &|_| {});
    let images = loupe_engine::dataset::TrainingImages::from_decoded(&images).unwrap();
    let context =
        FitContext { backbone: backbone(), device: Device::Cpu, batch_size: 4, image_size: 64, progress: &NoProgress };
    let autoencoder_settings: AutoencoderSettings = smoke("autoencoder");
    let autoencoder = Autoencoder::fit(
        &context,
        &images,
        AutoencoderSettings {
            schedule: Schedule { epochs: 6, ..autoencoder_settings.schedule },
            ..autoencoder_settings
        },
    )
    .unwrap();
    let cutpaste = Cutpaste::fit(
        &context,
        &images,
        CutpasteSettings {
            schedule: Schedule { epochs: 6, ..CutpasteSettings::default().schedule },
            steps_per_epoch: 6,
            images_per_step: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let draem_settings: DraemSettings = smoke("draem");
    let draem = Draem::fit(
        &context,
        &images,
        DraemSettings {
            schedule: Schedule { epochs: 6, ..draem_settings.schedule },
            steps_per_epoch: 6,
            ..draem_settings
        },
    )
    .unwrap();
    let fcdd_settings: FcddSettings = smoke("fcdd");
    let fcdd = Fcdd::fit(
        &context,
        &images,
        FcddSettings {
            schedule: Schedule { epochs: 6, ..fcdd_settings.schedule },
            steps_per_epoch: 6,
            ..fcdd_settings
        },
    )
    .unwrap();
    let msc_settings: MeanShiftedSettings = smoke("mean-shifted");
    let mean_shifted = MeanShifted::fit(
        &context,
        &images,
        MeanShiftedSettings {
            schedule: Schedule { epochs: 6, ..msc_settings.schedule },
            steps_per_epoch: 6,
            ..msc_settings
        },
    )
    .unwrap();
    for (name, losses) in [
        ("autoencoder", &autoencoder.record.epoch_losses),
        ("CutPaste", &cutpaste.record.epoch_losses),
        ("DRAEM", &draem.record.epoch_losses),
        ("FCDD", &fcdd.record.epoch_losses),
        ("mean-shifted", &mean_shifted.record.epoch_losses),
    ] {
        assert_eq!(losses.len(), 6);
        assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
        assert!(losses[5] < losses[0], "{name}: the loss falls: {losses:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_preset_is_a_valid_setting_of_its_method() {
    for method in loupe_engine::methods::REGISTRY.iter() {
        for preset in method.presets {
            let values = method.preset(preset.name).unwrap();
            assert_ne!(values, (method.default_settings)(), "{} preset {} is the default", method.name, preset.name);
            loupe_engine::methods::merge_settings((method.default_settings)(), &values).unwrap();
        }
        assert!(method.preset("no-such-preset").is_err());
    }
    let trained = ["autoencoder", "stfpm", "fastflow", "cflow", "draem", "cutpaste", "fcdd", "mean-shifted"];
    for name in trained {
        let method = find_method(name).unwrap();
        assert!(method.presets.iter().any(|p| p.name == "published"), "{name} has a published preset");
    }
}

/// The one-class objectives must not reach their minimum by mapping everything to one point: mean-shifted
/// training pulls normal patches towards their centre but keeps them apart around it (the representations
/// shifted by the centre stay spread over the sphere), and FCDD keeps telling outliers from normal images.
#[test]
fn one_class_embeddings_do_not_collapse() {
    use loupe_engine::methods::augmentation::synthetic_anomalies::random_anomaly;
    use loupe_engine::methods::enhancement::fcdd::{Fcdd, FcddSettings};
    use loupe_engine::methods::enhancement::mean_shifted::{MeanShifted, MeanShiftedSettings};
    use loupe_engine::methods::features::patch_feature_rows;
    use loupe_engine::methods::{images_to_tensor, FitContext};
    use loupe_engine::rng::SplitMix64;
    let dir = temp_dir("collapse");
    generate_mvtec(&dir, &SyntheticSpec { train_good: 12, test_good: 0, test_per_defect: 0, ..SyntheticSpec::tiny(8) })
        .unwrap();
    let records = loupe_engine::dataset::scan_normal_folder(&dir).unwrap();
    let (decoded, _) = loupe_engine::dataset::decode_all(&records, 64, &|_| {});
    let images = loupe_engine::dataset::TrainingImages::from_decoded(&decoded).unwrap();
    let backbone = backbone();
    let context = FitContext {
        backbone: backbone.clone(),
        device: Device::Cpu,
        batch_size: 4,
        image_size: 64,
        progress: &NoProgress,
    };
    let batch = images_to_tensor(&decoded, &Device::Cpu).unwrap();

    // Spread of unit rows: 1 − ‖mean‖² (0 when all rows are the same point).
    let spread = |rows: &candle_core::Tensor| -> f32 {
        let norms = rows.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        let unit = rows.broadcast_div(&norms).unwrap();
        1.0 - unit.mean(0).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    };
    let pretrained = spread(&patch_feature_rows(&backbone, &batch).unwrap());
    let settings: MeanShiftedSettings = smoke("mean-shifted");
    let mean_shifted = MeanShifted::fit(
        &context,
        &images,
        MeanShiftedSettings { schedule: Schedule { epochs: 8, ..settings.schedule }, ..settings },
    )
    .unwrap();
    let z = mean_shifted.embeddings(&batch).unwrap();
    let trained = spread(&z);
    let shifted = spread(&z.broadcast_sub(&z.mean_keepdim(0).unwrap()).unwrap());
    assert!(trained > 0.01, "embeddings collapsed: spread {trained} (pretrained features {pretrained})");
    assert!(shifted > 0.5, "mean-shifted representations collapsed: spread {shifted}");

    let settings: FcddSettings = smoke("fcdd");
    let fcdd = Fcdd::fit(
        &context,
        &images,
        FcddSettings { schedule: Schedule { epochs: 8, ..settings.schedule }, ..settings },
    )
    .unwrap();
    let mut rng = SplitMix64::new(5);
    let outliers: Vec<f32> = decoded
        .iter()
        .zip(decoded.iter().skip(1).cycle())
        .flat_map(|(image, other)| random_anomaly(&image.to_chw_f32(), &other.to_chw_f32(), 64, &mut rng).image)
        .collect();
    let outliers = candle_core::Tensor::from_vec(outliers, (images.len(), 3, 64, 64), &Device::Cpu).unwrap();
    let mean_anomaly =
        |t: &candle_core::Tensor| fcdd.cell_anomalies(t).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let (normal, outlier) = (mean_anomaly(&batch), mean_anomaly(&outliers));
    assert!(outlier > 2.0 * normal && outlier > 0.05, "FCDD mean anomaly: normal {normal}, outliers {outlier}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_fit_on_images_read_back_from_the_temporary_file_equals_one_in_memory() {
    use loupe_engine::dataset::{decode_all, TrainingImages};
    use loupe_engine::methods::{images_to_tensor, FitContext};
    let dir = temp_dir("spilled");
    generate_mvtec(&dir, &SyntheticSpec { train_good: 10, test_good: 0, test_per_defect: 0, ..SyntheticSpec::tiny(9) })
        .unwrap();
    let records = loupe_engine::dataset::scan_normal_folder(&dir).unwrap();
    let (decoded, _) = decode_all(&records, 64, &|_| {});
    let in_memory = TrainingImages::from_decoded(&decoded).unwrap();
    // A budget of nothing: every image is written to the temporary file and read back for each batch.
    let (spilled, skipped) = TrainingImages::decode(&records, 64, 0, &NoProgress).unwrap();
    assert!(skipped.is_empty());
    assert_eq!((spilled.len(), spilled.spilled()), (10, 10));
    let context =
        FitContext { backbone: backbone(), device: Device::Cpu, batch_size: 3, image_size: 64, progress: &NoProgress };
    let batch = images_to_tensor(&decoded[..4], &Device::Cpu).unwrap();
    for method in ["padim", "patchcore"] {
        let info = find_method(method).unwrap();
        let settings = info.settings_with(&serde_json::json!({})).unwrap();
        let scores = |images: &TrainingImages| -> Vec<f32> {
            let model = (info.fit)(&context, images, &settings).unwrap();
            model.score_batch(&batch).unwrap().iter().map(|output| output.score).collect()
        };
        assert_eq!(scores(&spilled), scores(&in_memory), "{method}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
