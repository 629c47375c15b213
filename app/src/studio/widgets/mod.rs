//! Reusable widgets, apart from the views that use them.

pub mod heatmap;
pub mod verdict_bar;
