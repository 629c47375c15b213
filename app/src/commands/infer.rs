//! `loupe infer --model <model.safetensors> <images or folders>… [--out <dir>]`

use super::EngineArgs;
use crate::overlay::overlay;
use anyhow::{bail, Context, Result};
use loupe_engine::dataset::decode::open_image;
use loupe_engine::dataset::layout::list_images;
use loupe_engine::dataset::{decode_all, ImageRecord};
use loupe_engine::maps::ScoreMap;
use loupe_engine::methods::images_to_tensor;
use loupe_engine::model_file;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InferArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Image files or folders (searched recursively).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Folder for heatmap PNGs (`<name>_heatmap.png`); none written when absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: InferArgs) -> Result<()> {
    let mut paths = Vec::new();
    for input in &args.inputs {
        if input.is_dir() {
            paths.extend(list_images(input)?);
        } else if input.is_file() {
            paths.push(input.clone());
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    let backbone = args.engine.load_backbone()?;
    let device = backbone.device.clone();
    let loaded = model_file::load(&args.model, backbone)?;
    let (model, manifest) = (loaded.model, loaded.manifest);
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    }
    let records: Vec<ImageRecord> = paths.into_iter().map(ImageRecord::normal).collect();
    let (decoded, skipped) = decode_all(&records, model.image_size(), &|_| {});
    for skip in &skipped {
        eprintln!("skipped {skip}");
    }
    let threshold = manifest.thresholds.decision;
    let mut flagged = 0;
    for image in &decoded {
        let output = model.score_batch(&images_to_tensor(&[image], &device)?)?.remove(0);
        let path = &records[image.index].path;
        let verdict = match threshold {
            Some(t) if output.score >= t => "defect",
            Some(_) => "good",
            None => "no-threshold",
        };
        flagged += usize::from(verdict == "defect");
        if args.json {
            let line =
                serde_json::json!({"path": path.display().to_string(), "score": output.score, "verdict": verdict});
            println!("{line}");
        } else {
            println!("{:>10.4}  {:<6}  {}", output.score, verdict, path.display());
        }
        if let Some(out) = &args.out {
            write_heatmap(out, path, &output.map, threshold)?;
        }
    }
    eprintln!(
        "{} images scored ({} flagged at threshold {}), {} skipped",
        decoded.len(),
        flagged,
        threshold.map_or("none".to_string(), |t| format!("{t:.4}")),
        skipped.len()
    );
    Ok(())
}

fn write_heatmap(out: &std::path::Path, path: &std::path::Path, map: &ScoreMap, threshold: Option<f32>) -> Result<()> {
    let original = open_image(path).map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?.to_rgb8();
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let target = out.join(format!("{stem}_heatmap.png"));
    overlay(&original, map, threshold).save(&target).with_context(|| format!("{}: cannot write", target.display()))
}
