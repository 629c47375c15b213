//! How a model sees a camera image (issue 20). Every method scores a square input of `image_size²`; the
//! geometry decides which rectangles of the camera image become those inputs, and how their maps make one map:
//!
//! - **whole** (the default, as before): the whole image squeezed to the square;
//! - **kept aspect ratio**: the whole image in one square of its longer side, the rest filled by repeating the
//!   edge, so a 1540×645 rail is not stretched 2.4× across;
//! - **tiles**: squares of `tile` pixels of the image itself, overlapping by at least `overlap`, each resized to
//!   the input: a 6-pixel scratch on a 5,000-pixel part stays 3 input pixels wide in a 512 tile at 256², where
//!   the whole image would shrink it to a third of a pixel. The maps are stitched into one map of the image,
//!   overlaps cross-faded so no seam shows, and the image score is that map's maximum.
//!
//! A **region of interest** (a polygon in the image's pixels) limits both: a tile with no pixel in it is
//! neither trained on nor scored, and the map outside it is the map's lowest value inside, so fixtures and the
//! conveyor raise no alarm. The geometry is the method's wrapper, not the method's code: every registered
//! method tiles the same way, and the model file carries it.

use crate::dataset::decode::{decode_all, open_image, DecodedImage, SkippedFile};
use crate::dataset::layout::ImageRecord;
use crate::dataset::resize::resize_rgb;
use crate::maps::ScoreMap;
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput};
use crate::progress::{check_cancelled, Progress};
use anyhow::{bail, Result};
use candle_core::Device;
use image::{imageops::FilterType, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Smallest and largest tile side, in image pixels.
pub const MIN_TILE: u32 = 32;
pub const MAX_TILE: u32 = crate::dataset::decode::MAX_IMAGE_SIDE;
/// A region of interest has at most this many corners (a hand-drawn polygon has tens).
pub const MAX_REGION_POINTS: usize = 10_000;
/// The longest side of a stitched map. A map is drawn at its tiles' own resolution (a 512 tile scored at 256²
/// gives half the image's pixels) up to this: 2048 × 1536 for a 4096 × 3072 part, 12 MB of floats.
pub const MAX_MAP_SIDE: usize = 2048;

/// Which rectangles of the image the model scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The whole image resized to the model's square input (the aspect ratio is not kept).
    #[default]
    Whole,
    /// The whole image in one square of its longer side, padded by repeating its edge.
    KeepAspect,
    /// Squares of `tile` image pixels, neighbours overlapping by at least `overlap` pixels (along a side shorter
    /// than a tile, the view is as long as the side).
    Tiles { tile: u32, overlap: u32 },
}

/// A polygon in the image's own pixels (x to the right, y down, corners in order); a rectangle is its four
/// corners. Pixels whose centre lies inside (even-odd rule) are in the region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    pub points: Vec<[f32; 2]>,
}

impl Region {
    pub fn rectangle(x: f32, y: f32, width: f32, height: f32) -> Self {
        Self { points: vec![[x, y], [x + width, y], [x + width, y + height], [x, y + height]] }
    }

    /// Parses `x,y,w,h` (a rectangle) or `x1,y1;x2,y2;x3,y3;…` (a polygon of three or more corners).
    pub fn parse(text: &str) -> Result<Self> {
        let numbers = |part: &str| -> Result<Vec<f32>> {
            part.split(',')
                .map(|n| n.trim().parse::<f32>().map_err(|_| anyhow::anyhow!("region {text:?}: {n:?} is not a number")))
                .collect()
        };
        let region = if text.contains(';') {
            let points = text
                .split(';')
                .filter(|p| !p.trim().is_empty())
                .map(|p| match numbers(p)?.as_slice() {
                    [x, y] => Ok([*x, *y]),
                    _ => bail!("region {text:?}: a corner is x,y, not {p:?}"),
                })
                .collect::<Result<Vec<_>>>()?;
            Self { points }
        } else {
            match numbers(text)?.as_slice() {
                [x, y, w, h] => Self::rectangle(*x, *y, *w, *h),
                _ => bail!("region {text:?}: give x,y,width,height or corners x1,y1;x2,y2;x3,y3"),
            }
        };
        region.check()?;
        Ok(region)
    }

