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
}
