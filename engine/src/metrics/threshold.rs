//! What one decision threshold does to a set of scored images. The scores are sorted once per class; every
//! query after that is a binary search, so dragging a threshold over 100,000 scores stays far under a millisecond.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Confusion {
    /// Defects flagged.
    pub true_positive: usize,
    /// Good parts flagged (false alarms).
    pub false_positive: usize,
    /// Good parts passed.
    pub true_negative: usize,
    /// Defects passed (missed alarms).
    pub false_negative: usize,
}

impl Confusion {
    /// False-alarm rate: good parts rejected / good parts. `None` without good parts.
    pub fn far(&self) -> Option<f64> {
        let normals = self.false_positive + self.true_negative;
        (normals > 0).then(|| self.false_positive as f64 / normals as f64)
    }

    /// Missed-alarm rate: defects passed / defects. `None` without defects.
    pub fn mar(&self) -> Option<f64> {
        let anomalies = self.true_positive + self.false_negative;
        (anomalies > 0).then(|| self.false_negative as f64 / anomalies as f64)
    }

    pub fn precision(&self) -> f64 {
        let flagged = self.true_positive + self.false_positive;
        if flagged == 0 {
            1.0
        } else {
            self.true_positive as f64 / flagged as f64
        }
    }

    pub fn recall(&self) -> f64 {
        1.0 - self.mar().unwrap_or(0.0)
    }

    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

/// Scores of normal and anomalous images, each sorted ascending.
#[derive(Debug, Clone, Default)]
pub struct ThresholdTable {
    normal: Vec<f32>,
    anomalous: Vec<f32>,
}

/// Count of sorted values ≥ threshold.
fn count_at_or_above(sorted: &[f32], threshold: f32) -> usize {
    sorted.len() - sorted.partition_point(|&s| s < threshold)
}

impl ThresholdTable {
    pub fn new(scores: &[f32], is_anomalous: &[bool]) -> Self {
        assert_eq!(scores.len(), is_anomalous.len(), "one label per score");
        let mut table = Self::default();
        for (&score, &anomalous) in scores.iter().zip(is_anomalous) {
            if anomalous {
                table.anomalous.push(score);
            } else {
                table.normal.push(score);
            }
        }
        table.normal.sort_unstable_by(f32::total_cmp);
        table.anomalous.sort_unstable_by(f32::total_cmp);
        table
    }

    pub fn normal_scores(&self) -> &[f32] {
        &self.normal
    }

    pub fn anomalous_scores(&self) -> &[f32] {
        &self.anomalous
    }

    pub fn confusion(&self, threshold: f32) -> Confusion {
        let false_positive = count_at_or_above(&self.normal, threshold);
        let true_positive = count_at_or_above(&self.anomalous, threshold);
        Confusion {
            true_positive,
            false_positive,
            true_negative: self.normal.len() - false_positive,
            false_negative: self.anomalous.len() - true_positive,
        }
    }

    /// The lowest threshold whose false-alarm rate is at most `far` (needs normal scores).
    pub fn threshold_for_far(&self, far: f64) -> Option<f32> {
        let n = self.normal.len();
        if n == 0 {
            return None;
        }
        let allowed = ((far.clamp(0.0, 1.0) * n as f64) + 1e-9).floor() as usize;
        if allowed >= n {
            return Some(self.normal[0]);
        }
        // Everything above the (n − allowed)-th smallest normal score may be flagged.
        Some(self.normal[n - allowed - 1].next_up())
    }

    /// The highest threshold whose missed-alarm rate is at most `mar` (needs anomalous scores).
    pub fn threshold_for_mar(&self, mar: f64) -> Option<f32> {
        let n = self.anomalous.len();
        if n == 0 {
            return None;
        }
        let allowed = ((mar.clamp(0.0, 1.0) * n as f64) + 1e-9).floor() as usize;
        if allowed >= n {
            return Some(self.anomalous[n - 1].next_up());
        }
        Some(self.anomalous[allowed])
    }

    /// The threshold with the best F1 among all distinct scores, and that F1 (needs both classes).
    pub fn f1_max(&self) -> Option<(f32, f64)> {
        if self.normal.is_empty() || self.anomalous.is_empty() {
            return None;
        }
        let mut best: Option<(f32, f64)> = None;
        for &threshold in self.normal.iter().chain(&self.anomalous) {
            let f1 = self.confusion(threshold).f1();
            let better = match best {
                None => true,
                Some((best_threshold, best_f1)) => f1 > best_f1 || (f1 == best_f1 && threshold > best_threshold),
            };
            if better {
                best = Some((threshold, f1));
            }
        }
        best
    }
}

/// How a person asks for a threshold: `far:0.01`, `mar:0.05` or `f1-max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdRule {
    MaxFalseAlarmRate(f64),
    MaxMissedAlarmRate(f64),
    F1Max,
}

