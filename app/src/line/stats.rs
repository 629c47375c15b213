//! `loupe watch --stats N`: what the last N seconds looked like, and whether the scores moved away from the
//! validation scores the model was tuned on (lighting changed, a new supplier). The median is compared, in
//! standard deviations of the validation scores: a few defective parts hardly move it, a drifting line does.

use loupe_engine::model_file::ScoreStats;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct Window {
    validation_median: f32,
    validation_std: f32,
    drift_warning: f32,
    scores: Vec<f32>,
    latencies_ms: Vec<f64>,
    verdicts: BTreeMap<&'static str, usize>,
}

/// The `q`-quantile (0..=1) of `sorted` by the nearest rank.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Window {
    pub fn new(validation: &ScoreStats, drift_warning: f32) -> Window {
        Window {
            validation_median: quantile(&validation.scores, 0.5).unwrap_or(validation.mean),
            validation_std: validation.std,
            drift_warning,
            scores: Vec::new(),
            latencies_ms: Vec::new(),
            verdicts: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, score: Option<f32>, verdict: &'static str, latency_ms: f64) {
        self.scores.extend(score);
        self.latencies_ms.push(latency_ms);
        *self.verdicts.entry(verdict).or_default() += 1;
    }

    pub fn clear(&mut self) {
        self.scores.clear();
        self.latencies_ms.clear();
        self.verdicts.clear();
    }

    /// Median score minus the validation median, in validation standard deviations.
    pub fn drift(&self) -> Option<f32> {
        let mut scores = self.scores.clone();
        scores.sort_by(f32::total_cmp);
        let median = quantile(&scores, 0.5)?;
        (self.validation_std > 0.0).then(|| (median - self.validation_median) / self.validation_std)
    }

    /// One JSON line for the operator's log.
    pub fn report(&self, over: Duration) -> serde_json::Value {
        let mut latencies = self.latencies_ms.clone();
        latencies.sort_by(f64::total_cmp);
        let drift = self.drift();
        let warning = drift.filter(|d| d.abs() > self.drift_warning).map(|d| {
            format!(
                "the median score moved {d:+.2} standard deviations from the validation scores: check lighting, \
                 camera and parts"
            )
        });
        serde_json::json!({
            "stats": {
                "seconds": over.as_secs_f64(),
                "images": self.latencies_ms.len(),
                "verdicts": self.verdicts,
                "latency_ms_p50": quantile(&latencies, 0.5),
                "latency_ms_p99": quantile(&latencies, 0.99),
                "score_drift_std": drift,
                "warning": warning,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_the_median_shift_in_validation_deviations() {
        let validation = ScoreStats::from_scores(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut window = Window::new(&validation, 1.0);
        for score in [3.0, 3.1, 2.9, 50.0] {
            window.add(Some(score), "pass", 10.0);
        }
        // One defect (50) hardly moves the median.
        assert!(window.drift().unwrap().abs() < 0.1, "{:?}", window.drift());
        assert!(window.report(Duration::from_secs(1))["stats"]["warning"].is_null());
        window.clear();
        for score in [6.0, 6.5, 7.0] {
            window.add(Some(score), "review", 10.0);
        }
        let report = window.report(Duration::from_secs(1));
        assert!(report["stats"]["warning"].as_str().unwrap().contains("moved +"), "{report}");
        assert_eq!(quantile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(quantile(&[1, 2, 3, 4], 0.99), Some(4));
    }
}
