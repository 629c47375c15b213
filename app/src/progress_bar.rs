//! The engine's progress interface drawn as indicatif bars on stderr.

use indicatif::{ProgressBar, ProgressStyle};
use loupe_engine::progress::Progress;
use std::sync::Mutex;

pub struct TerminalProgress {
    bar: Mutex<Option<ProgressBar>>,
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self { bar: Mutex::new(None) }
    }

    pub fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}

impl Progress for TerminalProgress {
    fn begin(&self, stage: &str, total: u64) {
        let mut slot = self.bar.lock().expect("progress lock");
        if let Some(previous) = slot.take() {
            previous.finish_and_clear();
        }
        let bar = if total == 0 { ProgressBar::new_spinner() } else { ProgressBar::new(total) };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        *slot = Some(bar);
    }

    fn advance(&self, steps: u64) {
        if let Some(bar) = self.bar.lock().expect("progress lock").as_ref() {
            bar.inc(steps);
        }
    }

    fn note(&self, text: &str) {
        if let Some(bar) = self.bar.lock().expect("progress lock").as_ref() {
            bar.set_message(text.to_string());
        }
    }
}
