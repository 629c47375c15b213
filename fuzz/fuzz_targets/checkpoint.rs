#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loupe_engine::untrusted::read_checkpoint(data));
