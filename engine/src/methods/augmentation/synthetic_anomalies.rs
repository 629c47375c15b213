//! Synthetic anomalies made from normal images, for the methods that learn from them (CutPaste, DRAEM, FCDD's
//! outlier exposure). Every generator is seeded and returns the changed image together with its mask: exactly
//! the pixels it wrote.
//!
//! Images are `3 × S × S` channel-planar f32 in [0, 1] (as [`crate::dataset::DecodedImage::to_chw_f32`]).

use crate::methods::features::PATCH_STRIDE;
use crate::rng::SplitMix64;

/// An image with the mask (`S × S`, 1 = changed) of what a generator pasted into it.
pub struct Augmented {
    pub image: Vec<f32>,
    pub mask: Vec<u8>,
}

/// Brightness and contrast jitter of a pasted patch (CutPaste's colour jitter, ±10 %).
struct Jitter {
    brightness: f32,
    contrast: f32,
    mean: f32,
}

impl Jitter {
    fn draw(rng: &mut SplitMix64, mean: f32) -> Self {
        Self { brightness: rng.range_f32(0.9, 1.1), contrast: rng.range_f32(0.9, 1.1), mean }
    }

    fn apply(&self, value: f32) -> f32 {
        (((value - self.mean) * self.contrast + self.mean) * self.brightness).clamp(0.0, 1.0)
    }
}

fn plane_mean(image: &[f32]) -> f32 {
    image.iter().sum::<f32>() / image.len().max(1) as f32
}

/// Copies `source` pixels into the image where `map(x, y)` names a source pixel, marking the mask.
fn paste(
    image: &[f32],
    size: usize,
    jitter: &Jitter,
    map: impl Fn(usize, usize) -> Option<(usize, usize)>,
) -> Augmented {
    let plane = size * size;
    let mut out = image.to_vec();
    let mut mask = vec![0u8; plane];
    for y in 0..size {
        for x in 0..size {
            if let Some((sx, sy)) = map(x, y) {
                mask[y * size + x] = 1;
                for c in 0..3 {
                    out[c * plane + y * size + x] = jitter.apply(image[c * plane + sy * size + sx]);
                }
            }
        }
    }
    Augmented { image: out, mask }
}

/// CutPaste (Li et al. 2021): a rectangle of 2–15 % of the image, aspect ratio log-uniform in [0.3, 1/0.3], cut
/// from one place, colour-jittered and pasted at another.
pub fn cutpaste(image: &[f32], size: usize, rng: &mut SplitMix64) -> Augmented {
    let area = rng.range_f32(0.02, 0.15) * (size * size) as f32;
    let aspect = (rng.range_f32(0.3f32.ln(), (1.0f32 / 0.3).ln())).exp();
    let width = ((area * aspect).sqrt().round() as usize).clamp(1, size - 1);
    let height = ((area / aspect).sqrt().round() as usize).clamp(1, size - 1);
    let (from_x, from_y) = (rng.below(size - width + 1), rng.below(size - height + 1));
    let (to_x, to_y) = (rng.below(size - width + 1), rng.below(size - height + 1));
    let jitter = Jitter::draw(rng, plane_mean(image));
    paste(image, size, &jitter, |x, y| {
        (x >= to_x && x < to_x + width && y >= to_y && y < to_y + height)
            .then(|| (from_x + x - to_x, from_y + y - to_y))
    })
}

