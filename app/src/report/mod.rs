//! The report a quality engineer sends after the meeting: one self-contained HTML file (images embedded, plots
//! as inline SVG, no network) that says what was trained on what, where the thresholds are and why, what they
//! cost in false alarms and missed defects, and shows the worst misses and false alarms with their heatmaps.
//! [`gather`] computes everything from a project and its model files; [`html::render`] lays it out. The CLI
//! (`loupe report`) and the studio (Project ▸ Export report) both call [`write`].

pub mod html;
mod plots;

use crate::overlay::overlay;
use crate::project::sources::{source_records, Split};
use crate::project::verdict::{band_counts, BandCounts};
use crate::project::{resolve, ModelEntry, Project};
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use candle_core::Device;
use image::imageops::FilterType;
use image::RgbImage;
use loupe_engine::atomic_file::write_atomic;
use loupe_engine::dataset::decode::open_image;
use loupe_engine::dataset::layout::GOOD;
use loupe_engine::dataset::{decode_all, Benchmark, ImageRecord};
use loupe_engine::evaluate::{evaluate, EvalReport, ImageResult};
use loupe_engine::methods::{find_method, images_to_tensor};
use loupe_engine::metrics::{roc_curve, Confusion, ThresholdTable};
use loupe_engine::model_file::{ChosenBy, LoadedModel};
use loupe_engine::progress::Progress;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Worst misses and worst false alarms shown per evaluation, each as an image + heatmap pair.
pub const EXAMPLES_PER_KIND: usize = 4;
/// Longest side of an embedded image: enough to see a defect on a printed page, small enough that the report
/// of a 500-image project stays under a megabyte.
const EXAMPLE_SIDE: u32 = 240;
const JPEG_QUALITY: u8 = 82;

/// Opens a model file with its backbone (the CLI and the studio each know where their backbone comes from).
pub type OpenModel<'a> = &'a dyn Fn(&Path) -> Result<LoadedModel>;

/// Everything the report shows, computed.
pub struct Report {
    pub project_name: String,
    pub written_at: String,
    pub model: ModelFacts,
    pub thresholds: ThresholdFacts,
    pub sections: Vec<EvaluationSection>,
    /// Every model of the project on every category it was evaluated on (empty with a single model).
    pub comparison: Vec<ComparisonRow>,
}

pub struct ModelFacts {
    pub name: String,
    pub method: String,
    pub family: String,
    pub summary: String,
    pub settings: String,
    pub training_source: String,
    pub images_used: usize,
    pub images_skipped: usize,
    pub fit_seconds: f64,
    pub image_size: u32,
    pub file_name: String,
    pub sha256: String,
    pub file_date: String,
    pub trained_with: String,
}

pub struct ThresholdFacts {
    pub decision: Option<f32>,
    pub review: Option<f32>,
    /// How the decision threshold was chosen, in words.
    pub rule: String,
}

pub struct EvaluationSection {
    pub category: String,
    pub report: EvalReport,
    pub good: usize,
    pub defective: usize,
    /// The threshold the counts below are at: the decision threshold, else the F1-max one.
    pub shown_at: f32,
    pub at_decision: bool,
    pub confusion: Confusion,
    /// Pass / review / reject counts when the model has a review band.
    pub bands: Option<BandCounts>,
    pub roc_svg: String,
    pub trade_off_svg: String,
    pub histogram_svg: String,
    pub misses: Vec<Example>,
    pub false_alarms: Vec<Example>,
    /// The highest-scoring defects caught: what a rejected part looks like to the model.
    pub caught: Vec<Example>,
}

pub struct Example {
    pub file: String,
    pub defect_type: String,
    pub score: f32,
    /// JPEG images as base64, or why the image could not be shown.
    pub pictures: Result<(String, String), String>,
}