    pub fn check(&self) -> Result<()> {
        let limit = 2.0 * MAX_TILE as f32;
        if !(3..=MAX_REGION_POINTS).contains(&self.points.len()) {
            bail!("a region of interest has 3 to {MAX_REGION_POINTS} corners, not {}", self.points.len());
        }
        if let Some(bad) = self.points.iter().find(|p| p.iter().any(|v| !v.is_finite() || v.abs() > limit)) {
            bail!("region corner {bad:?} is not a pixel position within ±{limit}");
        }
        Ok(())
    }

    /// The region at `width × height` cells of `scale` cells per image pixel: 1 inside, 0 outside. One scan line
    /// per row: the edges' crossings of the row's centre, sorted, fill between pairs.
    pub fn mask(&self, width: usize, height: usize, scale: f64) -> Vec<u8> {
        let mut mask = vec![0u8; width * height];
        let corners: Vec<[f64; 2]> = self.points.iter().map(|p| [p[0] as f64 * scale, p[1] as f64 * scale]).collect();
        let mut crossings = Vec::new();
        for (y, row) in mask.chunks_exact_mut(width.max(1)).enumerate() {
            let centre = y as f64 + 0.5;
            crossings.clear();
            for (i, a) in corners.iter().enumerate() {
                let b = corners[(i + 1) % corners.len()];
                if (a[1] <= centre) != (b[1] <= centre) {
                    crossings.push(a[0] + (centre - a[1]) / (b[1] - a[1]) * (b[0] - a[0]));
                }
            }
            crossings.sort_by(f64::total_cmp);
            for pair in crossings.chunks_exact(2) {
                // Cells whose centre x + ½ lies in [pair[0], pair[1]).
                let first = (pair[0] - 0.5).ceil().max(0.0) as usize;
                let end = ((pair[1] - 0.5).ceil().max(0.0) as usize).min(width);
                row[first.min(end)..end].fill(1);
            }
        }
        mask
    }
}

/// A rectangle of the image that becomes one model input: top-left `x, y` and `width × height` image pixels.
/// With the aspect ratio kept it reaches past the right or bottom edge, where the image's last row and column
/// are repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// A model's input geometry: its layout and region of interest. Stored in the model file; a file without one
/// (every file before issue 20) scores the whole image, as it always did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InputGeometry {
    pub layout: Layout,
    pub region: Option<Region>,
}

impl InputGeometry {
    pub fn tiles(tile: u32, overlap: u32) -> Self {
        Self { layout: Layout::Tiles { tile, overlap }, region: None }
    }

    /// The whole image squeezed to the input and nothing masked: the path every model took before issue 20,
    /// which decodes straight to the input size.
    pub fn is_whole_image(&self) -> bool {
        self.layout == Layout::Whole && self.region.is_none()
    }

    pub fn check(&self) -> Result<()> {
        if let Layout::Tiles { tile, overlap } = self.layout {
            if !(MIN_TILE..=MAX_TILE).contains(&tile) {
                bail!("tile side {tile} is outside {MIN_TILE}..={MAX_TILE} pixels");
            }
            if overlap > tile / 2 {
                bail!("tile overlap {overlap} is more than half the tile ({tile} pixels)");
            }
        }
        self.region.as_ref().map_or(Ok(()), Region::check)
    }

    /// One line for a log or a panel.
    pub fn describe(&self) -> String {
        let layout = match self.layout {
            Layout::Whole => "whole image".to_string(),
            Layout::KeepAspect => "whole image, aspect ratio kept".to_string(),
            Layout::Tiles { tile, overlap } => format!("tiles of {tile} px, overlap ≥ {overlap} px"),
        };
        match &self.region {
            Some(region) => format!("{layout}, region of interest of {} corners", region.points.len()),
            None => layout,
        }
    }

