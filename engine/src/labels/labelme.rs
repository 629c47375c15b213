//! labelme annotation files (one JSON per image: `imagePath`, `imageWidth`, `imageHeight`, `shapes` with a
//! `label`, `points` and a `shape_type`) → a defect mask at the image's resolution and the defect types.
//! Polygons, rectangles and circles become mask pixels (even–odd rule at pixel centres); points and lines
//! have no area and are listed as skipped. The file is untrusted: sizes and point counts are bounded, and
//! `imageData` (an embedded image) is ignored.

use super::mask::DefectMask;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Larger files are refused before parsing.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Largest image side accepted: the decoder's (a mask of 16,384² is 256 MiB).
const MAX_SIDE: u32 = crate::dataset::decode::MAX_IMAGE_SIDE;
/// Most points in all shapes together: filling costs rows × points.
const MAX_POINTS: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct LabelmeAnnotation {
    /// As written in the file (usually relative to the JSON file's folder).
    pub image_path: String,
    pub width: u32,
    pub height: u32,
    /// The labels of the shapes that made mask pixels, in file order, without repeats.
    pub defect_types: Vec<String>,
    /// Row-major, 1 = defect.
    pub mask: Vec<u8>,
    /// Shapes without an area, as "label (shape type)".
    pub skipped: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    image_path: String,
    image_width: u32,
    image_height: u32,
    #[serde(default)]
    shapes: Vec<Shape>,
}

#[derive(Deserialize)]
struct Shape {
    label: String,
    points: Vec<[f64; 2]>,
    #[serde(default = "polygon")]
    shape_type: String,
}

fn polygon() -> String {
    "polygon".into()
}

pub fn read(path: &Path) -> Result<LabelmeAnnotation> {
    let size = std::fs::metadata(path).with_context(|| format!("{}: cannot open", path.display()))?.len();
    if size > MAX_FILE_BYTES {
        bail!("{}: {size} bytes is too large for a labelme file", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse(&text).with_context(|| format!("{}: not a usable labelme file", path.display()))
}

pub fn parse(text: &str) -> Result<LabelmeAnnotation> {
    let file: File = serde_json::from_str(text)?;
    let (width, height) = (file.image_width, file.image_height);
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        bail!("image size {width}×{height} is out of range (1–{MAX_SIDE} pixels a side)");
    }
    let mut mask = DefectMask::new(width, height);
    let mut defect_types: Vec<String> = Vec::new();
    let mut skipped = Vec::new();
    let points: usize = file.shapes.iter().map(|s| s.points.len()).sum();
    if points > MAX_POINTS {
        bail!("its shapes have {points} points together; at most {MAX_POINTS}");
    }
    for (index, shape) in file.shapes.iter().enumerate() {
        if shape.points.iter().flatten().any(|v| !v.is_finite()) {
            bail!("shape {index} ({}) has a point that is not a number", shape.label);
        }
        let outline = match (shape.shape_type.as_str(), shape.points.as_slice()) {
            ("polygon", points) if points.len() >= 3 => points.to_vec(),
            ("rectangle", [a, b]) => vec![*a, [b[0], a[1]], *b, [a[0], b[1]]],
            ("circle", [centre, edge]) => {
                let radius = ((edge[0] - centre[0]).powi(2) + (edge[1] - centre[1]).powi(2)).sqrt();
                (0..64)
                    .map(|k| {
                        let angle = k as f64 * std::f64::consts::TAU / 64.0;
                        [centre[0] + radius * angle.cos(), centre[1] + radius * angle.sin()]
                    })
                    .collect()
            }
            (kind, _) => {
                skipped.push(format!("{} ({kind})", shape.label));
                continue;
            }
        };
        mask.fill_polygon(&outline, true);
        if !defect_types.contains(&shape.label) {
            defect_types.push(shape.label.clone());
        }
    }
    Ok(LabelmeAnnotation {
        image_path: file.image_path,
        width,
        height,
        defect_types,
        mask: mask.into_pixels(),
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "version": "5.4.1", "flags": {},
      "shapes": [
        {"label": "crack", "points": [[1.0, 1.0], [5.0, 1.0], [5.0, 3.0], [1.0, 3.0]],
         "group_id": null, "description": "", "shape_type": "polygon", "flags": {}, "mask": null},
        {"label": "blowhole", "points": [[7.0, 6.0], [9.0, 8.0]], "shape_type": "rectangle"},
        {"label": "crack", "points": [[2.0, 6.0]], "shape_type": "point"}
      ],
      "imagePath": "tile_003.png", "imageData": null, "imageHeight": 10, "imageWidth": 12
    }"#;

    #[test]
    fn polygons_and_rectangles_become_mask_pixels() {
        let annotation = parse(SAMPLE).unwrap();
        assert_eq!((annotation.width, annotation.height), (12, 10));
        assert_eq!(annotation.image_path, "tile_003.png");
        assert_eq!(annotation.defect_types, ["crack", "blowhole"]);
        assert_eq!(annotation.skipped, ["crack (point)"]);
        let set: Vec<(usize, usize)> =
            (0..120).filter(|&i| annotation.mask[i] == 1).map(|i| (i % 12, i / 12)).collect();
        // The polygon covers pixel centres x ∈ {1.5 … 4.5}, y ∈ {1.5, 2.5}; the rectangle x, y ∈ {7.5, 8.5} × {6.5, 7.5}.
        let mut expected = Vec::new();
        for y in 1..3 {
            for x in 1..5 {
                expected.push((x, y));
            }
        }
        for y in 6..8 {
            for x in 7..9 {
                expected.push((x, y));
            }
        }
        expected.sort_by_key(|&(x, y)| (y, x));
        assert_eq!(set, expected);
    }

    #[test]
    fn a_circle_fills_its_disc() {
        let text = r#"{"imagePath": "a.png", "imageWidth": 21, "imageHeight": 21,
                      "shapes": [{"label": "spot", "points": [[10.5, 10.5], [15.8, 10.5]], "shape_type": "circle"}]}"#;
        let mask = parse(text).unwrap().mask;
        let area = mask.iter().filter(|&&m| m == 1).count() as f64;
        assert!((area - std::f64::consts::PI * 5.3 * 5.3).abs() < 6.0, "area {area}");
        assert_eq!(mask[10 * 21 + 10], 1);
        assert_eq!(mask[0], 0);
    }

    #[test]
    fn hostile_files_are_clear_errors() {
        assert!(parse("{").is_err());
        let huge = r#"{"imagePath": "a.png", "imageWidth": 100000, "imageHeight": 10, "shapes": []}"#;
        assert!(format!("{:#}", parse(huge).unwrap_err()).contains("out of range"));
        let nan = r#"{"imagePath": "a.png", "imageWidth": 4, "imageHeight": 4,
                     "shapes": [{"label": "x", "points": [[0, 0], [1e999, 0], [1, 1]]}]}"#;
        assert!(parse(nan).is_err());
    }
}
