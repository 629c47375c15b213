//! Writes projects and model files on a background thread: an atomic save (temp file, fsync, rename) can take
//! tens of milliseconds on a slow disk, which the UI thread must not wait for. A failed save leaves the previous
//! file intact, is reported, and is retried after a pause; the edits stay in memory meanwhile.

use super::workspace::write_thresholds;
use crate::project::ModelEntry;
use anyhow::Context;
use eframe::egui;
use loupe_engine::labels::mask::DefectMask;
use loupe_engine::methods::AnomalyModel;
use loupe_engine::model_file::Manifest;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A save waits for this much quiet after the last change, so a burst of edits is written once …
const QUIET_BEFORE_SAVE: Duration = Duration::from_millis(300);
/// … but no change waits longer than this to be written, however long the burst.
const LONGEST_UNSAVED: Duration = Duration::from_millis(700);

/// When the project is due to be written: after a short quiet spell, and at the latest `LONGEST_UNSAVED`
/// after the first change not yet written — so every change is on disk within a second while edits go on.
#[derive(Debug, Default)]
pub struct AutosavePolicy {
    last_change: Option<Instant>,
    unsaved_since: Option<Instant>,
}

impl AutosavePolicy {
    pub fn changed(&mut self) {
        let now = Instant::now();
        self.last_change = Some(now);
        self.unsaved_since.get_or_insert(now);
    }

    /// Whether to queue a save now, given the saver's state; the caller queues it at once when true.
    pub fn due(&mut self, saver: &Saver, revision: u64) -> bool {
        if revision == saver.saved_revision() {
            self.unsaved_since = None;
            return false;
        }
        let quiet = self.last_change.is_none_or(|t| t.elapsed() >= QUIET_BEFORE_SAVE);
        let overdue = self.unsaved_since.is_some_and(|t| t.elapsed() >= LONGEST_UNSAVED);
        (quiet || overdue) && !saver.is_busy() && !saver.recently_failed()
    }

    /// How long until `due` can turn true, for a repaint request (nothing else may wake the UI).
    pub fn wake_after() -> Duration {
        QUIET_BEFORE_SAVE
    }
}

enum Request {
    /// The masks are written first: the project file refers to them.
    Project {
        path: PathBuf,
        text: String,
        revision: u64,
        masks: Vec<(PathBuf, Arc<DefectMask>)>,
        /// Mask files the project no longer names, deleted once it is written.
        superseded: Vec<PathBuf>,
    },
    Model {
        path: PathBuf,
        model: Arc<dyn AnomalyModel>,
        manifest: Box<Manifest>,
        entry: Box<ModelEntry>,
    },
}

fn write_project(path: &Path, text: &str, masks: &[(PathBuf, Arc<DefectMask>)]) -> anyhow::Result<()> {
    for (mask_path, mask) in masks {
        if let Some(folder) = mask_path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("{}: cannot create the folder", folder.display()))?;
        }
        mask.write(mask_path)?;
    }
    loupe_engine::atomic_file::write_atomic(path, text.as_bytes())
}

/// A model file's decision and review thresholds.
pub type WrittenThresholds = (Option<f32>, Option<f32>);

enum Done {
    Project { revision: u64, result: Result<(), String> },
    Model { path: PathBuf, thresholds: WrittenThresholds, result: Result<(), String> },
}

pub struct Saver {
    requests: mpsc::Sender<Request>,
    done: mpsc::Receiver<Done>,
    in_flight: usize,
    saved_revision: u64,
    failed_at: Option<Instant>,
    /// Model files written since [`Saver::take_written_models`] was last called, with the thresholds they hold.
    written_models: Vec<(PathBuf, WrittenThresholds)>,
}

