//! The `loupe` command line as scripts use it: fit → eval --json → infer → export, and its errors.

use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn loupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loupe")).args(args).output().expect("loupe runs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loupe-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The training-step benchmark builds the very networks the PyTorch replica in `../shared/peer` builds (its
/// parameter counts: 289,328 and 443,696 for the autoencoder at 64² and 128², 592,536 for the STFPM student) and
/// runs real steps.
#[test]
fn bench_train_step_runs_the_replicas_networks() {
    for (method, size, parameters) in
        [("autoencoder", "64", 289_328), ("autoencoder", "128", 443_696), ("stfpm", "64", 592_536)]
    {
        let run = loupe(&[
            "bench",
            "train-step",
            "--method",
            method,
            "--batch",
            "2",
            "--size",
            size,
            "--steps",
            "2",
            "--warmup",
            "1",
        ]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let line = String::from_utf8_lossy(&run.stdout).to_string();
        assert!(line.contains(&format!("params={parameters} ")), "{method} {size}: {line}");
        assert!(line.contains("step_med_ms="), "{line}");
    }
    let unknown = loupe(&["bench", "train-step", "--method", "patchcore"]);
    assert!(!unknown.status.success());
}

/// A scale benchmark's normal set: as many distinct, readable variants as asked, from an MVTec folder's good
/// images, an unreadable source reported and skipped.
#[test]
fn make_normals_writes_distinct_readable_variants() {
    let dir = temp_dir("normals");
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(3)).unwrap();
    std::fs::write(data.join("train/good/broken.png"), b"not an image").unwrap();
    let out = dir.join("normals");
    let run =
        loupe(&["bench", "make-normals", "--from", text(&data), "--count", "40", "--out", text(&out), "--size", "48"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("broken.png"), "the unreadable source is reported");
    let mut distinct = std::collections::HashSet::new();
    for entry in std::fs::read_dir(&out).unwrap() {
        let image = image::open(entry.unwrap().path()).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (48, 48));
        distinct.insert(image.into_raw());
    }
    assert_eq!(distinct.len(), 40, "40 files, no two alike");
}

#[test]
fn fit_eval_infer_on_a_synthetic_benchmark() {
    let dir = temp_dir("flow");
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(5)).unwrap();
    let model = dir.join("model.safetensors");
    let fit = loupe(&[
        "fit",
        "--method",
        "patchcore",
        "--data",
        text(&data),
        "--out",
        text(&model),
        "--image-size",
        "96",
        "--coreset-ratio",
        "0.2",
    ]);
    assert!(fit.status.success(), "{}", String::from_utf8_lossy(&fit.stderr));

    let eval = loupe(&["eval", "--model", text(&model), "--data", text(&data), "--json", "--batch-size", "4"]);
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).expect("one JSON object on stdout");
    for key in ["image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "far", "mar", "test_images_per_s"] {
        assert!(report[key].is_number(), "{key} missing in {report}");
    }
    assert!(report["image_auroc"].as_f64().unwrap() > 0.9);
    assert!(report["per_defect_type"]["scratch"]["image_auroc"].is_number());

    // Label-free validation: held-out good images against synthetic anomalies made from them.
    let validate = loupe(&["bench", "validate", "--model", text(&model), "--data", text(&data)]);
    assert!(validate.status.success(), "{}", String::from_utf8_lossy(&validate.stderr));
    let line = String::from_utf8_lossy(&validate.stdout).to_string();
    let auroc: f64 =
        line.split("validation image AUROC ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&auroc), "{line}");

    // A threshold chosen on the labelled test set at the user's request, saved, is the one the model then uses.
    let choose = loupe(&[
        "eval",
        "--model",
        text(&model),
        "--data",
        text(&data),
        "--json",
        "--choose-threshold",
        "f1-max",
        "--save-threshold",
    ]);
    assert!(choose.status.success(), "{}", String::from_utf8_lossy(&choose.stderr));
    let chosen: serde_json::Value = serde_json::from_slice(&choose.stdout).unwrap();
    assert_eq!(chosen["threshold"], chosen["f1_threshold"]);
    let again = loupe(&["eval", "--model", text(&model), "--data", text(&data), "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["threshold"], chosen["f1_threshold"]);

    let heatmaps = dir.join("heatmaps");
    let infer =
        loupe(&["infer", "--model", text(&model), text(&data.join("test/spot")), "--out", text(&heatmaps), "--json"]);
    assert!(infer.status.success(), "{}", String::from_utf8_lossy(&infer.stderr));
    assert_eq!(String::from_utf8_lossy(&infer.stdout).lines().count(), 4);
    let heatmap = image::open(heatmaps.join("000_heatmap.png")).unwrap();
    assert_eq!((heatmap.width(), heatmap.height()), (96, 96), "heatmaps come at the image's own size");

    // A line script's exit status: the defects reach "reject", the good parts do not.
    let defects = loupe(&["infer", "--model", text(&model), text(&data.join("test/spot")), "--fail-on", "reject"]);
    assert_eq!(defects.status.code(), Some(3), "{}", String::from_utf8_lossy(&defects.stderr));
    let good = loupe(&["infer", "--model", text(&model), text(&data.join("train/good")), "--fail-on", "reject"]);
    let rejected = String::from_utf8_lossy(&good.stdout).matches("reject").count();
    assert_eq!(good.status.code(), Some(if rejected > 0 { 3 } else { 0 }), "{}", String::from_utf8_lossy(&good.stderr));

    // Export to ONNX, then read back what the file carries.
    let onnx = dir.join("model.onnx");
    let export = loupe(&["export", "--model", text(&model), "--format", "onnx", "--out", text(&onnx)]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let shown = loupe(&["export", "--show", text(&onnx)]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("loupe.method: patchcore") && shown.contains("loupe.decision_threshold: "), "{shown}");
    let not_onnx = loupe(&["export", "--show", text(&model)]);
    assert_eq!(not_onnx.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&not_onnx.stderr).contains("not an ONNX model"));

    // A bundle scores the same on a machine without the backbone weights; the plain file cannot run there.
    let bundle = dir.join("bundle.safetensors");
    let export = loupe(&["export", "--model", text(&model), "--format", "loupe-bundle", "--out", text(&bundle)]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let spot = data.join("test/spot");
    let scores = |model: &Path, weights: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_loupe"));
        command.args(["infer", "--model", text(model), "--json", text(&spot)]);
        if let Some(weights) = weights {
            command.env("LOUPE_WEIGHTS", weights);
        }
        command.output().unwrap()
    };
    let nowhere = text(&dir.join("no-weights-here.safetensors")).to_string();
    let (installed, bundled) = (scores(&model, None), scores(&bundle, Some(&nowhere)));
    assert!(bundled.status.success(), "{}", String::from_utf8_lossy(&bundled.stderr));
    assert_eq!(String::from_utf8_lossy(&installed.stdout), String::from_utf8_lossy(&bundled.stdout));
    let plain_without_weights = scores(&model, Some(&nowhere));
    assert!(String::from_utf8_lossy(&plain_without_weights.stderr).contains("backbone weights not found"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn errors_name_the_problem_and_exit_non_zero() {
    let dir = temp_dir("errors");
    let missing = loupe(&["fit", "--data", "/no/such/folder", "--out", text(&dir.join("m.safetensors"))]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/folder: folder not found"));

    let no_weights =
        loupe(&["fit", "--data", text(&dir), "--out", "m.safetensors", "--weights", "/no/weights.safetensors"]);
    assert_eq!(no_weights.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_weights.stderr).contains("loupe weights fetch"));

    let device = loupe(&["fit", "--data", text(&dir), "--out", "m.safetensors", "--device", "cuda"]);
    if !cfg!(feature = "cuda") {
        assert!(String::from_utf8_lossy(&device.stderr).contains("--features cuda"));
    }
    let usage = loupe(&["fit", "--method"]);
    assert_eq!(usage.status.code(), Some(2));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A hand-written labelme file (a polygon and a rectangle on one test image, a point that has no area) comes
/// into a project as a defect label with its mask; the project's labels go out in MVTec layout and read back as
/// a benchmark with that mask.
#[test]
fn labelme_import_then_mvtec_export() {
    let dir = temp_dir("labels");
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(9)).unwrap();
    let mut project = loupe::project::Project::new("labels");
    project.sources.push(loupe::project::Source::Benchmark("data".into()));
    let project_path = dir.join("labels.ron");
    project.save(&project_path).unwrap();
    let image = std::fs::read_dir(data.join("test/good")).unwrap().next().unwrap().unwrap().path();
    let name = image.file_name().unwrap().to_str().unwrap().to_string();
    let json = format!(
        r#"{{"version": "5.4.1", "flags": {{}}, "imagePath": "{name}", "imageData": null,
            "imageWidth": 96, "imageHeight": 96,
            "shapes": [
              {{"label": "crack", "points": [[10, 10], [40, 12], [38, 30]], "shape_type": "polygon", "flags": {{}}}},
              {{"label": "blowhole", "points": [[60, 60], [70, 72]], "shape_type": "rectangle"}},
              {{"label": "crack", "points": [[5, 5]], "shape_type": "point"}}
            ]}}"#
    );
    std::fs::write(data.join("test/good").join(format!("{name}.json")), json).unwrap();
    std::fs::write(dir.join("broken.json"), "{ not json").unwrap();
    // An annotation made on a twice-as-large copy of another image: its polygons would not line up.
    let mut images: Vec<PathBuf> =
        std::fs::read_dir(data.join("test/good")).unwrap().map(|e| e.unwrap().path()).filter(|p| p != &image).collect();
    images.retain(|p| p.extension().is_some_and(|e| e == "png"));
    let other = images[0].file_name().unwrap().to_str().unwrap().to_string();
    let resized = format!(
        r#"{{"imagePath": "{other}", "imageWidth": 192, "imageHeight": 192,
            "shapes": [{{"label": "crack", "points": [[10, 10], [40, 12], [38, 30]]}}]}}"#
    );
    std::fs::write(dir.join("resized.json"), resized.replace(&other, &format!("data/test/good/{other}"))).unwrap();

    let import = loupe(&[
        "labels",
        "import-labelme",
        text(&project_path),
        text(&data.join("test/good")),
        text(&dir.join("broken.json")),
        text(&dir.join("resized.json")),
    ]);
    let stderr = String::from_utf8_lossy(&import.stderr);
    assert!(import.status.success(), "{stderr}");
    assert!(stderr.contains("broken.json"), "a bad file is named: {stderr}");
    assert!(stderr.contains("crack (point)"), "a shape without area is reported: {stderr}");
    assert!(stderr.contains("resized.json: it says its image is 192×192, but"), "{stderr}");
    let project = loupe::project::Project::load(&project_path).unwrap();
    assert!(!project.labels.contains_key(&format!("data/test/good/{other}")), "the mismatched mask is not imported");
    let key = format!("data/test/good/{name}");
    let label = project.labels.get(&key).unwrap_or_else(|| panic!("no label under {key}: {:?}", project.labels));
    assert_eq!(label.verdict, Some(loupe_engine::labels::Verdict::Defect));
    assert_eq!(label.defect_types, ["crack", "blowhole"]);
    let mask = image::open(dir.join(label.mask.as_ref().unwrap())).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), (96, 96));
    assert_eq!(mask.get_pixel(65, 66).0[0], 255, "inside the rectangle");
    assert_eq!(mask.get_pixel(30, 16).0[0], 255, "inside the polygon");
    assert_eq!(mask.get_pixel(80, 20).0[0], 0, "outside both");

    let out = dir.join("exported");
    let export = loupe(&["labels", "export-mvtec", text(&project_path), text(&out)]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let written = out.join("test/crack").join(&name);
    assert!(written.is_file(), "{} exists", written.display());
    let stem = Path::new(&name).file_stem().unwrap().to_str().unwrap();
    let exported_mask = image::open(out.join("ground_truth/crack").join(format!("{stem}_mask.png"))).unwrap();
    assert_eq!(exported_mask.to_luma8(), mask);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Folder shape has one split: `eval --normal DIR` tests one good image in five, so a model fitted on all of
/// DIR is refused there, and `fit --normal DIR` trains on the other four.
#[test]
fn folder_shape_never_tests_on_training_images() {
    let dir = temp_dir("folder-split");
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(4)).unwrap();
    let (good, bad) = (data.join("train/good"), data.join("test/spot"));
    let fit = |flag: &str, model: &Path| {
        let args = ["fit", flag, text(&good), "--out", text(model), "--image-size", "64", "--coreset-ratio", "0.2"];
        let output = loupe(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    let eval =
        |model: &Path| loupe(&["eval", "--model", text(model), "--normal", text(&good), "--abnormal", text(&bad)]);
    let (all, held_out) = (dir.join("all.safetensors"), dir.join("held-out.safetensors"));
    fit("--data", &all);
    let refused = eval(&all);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("fit it with `loupe fit --normal"));
    fit("--normal", &held_out);
    let accepted = eval(&held_out);
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Beyond one machine: the Triton repository entry `export --format triton` writes (its config checked against
/// Triton's own ModelConfig message, batching emulated), and the Ray batch path (`scripts/ray_batch.py`, a local
/// cluster with 1 and 2 workers) scoring as `loupe infer` does. Needs `pip install -r tests/requirements.txt`.
#[test]
fn triton_repository_and_ray_batch_scoring() {
    let dir = temp_dir("engines");
    let data = dir.join("data");
    generate_mvtec(&data, &SyntheticSpec::tiny(7)).unwrap();
    let model = dir.join("line-3 padim.safetensors");
    let fit = loupe(&["fit", "--method", "padim", "--data", text(&data), "--out", text(&model), "--image-size", "96"]);
    assert!(fit.status.success(), "{}", String::from_utf8_lossy(&fit.stderr));

    let repository = dir.join("repository");
    let export = loupe(&["export", "--model", text(&model), "--format", "triton", "--out", text(&repository)]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let entry = repository.join("line-3_padim");
    assert!(entry.join("1/model.onnx").is_file() && entry.join("config.pbtxt").is_file());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let checked = Command::new("python3").arg(root.join("tests/triton_repository.py")).arg(&entry).output().unwrap();
    assert!(
        checked.status.success(),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let bad_name = loupe(&[
        "export",
        "--model",
        text(&model),
        "--format",
        "triton",
        "--name",
        "../outside",
        "--out",
        text(&repository),
    ]);
    assert_eq!(bad_name.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_name.stderr).contains("cannot name a Triton model"));

    let ray = Command::new("python3")
        .arg(root.join("scripts/ray_check.py"))
        .args(["--model", text(&model), "--images", text(&data.join("test")), "--workers", "1,2"])
        .args(["--out", text(&dir.join("ray")), "--loupe", env!("CARGO_BIN_EXE_loupe")])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&ray.stdout);
    eprintln!("{report}");
    assert!(ray.status.success(), "{report}{}", String::from_utf8_lossy(&ray.stderr));
    assert_eq!(report.lines().filter(|line| line.contains("\"passed\": true")).count(), 2, "{report}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn methods_explain_their_settings_in_words() {
    let explained = loupe(&["methods", "--settings", "patchcore"]);
    assert!(explained.status.success(), "{}", String::from_utf8_lossy(&explained.stderr));
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(text.contains("Memory bank share (--set coreset_ratio=0.1, allowed"), "{text}");
    assert!(text.contains("Advanced") && text.contains("Index probes"), "{text}");
    let unknown = loupe(&["methods", "--settings", "nosuchmethod"]);
    assert_eq!(unknown.status.code(), Some(1));
}

/// `loupe report` on a 500-test-image project with two models: one HTML file that parses cleanly, references
/// nothing outside itself, stays under a megabyte, renders its pictures and plots in headless Chromium and
/// prints to a several-page PDF (tests/report_check.py).
#[test]
fn report_is_one_file_a_browser_renders() {
    use loupe::project::{ModelEntry, Project, Source};
    let dir = temp_dir("report");
    let spec = SyntheticSpec { seed: 11, size: 96, train_good: 30, test_good: 200, test_per_defect: 100 };
    generate_mvtec(&dir.join("data"), &spec).unwrap();
    let mut project = Project::new("line 3 <pilot>");
    project.sources.push(Source::Benchmark("data".into()));
    for method in ["padim", "patchcore"] {
        let out = dir.join(format!("{method}.safetensors"));
        let fit = loupe(&["fit", "--method", method, "--data", text(&dir.join("data")), "--out", text(&out)]);
        assert!(fit.status.success(), "{}", String::from_utf8_lossy(&fit.stderr));
        project.models.push(ModelEntry {
            name: format!("{method} v1"),
            method: method.into(),
            file: format!("{method}.safetensors").into(),
            decision: None,
            review: None,
            evaluations: Default::default(),
            inspected: Default::default(),
            fit_seconds: 0.0,
            images_used: 0,
        });
    }
    project.active_model = Some(0);
    let project_path = dir.join("line3.ron");
    project.save(&project_path).unwrap();

    let out = dir.join("report.html");
    let report = loupe(&["report", "--project", text(&project_path), "--out", text(&out)]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(
        html.contains("line 3 &lt;pilot&gt;") && html.contains("Model comparison") && html.contains("patchcore v1")
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let checked = Command::new("python3")
        .arg(root.join("tests/report_check.py"))
        .args([text(&out), text(&dir.join("browser")), "--max-bytes", "1000000"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout);
    eprintln!("{said}");
    assert!(checked.status.success(), "{said}{}", String::from_utf8_lossy(&checked.stderr));

    let unknown = loupe(&["report", "--project", text(&project_path), "--model", "nope", "--out", text(&out)]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no model named \"nope\" (it has: padim v1, patchcore v1)")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// High-resolution parts from the command line: `make-highres` writes them, `fit --tile --overlap --roi` trains
/// on tiles inside the region, `infer` scores with the model's geometry (a stitched map of the part's shape), and
/// a region that is not one is refused with what is wrong.
#[test]
fn tiles_and_a_region_of_interest_from_the_command_line() {
    let dir = temp_dir("tiles");
    let data = dir.join("parts");
    let made = loupe(&[
        "bench",
        "make-highres",
        "--out",
        text(&data),
        "--width",
        "640",
        "--height",
        "320",
        "--train",
        "4",
        "--test-good",
        "1",
        "--per-defect",
        "1",
        "--min-area",
        "1e-4",
        "--max-area",
        "2e-4",
    ]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let model = dir.join("tiled.safetensors");
    let fit = loupe(&[
        "fit",
        "--method",
        "padim",
        "--data",
        text(&data),
        "--out",
        text(&model),
        "--image-size",
        "64",
        "--tile",
        "160",
        "--overlap",
        "16",
        "--roi",
        "0,0,480,320",
    ]);
    let log = String::from_utf8_lossy(&fit.stderr);
    assert!(fit.status.success(), "{log}");
    // 640 × 320 in tiles of 160 (≥ 16 overlap): 5 × 3, of which the region (x < 480) keeps 4 columns; three
    // images train (one is held out).
    assert!(
        log.contains("tiles of 160 px, overlap ≥ 16 px, region of interest of 4 corners (36 model inputs)"),
        "{log}"
    );
    let part = data.join("test/spot/000.png");
    let infer = loupe(&["infer", "--model", text(&model), "--json", "--maps", text(&dir), text(&part)]);
    assert!(infer.status.success(), "{}", String::from_utf8_lossy(&infer.stderr));
    let line: serde_json::Value = serde_json::from_slice(&infer.stdout).unwrap();
    // The tiles' own resolution: 64 of 160 pixels.
    assert_eq!((line["map_size"].as_u64(), line["map_height"].as_u64()), (Some(256), Some(128)), "{line}");
    let bad = loupe(&["fit", "--method", "padim", "--data", text(&data), "--out", text(&model), "--roi", "0,0;5,5"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("3 to 10000 corners, not 2"));
    let _ = std::fs::remove_dir_all(&dir);
}