impl std::str::FromStr for ThresholdRule {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let rate = |value: &str| -> Result<f64, String> {
            let rate: f64 = value.parse().map_err(|_| format!("`{value}` is not a number"))?;
            if (0.0..=1.0).contains(&rate) {
                Ok(rate)
            } else {
                Err(format!("rate {rate} is outside [0, 1]"))
            }
        };
        match text.split_once(':') {
            Some(("far", value)) => Ok(Self::MaxFalseAlarmRate(rate(value)?)),
            Some(("mar", value)) => Ok(Self::MaxMissedAlarmRate(rate(value)?)),
            None if text == "f1-max" => Ok(Self::F1Max),
            _ => Err(format!("`{text}`: expected far:RATE, mar:RATE or f1-max")),
        }
    }
}

impl std::fmt::Display for ThresholdRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MaxFalseAlarmRate(rate) => write!(f, "FAR <= {rate}"),
            Self::MaxMissedAlarmRate(rate) => write!(f, "MAR <= {rate}"),
            Self::F1Max => write!(f, "F1-max"),
        }
    }
}

impl ThresholdTable {
    /// The threshold the rule asks for, when the scores hold the classes it needs.
    pub fn threshold_for(&self, rule: ThresholdRule) -> Option<f32> {
        match rule {
            ThresholdRule::MaxFalseAlarmRate(rate) => self.threshold_for_far(rate),
            ThresholdRule::MaxMissedAlarmRate(rate) => self.threshold_for_mar(rate),
            ThresholdRule::F1Max => self.f1_max().map(|(threshold, _)| threshold),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ThresholdTable {
        let scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.2, 0.4, 0.7, 0.05];
        let labels = [false, false, true, true, true, true, false, false, true, false];
        ThresholdTable::new(&scores, &labels)
    }

    #[test]
    fn confusion_counts_at_ties() {
        let c = table().confusion(0.4);
        assert_eq!(c, Confusion { true_positive: 4, false_positive: 2, true_negative: 3, false_negative: 1 });
        assert_eq!(c.far(), Some(0.4));
        assert_eq!(c.mar(), Some(0.2));
    }

    #[test]
    fn far_and_mar_targets_are_met_tightly() {
        let t = table();
        let threshold = t.threshold_for_far(0.2).unwrap();
        assert!(t.confusion(threshold).far().unwrap() <= 0.2);
        assert!(t.confusion(threshold.next_down()).far().unwrap() > 0.2 || threshold <= t.normal_scores()[0]);
        let threshold = t.threshold_for_mar(0.2).unwrap();
        assert!(t.confusion(threshold).mar().unwrap() <= 0.2);
        assert!(t.confusion(threshold.next_up()).mar().unwrap() > 0.2);
        assert_eq!(t.confusion(t.threshold_for_far(0.0).unwrap()).false_positive, 0);
    }

    #[test]
    fn f1_max_matches_scikit_learn() {
        // sklearn precision_recall_curve → max 2PR/(P+R) = 0.8333…, at threshold 0.35.
        let (threshold, f1) = table().f1_max().unwrap();
        assert!((f1 - 5.0 / 6.0).abs() < 1e-12, "{f1}");
        assert_eq!(threshold, 0.35);
    }

    #[test]
    fn rules_parse_and_apply() {
        assert_eq!("far:0.05".parse::<ThresholdRule>(), Ok(ThresholdRule::MaxFalseAlarmRate(0.05)));
        assert_eq!("f1-max".parse::<ThresholdRule>(), Ok(ThresholdRule::F1Max));
        assert!("mar:2".parse::<ThresholdRule>().is_err());
        assert!("median".parse::<ThresholdRule>().is_err());
        assert_eq!(table().threshold_for(ThresholdRule::F1Max), Some(0.35));
    }

    #[test]
    fn one_class_gives_none_not_nan() {
        let only_normals = ThresholdTable::new(&[0.1, 0.2], &[false, false]);
        assert!(only_normals.f1_max().is_none());
        assert!(only_normals.threshold_for_mar(0.1).is_none());
        assert_eq!(only_normals.confusion(0.15).mar(), None);
    }
}
