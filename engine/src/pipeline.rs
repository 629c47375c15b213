//! Fitting a method on a folder of normal images, end to end: scan, hold out a validation split, decode in
//! parallel (skipping bad files), fit, score the validation images and choose the decision threshold from them.

use crate::backbone::Backbone;
use crate::dataset::{
    scan_normal_folder, DecodedImage, ImageRecord, SkippedFile, TrainingImages, TRAINING_IMAGES_IN_MEMORY,
    VALIDATION_IMAGES_IN_MEMORY,
};
use crate::geometry::{score_each, InputGeometry};
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, FitContext, MethodInfo};
use crate::metrics::ThresholdTable;
use crate::model_file::{ChosenBy, Manifest, ScoreStats, Thresholds, TrainingInfo, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE};
use crate::progress::{check_cancelled, NoProgress, Progress};
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const DEFAULT_IMAGE_SIZE: u32 = 256;

#[derive(Clone)]
pub struct FitRequest {
    pub method: &'static MethodInfo,
    /// Overrides of the method's default settings (a JSON object).
    pub settings: serde_json::Value,
    /// A folder of normal images, or an MVTec folder (its `train/good` is used).
    pub data: PathBuf,
    pub image_size: u32,
    pub batch_size: usize,
    /// Share of the normal images held out to choose the threshold.
    pub validation_fraction: f64,
    /// The decision threshold is the lowest with at most this false-alarm rate on the validation images.
    pub target_far: f64,
    pub seed: u64,
    /// How the model sees each image: whole (the default), kept aspect ratio or tiles; a region of interest.
    pub geometry: InputGeometry,
}

impl FitRequest {
    pub fn new(method: &'static MethodInfo, data: PathBuf) -> Self {
        Self {
            method,
            settings: serde_json::json!({}),
            data,
            image_size: DEFAULT_IMAGE_SIZE,
            batch_size: 8,
            validation_fraction: 0.1,
            target_far: 0.01,
            seed: 0,
            geometry: InputGeometry::default(),
        }
    }
}

pub struct FitOutcome {
    pub model: Box<dyn AnomalyModel>,
    pub manifest: Manifest,
    pub skipped: Vec<SkippedFile>,
}

/// Splits records into (train, validation): a seeded draw of `fraction` of them, at least one when possible.
pub fn validation_split(records: Vec<ImageRecord>, fraction: f64, seed: u64) -> (Vec<ImageRecord>, Vec<ImageRecord>) {
    let n = records.len();
    let wanted = if n < 2 || fraction <= 0.0 { 0 } else { ((n as f64 * fraction).round() as usize).clamp(1, n - 1) };
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed ^ 0x0a11_da7e);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut held_out = vec![false; n];
    order[..wanted].iter().for_each(|&i| held_out[i] = true);
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (record, hold) in records.into_iter().zip(held_out) {
        if hold {
            validation.push(record);
        } else {
            train.push(record);
        }
    }
    (train, validation)
}

/// Scores decoded images in batches of `batch_size`; returns outputs in order and the seconds spent scoring.
pub fn score_images(
    model: &dyn AnomalyModel,
    images: &[DecodedImage],
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
) -> Result<(Vec<AnomalyOutput>, f64)> {
    let mut outputs = Vec::with_capacity(images.len());
    let mut seconds = 0.0;
    for batch in images.chunks(batch_size.max(1)) {
        check_cancelled(progress)?;
        let refs: Vec<&DecodedImage> = batch.iter().collect();
        let tensor = images_to_tensor(&refs, device)?;
        let started = Instant::now();
        outputs.extend(model.score_batch(&tensor)?);
        seconds += started.elapsed().as_secs_f64();
        progress.advance(batch.len() as u64);
    }
    Ok((outputs, seconds))
}

pub fn fit(backbone: Arc<Backbone>, request: &FitRequest, progress: &dyn Progress) -> Result<FitOutcome> {
    let records = scan_normal_folder(&request.data)?;
    fit_records(backbone, request, records, progress)
}

