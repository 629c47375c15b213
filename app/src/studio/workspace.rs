//! What the studio holds in memory besides the project file: the images of every source (with thumbnails), and
//! per trained model its loaded weights, anomaly maps and sorted score table. Also the work that fills them —
//! import, training, re-scoring — written as plain functions over the engine's `Progress` so they run in a
//! [`super::jobs::Job`] and in tests alike.

use crate::project::sources::{path_in_source, source_records, Split};
use crate::project::{resolve, source_names, ModelEntry, Project, Source, TrainingChoice};
use crate::studio::map_cache;
use anyhow::{bail, Context, Result};
use eframe::egui::ColorImage;
use loupe_engine::backbone::Backbone;
use loupe_engine::dataset::decode::open_image;
use loupe_engine::dataset::{decode_all_reusing, probe_image, Benchmark, ImageRecord, Label, ResizedImage};
use loupe_engine::device::DeviceChoice;
use loupe_engine::evaluate::{evaluate_decoded, evaluate_with_maps, EvalReport};
use loupe_engine::geometry::score_each;
use loupe_engine::labels::{label_key, LabelSet, Verdict};
use loupe_engine::maps::ScoreMap;
use loupe_engine::methods::{find_method, AnomalyModel};
use loupe_engine::metrics::ThresholdTable;
use loupe_engine::model_file::{self, ChosenBy, Manifest};
use loupe_engine::pipeline::{fit_records, score_images, FitRequest};
use loupe_engine::progress::{check_cancelled, Progress};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One image file of the open project, as the studio's tables name it: cheap to copy, hash and compare where a
/// path string was matched before. Given out by [`ImageIds`], once per path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(u32);

/// The ids of the open project's image files. A path keeps its id while the project is open, also across
/// re-imports (a source added), so the maps and scores of models not evaluated again still find their images.
/// Reports and caches on disk keep paths: ids are only ever in memory.
#[derive(Clone, Default)]
pub struct ImageIds(Arc<Mutex<HashMap<String, ImageId>>>);

impl ImageIds {
    /// The id of `path`, given out now if it has none yet.
    pub fn of(&self, path: &Path) -> ImageId {
        self.of_reported(&reported_path(path))
    }

    /// The id of a path as reports and caches store it ([`reported_path`]).
    pub fn of_reported(&self, path: &str) -> ImageId {
        let mut ids = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = ids.get(path) {
            return *id;
        }
        let id = ImageId(u32::try_from(ids.len()).expect("fewer than 4 billion images"));
        ids.insert(path.to_string(), id);
        id
    }
}

/// How reports, the project file and caches write an image's path. A file name that is not UTF-8 is written
/// lossily, the same way everywhere, so it still finds its image.
pub fn reported_path(path: &Path) -> String {
    path.display().to_string()
}

/// The ids of `images` by their reported paths, for matching an engine report back to the images.
pub(super) fn ids_by_reported_path(images: &[StudioImage]) -> HashMap<String, ImageId> {
    images.iter().map(|image| (reported_path(&image.path), image.id)).collect()
}

/// Longest side of a gallery thumbnail, in pixels.
pub const THUMBNAIL_SIZE: u32 = 112;

#[derive(Clone)]
pub struct StudioImage {
    pub id: ImageId,
    pub path: PathBuf,
    pub split: Split,
    pub label: Label,
    pub mask: Option<PathBuf>,
    /// The source's category name (benchmark panel rows).
    pub category: String,
    /// Where the project's labels for this image are (`labels::label_key`: follows a relinked folder).
    pub label_key: String,
    /// Made by the import for test and inspect images; training images (the archive of good parts, thousands
    /// of them) get theirs when the gallery shows them ([`super::thumbnails`]), so opening reads only headers.
    pub thumbnail: Option<Arc<ColorImage>>,
    pub original_size: [usize; 2],
    /// The model-size pixels the import made while the file was open for the thumbnail: the first scoring takes
    /// them instead of decoding the file again. Test and inspect images only (training decodes its own), within
    /// [`KEPT_INPUT_BYTES`] over the project.
    pub kept_input: Option<Arc<KeptInput>>,
}

/// At most this many bytes of model-size pixels are kept from an import (MTD's 583 test images at 256²: 115 MB).
pub const KEPT_INPUT_BYTES: u64 = 384 << 20;

