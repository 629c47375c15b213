//! `loupe studio` (and `loupe` alone): the studio window.

use loupe::studio::{run as run_studio, StudioOptions, View};
use std::path::PathBuf;

#[derive(clap::Args, Default)]
pub struct StudioArgs {
    /// Project file to open (default: the last one, else the demo project).
    pub project: Option<PathBuf>,
    /// Backbone weights (default: $LOUPE_WEIGHTS or the user cache).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Train the project's chosen method as soon as its images are imported.
    #[arg(long)]
    pub auto_train: bool,
    /// Close the window when no work is left (with --auto-train: a scripted measurement).
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Write UI frame-time statistics and every finished job's stages with their seconds (JSON) here on exit.
    #[arg(long)]
    pub frame_stats: Option<PathBuf>,
    /// The view to show first and keep: train, gallery, inspector, threshold or benchmark.
    #[arg(long, value_parser = parse_view)]
    pub view: Option<View>,
    /// Start in presentation mode (full screen; Esc returns to the studio).
    #[arg(long)]
    pub present: bool,
}

fn parse_view(name: &str) -> Result<View, String> {
    View::ALL
        .into_iter()
        .find(|v| v.title().eq_ignore_ascii_case(name))
        .ok_or_else(|| format!("no view “{name}”: train, gallery, inspector, threshold or benchmark"))
}

pub fn run(args: StudioArgs) -> anyhow::Result<()> {
    run_studio(StudioOptions {
        project: args.project,
        weights: args.weights.unwrap_or_else(loupe_engine::backbone::weights::default_weights_path),
        remember_last: true,
        auto_train: args.auto_train,
        exit_when_idle: args.exit_when_idle,
        frame_stats: args.frame_stats,
        view: args.view,
        present: args.present,
    })
}
