//! Labels in and out of a project: labelme JSON files become verdicts, defect types and masks of the project's
//! images; the labelled images leave in MVTec AD layout for any other tool. Used by `loupe labels` and by the
//! studio's Labels menu (in a background job: both read and write many files).

use super::mask_files::{mask_file, session_stamp};
use super::sources::labelled_paths;
use super::{resolve, Project};
use anyhow::{Context, Result};
use loupe_engine::labels::export::{export_mvtec, ExportItem, ExportSummary};
use loupe_engine::labels::{labelme, write_mask_png, ImageLabel, Verdict};
use loupe_engine::progress::{check_cancelled, Progress};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The labelme files among `inputs` (files, or folders of `.json` files).
pub fn json_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
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

/// What a labelme import did: the labels it set (by label key, to merge into the project), the defect types
/// it met, and a line for every file or shape it could not use.
#[derive(Debug, Default)]
pub struct LabelmeImport {
    /// Files read and matched to an image of the project.
    pub files: usize,
    pub labels: BTreeMap<String, ImageLabel>,
    pub defect_types: Vec<String>,
    pub problems: Vec<String>,
}

impl LabelmeImport {
    /// Puts the imported labels and types into `project`.
    pub fn merge_into(&self, project: &mut Project) {
        for (key, label) in &self.labels {
            project.labels.insert(key.clone(), label.clone());
        }
        for kind in &self.defect_types {
            if !project.defect_types.contains(kind) {
                project.defect_types.push(kind.clone());
            }
        }
    }
}

/// Reads labelme `files` against the images of `project` (in `project_dir`) and writes their masks under
/// `masks/`; the project itself is not changed (see [`LabelmeImport::merge_into`]). A bad file is named in
/// `problems` and skipped.
pub fn import_labelme(
    project: &Project,
    project_dir: &Path,
    files: &[PathBuf],
    progress: &dyn Progress,
) -> Result<LabelmeImport> {
    let by_path: HashMap<PathBuf, String> = labelled_paths(project_dir, &project.sources)?
        .into_iter()
        .map(|(key, path)| (path.canonicalize().unwrap_or(path), key))
        .collect();
    let mut imported = LabelmeImport::default();
    let stamp = session_stamp();
    progress.begin("importing labelme files", files.len() as u64);
    for file in files {
        check_cancelled(progress)?;
        progress.advance(1);
        let annotation = match labelme::read(file) {
            Ok(annotation) => annotation,
            Err(error) => {
                imported.problems.push(format!("{error:#}"));
                continue;
            }
        };
        let image = file.parent().unwrap_or(Path::new(".")).join(&annotation.image_path);
        let Some(key) = image.canonicalize().ok().and_then(|p| by_path.get(&p)) else {
            imported.problems.push(format!(
                "{}: its image {} is not in the project's sources",
                file.display(),
                image.display()
            ));
            continue;
        };
        // The polygons are in the annotated image's pixels: a mask of another size would not line up (and would
        // be skipped later, in evaluation, far from its cause).
        match image::image_dimensions(&image) {
            Ok(real) if real == (annotation.width, annotation.height) => {}
            Ok((width, height)) => {
                imported.problems.push(format!(
                    "{}: it says its image is {}×{}, but {} is {width}×{height}; not imported (annotate the image \
                     as it is now)",
                    file.display(),
                    annotation.width,
                    annotation.height,
                    image.display()
                ));
                continue;
            }
            Err(error) => {
                imported.problems.push(format!(
                    "{}: its image {} does not read: {error}",
                    file.display(),
                    image.display()
                ));
                continue;
            }
        }
        for skipped in &annotation.skipped {
            imported.problems.push(format!("{}: shape {skipped} has no area, not imported", file.display()));
        }
        let mut label = imported.labels.get(key).or_else(|| project.labels.get(key)).cloned().unwrap_or_default();
        if annotation.mask.contains(&1) {
            // A new file, never the one the project names now: the project is saved after the import.
            let file = mask_file(key, &format!("labelme-{stamp}"));
            let mask_path = project_dir.join(&file);
            if let Some(parent) = mask_path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
            }
            write_mask_png(&mask_path, annotation.width, annotation.height, &annotation.mask)?;
            label.mask = Some(file);
            label.verdict = Some(Verdict::Defect);
        }
        for kind in &annotation.defect_types {
            if !label.defect_types.contains(kind) {
                label.defect_types.push(kind.clone());
            }
            if !imported.defect_types.contains(kind) {
                imported.defect_types.push(kind.clone());
            }
        }
        imported.labels.insert(key.clone(), label);
        imported.files += 1;
    }
    Ok(imported)
}

/// Writes the labelled images of `project` to `out` in MVTec AD layout. Returns the summary and how many
/// labelled images are no longer in the sources (a folder to relink).
pub fn export_labels(project: &Project, project_dir: &Path, out: &Path) -> Result<(ExportSummary, usize)> {
    let paths: HashMap<String, PathBuf> = labelled_paths(project_dir, &project.sources)?.into_iter().collect();
    let masks: Vec<Option<PathBuf>> =
        project.labels.values().map(|label| label.mask.as_ref().map(|m| resolve(project_dir, m))).collect();
    let mut items = Vec::new();
    let mut missing = 0;
    for ((key, label), mask) in project.labels.iter().zip(&masks) {
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
    Ok((export_mvtec(&items, out)?, missing))
}

/// One line saying what an export wrote.
pub fn export_report(summary: &ExportSummary, missing: usize, out: &Path) -> String {
    let mut report = format!(
        "wrote {} good and {} defective images ({} with masks, {} without) to {}; left out {} unsure",
        summary.good,
        summary.defective,
        summary.masks,
        summary.without_mask,
        out.display(),
        summary.left_out
    );
    if missing > 0 {
        report.push_str(&format!(
            "; {missing} labelled images are no longer in the project's sources (relink the folder) and were not \
             exported"
        ));
    }
    report
}