pub struct ComparisonRow {
    pub model: String,
    pub method: String,
    pub family: String,
    pub category: String,
    pub image_auroc: f64,
    pub pixel_auroc: Option<f64>,
    pub aupro: Option<f64>,
    pub threshold: Option<f32>,
    pub far: Option<f64>,
    pub mar: Option<f64>,
    pub fit_seconds: f64,
    pub images_per_s: f64,
}

/// The model a report is about: the one named, else the project's active model, else its last.
pub fn chosen_model<'a>(project: &'a Project, name: Option<&str>) -> Result<&'a ModelEntry> {
    match name {
        Some(name) => project.models.iter().find(|m| m.name == name).with_context(|| {
            let names: Vec<&str> = project.models.iter().map(|m| m.name.as_str()).collect();
            format!("the project has no model named {name:?} (it has: {})", names.join(", "))
        }),
        None => project.active().or(project.models.last()).context("the project has no trained model to report on"),
    }
}

/// Writes the report of `model` (see [`chosen_model`]) to `out`, atomically; returns its size in bytes.
pub fn write(
    project: &Project,
    project_dir: &Path,
    model: Option<&str>,
    (open_model, device): (OpenModel, &Device),
    out: &Path,
    progress: &dyn Progress,
) -> Result<usize> {
    let report = gather(project, project_dir, model, (open_model, device), progress)?;
    let text = html::render(&report);
    write_atomic(out, text.as_bytes()).with_context(|| format!("{}: cannot write the report", out.display()))?;
    Ok(text.len())
}

pub fn gather(
    project: &Project,
    project_dir: &Path,
    model: Option<&str>,
    (open_model, device): (OpenModel, &Device),
    progress: &dyn Progress,
) -> Result<Report> {
    let entry = chosen_model(project, model)?;
    let model_path = resolve(project_dir, &entry.file);
    progress.begin("opening the model", 0);
    let loaded = open_model(&model_path).with_context(|| format!("{}: cannot open the model", model_path.display()))?;
    let evaluations = evaluations_of(entry, (project, project_dir), &loaded, device, progress)?;
    if evaluations.is_empty() {
        bail!(
            "model {:?} has no evaluation and the project has no test images with both good and defective parts: \
             a report needs labelled test images",
            entry.name
        );
    }
    let thresholds = threshold_facts(entry, &loaded);
    let mut sections = Vec::new();
    for (category, report) in evaluations.clone() {
        sections.push(section(category, report, &thresholds, (&loaded, device), progress)?);
    }
    Ok(Report {
        project_name: project.name.clone(),
        written_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        model: model_facts(entry, &model_path, &loaded)?,
        thresholds,
        sections,
        comparison: match project.models.len() > 1 {
            true => comparison(project, project_dir, (&entry.name, &evaluations), (open_model, device), progress)?,
            false => Vec::new(),
        },
    })
}

/// The project's stored evaluations of `entry`; if it has none (a project made on the command line), an
/// evaluation now on the test images of every source that has both good and defective ones.
fn evaluations_of(
    entry: &ModelEntry,
    (project, project_dir): (&Project, &Path),
    loaded: &LoadedModel,
    device: &Device,
    progress: &dyn Progress,
) -> Result<BTreeMap<String, EvalReport>> {
    if !entry.evaluations.is_empty() {
        return Ok(entry.evaluations.clone());
    }
    progress.note(&format!("evaluating {} on the project's test images", entry.name));
    evaluate_now(project, project_dir, loaded, device, progress)
}

fn evaluate_now(
    project: &Project,
    project_dir: &Path,
    loaded: &LoadedModel,
    device: &Device,
    progress: &dyn Progress,
) -> Result<BTreeMap<String, EvalReport>> {
    let mut evaluations = BTreeMap::new();
    for (source, category) in project.sources.iter().zip(project.source_names()) {
        let test: Vec<ImageRecord> = source_records(project_dir, source)?
            .into_iter()
            .filter(|(_, split)| *split == Split::Test)
            .map(|(record, _)| record)
            .collect();
        if !(test.iter().any(|r| r.label.is_anomalous()) && test.iter().any(|r| !r.label.is_anomalous())) {
            continue;
        }
        let benchmark = Benchmark { train: Vec::new(), test };
        let report = evaluate(loaded.model.as_ref(), &loaded.manifest, &benchmark, 8, device, progress)?;
        evaluations.insert(category, report);
    }
    Ok(evaluations)
}

