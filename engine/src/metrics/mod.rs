//! Detection metrics: ROC/AUROC (image and pooled pixel level), AUPRO, F1-max, and everything a threshold
//! decides (FAR, MAR, confusion matrix). Scores are raw: higher means more anomalous; a score ≥ threshold is
//! flagged as a defect.

pub mod pixel;
pub mod pro;
pub mod roc;
pub mod threshold;

pub use pixel::{PixelMetrics, SortedPixels};
pub use pro::aupro;
pub use roc::{auroc, roc_curve, RocCurve};
pub use threshold::{Confusion, ThresholdRule, ThresholdTable};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum MetricError {
    #[error("needs both normal and anomalous samples, but only {0} were given")]
    OneClassOnly(&'static str),
    #[error("no samples")]
    Empty,
    #[error("scores contain NaN")]
    NaN,
    #[error("more than 2³¹ images or defect regions")]
    TooLarge,
}

pub(crate) fn check_inputs(scores: &[f32], labels: &[bool]) -> Result<(usize, usize), MetricError> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    if scores.is_empty() {
        return Err(MetricError::Empty);
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(MetricError::NaN);
    }
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    match (positives, negatives) {
        (0, _) => Err(MetricError::OneClassOnly("normal")),
        (_, 0) => Err(MetricError::OneClassOnly("anomalous")),
        _ => Ok((positives, negatives)),
    }
}
