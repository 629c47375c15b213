//! Reusable widgets, apart from the views that use them.

pub mod heatmap;
pub mod mask_layer;
pub mod mask_painter;
pub mod polygon_input;
pub mod region_drawer;
pub mod verdict_bar;
