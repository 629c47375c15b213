//! The decision a threshold pair makes about an image score: pass, send to a person (review band) or reject —
//! and those counts over a sorted score table, by binary search, so they follow a dragged threshold live.

use loupe_engine::metrics::ThresholdTable;

pub use loupe_engine::verdict::{verdict, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BandCounts {
    pub pass: usize,
    pub review: usize,
    pub reject: usize,
}

fn at_or_above(sorted: &[f32], threshold: f32) -> usize {
    sorted.len() - sorted.partition_point(|&s| s < threshold)
}

/// Pass / review / reject counts over every scored image.
pub fn band_counts(table: &ThresholdTable, decision: f32, review: Option<f32>) -> BandCounts {
    let count = |threshold: f32| {
        at_or_above(table.normal_scores(), threshold) + at_or_above(table.anomalous_scores(), threshold)
    };
    let total = table.normal_scores().len() + table.anomalous_scores().len();
    let reject = count(decision);
    let flagged = match review {
        Some(r) if r < decision => count(r),
        _ => reject,
    };
    BandCounts { pass: total - flagged, review: flagged - reject, reject }
}

/// Agreement between the model and the labeller at a decision threshold: over images with a score and a
/// good / defect label (unsure ones do not count), how many the model rejects exactly when the labeller says
/// defect. Returns (agreeing, counted).
pub fn agreement(
    labelled: impl Iterator<Item = (f32, loupe_engine::labels::Verdict)>,
    decision: f32,
) -> (usize, usize) {
    use loupe_engine::labels::Verdict as Label;
    let (mut agreeing, mut counted) = (0, 0);
    for (score, label) in labelled {
        let says_defect = match label {
            Label::Good => false,
            Label::Defect => true,
            Label::Unsure => continue,
        };
        counted += 1;
        agreeing += usize::from((score >= decision) == says_defect);
    }
    (agreeing, counted)
}

/// Agreement (share of labelled images on which model and labeller agree) over all thresholds, as the corners
/// of a staircase: it is constant between consecutive scores and steps at each score (an image is rejected at
/// thresholds up to and including its score). From below the lowest score (everything rejected) to above the
/// highest (everything passed).
pub fn agreement_curve(labelled: impl Iterator<Item = (f32, loupe_engine::labels::Verdict)>) -> Vec<[f64; 2]> {
    use loupe_engine::labels::Verdict as Label;
    let mut scored: Vec<(f32, bool)> = labelled
        .filter_map(|(score, label)| match label {
            Label::Good => Some((score, false)),
            Label::Defect => Some((score, true)),
            Label::Unsure => None,
        })
        .collect();
    if scored.is_empty() {
        return Vec::new();
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = scored.len() as f64;
    // At a threshold at or below the lowest score every image is rejected: the defects agree.
    let mut agreeing = scored.iter().filter(|s| s.1).count() as i64;
    let margin = 0.05 * (scored[scored.len() - 1].0 - scored[0].0).max(1e-6);
    let mut curve = vec![[(scored[0].0 - margin) as f64, agreeing as f64 / total]];
    let mut i = 0;
    while i < scored.len() {
        let score = scored[i].0;
        curve.push([score as f64, agreeing as f64 / total]);
        // Just above `score`, every image with that score passes.
        while i < scored.len() && scored[i].0 == score {
            agreeing += if scored[i].1 { -1 } else { 1 };
            i += 1;
        }
        curve.push([score as f64, agreeing as f64 / total]);
    }
    curve.push([(scored[scored.len() - 1].0 + margin) as f64, agreeing as f64 / total]);
    curve
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_per_image_verdicts() {
        let scores = [0.1, 0.4, 0.4, 0.7, 0.9, 1.3, 0.2, 0.8];
        let labels = [false, false, true, false, true, true, false, true];
        let table = ThresholdTable::new(&scores, &labels);
        for (decision, review) in [(0.8, Some(0.4)), (0.4, None), (1.0, Some(2.0)), (0.05, Some(0.0)), (0.9, Some(0.9))]
        {
            let mut expected = BandCounts::default();
            for &s in &scores {
                match verdict(s, decision, review.filter(|&r| r < decision)) {
                    Verdict::Pass => expected.pass += 1,
                    Verdict::Review => expected.review += 1,
                    Verdict::Reject => expected.reject += 1,
                }
            }
            assert_eq!(band_counts(&table, decision, review), expected, "decision {decision}, review {review:?}");
        }
    }

    #[test]
    fn agreement_counts_matching_verdicts_and_skips_unsure() {
        use loupe_engine::labels::Verdict as Label;
        let labelled =
            [(0.9, Label::Defect), (0.2, Label::Good), (0.6, Label::Good), (0.4, Label::Defect), (0.8, Label::Unsure)];
        assert_eq!(agreement(labelled.into_iter(), 0.5), (2, 4));
        assert_eq!(agreement(labelled.into_iter(), 0.3), (3, 4));
        assert_eq!(agreement(std::iter::empty(), 0.5), (0, 0));
    }

    #[test]
    fn the_agreement_curve_matches_agreement_at_each_of_its_thresholds() {
        use loupe_engine::labels::Verdict as Label;
        let labelled = [
            (0.9, Label::Defect),
            (0.2, Label::Good),
            (0.6, Label::Good),
            (0.4, Label::Defect),
            (0.6, Label::Defect),
            (0.8, Label::Unsure),
        ];
        let curve = agreement_curve(labelled.into_iter());
        assert_eq!(curve.len(), 2 + 2 * 4, "two corners at each distinct score, plus both ends: {curve:?}");
        // Each flat stretch of the staircase holds the agreement at any threshold inside it.
        for pair in curve.windows(2).filter(|p| p[0][1] == p[1][1] && p[0][0] < p[1][0]) {
            let inside = ((pair[0][0] + pair[1][0]) / 2.0) as f32;
            let (agreeing, counted) = agreement(labelled.into_iter(), inside);
            assert!((pair[0][1] - agreeing as f64 / counted as f64).abs() < 1e-12, "at {inside}");
        }
        // At a score itself the image is still rejected: the corner before the step.
        let (agreeing, counted) = agreement(labelled.into_iter(), 0.4);
        assert_eq!(curve[3], [0.4f32 as f64, agreeing as f64 / counted as f64]);
        assert!(agreement_curve(std::iter::empty()).is_empty());
    }
}
