//! Representation-based methods: a description of normal features (a memory bank, a Gaussian) and a distance.

family_methods!(patchcore, padim, semi_orthogonal, spade, gaussian_ad, patch_svdd);

pub mod coreset;
pub mod nearest;
