//! The resize every model input goes through: a triangle (bilinear, antialiased) filter, as image-rs's
//! `FilterType::Triangle`, computed in integers so that an exported ONNX graph reproduces it bit for bit.
//!
//! Why not image-rs's resize: it sums in floating point and rounds to a byte at the end, so a runtime that sums
//! in another order (every BLAS does) lands on the other side of a half now and then, and on MTD's photos those
//! flips moved exported scores by up to 8e-3. Here every weight is an integer and every sum is an integer below
//! 2²⁴, exact in f32 in any order: the graph's two `MatMul`s (see `onnx::layers::camera_to_input`) give the same
//! bytes as this code on every runtime. The only floating-point steps are single divisions, which IEEE rounds
//! the same everywhere. The result differs from image-rs's by at most one level on a few pixels.
//!
//! The filter: output pixel `o` of `size` is centred at `c = (o + ½)·L/size − ½` in a side of `L` pixels, input
//! pixel `i` weighs `max(0, 1 − |i − c| / max(L/size, 1))`. In integers, `|i − c|·2·size = |num|` with
//! `num = 2·size·i + size − (2o + 1)·L`, and the weight is `1 − |num| / (2·max(L, size))`.

/// Fixed-point unit of a raw triangle weight (1.0 = 4096).
pub const RAW_UNIT: f32 = 4096.0;
/// Fixed-point unit of the normalised column weights (first pass).
pub const COLUMN_UNIT: f32 = 4096.0;
/// The first pass keeps 1/16 of a level: its sums are divided by `COLUMN_UNIT / 16`.
pub const COLUMN_SHIFT: u32 = 8;
/// Fixed-point unit of the normalised row weights (second pass); its sums are divided by `16 · ROW_UNIT`.
/// Smaller than the first so that a sum stays below 2²⁴ for any side Loupe accepts.
pub const ROW_UNIT: f32 = 2048.0;
pub const ROW_SHIFT: u32 = 15;

/// One output pixel's weights: the first input pixel it reads and the integer weights from there on.
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    pub first: usize,
    pub weights: Vec<u32>,
}

/// The raw fixed-point triangle weight `round(RAW_UNIT · (1 − |num| / (2·max(L, size))))`, clamped at 0, as the
/// graph computes it: one f32 division, the rest exact.
fn raw_weight(num: i64, length: usize, size: usize) -> f32 {
    let ratio = num.unsigned_abs() as f32 / length.max(size) as f32;
    (RAW_UNIT - (ratio * (RAW_UNIT / 2.0) + 0.5).floor()).max(0.0)
}

/// Weights of every output pixel of a side of `length` resized to `size`, normalised to `unit`:
/// `⌊raw · unit / Σ raw + ½⌋`. Raw weights and their sum are exact integers, so the division is the same in
/// every runtime.
pub fn side_taps(length: usize, size: usize, unit: f32) -> Vec<Taps> {
    (0..size)
        .map(|o| {
            let centre_num = (2 * o as i64 + 1) * length as i64 - size as i64;
            // Non-zero weights need |num| < 2·max(L, size): i within ±max(L/size, 1) of the centre.
            let reach = length.max(size).div_ceil(size) + 1;
            let centre = (centre_num / (2 * size as i64)).max(0) as usize;
            let first = centre.saturating_sub(reach);
            let last = (centre + reach + 1).min(length);
            let raw: Vec<f32> =
                (first..last).map(|i| raw_weight(2 * size as i64 * i as i64 - centre_num, length, size)).collect();
            let total: f32 = raw.iter().sum();
            let weights = raw.iter().map(|&w| (w * unit / total + 0.5).floor() as u32).collect();
            Taps { first, weights }
        })
        .collect()
}

