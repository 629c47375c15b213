//! Representation-based methods: a description of normal features (a memory bank, a Gaussian) and a distance.

family_methods!(patchcore, padim);

pub mod coreset;
pub mod nearest;