    /// Every view of a `width × height` image, row by row, before the region of interest drops any.
    pub fn views(&self, width: u32, height: u32) -> Vec<View> {
        match self.layout {
            Layout::Whole => vec![View { x: 0, y: 0, width, height }],
            Layout::KeepAspect => {
                let side = width.max(height);
                vec![View { x: 0, y: 0, width: side, height: side }]
            }
            Layout::Tiles { tile, overlap } => {
                // A side no longer than a tile is covered by one view of that side: an image smaller than a
                // tile is one view of the whole image, exactly what the whole-image layout scores.
                let (view_width, view_height) = (tile.min(width), tile.min(height));
                let columns = tile_starts(width, tile, overlap);
                let rows = tile_starts(height, tile, overlap);
                rows.iter()
                    .flat_map(|&y| columns.iter().map(move |&x| View { x, y, width: view_width, height: view_height }))
                    .collect()
            }
        }
    }

    /// Map cells per image pixel for a `width × height` image scored at `input_size²`: the views' own
    /// resolution, at most [`MAX_MAP_SIDE`] on the longer side.
    pub fn map_scale(&self, width: u32, height: u32, input_size: u32) -> f64 {
        let view = self.views(width, height)[0];
        let native = input_size as f64 / view.width.max(view.height) as f64;
        native.min(MAX_MAP_SIDE as f64 / width.max(height) as f64).min(1.0)
    }
}

/// Starts of tiles of side `tile` along a side of `length`, spread evenly from 0 to `length − tile` with
/// neighbours overlapping by at least `overlap`; one tile at 0 when the side is no longer than a tile.
pub fn tile_starts(length: u32, tile: u32, overlap: u32) -> Vec<u32> {
    if length <= tile {
        return vec![0];
    }
    let span = (length - tile) as u64;
    let stride = (tile - overlap.min(tile - 1)) as u64;
    let gaps = span.div_ceil(stride);
    (0..=gaps).map(|i| ((i * span + gaps / 2) / gaps) as u32).collect()
}

/// What the geometry makes of a `width × height` image, before any pixel is read: the views the region
/// keeps and the stitched map's size.
#[derive(Debug, Clone)]
pub struct CutPlan {
    pub views: Vec<View>,
    /// Map cells per image pixel ([`InputGeometry::map_scale`]) and the map's size.
    pub map_scale: f64,
    pub map_width: usize,
    pub map_height: usize,
    /// The region at the map's size, if there is one.
    pub region_mask: Option<Vec<u8>>,
}

impl CutPlan {
    pub fn new(geometry: &InputGeometry, width: u32, height: u32, input_size: u32) -> Self {
        let map_scale = geometry.map_scale(width, height, input_size);
        let map_width = ((width as f64 * map_scale).round() as usize).max(1);
        let map_height = ((height as f64 * map_scale).round() as usize).max(1);
        let region_mask = geometry.region.as_ref().map(|region| region.mask(map_width, map_height, map_scale));
        let views = geometry
            .views(width, height)
            .into_iter()
            .filter(|view| match &region_mask {
                None => true,
                Some(mask) => {
                    let (x0, x1, y0, y1) = map_rect(*view, map_scale, map_width, map_height);
                    (y0..y1).any(|y| mask[y * map_width + x0..y * map_width + x1].contains(&1))
                }
            })
            .collect();
        Self { views, map_scale, map_width, map_height, region_mask }
    }
}

/// An image as the geometry cuts it: its pixels at full resolution and its [`CutPlan`].
pub struct CutImage {
    pub rgb: RgbImage,
    pub plan: CutPlan,
}

impl CutImage {
    pub fn new(rgb: RgbImage, geometry: &InputGeometry, input_size: u32) -> Self {
        let plan = CutPlan::new(geometry, rgb.width(), rgb.height(), input_size);
        Self { rgb, plan }
    }