/// Resizes row-major RGB bytes `width × height` to `size × size`: columns first (each row's `width` → `size`,
/// keeping 1/16 of a level), then rows.
pub fn resize_rgb(rgb: &[u8], width: usize, height: usize, size: usize) -> Vec<u8> {
    assert_eq!(rgb.len(), width * height * 3, "resize_rgb: {width}×{height} RGB needs {} bytes", width * height * 3);
    let columns = side_taps(width, size, COLUMN_UNIT);
    let rows = side_taps(height, size, ROW_UNIT);
    let column_round = 1u32 << (COLUMN_SHIFT - 1);
    let mut narrowed = vec![0u32; height * size * 3];
    for y in 0..height {
        let line = &rgb[y * width * 3..(y + 1) * width * 3];
        for (o, taps) in columns.iter().enumerate() {
            let mut sums = [0u32; 3];
            for (k, &w) in taps.weights.iter().enumerate() {
                let pixel = &line[(taps.first + k) * 3..(taps.first + k) * 3 + 3];
                for c in 0..3 {
                    sums[c] += pixel[c] as u32 * w;
                }
            }
            for c in 0..3 {
                narrowed[(y * size + o) * 3 + c] = (sums[c] + column_round) >> COLUMN_SHIFT;
            }
        }
    }
    let row_round = 1u32 << (ROW_SHIFT - 1);
    let mut out = vec![0u8; size * size * 3];
    for (o, taps) in rows.iter().enumerate() {
        let target = &mut out[o * size * 3..(o + 1) * size * 3];
        for (x, pixel) in target.chunks_exact_mut(3).enumerate() {
            let mut sums = [0u32; 3];
            for (k, &w) in taps.weights.iter().enumerate() {
                let source = &narrowed[((taps.first + k) * size + x) * 3..((taps.first + k) * size + x) * 3 + 3];
                for c in 0..3 {
                    sums[c] += source[c] * w;
                }
            }
            for c in 0..3 {
                pixel[c] = ((sums[c] + row_round) >> ROW_SHIFT).min(255) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{imageops::FilterType, RgbImage};

    fn noise(width: u32, height: u32, seed: u64) -> RgbImage {
        let mut rng = crate::rng::SplitMix64::new(seed);
        RgbImage::from_fn(width, height, |_, _| {
            image::Rgb([(rng.next_f32() * 255.0) as u8, (rng.next_f32() * 255.0) as u8, (rng.next_f32() * 255.0) as u8])
        })
    }

    #[test]
    fn it_is_image_rs_triangle_filter_within_one_level() {
        for (width, height, size) in [(400, 300, 256), (1024, 77, 64), (100, 180, 256), (256, 256, 256), (5000, 40, 32)]
        {
            let image = noise(width, height, 7);
            let ours = resize_rgb(image.as_raw(), width as usize, height as usize, size);
            let theirs = image::imageops::resize(&image, size as u32, size as u32, FilterType::Triangle).into_raw();
            let worst = ours.iter().zip(&theirs).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
            assert!(worst <= 1, "{width}×{height} → {size}: differs by {worst} levels");
        }
    }

    #[test]
    fn the_same_size_is_the_identity_and_a_flat_image_stays_flat() {
        let image = noise(64, 64, 3);
        assert_eq!(resize_rgb(image.as_raw(), 64, 64, 64), image.as_raw().to_vec());
        let flat = vec![201u8; 333 * 129 * 3];
        assert!(resize_rgb(&flat, 333, 129, 100).iter().all(|&v| v == 201));
    }

    #[test]
    fn its_sums_stay_exact_in_f32_for_the_largest_sides() {
        // Largest first-pass sum: 255 · Σ column weights; largest second-pass sum: that /2⁸ · Σ row weights.
        for (length, size) in [(16_384, 16), (16_384, 17), (16_383, 100), (16_384, 256), (16_384, 4096), (3, 4096)] {
            let column_total = side_taps(length, size, COLUMN_UNIT).iter().map(|t| t.weights.iter().sum::<u32>()).max();
            let row_total = side_taps(length, size, ROW_UNIT).iter().map(|t| t.weights.iter().sum::<u32>()).max();
            let first = 255 * column_total.unwrap() + (1 << (COLUMN_SHIFT - 1));
            let second = (first >> COLUMN_SHIFT) * row_total.unwrap() + (1 << (ROW_SHIFT - 1));
            assert!(second < 1 << 24, "{length} → {size}: a sum reaches {second}");
        }
    }
}
