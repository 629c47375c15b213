#![no_main]

use loupe_engine::backbone::{weights::default_weights_path, Backbone};
use std::sync::{Arc, OnceLock};

/// The real backbone (`loupe weights fetch`), loaded once: a model file names the hash of its weights.
static BACKBONE: OnceLock<Arc<Backbone>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let backbone = BACKBONE.get_or_init(|| {
        let device = candle_core::Device::Cpu;
        Arc::new(Backbone::load(&default_weights_path(), &device).expect("backbone weights (loupe weights fetch)"))
    });
    loupe_engine::untrusted::read_model(data, backbone);
});
