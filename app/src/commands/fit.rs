//! `loupe fit --method <name> --data <dir> --out <model.safetensors>`

use super::EngineArgs;
use crate::progress_bar::TerminalProgress;
use anyhow::{Context, Result};
use loupe_engine::dataset::layout::{folder_split, require_folder, FOLDER_TEST_FRACTION};
use loupe_engine::dataset::scan_normal_folder;
use loupe_engine::geometry::{InputGeometry, Layout, Region};
use loupe_engine::methods::find_method;
use loupe_engine::model_file;
use loupe_engine::pipeline::{fit_records, FitRequest, DEFAULT_IMAGE_SIZE};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FitArgs {
    /// Method name (see `loupe methods`).
    #[arg(long, default_value = "patchcore")]
    pub method: String,
    /// Folder of normal images (all of them train), or an MVTec AD category folder (its train/good).
    #[arg(long, required_unless_present = "normal", conflicts_with = "normal")]
    pub data: Option<PathBuf>,
    /// anomalib Folder shape: folder of normal images; trains on the four in five that `eval --normal` does not
    /// test.
    #[arg(long)]
    pub normal: Option<PathBuf>,
    /// Where to write the model file.
    #[arg(long)]
    pub out: PathBuf,
    /// PatchCore: fraction of training patches kept in the memory bank.
    #[arg(long)]
    pub coreset_ratio: Option<f64>,
    /// Start from a named setting of the method instead of its default, e.g. `published` (see `loupe methods`).
    #[arg(long)]
    pub preset: Option<String>,
    /// Any method setting, as key=value (value in JSON, e.g. num_neighbors=9). Repeatable; applied over the preset.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
    #[arg(long, default_value_t = DEFAULT_IMAGE_SIZE)]
    pub image_size: u32,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Share of the normal images held out to choose the decision threshold.
    #[arg(long, default_value_t = 0.1)]
    pub validation_fraction: f64,
    /// The threshold is the lowest with at most this false-alarm rate on the held-out normals.
    #[arg(long, default_value_t = 0.01)]
    pub target_far: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Score square tiles of this many pixels of the image itself, each resized to the image size, and stitch
    /// their maps (high-resolution parts: a small defect is not resized away). Tile / image size is the
    /// downscale: `--tile 1024 --image-size 256` sees the part at a quarter of its resolution.
    #[arg(long, conflicts_with = "keep_aspect")]
    pub tile: Option<u32>,
    /// Least overlap of neighbouring tiles, in image pixels (their maps cross-fade over it).
    #[arg(long, default_value_t = 0, requires = "tile")]
    pub overlap: u32,
    /// Score the whole image in one square of its longer side (padded), so a long part is not stretched.
    #[arg(long)]
    pub keep_aspect: bool,
    /// Region of interest in image pixels: `x,y,width,height` or corners `x1,y1;x2,y2;x3,y3;…`. Nothing outside
    /// is trained on or scored.
    #[arg(long, value_name = "REGION")]
    pub roi: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn parse_settings(pairs: &[String]) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut map = serde_json::Map::new();
    for pair in pairs {
        let (key, value) = pair.split_once('=').with_context(|| format!("--set {pair}: expected KEY=VALUE"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        map.insert(key.trim().to_string(), value);
    }
    Ok(map)
}

/// The input geometry the flags ask for.
pub fn geometry(args: &FitArgs) -> Result<InputGeometry> {
    let layout = match (args.tile, args.keep_aspect) {
        (Some(tile), _) => Layout::Tiles { tile, overlap: args.overlap },
        (None, true) => Layout::KeepAspect,
        (None, false) => Layout::Whole,
    };
    let region = args.roi.as_deref().map(Region::parse).transpose()?;
    let geometry = InputGeometry { layout, region };
    geometry.check()?;
    Ok(geometry)
}

pub fn run(args: FitArgs) -> Result<()> {
    let method = find_method(&args.method)?;
    let mut settings = match &args.preset {
        Some(name) => match method.preset(name)? {
            serde_json::Value::Object(values) => values,
            _ => serde_json::Map::new(),
        },
        None => serde_json::Map::new(),
    };
    settings.extend(parse_settings(&args.settings)?);
    if let Some(ratio) = args.coreset_ratio {
        settings.insert("coreset_ratio".into(), ratio.into());
    }
    let source = args.data.clone().or(args.normal.clone()).context("give --data or --normal")?;
    require_folder(&source)?;
    let backbone = args.engine.load_backbone()?;
    let records = match &args.normal {
        Some(normal) => folder_split(normal, FOLDER_TEST_FRACTION)?.train,
        None => scan_normal_folder(&source)?,
    };
    let mut request = FitRequest::new(method, source);
    request.settings = serde_json::Value::Object(settings);
    request.image_size = args.image_size;
    request.batch_size = args.batch_size;
    request.validation_fraction = args.validation_fraction;
    request.target_far = args.target_far;
    request.seed = args.seed;
    request.geometry = geometry(&args)?;
    let progress = TerminalProgress::new();
    let mut outcome = fit_records(backbone, &request, records, &progress)?;
    progress.finish();
    outcome.manifest.training.folder_test_held_out = args.normal.is_some();
    for skipped in &outcome.skipped {
        eprintln!("skipped {skipped}");
    }
    model_file::save(&args.out, outcome.model.as_ref(), &outcome.manifest)?;
    let manifest = &outcome.manifest;
    eprintln!(
        "{} fitted on {} images ({} skipped, {} held out for validation) in {:.1} s; {}{}; threshold {} ({}); saved {}",
        method.title,
        manifest.training.images_used,
        outcome.skipped.len(),
        manifest.validation.count,
        manifest.training.fit_seconds,
        manifest.geometry.describe(),
        if manifest.geometry.is_whole_image() {
            String::new()
        } else {
            format!(" ({} model inputs)", manifest.training.inputs_used)
        },
        manifest.thresholds.decision.map_or("none".to_string(), |t| format!("{t:.4}")),
        manifest.thresholds.rule,
        args.out.display()
    );
    Ok(())
}