    /// The view's pixels resized to the model's `size²` input: what the exported graph scores for one tile.
    pub fn input(&self, view: View, size: u32) -> Vec<u8> {
        let (width, height) = self.rgb.dimensions();
        let raw = self.rgb.as_raw();
        let inside = view.x + view.width <= width && view.y + view.height <= height;
        let crop: Vec<u8> = if inside && view.width == width {
            let start = (view.y * width * 3) as usize;
            raw[start..start + (view.height * width * 3) as usize].to_vec()
        } else {
            let mut crop = Vec::with_capacity((view.width * view.height * 3) as usize);
            for y in view.y..view.y + view.height {
                let row = (y.min(height - 1) * width) as usize;
                if inside {
                    let start = (row + view.x as usize) * 3;
                    crop.extend_from_slice(&raw[start..start + view.width as usize * 3]);
                } else {
                    for x in view.x..view.x + view.width {
                        let at = (row + x.min(width - 1) as usize) * 3;
                        crop.extend_from_slice(&raw[at..at + 3]);
                    }
                }
            }
            crop
        };
        resize_rgb(&crop, view.width as usize, view.height as usize, size as usize)
    }

    /// Stitches the views' maps (each at the input size, in the order of `self.plan.views`) into one map of the
    /// image: each view's map is resized to its rectangle and weighted by a ramp that rises over the overlap
    /// from its edges, so neighbours cross-fade. Outside the region (and anywhere no view reached) the map is
    /// its lowest value inside.
    pub fn stitch(&self, maps: &[ScoreMap], overlap: u32) -> ScoreMap {
        let CutPlan { views, map_scale, map_width: width, map_height: height, region_mask } = &self.plan;
        let (width, height, map_scale) = (*width, *height, *map_scale);
        let mut sum = vec![0f32; width * height];
        let mut weight = vec![0f32; width * height];
        let ramp = (overlap as f64 * map_scale).max(1.0) as f32;
        for (view, map) in views.iter().zip(maps) {
            // The view's rectangle in map cells, before clipping at the image's edge.
            let x0 = (view.x as f64 * map_scale).round() as usize;
            let y0 = (view.y as f64 * map_scale).round() as usize;
            let full_width = (((view.x + view.width) as f64 * map_scale).round() as usize - x0).max(1);
            let full_height = (((view.y + view.height) as f64 * map_scale).round() as usize - y0).max(1);
            let resized = map.resized(full_width, full_height);
            let edge = |i: usize, n: usize| ((i.min(n - 1 - i) as f32 + 0.5) / ramp).min(1.0);
            for y in y0..(y0 + full_height).min(height) {
                let wy = edge(y - y0, full_height);
                for x in x0..(x0 + full_width).min(width) {
                    let w = wy * edge(x - x0, full_width);
                    sum[y * width + x] += w * resized.data[(y - y0) * full_width + x - x0];
                    weight[y * width + x] += w;
                }
            }
        }
        let inside = |i: usize| weight[i] > 0.0 && region_mask.as_ref().is_none_or(|m| m[i] == 1);
        let values: Vec<f32> =
            (0..width * height).map(|i| if inside(i) { sum[i] / weight[i] } else { f32::NAN }).collect();
        let floor = values.iter().copied().filter(|v| !v.is_nan()).fold(f32::INFINITY, f32::min);
        let floor = if floor.is_finite() { floor } else { 0.0 };
        ScoreMap::new(width, height, values.into_iter().map(|v| if v.is_nan() { floor } else { v }).collect())
    }
}

/// A view's rectangle in map cells, clipped to the map: `(x0, x1, y0, y1)`, never empty.
fn map_rect(view: View, scale: f64, width: usize, height: usize) -> (usize, usize, usize, usize) {
    let cell = |v: u32, limit: usize| ((v as f64 * scale).round() as usize).min(limit);
    let x0 = cell(view.x, width - 1);
    let y0 = cell(view.y, height - 1);
    (x0, cell(view.x + view.width, width).max(x0 + 1), y0, cell(view.y + view.height, height).max(y0 + 1))
}

/// The overlap the stitcher cross-fades over.
fn blend_overlap(geometry: &InputGeometry) -> u32 {
    match geometry.layout {
        Layout::Tiles { overlap, .. } => overlap,
        _ => 0,
    }
}

