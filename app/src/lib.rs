//! The Loupe studio as a library, so integration tests (egui_kittest) drive the same window the binary opens.

pub mod studio;
