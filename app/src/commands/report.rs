//! `loupe report --project P.ron [--model NAME] --out report.html`: the report of one of the project's models
//! (see `crate::report`), evaluated on the project's test images if the project holds no evaluation of it.

use super::EngineArgs;
use crate::progress_bar::TerminalProgress;
use anyhow::{Context, Result};
use loupe_engine::project::Project;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The project file (.ron) the studio saved.
    #[arg(long)]
    pub project: PathBuf,
    /// The model to report on, by its name in the project (default: the active model).
    #[arg(long)]
    pub model: Option<String>,
    /// The HTML file to write.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: ReportArgs) -> Result<()> {
    let project = Project::load(&args.project)?;
    let project_dir = args.project.parent().map(PathBuf::from).unwrap_or_default();
    let device = args.engine.device.open()?;
    let open_model = |path: &std::path::Path| Ok(args.engine.open_model(path)?.0);
    let progress = TerminalProgress::new();
    let bytes = loupe::report::write(
        &project,
        &project_dir,
        args.model.as_deref(),
        (&open_model, &device),
        &args.out,
        &progress,
    )
    .with_context(|| format!("{}: cannot write its report", args.project.display()))?;
    progress.finish();
    eprintln!("report: {} ({:.0} kB)", args.out.display(), bytes as f64 / 1e3);
    Ok(())
}
