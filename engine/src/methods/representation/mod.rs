//! Representation-based methods: a description of normal features (a memory bank, a Gaussian) and a distance.

pub mod coreset;
pub mod nearest;
pub mod padim;
pub mod patchcore;