/// CutPaste-Scar: a thin strip (2–16 × 10–25 px at 256 px, scaled with the image), rotated by ±45°, colour-
/// jittered and pasted.
pub fn scar(image: &[f32], size: usize, rng: &mut SplitMix64) -> Augmented {
    let scale = size as f32 / 256.0;
    let width = (rng.range_f32(2.0, 16.0) * scale).max(1.0);
    let length = (rng.range_f32(10.0, 25.0) * scale).max(2.0);
    let angle = rng.range_f32(-45.0, 45.0).to_radians();
    let (sin, cos) = angle.sin_cos();
    let margin = (width.hypot(length) / 2.0).ceil() as usize + 1;
    let margin = margin.min(size / 2 - 1);
    let pick = |rng: &mut SplitMix64| (margin + rng.below(size - 2 * margin)) as f32;
    let (from_x, from_y) = (pick(rng), pick(rng));
    let (to_x, to_y) = (pick(rng), pick(rng));
    let jitter = Jitter::draw(rng, plane_mean(image));
    paste(image, size, &jitter, |x, y| {
        let (dx, dy) = (x as f32 - to_x, y as f32 - to_y);
        // Into the strip's own frame.
        let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
        (u.abs() <= width / 2.0 && v.abs() <= length / 2.0).then(|| {
            let sx = (from_x + dx).round().clamp(0.0, (size - 1) as f32) as usize;
            let sy = (from_y + dy).round().clamp(0.0, (size - 1) as f32) as usize;
            (sx, sy)
        })
    })
}

/// Seeded 2-D Perlin (gradient) noise on an `S × S` grid with `cells` lattice cells per side, in about [−1, 1].
pub fn perlin(size: usize, cells: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let cells = cells.max(1);
    let gradients: Vec<(f32, f32)> = (0..(cells + 1) * (cells + 1))
        .map(|_| {
            let angle = rng.range_f32(0.0, std::f32::consts::TAU);
            (angle.cos(), angle.sin())
        })
        .collect();
    let fade = |t: f32| t * t * t * (t * (t * 6.0 - 15.0) + 10.0);
    let mut noise = vec![0f32; size * size];
    for y in 0..size {
        for x in 0..size {
            let (gx, gy) = (x as f32 * cells as f32 / size as f32, y as f32 * cells as f32 / size as f32);
            let (cx, cy) = (gx.floor() as usize, gy.floor() as usize);
            let (fx, fy) = (gx - cx as f32, gy - cy as f32);
            let dot = |ix: usize, iy: usize| {
                let (gxv, gyv) = gradients[iy * (cells + 1) + ix];
                gxv * (fx - (ix - cx) as f32) + gyv * (fy - (iy - cy) as f32)
            };
            let (u, v) = (fade(fx), fade(fy));
            let top = dot(cx, cy) + u * (dot(cx + 1, cy) - dot(cx, cy));
            let bottom = dot(cx, cy + 1) + u * (dot(cx + 1, cy + 1) - dot(cx, cy + 1));
            noise[y * size + x] = (top + v * (bottom - top)) * std::f32::consts::SQRT_2;
        }
    }
    noise
}

/// DRAEM-style anomaly: a Perlin-noise blob mask (2–64 lattice cells, thresholded at 0.5) through which a
/// foreign texture is blended in with opacity β ∈ [0.1, 1).
pub fn perlin_blend(image: &[f32], texture: &[f32], size: usize, rng: &mut SplitMix64) -> Augmented {
    let cells = 1 << (1 + rng.below(6));
    let noise = perlin(size, cells, rng);
    blend_where(image, texture, size, rng, noise.iter().map(|&n| n > 0.5))
}

/// Like [`perlin_blend`], but the mask is a thin band along the zero level of Perlin noise (2–16 lattice
/// cells, half-width 0.02–0.05 in noise units): winding lines a few pixels wide, like cracks and scratches,
/// which blob masks never are.
pub fn perlin_contour_blend(image: &[f32], texture: &[f32], size: usize, rng: &mut SplitMix64) -> Augmented {
    let cells = 1 << (1 + rng.below(4));
    let noise = perlin(size, cells, rng);
    let half_width = rng.range_f32(0.02, 0.05);
    blend_where(image, texture, size, rng, noise.iter().map(|&n| n.abs() < half_width))
}