/// [`fit`] on normal images already listed (the studio gathers them from several sources); `request.data` only
/// names the source in the model file.
pub fn fit_records(
    backbone: Arc<Backbone>,
    request: &FitRequest,
    records: Vec<ImageRecord>,
    progress: &dyn Progress,
) -> Result<FitOutcome> {
    let sizes = MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE;
    if !sizes.contains(&request.image_size) {
        bail!("image size {} is outside {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}", request.image_size);
    }
    if records.is_empty() {
        bail!("no normal images to train on");
    }
    request.geometry.check()?;
    let geometry = &request.geometry;
    let settings = request.method.settings_with(&request.settings)?;
    let (train_records, validation_records) = validation_split(records, request.validation_fraction, request.seed);
    progress.begin("decoding", train_records.len() as u64);
    let (train, mut skipped) =
        TrainingImages::decode_cut(&train_records, request.image_size, geometry, TRAINING_IMAGES_IN_MEMORY, progress)?;
    if train.is_empty() {
        bail!("{}: none of the {} training images could be read", request.data.display(), train_records.len());
    }
    let device = backbone.device.clone();
    let started = Instant::now();
    let context = FitContext {
        backbone: backbone.clone(),
        device: device.clone(),
        batch_size: request.batch_size,
        image_size: request.image_size,
        progress,
    };
    let model = (request.method.fit)(&context, &train, &settings)?;
    let fit_seconds = started.elapsed().as_secs_f64();
    // A trained method stopped by the user returns its best epoch: keep that model, without a threshold (the
    // validation images are not scored once the user asked to stop).
    let mut scores = Vec::new();
    let mut validation_paths = Vec::new();
    if !progress.is_cancelled() {
        progress.begin("validation", validation_records.len() as u64);
        let skipped_validation = if geometry.is_whole_image() {
            let (validation, skipped_validation) = TrainingImages::decode(
                &validation_records,
                request.image_size,
                VALIDATION_IMAGES_IN_MEMORY,
                &NoProgress,
            )?;
            for batch in validation.all_batches(request.batch_size) {
                let batch = batch?;
                let (outputs, _) = score_images(model.as_ref(), &batch, request.batch_size, &device, progress)?;
                scores.extend(outputs.iter().map(|o| o.score));
                validation_paths.extend(batch.iter().map(|i| validation_records[i.index].path.as_path()));
            }
            skipped_validation
        } else {
            let batch_size = request.batch_size;
            let (skipped_validation, _) = score_each(
                model.as_ref(),
                geometry,
                &validation_records,
                batch_size,
                &device,
                progress,
                |index, _, output| {
                    scores.push(output.score);
                    validation_paths.push(validation_records[index].path.as_path());
                    Ok(())
                },
            )?;
            skipped_validation
        };
        skipped.extend(skipped_validation);
    }
    refuse_non_finite_scores(&validation_paths, &scores)?;
    let thresholds = choose_threshold(&scores, request.target_far);
    let mut manifest = Manifest::for_model(model.as_ref(), &backbone, thresholds);
    manifest.set_geometry(geometry.clone());
    manifest.validation = ScoreStats::from_scores(&scores);
    manifest.training = TrainingInfo {
        images_used: train.source_files(),
        inputs_used: train.len(),
        images_skipped: skipped.len(),
        fit_seconds,
        source: request.data.display().to_string(),
        folder_test_held_out: false,
    };
    Ok(FitOutcome { model, manifest, skipped })
}

/// A model that scores an image NaN or infinite is broken (training diverged): refused with the images named,
/// before a threshold is chosen from such scores or a file is written that could not be read back.
fn refuse_non_finite_scores(paths: &[&Path], scores: &[f32]) -> Result<()> {
    let broken: Vec<String> = paths
        .iter()
        .zip(scores)
        .filter(|(_, score)| !score.is_finite())
        .map(|(path, score)| format!("{} ({score})", path.display()))
        .collect();
    if !broken.is_empty() {
        bail!(
            "the trained model gives {} of {} validation images a score that is not a number: {}; the training \
             diverged (try a lower learning rate) — nothing was saved",
            broken.len(),
            scores.len(),
            broken.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// The lowest threshold with false-alarm rate ≤ `target_far` on the validation normals.
pub fn choose_threshold(validation_scores: &[f32], target_far: f64) -> Thresholds {
    let table = ThresholdTable::new(validation_scores, &vec![false; validation_scores.len()]);
    match table.threshold_for_far(target_far) {
        Some(decision) => Thresholds {
            decision: Some(decision),
            review: None,
            rule: format!("FAR <= {:.3} on {} held-out normal images", target_far, validation_scores.len()),
            chosen_by: ChosenBy::Fit,
        },
        None => {
            let rule = "no validation images: set a threshold before use".into();
            Thresholds { decision: None, review: None, rule, chosen_by: ChosenBy::Fit }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let records: Vec<ImageRecord> =
            (0..50).map(|i| ImageRecord::normal(PathBuf::from(format!("{i}.png")))).collect();
        let (train, validation) = validation_split(records.clone(), 0.1, 4);
        assert_eq!((train.len(), validation.len()), (45, 5));
        assert!(validation.iter().all(|v| !train.contains(v)));
        assert_eq!(validation_split(records.clone(), 0.1, 4).1, validation, "same seed, same split");
        assert_eq!(validation_split(records[..1].to_vec(), 0.1, 4).1.len(), 0, "a single image is kept for training");
        assert_eq!(validation_split(records[..3].to_vec(), 0.1, 4).1.len(), 1, "at least one held out");
    }

    #[test]
    fn non_finite_validation_scores_are_refused_with_the_images_named() {
        let paths = [Path::new("a.png"), Path::new("b.png"), Path::new("c.png")];
        refuse_non_finite_scores(&paths, &[0.5, 1.0, 2.0]).unwrap();
        let message = refuse_non_finite_scores(&paths, &[0.5, f32::NAN, f32::INFINITY]).unwrap_err().to_string();
        assert!(message.contains("2 of 3") && message.contains("b.png (NaN)") && message.contains("c.png (inf)"));
        assert!(!message.contains("a.png"), "{message}");
    }

    #[test]
    fn no_validation_images_means_no_threshold() {
        assert_eq!(choose_threshold(&[], 0.01).decision, None);
        let thresholds = choose_threshold(&[1.0, 2.0, 3.0, 4.0], 0.25);
        assert_eq!(thresholds.decision, Some(3.0f32.next_up()));
    }
}
