//! A large, varied set of normal images made from a folder's good images (issue 25): each output is a seeded crop
//! (80–100 % of the short side, anywhere), a rotation of up to ±5°, horizontal and vertical flips and a brightness
//! change of ±10 % of one source, so no two outputs are the same. It stands in for a line's archive of thousands of
//! good parts in benchmarks and tests without storing one.

use crate::dataset::decode::{open_image, SkippedFile};
use crate::progress::{check_cancelled, Progress};
use crate::rng::SplitMix64;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// An RGB image, row-major `width × height × 3`.
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Bilinear sample at (x, y) in pixel-centre coordinates, clamped to the image.
    fn sample(&self, x: f32, y: f32) -> [f32; 3] {
        let x = x.clamp(0.0, (self.width - 1) as f32);
        let y = y.clamp(0.0, (self.height - 1) as f32);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.width - 1), (y0 + 1).min(self.height - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let at = |x: usize, y: usize, c: usize| self.pixels[(y * self.width + x) * 3 + c] as f32;
        std::array::from_fn(|c| {
            let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
            let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
            top * (1.0 - fy) + bottom * fy
        })
    }
}

/// One seeded variant of `source` at `size × size` RGB.
pub fn augment(source: &RgbImage, size: usize, rng: &mut SplitMix64) -> Vec<u8> {
    let short = source.width.min(source.height) as f32;
    let side = short * rng.range_f32(0.8, 1.0);
    // The crop's centre, far enough from the border that a ±5° turn of the crop stays mostly inside.
    let centre_x = side / 2.0 + rng.next_f32() * (source.width as f32 - side);
    let centre_y = side / 2.0 + rng.next_f32() * (source.height as f32 - side);
    let (sin, cos) = rng.range_f32(-5.0, 5.0).to_radians().sin_cos();
    let (flip_x, flip_y) = (rng.below(2) == 1, rng.below(2) == 1);
    let brightness = rng.range_f32(0.9, 1.1);
    let scale = side / size as f32;
    let mut out = Vec::with_capacity(size * size * 3);
    for v in 0..size {
        for u in 0..size {
            let u = if flip_x { size - 1 - u } else { u };
            let v = if flip_y { size - 1 - v } else { v };
            let (dx, dy) = ((u as f32 + 0.5) * scale - side / 2.0, (v as f32 + 0.5) * scale - side / 2.0);
            let (x, y) = (centre_x + cos * dx - sin * dy - 0.5, centre_y + sin * dx + cos * dy - 0.5);
            out.extend(source.sample(x, y).map(|value| (value * brightness).round().clamp(0.0, 255.0) as u8));
        }
    }
    out
}

/// Writes `count` variants of the readable images among `sources` to `out` as `normal_00000.png`, … at
/// `size × size`, output i drawn from source i mod n with its own seed. Unreadable sources are returned as
/// skipped, not fatal. Returns the files written.
pub fn write_augmented_normals(
    sources: &[PathBuf],
    count: usize,
    size: usize,
    seed: u64,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(Vec<PathBuf>, Vec<SkippedFile>)> {
    if size == 0 || size > 4096 {
        bail!("image size must be 1–4096 pixels, got {size}");
    }
    progress.begin("reading sources", sources.len() as u64);
    let opened: Vec<Result<RgbImage, SkippedFile>> = sources
        .par_iter()
        .map(|path| {
            let opened = open_image(path).map_err(|reason| SkippedFile { path: path.clone(), reason })?;
            let rgb = opened.image.to_rgb8();
            progress.advance(1);
            Ok(RgbImage { width: rgb.width() as usize, height: rgb.height() as usize, pixels: rgb.into_raw() })
        })
        .collect();
    let (images, skipped): (Vec<_>, Vec<_>) = opened.into_iter().partition(Result::is_ok);
    let images: Vec<RgbImage> = images.into_iter().filter_map(Result::ok).collect();
    let skipped: Vec<SkippedFile> = skipped.into_iter().filter_map(Result::err).collect();
    if images.is_empty() {
        bail!("none of the {} source images could be read", sources.len());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    progress.begin("writing variants", count as u64);
    let written = (0..count)
        .into_par_iter()
        .map(|i| {
            check_cancelled(progress)?;
            let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let pixels = augment(&images[i % images.len()], size, &mut rng);
            let path = out.join(format!("normal_{i:05}.png"));
            image::save_buffer(&path, &pixels, size as u32, size as u32, image::ExtendedColorType::Rgb8)
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress.advance(1);
            Ok(path)
        })
        .collect::<Result<Vec<PathBuf>>>()?;
    Ok((written, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize) -> RgbImage {
        let pixels = (0..width * height).flat_map(|i| [(i % width * 2) as u8, (i / width * 3) as u8, 128]).collect();
        RgbImage { width, height, pixels }
    }

    #[test]
    fn variants_differ_and_repeat_with_the_seed() {
        let source = gradient(80, 60);
        let variant = |seed| augment(&source, 32, &mut SplitMix64::new(seed));
        assert_eq!(variant(1).len(), 32 * 32 * 3);
        assert_eq!(variant(1), variant(1), "the same seed gives the same image");
        let distinct: std::collections::HashSet<Vec<u8>> = (0..50).map(variant).collect();
        assert_eq!(distinct.len(), 50, "no two seeds give the same image");
    }
}
