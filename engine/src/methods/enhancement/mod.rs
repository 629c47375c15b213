//! The algorithm-enhancement family: models whose contribution is the training objective or the explanation
//! (FCDD's one-class loss and receptive-field heatmaps, mean-shifted contrastive learning).

pub mod fcdd;
pub mod mean_shifted;
