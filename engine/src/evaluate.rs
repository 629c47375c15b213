//! Evaluating a model on a labelled test set: image AUROC, pooled pixel AUROC, AUPRO@0.3, F1-max, and FAR/MAR
//! at the model's own threshold — overall and per defect type — plus the throughput of scoring.

use crate::dataset::{decode_all, Benchmark, DecodedImage, ImageRecord, SkippedFile};
use crate::geometry::{mask_at_map_size, score_each};
use crate::maps::ScoreMap;
use crate::methods::AnomalyModel;
use crate::metrics::{auroc, Confusion, SortedPixels, ThresholdTable};
use crate::model_file::Manifest;
use crate::pipeline::score_images;
use crate::progress::Progress;
use anyhow::{bail, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const AUPRO_FPR_LIMIT: f64 = 0.3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    pub path: String,
    pub defect_type: String,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DefectTypeReport {
    pub images: usize,
    /// Against the good test images.
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub aupro: Option<f64>,
    /// Share of this type's images flagged at the model's threshold.
    pub detected: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub method: String,
    pub image_auroc: f64,
    pub pixel_auroc: Option<f64>,
    pub aupro: Option<f64>,
    pub f1_max: f64,
    pub f1_threshold: f32,
    /// The model's decision threshold (chosen on validation normals at fit time), if it has one.
    pub threshold: Option<f32>,
    /// False-alarm and missed-alarm rates at `threshold`.
    pub far: Option<f64>,
    pub mar: Option<f64>,
    pub confusion: Confusion,
    pub test_images: usize,
    pub test_images_per_s: f64,
    pub batch_size: usize,
    pub per_defect_type: BTreeMap<String, DefectTypeReport>,
    pub skipped: Vec<String>,
    pub images: Vec<ImageResult>,
}

impl EvalReport {
    /// Re-states the threshold-dependent figures (FAR, MAR, confusion, detected share per type) at `threshold`.
    pub fn set_threshold(&mut self, threshold: Option<f32>, table: &ThresholdTable) {
        self.threshold = threshold;
        let Some(threshold) = threshold else { return };
        self.confusion = table.confusion(threshold);
        self.far = self.confusion.far();
        self.mar = self.confusion.mar();
        for (name, report) in self.per_defect_type.iter_mut() {
            let of_type: Vec<&ImageResult> = self.images.iter().filter(|i| &i.defect_type == name).collect();
            report.detected = of_type.iter().filter(|i| i.score >= threshold).count() as f64 / of_type.len() as f64;
        }
    }
}

struct Scored<'a> {
    record: &'a ImageRecord,
    /// Ground truth at the map's size, 1 = defect.
    mask: Option<Vec<u8>>,
    score: f32,
    map: ScoreMap,
}

/// The pixels of the images pixel metrics can use — defective ones with a mask, good ones (no defect pixels) —
/// sorted once for the whole set and every defect type.
struct PixelCurves {
    sorted: Option<SortedPixels>,
    /// Index into the scored images of each image in `sorted`.
    members: Vec<usize>,
}

impl PixelCurves {
    fn new(scored: &[Scored]) -> Self {
        let members: Vec<usize> =
            (0..scored.len()).filter(|&i| scored[i].mask.is_some() || !scored[i].record.label.is_anomalous()).collect();
        let Some(&first) = members.first() else { return Self { sorted: None, members } };
        let (width, height) = (scored[first].map.width, scored[first].map.height);
        let zeros = vec![0u8; width * height];
        let masks: Vec<&[u8]> = members.iter().map(|&i| scored[i].mask.as_deref().unwrap_or(&zeros)).collect();
        let maps: Vec<&[f32]> = members.iter().map(|&i| scored[i].map.data.as_slice()).collect();
        Self { sorted: SortedPixels::new(&maps, &masks, width, height).ok(), members }
    }

