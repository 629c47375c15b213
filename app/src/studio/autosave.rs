//! Saving: the autosave's timing, the project written by the background saver, model files rewritten with
//! the project's thresholds, Save as (which re-roots relative paths).

use super::*;

impl StudioApp {
    /// Whether a loaded model's file does not yet hold the project's thresholds.
    pub(super) fn model_writes_pending(&self) -> bool {
        self.studio.project.models.iter().zip(&self.studio.runtimes).any(|(entry, runtime)| {
            runtime
                .manifest
                .as_ref()
                .is_some_and(|m| (m.thresholds.decision, m.thresholds.review) != (entry.decision, entry.review))
        })
    }

    pub(super) fn autosave(&mut self, ctx: &egui::Context) {
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

    pub(super) fn queue_save(&mut self) {
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
    pub(super) fn queue_model_writes(&mut self) {
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

    pub(super) fn note_written_models(&mut self) {
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
    pub(super) fn flush_save(&mut self) {
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

    /// Moves the project to `path`, re-rooting relative paths so they still point at the same files.
    pub(super) fn save_as(&mut self, path: PathBuf) {
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
}