/// The project's thresholds (the studio's tuned ones) win over the file's; the rule says where they came from.
fn threshold_facts(entry: &ModelEntry, loaded: &LoadedModel) -> ThresholdFacts {
    let file = &loaded.manifest.thresholds;
    let decision = entry.decision.or(file.decision);
    let rule = if decision.is_none() {
        "none chosen: the model was fitted without validation images".to_string()
    } else if entry.decision.is_some() && entry.decision != file.decision {
        "set in Loupe's threshold panel (not yet written to the model file)".to_string()
    } else {
        match file.chosen_by {
            ChosenBy::Studio => "set in Loupe's threshold panel".to_string(),
            ChosenBy::Fit => format!("{} (at fit time)", file.rule),
            ChosenBy::Command => format!("{} (by `loupe eval --choose-threshold`)", file.rule),
        }
    };
    ThresholdFacts { decision, review: entry.review.or(file.review), rule }
}

fn model_facts(entry: &ModelEntry, path: &Path, loaded: &LoadedModel) -> Result<ModelFacts> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read the model file", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let method = find_method(&loaded.manifest.method)?;
    let training = &loaded.manifest.training;
    Ok(ModelFacts {
        name: entry.name.clone(),
        method: method.title.to_string(),
        family: method.family.title().to_string(),
        summary: method.summary.to_string(),
        settings: serde_json::to_string(&loaded.manifest.settings)?,
        training_source: training.source.clone(),
        images_used: training.images_used,
        images_skipped: training.images_skipped,
        fit_seconds: training.fit_seconds,
        image_size: loaded.manifest.image_size,
        file_name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256: Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect(),
        file_date: modified.map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_default(),
        trained_with: loaded.manifest.loupe_version.clone(),
    })
}

fn scores_and_labels(report: &EvalReport) -> (Vec<f32>, Vec<bool>) {
    report.images.iter().map(|i| (i.score, i.defect_type != GOOD)).unzip()
}

fn section(
    category: String,
    report: EvalReport,
    thresholds: &ThresholdFacts,
    (loaded, device): (&LoadedModel, &Device),
    progress: &dyn Progress,
) -> Result<EvaluationSection> {
    let (scores, labels) = scores_and_labels(&report);
    let table = ThresholdTable::new(&scores, &labels);
    let shown_at = thresholds.decision.unwrap_or(report.f1_threshold);
    let confusion = table.confusion(shown_at);
    let curve = roc_curve(&scores, &labels).with_context(|| format!("{category}: ROC curve"))?;
    let operating_roc = confusion.far().zip(confusion.mar()).map(|(far, mar)| (far, 1.0 - mar));
    let operating_trade_off = confusion.far().zip(confusion.mar());
    let good = table.normal_scores();
    let defective = table.anomalous_scores();
    let decision = thresholds.decision;
    let review = thresholds.review.filter(|_| decision.is_some());
    progress.begin("drawing the worst misses and false alarms", 0);
    // The images of one kind (defective or good) on one side of the threshold, the most extreme first: lowest
    // scores for those passed, highest for those rejected.
    let extremes = |defective: bool, rejected: bool| -> Vec<Example> {
        let mut chosen: Vec<&ImageResult> = report
            .images
            .iter()
            .filter(|i| (i.defect_type != GOOD) == defective && (i.score >= shown_at) == rejected)
            .collect();
        chosen.sort_by(|a, b| if rejected { b.score.total_cmp(&a.score) } else { a.score.total_cmp(&b.score) });
        chosen.truncate(EXAMPLES_PER_KIND);
        examples(&chosen, shown_at, loaded, device)
    };
    let misses = extremes(true, false);
    let false_alarms = extremes(false, true);
    let caught = extremes(true, true);
    Ok(EvaluationSection {
        good: good.len(),
        defective: defective.len(),
        shown_at,
        at_decision: decision.is_some(),
        confusion,
        bands: decision.filter(|_| review.is_some()).map(|d| band_counts(&table, d, review)),
        roc_svg: plots::roc(&curve, operating_roc, report.image_auroc)?,
        trade_off_svg: plots::far_vs_mar(&curve, operating_trade_off)?,
        histogram_svg: plots::histogram(good, defective, decision, review)?,
        misses,
        false_alarms,
        caught,
        category,
        report,
    })
}