/// An image's pixels at one model input size, as they were when the import read the file.
pub struct KeptInput {
    pub resized: ResizedImage,
    pub size: u32,
    pub modified: SystemTime,
}

impl StudioImage {
    /// The kept model-size pixels at `size`, while the file is unchanged since the import read it.
    fn kept_input_at(&self, size: u32) -> Option<ResizedImage> {
        let kept = self.kept_input.as_ref().filter(|kept| kept.size == size)?;
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok()?;
        (modified == kept.modified).then(|| kept.resized.clone())
    }

    pub fn file_name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// What the image's folder says: "good", its defect type, or "to inspect" when no folder says anything.
    pub fn folder_truth(&self) -> &str {
        match self.split {
            Split::Inspect => "to inspect",
            _ => self.label.type_name(),
        }
    }
}

#[derive(Default)]
pub struct Imported {
    pub images: Vec<StudioImage>,
    /// "path: reason" for every file that could not be read.
    pub skipped: Vec<String>,
}

/// What one reading of an image file gives the studio: its thumbnail and, when asked, its model-size pixels.
struct ReadImage {
    thumbnail: Option<ColorImage>,
    original_size: [usize; 2],
    kept_input: Option<KeptInput>,
}

/// A gallery thumbnail of a decoded image.
pub fn thumbnail_of(image: &image::DynamicImage) -> ColorImage {
    let small = image.thumbnail(THUMBNAIL_SIZE, THUMBNAIL_SIZE).to_rgba8();
    ColorImage::from_rgba_unmultiplied([small.width() as usize, small.height() as usize], small.as_raw())
}

/// Reads `path` once for its thumbnail and, if `input_size` is given, its pixels at that model input size.
fn read_image(path: &Path, input_size: Option<u32>) -> Result<ReadImage, String> {
    // Taken before reading: a file changed while it is read looks changed (a miss), never the other way round.
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let image = open_image(path)?;
    let original_size = [image.width() as usize, image.height() as usize];
    let kept_input = match (input_size, modified) {
        (Some(size), Some(modified)) => Some(KeptInput { resized: ResizedImage::of(&image, size), size, modified }),
        _ => None,
    };
    Ok(ReadImage { thumbnail: Some(thumbnail_of(&image)), original_size, kept_input })
}

/// Lists and reads every image of `sources`; unreadable files are listed, never fatal. A source that cannot be
/// scanned at all (missing folder) is an error naming it. Test and inspect images also keep their pixels at
/// `input_size` (the size the project trains at) for the first scoring, within [`KEPT_INPUT_BYTES`].
pub fn import(
    project_dir: &Path,
    sources: &[Source],
    input_size: u32,
    ids: &ImageIds,
    progress: &dyn Progress,
) -> Result<Imported> {
    let mut listed = Vec::new();
    for (source, category) in sources.iter().zip(source_names(sources)) {
        progress.begin(&format!("listing {}", source.root().display()), 0);
        let records = source_records(project_dir, source)
            .with_context(|| format!("cannot import {} ({})", source.root().display(), source.kind_label()))?;
        let root = resolve(project_dir, source.root());
        listed.extend(records.into_iter().map(|(record, split)| {
            let key = label_key(&category, &path_in_source(&record.path, &root));
            (record, split, category.clone(), key)
        }));
    }
    progress.begin("reading images", listed.len() as u64);
    let input_bytes = 3 * u64::from(input_size) * u64::from(input_size);
    let kept_bytes = AtomicU64::new(0);
    let keep_input = |split: Split| {
        split != Split::Train
            && kept_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |kept| {
                    (kept + input_bytes <= KEPT_INPUT_BYTES).then_some(kept + input_bytes)
                })
                .is_ok()
    };
    let results: Vec<Result<StudioImage, String>> = listed
        .into_par_iter()
        .map(|(record, split, category, label_key)| {
            if progress.is_cancelled() {
                return Err(format!("{}: not read (cancelled)", record.path.display()));
            }
            let read = if split == Split::Train {
                // Headers only: a line's archive of good parts is thousands of files.
                probe_image(&record.path).map(|(width, height)| ReadImage {
                    thumbnail: None,
                    original_size: [width as usize, height as usize],
                    kept_input: None,
                })
            } else {
                read_image(&record.path, keep_input(split).then_some(input_size))
            };
            let result = read
                .map(|read| StudioImage {
                    id: ids.of(&record.path),
                    path: record.path.clone(),
                    split,
                    label: record.label,
                    mask: record.mask,
                    category,
                    label_key,
                    thumbnail: read.thumbnail.map(Arc::new),
                    original_size: read.original_size,
                    kept_input: read.kept_input.map(Arc::new),
                })
                .map_err(|reason| format!("{}: {reason}", record.path.display()));
            progress.advance(1);
            result
        })
        .collect();
    check_cancelled(progress)?;
    let mut imported = Imported::default();
    for result in results {
        match result {
            Ok(image) => imported.images.push(image),
            Err(reason) => imported.skipped.push(reason),
        }
    }
    Ok(imported)
}

