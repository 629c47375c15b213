//! Deterministic synthetic inspection data: textured surfaces (brushed stripes plus cloudy noise, like machined or
//! pressed parts) with three defect kinds — scratches, spots and dents — and exact pixel masks, written in the
//! MVTec AD layout. The tests train on it and it is the studio's embedded demo data.

use crate::rng::SplitMix64;
use anyhow::{Context, Result};
use std::path::Path;

pub const DEFECT_KINDS: [DefectKind; 3] = [DefectKind::Scratch, DefectKind::Spot, DefectKind::Dent];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefectKind {
    Scratch,
    Spot,
    Dent,
}

impl DefectKind {
    pub fn name(self) -> &'static str {
        match self {
            DefectKind::Scratch => "scratch",
            DefectKind::Spot => "spot",
            DefectKind::Dent => "dent",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SyntheticSpec {
    pub seed: u64,
    pub size: u32,
    pub train_good: usize,
    pub test_good: usize,
    pub test_per_defect: usize,
}

impl SyntheticSpec {
    /// Small enough for tests: a few dozen 96-pixel images.
    pub fn tiny(seed: u64) -> Self {
        Self { seed, size: 96, train_good: 24, test_good: 8, test_per_defect: 4 }
    }

    /// The demo project's data.
    pub fn demo() -> Self {
        Self { seed: 7, size: 192, train_good: 60, test_good: 20, test_per_defect: 10 }
    }
}

/// A grayscale surface in [0, 1], row-major.
#[derive(Debug, Clone)]
pub struct Surface {
    pub size: usize,
    pub pixels: Vec<f32>,
}

/// Smooth value noise: a coarse random grid, bilinearly interpolated.
fn value_noise(rng: &mut SplitMix64, size: usize, cells: usize) -> Vec<f32> {
    let grid: Vec<f32> = (0..(cells + 1) * (cells + 1)).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    let mut out = vec![0f32; size * size];
    for y in 0..size {
        let gy = y as f32 / size as f32 * cells as f32;
        let (y0, ty) = (gy.floor() as usize, gy.fract());
        for x in 0..size {
            let gx = x as f32 / size as f32 * cells as f32;
            let (x0, tx) = (gx.floor() as usize, gx.fract());
            let at = |yy: usize, xx: usize| grid[yy * (cells + 1) + xx];
            let top = at(y0, x0) * (1.0 - tx) + at(y0, x0 + 1) * tx;
            let bottom = at(y0 + 1, x0) * (1.0 - tx) + at(y0 + 1, x0 + 1) * tx;
            out[y * size + x] = top * (1.0 - ty) + bottom * ty;
        }
    }
    out
}

/// A defect-free surface; every call draws a slightly different part.
pub fn normal_surface(rng: &mut SplitMix64, size: usize) -> Surface {
    let phase = rng.range_f32(0.0, std::f32::consts::TAU);
    let frequency = rng.range_f32(0.55, 0.65);
    let angle = rng.range_f32(-0.08, 0.08);
    let brightness = rng.range_f32(0.47, 0.53);
    let coarse = value_noise(rng, size, 4);
    let fine = value_noise(rng, size, 16);
    let (sin, cos) = angle.sin_cos();
    let mut pixels = Vec::with_capacity(size * size);
    for y in 0..size {
        for x in 0..size {
            let u = x as f32 * cos + y as f32 * sin;
            let stripes = 0.06 * (frequency * u + phase).sin();
            let i = y * size + x;
            let grain = 0.015 * rng.normal();
            pixels.push((brightness + stripes + 0.05 * coarse[i] + 0.03 * fine[i] + grain).clamp(0.0, 1.0));
        }
    }
    Surface { size, pixels }
}

/// Paints one defect and returns its mask (1 where pixels changed).
pub fn add_defect(surface: &mut Surface, kind: DefectKind, rng: &mut SplitMix64) -> Vec<u8> {
    let n = surface.size;
    let s = n as f32;
    let mut mask = vec![0u8; n * n];
    let (cx, cy) = (rng.range_f32(0.2 * s, 0.8 * s), rng.range_f32(0.2 * s, 0.8 * s));
    match kind {
        DefectKind::Scratch => {
            let angle = rng.range_f32(0.0, std::f32::consts::PI);
            let half_length = rng.range_f32(0.15 * s, 0.3 * s);
            let half_width = rng.range_f32(0.8, 1.6);
            let (dy, dx) = angle.sin_cos();
            for y in 0..n {
                for x in 0..n {
                    let (px, py) = (x as f32 - cx, y as f32 - cy);
                    let along = px * dx + py * dy;
                    let across = (-px * dy + py * dx).abs();
                    if along.abs() <= half_length && across <= half_width {
                        let i = y * n + x;
                        surface.pixels[i] = (surface.pixels[i] * 0.35).clamp(0.0, 1.0);
                        mask[i] = 1;
                    }
                }
            }
        }
        DefectKind::Spot => {
            let (rx, ry) = (rng.range_f32(0.04 * s, 0.08 * s), rng.range_f32(0.04 * s, 0.08 * s));
            let tone = if rng.next_f32() < 0.5 { 0.12 } else { 0.92 };
            for y in 0..n {
                for x in 0..n {
                    let (px, py) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
                    if px * px + py * py <= 1.0 {
                        let i = y * n + x;
                        surface.pixels[i] = tone;
                        mask[i] = 1;
                    }
                }
            }
        }
        DefectKind::Dent => {
            // Shading of a shallow crater lit from the left: bright rim on one side, dark on the other.
            let radius = rng.range_f32(0.06 * s, 0.11 * s);
            for y in 0..n {
                for x in 0..n {
                    let (px, py) = (x as f32 - cx, y as f32 - cy);
                    let r = (px * px + py * py).sqrt();
                    if r <= radius {
                        let i = y * n + x;
                        let shade = 0.35 * (px / radius) + 0.1;
                        surface.pixels[i] = (surface.pixels[i] + shade).clamp(0.0, 1.0);
                        mask[i] = 1;
                    }
                }
            }
        }
    }
    mask
}

/// Feature-like vectors: `n` points of `dim` dimensions around `clusters` Gaussian centres (spread 4, unit noise),
/// for testing and timing algorithms on features (the coreset) without a backbone.
pub fn clustered_features(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let centres: Vec<f32> = (0..clusters * dim).map(|_| rng.normal() * 4.0).collect();
    (0..n)
        .flat_map(|i| {
            let c = i % clusters;
            (0..dim).map(|d| centres[c * dim + d] + rng.normal()).collect::<Vec<_>>()
        })
        .collect()
}

fn save_gray(path: &Path, size: usize, pixels: impl Iterator<Item = u8>) -> Result<()> {
    let image = image::GrayImage::from_raw(size as u32, size as u32, pixels.collect()).expect("size matches");
    crate::atomic_file::write_image_atomic(path, &image.into())
}

fn save_surface(path: &Path, surface: &Surface) -> Result<()> {
    save_gray(path, surface.size, surface.pixels.iter().map(|&v| (v * 255.0).round() as u8))
}

/// Writes an MVTec AD folder: train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png.
pub fn generate_mvtec(dir: &Path, spec: &SyntheticSpec) -> Result<()> {
    let size = spec.size as usize;
    let mut rng = SplitMix64::new(spec.seed);
    let train_good = dir.join("train/good");
    let test_good = dir.join("test/good");
    for folder in [&train_good, &test_good] {
        std::fs::create_dir_all(folder).with_context(|| format!("{}: cannot create", folder.display()))?;
    }
    for i in 0..spec.train_good {
        save_surface(&train_good.join(format!("{i:03}.png")), &normal_surface(&mut rng, size))?;
    }
    for i in 0..spec.test_good {
        save_surface(&test_good.join(format!("{i:03}.png")), &normal_surface(&mut rng, size))?;
    }
    for kind in DEFECT_KINDS {
        let images = dir.join("test").join(kind.name());
        let masks = dir.join("ground_truth").join(kind.name());
        std::fs::create_dir_all(&images)?;
        std::fs::create_dir_all(&masks)?;
        for i in 0..spec.test_per_defect {
            let mut surface = normal_surface(&mut rng, size);
            let mask = add_defect(&mut surface, kind, &mut rng);
            save_surface(&images.join(format!("{i:03}.png")), &surface)?;
            save_gray(&masks.join(format!("{i:03}_mask.png")), size, mask.iter().map(|&m| m * 255))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_surface() {
        let a = normal_surface(&mut SplitMix64::new(3), 32);
        let b = normal_surface(&mut SplitMix64::new(3), 32);
        let c = normal_surface(&mut SplitMix64::new(4), 32);
        assert_eq!(a.pixels, b.pixels);
        assert_ne!(a.pixels, c.pixels);
    }

    #[test]
    fn defect_masks_cover_exactly_the_changed_pixels() {
        for kind in DEFECT_KINDS {
            let mut rng = SplitMix64::new(11);
            let clean = normal_surface(&mut rng, 64);
            let mut damaged = clean.clone();
            let mask = add_defect(&mut damaged, kind, &mut rng);
            assert!(mask.iter().filter(|&&m| m == 1).count() > 10, "{kind:?} mask too small");
            for ((&m, before), after) in mask.iter().zip(&clean.pixels).zip(&damaged.pixels) {
                if m == 0 {
                    assert_eq!(before, after, "{kind:?} changed a pixel outside its mask");
                }
            }
            let changed = (0..mask.len()).filter(|&i| mask[i] == 1 && clean.pixels[i] != damaged.pixels[i]).count();
            let marked = mask.iter().filter(|&&m| m == 1).count();
            assert!(
                changed as f32 >= 0.9 * marked as f32,
                "{kind:?}: only {changed} of {marked} masked pixels changed"
            );
        }
    }
}
