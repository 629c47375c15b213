//! AUPRO: the area under the per-region-overlap curve up to a false-positive rate limit (0.3 in MVTec AD),
//! divided by that limit (Bergmann et al. 2021; anomalib's `AUPRO`). Each connected defect region (8-connected)
//! counts equally, however small, which is why it complements pixel AUROC, which large defects dominate.
//!
//! Exact for every distinct threshold: all pixels are sorted once by score ([`SortedPixels`]), normal pixels
//! advance the FPR by 1/#normal pixels and a region's pixels advance the mean overlap by 1/(#regions · region
//! size).

use super::pixel::SortedPixels;
use super::MetricError;

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
    let sorted = SortedPixels::new(maps, masks, width, height)?;
    sorted.metrics(&vec![true; maps.len()], fpr_limit).aupro
}

#[cfg(test)]
pub(crate) mod tests {
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