/// Opens `record` at full resolution and cuts it as `geometry` says.
pub fn open_cut(record: &ImageRecord, geometry: &InputGeometry, input_size: u32) -> Result<CutImage, SkippedFile> {
    let image = open_image(&record.path).map_err(|reason| SkippedFile { path: record.path.clone(), reason })?;
    Ok(CutImage::new(image.to_rgb8(), geometry, input_size))
}

/// The inputs a training image gives: one per view the region keeps, each with the record's `index`.
pub fn training_inputs(index: usize, cut: &CutImage, size: u32) -> Vec<DecodedImage> {
    let original_size = cut.rgb.dimensions();
    cut.plan
        .views
        .iter()
        .map(|&view| DecodedImage { index, original_size, size, rgb: cut.input(view, size), mask: None })
        .collect()
}

/// Scores one cut image: its views through `model` in batches of `batch_size`, the maps stitched, the image
/// score the stitched map's maximum (inside the region).
pub fn score_cut(
    model: &dyn AnomalyModel,
    geometry: &InputGeometry,
    cut: &CutImage,
    batch_size: usize,
    device: &Device,
) -> Result<AnomalyOutput> {
    let size = model.image_size();
    let mut maps = Vec::with_capacity(cut.plan.views.len());
    for views in cut.plan.views.chunks(batch_size.max(1)) {
        let inputs: Vec<DecodedImage> = views
            .iter()
            .map(|&view| DecodedImage {
                index: 0,
                original_size: cut.rgb.dimensions(),
                size,
                rgb: cut.input(view, size),
                mask: None,
            })
            .collect();
        let tensor = images_to_tensor(&inputs, device)?;
        maps.extend(model.score_batch(&tensor)?.into_iter().map(|output| output.map));
    }
    let map = cut.stitch(&maps, blend_overlap(geometry));
    let score = match &cut.plan.region_mask {
        Some(mask) => {
            map.data.iter().zip(mask).filter(|(_, &m)| m == 1).map(|(v, _)| *v).fold(f32::NEG_INFINITY, f32::max)
        }
        None => map.max(),
    };
    Ok(AnomalyOutput { score, map })
}

/// Opens `records` a few at a time (in parallel) and scores each as `geometry` cuts it, handing `each` the
/// record's index, the cut image and its output, in record order. Returns the files that could not be read and
/// the seconds spent scoring. Advances `progress` by one per file; stops with `Cancelled` between files.
pub fn score_each(
    model: &dyn AnomalyModel,
    geometry: &InputGeometry,
    records: &[ImageRecord],
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
    mut each: impl FnMut(usize, &CutImage, AnomalyOutput) -> Result<()>,
) -> Result<(Vec<SkippedFile>, f64)> {
    let mut skipped = Vec::new();
    let mut seconds = 0.0;
    let chunk = rayon::current_num_threads().max(1);
    for (chunk_index, chunk_records) in records.chunks(chunk).enumerate() {
        let cuts: Vec<_> =
            chunk_records.par_iter().map(|record| open_cut(record, geometry, model.image_size())).collect();
        for (i, cut) in cuts.into_iter().enumerate() {
            check_cancelled(progress)?;
            match cut {
                Ok(cut) => {
                    let started = Instant::now();
                    let output = score_cut(model, geometry, &cut, batch_size, device)?;
                    seconds += started.elapsed().as_secs_f64();
                    each(chunk_index * chunk + i, &cut, output)?;
                }
                Err(skip) => skipped.push(skip),
            }
            progress.advance(1);
        }
    }
    Ok((skipped, seconds))
}

