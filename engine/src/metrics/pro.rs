//! AUPRO: the area under the per-region-overlap curve up to a false-positive rate limit (0.3 in MVTec AD),
//! divided by that limit (Bergmann et al. 2021; anomalib's `AUPRO`). Each connected defect region (8-connected)
//! counts equally, however small, which is why it complements pixel AUROC, which large defects dominate.
//!
//! Exact for every distinct threshold: all pixels are sorted once by score, normal pixels advance the FPR by
//! 1/#normal pixels and a region's pixels advance the mean overlap by 1/(#regions · region size).

use super::MetricError;
use rayon::prelude::*;

/// Labels 8-connected regions of a binary mask: 0 = background, 1..=n regions. Returns (labels, sizes).
pub fn connected_regions(mask: &[u8], width: usize, height: usize) -> (Vec<u32>, Vec<usize>) {
    let mut labels = vec![0u32; mask.len()];
    let mut sizes = Vec::new();
    let mut queue = Vec::new();
    for start in 0..mask.len() {
        if mask[start] == 0 || labels[start] != 0 {
            continue;
        }
        sizes.push(0);
        let label = sizes.len() as u32;
        labels[start] = label;
        queue.push(start);
        while let Some(i) = queue.pop() {
            sizes[label as usize - 1] += 1;
            let (x, y) = ((i % width) as isize, (i / width) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if mask[j] != 0 && labels[j] == 0 {
                        labels[j] = label;
                        queue.push(j);
                    }
                }
            }
        }
    }
    (labels, sizes)
}

/// `maps[i]` and `masks[i]` (1 = defect) are `width × height`; images without defects have all-zero masks.
pub fn aupro(
    maps: &[&[f32]],
    masks: &[&[u8]],
    width: usize,
    height: usize,
    fpr_limit: f64,
) -> Result<f64, MetricError> {
    assert_eq!(maps.len(), masks.len(), "one mask per map");
    // Per pixel: its score and what it advances: region weight index (0 = a normal pixel).
    let per_image: Vec<(Vec<u32>, Vec<usize>)> =
        masks.par_iter().map(|mask| connected_regions(mask, width, height)).collect();
    let region_count: usize = per_image.iter().map(|(_, sizes)| sizes.len()).sum();
    let normal_pixels: usize = masks.iter().map(|m| m.iter().filter(|&&v| v == 0).count()).sum();
    if region_count == 0 {
        return Err(MetricError::OneClassOnly("normal"));
    }
    if normal_pixels == 0 {
        return Err(MetricError::OneClassOnly("anomalous"));
    }
    let mut region_weight = vec![0f64];
    let mut pixels: Vec<(f32, u32)> = Vec::with_capacity(maps.len() * width * height);
    for (map, (labels, sizes)) in maps.iter().zip(&per_image) {
        let base = region_weight.len() as u32 - 1;
        region_weight.extend(sizes.iter().map(|&s| 1.0 / (region_count as f64 * s as f64)));
        for (&score, &label) in map.iter().zip(labels) {
            if score.is_nan() {
                return Err(MetricError::NaN);
            }
            pixels.push((score, if label == 0 { 0 } else { base + label }));
        }
    }
    pixels.par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let fpr_step = 1.0 / normal_pixels as f64;
    let (mut fpr, mut pro, mut area) = (0.0f64, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < pixels.len() {
        let score = pixels[i].0;
        let (fpr_before, pro_before) = (fpr, pro);
        while i < pixels.len() && pixels[i].0 == score {
            match pixels[i].1 {
                0 => fpr += fpr_step,
                region => pro += region_weight[region as usize],
            }
            i += 1;
        }
        if fpr >= fpr_limit {
            let pro_at_limit = pro_before + (pro - pro_before) * (fpr_limit - fpr_before) / (fpr - fpr_before);
            area += (fpr_limit - fpr_before) * (pro_at_limit + pro_before) / 2.0;
            return Ok(area / fpr_limit);
        }
        area += (fpr - fpr_before) * (pro + pro_before) / 2.0;
    }
    Ok(area / fpr_limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_eight_connected() {
        #[rustfmt::skip]
        let mask = [
            1, 0, 0, 1,
            0, 1, 0, 1,
            0, 0, 0, 0,
            1, 1, 0, 0,
        ];
        let (labels, sizes) = connected_regions(&mask, 4, 4);
        assert_eq!(sizes, vec![2, 2, 2]);
        assert_eq!(labels[0], labels[5], "diagonal neighbours join");
    }

    #[test]
    fn perfect_maps_score_one() {
        let mask = [0u8, 1, 1, 0, 0, 0, 0, 1, 0];
        let map: Vec<f32> = mask.iter().map(|&m| m as f32).collect();
        let value = aupro(&[&map], &[&mask], 3, 3, 0.3).unwrap();
        assert!((value - 1.0).abs() < 1e-12, "{value}");
    }

    #[test]
    fn matches_reference_implementation() {
        // Computed with a direct NumPy implementation of the definition (every distinct threshold, mean overlap
        // over scipy.ndimage.label 8-connected regions, trapezoid to FPR 0.3 with linear interpolation).
        let (maps, masks) = reference_case();
        let maps: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
        let masks: Vec<&[u8]> = masks.iter().map(Vec::as_slice).collect();
        let value = aupro(&maps, &masks, 8, 8, 0.3).unwrap();
        assert!((value - REFERENCE_AUPRO).abs() < 1e-9, "{value} vs {REFERENCE_AUPRO}");
    }

    /// Three 8×8 images; scores from a fixed formula with ties (quantised to 0.05).
    pub(crate) fn reference_case() -> (Vec<Vec<f32>>, Vec<Vec<u8>>) {
        let mut maps = Vec::new();
        let mut masks = Vec::new();
        for image in 0..3usize {
            let mut map = Vec::new();
            let mut mask = Vec::new();
            for y in 0..8usize {
                for x in 0..8usize {
                    let defect = match image {
                        0 => (2..5).contains(&x) && (2..4).contains(&y),
                        1 => (x == 6 && y >= 5) || (x == 1 && y == 1),
                        _ => false,
                    };
                    let base = ((x * 7 + y * 3 + image * 5) % 11) as f32 / 11.0;
                    let value = if defect { base * 0.6 + 0.4 } else { base * 0.8 };
                    map.push((value * 20.0).round() / 20.0);
                    mask.push(u8::from(defect));
                }
            }
            maps.push(map);
            masks.push(mask);
        }
        (maps, masks)
    }

    const REFERENCE_AUPRO: f64 = 0.458_700_312_033_645_25;
}
