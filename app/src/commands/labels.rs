//! `loupe labels`: bring labels into a project from labelme files, and hand a labelled project to other tools
//! in MVTec AD layout.

use anyhow::{bail, Result};
use loupe::project::label_files::{export_labels, export_report, import_labelme, json_files};
use loupe::project::Project;
use loupe_engine::progress::NoProgress;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct LabelsArgs {
    #[command(subcommand)]
    command: LabelsCommand,
}

#[derive(clap::Subcommand)]
enum LabelsCommand {
    /// Import labelme JSON files (polygons, rectangles, circles) as defect labels and masks of the project's images.
    ImportLabelme {
        /// The project file (.ron).
        project: PathBuf,
        /// labelme .json files, or folders of them.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Write the project's labelled images in MVTec AD layout (test/<type>/, ground_truth/<type>/).
    ExportMvtec {
        project: PathBuf,
        /// Output folder.
        out: PathBuf,
    },
}

pub fn run(args: LabelsArgs) -> Result<()> {
    match args.command {
        LabelsCommand::ImportLabelme { project, inputs } => import(&project, &inputs),
        LabelsCommand::ExportMvtec { project, out } => export(&project, &out),
    }
}

fn project_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn import(project_path: &Path, inputs: &[PathBuf]) -> Result<()> {
    let mut project = Project::load(project_path)?;
    let files = json_files(inputs)?;
    let imported = import_labelme(&project, &project_dir(project_path), &files, &NoProgress)?;
    imported.merge_into(&mut project);
    project.save(project_path)?;
    println!("imported {} labelme files into {}", imported.files, project_path.display());
    for problem in &imported.problems {
        eprintln!("skipped: {problem}");
    }
    if imported.files == 0 && !imported.problems.is_empty() {
        bail!("no labelme file could be imported");
    }
    Ok(())
}

fn export(project_path: &Path, out: &Path) -> Result<()> {
    let project = Project::load(project_path)?;
    let (summary, missing) = export_labels(&project, &project_dir(project_path), out)?;
    println!("{}", export_report(&summary, missing, out));
    Ok(())
}