/// Scores one file as `geometry` says: what `loupe infer` and the line runtime do for each part. Returns the
/// file's size and the output, or a reason fit for a person (the file cannot be read, or scoring failed).
pub fn score_file(
    model: &dyn AnomalyModel,
    geometry: &InputGeometry,
    path: &std::path::Path,
    batch_size: usize,
    device: &Device,
) -> Result<((u32, u32), AnomalyOutput), String> {
    let record = ImageRecord::normal(path.to_path_buf());
    let scoring_failed = |e: anyhow::Error| format!("scoring failed: {e}");
    if geometry.is_whole_image() {
        let (mut images, skipped) = decode_all(&[record], model.image_size(), &|_| {});
        let Some(image) = images.pop() else {
            return Err(skipped.first().map_or("cannot be read".into(), |skip| skip.reason.clone()));
        };
        let tensor = images_to_tensor(&[&image], device).map_err(scoring_failed)?;
        let output = model.score_batch(&tensor).map_err(scoring_failed)?.pop().ok_or("the model returned no score")?;
        return Ok((image.original_size, output));
    }
    let cut = open_cut(&record, geometry, model.image_size()).map_err(|skip| skip.reason)?;
    let output = score_cut(model, geometry, &cut, batch_size, device).map_err(scoring_failed)?;
    Ok((cut.rgb.dimensions(), output))
}

/// A ground-truth mask (any format `image` reads, non-zero = defect) at the cut image's map size, a cell set
/// when any defect pixel falls in it: a defect of a few pixels stays in the map-sized mask.
pub fn mask_at_map_size(mask_path: &std::path::Path, cut: &CutImage) -> Result<Vec<u8>, String> {
    let mask = open_image(mask_path)?.to_luma8();
    if mask.dimensions() != cut.rgb.dimensions() {
        let (w, h) = mask.dimensions();
        let (iw, ih) = cut.rgb.dimensions();
        return Err(format!("mask is {w}×{h} but its image is {iw}×{ih}"));
    }
    let (width, height) = (cut.plan.map_width, cut.plan.map_height);
    let mut cells = vec![0u8; width * height];
    let scale = cut.plan.map_scale;
    for (x, y, pixel) in mask.enumerate_pixels() {
        if pixel[0] > 127 {
            let cx = ((x as f64 * scale) as usize).min(width - 1);
            let cy = ((y as f64 * scale) as usize).min(height - 1);
            cells[cy * width + cx] = 1;
        }
    }
    Ok(cells)
}

