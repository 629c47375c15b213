//! One file per view; [`show`] draws the one the tab bar selected. Views change the [`Studio`] directly and ask the
//! app for anything that starts background work through [`Action`]s.

mod benchmark;
pub mod gallery;
mod inspector;
pub mod present;
mod threshold;
mod train;

use super::image_loader::ImageLoader;
use super::jobs::JobStatus;
use super::Studio;
use eframe::egui;
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Train,
    Gallery,
    Inspector,
    Threshold,
    Benchmark,
}

impl View {
    pub const ALL: [View; 5] = [View::Train, View::Gallery, View::Inspector, View::Threshold, View::Benchmark];

    pub fn title(self) -> &'static str {
        match self {
            View::Train => "Train",
            View::Gallery => "Gallery",
            View::Inspector => "Inspector",
            View::Threshold => "Threshold",
            View::Benchmark => "Benchmark",
        }
    }
}

/// What a view asks the app to do.
pub enum Action {
    Train,
    CancelJob,
    Inspect(usize),
    /// Score the active model again, on the folders and on the labeller's current labels.
    Reevaluate,
    /// Load a model that is not the active one (its scores and maps), for a side-by-side comparison.
    LoadModel(usize),
}

/// Read-only facts about the app a view may show.
pub struct ViewContext {
    pub job: Option<JobStatus>,
    pub gpu_overlay: bool,
    pub weights_present: bool,
}

/// Per-view state that lives as long as the project is open.
#[derive(Default)]
pub struct ViewStates {
    pub gallery: gallery::GalleryState,
    pub inspector: inspector::InspectorState,
    pub threshold: threshold::ThresholdState,
    pub present: present::PresentState,
}

#[allow(clippy::too_many_arguments)]
pub fn show(
    ui: &mut egui::Ui,
    view: View,
    studio: &mut Studio,
    states: &mut ViewStates,
    thumbnails: &mut HashMap<usize, egui::TextureHandle>,
    loader: &mut ImageLoader,
    context: &ViewContext,
    actions: &mut Vec<Action>,
) {
    match view {
        View::Train => train::show(ui, studio, context, actions),
        View::Gallery => gallery::show(ui, studio, &mut states.gallery, thumbnails, actions),
        View::Inspector => {
            let order = states.gallery.order(studio);
            inspector::show(ui, studio, &mut states.inspector, loader, &order, context)
        }
        View::Threshold => threshold::show(ui, studio, &mut states.threshold, context, actions),
        View::Benchmark => benchmark::show(ui, studio, context, actions),
    }
}

pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds >= 3600 {
        format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60)
    } else if seconds >= 60 {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

pub fn percent(rate: Option<f64>) -> String {
    rate.map(|r| format!("{:.2} %", r * 100.0)).unwrap_or_else(|| "—".into())
}

pub fn metric(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into())
}
