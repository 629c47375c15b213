//! Input geometries end to end (issue 20): a method fitted on tiles of high-resolution parts finds defects too
//! small for the whole resized image, its model file keeps the geometry and scores the same after loading, and
//! a region of interest keeps what lies outside it from scoring.

use candle_core::Device;
use loupe_engine::backbone::{weights, Backbone};
use loupe_engine::dataset::highres::{generate_highres, HighResSpec};
use loupe_engine::dataset::scan_mvtec;
use loupe_engine::evaluate::evaluate;
use loupe_engine::geometry::{score_file, InputGeometry, Layout, Region};
use loupe_engine::methods::find_method;
use loupe_engine::model_file;
use loupe_engine::pipeline::{fit, FitRequest};
use loupe_engine::progress::NoProgress;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loupe-geometry-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn backbone() -> Arc<Backbone> {
    Arc::new(Backbone::load(&weights::default_weights_path(), &Device::Cpu).unwrap_or_else(|e| panic!("{e:#}")))
}

/// 1024×512 parts with defects of 0.006–0.015 % of the image (30–80 pixels: a spot 6–10 pixels across, a
/// scratch 2–3 wide and 10–30 long). Resized whole to 96², a spot is under a pixel; in a 192-pixel tile at 96²
/// it is 3–5.
fn small_parts(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let spec = HighResSpec {
        train_good: 8,
        test_good: 6,
        test_per_defect: 3,
        min_defect_area: 6e-5,
        max_defect_area: 1.5e-4,
        ..HighResSpec::camera(3, 1024, 512)
    };
    generate_highres(&data, &spec).unwrap();
    data
}

fn fit_padim(backbone: &Arc<Backbone>, data: &Path, geometry: InputGeometry) -> loupe_engine::pipeline::FitOutcome {
    let mut request = FitRequest::new(find_method("padim").unwrap(), data.to_path_buf());
    request.image_size = 96;
    request.geometry = geometry;
    fit(backbone.clone(), &request, &NoProgress).unwrap()
}