/// Resizes an image with the triangle filter (for the studio's previews and the generator's whole-image
/// baselines).
pub fn resized(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    image::imageops::resize(image, width, height, FilterType::Triangle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_side_evenly_and_overlap_at_least_as_asked() {
        assert_eq!(tile_starts(512, 512, 64), vec![0]);
        assert_eq!(tile_starts(300, 512, 64), vec![0], "a side shorter than a tile is one view");
        let small = InputGeometry::tiles(512, 64).views(300, 200);
        assert_eq!(small, vec![View { x: 0, y: 0, width: 300, height: 200 }], "the whole image, as resizing sees it");
        let starts = tile_starts(4096, 512, 64);
        assert_eq!((starts[0], *starts.last().unwrap()), (0, 4096 - 512));
        assert!(starts.windows(2).all(|w| w[1] - w[0] <= 512 - 64 && w[1] > w[0]), "{starts:?}");
        assert_eq!(starts.len(), 9, "3584 / 448 = 8 gaps");
        let exact = tile_starts(2048, 512, 0);
        assert_eq!(exact, vec![0, 512, 1024, 1536]);
    }

    #[test]
    fn a_rectangle_region_masks_the_pixels_whose_centres_it_holds() {
        let region = Region::rectangle(2.0, 1.0, 3.0, 2.0);
        let mask = region.mask(8, 5, 1.0);
        let rows: Vec<String> = mask.chunks(8).map(|r| r.iter().map(|v| v.to_string()).collect()).collect();
        assert_eq!(rows, ["00000000", "00111000", "00111000", "00000000", "00000000"]);
        let triangle = Region::parse("0,0; 8,0; 0,8").unwrap().mask(8, 8, 1.0);
        assert_eq!(triangle.iter().filter(|&&v| v == 1).count(), 28, "half of 64 minus the diagonal's centres");
        assert_eq!(Region::parse("2,1,3,2").unwrap(), region);
        assert!(Region::parse("1,2,3").is_err() && Region::parse("0,0;1,1").is_err());
        assert!(Region::parse("0,0;1e9,0;0,1").is_err() && Region::parse("0,0;NaN,0;0,1").is_err());
    }

    #[test]
    fn stitching_constant_tiles_gives_a_constant_map_without_seams() {
        let cut = CutImage::new(RgbImage::new(1000, 700), &InputGeometry::tiles(256, 32), 64);
        assert_eq!((cut.plan.map_width, cut.plan.map_height), (250, 175));
        let maps: Vec<ScoreMap> = cut.plan.views.iter().map(|_| ScoreMap::new(64, 64, vec![3.0; 64 * 64])).collect();
        let map = cut.stitch(&maps, 32);
        assert!(map.data.iter().all(|v| (v - 3.0).abs() < 1e-5));
        // A ramp in x across the image, each tile giving its own slice of it: stitched, it stays a ramp.
        let ramp_maps: Vec<ScoreMap> = cut
            .plan
            .views
            .iter()
            .map(|view| {
                let data = (0..64 * 64).map(|i| (view.x as f32 + ((i % 64) as f32 + 0.5) * 4.0) / 1000.0).collect();
                ScoreMap::new(64, 64, data)
            })
            .collect();
        let ramp = cut.stitch(&ramp_maps, 32);
        let row = &ramp.data[100 * 250..101 * 250];
        let worst = row
            .iter()
            .enumerate()
            .skip(1)
            .take(248)
            .map(|(x, v)| (v - (x as f32 + 0.5) * 4.0 / 1000.0).abs())
            .fold(0.0, f32::max);
        assert!(worst < 0.004, "seams: off by {worst}");
    }

    #[test]
    fn the_region_drops_tiles_and_floors_the_map_outside() {
        let geometry = InputGeometry {
            layout: Layout::Tiles { tile: 100, overlap: 0 },
            region: Some(Region::rectangle(0.0, 0.0, 150.0, 100.0)),
        };
        let cut = CutImage::new(RgbImage::new(400, 200), &geometry, 50);
        assert_eq!(cut.plan.views.len(), 2, "{:?}", cut.plan.views);
        let maps = vec![ScoreMap::new(50, 50, vec![1.0; 2500]), ScoreMap::new(50, 50, vec![2.0; 2500])];
        let map = cut.stitch(&maps, 0);
        assert_eq!((map.width, map.height), (200, 100));
        assert_eq!(map.data[10 * 200 + 10], 1.0);
        assert_eq!(map.data[10 * 200 + 60], 2.0);
        assert_eq!(map.data[10 * 200 + 80], 1.0, "outside the region: the lowest value inside");
        assert_eq!(map.data[80 * 200 + 10], 1.0);
    }

    #[test]
    fn a_view_past_the_edge_repeats_the_last_pixels() {
        let image = RgbImage::from_fn(6, 3, |x, y| image::Rgb([x as u8 * 10, y as u8 * 10, 0]));
        let geometry = InputGeometry { layout: Layout::KeepAspect, region: None };
        let cut = CutImage::new(image, &geometry, 6);
        assert_eq!(cut.plan.views, vec![View { x: 0, y: 0, width: 6, height: 6 }]);
        let input = cut.input(cut.plan.views[0], 6);
        let pixel = |x: usize, y: usize| [input[(y * 6 + x) * 3], input[(y * 6 + x) * 3 + 1]];
        assert_eq!(pixel(4, 1), [40, 10]);
        assert_eq!(pixel(4, 5), [40, 20], "rows past the bottom repeat the last row");
    }

    #[test]
    fn bad_geometries_are_refused_with_the_value() {
        assert!(InputGeometry::tiles(16, 0).check().unwrap_err().to_string().contains("tile side 16"));
        assert!(InputGeometry::tiles(512, 300).check().unwrap_err().to_string().contains("overlap 300"));
        assert!(InputGeometry::tiles(512, 64).check().is_ok());
    }
}
