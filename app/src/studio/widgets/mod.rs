//! Reusable widgets, apart from the views that use them.

pub mod heatmap;
pub mod mask_layer;
pub mod mask_painter;
pub mod verdict_bar;
