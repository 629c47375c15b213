//! The algorithm-enhancement family: models whose contribution is the training objective or the explanation
//! (FCDD's one-class loss and receptive-field heatmaps, mean-shifted contrastive learning).

family_methods!(fcdd, mean_shifted);