/// Scores each image again for its map (the evaluation kept scores only) and draws image + heatmap pairs; an
/// image that cannot be read any more is reported in its place.
fn examples(images: &[&ImageResult], threshold: f32, loaded: &LoadedModel, device: &Device) -> Vec<Example> {
    images
        .iter()
        .map(|image| Example {
            file: Path::new(&image.path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            defect_type: image.defect_type.clone(),
            score: image.score,
            pictures: pictures(Path::new(&image.path), threshold, loaded, device),
        })
        .collect()
}

fn pictures(path: &Path, threshold: f32, loaded: &LoadedModel, device: &Device) -> Result<(String, String), String> {
    let records = [ImageRecord::normal(path.to_path_buf())];
    let (decoded, skipped) = decode_all(&records, loaded.model.image_size(), &|_| {});
    let Some(decoded) = decoded.first() else {
        return Err(skipped.first().map_or("cannot be read".into(), |s| s.to_string()));
    };
    let tensor = images_to_tensor(&[decoded], device).map_err(|e| e.to_string())?;
    let output = loaded.model.score_batch(&tensor).map_err(|e| e.to_string())?.remove(0);
    let original = open_image(path)?;
    let shown = original.resize(EXAMPLE_SIDE, EXAMPLE_SIDE, FilterType::Triangle).to_rgb8();
    let heatmap = overlay(&shown, &output.map, Some(threshold));
    Ok((jpeg_base64(&shown)?, jpeg_base64(&heatmap)?))
}

fn jpeg_base64(image: &RgbImage) -> Result<String, String> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
        .encode_image(image)
        .map_err(|e| format!("cannot encode the picture ({e})"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn comparison(
    project: &Project,
    project_dir: &Path,
    featured: (&str, &BTreeMap<String, EvalReport>),
    (open_model, device): (OpenModel, &Device),
    progress: &dyn Progress,
) -> Result<Vec<ComparisonRow>> {
    let mut rows = Vec::new();
    for entry in &project.models {
        let family = find_method(&entry.method).map(|m| m.family.title().to_string()).unwrap_or_default();
        let path = resolve(project_dir, &entry.file);
        let loaded = open_model(&path).with_context(|| format!("{}: cannot open the model", path.display()))?;
        let evaluations = match entry.name == featured.0 {
            true => featured.1.clone(),
            false => evaluations_of(entry, (project, project_dir), &loaded, device, progress)?,
        };
        let threshold = threshold_facts(entry, &loaded).decision;
        for (category, report) in &evaluations {
            let (scores, labels) = scores_and_labels(report);
            let fit_seconds = loaded.manifest.training.fit_seconds;
            let confusion = threshold.map(|d| ThresholdTable::new(&scores, &labels).confusion(d));
            rows.push(ComparisonRow {
                model: entry.name.clone(),
                method: entry.method.clone(),
                family: family.clone(),
                category: category.clone(),
                image_auroc: report.image_auroc,
                pixel_auroc: report.pixel_auroc,
                aupro: report.aupro,
                threshold,
                far: confusion.and_then(|c| c.far()),
                mar: confusion.and_then(|c| c.mar()),
                fit_seconds,
                images_per_s: report.test_images_per_s,
            });
        }
    }
    Ok(rows)
}
