//! Loupe's engine: everything from image files to anomaly scores, maps, metrics and model files. It has no GUI
//! dependency; the `loupe` binary (CLI and studio) is built on top of it. See ARCHITECTURE.md for the data flow.

pub mod atomic_file;
pub mod backbone;
pub mod device;
pub mod dataset;
pub mod rng;
pub mod metrics;
pub mod maps;
pub mod methods;
pub mod model_file;
pub mod progress;
pub mod evaluate;
pub mod pipeline;
