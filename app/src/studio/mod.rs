//! The studio window: import images, train a method, inspect heatmaps drawn by a WGSL shader, drag the decision
//! threshold and watch FAR/MAR move, compare models on benchmark folders.
//!
//! [`StudioApp`] owns the window-wide state and the background work; each view lives in `views/` and draws from a
//! [`Studio`] (the project and what is held in memory for it); reusable widgets (the GPU heatmap overlay) live in
//! `widgets/`.

mod autosave;
pub mod demo;
mod exports;
mod frame_stats;
mod image_loader;
mod job_flow;
pub mod jobs;
mod map_cache;
pub mod mask_edits;
mod menu;
mod panels;
mod presenting;
pub mod saver;
mod state;
pub mod thumbnails;
pub mod views;
pub mod widgets;
pub mod workspace;

use job_flow::JobOutput;
use menu::DialogResult;
use panels::{Message, MessageKind};
pub use state::Studio;

use crate::project::label_files;
use crate::project::{relative_to, resolve, sources, Project, Source};
use anyhow::Result;
use eframe::egui;
use frame_stats::FrameStats;
use image_loader::ImageLoader;
use jobs::{Job, JobFailure};
use loupe_engine::device::DeviceChoice;
use loupe_engine::evaluate::EvalReport;
use loupe_engine::methods::AnomalyModel;
use loupe_engine::model_file::Manifest;
use saver::{AutosavePolicy, Saver};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use thumbnails::Thumbnails;
pub use views::View;
use workspace::{BackboneCache, ImageIds, Imported, ModelRuntime, Reloaded, StudioImage, Trained};

pub struct StudioOptions {
    /// The project to open; `None` opens the last one, else the demo project.
    pub project: Option<PathBuf>,
    pub weights: PathBuf,
    /// Record the opened project as "last" (the real window does; tests do not).
    pub remember_last: bool,
    /// Start training as soon as the images are imported (for measurements and screenshots).
    pub auto_train: bool,
    /// Close the window once nothing is running (after `auto_train`).
    pub exit_when_idle: bool,
    /// Write frame-time statistics here as JSON when the window closes.
    pub frame_stats: Option<PathBuf>,
    /// The view shown first (and after training); `None`: the gallery, then the threshold panel after training.
    pub view: Option<View>,
    /// Open in presentation mode.
    pub present: bool,
}

pub struct StudioApp {
    pub studio: Studio,
    view: View,
    /// The view was chosen on the command line: training does not switch away from it.
    fixed_view: bool,
    /// Presentation mode (full screen, the presentation alone): F5 or Project ▸ Present, Esc leaves.
    presenting: bool,
    /// The window's size before presentation mode sized it to the monitor by hand (see `fill_the_screen`).
    windowed_size: Option<egui::Vec2>,
    /// At most one background job; opening another project cancels it and drops its result.
    job: Option<Job<JobOutput>>,
    messages: Vec<Message>,
    saver: Saver,
    loader: ImageLoader,
    thumbnails: Thumbnails,
    backbones: BackboneCache,
    weights: PathBuf,
    gpu_overlay: bool,
    frame_stats: FrameStats,
    frame_stats_path: Option<PathBuf>,
    frame_stats_written: Instant,
    tiles_uploaded: usize,
    auto_train: bool,
    exit_when_idle: bool,
    dialogs: (mpsc::Sender<DialogResult>, mpsc::Receiver<DialogResult>),
    path_input: String,
    /// The source being relinked and the folder typed for it.
    relinking: Option<(usize, String)>,
    views: views::Views,
}

