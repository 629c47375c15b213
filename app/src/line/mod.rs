//! The line runtime behind `loupe watch`: scores every image a camera drops into a folder, once, in arrival
//! order, also across restarts; logs each decision as a JSON line; sorts the images into verdict folders; and
//! sends the results on to sinks (webhook, MQTT) that may come and go.
//!
//! Order of work per image, chosen so that a kill at any point loses nothing and decides nothing twice:
//! heatmap and copy (both idempotent: redone after a kill) → the log line (the commit) → the move out of the
//! inbox (finished on restart from the logged verdict) → the sinks (delivered from the log).

pub mod inbox;
pub mod results_log;
pub mod sinks;
pub mod stats;

use crate::overlay::overlay;
use anyhow::{Context, Result};
use candle_core::Device;
use inbox::{Arrival, Inbox};
use loupe_engine::atomic_file::{copy_atomic, write_image_atomic};
use loupe_engine::dataset::decode::open_image;
use loupe_engine::geometry::score_file;
use loupe_engine::maps::ScoreMap;
use loupe_engine::methods::AnomalyModel;
use loupe_engine::model_file::Manifest;
use results_log::ResultsLog;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The verdict of an image that could not be scored (not an image, truncated, the wrong size).
pub const UNREADABLE: &str = "unreadable";

/// What `loupe watch` does with each image.
pub struct WatchConfig {
    pub input: PathBuf,
    /// Holds the results log (`results.jsonl`), the sinks' positions in it, and `unreadable/` when the images
    /// are not sorted.
    pub state_dir: PathBuf,
    /// Sort images into `<dir>/pass|review|reject|unreadable/`.
    pub sort_into: Option<PathBuf>,
    /// Copy into the sort folders instead of moving (the inbox keeps every image).
    pub copy: bool,
    /// Write `<dir>/<stem>_heatmap.png` for every image scored.
    pub heatmaps: Option<PathBuf>,
    /// How long a file's size and time must hold still when its writer's close was not seen.
    pub settle: Duration,
    /// Images of another size (width, height) are unreadable: the camera or its settings changed.
    pub expect_size: Option<(u32, u32)>,
    pub stats_every: Option<Duration>,
    /// Warn when the median score moves by more than this many standard deviations of the validation scores.
    pub drift_warning: f32,
    /// Stop once nothing arrived for this long and every sink is up to date (batch runs, tests).
    pub exit_when_idle: Option<Duration>,
    /// Names the model in every result (method and the start of the model file's SHA-256).
    pub model_id: String,
}

/// The model that decides.
pub struct Scorer<'a> {
    pub model: &'a dyn AnomalyModel,
    pub manifest: &'a Manifest,
    pub device: &'a Device,
}

/// One image's outcome before it is logged.
struct Decision {
    score: Option<f32>,
    map: Option<ScoreMap>,
    verdict: &'static str,
    reason: Option<String>,
    scoring_ms: f64,
}

