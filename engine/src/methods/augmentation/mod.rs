//! The data-augmentation family: models that learn from synthetic anomalies made out of normal images.

pub mod cutpaste;
pub mod draem;
pub mod synthetic_anomalies;
