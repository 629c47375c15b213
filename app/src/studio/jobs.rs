//! Long work off the UI thread. A [`Job`] runs one closure on its own thread and shares a [`JobStatus`] that the
//! UI reads each frame; the closure sees the engine's [`Progress`] interface, so the same engine code that draws
//! terminal bars in the CLI drives the studio's progress bar, ETA, curve and cancel button.

use loupe_engine::progress::{CancelFlag, Cancelled, Progress};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Notes kept for the log under the progress bar.
const MAX_NOTES: usize = 200;

#[derive(Debug, Clone)]
pub struct JobStatus {
    pub title: String,
    pub stage: String,
    pub done: u64,
    pub total: u64,
    pub started: Instant,
    pub stage_started: Instant,
    pub notes: Vec<String>,
    /// (seconds since the stage began, fraction done) for the current stage: the progress curve.
    pub progress_curve: Vec<[f64; 2]>,
    /// (report index, loss) for methods that report `loss <value>` notes while training.
    pub loss_curve: Vec<[f64; 2]>,
    /// The stages before the current one and their seconds (the last [`MAX_NOTES`]): where a job's time went.
    pub finished_stages: Vec<(String, f64)>,
}

impl JobStatus {
    fn new(title: &str) -> Self {
        let now = Instant::now();
        Self {
            title: title.to_string(),
            stage: "starting".into(),
            done: 0,
            total: 0,
            started: now,
            stage_started: now,
            notes: Vec::new(),
            progress_curve: Vec::new(),
            loss_curve: Vec::new(),
            finished_stages: Vec::new(),
        }
    }

    /// Every stage with its seconds so far, the current one included.
    pub fn stage_times(&self) -> Vec<(String, f64)> {
        let current = (self.stage.clone(), self.stage_started.elapsed().as_secs_f64());
        self.finished_stages.iter().cloned().chain([current]).collect()
    }

    /// Fraction of the current stage done, when its size is known.
    pub fn fraction(&self) -> Option<f32> {
        (self.total > 0).then(|| (self.done as f32 / self.total as f32).clamp(0.0, 1.0))
    }

    /// Time left in the current stage at the rate seen so far in it.
    pub fn eta(&self) -> Option<Duration> {
        if self.total == 0 || self.done == 0 || self.done >= self.total {
            return None;
        }
        let per_step = self.stage_started.elapsed().as_secs_f64() / self.done as f64;
        Some(Duration::from_secs_f64(per_step * (self.total - self.done) as f64))
    }
}

/// The engine's progress interface writing into a shared status and waking the UI.
struct SharedProgress {
    status: Arc<Mutex<JobStatus>>,
    cancel: CancelFlag,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl SharedProgress {
    fn status(&self) -> MutexGuard<'_, JobStatus> {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Progress for SharedProgress {
    fn begin(&self, stage: &str, total: u64) {
        {
            let mut status = self.status();
            if status.finished_stages.len() == MAX_NOTES {
                status.finished_stages.remove(0);
            }
            let finished = (std::mem::replace(&mut status.stage, stage.to_string()), status.stage_started.elapsed());
            status.finished_stages.push((finished.0, finished.1.as_secs_f64()));
            status.done = 0;
            status.total = total;
            status.stage_started = Instant::now();
            status.progress_curve.clear();
            status.progress_curve.push([0.0, 0.0]);
        }
        (self.wake)();
    }

    fn advance(&self, steps: u64) {
        {
            let mut status = self.status();
            status.done += steps;
            let seconds = status.stage_started.elapsed().as_secs_f64();
            let fraction = status.fraction().unwrap_or(0.0) as f64;
            status.progress_curve.push([seconds, fraction]);
        }
        (self.wake)();
    }

    fn note(&self, text: &str) {
        {
            let mut status = self.status();
            if status.notes.len() == MAX_NOTES {
                status.notes.remove(0);
            }
            status.notes.push(text.to_string());
        }
        (self.wake)();
    }

    fn loss(&self, epoch: usize, epochs: usize, value: f64) {
        {
            let mut status = self.status();
            let index = status.loss_curve.len() as f64;
            status.loss_curve.push([index, value]);
        }
        self.note(&format!("loss {value:.5} (epoch {} of {epochs})", epoch + 1));
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.is_set()
    }
}

/// How a job ended, when it did not succeed.
#[derive(Debug)]
pub enum JobFailure {
    Cancelled,
    Failed(String),
}

pub struct Job<T> {
    status: Arc<Mutex<JobStatus>>,
    cancel: CancelFlag,
    handle: Option<JoinHandle<anyhow::Result<T>>>,
}

impl<T: Send + 'static> Job<T> {
    /// Starts `work` on a new thread; `wake` is called whenever there is news (the studio passes a repaint).
    pub fn spawn(
        title: &str,
        wake: impl Fn() + Send + Sync + 'static,
        work: impl FnOnce(&dyn Progress) -> anyhow::Result<T> + Send + 'static,
    ) -> Self {
        let status = Arc::new(Mutex::new(JobStatus::new(title)));
        let cancel = CancelFlag::default();
        let progress = SharedProgress { status: status.clone(), cancel: cancel.clone(), wake: Box::new(wake) };
        let handle = std::thread::Builder::new()
            .name(format!("loupe job: {title}"))
            .spawn(move || {
                let result = work(&progress);
                (progress.wake)();
                result
            })
            .expect("the OS refused to start a worker thread");
        Self { status, cancel, handle: Some(handle) }
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_cancelling(&self) -> bool {
        self.cancel.is_set()
    }

    pub fn status(&self) -> JobStatus {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The result once the thread has ended; `None` while it runs (never blocks).
    pub fn try_finish(&mut self) -> Option<Result<T, JobFailure>> {
        if !self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            return None;
        }
        let joined = self.handle.take()?.join();
        Some(match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) if error.downcast_ref::<Cancelled>().is_some() => Err(JobFailure::Cancelled),
            Ok(Err(error)) => Err(JobFailure::Failed(format!("{error:#}"))),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(JobFailure::Failed(format!("internal error (please report): {message}")))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_engine::progress::check_cancelled;

    fn wait<T: Send + 'static>(job: &mut Job<T>) -> Result<T, JobFailure> {
        loop {
            if let Some(result) = job.try_finish() {
                return result;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn progress_notes_and_losses_reach_the_status() {
        let mut job = Job::spawn(
            "t",
            || {},
            |progress| {
                progress.begin("training", 4);
                progress.advance(1);
                progress.loss(0, 2, 2.5);
                progress.loss(1, 2, 1.25);
                progress.note("42 images");
                progress.advance(1);
                Ok(7)
            },
        );
        assert_eq!(wait(&mut job).unwrap(), 7);
        let status = job.status();
        assert_eq!((status.stage.as_str(), status.done, status.total), ("training", 2, 4));
        assert_eq!(status.fraction(), Some(0.5));
        assert_eq!(status.loss_curve, vec![[0.0, 2.5], [1.0, 1.25]]);
        assert_eq!(status.notes.len(), 3);
    }

    #[test]
    fn cancel_and_panic_end_the_job_with_their_reason() {
        let mut job = Job::spawn(
            "c",
            || {},
            |progress| loop {
                check_cancelled(progress)?;
                std::thread::sleep(Duration::from_millis(1));
            },
        );
        job.cancel();
        assert!(matches!(wait::<()>(&mut job), Err(JobFailure::Cancelled)));
        let mut job = Job::spawn("p", || {}, |_| -> anyhow::Result<()> { panic!("boom") });
        match wait(&mut job) {
            Err(JobFailure::Failed(message)) => assert!(message.contains("boom"), "{message}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