#[test]
fn tiles_find_defects_that_resizing_loses_and_the_model_file_keeps_them() {
    let dir = temp_dir("tiles");
    let data = small_parts(&dir);
    let backbone = backbone();
    let benchmark = scan_mvtec(&data).unwrap();

    let whole = fit_padim(&backbone, &data, InputGeometry::default());
    let whole_report =
        evaluate(whole.model.as_ref(), &whole.manifest, &benchmark, 8, &Device::Cpu, &NoProgress).unwrap();

    let geometry = InputGeometry::tiles(192, 32);
    let tiled = fit_padim(&backbone, &data, geometry.clone());
    assert_eq!(tiled.manifest.geometry, geometry);
    assert_eq!(tiled.manifest.format_version, model_file::FORMAT_VERSION, "a tiled model needs a reader that tiles");
    assert_eq!(whole.manifest.format_version, 1, "a whole-image model still opens in every earlier Loupe");
    let training = &tiled.manifest.training;
    // 1024×512 in tiles of 192 with ≥ 32 overlap: 7 × 3 tiles per image.
    assert_eq!(training.inputs_used, 21 * training.images_used, "{training:?}");
    let report = evaluate(tiled.model.as_ref(), &tiled.manifest, &benchmark, 8, &Device::Cpu, &NoProgress).unwrap();
    eprintln!(
        "whole: image {:.3} pixel {:?}; tiles: image {:.3} pixel {:?} AUPRO {:?}",
        whole_report.image_auroc, whole_report.pixel_auroc, report.image_auroc, report.pixel_auroc, report.aupro
    );
    assert!(report.image_auroc >= 0.9, "tiled image AUROC {}", report.image_auroc);
    assert!(
        report.image_auroc > whole_report.image_auroc + 0.1,
        "tiles {} vs whole {}",
        report.image_auroc,
        whole_report.image_auroc
    );
    assert!(report.pixel_auroc.unwrap() > 0.9, "tiled pixel AUROC {:?}", report.pixel_auroc);

    // The ONNX export scores one tile and carries the geometry for the runtime that cuts the frames.
    let mut manifest = tiled.manifest.clone();
    manifest.thresholds.decision = manifest.thresholds.decision.or(Some(1.0));
    let exported = loupe_engine::onnx::export(tiled.model.as_ref(), &manifest, Default::default()).unwrap();
    let onnx_path = dir.join("tiled.onnx");
    exported.write(&onnx_path, Default::default()).unwrap();
    let metadata: std::collections::HashMap<String, String> =
        loupe_engine::onnx::read_metadata(&onnx_path).unwrap().into_iter().collect();
    assert_eq!(serde_json::from_str::<InputGeometry>(&metadata["loupe.geometry"]).unwrap(), geometry);
    assert!(metadata["loupe.geometry_use"].contains("tiles of 192 px"), "{}", metadata["loupe.geometry_use"]);

    // Saved and loaded, the model tiles the same way and scores the same.
    let path = dir.join("tiled.safetensors");
    model_file::save(&path, tiled.model.as_ref(), &tiled.manifest).unwrap();
    let loaded = model_file::load(&path, backbone).unwrap();
    assert_eq!(loaded.manifest, tiled.manifest);
    for record in benchmark.test.iter().take(4) {
        let (size, before) = score_file(tiled.model.as_ref(), &geometry, &record.path, 8, &Device::Cpu).unwrap();
        let (_, after) =
            score_file(loaded.model.as_ref(), &loaded.manifest.geometry, &record.path, 8, &Device::Cpu).unwrap();
        assert_eq!(size, (1024, 512));
        assert_eq!((before.map.width, before.map.height), (512, 256), "the tiles' own resolution: 96 of 192");
        assert_eq!(before.score, after.score);
        assert_eq!(before.map, after.map);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn outside_the_region_of_interest_nothing_trains_or_scores() {
    let dir = temp_dir("region");
    let data = small_parts(&dir);
    let backbone = backbone();
    // The left half only: a part of the image the defects of the right half cannot alarm.
    let region = Region::rectangle(0.0, 0.0, 512.0, 512.0);
    let geometry = InputGeometry { layout: Layout::Tiles { tile: 192, overlap: 32 }, region: Some(region.clone()) };
    let outcome = fit_padim(&backbone, &data, geometry.clone());
    let training = &outcome.manifest.training;
    assert!(training.inputs_used < 21 * training.images_used, "tiles outside the region are not trained on");
    let benchmark = scan_mvtec(&data).unwrap();
    let mask = region.mask(512, 256, 0.5);
    for record in benchmark.test.iter().filter(|r| r.label.is_anomalous()) {
        let (_, output) = score_file(outcome.model.as_ref(), &geometry, &record.path, 8, &Device::Cpu).unwrap();
        let inside = output.map.data.iter().zip(&mask).filter(|(_, &m)| m == 1).map(|(v, _)| *v);
        let inside_max = inside.fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(output.score, inside_max, "{}: the score is the map's maximum inside", record.path.display());
        let outside_max = output
            .map
            .data
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m == 0)
            .map(|(v, _)| *v)
            .fold(f32::NEG_INFINITY, f32::max);
        let inside_min =
            output.map.data.iter().zip(&mask).filter(|(_, &m)| m == 1).map(|(v, _)| *v).fold(f32::INFINITY, f32::min);
        assert_eq!(outside_max, inside_min, "outside the region the map is its lowest value inside");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn kept_aspect_ratio_scores_a_long_part_in_one_padded_square() {
    let dir = temp_dir("aspect");
    let data = small_parts(&dir);
    let outcome = fit_padim(&backbone(), &data, InputGeometry { layout: Layout::KeepAspect, region: None });
    let record = &scan_mvtec(&data).unwrap().test[0];
    let (_, output) =
        score_file(outcome.model.as_ref(), &outcome.manifest.geometry, &record.path, 8, &Device::Cpu).unwrap();
    assert_eq!((output.map.width, output.map.height), (96, 48), "the map keeps the part's 2:1 shape");
    assert!(output.score.is_finite());
    std::fs::remove_dir_all(dir).unwrap();
}