/// A trained model as the studio holds it while the project is open.
#[derive(Default)]
pub struct ModelRuntime {
    pub model: Option<Arc<dyn AnomalyModel>>,
    pub manifest: Option<Manifest>,
    /// Anomaly maps of the evaluated images.
    pub maps: HashMap<ImageId, Arc<ScoreMap>>,
    /// Image scores.
    pub scores: HashMap<ImageId, f32>,
    /// Every evaluated image's score, split by its folder's label and sorted: FAR/MAR at any threshold by
    /// binary search.
    pub table: Arc<ThresholdTable>,
    /// The same for the labelled images, split by the labeller's verdict (empty without an evaluation on them).
    pub labels_table: Arc<ThresholdTable>,
    /// The score range of all maps, for the colour scale.
    pub map_range: Option<(f32, f32)>,
}

impl ModelRuntime {
    pub fn from_entry(entry: &ModelEntry, ids: &ImageIds) -> Self {
        let evaluations = &entry.evaluations;
        let mut runtime = Self::default();
        runtime.scores.extend(entry.inspected.iter().map(|(path, score)| (ids.of_reported(path), *score)));
        // The labelled images are also in their folders' categories: each table counts an image once.
        let (mut folders, mut labelled) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for (category, report) in evaluations {
            let (scores, anomalous) = if category == YOUR_LABELS { &mut labelled } else { &mut folders };
            for image in &report.images {
                runtime.scores.insert(ids.of_reported(&image.path), image.score);
                scores.push(image.score);
                anomalous.push(image.defect_type != loupe_engine::dataset::GOOD);
            }
        }
        runtime.table = Arc::new(ThresholdTable::new(&folders.0, &folders.1));
        runtime.labels_table = Arc::new(ThresholdTable::new(&labelled.0, &labelled.1));
        runtime
    }

    pub fn set_maps(&mut self, maps: HashMap<ImageId, Arc<ScoreMap>>) {
        let range = maps.values().flat_map(|m| m.data.iter().copied()).fold(None, |range, v| match range {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f32::min(lo, v), f32::max(hi, v))),
        });
        self.map_range = range;
        self.maps = maps;
    }
}

/// The evaluation category whose ground truth is the labeller's, not a folder's.
pub const YOUR_LABELS: &str = "your labels";
/// The defect type of a labelled defect without a type.
const UNTYPED: &str = "untyped";

/// The labelled images (good or defect; unsure ones are left out) as a benchmark whose ground truth is the
/// labeller's: the verdict, the first defect type, the painted mask (or the folder's mask where the folder also
/// calls it a defect). Images that trained are left out too: a model is not judged on what it learnt from.
/// Returns the set and how many labelled training images were left out.
pub fn labelled_test_set(project_dir: &Path, labels: &LabelSet, images: &[StudioImage]) -> (Vec<ImageRecord>, usize) {
    let (mut records, mut trained_on) = (Vec::new(), 0);
    for image in images {
        let Some(label) = labels.get(&image.label_key) else { continue };
        let anomalous = match label.verdict {
            Some(Verdict::Good) => false,
            Some(Verdict::Defect) => true,
            Some(Verdict::Unsure) | None => continue,
        };
        if image.split == Split::Train {
            trained_on += 1;
            continue;
        }
        let (label_truth, mask) = if anomalous {
            let defect_type = label.defect_types.first().cloned().unwrap_or_else(|| UNTYPED.into());
            let folder_mask = image.mask.clone().filter(|_| image.label.is_anomalous());
            let mask = label.mask.as_ref().map(|m| resolve(project_dir, m)).or(folder_mask);
            (Label::Anomalous { defect_type }, mask)
        } else {
            (Label::Normal, None)
        };
        records.push(ImageRecord { path: image.path.clone(), label: label_truth, mask });
    }
    (records, trained_on)
}

