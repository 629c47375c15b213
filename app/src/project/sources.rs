//! The images a project's sources hold, listed without reading them: which split each belongs to and its label
//! key (how the project's labels find an image even after its folder moved).

use super::{resolve, source_names, Source};
use anyhow::{Context, Result};
use loupe_engine::dataset::layout::FOLDER_TEST_FRACTION;
use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
use loupe_engine::dataset::{scan_folder_layout, scan_mvtec, scan_normal_folder, Benchmark, ImageRecord};
use loupe_engine::labels::label_key;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    /// A benchmark's test image: its folder says whether it is good.
    Test,
    /// An image to inspect: scored, never trained on, without a folder's word on it.
    Inspect,
}

/// The records a source contributes, with their split.
pub fn source_records(project_dir: &Path, source: &Source) -> Result<Vec<(ImageRecord, Split)>> {
    let with_split = |benchmark: Benchmark| -> Vec<(ImageRecord, Split)> {
        let train = benchmark.train.into_iter().map(|r| (r, Split::Train));
        train.chain(benchmark.test.into_iter().map(|r| (r, Split::Test))).collect()
    };
    Ok(match source {
        Source::NormalFolder(path) => {
            scan_normal_folder(&resolve(project_dir, path))?.into_iter().map(|r| (r, Split::Train)).collect()
        }
        Source::Inspect(path) => {
            scan_normal_folder(&resolve(project_dir, path))?.into_iter().map(|r| (r, Split::Inspect)).collect()
        }
        Source::Benchmark(path) => with_split(scan_mvtec(&resolve(project_dir, path))?),
        Source::Folder { normal, abnormal, mask } => with_split(scan_folder_layout(
            &resolve(project_dir, normal),
            &resolve(project_dir, abnormal),
            mask.as_ref().map(|m| resolve(project_dir, m)).as_deref(),
            FOLDER_TEST_FRACTION,
        )?),
        Source::Synthetic { path, seed, size, train_good, test_good, test_per_defect } => {
            let dir = resolve(project_dir, path);
            if !dir.join("train/good").is_dir() {
                let spec = SyntheticSpec {
                    seed: *seed,
                    size: *size,
                    train_good: *train_good,
                    test_good: *test_good,
                    test_per_defect: *test_per_defect,
                };
                generate_mvtec(&dir, &spec)
                    .with_context(|| format!("{}: cannot generate the demo set", dir.display()))?;
            }
            with_split(scan_mvtec(&dir)?)
        }
    })
}

/// An image's path below its source's root — or below the root's parent (a Folder source's good images sit
/// beside its defect folder) — else its file name.
pub fn path_in_source(path: &Path, root: &Path) -> PathBuf {
    let parent = root.parent().unwrap_or(root);
    match path.strip_prefix(root).or_else(|_| path.strip_prefix(parent)) {
        Ok(inside) => inside.to_path_buf(),
        Err(_) => PathBuf::from(path.file_name().unwrap_or(path.as_os_str())),
    }
}

/// Every image of `sources` with its label key, without reading the images (labels import and export).
pub fn labelled_paths(project_dir: &Path, sources: &[Source]) -> Result<Vec<(String, PathBuf)>> {
    let mut listed = Vec::new();
    for (source, category) in sources.iter().zip(source_names(sources)) {
        let records = source_records(project_dir, source)
            .with_context(|| format!("cannot list {} ({})", source.root().display(), source.kind_label()))?;
        let root = resolve(project_dir, source.root());
        listed.extend(
            records
                .into_iter()
                .map(|(record, _)| (label_key(&category, &path_in_source(&record.path, &root)), record.path)),
        );
    }
    Ok(listed)
}
