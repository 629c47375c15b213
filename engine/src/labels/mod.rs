//! What a person says about an image: a verdict, defect types and a defect mask — the project's own ground
//! truth, next to (or instead of) a benchmark's folders. Stored in the project file, keyed so that labels
//! follow their images when a source folder is relinked (see [`label_key`]); masks are PNG files beside it.
//! `labelme.rs` imports labelme polygon files; `export.rs` writes a labelled set in MVTec AD layout.

pub mod export;
pub mod labelme;
pub mod mask;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    Good,
    Defect,
    Unsure,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Good, Verdict::Defect, Verdict::Unsure];

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Good => "good",
            Verdict::Defect => "defect",
            Verdict::Unsure => "unsure",
        }
    }
}

/// The labeller's answer to a model's verdict in review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReviewAnswer {
    Accepted,
    Rejected,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageLabel {
    #[serde(default)]
    pub verdict: Option<Verdict>,
    #[serde(default)]
    pub defect_types: Vec<String>,
    /// The defect mask, a PNG at the image's full resolution (non-zero = defect), relative to the project folder.
    #[serde(default)]
    pub mask: Option<PathBuf>,
    #[serde(default)]
    pub review: Option<ReviewAnswer>,
}

impl ImageLabel {
    pub fn is_empty(&self) -> bool {
        *self == ImageLabel::default()
    }
}

/// Writes a defect mask (row-major, non-zero = defect) as an 8-bit PNG of 0 / 255, atomically.
pub fn write_mask_png(path: &Path, width: u32, height: u32, mask: &[u8]) -> anyhow::Result<()> {
    let pixels: Vec<u8> = mask.iter().map(|&m| if m != 0 { 255 } else { 0 }).collect();
    let image = image::GrayImage::from_raw(width, height, pixels).ok_or_else(|| {
        anyhow::anyhow!("a {width}×{height} mask needs {} values, got {}", width * height, mask.len())
    })?;
    crate::atomic_file::write_image_atomic(path, &image.into())
}

/// Labels by [`label_key`].
pub type LabelSet = BTreeMap<String, ImageLabel>;

/// The key of an image's label: its source's name and its path inside that source's folder, with `/`
/// separators. Neither changes when the folder is moved and relinked, so the labels follow.
pub fn label_key(source_name: &str, path_in_source: &Path) -> String {
    let parts: Vec<String> =
        path_in_source.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    format!("{source_name}/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_do_not_depend_on_where_the_folder_lives() {
        let old = Path::new("/old/place/tiles/test/crack/003.png");
        let new = Path::new("/mnt/new/tiles/test/crack/003.png");
        let key = |root: &str, path: &Path| label_key("tiles", path.strip_prefix(root).unwrap());
        assert_eq!(key("/old/place/tiles", old), "tiles/test/crack/003.png");
        assert_eq!(key("/old/place/tiles", old), key("/mnt/new/tiles", new));
    }
}
