//! Pixel AUROC and AUPRO of a test set and of its subsets (each defect type against the good images) from one
//! sort of all its pixels. A test set pools tens of millions of pixels (MTD: 583 images × 256² = 38 M); sorting
//! them once per metric and per subset took 45 s of a 90 s evaluation. Here each pixel is one `u64` — its
//! score's order bits above, its owner (an image for a normal pixel, a defect region for a defective one) below
//! — sorted once; a subset's two curves are then one sequential walk that skips the images it leaves out.

use super::pro::connected_regions;
use super::MetricError;
use rayon::prelude::*;

/// Marks an owner as a defect region (else it is the image of a normal pixel).
const REGION: u32 = 1 << 31;

pub struct SortedPixels {
    /// Highest score first: `!order_bits(score) << 32 | owner`.
    keys: Vec<u64>,
    /// Per image: its normal pixels.
    normal_pixels: Vec<u64>,
    /// Per defect region (numbered over all images): its image and its size in pixels.
    regions: Vec<(u32, u32)>,
}

/// Both pixel metrics of one subset of the images.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelMetrics {
    pub auroc: Result<f64, MetricError>,
    /// AUPRO up to the walk's FPR limit, divided by it.
    pub aupro: Result<f64, MetricError>,
}

/// Bits that order as the float does (`total_cmp`), with −0 taken as +0 so that equal scores tie.
fn order_bits(score: f32) -> u32 {
    let bits = (score + 0.0).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

impl SortedPixels {
    /// `maps[i]` and `masks[i]` (1 = defect) are `width × height`; images without defects have all-zero masks.
    pub fn new(maps: &[&[f32]], masks: &[&[u8]], width: usize, height: usize) -> Result<Self, MetricError> {
        assert_eq!(maps.len(), masks.len(), "one mask per map");
        let plane = width * height;
        assert!(maps.iter().all(|map| map.len() == plane), "maps of {width}×{height}");
        assert!(masks.iter().all(|mask| mask.len() == plane), "masks of {width}×{height}");
        if maps.is_empty() {
            return Err(MetricError::Empty);
        }
        if maps.par_iter().any(|map| map.iter().any(|v| v.is_nan())) {
            return Err(MetricError::NaN);
        }
        // Region labels are found twice (sizes first, then while writing the keys) rather than held for every
        // image at once: 4 bytes a pixel more at the peak would be 150 MB on MTD.
        let sizes: Vec<Vec<usize>> = masks.par_iter().map(|mask| connected_regions(mask, width, height).1).collect();
        let mut regions = Vec::new();
        let mut first_region = Vec::with_capacity(maps.len());
        for (image, sizes) in sizes.iter().enumerate() {
            first_region.push(regions.len() as u32);
            regions.extend(sizes.iter().map(|&size| (image as u32, size as u32)));
        }
        if regions.len() >= REGION as usize || maps.len() >= REGION as usize {
            return Err(MetricError::TooLarge);
        }
        let normal_pixels = masks.iter().map(|mask| mask.iter().filter(|&&m| m == 0).count() as u64).collect();
        let mut keys = vec![0u64; maps.len() * plane];
        keys.par_chunks_mut(plane).enumerate().for_each(|(image, keys)| {
            let (labels, _) = connected_regions(masks[image], width, height);
            for ((key, &score), &label) in keys.iter_mut().zip(maps[image]).zip(&labels) {
                let owner = if label == 0 { image as u32 } else { REGION | (first_region[image] + label - 1) };
                *key = u64::from(!order_bits(score)) << 32 | u64::from(owner);
            }
        });
        keys.par_sort_unstable();
        Ok(Self { keys, normal_pixels, regions })
    }

    /// Pixel AUROC and AUPRO (to `fpr_limit`) over the images `include` keeps, every distinct score a threshold.
    pub fn metrics(&self, include: &[bool], fpr_limit: f64) -> PixelMetrics {
        assert_eq!(include.len(), self.normal_pixels.len(), "one flag per image");
        let kept = |image: u32| include[image as usize];
        let negatives: u64 = self.normal_pixels.iter().zip(include).filter(|(_, &keep)| keep).map(|(n, _)| n).sum();
        let kept_regions = self.regions.iter().filter(|(image, _)| kept(*image));
        let (region_count, positives) = kept_regions.fold((0u64, 0u64), |(n, p), (_, size)| (n + 1, p + *size as u64));
        let missing = match (positives, negatives) {
            (0, 0) => Some(MetricError::Empty),
            (0, _) => Some(MetricError::OneClassOnly("normal")),
            (_, 0) => Some(MetricError::OneClassOnly("anomalous")),
            _ => None,
        };
        if let Some(error) = missing {
            return PixelMetrics { auroc: Err(error.clone()), aupro: Err(error) };
        }
        let (mut tp, mut fp, mut overlap) = (0u64, 0u64, 0f64);
        let (mut roc_area, mut pro_area, mut pro_done) = (0f64, 0f64, false);
        let mut i = 0;
        while i < self.keys.len() {
            let score = self.keys[i] >> 32;
            let (tp_before, fp_before, overlap_before) = (tp, fp, overlap);
            while i < self.keys.len() && self.keys[i] >> 32 == score {
                let owner = self.keys[i] as u32;
                if owner & REGION == 0 {
                    fp += u64::from(kept(owner));
                } else {
                    let (image, size) = self.regions[(owner & !REGION) as usize];
                    if kept(image) {
                        tp += 1;
                        overlap += 1.0 / (region_count as f64 * size as f64);
                    }
                }
                i += 1;
            }
            roc_area += (fp - fp_before) as f64 * (tp + tp_before) as f64 / 2.0;
            if !pro_done {
                let (fpr_before, fpr) = (fp_before as f64 / negatives as f64, fp as f64 / negatives as f64);
                if fpr >= fpr_limit {
                    let at_limit =
                        overlap_before + (overlap - overlap_before) * (fpr_limit - fpr_before) / (fpr - fpr_before);
                    pro_area += (fpr_limit - fpr_before) * (at_limit + overlap_before) / 2.0;
                    pro_done = true;
                } else {
                    pro_area += (fpr - fpr_before) * (overlap + overlap_before) / 2.0;
                }
            }
        }
        PixelMetrics { auroc: Ok(roc_area / (positives as f64 * negatives as f64)), aupro: Ok(pro_area / fpr_limit) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::auroc;

    #[test]
    fn order_bits_order_as_the_floats_do() {
        let values = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::INFINITY];
        for pair in values.windows(2) {
            assert!(order_bits(pair[0]) <= order_bits(pair[1]), "{pair:?}");
        }
        assert_eq!(order_bits(-0.0), order_bits(0.0), "zeros tie");
    }

    /// Every subset's pixel AUROC equals the pooled AUROC of its pixels computed on its own (and the AUPRO the
    /// reference value, in `pro.rs`).
    #[test]
    fn a_subset_walk_equals_its_pixels_on_their_own() {
        let (maps, masks) = crate::metrics::pro::tests::reference_case();
        let map_refs: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
        let mask_refs: Vec<&[u8]> = masks.iter().map(Vec::as_slice).collect();
        let sorted = SortedPixels::new(&map_refs, &mask_refs, 8, 8).unwrap();
        for include in [[true, true, true], [true, false, true], [false, true, true]] {
            let scores: Vec<f32> = (0..3).filter(|&i| include[i]).flat_map(|i| maps[i].clone()).collect();
            let labels: Vec<bool> =
                (0..3).filter(|&i| include[i]).flat_map(|i| masks[i].iter().map(|&m| m != 0)).collect();
            let walked = sorted.metrics(&include, 0.3);
            assert!((walked.auroc.unwrap() - auroc(&scores, &labels).unwrap()).abs() < 1e-12, "{include:?}");
            let kept = |i: &usize| include[*i];
            let subset_maps: Vec<&[f32]> = (0..3).filter(kept).map(|i| map_refs[i]).collect();
            let subset_masks: Vec<&[u8]> = (0..3).filter(kept).map(|i| mask_refs[i]).collect();
            let alone = crate::metrics::aupro(&subset_maps, &subset_masks, 8, 8, 0.3).unwrap();
            assert!((walked.aupro.unwrap() - alone).abs() < 1e-12, "{include:?}");
        }
        let only_good = sorted.metrics(&[false, false, true], 0.3);
        assert_eq!(only_good.auroc, Err(MetricError::OneClassOnly("normal")));
        assert_eq!(only_good.aupro, Err(MetricError::OneClassOnly("normal")));
    }

    #[test]
    fn nan_scores_are_an_error() {
        let map = [0.1, f32::NAN];
        assert_eq!(SortedPixels::new(&[&map], &[&[0, 1]], 2, 1).err(), Some(MetricError::NaN));
    }
}
