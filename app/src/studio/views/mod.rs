//! One file per view, each a [`StudioView`] owning its state; [`Views::show`] draws the one the tab bar selected
//! (or the presentation). Views change the [`Studio`] directly and ask the app for anything that starts background
//! work through [`Action`]s.

mod benchmark;
pub mod gallery;
mod inspector;
pub mod present;
mod threshold;
mod train;

use super::image_loader::ImageLoader;
use super::jobs::JobStatus;
use super::thumbnails::Thumbnails;
use super::Studio;
use eframe::egui;
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

/// What a view draws from besides its own state: the studio, the parts of the app every view may use, and the
/// list it pushes its requests on.
pub struct ViewFrame<'a> {
    pub studio: &'a mut Studio,
    /// The gallery's sort and filters: the inspector's left/right arrows step through the same order.
    pub browse: &'a mut gallery::GalleryState,
    pub thumbnails: &'a mut Thumbnails,
    pub loader: &'a mut ImageLoader,
    pub context: &'a ViewContext,
    pub actions: &'a mut Vec<Action>,
}

/// One view of the studio, owning its state (the shape of egui's demo windows).
pub trait StudioView {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut ViewFrame<'_>);
}

/// Every view with its state, alive as long as the project is open.
pub struct Views {
    pub browse: gallery::GalleryState,
    train: train::TrainView,
    gallery: gallery::GalleryView,
    inspector: inspector::InspectorState,
    threshold: threshold::ThresholdState,
    benchmark: benchmark::BenchmarkView,
    /// Presentation mode: not a tab, the whole window (see `StudioApp::present`).
    pub present: present::PresentState,
}

impl Default for Views {
    fn default() -> Self {
        Self {
            browse: Default::default(),
            train: train::TrainView,
            gallery: gallery::GalleryView,
            inspector: Default::default(),
            threshold: Default::default(),
            benchmark: benchmark::BenchmarkView,
            present: Default::default(),
        }
    }
}

impl Views {
    /// Draws `view` (`None`: the presentation) with the frame's shared parts.
    pub fn show(&mut self, ui: &mut egui::Ui, view: Option<View>, shared: SharedParts<'_>) {
        let (studio, thumbnails, loader, context, actions) = shared;
        let mut frame = ViewFrame { studio, browse: &mut self.browse, thumbnails, loader, context, actions };
        let shown: &mut dyn StudioView = match view {
            Some(View::Train) => &mut self.train,
            Some(View::Gallery) => &mut self.gallery,
            Some(View::Inspector) => &mut self.inspector,
            Some(View::Threshold) => &mut self.threshold,
            Some(View::Benchmark) => &mut self.benchmark,
            None => &mut self.present,
        };
        shown.ui(ui, &mut frame);
    }
}

/// The app's parts a frame lends the views.
pub type SharedParts<'a> =
    (&'a mut Studio, &'a mut Thumbnails, &'a mut ImageLoader, &'a ViewContext, &'a mut Vec<Action>);

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
