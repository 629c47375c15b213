//! How long the UI thread spends building each frame — the figure that says whether the window stays fluid while
//! a model trains. Shown in the status bar; written as JSON on exit when asked (`loupe studio --frame-stats`).

use std::time::Duration;

const WINDOW: usize = 600;

#[derive(Default)]
pub struct FrameStats {
    /// Recent frames: (milliseconds, a job was running).
    recent: Vec<(f64, bool)>,
    next: usize,
    /// All frames while a job ran, for the exit report.
    during_jobs: Vec<f64>,
    all: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values
}

impl FrameStats {
    pub fn record(&mut self, spent: Duration, job_running: bool) {
        let ms = spent.as_secs_f64() * 1000.0;
        if self.recent.len() < WINDOW {
            self.recent.push((ms, job_running));
        } else {
            self.recent[self.next] = (ms, job_running);
        }
        self.next = (self.next + 1) % WINDOW;
        self.all.push(ms);
        if job_running {
            self.during_jobs.push(ms);
        }
    }

    pub fn summary(&self) -> String {
        let values = sorted(self.recent.iter().map(|(ms, _)| *ms));
        format!("UI {:.1} ms/frame (p99 {:.1})", percentile(&values, 0.5), percentile(&values, 0.99))
    }

    pub fn to_json(&self) -> String {
        let describe = |values: &[f64]| {
            let values = sorted(values.iter().copied());
            serde_json::json!({
                "frames": values.len(),
                "median_ms": percentile(&values, 0.5),
                "p99_ms": percentile(&values, 0.99),
                "max_ms": values.last().copied().unwrap_or(0.0),
                "over_16ms": values.iter().filter(|&&v| v > 16.0).count(),
            })
        };
        serde_json::to_string_pretty(&serde_json::json!({
            "all": describe(&self.all),
            "while_a_job_ran": describe(&self.during_jobs),
        }))
        .expect("JSON of numbers")
    }
}
