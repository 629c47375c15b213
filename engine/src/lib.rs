//! Loupe's engine: everything from image files to anomaly scores, maps, metrics and model files. It has no GUI
//! dependency; the `loupe` binary (CLI and studio) is built on top of it. See ARCHITECTURE.md for the data flow.

pub mod atomic_file;
pub mod backbone;
pub mod dataset;
pub mod device;
pub mod evaluate;
pub mod geometry;
pub mod labels;
pub mod maps;
pub mod methods;
pub mod metrics;
pub mod model_file;
pub mod onnx;
pub mod pipeline;
pub mod progress;
pub mod project;
pub mod rng;
pub mod untrusted;
pub mod verdict;
