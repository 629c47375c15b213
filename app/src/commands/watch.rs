//! `loupe watch --model <model> --input <folder> [--sort-into <folder>] [--webhook <url>] …`: the line runtime.

use super::EngineArgs;
use anyhow::{bail, Context, Result};
use loupe::line::{self, sinks, Scorer, WatchConfig};
use loupe_engine::backbone::weights::sha256_hex;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct WatchArgs {
    /// The model that decides (a Loupe model file or bundle, with its thresholds).
    #[arg(long)]
    pub model: PathBuf,
    /// The folder the camera drops images into. Only its own files are taken, not its subfolders'.
    #[arg(long)]
    pub input: PathBuf,
    /// Where the results log (`results.jsonl`, one JSON line per image) and the delivery positions live;
    /// default: `<input>/.loupe`.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Move each image into `<dir>/pass|review|reject|unreadable/` once decided.
    #[arg(long)]
    pub sort_into: Option<PathBuf>,
    /// With --sort-into: copy instead of moving.
    #[arg(long, requires = "sort_into")]
    pub copy: bool,
    /// Write a heatmap PNG per image into this folder.
    #[arg(long)]
    pub heatmaps: Option<PathBuf>,
    /// POST each result's JSON line to this URL (a webhook); results wait in the log while it is down.
    #[arg(long)]
    pub webhook: Option<String>,
    /// Publish each result's JSON line to an MQTT topic, QoS 1: mqtt://HOST[:PORT]/TOPIC.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Milliseconds a file's size must hold still when its writer's close is not seen (network shares).
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// The line's image size, WIDTHxHEIGHT: any other size is "unreadable" (the camera or its settings changed).
    #[arg(long, value_parser = parse_size)]
    pub expect_size: Option<(u32, u32)>,
    /// Print a JSON line of statistics every this many seconds (verdicts, latency, score drift).
    #[arg(long)]
    pub stats: Option<f64>,
    /// The score drift (median vs the validation scores, in their standard deviations) that warns.
    #[arg(long, default_value_t = 1.0)]
    pub drift_warning: f32,
    /// Stop after this many seconds without a new image, once every sink is up to date.
    #[arg(long)]
    pub exit_when_idle: Option<f64>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (width, height) = text.split_once(['x', 'X']).ok_or("expected WIDTHxHEIGHT, e.g. 1024x768")?;
    let number = |n: &str| n.trim().parse::<u32>().map_err(|_| format!("{n:?} is not a whole number of pixels"));
    Ok((number(width)?, number(height)?))
}

pub fn run(args: WatchArgs) -> Result<()> {
    if !args.input.is_dir() {
        bail!("{}: no such folder", args.input.display());
    }
    let (loaded, device) = args.engine.open_model(&args.model)?;
    if loaded.manifest.thresholds.decision.is_none() {
        bail!(
            "{} has no decision threshold: choose one (eval --save-threshold) before it runs a line",
            args.model.display()
        );
    }
    // `open_model` read the file within its size bound, so reading it again to hash it is bounded too.
    let hash =
        sha256_hex(&std::fs::read(&args.model).with_context(|| format!("{}: cannot read", args.model.display()))?);
    let config = WatchConfig {
        state_dir: args.state_dir.clone().unwrap_or_else(|| args.input.join(".loupe")),
        input: args.input,
        sort_into: args.sort_into,
        copy: args.copy,
        heatmaps: args.heatmaps,
        settle: Duration::from_millis(args.settle_ms),
        expect_size: args.expect_size,
        stats_every: args.stats.map(Duration::from_secs_f64),
        drift_warning: args.drift_warning,
        exit_when_idle: args.exit_when_idle.map(Duration::from_secs_f64),
        model_id: format!("{}-{}", loaded.manifest.method, &hash[..12]),
    };
    let mut outputs: Vec<Box<dyn sinks::Sink>> = Vec::new();
    if let Some(url) = &args.webhook {
        outputs.push(Box::new(sinks::Webhook::new(url)));
    }
    if let Some(url) = &args.mqtt {
        outputs.push(Box::new(sinks::Mqtt::from_url(url)?));
    }
    let scorer = Scorer { model: loaded.model.as_ref(), manifest: &loaded.manifest, device: &device };
    line::watch(&config, &scorer, outputs)
}