/// The test images of each category, as the engine's benchmark shape.
fn test_sets(images: &[StudioImage]) -> BTreeMap<String, Benchmark> {
    let mut sets: BTreeMap<String, Benchmark> = BTreeMap::new();
    for image in images.iter().filter(|i| i.split == Split::Test) {
        sets.entry(image.category.clone()).or_default().test.push(ImageRecord {
            path: image.path.clone(),
            label: image.label.clone(),
            mask: image.mask.clone(),
        });
    }
    sets
}

pub struct Evaluated {
    pub evaluations: BTreeMap<String, EvalReport>,
    /// Scores of the images to inspect, by path (as the project file keeps them).
    pub inspected: BTreeMap<String, f32>,
    pub maps: HashMap<ImageId, Arc<ScoreMap>>,
}

/// Scores every test image with `model`, per category, and the labelled images against the labeller's ground
/// truth (as [`YOUR_LABELS`]); categories with a single class are skipped: AUROC needs good and defective images.
pub fn evaluate_all(
    model: &dyn AnomalyModel,
    manifest: &Manifest,
    images: &[StudioImage],
    (project_dir, labels): (&Path, &LabelSet),
    device: &candle_core::Device,
    progress: &dyn Progress,
) -> Result<Evaluated> {
    let mut evaluated = Evaluated { evaluations: BTreeMap::new(), inspected: BTreeMap::new(), maps: HashMap::new() };
    let inspect_images: Vec<&StudioImage> = images.iter().filter(|i| i.split == Split::Inspect).collect();
    let to_inspect: Vec<ImageRecord> = inspect_images.iter().map(|i| ImageRecord::normal(i.path.clone())).collect();
    let by_path: HashMap<&Path, &StudioImage> = images.iter().map(|image| (image.path.as_path(), image)).collect();
    let decode = |what: &str, records: &[ImageRecord]| {
        progress.begin(what, records.len() as u64);
        let size = model.image_size();
        let kept = |index: usize| by_path.get(records[index].path.as_path())?.kept_input_at(size);
        decode_all_reusing(records, size, &kept, &|n| progress.advance(n as u64))
    };
    let geometry = &manifest.geometry;
    if !to_inspect.is_empty() && geometry.is_whole_image() {
        let (decoded, skipped) = decode("decoding the images to inspect", &to_inspect);
        for file in &skipped {
            progress.note(&file.to_string());
        }
        progress.begin("scoring the images to inspect", decoded.len() as u64);
        let (outputs, _) = score_images(model, &decoded, 8, device, progress)?;
        for (image, output) in decoded.iter().zip(outputs) {
            let inspected = inspect_images[image.index];
            evaluated.inspected.insert(reported_path(&inspected.path), output.score);
            evaluated.maps.insert(inspected.id, Arc::new(output.map));
        }
    } else if !to_inspect.is_empty() {
        progress.begin("scoring the images to inspect", to_inspect.len() as u64);
        let (skipped, _) = score_each(model, geometry, &to_inspect, 8, device, progress, |index, _, output| {
            let inspected = inspect_images[index];
            evaluated.inspected.insert(reported_path(&inspected.path), output.score);
            evaluated.maps.insert(inspected.id, Arc::new(output.map));
            Ok(())
        })?;
        for file in &skipped {
            progress.note(&file.to_string());
        }
    }
    let id_of = ids_by_reported_path(images);
    let mut sets = test_sets(images);
    let (labelled, trained_on) = labelled_test_set(project_dir, labels, images);
    if trained_on > 0 {
        progress.note(&format!("{trained_on} labelled training images are not evaluated: the model learnt from them"));
    }
    if !labelled.is_empty() {
        sets.insert(YOUR_LABELS.to_string(), Benchmark { train: Vec::new(), test: labelled });
    }
    for (category, benchmark) in sets {
        let has_both = benchmark.test.iter().any(|r| r.label.is_anomalous())
            && benchmark.test.iter().any(|r| !r.label.is_anomalous());
        if !has_both {
            progress.note(&format!("{category}: needs good and defective test images to evaluate"));
            continue;
        }
        let (report, maps) = if geometry.is_whole_image() {
            let (decoded, skipped) = decode("decoding", &benchmark.test);
            evaluate_decoded(model, manifest, &benchmark, &decoded, &skipped, 8, device, progress)?
        } else {
            // A cut image is opened at full size and scored at once: nothing to reuse from the import.
            evaluate_with_maps(model, manifest, &benchmark, 8, device, progress)?
        };
        for (image, map) in report.images.iter().zip(maps) {
            if let Some(&id) = id_of.get(&image.path) {
                evaluated.maps.insert(id, Arc::new(map));
            }
        }
        evaluated.evaluations.insert(category, report);
    }
    Ok(evaluated)
}

