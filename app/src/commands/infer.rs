//! `loupe infer --model <model.safetensors> <images or folders>… [--out <dir>] [--fail-on review|reject]`

use super::EngineArgs;
use crate::overlay::overlay;
use anyhow::{bail, Context, Result};
use loupe_engine::atomic_file::{write_atomic, write_image_atomic};
use loupe_engine::dataset::decode::open_image;
use loupe_engine::dataset::layout::list_images;
use loupe_engine::geometry::score_file;
use loupe_engine::maps::ScoreMap;
use loupe_engine::model_file::Thresholds;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The exit status when some image reached the `--fail-on` verdict (1 is an error, 2 a usage error).
pub const EXIT_FAILED_PARTS: i32 = 3;

#[derive(clap::Args)]
pub struct InferArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Image files or folders (searched recursively).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Folder for heatmap PNGs, mirroring the inputs' folders (`<path>_heatmap.png`); none written when absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Folder for each image's raw anomaly map: `<n>.f32`, the map's values as little-endian float32, row-major,
    /// `map_size × map_size` (with --json the line names the file and its size). For comparing with an export.
    #[arg(long)]
    pub maps: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 3 when any image is at least this verdict (an unreadable image counts as review).
    #[arg(long, value_enum)]
    pub fail_on: Option<FailOn>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum FailOn {
    Review,
    Reject,
}

/// What the model's thresholds say of one score, as the studio says it.
fn verdict(thresholds: &Thresholds, score: f32) -> &'static str {
    thresholds.verdict(score).map_or("no-threshold", |v| v.name())
}

/// Every image of the inputs with the heatmap path that mirrors it under `out`: below a folder input, its path
/// inside that folder; with several inputs, each under its own name. Two images that would share a heatmap
/// are refused before anything is scored.
fn list_inputs(inputs: &[PathBuf], out: Option<&Path>) -> Result<Vec<(PathBuf, Option<PathBuf>)>> {
    let mut listed = Vec::new();
    for input in inputs {
        let prefix =
            if inputs.len() > 1 { input.file_name().map(PathBuf::from).unwrap_or_default() } else { PathBuf::new() };
        let paths = if input.is_dir() {
            list_images(input)?
        } else if input.is_file() {
            vec![input.clone()]
        } else {
            bail!("{}: no such file or folder", input.display());
        };
        for path in paths {
            let inside = match path.strip_prefix(input) {
                Ok(inside) if !inside.as_os_str().is_empty() => inside.to_path_buf(),
                _ => PathBuf::from(path.file_name().unwrap_or_default()),
            };
            let heatmap = out.map(|out| {
                let stem = inside.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                out.join(&prefix).join(inside.with_file_name(format!("{stem}_heatmap.png")))
            });
            listed.push((path, heatmap));
        }
    }
    let mut owners: HashMap<&Path, &Path> = HashMap::new();
    for (path, heatmap) in &listed {
        if let Some(heatmap) = heatmap {
            if let Some(other) = owners.insert(heatmap, path) {
                bail!(
                    "{} and {} would both write {}: pass their folders in one --out each",
                    other.display(),
                    path.display(),
                    heatmap.display()
                );
            }
        }
    }
    Ok(listed)
}