/// Runs until `exit_when_idle` says so (or forever): see the module's documentation.
pub fn watch(config: &WatchConfig, scorer: &Scorer, sinks: Vec<Box<dyn sinks::Sink>>) -> Result<()> {
    let log_path = config.state_dir.join("results.jsonl");
    let (mut log, recovered) = ResultsLog::open(&log_path)?;
    if recovered.torn_tail_bytes > 0 {
        eprintln!(
            "{}: cut a torn last line ({} bytes); that image is scored again",
            log_path.display(),
            recovered.torn_tail_bytes
        );
    }
    if recovered.unreadable_lines > 0 {
        eprintln!("{}: {} lines are not JSON; skipped", log_path.display(), recovered.unreadable_lines);
    }
    let mut decided = recovered.decided;
    let stop = Arc::new(AtomicBool::new(false));
    let deliveries: Vec<sinks::Delivery> =
        sinks.into_iter().map(|sink| sinks::start(sink, &log_path, stop.clone())).collect();
    let mut inbox = Inbox::open(&config.input, config.settle)?;
    let mut stats = stats::Window::new(&scorer.manifest.validation, config.drift_warning);
    let mut last_stats = Instant::now();
    let mut last_arrival = Instant::now();
    eprintln!(
        "watching {} with {} ({} images already decided); results in {}",
        config.input.display(),
        config.model_id,
        decided.len(),
        log_path.display()
    );
    let moving = config.sort_into.is_some() && !config.copy;
    loop {
        let wait =
            if inbox.has_pending() { config.settle.min(Duration::from_millis(50)) } else { Duration::from_millis(250) };
        // Decided images still in the inbox are skipped, except when moving: then a kill came between the log
        // and the move, which is finished now.
        let arrivals = inbox.complete(wait, |arrival| !moving && decided.contains_key(&arrival.id()))?;
        for arrival in arrivals {
            last_arrival = Instant::now();
            if let Some(verdict) = decided.get(&arrival.id()) {
                let verdict = verdict.clone();
                route(config, &arrival.path, &verdict)?;
                continue;
            }
            let decision = decide(config, scorer, &arrival);
            if let Some(heatmaps) = &config.heatmaps {
                // Written before the log line: after a kill it is written again, whole.
                if let Err(error) = write_heatmap(heatmaps, &arrival.path, &decision, scorer.manifest) {
                    eprintln!("{}: no heatmap: {error:#}", arrival.path.display());
                }
            }
            if config.copy {
                route(config, &arrival.path, decision.verdict)?;
            }
            let latency_ms = SystemTime::now().duration_since(arrival.modified).unwrap_or_default().as_secs_f64() * 1e3;
            let record = result_record(config, scorer.manifest, &arrival, &decision, latency_ms);
            log.append(&record)?;
            decided.insert(arrival.id(), decision.verdict.to_string());
            if moving || decision.verdict == UNREADABLE {
                route(config, &arrival.path, decision.verdict)?;
            }
            for delivery in &deliveries {
                delivery.wake();
            }
            stats.add(decision.score, decision.verdict, latency_ms);
        }
        if let Some(every) = config.stats_every {
            if last_stats.elapsed() >= every {
                eprintln!("{}", stats.report(last_stats.elapsed()));
                stats.clear();
                last_stats = Instant::now();
            }
        }
        if let Some(idle) = config.exit_when_idle {
            if !inbox.has_pending() && last_arrival.elapsed() >= idle {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for delivery in deliveries {
        delivery.join();
    }
    Ok(())
}

fn decide(config: &WatchConfig, scorer: &Scorer, arrival: &Arrival) -> Decision {
    let started = Instant::now();
    let outcome = (|| -> Result<(f32, ScoreMap), String> {
        let batch_size = 8;
        let (original_size, output) =
            score_file(scorer.model, &scorer.manifest.geometry, &arrival.path, batch_size, scorer.device)?;
        if let Some((width, height)) = config.expect_size {
            if original_size != (width, height) {
                let (w, h) = original_size;
                return Err(format!("{w}×{h} pixels where the line's images are {width}×{height}"));
            }
        }
        Ok((output.score, output.map))
    })();
    let scoring_ms = started.elapsed().as_secs_f64() * 1e3;
    match outcome {
        Ok((score, map)) => {
            let verdict = scorer.manifest.thresholds.verdict(score).map_or("no-threshold", |v| v.name());
            Decision { score: Some(score), map: Some(map), verdict, reason: None, scoring_ms }
        }
        Err(reason) => Decision { score: None, map: None, verdict: UNREADABLE, reason: Some(reason), scoring_ms },
    }
}

fn result_record(
    config: &WatchConfig,
    manifest: &Manifest,
    arrival: &Arrival,
    decision: &Decision,
    latency_ms: f64,
) -> serde_json::Value {
    serde_json::json!({
        "id": arrival.id(),
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "file": arrival.file_name(),
        "score": decision.score,
        "verdict": decision.verdict,
        "reason": decision.reason,
        "model": config.model_id,
        "decision_threshold": manifest.thresholds.decision,
        "review_threshold": manifest.thresholds.review,
        "latency_ms": latency_ms,
        "scoring_ms": decision.scoring_ms,
    })
}

/// Moves (or copies) the image into its verdict's folder; a name already there gets a number.
fn route(config: &WatchConfig, path: &Path, verdict: &str) -> Result<()> {
    let folder = match &config.sort_into {
        Some(dir) => dir.join(verdict),
        None if verdict == UNREADABLE => config.state_dir.join(UNREADABLE),
        None => return Ok(()),
    };
    std::fs::create_dir_all(&folder).with_context(|| format!("{}: cannot create", folder.display()))?;
    if config.copy && verdict != UNREADABLE {
        // A copy redone after a kill (same name, same length) replaces its first try instead of adding "-2".
        let same = folder.join(path.file_name().unwrap_or_default());
        let redo =
            std::fs::metadata(&same).ok().zip(std::fs::metadata(path).ok()).is_some_and(|(a, b)| a.len() == b.len());
        return copy_atomic(path, &if redo { same } else { free_name(&folder, path) });
    }
    let target = free_name(&folder, path);
    if std::fs::rename(path, &target).is_err() {
        // Another file system: copy, then remove.
        copy_atomic(path, &target)?;
        std::fs::remove_file(path).with_context(|| format!("{}: cannot remove after copying", path.display()))?;
    }
    Ok(())
}

/// `folder/<name>`, or `folder/<stem>-2.<ext>`, … when a file of that name is there (a camera that reuses
/// names after a restart).
fn free_name(folder: &Path, path: &Path) -> PathBuf {
    let name = PathBuf::from(path.file_name().unwrap_or_default());
    let target = folder.join(&name);
    if !target.exists() {
        return target;
    }
    let stem = name.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let extension = name.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    (2..).map(|n| folder.join(format!("{stem}-{n}{extension}"))).find(|p| !p.exists()).expect("a free name")
}

fn write_heatmap(folder: &Path, path: &Path, decision: &Decision, manifest: &Manifest) -> Result<()> {
    let Some(map) = &decision.map else { return Ok(()) };
    let original = open_image(path).map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?.to_rgb8();
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    std::fs::create_dir_all(folder).with_context(|| format!("{}: cannot create", folder.display()))?;
    let target = folder.join(format!("{stem}_heatmap.png"));
    write_image_atomic(&target, &overlay(&original, map, manifest.thresholds.decision).into())
}
