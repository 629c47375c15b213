//! A defect mask being painted: one byte per pixel of the image at its full resolution (1 = defect), with the
//! painting operations a labeller uses — brush and eraser strokes, polygons, fill — each reporting the
//! rectangle it changed, and an undo/redo history of whole edits.

use crate::dataset::decode::{decode_image, open_image};
use anyhow::{anyhow, bail, Result};
use std::collections::VecDeque;
use std::path::Path;

/// Pixel rectangle `[x0, y0, x1, y1)` that an edit touched.
pub type Dirty = [u32; 4];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefectMask {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl DefectMask {
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height, pixels: vec![0; width as usize * height as usize] }
    }

    /// From row-major values, non-zero = defect.
    pub fn from_values(width: u32, height: u32, values: &[u8]) -> Result<Self> {
        if values.len() != width as usize * height as usize {
            bail!("a {width}×{height} mask needs {} values, got {}", width as u64 * height as u64, values.len());
        }
        Ok(Self { width, height, pixels: values.iter().map(|&v| u8::from(v != 0)).collect() })
    }

    /// Reads a mask image (any format the image crate decodes; non-zero = defect) through the images' bounded
    /// decoder (`dataset::decode`: sizes, truncation, the shared decode budget).
    pub fn read(path: &Path) -> Result<Self> {
        let image = open_image(path).map_err(|reason| anyhow!("{}: {reason}", path.display()))?;
        Ok(Self::from_luma(&image.to_luma8()))
    }

    /// [`Self::read`] from a file's bytes.
    pub fn decode(bytes: Vec<u8>) -> Result<Self> {
        let image = decode_image(bytes).map_err(|reason| anyhow!("{reason}"))?;
        Ok(Self::from_luma(&image.to_luma8()))
    }

    fn from_luma(image: &image::GrayImage) -> Self {
        let pixels = image.as_raw().iter().map(|&v| u8::from(v != 0)).collect();
        Self { width: image.width(), height: image.height(), pixels }
    }

    /// Writes the mask as an 8-bit PNG of 0 / 255, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        super::write_mask_png(path, self.width, self.height, &self.pixels)
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Row-major, 1 = defect.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    pub fn into_pixels(self) -> Vec<u8> {
        self.pixels
    }

    pub fn get(&self, x: u32, y: u32) -> bool {
        x < self.width && y < self.height && self.pixels[(y * self.width + x) as usize] != 0
    }

    pub fn defect_pixels(&self) -> usize {
        self.pixels.iter().filter(|&&p| p != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.pixels.iter().all(|&p| p == 0)
    }

    /// Paints (or with `defect` false, erases) a round brush of `radius` pixels dragged from `from` to `to`, in
    /// pixel coordinates (the first pixel's centre at (0.5, 0.5)): every pixel whose centre lies within `radius`
    /// of the segment. Returns the rectangle that may have changed, `None` when it lies outside the image.
    pub fn stroke(&mut self, from: [f32; 2], to: [f32; 2], radius: f32, defect: bool) -> Option<Dirty> {
        let radius = radius.max(0.5);
        let dirty = self.clip([
            from[0].min(to[0]) - radius,
            from[1].min(to[1]) - radius,
            from[0].max(to[0]) + radius,
            from[1].max(to[1]) + radius,
        ])?;
        let (dx, dy) = (to[0] - from[0], to[1] - from[1]);
        let length_squared = dx * dx + dy * dy;
        let value = u8::from(defect);
        for y in dirty[1]..dirty[3] {
            for x in dirty[0]..dirty[2] {
                let (px, py) = (x as f32 + 0.5 - from[0], y as f32 + 0.5 - from[1]);
                let along =
                    if length_squared > 0.0 { ((px * dx + py * dy) / length_squared).clamp(0.0, 1.0) } else { 0.0 };
                let (ox, oy) = (px - along * dx, py - along * dy);
                if ox * ox + oy * oy <= radius * radius {
                    self.pixels[(y * self.width + x) as usize] = value;
                }
            }
        }
        Some(dirty)
    }

    /// Sets to `defect` the pixels whose centres lie inside `outline` (even–odd rule), in pixel coordinates.
    pub fn fill_polygon(&mut self, outline: &[[f64; 2]], defect: bool) -> Option<Dirty> {
        if outline.len() < 3 {
            return None;
        }
        let bounds = outline.iter().fold([f32::MAX, f32::MAX, f32::MIN, f32::MIN], |b, p| {
            [b[0].min(p[0] as f32), b[1].min(p[1] as f32), b[2].max(p[0] as f32), b[3].max(p[1] as f32)]
        });
        let dirty = self.clip(bounds)?;
        let width = self.width as usize;
        let value = u8::from(defect);
        let mut crossings = Vec::new();
        for y in dirty[1] as usize..dirty[3] as usize {
            let centre_y = y as f64 + 0.5;
            crossings.clear();
            for (i, a) in outline.iter().enumerate() {
                let b = outline[(i + 1) % outline.len()];
                if (a[1] <= centre_y) != (b[1] <= centre_y) {
                    crossings.push(a[0] + (centre_y - a[1]) / (b[1] - a[1]) * (b[0] - a[0]));
                }
            }
            crossings.sort_by(f64::total_cmp);
            for span in crossings.chunks_exact(2) {
                // Pixels x with span[0] ≤ x + 0.5 < span[1].
                let first = (span[0] - 0.5).ceil().max(0.0) as usize;
                let end = ((span[1] - 0.5).ceil().max(0.0) as usize).min(width);
                self.pixels[y * width + first.min(end)..y * width + end].fill(value);
            }
        }
        Some(dirty)
    }

    /// The paint bucket: the 4-connected region of pixels equal to the one at (`x`, `y`) flips — a hole inside
    /// a painted outline fills, a painted blob clears. Returns the changed rectangle.
    pub fn flood_fill(&mut self, x: u32, y: u32) -> Option<Dirty> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let width = self.width as usize;
        let target = self.pixels[y as usize * width + x as usize];
        let replacement = 1 - target.min(1);
        let mut dirty = [x, y, x + 1, y + 1];
        let mut stack = vec![(x, y)];
        self.pixels[y as usize * width + x as usize] = replacement;
        while let Some((x, y)) = stack.pop() {
            dirty = [dirty[0].min(x), dirty[1].min(y), dirty[2].max(x + 1), dirty[3].max(y + 1)];
            let neighbours = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
            for (nx, ny) in neighbours {
                if nx < self.width && ny < self.height {
                    let index = ny as usize * width + nx as usize;
                    if self.pixels[index] == target {
                        self.pixels[index] = replacement;
                        stack.push((nx, ny));
                    }
                }
            }
        }
        Some(dirty)
    }

    /// The whole-pixel rectangle covering `[x0, y0, x1, y1]` (pixel coordinates) inside the image.
    fn clip(&self, bounds: [f32; 4]) -> Option<Dirty> {
        let x0 = bounds[0].floor().max(0.0) as u32;
        let y0 = bounds[1].floor().max(0.0) as u32;
        let x1 = (bounds[2].ceil().max(0.0) as u32).min(self.width);
        let y1 = (bounds[3].ceil().max(0.0) as u32).min(self.height);
        (x0 < x1 && y0 < y1).then_some([x0, y0, x1, y1])
    }
}

