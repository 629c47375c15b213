//! ROC curve and its area, with ties handled as scikit-learn does (tied scores form one step of the curve).
//! The curve keeps every distinct threshold: it equals scikit-learn's `roc_curve(..., drop_intermediate=False)`
//! (its default, `True`, drops the collinear points in between; the area is the same).

use super::{check_inputs, MetricError};
use rayon::prelude::*;

#[derive(Debug, Clone, PartialEq)]
pub struct RocCurve {
    /// Starts at (0, 0); one point per distinct score, in decreasing score order.
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    /// `thresholds[i]` gives (fpr[i], tpr[i]) for the rule score ≥ threshold; the first is +∞.
    pub thresholds: Vec<f32>,
}

impl RocCurve {
    /// Trapezoidal area under the curve.
    pub fn area(&self) -> f64 {
        self.fpr.windows(2).zip(self.tpr.windows(2)).map(|(f, t)| (f[1] - f[0]) * (t[1] + t[0]) / 2.0).sum()
    }
}

fn descending_order(scores: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.par_sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]));
    order
}

/// Walks the scores from the highest down, calling `step(score, true positives, false positives)` once per
/// distinct score with the counts of everything at or above it: tied scores are one step.
fn for_each_threshold(scores: &[f32], labels: &[bool], mut step: impl FnMut(f32, u64, u64)) {
    let order = descending_order(scores);
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut i = 0;
    while i < order.len() {
        let score = scores[order[i] as usize];
        while i < order.len() && scores[order[i] as usize] == score {
            if labels[order[i] as usize] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        step(score, tp, fp);
    }
}

pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Result<RocCurve, MetricError> {
    let (positives, negatives) = check_inputs(scores, labels)?;
    let mut curve = RocCurve { fpr: vec![0.0], tpr: vec![0.0], thresholds: vec![f32::INFINITY] };
    for_each_threshold(scores, labels, |score, tp, fp| {
        curve.fpr.push(fp as f64 / negatives as f64);
        curve.tpr.push(tp as f64 / positives as f64);
        curve.thresholds.push(score);
    });
    Ok(curve)
}

/// Area under the ROC curve, without materialising the curve (pixel-level AUROC pools tens of millions of
/// scores).
pub fn auroc(scores: &[f32], labels: &[bool]) -> Result<f64, MetricError> {
    let (positives, negatives) = check_inputs(scores, labels)?;
    let (mut area, mut tp_before, mut fp_before) = (0.0f64, 0u64, 0u64);
    for_each_threshold(scores, labels, |_, tp, fp| {
        area += (fp - fp_before) as f64 * (tp + tp_before) as f64 / 2.0;
        (tp_before, fp_before) = (tp, fp);
    });
    Ok(area / (positives as f64 * negatives as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values from scikit-learn 1.x `roc_auc_score` / `roc_curve(..., drop_intermediate=False)`.
    #[test]
    fn matches_scikit_learn_with_ties() {
        let scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.2, 0.4, 0.7, 0.05];
        let labels = [false, false, true, true, true, true, false, false, true, false];
        let expected = SKLEARN_TIES_AUC;
        assert!((auroc(&scores, &labels).unwrap() - expected).abs() < 1e-12);
        let curve = roc_curve(&scores, &labels).unwrap();
        assert!((curve.area() - expected).abs() < 1e-12);
        assert_eq!(curve.fpr, SKLEARN_TIES_FPR.to_vec());
        assert_eq!(curve.tpr, SKLEARN_TIES_TPR.to_vec());
    }

    #[test]
    fn perfect_inverted_and_constant() {
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]).unwrap(), 1.0);
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]).unwrap(), 0.0);
        assert_eq!(auroc(&[0.5; 4], &[false, true, false, true]).unwrap(), 0.5);
    }

    #[test]
    fn degenerate_inputs_are_errors_not_nan() {
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), Err(MetricError::OneClassOnly("anomalous")));
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]), Err(MetricError::OneClassOnly("normal")));
        assert_eq!(auroc(&[], &[]), Err(MetricError::Empty));
        assert_eq!(auroc(&[f32::NAN, 0.2], &[true, false]), Err(MetricError::NaN));
    }

    const SKLEARN_TIES_AUC: f64 = 0.879_999_999_999_999_9;
    const SKLEARN_TIES_FPR: [f64; 9] = [0.0, 0.0, 0.0, 0.0, 0.4, 0.4, 0.6, 0.8, 1.0];
    const SKLEARN_TIES_TPR: [f64; 9] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0];
}