/// Blends `texture` into `image` with a random opacity β ∈ [0.1, 1) wherever `inside` says.
fn blend_where(
    image: &[f32],
    texture: &[f32],
    size: usize,
    rng: &mut SplitMix64,
    inside: impl Iterator<Item = bool>,
) -> Augmented {
    let plane = size * size;
    let opacity = rng.range_f32(0.1, 1.0);
    let mut out = image.to_vec();
    let mut mask = vec![0u8; plane];
    for (p, inside) in inside.enumerate() {
        if inside {
            mask[p] = 1;
            for c in 0..3 {
                let i = c * plane + p;
                out[i] = (1.0 - opacity) * image[i] + opacity * texture[i];
            }
        }
    }
    Augmented { image: out, mask }
}

/// A texture for [`perlin_blend`] that is the image itself with its intensity rescaled (×0.5–0.8 or ×1.2–1.5,
/// ±0.1): blended through a Perlin mask it makes a brighter or darker blob of the part's own surface.
pub fn brightness_changed(image: &[f32], rng: &mut SplitMix64) -> Vec<f32> {
    let gain = if rng.below(2) == 0 { rng.range_f32(0.5, 0.8) } else { rng.range_f32(1.2, 1.5) };
    let offset = rng.range_f32(-0.1, 0.1);
    image.iter().map(|v| (v * gain + offset).clamp(0.0, 1.0)).collect()
}

/// A foreign texture for [`perlin_blend`] made from another normal image (there is no texture set such as DTD
/// here): rotated by 90°, 180° or 270°, optionally mirrored,
/// intensity-rescaled and optionally inverted. Channel-planar `3 × s × s`.
pub fn foreign_texture(image: &[f32], side: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let quarter_turns = 1 + rng.below(3);
    let mirror = rng.below(2) == 1;
    let (gain, offset) = (rng.range_f32(0.5, 1.5), rng.range_f32(-0.3, 0.3));
    let invert = rng.below(2) == 1;
    let plane = side * side;
    let mut out = vec![0f32; 3 * plane];
    for y in 0..side {
        for x in 0..side {
            let (mut sx, mut sy) = (if mirror { side - 1 - x } else { x }, y);
            for _ in 0..quarter_turns {
                (sx, sy) = (sy, side - 1 - sx);
            }
            for c in 0..3 {
                let v = (image[c * plane + sy * side + sx] * gain + offset).clamp(0.0, 1.0);
                out[c * plane + y * side + x] = if invert { 1.0 - v } else { v };
            }
        }
    }
    out
}

/// One synthetic outlier for outlier exposure, one third each: CutPaste, CutPaste-Scar, or a Perlin blend of a
/// foreign texture made from `other` (another normal image). Drawn again (up to 8 times) when the Perlin mask
/// came out empty, so the outlier always differs from `image`.
pub fn random_anomaly(image: &[f32], other: &[f32], size: usize, rng: &mut SplitMix64) -> Augmented {
    let mut attempt = 0;
    loop {
        let augmented = match rng.below(3) {
            0 => cutpaste(image, size, rng),
            1 => scar(image, size, rng),
            _ => perlin_blend(image, &foreign_texture(other, size, rng), size, rng),
        };
        attempt += 1;
        if attempt == 8 || augmented.mask.contains(&1) {
            return augmented;
        }
    }
}