impl StudioApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: StudioOptions) -> Self {
        let gpu_overlay = match cc.wgpu_render_state.as_ref() {
            Some(render_state) => {
                widgets::heatmap::install(render_state);
                true
            }
            None => false,
        };
        let (project, path, errors) = demo::first_project(options.project.clone());
        let messages = errors.into_iter().map(|text| Message { kind: MessageKind::Error, text, details: Vec::new() });
        let messages = messages.collect();
        if options.remember_last {
            demo::remember_last_project(&path);
        }
        let mut app = Self {
            studio: Studio::new(project, path),
            view: options.view.unwrap_or(View::Gallery),
            fixed_view: options.view.is_some(),
            presenting: options.present,
            windowed_size: None,
            job: None,
            messages,
            saver: Saver::spawn(cc.egui_ctx.clone()),
            loader: ImageLoader::spawn(cc.egui_ctx.clone()),
            thumbnails: Thumbnails::default(),
            backbones: BackboneCache::default(),
            weights: options.weights,
            gpu_overlay,
            frame_stats: FrameStats::default(),
            frame_stats_path: options.frame_stats,
            frame_stats_written: Instant::now(),
            tiles_uploaded: 0,
            auto_train: options.auto_train,
            exit_when_idle: options.exit_when_idle,
            dialogs: mpsc::channel(),
            path_input: String::new(),
            relinking: None,
            views: views::Views::default(),
        };
        app.start_import(&cc.egui_ctx);
        app
    }

    /// True when no background work is running or waiting to be saved.
    pub fn is_idle(&self) -> bool {
        self.job.is_none()
            && !self.saver.is_busy()
            && self.studio.revision == self.saver.saved_revision()
            && !self.model_writes_pending()
            && !self.thumbnails.is_loading()
    }

    /// Whether the inspector has image `index` decoded and uploaded.
    pub fn is_image_loaded(&self, index: usize) -> bool {
        self.studio.images.get(index).is_some_and(|image| self.loader.is_ready(&image.path))
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.iter().map(|m| m.text.clone()).collect()
    }

    pub fn weights_present(&self) -> bool {
        self.weights.is_file()
    }

    fn error(&mut self, text: impl Into<String>) {
        self.messages.push(Message { kind: MessageKind::Error, text: text.into(), details: Vec::new() });
    }

    fn write_frame_stats(&mut self) {
        self.frame_stats_written = Instant::now();
        if let Some(path) = &self.frame_stats_path {
            if let Err(error) = loupe_engine::atomic_file::write_atomic(path, self.frame_stats.to_json().as_bytes()) {
                eprintln!("cannot write frame statistics: {error:#}");
            }
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.finish_job(ctx);
        self.handle_dialogs(ctx);
        self.handle_dropped_files(ctx);
        self.tiles_uploaded = self.loader.receive(ctx);
        self.thumbnails.begin_frame(ctx);
        self.autosave(ctx);
        if self.exit_when_idle && self.job.is_none() && !self.auto_train && self.is_idle() {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        if ctx.input(|i| i.viewport().close_requested()) {
            self.flush_save();
        }
        // Also every few seconds, so a measurement survives the window being killed.
        if self.frame_stats_path.is_some() {
            if self.frame_stats_written.elapsed() > Duration::from_secs(5) {
                self.write_frame_stats();
            }
            ctx.request_repaint_after(Duration::from_secs(5));
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let started = Instant::now();
        let (f5, escape) = ui.input(|i| (i.key_pressed(egui::Key::F5), i.key_pressed(egui::Key::Escape)));
        if f5 || (escape && self.presenting) {
            self.present(ui.ctx(), !self.presenting);
        }
        if self.presenting {
            self.fill_the_screen(ui.ctx());
        } else {
            egui::Panel::top("menu").show(ui, |ui| {
                self.menu_bar(ui);
                self.banners(ui);
            });
            egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
            egui::Panel::left("project").resizable(true).default_size(220.0).show(ui, |ui| self.project_panel(ui));
        }
        let context = views::ViewContext {
            job: self.job.as_ref().map(Job::status),
            gpu_overlay: self.gpu_overlay,
            weights_present: self.weights_present(),
        };
        let mut actions = Vec::new();
        let view = (!self.presenting).then_some(self.view);
        egui::CentralPanel::default_margins().show(ui, |ui| {
            let shared = (&mut self.studio, &mut self.thumbnails, &mut self.loader, &context, &mut actions);
            self.views.show(ui, view, shared);
        });
        self.handle_actions(ui.ctx(), actions);
        self.frame_stats.record(started.elapsed(), frame.info().cpu_usage, self.job.is_some(), self.tiles_uploaded);
    }

    fn on_exit(&mut self) {
        self.flush_save();
        self.write_frame_stats();
    }
}

impl StudioApp {}

/// Opens the studio window.
pub fn run(options: StudioOptions) -> Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1360.0, 860.0])
            .with_fullscreen(options.present)
            .with_title("Loupe")
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    eframe::run_native("Loupe", native, Box::new(|cc| Ok(Box::new(StudioApp::new(cc, options))))).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the studio window: {e}\n(without a display, `loupe demo` runs the same job on the demo \
                 data from the command line)"
        )
    })
}
