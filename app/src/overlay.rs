//! Heatmap overlays for exported PNGs (the studio draws its own with a shader).

use image::{Rgb, RgbImage};
use loupe_engine::maps::ScoreMap;

/// The "jet" colormap at t in [0, 1].
pub fn jet(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let channel = |offset: f32| ((1.5 - (4.0 * t - offset).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// Blends the map over the image: scores are shown relative to the decision threshold (threshold = the middle
/// of the colormap), so heatmaps of different images compare.
/// Without a threshold the image's own maximum is the top of the colormap.
pub fn overlay(image: &RgbImage, map: &ScoreMap, threshold: Option<f32>) -> RgbImage {
    let map = map.resized(image.width() as usize, image.height() as usize);
    let scale = match threshold {
        Some(t) if t.is_finite() && t > 0.0 => 0.5 / t,
        _ => 1.0 / map.max().max(1e-6),
    };
    let mut out = image.clone();
    for (i, pixel) in out.pixels_mut().enumerate() {
        let t = map.data[i] * scale;
        let color = jet(t);
        let alpha = 0.25 + 0.35 * t.clamp(0.0, 1.0);
        *pixel =
            Rgb(std::array::from_fn(|c| (pixel.0[c] as f32 * (1.0 - alpha) + color[c] as f32 * alpha).round() as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_runs_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(0.5), [128, 255, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
    }
}