/// Per 8×8 patch of an `S × S` mask (row-major over the patch grid): `class` if any of its pixels is set,
/// 0 otherwise — the patch-level target of the models that learn from these masks.
pub fn patch_labels(mask: &[u8], size: usize, class: u32) -> Vec<u32> {
    let grid = size.div_ceil(PATCH_STRIDE);
    let mut labels = vec![0; grid * grid];
    for y in 0..size {
        for x in 0..size {
            if mask[y * size + x] != 0 {
                labels[(y / PATCH_STRIDE) * grid + x / PATCH_STRIDE] = class;
            }
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A textured test image: every pixel differs from its neighbours.
    fn texture(size: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..3 * size * size).map(|_| rng.next_f32()).collect()
    }

    /// Outside the mask nothing changed; inside, (almost) every pixel did.
    fn assert_mask_matches_changes(name: &str, original: &[f32], augmented: &Augmented, size: usize) {
        let plane = size * size;
        let mut marked = 0;
        let mut changed_inside = 0;
        for p in 0..plane {
            let changed = (0..3).any(|c| original[c * plane + p] != augmented.image[c * plane + p]);
            if augmented.mask[p] == 1 {
                marked += 1;
                changed_inside += changed as usize;
            } else {
                assert!(!changed, "{name}: pixel {p} changed outside the mask");
            }
        }
        assert!(marked > 0, "{name}: empty mask");
        assert!(changed_inside as f64 >= 0.9 * marked as f64, "{name}: {changed_inside} of {marked} changed");
    }

    #[test]
    fn generators_mark_exactly_the_pixels_they_change() {
        let size = 64;
        let image = texture(size, 1);
        let other = texture(size, 2);
        for seed in 0..20 {
            let mut rng = SplitMix64::new(seed);
            assert_mask_matches_changes("cutpaste", &image, &cutpaste(&image, size, &mut rng), size);
            assert_mask_matches_changes("scar", &image, &scar(&image, size, &mut rng), size);
            let blend = perlin_blend(&image, &other, size, &mut rng);
            if blend.mask.contains(&1) {
                assert_mask_matches_changes("perlin", &image, &blend, size);
            }
            let contour = perlin_contour_blend(&image, &other, size, &mut rng);
            assert_mask_matches_changes("perlin contour", &image, &contour, size);
            // Thin: most marked pixels have an unmarked pixel within two pixels across.
            let marked = contour.mask.iter().filter(|&&m| m == 1).count();
            assert!(marked < size * size / 4, "contour mask covers {marked} of {} pixels", size * size);
        }
    }

    #[test]
    fn generators_are_seeded() {
        let size = 48;
        let image = texture(size, 3);
        let run = |seed| {
            let mut rng = SplitMix64::new(seed);
            let a = cutpaste(&image, size, &mut rng);
            let b = scar(&image, size, &mut rng);
            (a.image, a.mask, b.image, b.mask, perlin(size, 4, &mut rng))
        };
        assert!(run(7) == run(7));
        assert!(run(7) != run(8));
    }

    #[test]
    fn perlin_noise_is_bounded_and_smooth() {
        let mut rng = SplitMix64::new(5);
        let size = 64;
        let noise = perlin(size, 4, &mut rng);
        assert!(noise.iter().all(|v| v.abs() <= 1.0 + 1e-5));
        assert!(noise.iter().any(|&v| v > 0.3) && noise.iter().any(|&v| v < -0.3), "not flat");
        // Neighbours differ by far less than the range: a 16-pixel lattice cell is smooth.
        let mut steepest = 0f32;
        for y in 0..size - 1 {
            for x in 0..size - 1 {
                let p = y * size + x;
                steepest = steepest.max((noise[p] - noise[p + 1]).abs()).max((noise[p] - noise[p + size]).abs());
            }
        }
        assert!(steepest < 0.25, "steepest step {steepest}");
    }

    #[test]
    fn a_patch_is_labelled_when_any_of_its_pixels_is_masked() {
        let size = 16;
        let mut mask = vec![0u8; size * size];
        mask[9 * size + 3] = 1; // patch (row 1, column 0)
        assert_eq!(patch_labels(&mask, size, 2), vec![0, 0, 2, 0]);
    }

    #[test]
    fn foreign_texture_is_a_seeded_rearrangement() {
        let side = 8;
        let image: Vec<f32> = (0..3 * side * side).map(|i| (i % 97) as f32 / 97.0).collect();
        let a = foreign_texture(&image, side, &mut SplitMix64::new(1));
        let b = foreign_texture(&image, side, &mut SplitMix64::new(1));
        assert_eq!(a, b);
        assert_ne!(a, image);
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
