//! [`Studio`]: the open project and what is held in memory for it — what every view draws from.

use super::*;

/// The open project and everything held in memory for it.
pub struct Studio {
    pub project: Project,
    pub path: PathBuf,
    pub images: Vec<StudioImage>,
    /// The ids of `images` (and of every path the project's evaluations name).
    pub image_ids: ImageIds,
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
    pub(super) fn new(project: Project, path: PathBuf) -> Self {
        let image_ids = ImageIds::default();
        let runtimes = project.models.iter().map(|entry| ModelRuntime::from_entry(entry, &image_ids)).collect();
        Self {
            project,
            path,
            images: Vec::new(),
            image_ids,
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
        self.active_runtime()?.scores.get(&image.id).copied()
    }
}
