//! The `loupe` command line as scripts use it: fit → eval --json → infer, and its errors.

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
