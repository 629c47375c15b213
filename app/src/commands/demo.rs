//! `loupe demo`: the whole job on the embedded synthetic data — generate it, fetch the backbone weights if
//! missing, fit PatchCore, evaluate, print the metrics and write a few heatmaps.

use super::weights::ensure_weights;
use crate::overlay::overlay;
use crate::progress_bar::TerminalProgress;
use anyhow::Result;
use loupe_engine::atomic_file::write_image_atomic;
use loupe_engine::backbone::Backbone;
use loupe_engine::dataset::decode::open_image;
use loupe_engine::dataset::scan_mvtec;
use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
use loupe_engine::dataset::{decode_all, ImageRecord};
use loupe_engine::device::DeviceChoice;
use loupe_engine::evaluate::evaluate;
use loupe_engine::methods::{find_method, images_to_tensor};
use loupe_engine::model_file;
use loupe_engine::pipeline::{fit, FitRequest};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the demo data, model and heatmaps go.
    #[arg(long, default_value = "target/loupe-demo")]
    pub dir: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let data = args.dir.join("data");
    if !data.join("train/good").is_dir() {
        eprintln!("generating the synthetic demo set in {}", data.display());
        generate_mvtec(&data, &SyntheticSpec::demo())?;
    }
    let weights = ensure_weights(None, false)?;
    let device = args.device.open()?;
    let backbone = Arc::new(Backbone::load(&weights, &device)?);
    let mut request = FitRequest::new(find_method("patchcore")?, data.clone());
    request.image_size = 192;
    let progress = TerminalProgress::new();
    let outcome = fit(backbone.clone(), &request, &progress)?;
    let model_path = args.dir.join("demo-patchcore.safetensors");
    model_file::save(&model_path, outcome.model.as_ref(), &outcome.manifest)?;
    let benchmark = scan_mvtec(&data)?;
    let report = evaluate(outcome.model.as_ref(), &outcome.manifest, &benchmark, 8, &device, &progress)?;
    progress.finish();
    println!(
        "PatchCore on the synthetic demo set ({} training images, fit {:.1} s)",
        outcome.manifest.training.images_used, outcome.manifest.training.fit_seconds
    );
    println!("  image AUROC {:.4}", report.image_auroc);
    println!("  pixel AUROC {:.4}", report.pixel_auroc.unwrap_or(f64::NAN));
    println!("  AUPRO@0.3   {:.4}", report.aupro.unwrap_or(f64::NAN));
    println!("  F1-max      {:.4}", report.f1_max);
    if let (Some(threshold), Some(far), Some(mar)) = (report.threshold, report.far, report.mar) {
        println!("  threshold   {threshold:.4}: FAR {:.1} %, MAR {:.1} %", far * 100.0, mar * 100.0);
    }
    let heatmaps = args.dir.join("heatmaps");
    std::fs::create_dir_all(&heatmaps)?;
    let examples: Vec<ImageRecord> =
        benchmark.test.iter().filter(|r| r.label.is_anomalous()).step_by(5).cloned().collect();
    let (decoded, _) = decode_all(&examples, outcome.model.image_size(), &|_| {});
    for image in &decoded {
        let output = outcome.model.score_batch(&images_to_tensor(&[image], &device)?)?.remove(0);
        let record = &examples[image.index];
        if let Ok(original) = open_image(&record.path) {
            let name = format!(
                "{}_{}",
                record.label.type_name(),
                record.path.file_stem().unwrap_or_default().to_string_lossy()
            );
            let heatmap = overlay(&original.to_rgb8(), &output.map, report.threshold);
            write_image_atomic(&heatmaps.join(format!("{name}.png")), &heatmap.into())?;
        }
    }
    println!("model: {}\nheatmaps: {}", model_path.display(), heatmaps.display());
    Ok(())
}