/// Undo and redo of whole edits (a stroke, a polygon, a fill), as snapshots of the mask before each, within a
/// memory budget: the oldest steps are forgotten first.
#[derive(Debug)]
pub struct MaskHistory {
    undo: VecDeque<Vec<u8>>,
    redo: Vec<Vec<u8>>,
    budget_bytes: usize,
}

impl Default for MaskHistory {
    fn default() -> Self {
        Self::with_budget(256 << 20)
    }
}

impl MaskHistory {
    pub fn with_budget(budget_bytes: usize) -> Self {
        Self { undo: VecDeque::new(), redo: Vec::new(), budget_bytes }
    }

    /// Call before an edit changes `mask`: the edit becomes one undo step, and what was undone cannot be redone.
    pub fn record(&mut self, mask: &DefectMask) {
        self.redo.clear();
        self.undo.push_back(mask.pixels.clone());
        while self.undo.len() > 1 && self.undo.len() * mask.pixels.len() > self.budget_bytes {
            self.undo.pop_front();
        }
    }

    /// Takes back the last edit; false when there is none.
    pub fn undo(&mut self, mask: &mut DefectMask) -> bool {
        let Some(before) = self.undo.pop_back() else { return false };
        self.redo.push(std::mem::replace(&mut mask.pixels, before));
        true
    }

