//! Folder layouts. MVTec AD: `train/good/`, `test/<type>/`, `ground_truth/<type>/<stem>_mask.png`. anomalib's
//! Folder: a normal dir, an abnormal dir and an optional mask dir (mask named like its image, or `<stem>_mask`).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];
pub const GOOD: &str = "good";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Label {
    Normal,
    Anomalous { defect_type: String },
}

impl Label {
    pub fn is_anomalous(&self) -> bool {
        matches!(self, Label::Anomalous { .. })
    }

    /// "good" for normal images, the defect type otherwise.
    pub fn type_name(&self) -> &str {
        match self {
            Label::Normal => GOOD,
            Label::Anomalous { defect_type } => defect_type,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub path: PathBuf,
    pub label: Label,
    pub mask: Option<PathBuf>,
}

impl ImageRecord {
    pub fn normal(path: PathBuf) -> Self {
        Self { path, label: Label::Normal, mask: None }
    }
}

/// A benchmark: normal training images and a labelled test set.
#[derive(Debug, Clone, Default)]
pub struct Benchmark {
    pub train: Vec<ImageRecord>,
    pub test: Vec<ImageRecord>,
}

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A clear error when `dir` is missing or is a file (checked before slower set-up, such as loading weights).
pub fn require_folder(dir: &Path) -> Result<()> {
    if !dir.exists() {
        bail!("{}: folder not found", dir.display());
    }
    if !dir.is_dir() {
        bail!("{}: not a folder", dir.display());
    }
    Ok(())
}

/// Image files below `dir` (recursive), sorted so every run sees the same order.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    require_folder(dir)?;
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder).with_context(|| format!("{}: cannot list", folder.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(path);
            } else if is_image(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn require_images(dir: &Path, images: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    if images.is_empty() {
        bail!("{}: no images found (looked for {})", dir.display(), IMAGE_EXTENSIONS.join(", "));
    }
    Ok(images)
}

/// Normal images for training: a plain folder (recursive), or `train/good` when `dir` is an MVTec folder.
pub fn scan_normal_folder(dir: &Path) -> Result<Vec<ImageRecord>> {
    let mvtec_train = dir.join("train").join(GOOD);
    let source = if mvtec_train.is_dir() { mvtec_train } else { dir.to_path_buf() };
    let images = require_images(&source, list_images(&source)?)?;
    Ok(images.into_iter().map(ImageRecord::normal).collect())
}

pub fn is_mvtec(dir: &Path) -> bool {
    dir.join("train").join(GOOD).is_dir() && dir.join("test").is_dir()
}

/// An MVTec AD category folder.
pub fn scan_mvtec(dir: &Path) -> Result<Benchmark> {
    require_folder(dir)?;
    if !is_mvtec(dir) {
        bail!("{}: not an MVTec AD folder (expected train/good/ and test/)", dir.display());
    }
    let train = scan_normal_folder(dir)?;
    let test_dir = dir.join("test");
    let mut types: Vec<PathBuf> = std::fs::read_dir(&test_dir)
        .with_context(|| format!("{}: cannot list", test_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    types.sort();
    let mut test = Vec::new();
    for type_dir in types {
        let type_name = type_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for path in list_images(&type_dir)? {
            if type_name == GOOD {
                test.push(ImageRecord::normal(path));
                continue;
            }
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let mask = dir.join("ground_truth").join(&type_name).join(format!("{stem}_mask.png"));
            test.push(ImageRecord {
                path,
                label: Label::Anomalous { defect_type: type_name.clone() },
                mask: mask.is_file().then_some(mask),
            });
        }
    }
    if test.is_empty() {
        bail!("{}: no test images", test_dir.display());
    }
    Ok(Benchmark { train, test })
}

/// anomalib's Folder shape: normal images (split into train and test by `test_fraction` of the sorted list,
/// every k-th image), abnormal images, and masks found by the image's name in `mask_dir`.
/// The one split of an anomalib Folder-shape folder of good images, shared by `fit --normal`, `eval --normal`
/// and the studio: every `1 / test_fraction`-th image (in sorted order, from the first) tests, the rest train.
/// A model fitted on the whole folder would be tested on images it learnt from.
pub fn folder_split(normal_dir: &Path, test_fraction: f64) -> Result<Benchmark> {
    let normals = require_images(normal_dir, list_images(normal_dir)?)?;
    let every = if test_fraction <= 0.0 { usize::MAX } else { (1.0 / test_fraction).round().max(2.0) as usize };
    let mut benchmark = Benchmark::default();
    for (index, path) in normals.into_iter().enumerate() {
        if index % every == 0 {
            benchmark.test.push(ImageRecord::normal(path));
        } else {
            benchmark.train.push(ImageRecord::normal(path));
        }
    }
    if benchmark.train.is_empty() {
        bail!("{}: too few normal images to hold some out for testing", normal_dir.display());
    }
    Ok(benchmark)
}

/// The share of a Folder-shape source's good images that tests (one in five).
pub const FOLDER_TEST_FRACTION: f64 = 0.2;

pub fn scan_folder_layout(
    normal_dir: &Path,
    abnormal_dir: &Path,
    mask_dir: Option<&Path>,
    test_fraction: f64,
) -> Result<Benchmark> {
    let mut benchmark = folder_split(normal_dir, test_fraction)?;
    let abnormals = require_images(abnormal_dir, list_images(abnormal_dir)?)?;
    let defect_type = abnormal_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or("defect".into());
    for path in abnormals {
        let mask = mask_dir.and_then(|dir| {
            let stem = path.file_stem()?.to_string_lossy().into_owned();
            let file_name = path.file_name()?;
            [dir.join(file_name), dir.join(format!("{stem}_mask.png")), dir.join(format!("{stem}.png"))]
                .into_iter()
                .find(|p| p.is_file())
        });
        benchmark.test.push(ImageRecord { path, label: Label::Anomalous { defect_type: defect_type.clone() }, mask });
    }
    Ok(benchmark)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic::{generate_mvtec, SyntheticSpec};

    #[test]
    fn mvtec_and_folder_layouts_are_read_with_their_masks() {
        let dir = std::env::temp_dir().join(format!("loupe-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = SyntheticSpec { seed: 3, size: 16, train_good: 5, test_good: 2, test_per_defect: 2 };
        generate_mvtec(&dir, &spec).unwrap();
        // One defect image loses its mask: it stays in the test set, without a mask.
        std::fs::remove_file(dir.join("ground_truth/spot/001_mask.png")).unwrap();
        let benchmark = scan_mvtec(&dir).unwrap();
        assert_eq!(benchmark.train.len(), 5);
        assert_eq!(benchmark.test.len(), 2 + 3 * 2);
        let anomalous: Vec<&ImageRecord> = benchmark.test.iter().filter(|r| r.label.is_anomalous()).collect();
        assert_eq!(anomalous.len(), 6);
        assert_eq!(anomalous.iter().filter(|r| r.mask.is_none()).count(), 1);
        assert_eq!(anomalous[0].label.type_name(), "dent");

        let folder = scan_folder_layout(
            &dir.join("train/good"),
            &dir.join("test/scratch"),
            Some(&dir.join("ground_truth/scratch")),
            0.2,
        )
        .unwrap();
        assert_eq!(folder.train.len() + folder.test.iter().filter(|r| !r.label.is_anomalous()).count(), 5);
        assert!(folder.test.iter().filter(|r| r.label.is_anomalous()).all(|r| r.mask.is_some()), "stem_mask.png found");
        assert!(scan_mvtec(&dir.join("train")).is_err(), "not an MVTec folder");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_and_empty_folders_are_clear_errors() {
        let missing = Path::new("/definitely/not/here");
        let message = scan_normal_folder(missing).unwrap_err().to_string();
        assert!(message.contains("folder not found"), "{message}");
        let empty = std::env::temp_dir().join(format!("loupe-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let message = scan_normal_folder(&empty).unwrap_err().to_string();
        assert!(message.contains("no images found"), "{message}");
        std::fs::remove_dir_all(empty).unwrap();
    }
}
