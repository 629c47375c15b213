//! Every reader of a file a user may get from someone else, each as one function over the file's bytes: what
//! the fuzz targets (`fuzz/`, `scripts/fuzz.sh`) run, and what the regression tests run on the inputs the
//! fuzzer found (`tests/untrusted_inputs.rs`, over `tests/data/untrusted/<reader>/`).
//!
//! Each reads its input the way Loupe does and then uses what it read as Loupe would (a loaded model scores an
//! image; a project is written and read back). An error is a fine outcome: the contract is no panic, no abort,
//! no allocation past the reader's stated bound, no hang. A broken invariant (a project that loads but does not
//! read back after saving) panics, so the fuzzer reports it.

use crate::backbone::Backbone;
use crate::dataset::decode::decode_image;
use crate::labels::labelme;
use crate::labels::mask::DefectMask;
use crate::methods::images_to_tensor;
use crate::project::Project;
use std::sync::Arc;

/// The readers, by the name their fuzz target and corpus folder have.
pub const READERS: &[&str] = &["checkpoint", "model", "project", "labelme", "image"];

/// Largest image side a loaded model is asked to score here: the fuzzer's inputs stay fast.
const MAX_SCORED_SIZE: u32 = 128;

/// A `.pth` backbone checkpoint (legacy pickle stream or zip).
pub fn read_checkpoint(bytes: &[u8]) {
    let _ = crate::backbone::torch_pth::read_pth_bytes(bytes);
}

/// A model file (safetensors header, JSON manifest, tensors); a model that loads scores a grey image.
pub fn read_model(bytes: &[u8], backbone: &Arc<Backbone>) {
    let Ok(loaded) = crate::model_file::load_bytes(bytes, backbone.clone()) else { return };
    let size = loaded.model.image_size();
    if size > MAX_SCORED_SIZE {
        return;
    }
    let image = crate::dataset::DecodedImage {
        index: 0,
        original_size: (size, size),
        size,
        rgb: vec![128; (size * size * 3) as usize],
        mask: None,
    };
    if let Ok(batch) = images_to_tensor(&[&image], &backbone.device) {
        let _ = loaded.model.score_batch(&batch);
    }
}

/// A project file (RON). One that loads must save and load back to the same text.
pub fn read_project(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(project) = Project::from_ron(text) else { return };
    let saved = project.to_ron().expect("a project that loads can be saved");
    let reloaded = Project::from_ron(&saved).unwrap_or_else(|e| panic!("a saved project does not load: {e:#}"));
    assert_eq!(reloaded.to_ron().expect("saves again"), saved, "a project changes on its way through a save");
}

/// A labelme annotation (JSON), rasterised into a mask.
pub fn read_labelme(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = labelme::parse(text);
    }
}

/// An image or a mask, through the decoder every image goes through, then resized as for a model.
pub fn read_image(bytes: &[u8]) {
    if let Ok(image) = decode_image(bytes.to_vec()) {
        let rgb = image.to_rgb8();
        let _ = crate::dataset::resize::resize_rgb(rgb.as_raw(), rgb.width() as usize, rgb.height() as usize, 16);
    }
    let _ = DefectMask::decode(bytes.to_vec());
}
