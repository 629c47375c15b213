//! The decision a threshold pair makes about an image score: pass, send to a person (review band) or reject —
//! and those counts over a sorted score table, by binary search, so they follow a dragged threshold live.

use loupe_engine::metrics::ThresholdTable;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Pass,
    Review,
    Reject,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Pass, Verdict::Review, Verdict::Reject];

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Review => "review",
            Verdict::Reject => "reject",
        }
    }
}

/// Rejected at or above `decision`; sent to review in `[review, decision)` when a review band is set.
pub fn verdict(score: f32, decision: f32, review: Option<f32>) -> Verdict {
    if score >= decision {
        Verdict::Reject
    } else if review.is_some_and(|r| score >= r) {
        Verdict::Review
    } else {
        Verdict::Pass
    }
}

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
}
