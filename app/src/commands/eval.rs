//! `loupe eval --model <model.safetensors> --data <dir> [--json]`

use super::EngineArgs;
use crate::progress_bar::TerminalProgress;
use anyhow::{bail, Result};
use loupe_engine::dataset::layout::FOLDER_TEST_FRACTION;
use loupe_engine::dataset::layout::GOOD;
use loupe_engine::dataset::{scan_folder_layout, scan_mvtec, Benchmark};
use loupe_engine::evaluate::{evaluate, EvalReport};
use loupe_engine::metrics::{ThresholdRule, ThresholdTable};
use loupe_engine::model_file::{self, TrainingInfo};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// An MVTec AD category folder (its test/ and ground_truth/ are used).
    #[arg(long, conflicts_with_all = ["normal", "abnormal"])]
    pub data: Option<PathBuf>,
    /// anomalib Folder shape: folder of normal images (one in five is used for testing; a model fitted on all of
    /// this folder is refused: train it with `fit --normal`).
    #[arg(long, requires = "abnormal")]
    pub normal: Option<PathBuf>,
    /// anomalib Folder shape: folder of defective images.
    #[arg(long, requires = "normal")]
    pub abnormal: Option<PathBuf>,
    /// anomalib Folder shape: folder of masks named like their images.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Choose the decision threshold on this test set's labels (far:RATE, mar:RATE or f1-max) and report at it.
    #[arg(long, value_name = "RULE")]
    pub choose_threshold: Option<ThresholdRule>,
    /// With --choose-threshold: write the chosen threshold into the model file.
    #[arg(long, requires = "choose_threshold")]
    pub save_threshold: bool,
    /// Images per scoring call; throughput is reported at this batch size.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

fn benchmark(args: &EvalArgs) -> Result<Benchmark> {
    match (&args.data, &args.normal, &args.abnormal) {
        (Some(dir), _, _) => scan_mvtec(dir),
        (None, Some(normal), Some(abnormal)) => {
            scan_folder_layout(normal, abnormal, args.mask.as_deref(), FOLDER_TEST_FRACTION)
        }
        _ => bail!("give --data <mvtec folder>, or --normal and --abnormal"),
    }
}

/// Refuses to test a model on Folder-shape good images it trained on: `fit --data DIR` learns every image of
/// DIR, including the one in five `eval --normal DIR` tests.
fn refuse_training_images(args: &EvalArgs, training: &TrainingInfo) -> Result<()> {
    let Some(normal) = &args.normal else { return Ok(()) };
    let same = |a: &Path, b: &Path| a.canonicalize().ok().zip(b.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    if !training.folder_test_held_out && same(normal, Path::new(&training.source)) {
        bail!(
            "{} was fitted on every image of {}, so its test images there would be images it learnt from; fit it \
             with `loupe fit --normal {}` (trains on the images eval --normal does not test)",
            args.model.display(),
            normal.display(),
            normal.display()
        );
    }
    Ok(())
}

fn describe(args: &EvalArgs) -> String {
    args.data.as_ref().or(args.abnormal.as_ref()).map(|p| p.display().to_string()).unwrap_or_default()
}

fn print_human(report: &EvalReport) {
    let optional = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
    println!("method          {}", report.method);
    println!("test images     {} ({} skipped)", report.test_images, report.skipped.len());
    println!("image AUROC     {:.4}", report.image_auroc);
    println!("pixel AUROC     {}", optional(report.pixel_auroc));
    println!("AUPRO@0.3       {}", optional(report.aupro));
    println!("F1-max          {:.4} at threshold {:.4}", report.f1_max, report.f1_threshold);
    match (report.threshold, report.far, report.mar) {
        (Some(t), Some(far), Some(mar)) => {
            println!("threshold       {t:.4}: FAR {:.2} %, MAR {:.2} %", far * 100.0, mar * 100.0)
        }
        _ => println!("threshold       none chosen (fitted without validation images): see --choose-threshold"),
    }
    let c = &report.confusion;
    println!(
        "confusion       defects flagged {} / passed {}; good flagged {} / passed {}",
        c.true_positive, c.false_negative, c.false_positive, c.true_negative
    );
    println!("throughput      {:.1} images/s at batch {}", report.test_images_per_s, report.batch_size);
    println!(
        "{:<14} {:>6} {:>11} {:>11} {:>9} {:>9}",
        "defect type", "images", "image AUROC", "pixel AUROC", "AUPRO", "detected"
    );
    for (name, t) in &report.per_defect_type {
        println!(
            "{:<14} {:>6} {:>11} {:>11} {:>9} {:>8.1}%",
            name,
            t.images,
            optional(t.image_auroc),
            optional(t.pixel_auroc),
            optional(t.aupro),
            t.detected * 100.0
        );
    }
    for skipped in &report.skipped {
        eprintln!("skipped {skipped}");
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let benchmark = benchmark(&args)?;
    let (mut loaded, device) = args.engine.open_model(&args.model)?;
    refuse_training_images(&args, &loaded.manifest.training)?;
    let progress = TerminalProgress::new();
    let mut report =
        evaluate(loaded.model.as_ref(), &loaded.manifest, &benchmark, args.batch_size, &device, &progress)?;
    progress.finish();
    if let Some(rule) = args.choose_threshold {
        let scores: Vec<f32> = report.images.iter().map(|i| i.score).collect();
        let labels: Vec<bool> = report.images.iter().map(|i| i.defect_type != GOOD).collect();
        let table = ThresholdTable::new(&scores, &labels);
        let Some(threshold) = table.threshold_for(rule) else {
            bail!("{rule} needs both good and defective test images");
        };
        report.set_threshold(Some(threshold), &table);
        if args.save_threshold {
            loaded.manifest.thresholds.decision = Some(threshold);
            loaded.manifest.thresholds.rule = format!("{rule} on the labelled test set {}", describe(&args));
            loaded.manifest.thresholds.chosen_by = model_file::ChosenBy::Command;
            model_file::save(&args.model, loaded.model.as_ref(), &loaded.manifest)?;
            eprintln!("threshold {threshold:.4} ({rule}) saved in {}", args.model.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}
