//! A Loupe project without a window: the project file (its format and untrusted parser live in the engine,
//! `loupe_engine::project`), the images its sources list, its label and mask files, and the verdict counts a
//! threshold pair gives. The studio, the `labels` command and the line runtime share these.

pub mod label_files;
pub mod mask_files;
pub mod sources;
pub mod verdict;

pub use loupe_engine::project::*;