impl Saver {
    pub fn spawn(ctx: egui::Context) -> Self {
        let (requests, inbox) = mpsc::channel::<Request>();
        let (outbox, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("loupe saver".into())
            .spawn(move || {
                // Superseded masks wait here until a project that does not name them is on disk: a failed save
                // keeps them for the next one.
                let mut to_delete: Vec<PathBuf> = Vec::new();
                for request in inbox {
                    let finished = match request {
                        Request::Project { path, text, revision, masks, superseded } => {
                            to_delete.extend(superseded);
                            let result = write_project(&path, &text, &masks).map_err(|e| format!("{e:#}"));
                            if result.is_ok() {
                                for file in to_delete.drain(..) {
                                    // Already gone (never written: replaced before a save) is fine.
                                    let _ = std::fs::remove_file(file);
                                }
                            }
                            Done::Project { revision, result }
                        }
                        Request::Model { path, model, manifest, entry } => Done::Model {
                            result: write_thresholds(&path, model.as_ref(), &manifest, &entry)
                                .map_err(|e| format!("{}: {e:#}", path.display())),
                            thresholds: (entry.decision, entry.review),
                            path,
                        },
                    };
                    if outbox.send(finished).is_err() {
                        break;
                    }
                    ctx.request_repaint();
                }
            })
            .expect("the OS refused to start the saver thread");
        Self { requests, done, in_flight: 0, saved_revision: 0, failed_at: None, written_models: Vec::new() }
    }

    /// Writes `masks` (each atomically), then the project text; a failure leaves the project file as it was.
    /// After a successful write, deletes the `superseded` mask files (of this and earlier failed requests).
    pub fn save_project(
        &mut self,
        path: PathBuf,
        text: String,
        revision: u64,
        masks: Vec<(PathBuf, Arc<DefectMask>)>,
        superseded: Vec<PathBuf>,
    ) {
        self.send(Request::Project { path, text, revision, masks, superseded });
    }

    pub fn save_model(&mut self, path: PathBuf, model: Arc<dyn AnomalyModel>, manifest: Manifest, entry: ModelEntry) {
        self.send(Request::Model { path, model, manifest: Box::new(manifest), entry: Box::new(entry) });
    }

    fn send(&mut self, request: Request) {
        if self.requests.send(request).is_ok() {
            self.in_flight += 1;
        }
    }

    pub fn is_busy(&self) -> bool {
        self.in_flight > 0
    }

    /// The project revision last written successfully.
    pub fn saved_revision(&self) -> u64 {
        self.saved_revision
    }

    /// The model files written successfully since the last call, and the thresholds each now holds: only then
    /// does the studio count a threshold as travelling with its model (a failed write is retried).
    pub fn take_written_models(&mut self) -> Vec<(PathBuf, WrittenThresholds)> {
        std::mem::take(&mut self.written_models)
    }

    pub fn recently_failed(&self) -> bool {
        self.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER)
    }

    fn absorb(&mut self, done: Done) -> Result<(), String> {
        self.in_flight -= 1;
        let result = match done {
            Done::Project { revision, result } => {
                if result.is_ok() {
                    self.saved_revision = self.saved_revision.max(revision);
                }
                result
            }
            Done::Model { path, thresholds, result } => {
                if result.is_ok() {
                    self.written_models.push((path, thresholds));
                }
                result
            }
        };
        self.failed_at = if result.is_err() { Some(Instant::now()) } else { None };
        result
    }

    /// Results that arrived since the last call, without waiting.
    pub fn poll(&mut self) -> Vec<Result<(), String>> {
        let mut results = Vec::new();
        while let Ok(done) = self.done.try_recv() {
            results.push(self.absorb(done));
        }
        results
    }

    /// Waits for every queued write (bounded, so a hung disk cannot freeze closing forever).
    pub fn wait(&mut self) -> Vec<Result<(), String>> {
        let mut results = Vec::new();
        while self.in_flight > 0 {
            match self.done.recv_timeout(Duration::from_secs(30)) {
                Ok(done) => results.push(self.absorb(done)),
                Err(_) => {
                    results.push(Err("saving takes longer than 30 s; giving up waiting".into()));
                    break;
                }
            }
        }
        results
    }
}
