//! The data-augmentation family: models that learn from synthetic anomalies made out of normal images.

family_methods!(draem, cutpaste);

pub mod synthetic_anomalies;