    /// (pixel AUROC, AUPRO) over the images `keep` keeps.
    fn metrics(&self, scored: &[Scored], keep: impl Fn(&Scored) -> bool) -> (Option<f64>, Option<f64>) {
        let Some(sorted) = &self.sorted else { return (None, None) };
        let include: Vec<bool> = self.members.iter().map(|&i| keep(&scored[i])).collect();
        let metrics = sorted.metrics(&include, AUPRO_FPR_LIMIT);
        (metrics.auroc.ok(), metrics.aupro.ok())
    }
}

pub fn evaluate(
    model: &dyn AnomalyModel,
    manifest: &Manifest,
    benchmark: &Benchmark,
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    evaluate_with_maps(model, manifest, benchmark, batch_size, device, progress).map(|(report, _)| report)
}

/// [`evaluate`], also handing back each scored image's anomaly map (in the order of `report.images`), for a
/// viewer that draws them.
pub fn evaluate_with_maps(
    model: &dyn AnomalyModel,
    manifest: &Manifest,
    benchmark: &Benchmark,
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
) -> Result<(EvalReport, Vec<ScoreMap>)> {
    if !manifest.geometry.is_whole_image() {
        return evaluate_cut(model, manifest, benchmark, batch_size, device, progress);
    }
    progress.begin("decoding", benchmark.test.len() as u64);
    let (decoded, skipped) = decode_all(&benchmark.test, model.image_size(), &|n| progress.advance(n as u64));
    evaluate_decoded(model, manifest, benchmark, &decoded, &skipped, batch_size, device, progress)
}

/// [`evaluate_with_maps`] on test images decoded by the caller (`decoded[i].index` into `benchmark.test`;
/// `skipped` are the files that could not be).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_decoded(
    model: &dyn AnomalyModel,
    manifest: &Manifest,
    benchmark: &Benchmark,
    decoded: &[DecodedImage],
    skipped: &[SkippedFile],
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
) -> Result<(EvalReport, Vec<ScoreMap>)> {
    if decoded.is_empty() {
        bail!("none of the {} test images could be read", benchmark.test.len());
    }
    progress.begin("scoring", decoded.len() as u64);
    let (outputs, seconds) = score_images(model, decoded, batch_size, device, progress)?;
    let scored: Vec<Scored> = decoded
        .iter()
        .zip(outputs)
        .map(|(image, output)| Scored {
            record: &benchmark.test[image.index],
            mask: image.mask.clone(),
            score: output.score,
            map: output.map,
        })
        .collect();
    report_scored(manifest, scored, skipped, seconds, batch_size, progress)
}

/// [`evaluate_with_maps`] for a model whose geometry cuts each image (tiles, kept aspect ratio, a region): each
/// test image opened at full size and scored one by one, its stitched map and its mask at the map's size.
fn evaluate_cut(
    model: &dyn AnomalyModel,
    manifest: &Manifest,
    benchmark: &Benchmark,
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
) -> Result<(EvalReport, Vec<ScoreMap>)> {
    progress.begin("scoring", benchmark.test.len() as u64);
    let mut scored = Vec::new();
    let mut unreadable_masks = Vec::new();
    let geometry = &manifest.geometry;
    let (mut skipped, seconds) =
        score_each(model, geometry, &benchmark.test, batch_size, device, progress, |index, cut, output| {
            let record = &benchmark.test[index];
            let mask = match &record.mask {
                None => None,
                Some(path) => match mask_at_map_size(path, cut) {
                    Ok(mask) => Some(mask),
                    Err(reason) => {
                        unreadable_masks.push(SkippedFile { path: path.clone(), reason: format!("mask: {reason}") });
                        return Ok(());
                    }
                },
            };
            scored.push(Scored { record, mask, score: output.score, map: output.map });
            Ok(())
        })?;
    skipped.extend(unreadable_masks);
    if scored.is_empty() {
        bail!("none of the {} test images could be read", benchmark.test.len());
    }
    // Pixel metrics pool every image's pixels at one size: a set of mixed sizes is brought to the first's.
    let (width, height) = (scored[0].map.width, scored[0].map.height);
    for image in scored.iter_mut().filter(|s| (s.map.width, s.map.height) != (width, height)) {
        image.mask = image.mask.as_ref().map(|mask| {
            let (from_width, from_height) = (image.map.width, image.map.height);
            (0..width * height)
                .map(|i| mask[(i / width * from_height / height) * from_width + (i % width) * from_width / width])
                .collect()
        });
        image.map = image.map.resized(width, height);
    }
    report_scored(manifest, scored, &skipped, seconds, batch_size, progress)
}

