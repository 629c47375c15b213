//! How long work reports progress and learns it should stop. The CLI draws bars from it; the studio shows a
//! progress bar with a cancel button; tests pass `NoProgress`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub trait Progress: Sync {
    /// A new stage starts, with `total` steps (0 when unknown).
    fn begin(&self, stage: &str, total: u64);
    /// `steps` more of the current stage are done.
    fn advance(&self, steps: u64);
    /// A short status line (a count, a skipped file).
    fn note(&self, _text: &str) {}
    /// A training epoch's mean loss, as a number (the studio plots it); by default, a note.
    fn loss(&self, epoch: usize, epochs: usize, value: f64) {
        self.note(&format!("loss {value:.5} (epoch {} of {epochs})", epoch + 1));
    }
    /// Polled between steps; long work returns `Cancelled` soon after this turns true.
    fn is_cancelled(&self) -> bool {
        false
    }
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _stage: &str, _total: u64) {}
    fn advance(&self, _steps: u64) {}
}

/// A flag shared between the one who asks to stop and the worker.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// Returns `Err(Cancelled)` when the user asked to stop.
pub fn check_cancelled(progress: &dyn Progress) -> Result<(), Cancelled> {
    if progress.is_cancelled() {
        Err(Cancelled)
    } else {
        Ok(())
    }
}
