//! `loupe labels`: bring labels into a project from labelme files, and hand a labelled project to other tools
//! in MVTec AD layout.

use anyhow::{bail, Context, Result};
use loupe::studio::project::{relative_to, resolve, Project};
use loupe::studio::workspace::labelled_paths;
use loupe_engine::labels::export::{export_mvtec, ExportItem};
use loupe_engine::labels::{labelme, write_mask_png, Verdict};
use std::collections::HashMap;
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
        LabelsCommand::ImportLabelme { project, inputs } => import_labelme(&project, &inputs),
        LabelsCommand::ExportMvtec { project, out } => export(&project, &out),
    }
}

fn project_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn json_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let entries = std::fs::read_dir(input).with_context(|| format!("{}: cannot list", input.display()))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn import_labelme(project_path: &Path, inputs: &[PathBuf]) -> Result<()> {
    let mut project = Project::load(project_path)?;
    let dir = project_dir(project_path);
    let by_path: HashMap<PathBuf, String> = labelled_paths(&dir, &project.sources)?
        .into_iter()
        .map(|(key, path)| (path.canonicalize().unwrap_or(path), key))
        .collect();
    let (mut imported, mut problems) = (0, Vec::new());
    for file in json_files(inputs)? {
        let annotation = match labelme::read(&file) {
            Ok(annotation) => annotation,
            Err(error) => {
                problems.push(format!("{error:#}"));
                continue;
            }
        };
        let image = file.parent().unwrap_or(Path::new(".")).join(&annotation.image_path);
        let Some(key) = image.canonicalize().ok().and_then(|p| by_path.get(&p)) else {
            problems.push(format!("{}: its image {} is not in the project's sources", file.display(), image.display()));
            continue;
        };
        for skipped in &annotation.skipped {
            problems.push(format!("{}: shape {skipped} has no area, not imported", file.display()));
        }
        let label = project.labels.entry(key.clone()).or_default();
        if annotation.mask.contains(&1) {
            let mask_path = dir.join("masks").join(format!("{key}.png"));
            if let Some(parent) = mask_path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
            }
            write_mask_png(&mask_path, annotation.width, annotation.height, &annotation.mask)?;
            label.mask = Some(relative_to(&dir, &mask_path));
            label.verdict = Some(Verdict::Defect);
        }
        for kind in &annotation.defect_types {
            if !label.defect_types.contains(kind) {
                label.defect_types.push(kind.clone());
            }
            if !project.defect_types.contains(kind) {
                project.defect_types.push(kind.clone());
            }
        }
        imported += 1;
    }
    project.save(project_path)?;
    println!("imported {imported} labelme files into {}", project_path.display());
    for problem in &problems {
        eprintln!("skipped: {problem}");
    }
    if imported == 0 && !problems.is_empty() {
        bail!("no labelme file could be imported");
    }
    Ok(())
}

fn export(project_path: &Path, out: &Path) -> Result<()> {
    let project = Project::load(project_path)?;
    let dir = project_dir(project_path);
    let paths: HashMap<String, PathBuf> = labelled_paths(&dir, &project.sources)?.into_iter().collect();
    let masks: Vec<(String, Option<PathBuf>)> = project
        .labels
        .iter()
        .map(|(key, label)| (key.clone(), label.mask.as_ref().map(|m| resolve(&dir, m))))
        .collect();
    let mut items = Vec::new();
    let mut missing = 0;
    for ((key, label), (_, mask)) in project.labels.iter().zip(&masks) {
        let (Some(image), Some(verdict)) = (paths.get(key), label.verdict) else {
            missing += usize::from(label.verdict.is_some());
            continue;
        };
        items.push(ExportItem {
            image,
            verdict,
            defect_type: label.defect_types.first().map(String::as_str),
            mask: mask.as_deref(),
        });
    }
    let summary = export_mvtec(&items, out)?;
    println!(
        "wrote {} good and {} defective images ({} with masks, {} without) to {}; left out {} unsure",
        summary.good,
        summary.defective,
        summary.masks,
        summary.without_mask,
        out.display(),
        summary.left_out
    );
    if missing > 0 {
        eprintln!("{missing} labelled images are no longer in the project's sources (relink the folder) and were not exported");
    }
    Ok(())
}
