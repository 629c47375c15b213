//! The decision a threshold pair makes about an image score: pass, send to a person (review band) or reject.
//! One rule for the studio, `loupe infer` and the exported ONNX graph (which outputs [`Verdict::code`]).

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

    /// The exported graph's `verdict` output: 0 pass, 1 review, 2 reject.
    pub fn code(self) -> i64 {
        match self {
            Verdict::Pass => 0,
            Verdict::Review => 1,
            Verdict::Reject => 2,
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