/// The backbone on the chosen device, loaded once per device and shared by the jobs that need it.
type LoadedBackbone = Option<(DeviceChoice, Arc<Backbone>)>;

#[derive(Clone, Default)]
pub struct BackboneCache {
    loaded: Arc<std::sync::Mutex<LoadedBackbone>>,
}

impl BackboneCache {
    pub fn get(&self, device: DeviceChoice, weights: &Path, progress: &dyn Progress) -> Result<Arc<Backbone>> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_device, backbone)) = loaded.as_ref() {
            if *cached_device == device {
                return Ok(backbone.clone());
            }
        }
        progress.begin("loading the backbone", 0);
        if !weights.is_file() {
            bail!("the backbone weights are missing ({}): fetch them first", weights.display());
        }
        let backbone = Arc::new(Backbone::load(weights, &device.open()?)?);
        *loaded = Some((device, backbone.clone()));
        Ok(backbone)
    }
}

pub struct Trained {
    pub entry: ModelEntry,
    pub model: Arc<dyn AnomalyModel>,
    pub manifest: Manifest,
    pub maps: HashMap<ImageId, Arc<ScoreMap>>,
    pub skipped: Vec<String>,
}

/// What trains: the good training images, less those the labeller called defective or unsure (a person's word
/// on a part outranks its folder's), with how many were left out for each reason.
pub struct TrainingSet {
    pub records: Vec<ImageRecord>,
    pub labelled_defect: usize,
    pub labelled_unsure: usize,
}

impl TrainingSet {
    pub fn of(images: &[StudioImage], labels: &LabelSet) -> Self {
        let mut set = TrainingSet { records: Vec::new(), labelled_defect: 0, labelled_unsure: 0 };
        for image in images.iter().filter(|i| i.split == Split::Train && !i.label.is_anomalous()) {
            match labels.get(&image.label_key).and_then(|l| l.verdict) {
                Some(Verdict::Defect) => set.labelled_defect += 1,
                Some(Verdict::Unsure) => set.labelled_unsure += 1,
                Some(Verdict::Good) | None => set.records.push(ImageRecord::normal(image.path.clone())),
            }
        }
        set
    }

    /// "left out: 2 labelled defective, 1 unsure", or `None` when nothing was.
    pub fn left_out(&self) -> Option<String> {
        let parts: Vec<String> =
            [(self.labelled_defect, "labelled defective"), (self.labelled_unsure, "labelled unsure")]
                .into_iter()
                .filter(|(count, _)| *count > 0)
                .map(|(count, why)| format!("{count} {why}"))
                .collect();
        (!parts.is_empty()).then(|| format!("left out: {}", parts.join(", ")))
    }
}

/// A file name in `models/` that no existing model uses.
fn free_model_file(project_dir: &Path, method: &str) -> PathBuf {
    (1u64..)
        .map(|n| PathBuf::from("models").join(format!("{method}-{n}.safetensors")))
        .find(|relative| !resolve(project_dir, relative).exists())
        .expect("some file number is free")
}