pub fn run(args: InferArgs) -> Result<i32> {
    let listed = list_inputs(&args.inputs, args.out.as_deref())?;
    let (loaded, device) = args.engine.open_model(&args.model)?;
    let (model, manifest) = (loaded.model, loaded.manifest);
    if args.fail_on.is_some() && manifest.thresholds.decision.is_none() {
        bail!("--fail-on needs a threshold, and {} has none: choose one (eval --save-threshold)", args.model.display());
    }
    let thresholds = &manifest.thresholds;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let (mut scored, mut skipped) = (0usize, 0usize);
    for (index, (path, heatmap)) in listed.iter().enumerate() {
        let output = match score_file(model.as_ref(), &manifest.geometry, path, 8, &device) {
            Ok((_, output)) => output,
            Err(reason) => {
                eprintln!("skipped {}: {reason}", path.display());
                skipped += 1;
                continue;
            }
        };
        scored += 1;
        let verdict = verdict(thresholds, output.score);
        *counts.entry(verdict).or_default() += 1;
        let map_file = match &args.maps {
            Some(folder) => {
                let file = folder.join(format!("{index}.f32"));
                let bytes: Vec<u8> = output.map.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                write_atomic(&file, &bytes)?;
                Some(file.display().to_string())
            }
            None => None,
        };
        if args.json {
            let mut line =
                serde_json::json!({"path": path.display().to_string(), "score": output.score, "verdict": verdict});
            if let Some(file) = map_file {
                line["map_file"] = file.into();
                line["map_size"] = output.map.width.into();
                line["map_height"] = output.map.height.into();
            }
            println!("{line}");
        } else {
            println!("{:>10.4}  {:<12}  {}", output.score, verdict, path.display());
        }
        if let Some(target) = heatmap {
            write_heatmap(target, path, &output.map, thresholds.decision)?;
        }
    }
    let count = |verdict: &str| counts.get(verdict).copied().unwrap_or(0);
    eprintln!(
        "{} images scored: {} pass, {} review, {} reject (threshold {}{}), {} skipped",
        scored,
        count("pass"),
        count("review"),
        count("reject"),
        thresholds.decision.map_or("none".to_string(), |t| format!("{t:.4}")),
        thresholds.review.map_or(String::new(), |r| format!(", review from {r:.4}")),
        skipped
    );
    let failed = match args.fail_on {
        None => false,
        Some(FailOn::Reject) => count("reject") > 0,
        Some(FailOn::Review) => count("reject") + count("review") + skipped > 0,
    };
    Ok(if failed { EXIT_FAILED_PARTS } else { 0 })
}

fn write_heatmap(target: &Path, path: &Path, map: &ScoreMap, threshold: Option<f32>) -> Result<()> {
    let original = open_image(path).map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?.to_rgb8();
    if let Some(folder) = target.parent() {
        std::fs::create_dir_all(folder).with_context(|| format!("{}: cannot create", folder.display()))?;
    }
    write_image_atomic(target, &overlay(&original, map, threshold).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_review_band() {
        let thresholds =
            Thresholds { decision: Some(2.0), review: Some(1.0), rule: String::new(), chosen_by: Default::default() };
        assert_eq!(verdict(&thresholds, 0.5), "pass");
        assert_eq!(verdict(&thresholds, 1.0), "review");
        assert_eq!(verdict(&thresholds, 2.0), "reject");
        let no_band = Thresholds { review: None, ..thresholds.clone() };
        assert_eq!(verdict(&no_band, 1.5), "pass");
        assert_eq!(verdict(&Thresholds { decision: None, ..thresholds }, 9.0), "no-threshold");
    }

    #[test]
    fn heatmaps_mirror_the_input_folders_and_never_collide() {
        let dir = std::env::temp_dir().join(format!("loupe-infer-list-{}", std::process::id()));
        for folder in ["lineA/cam", "lineB/cam"] {
            std::fs::create_dir_all(dir.join(folder)).unwrap();
            image::RgbImage::new(4, 4).save(dir.join(folder).join("001.png")).unwrap();
        }
        let out = Path::new("/out");
        let listed = list_inputs(std::slice::from_ref(&dir), Some(out)).unwrap();
        let heatmaps: Vec<PathBuf> = listed.into_iter().filter_map(|(_, h)| h).collect();
        assert_eq!(heatmaps.len(), 2);
        assert!(heatmaps.contains(&out.join("lineA/cam/001_heatmap.png")), "{heatmaps:?}");
        assert!(heatmaps.contains(&out.join("lineB/cam/001_heatmap.png")), "{heatmaps:?}");
        // Two inputs whose images would share a name: each under its own name, or refused.
        let two = [dir.join("lineA"), dir.join("lineB")];
        let heatmaps: Vec<PathBuf> = list_inputs(&two, Some(out)).unwrap().into_iter().filter_map(|(_, h)| h).collect();
        assert!(heatmaps.contains(&out.join("lineA/cam/001_heatmap.png")), "{heatmaps:?}");
        let same_name = [dir.join("lineA/cam"), dir.join("lineB/cam")];
        let message = list_inputs(&same_name, Some(out)).unwrap_err().to_string();
        assert!(message.contains("would both write"), "{message}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
