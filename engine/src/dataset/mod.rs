//! Where images come from: a folder of normal images, an MVTec AD benchmark folder, or anomalib's "Folder"
//! shape; decoding them (in parallel) into fixed-size model inputs; and the synthetic generator the tests and the
//! demo use. A file that cannot be used is skipped and reported with its reason; it never aborts a run.

pub mod augmented;
pub mod decode;
pub mod highres;
pub mod layout;
pub mod record_store;
pub mod resize;
pub mod synthetic;
pub mod training_images;

pub use decode::{decode_all, decode_all_reusing, probe_image, DecodedImage, ResizedImage, SkippedFile};
pub use layout::{scan_folder_layout, scan_mvtec, scan_normal_folder, Benchmark, ImageRecord, Label, GOOD};
pub use record_store::RecordStore;
pub use training_images::{TrainingImages, TRAINING_IMAGES_IN_MEMORY, VALIDATION_IMAGES_IN_MEMORY};