/// Trains the chosen method on every good training image, saves the model beside the project, and evaluates it on
/// the test images.
pub fn train(
    project_dir: &Path,
    choice: &TrainingChoice,
    images: &[StudioImage],
    labels: &LabelSet,
    backbones: &BackboneCache,
    weights: &Path,
    progress: &dyn Progress,
) -> Result<Trained> {
    let method = find_method(&choice.method)?;
    let settings: serde_json::Value = serde_json::from_str(&choice.settings_json)
        .with_context(|| format!("the {} settings are not valid JSON", method.title))?;
    let device: DeviceChoice = choice.device.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let training = TrainingSet::of(images, labels);
    if let Some(left_out) = training.left_out() {
        progress.note(&format!("training images {left_out}"));
    }
    let records = training.records;
    if records.is_empty() {
        bail!("no good training images: import a folder of good images or a benchmark folder first");
    }
    let backbone = backbones.get(device, weights, progress)?;
    let mut request = FitRequest::new(method, project_dir.to_path_buf());
    request.settings = settings;
    request.image_size = choice.image_size;
    request.target_far = choice.target_far;
    request.geometry = choice.geometry.clone();
    let outcome = fit_records(backbone.clone(), &request, records, progress)?;
    let file = free_model_file(project_dir, method.name);
    let path = resolve(project_dir, &file);
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder).with_context(|| format!("{}: cannot create", folder.display()))?;
    }
    progress.begin("saving the model", 0);
    model_file::save(&path, outcome.model.as_ref(), &outcome.manifest)?;
    let model: Arc<dyn AnomalyModel> = Arc::from(outcome.model);
    // Stopped early (the user pressed Cancel during training): keep the best epoch's model, unevaluated.
    let evaluated = if progress.is_cancelled() {
        Evaluated { evaluations: BTreeMap::new(), inspected: BTreeMap::new(), maps: HashMap::new() }
    } else {
        let evaluated =
            evaluate_all(model.as_ref(), &outcome.manifest, images, (project_dir, labels), &backbone.device, progress)?;
        remember(&path, images, labels, &evaluated, progress);
        evaluated
    };
    let entry = ModelEntry {
        name: format!("{} {}", method.title, file.file_stem().unwrap_or_default().to_string_lossy()),
        method: method.name.to_string(),
        file,
        decision: outcome.manifest.thresholds.decision,
        review: outcome.manifest.thresholds.review,
        evaluations: evaluated.evaluations,
        inspected: evaluated.inspected,
        fit_seconds: outcome.manifest.training.fit_seconds,
        images_used: outcome.manifest.training.images_used,
    };
    let skipped = outcome.skipped.iter().map(ToString::to_string).collect();
    Ok(Trained { entry, model, manifest: outcome.manifest, maps: evaluated.maps, skipped })
}

pub struct Reloaded {
    pub model_index: usize,
    pub model: Arc<dyn AnomalyModel>,
    pub manifest: Manifest,
    pub evaluated: Evaluated,
}

/// Loads a project's model file and re-scores the test images (maps are not stored in the project).
pub fn reload(
    project_dir: &Path,
    project: &Project,
    model_index: usize,
    images: &[StudioImage],
    backbones: &BackboneCache,
    weights: &Path,
    progress: &dyn Progress,
) -> Result<Reloaded> {
    let entry = project.models.get(model_index).context("no such model")?;
    let device: DeviceChoice = project.training.device.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let backbone = backbones.get(device, weights, progress)?;
    progress.begin("loading the model", 0);
    let path = resolve(project_dir, &entry.file);
    let loaded = model_file::load(&path, backbone.clone())?;
    let model: Arc<dyn AnomalyModel> = Arc::from(loaded.model);
    let evaluated = match map_cache::load(&path, images, &project.labels) {
        Some(cached) => {
            progress.note("scores and heatmaps from the last evaluation: model, images and labels are unchanged");
            cached
        }
        None => {
            let labels = (project_dir, &project.labels);
            let evaluated = evaluate_all(model.as_ref(), &loaded.manifest, images, labels, &backbone.device, progress)?;
            remember(&path, images, &project.labels, &evaluated, progress);
            evaluated
        }
    };
    Ok(Reloaded { model_index, model, manifest: loaded.manifest, evaluated })
}