    /// Does again the last undone edit; false when there is none.
    pub fn redo(&mut self, mask: &mut DefectMask) -> bool {
        let Some(after) = self.redo.pop() else { return false };
        self.undo.push_back(std::mem::replace(&mut mask.pixels, after));
        true
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn painted(mask: &DefectMask) -> Vec<(u32, u32)> {
        (0..mask.height())
            .flat_map(|y| (0..mask.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| mask.get(x, y))
            .collect()
    }

    #[test]
    fn a_brush_dab_covers_the_pixels_within_its_radius() {
        let mut mask = DefectMask::new(9, 9);
        let dirty = mask.stroke([4.5, 4.5], [4.5, 4.5], 1.0, true).unwrap();
        // Centre and its four neighbours are within 1 px; the diagonals (√2) are not.
        assert_eq!(painted(&mask), vec![(4, 3), (3, 4), (4, 4), (5, 4), (4, 5)]);
        assert!(dirty[0] <= 3 && dirty[1] <= 3 && dirty[2] >= 6 && dirty[3] >= 6);
    }

    #[test]
    fn a_stroke_paints_a_capsule_and_the_eraser_takes_it_back() {
        let mut mask = DefectMask::new(20, 10);
        mask.stroke([2.5, 5.5], [17.5, 5.5], 1.5, true);
        assert!((2..=17).all(|x| mask.get(x, 4) && mask.get(x, 5) && mask.get(x, 6)));
        assert!(!mask.get(10, 2) && !mask.get(10, 8) && !mask.get(0, 5) && !mask.get(19, 5));
        mask.stroke([0.0, 5.0], [20.0, 5.0], 4.0, false);
        assert!(mask.is_empty());
    }

    #[test]
    fn strokes_outside_the_image_change_nothing() {
        let mut mask = DefectMask::new(8, 8);
        assert_eq!(mask.stroke([-20.0, -20.0], [-10.0, -12.0], 3.0, true), None);
        assert_eq!(mask.stroke([100.0, 4.0], [90.0, 4.0], 3.0, true), None);
        assert!(mask.is_empty());
    }

    #[test]
    fn a_polygon_fills_the_pixels_whose_centres_are_inside() {
        let mut mask = DefectMask::new(10, 10);
        mask.fill_polygon(&[[2.0, 2.0], [6.0, 2.0], [6.0, 5.0], [2.0, 5.0]], true);
        assert_eq!(mask.defect_pixels(), 4 * 3);
        assert!(mask.get(2, 2) && mask.get(5, 4) && !mask.get(6, 2) && !mask.get(2, 5));
        mask.fill_polygon(&[[0.0, 0.0], [10.0, 0.0], [10.0, 3.0], [0.0, 3.0]], false);
        assert_eq!(mask.defect_pixels(), 4 * 2);
    }

    #[test]
    fn fill_fills_an_enclosed_hole_and_clears_a_blob() {
        let mut mask = DefectMask::new(12, 12);
        // A ring: the square 2..=8 minus its inside 4..=6.
        mask.fill_polygon(&[[2.0, 2.0], [9.0, 2.0], [9.0, 9.0], [2.0, 9.0]], true);
        mask.fill_polygon(&[[4.0, 4.0], [7.0, 4.0], [7.0, 7.0], [4.0, 7.0]], false);
        let dirty = mask.flood_fill(5, 5).unwrap();
        assert_eq!(dirty, [4, 4, 7, 7]);
        assert_eq!(mask.defect_pixels(), 49);
        mask.flood_fill(3, 3);
        assert!(mask.is_empty());
        // Outside the ring the background is one region: filling it paints everything but nothing else.
        mask.flood_fill(0, 0);
        assert_eq!(mask.defect_pixels(), 144);
    }

    #[test]
    fn undo_and_redo_walk_the_edits() {
        let mut mask = DefectMask::new(6, 6);
        let mut history = MaskHistory::default();
        let empty = mask.clone();
        history.record(&mask);
        mask.stroke([1.5, 1.5], [1.5, 1.5], 0.5, true);
        let one = mask.clone();
        history.record(&mask);
        mask.stroke([4.5, 4.5], [4.5, 4.5], 0.5, true);
        let two = mask.clone();
        assert!(history.undo(&mut mask));
        assert_eq!(mask, one);
        assert!(history.undo(&mut mask));
        assert_eq!(mask, empty);
        assert!(!history.undo(&mut mask));
        assert!(history.redo(&mut mask));
        assert!(history.redo(&mut mask));
        assert_eq!(mask, two);
        assert!(!history.redo(&mut mask));
        // A new edit after an undo drops the redo branch.
        history.undo(&mut mask);
        history.record(&mask);
        mask.flood_fill(0, 0);
        assert!(!history.can_redo());
    }

    #[test]
    fn the_history_forgets_the_oldest_steps_beyond_its_budget() {
        let mut mask = DefectMask::new(10, 10);
        let mut history = MaskHistory::with_budget(300);
        for step in 0..5 {
            history.record(&mask);
            mask.stroke([step as f32 + 0.5, 0.5], [step as f32 + 0.5, 0.5], 0.5, true);
        }
        let mut undone = 0;
        while history.undo(&mut mask) {
            undone += 1;
        }
        assert_eq!(undone, 3);
        assert_eq!(mask.defect_pixels(), 2);
    }

    #[test]
    fn masks_round_trip_through_png_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("loupe-mask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut mask = DefectMask::new(7, 5);
        mask.stroke([3.5, 2.5], [5.5, 2.5], 1.0, true);
        let path = dir.join("m.png");
        mask.write(&path).unwrap();
        assert_eq!(DefectMask::read(&path).unwrap(), mask);
        let junk = dir.join("junk.png");
        std::fs::write(&junk, b"not a png").unwrap();
        let message = format!("{:#}", DefectMask::read(&junk).unwrap_err());
        assert!(message.contains("junk.png"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
