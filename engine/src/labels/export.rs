//! A labelled set written in MVTec AD layout, so that any other tool (anomalib, the papers' code) can read it:
//! good images to `test/good/`, defective ones to `test/<type>/`, their masks to
//! `ground_truth/<type>/<name>_mask.png`. Unsure and unlabelled images are left out. Files are copied as they
//! are; names that would collide get a numeric suffix.

use super::Verdict;
use crate::atomic_file::copy_atomic;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub struct ExportItem<'a> {
    pub image: &'a Path,
    pub verdict: Verdict,
    /// The first defect type; "defect" when the labeller gave none.
    pub defect_type: Option<&'a str>,
    /// A mask PNG at the image's resolution.
    pub mask: Option<&'a Path>,
}

#[derive(Debug, Default, PartialEq)]
pub struct ExportSummary {
    pub good: usize,
    pub defective: usize,
    pub masks: usize,
    /// Defective images written without a mask (MVTec readers then have no pixel ground truth for them).
    pub without_mask: usize,
    pub left_out: usize,
}

pub fn export_mvtec(items: &[ExportItem], out: &Path) -> Result<ExportSummary> {
    let mut summary = ExportSummary::default();
    for item in items {
        let folder = match item.verdict {
            Verdict::Good => "good".to_string(),
            Verdict::Defect => safe_folder_name(item.defect_type.unwrap_or("defect")),
            Verdict::Unsure => {
                summary.left_out += 1;
                continue;
            }
        };
        let test_dir = out.join("test").join(&folder);
        std::fs::create_dir_all(&test_dir).with_context(|| format!("{}: cannot create", test_dir.display()))?;
        let target = free_name(&test_dir, item.image);
        copy_atomic(item.image, &target)
            .with_context(|| format!("cannot copy {} to {}", item.image.display(), target.display()))?;
        if item.verdict == Verdict::Good {
            summary.good += 1;
            continue;
        }
        summary.defective += 1;
        match item.mask {
            Some(mask) => {
                let mask_dir = out.join("ground_truth").join(&folder);
                std::fs::create_dir_all(&mask_dir).with_context(|| format!("{}: cannot create", mask_dir.display()))?;
                let stem = target.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let mask_target = mask_dir.join(format!("{stem}_mask.png"));
                copy_atomic(mask, &mask_target)
                    .with_context(|| format!("cannot copy {} to {}", mask.display(), mask_target.display()))?;
                summary.masks += 1;
            }
            None => summary.without_mask += 1,
        }
    }
    Ok(summary)
}

/// A defect type as a folder name: path separators and other awkward characters become `_`.
fn safe_folder_name(name: &str) -> String {
    let cleaned: String =
        name.trim().chars().map(|c| if c.is_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if cleaned.is_empty() || cleaned == "good" {
        format!("defect_{cleaned}")
    } else {
        cleaned
    }
}

/// `dir/<image's file name>`, or with `_2`, `_3`, … before the extension when taken.
fn free_name(dir: &Path, image: &Path) -> PathBuf {
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let extension = image.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let mut candidate = dir.join(format!("{stem}{extension}"));
    let mut n = 2;
    while candidate.exists() {
        candidate = dir.join(format!("{stem}_{n}{extension}"));
        n += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::scan_mvtec;

    #[test]
    fn an_exported_set_reads_back_as_a_benchmark() {
        let dir = std::env::temp_dir().join(format!("loupe-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let source = dir.join("source");
        std::fs::create_dir_all(&source).unwrap();
        let write_png = |name: &str, value: u8| {
            let path = source.join(name);
            image::GrayImage::from_pixel(8, 8, image::Luma([value])).save(&path).unwrap();
            path
        };
        let (good, cracked, other_cracked, unsure) =
            (write_png("a.png", 90), write_png("b.png", 20), write_png("sub_b.png", 30), write_png("c.png", 50));
        let mask = write_png("b_mask.png", 255);
        let items = [
            ExportItem { image: &good, verdict: Verdict::Good, defect_type: None, mask: None },
            ExportItem { image: &cracked, verdict: Verdict::Defect, defect_type: Some("crack"), mask: Some(&mask) },
            ExportItem { image: &other_cracked, verdict: Verdict::Defect, defect_type: Some("crack"), mask: None },
            ExportItem { image: &unsure, verdict: Verdict::Unsure, defect_type: None, mask: None },
        ];
        let out = dir.join("out");
        let summary = export_mvtec(&items, &out).unwrap();
        assert_eq!(summary, ExportSummary { good: 1, defective: 2, masks: 1, without_mask: 1, left_out: 1 });
        std::fs::create_dir_all(out.join("train/good")).unwrap();
        std::fs::copy(&good, out.join("train/good/a.png")).unwrap();
        let benchmark = scan_mvtec(&out).unwrap();
        assert_eq!(benchmark.test.len(), 3);
        let with_mask: Vec<_> = benchmark.test.iter().filter(|r| r.mask.is_some()).collect();
        assert_eq!(with_mask.len(), 1);
        assert!(with_mask[0].path.ends_with("test/crack/b.png"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn awkward_type_names_become_safe_folders() {
        assert_eq!(safe_folder_name("../etc"), "___etc");
        assert_eq!(safe_folder_name("good"), "defect_good");
        assert_eq!(safe_folder_name(" "), "defect_");
        assert_eq!(safe_folder_name("blow hole"), "blow_hole");
    }
}
