//! Every file under `tests/data/untrusted/<reader>/` — the inputs that found a bug while fuzzing, and the
//! hand-made bad inputs of each kind — goes through its reader (`loupe_engine::untrusted`) as the fuzz targets
//! run it: no panic, and no more memory allocated at once than the reader's bound. The allocations are counted by
//! this test binary's allocator, one file at a time (one test function: nothing else runs beside it).
//!
//! `write_fuzz_seeds` (ignored; `scripts/fuzz.sh` runs it) writes the fuzzer's starting corpus: small valid files
//! of every kind, made here from the engine's synthetic generator.

use loupe_engine::backbone::{weights, Backbone};
use loupe_engine::untrusted::{self, READERS};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts live and peak heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What each reader may allocate at once while reading one file (beyond what was live before), as stated in
/// README's guarantees: the bounds in the readers, with room for the reader's own working copies.
fn bound(reader: &str) -> usize {
    match reader {
        // MAX_PICKLE_BUILD_BYTES (256 MiB) of objects plus the file.
        "checkpoint" => 512 << 20,
        // Three times a model file's bytes; the inputs here are small.
        "model" => 256 << 20,
        "project" => 64 << 20,
        // A 16,384² mask (256 MiB) at most.
        "labelme" => 300 << 20,
        // MAX_DECODING_BYTES (1.5 GiB) shared by all images being decoded.
        "image" => 1536 << 20,
        other => panic!("no bound for {other}"),
    }
}

fn inputs_of(reader: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/untrusted").join(reader);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_recorded_bad_input_is_read_within_its_bound() {
    let backbone = Arc::new(Backbone::load(&weights::default_weights_path(), &candle_core::Device::Cpu).unwrap());
    let mut report = Vec::new();
    for &reader in READERS {
        let files = inputs_of(reader);
        assert!(!files.is_empty(), "tests/data/untrusted/{reader}/ holds no input");
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            match reader {
                "checkpoint" => untrusted::read_checkpoint(&bytes),
                "model" => untrusted::read_model(&bytes, &backbone),
                "project" => untrusted::read_project(&bytes),
                "labelme" => untrusted::read_labelme(&bytes),
                "image" => untrusted::read_image(&bytes),
                other => panic!("unknown reader {other}"),
            }
            let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
            assert!(peak <= bound(reader), "{}: {peak} bytes at once, over {}", file.display(), bound(reader));
            report.push(format!("{reader:<10} {:>12} bytes  {}", peak, file.file_name().unwrap().to_string_lossy()));
        }
    }
    eprintln!("peak allocation per input:\n{}", report.join("\n"));
}

/// Writes the fuzzer's seed corpus into `$LOUPE_FUZZ_CORPUS/<reader>/`.
#[test]
#[ignore = "writes the fuzz corpus; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    use loupe_engine::dataset::synthetic::{generate_mvtec, SyntheticSpec};
    let Ok(corpus) = std::env::var("LOUPE_FUZZ_CORPUS") else { return };
    let corpus = PathBuf::from(corpus);
    let folder = |reader: &str| {
        let dir = corpus.join(reader);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Every recorded input is a seed too.
    for &reader in READERS {
        for file in inputs_of(reader) {
            std::fs::copy(&file, folder(reader).join(file.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(root.join("tests/data/tiny_zip_checkpoint.pth"), folder("checkpoint").join("tiny_zip.pth")).unwrap();
    std::fs::copy(root.join("projects/demo.ron"), folder("project").join("demo.ron")).unwrap();

    // Images in every format the decoder reads, and small model files of several methods.
    let data = std::env::temp_dir().join(format!("loupe-fuzz-seeds-{}", std::process::id()));
    generate_mvtec(&data, &SyntheticSpec { size: 32, ..SyntheticSpec::tiny(1) }).unwrap();
    let sample = image::open(data.join("test/scratch/000.png")).unwrap();
    for (name, format) in [
        ("gray.png", image::ImageFormat::Png),
        ("gray.jpg", image::ImageFormat::Jpeg),
        ("gray.bmp", image::ImageFormat::Bmp),
        ("gray.tiff", image::ImageFormat::Tiff),
    ] {
        sample.save_with_format(folder("image").join(name), format).unwrap();
    }
    sample.to_rgba8().save(folder("image").join("rgba.png")).unwrap();
    let backbone = Arc::new(Backbone::load(&weights::default_weights_path(), &candle_core::Device::Cpu).unwrap());
    let small = [
        ("patchcore", serde_json::json!({"coreset_ratio": 0.05})),
        ("padim", serde_json::json!({"feature_count": 8})),
        ("fcdd", serde_json::json!({"epochs": 1, "steps_per_epoch": 1, "width": 4})),
        ("cflow", serde_json::json!({"epochs": 1, "steps_per_epoch": 1, "coupling_blocks": 1, "condition_dim": 4})),
    ];
    for (method, settings) in small {
        let info = loupe_engine::methods::find_method(method).unwrap();
        let mut request = loupe_engine::pipeline::FitRequest::new(info, data.join("train/good"));
        request.image_size = 32;
        request.settings = settings;
        let outcome =
            loupe_engine::pipeline::fit(backbone.clone(), &request, &loupe_engine::progress::NoProgress).unwrap();
        let path = folder("model").join(format!("{method}.safetensors"));
        loupe_engine::model_file::save(&path, outcome.model.as_ref(), &outcome.manifest).unwrap();
    }
    let _ = std::fs::remove_dir_all(&data);
}