/// The report on scored test images: image and pixel metrics overall and per defect type, FAR/MAR at the
/// model's threshold.
fn report_scored(
    manifest: &Manifest,
    scored: Vec<Scored>,
    skipped: &[SkippedFile],
    seconds: f64,
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<(EvalReport, Vec<ScoreMap>)> {
    let scores: Vec<f32> = scored.iter().map(|s| s.score).collect();
    let labels: Vec<bool> = scored.iter().map(|s| s.record.label.is_anomalous()).collect();
    let image_auroc = auroc(&scores, &labels).map_err(|e| anyhow::anyhow!("image AUROC: the test set {e}"))?;
    let table = ThresholdTable::new(&scores, &labels);
    let (f1_threshold, f1_max) = table.f1_max().expect("both classes present");
    let threshold = manifest.thresholds.decision;
    progress.begin("pixel metrics", 1);
    // An image-level method's map is its score everywhere: pixel metrics of it would measure nothing.
    let localises = crate::methods::find_method(&manifest.method).map_or(true, |method| method.localises);
    let pixels = if localises { PixelCurves::new(&scored) } else { PixelCurves { sorted: None, members: Vec::new() } };
    let (pixel_auroc, pro) = pixels.metrics(&scored, |_| true);
    let mut per_defect_type = BTreeMap::new();
    let goods: Vec<&Scored> = scored.iter().filter(|s| !s.record.label.is_anomalous()).collect();
    let mut types: Vec<&str> =
        scored.iter().filter(|s| s.record.label.is_anomalous()).map(|s| s.record.label.type_name()).collect();
    types.sort_unstable();
    types.dedup();
    for defect_type in types {
        let of_type: Vec<&Scored> = scored.iter().filter(|s| s.record.label.type_name() == defect_type).collect();
        let subset: Vec<&Scored> = goods.iter().chain(&of_type).copied().collect();
        let subset_scores: Vec<f32> = subset.iter().map(|s| s.score).collect();
        let subset_labels: Vec<bool> = subset.iter().map(|s| s.record.label.is_anomalous()).collect();
        let in_subset = |s: &Scored| !s.record.label.is_anomalous() || s.record.label.type_name() == defect_type;
        let (pixel_auroc, aupro) = pixels.metrics(&scored, in_subset);
        per_defect_type.insert(
            defect_type.to_string(),
            DefectTypeReport {
                images: of_type.len(),
                image_auroc: auroc(&subset_scores, &subset_labels).ok(),
                pixel_auroc,
                aupro,
                detected: 0.0,
            },
        );
    }
    progress.advance(1);
    let mut report = EvalReport {
        method: manifest.method.clone(),
        image_auroc,
        pixel_auroc,
        aupro: pro,
        f1_max,
        f1_threshold,
        threshold,
        far: None,
        mar: None,
        confusion: Confusion::default(),
        test_images: scored.len(),
        test_images_per_s: scored.len() as f64 / seconds.max(1e-9),
        batch_size,
        per_defect_type,
        skipped: skipped.iter().map(ToString::to_string).collect(),
        images: scored
            .iter()
            .map(|s| ImageResult {
                path: s.record.path.display().to_string(),
                defect_type: s.record.label.type_name().to_string(),
                score: s.score,
            })
            .collect(),
    };
    report.set_threshold(threshold, &table);
    Ok((report, scored.into_iter().map(|s| s.map).collect()))
}
