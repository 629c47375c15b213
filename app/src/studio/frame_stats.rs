//! How long frames take — the figure that says whether the window stays fluid while a model trains. Two clocks:
//! the time our `ui` code takes, and eframe's whole-frame CPU time (ui + tessellation + GPU submission, texture
//! uploads included, vsync excluded), which eframe reports one frame late. Shown in the status bar; written as
//! JSON on exit when asked (`loupe studio --frame-stats`), with each finished job's stages and their seconds.

use std::time::Duration;

const RECENT: usize = 600;

#[derive(Clone, Copy)]
struct Sample {
    /// Seconds since the window opened.
    at: f64,
    ui_ms: f64,
    /// Whole previous frame, when eframe reported it.
    frame_ms: Option<f64>,
    job_running: bool,
    /// Image tiles uploaded to the GPU in this frame.
    tiles_uploaded: usize,
}

pub struct FrameStats {
    samples: Vec<Sample>,
    opened: std::time::Instant,
    /// (job title, stage, seconds) of every finished job: where the time of opening or training went.
    job_stages: Vec<(String, String, f64)>,
}

impl Default for FrameStats {
    fn default() -> Self {
        Self { samples: Vec::new(), opened: std::time::Instant::now(), job_stages: Vec::new() }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn describe(values: impl Iterator<Item = f64>) -> serde_json::Value {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    serde_json::json!({
        "frames": values.len(),
        "median_ms": percentile(&values, 0.5),
        "p99_ms": percentile(&values, 0.99),
        "max_ms": values.last().copied().unwrap_or(0.0),
        "over_16ms": values.iter().filter(|&&v| v > 16.0).count(),
    })
}

impl FrameStats {
    pub fn record(
        &mut self,
        ui_time: Duration,
        previous_frame_seconds: Option<f32>,
        job_running: bool,
        tiles_uploaded: usize,
    ) {
        self.samples.push(Sample {
            at: self.opened.elapsed().as_secs_f64(),
            ui_ms: ui_time.as_secs_f64() * 1000.0,
            frame_ms: previous_frame_seconds.map(|s| s as f64 * 1000.0),
            job_running,
            tiles_uploaded,
        });
    }

    pub fn record_job(&mut self, title: &str, stages: Vec<(String, f64)>) {
        self.job_stages.extend(stages.into_iter().map(|(stage, seconds)| (title.to_string(), stage, seconds)));
    }

    pub fn summary(&self) -> String {
        let recent = &self.samples[self.samples.len().saturating_sub(RECENT)..];
        let mut frames: Vec<f64> = recent.iter().filter_map(|s| s.frame_ms).collect();
        frames.sort_by(f64::total_cmp);
        format!("frame {:.1} ms (p99 {:.1})", percentile(&frames, 0.5), percentile(&frames, 0.99))
    }

    pub fn to_json(&self) -> String {
        let during = || self.samples.iter().filter(|s| s.job_running);
        // The whole-frame time arrives one frame late: pair each with the frame it measured.
        let measured = || self.samples.windows(2).filter_map(|w| w[1].frame_ms.map(|ms| (w[0], ms)));
        let mut slowest: Vec<(f64, f64)> = measured().map(|(sample, ms)| (sample.at, ms)).collect();
        slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        slowest.truncate(5);
        serde_json::to_string_pretty(&serde_json::json!({
            "ui_all": describe(self.samples.iter().map(|s| s.ui_ms)),
            "frame_all": describe(self.samples.iter().filter_map(|s| s.frame_ms)),
            "ui_while_a_job_ran": describe(during().map(|s| s.ui_ms)),
            "frame_while_a_job_ran": describe(during().filter_map(|s| s.frame_ms)),
            // Frames of looking around (zoom, pan, browsing) once the work is done.
            "frame_without_a_job": describe(measured().filter(|(s, _)| !s.job_running).map(|(_, ms)| ms)),
            "frame_uploading_image_tiles": describe(measured().filter(|(s, _)| s.tiles_uploaded > 0).map(|(_, ms)| ms)),
            "slowest_frames_at_seconds_ms": slowest,
            "job_stages_seconds": self.job_stages,
        }))
        .expect("JSON of numbers")
    }
}
