//! Loupe as a library: the project's files and verdicts without a window (the CLI and the line runtime use
//! them), and the studio, so integration tests (egui_kittest) drive the same window the binary opens.

pub mod line;
pub mod overlay;
pub mod project;
pub mod report;
#[cfg(feature = "studio")]
pub mod studio;