/// Keeps an evaluation for the next opening of the project; failing to is only worth a note.
fn remember(
    model_path: &Path,
    images: &[StudioImage],
    labels: &LabelSet,
    evaluated: &Evaluated,
    progress: &dyn Progress,
) {
    progress.begin("keeping the heatmaps for the next opening", 0);
    if let Err(error) = map_cache::store(model_path, images, labels, evaluated) {
        progress.note(&format!("{error:#}"));
    }
}

/// Rewrites a model file with the project's thresholds, so the threshold chosen in the studio travels with it.
pub fn write_thresholds(path: &Path, model: &dyn AnomalyModel, manifest: &Manifest, entry: &ModelEntry) -> Result<()> {
    let mut manifest = manifest.clone();
    manifest.thresholds.decision = entry.decision;
    manifest.thresholds.review = entry.review;
    manifest.thresholds.rule = "chosen in the studio".into();
    manifest.thresholds.chosen_by = ChosenBy::Studio;
    model_file::save(path, model, &manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_engine::labels::ImageLabel;

    fn image(path: &str, split: Split) -> StudioImage {
        StudioImage {
            id: ImageIds::default().of(Path::new(path)),
            path: path.into(),
            split,
            label: Label::Normal,
            mask: None,
            category: "parts".into(),
            label_key: format!("parts/{path}"),
            thumbnail: None,
            original_size: [1, 1],
            kept_input: None,
        }
    }

    /// The import's kept pixels are what decoding the file gives, for test images only, and only while the file
    /// is unchanged.
    #[test]
    fn the_import_keeps_test_pixels_that_equal_a_decode_until_the_file_changes() {
        use loupe_engine::dataset::decode_all;
        use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
        let dir = std::env::temp_dir().join(format!("loupe-kept-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        generate_mvtec(&dir, &SyntheticSpec::tiny(5)).unwrap();
        let size = 64;
        let progress = loupe_engine::progress::NoProgress;
        let imported = import(&dir, &[Source::Benchmark(dir.clone())], size, &ImageIds::default(), &progress).unwrap();
        let (tests, trains): (Vec<&StudioImage>, Vec<&StudioImage>) =
            imported.images.iter().partition(|image| image.split == Split::Test);
        assert!(trains.iter().all(|image| image.kept_input.is_none()), "training decodes its own");
        // Training images are listed from their headers: no thumbnail until the gallery shows them.
        for image in &trains {
            let (width, height) = image::image_dimensions(&image.path).unwrap();
            assert!(image.thumbnail.is_none() && image.original_size == [width as usize, height as usize]);
        }
        assert!(tests.iter().all(|image| image.thumbnail.is_some()));
        let records: Vec<ImageRecord> = tests.iter().map(|image| ImageRecord::normal(image.path.clone())).collect();
        let (decoded, _) = decode_all(&records, size, &|_| {});
        for (image, decoded) in tests.iter().zip(&decoded) {
            let kept = image.kept_input_at(size).expect("kept");
            assert_eq!((kept.rgb.as_slice(), kept.original_size), (decoded.rgb.as_slice(), decoded.original_size));
            assert!(image.kept_input_at(size * 2).is_none(), "another size decodes");
        }
        let touched = tests[0];
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&touched.path).unwrap().set_modified(later).unwrap();
        assert!(touched.kept_input_at(size).is_none(), "a changed file is read again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn images_the_labeller_called_defective_or_unsure_never_train() {
        let images = [
            image("a.png", Split::Train),
            image("b.png", Split::Train),
            image("c.png", Split::Train),
            image("d.png", Split::Train),
            image("e.png", Split::Test),
        ];
        let label = |verdict| ImageLabel { verdict: Some(verdict), ..Default::default() };
        let labels = LabelSet::from([
            ("parts/b.png".to_string(), label(Verdict::Defect)),
            ("parts/c.png".to_string(), label(Verdict::Unsure)),
            ("parts/d.png".to_string(), label(Verdict::Good)),
        ]);
        let set = TrainingSet::of(&images, &labels);
        let trained: Vec<&Path> = set.records.iter().map(|r| r.path.as_path()).collect();
        assert_eq!(trained, [Path::new("a.png"), Path::new("d.png")]);
        assert_eq!(set.left_out().unwrap(), "left out: 1 labelled defective, 1 labelled unsure");
        assert_eq!(TrainingSet::of(&images, &LabelSet::new()).left_out(), None);
    }
}
