//! `loupe export --model <model.safetensors> --format onnx --out <model.onnx>`; `--format loupe-bundle` (the model
//! file with its backbone weights inside); `--format triton --out REPO/` (a Triton model repository entry);
//! `loupe export --show <model.onnx>`

use super::EngineArgs;
use anyhow::{Context, Result};
use loupe_engine::backbone::weights::{default_weights_path, read_weights};
use loupe_engine::model_file;
use loupe_engine::onnx::triton::{self, TritonOptions};
use loupe_engine::onnx::{self, ThresholdInputs, WeightPlacement};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The Loupe model file to export.
    #[arg(long, required_unless_present = "show")]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "onnx")]
    pub format: Format,
    /// Where to write the exported file (for `triton`: the model repository folder).
    #[arg(long, required_unless_present = "show")]
    pub out: Option<PathBuf>,
    /// `triton`: the model's name in the repository (default: the model file's name).
    #[arg(long)]
    pub name: Option<String>,
    /// `triton`: largest batch the dynamic batcher forms.
    #[arg(long, default_value_t = 8)]
    pub max_batch_size: usize,
    /// `triton`: how long the dynamic batcher waits to fill a batch, in microseconds.
    #[arg(long, default_value_t = 2000)]
    pub max_queue_delay_us: u64,
    /// Threshold inputs every call must feed (no defaults), for runtimes that fold inputs with defaults into
    /// constants (OpenVINO); the tuned values are in the metadata.
    #[arg(long)]
    pub required_thresholds: bool,
    /// Write the weights to `<out>.data` beside the model (ONNX external data) instead of inside it; exports
    /// above 2 GB do so without being asked.
    #[arg(long)]
    pub external_data: bool,
    /// Print the metadata (the Loupe manifest: method, settings, thresholds, …) of an exported ONNX file.
    #[arg(long, conflicts_with_all = ["model", "out"])]
    pub show: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Format {
    /// ONNX (opset 18): uint8 frames in; anomaly map, score and verdict out; thresholds as inputs with the tuned
    /// defaults; backbone weights and preprocessing inside.
    Onnx,
    /// The Loupe model file with the backbone weights inside: `loupe infer` / `eval` run it on a machine where
    /// `loupe weights fetch` never ran.
    LoupeBundle,
    /// An NVIDIA Triton Inference Server model repository entry: `OUT/<name>/config.pbtxt` (ONNX Runtime
    /// backend, dynamic batching) and `OUT/<name>/1/model.onnx`, thresholds as constants of the graph.
    Triton,
}

pub fn run(args: ExportArgs) -> Result<()> {
    if let Some(path) = &args.show {
        for (key, value) in onnx::read_metadata(path)? {
            println!("{key}: {value}");
        }
        return Ok(());
    }
    let (Some(model_path), Some(out)) = (&args.model, &args.out) else { unreachable!("clap requires both") };
    let started = Instant::now();
    let (loaded, _) = args.engine.open_model(model_path)?;
    if let Format::LoupeBundle = args.format {
        let weights_path = args.engine.weights.clone().unwrap_or_else(default_weights_path);
        model_file::save_bundle(out, loaded.model.as_ref(), &loaded.manifest, &read_weights(&weights_path)?)?;
        let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or_default();
        println!(
            "{}: the model and its backbone weights, {:.1} MB, in {:.2} s",
            out.display(),
            size as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    if let Format::Triton = args.format {
        let stem = model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let options = TritonOptions {
            name: args.name.clone().unwrap_or_else(|| triton::model_name(&stem)),
            max_batch_size: args.max_batch_size,
            max_queue_delay_us: args.max_queue_delay_us,
        };
        let written = triton::write_repository(loaded.model.as_ref(), &loaded.manifest, out, &options)
            .with_context(|| format!("{}: cannot export for Triton", model_path.display()))?;
        println!(
            "{}: Triton model `{}` (config.pbtxt, 1/model.onnx: {:.1} MB), dynamic batching up to {}, in {:.2} s",
            written.folder.display(),
            options.name,
            written.onnx.total_bytes() as f64 / 1e6,
            options.max_batch_size,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let thresholds = if args.required_thresholds { ThresholdInputs::Required } else { ThresholdInputs::WithDefaults };
    let exported = onnx::export(loaded.model.as_ref(), &loaded.manifest, thresholds)
        .with_context(|| format!("{}: cannot export", model_path.display()))?;
    let (nodes, weight_bytes) = (exported.nodes, exported.weight_bytes);
    let placement = if args.external_data { WeightPlacement::External } else { WeightPlacement::Auto };
    let written = exported.write(out, placement)?;
    let external = match &written.external_data {
        Some((path, _)) => format!(" (weights in {})", path.display()),
        None => String::new(),
    };
    println!(
        "{}: {nodes} nodes, {:.1} MB of weights, {:.1} MB in all{external}, in {:.2} s",
        out.display(),
        weight_bytes as f64 / 1e6,
        written.total_bytes() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
