//! `loupe bench …`: micro-benchmarks whose numbers the notes quote (backbone speed, coreset selection).

use super::EngineArgs;
use anyhow::Result;
use candle_core::Tensor;
use loupe_engine::dataset::layout::list_images;
use loupe_engine::dataset::synthetic::clustered_features;
use loupe_engine::dataset::{decode_all, scan_normal_folder, DecodedImage, ImageRecord};
use loupe_engine::methods::features::{patch_features, patches_as_rows, PATCH_CHANNELS};
use loupe_engine::methods::images_to_tensor;
use loupe_engine::methods::representation::coreset::{greedy_coreset, random_projection, CoresetMethod};
use loupe_engine::progress::NoProgress;
use std::path::Path;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(clap::Subcommand)]
pub enum BenchWhat {
    /// Time the truncated backbone (blocks 0–10) on random images.
    Backbone {
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Time a model's scoring at batch 1 (decoding excluded) over a folder's images, several passes.
    Score {
        #[arg(long)]
        model: std::path::PathBuf,
        /// Images (a folder, searched recursively; an MVTec folder's test/ is a good choice).
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long, default_value_t = 100)]
        images: usize,
        #[arg(long, default_value_t = 5)]
        passes: usize,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Time the greedy coreset: on the patch features of a folder's normal images (`--data`), or on
    /// synthetic clustered features of PatchCore's shape.
    Coreset {
        #[arg(long)]
        data: Option<std::path::PathBuf>,
        /// Raw f32 file caching the features of `--data` between runs.
        #[arg(long)]
        cache: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 779_264)]
        points: usize,
        #[arg(long, default_value_t = 0.1)]
        ratio: f64,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// PatchCore's nearest-neighbour search side by side on one model file: the exhaustive search and the
    /// inverted index at each `--probes`. Reports, per search, image AUROC and AUPRO on the benchmark's test
    /// set, images/s at batch 1, and the largest image-score difference from the exhaustive search on the held-out
    /// good images of train/good (the fit's validation split: the label-free figure the default is chosen on).
    Search {
        #[arg(long)]
        model: std::path::PathBuf,
        /// An MVTec AD category folder.
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
        probes: Vec<usize>,
        /// Index sizes to try (lists; 0 = the default for the bank's size).
        #[arg(long, value_delimiter = ',', default_value = "0")]
        lists: Vec<usize>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Time one trained method's training step (forward + loss, backward, AdamW) on a random batch, as the
    /// PyTorch reference script times its replica: warm-up steps, then the median, min and max of `--steps`.
    TrainStep {
        /// autoencoder or stfpm (the replica's student: one convolution at 1/16, where the default has four).
        #[arg(long)]
        method: String,
        /// Images per step (default: the method's CPU default).
        #[arg(long)]
        batch: Option<usize>,
        /// Side of the network's input in pixels (default: the method's CPU default).
        #[arg(long)]
        size: Option<usize>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value = "cpu")]
        device: loupe_engine::device::DeviceChoice,
    },
    /// A model's image AUROC on label-free validation data: the held-out good images of an MVTec folder's
    /// train/good (the fit's validation split, never trained on) against the same images with a seeded synthetic
    /// anomaly each (CutPaste, scar or a Perlin-blended foreign texture). Chooses defaults without test labels; for
    /// the methods that train on these anomalies (CutPaste, DRAEM, FCDD) it flatters.
    Validate {
        #[arg(long)]
        model: std::path::PathBuf,
        /// An MVTec AD category folder.
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Draw the anomalies this many times (seeds `seed`, `seed + 1`, …) and report each AUROC and their mean:
        /// with some 76 held-out images one draw's AUROC moves by ±0.01, as much as the choices it decides.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
        draws: u64,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Write a large, varied set of normal images for scale benchmarks: `--count` seeded variants (crop, ±5°
    /// rotation, flips, ±10 % brightness) of a folder's good images (an MVTec folder's train/good), PNG at `--size`.
    MakeNormals {
        /// A folder of good images, or an MVTec AD category folder (its train/good).
        #[arg(long)]
        from: std::path::PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write the seeded high-resolution benchmark (issue 20): textured parts of `--width × --height` with small
    /// defects (0.005–0.1 % of the image by default) and their masks, in the MVTec AD layout.
    MakeHighres {
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 4096)]
        width: u32,
        #[arg(long, default_value_t = 3072)]
        height: u32,
        #[arg(long, default_value_t = 24)]
        train: usize,
        #[arg(long, default_value_t = 12)]
        test_good: usize,
        /// Test images of each of the three defect kinds.
        #[arg(long, default_value_t = 4)]
        per_defect: usize,
        /// Smallest and largest defect, as a share of the image's area (drawn log-uniformly between).
        #[arg(long, default_value_t = 5e-5)]
        min_area: f64,
        #[arg(long, default_value_t = 1e-3)]
        max_area: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Time what the studio's threshold panel recomputes per drag step (confusion, FAR/MAR, pass/review/reject)
    /// over many image scores: the table is sorted once, then every threshold is two binary searches per class.
    Threshold {
        #[arg(long, default_value_t = 100_000)]
        scores: usize,
        #[arg(long, default_value_t = 10_000)]
        thresholds: usize,
    },
}

fn folder_features(folder: &Path, cache: Option<&Path>, engine: &EngineArgs) -> Result<Vec<f32>> {
    if let Some(bytes) = cache.and_then(|c| std::fs::read(c).ok()) {
        return Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
    }
    let backbone = engine.load_backbone()?;
    let records = scan_normal_folder(folder)?;
    let (images, _) = decode_all(&records, 256, &|_| {});
    let mut features = Vec::new();
    for batch in images.chunks(8) {
        let refs: Vec<&DecodedImage> = batch.iter().collect();
        let tensor = images_to_tensor(&refs, &backbone.device)?;
        features.extend(patches_as_rows(&patch_features(&backbone, &tensor)?)?.flatten_all()?.to_vec1::<f32>()?);
    }
    if let Some(cache) = cache {
        loupe_engine::atomic_file::write_atomic(
            cache,
            &features.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        )?;
    }
    Ok(features)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Backbone { batch, size, repeats, engine } => {
            let backbone = engine.load_backbone()?;
            let images = Tensor::rand(0f32, 1.0, (batch, 3, size, size), &backbone.device)?;
            backbone.features(&images)?;
            let mut times = Vec::new();
            for _ in 0..repeats {
                let started = Instant::now();
                let maps = backbone.features(&images)?;
                maps.stride16.sum_all()?.to_scalar::<f32>()?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            let med = median(times.clone());
            let min = times.iter().copied().fold(f64::INFINITY, f64::min);
            println!("backbone {size}x{size} batch {batch}: median {med:.1} ms, min {min:.1} ms per batch ({:.1} images/s), {} threads",
                batch as f64 / med * 1000.0, rayon::current_num_threads());
        }
        BenchWhat::Score { model, data, images, passes, engine } => {
            let backbone = engine.load_backbone()?;
            let device = backbone.device.clone();
            let loaded = loupe_engine::model_file::load(&model, backbone)?;
            let records: Vec<ImageRecord> =
                list_images(&data)?.into_iter().take(images).map(ImageRecord::normal).collect();
            let (decoded, _) = decode_all(&records, loaded.model.image_size(), &|_| {});
            let tensors: Vec<Tensor> =
                decoded.iter().map(|image| images_to_tensor(&[image], &device)).collect::<anyhow::Result<_>>()?;
            loaded.model.score_batch(&tensors[0])?;
            let mut rates = Vec::new();
            for _ in 0..passes {
                let started = Instant::now();
                for tensor in &tensors {
                    loaded.model.score_batch(tensor)?;
                }
                rates.push(tensors.len() as f64 / started.elapsed().as_secs_f64());
            }
            let best = rates.iter().copied().fold(0.0, f64::max);
            println!(
                "{} on {} images at batch 1: median {:.1} images/s, best pass {best:.1}, all passes {:?}",
                loaded.manifest.method,
                tensors.len(),
                median(rates.clone()),
                rates.iter().map(|r| (r * 10.0).round() / 10.0).collect::<Vec<_>>()
            );
        }
        BenchWhat::Threshold { scores, thresholds } => bench_threshold(scores, thresholds)?,
        BenchWhat::MakeNormals { from, count, out, size, seed } => {
            let folder = if loupe_engine::dataset::layout::is_mvtec(&from) { from.join("train/good") } else { from };
            let sources = list_images(&folder)?;
            let progress = crate::progress_bar::TerminalProgress::new();
            let (written, skipped) = loupe_engine::dataset::augmented::write_augmented_normals(
                &sources, count, size, seed, &out, &progress,
            )?;
            progress.finish();
            for file in &skipped {
                eprintln!("skipped {file}");
            }
            println!(
                "{} variants of {} good images of {} written to {} ({size}², seed {seed})",
                written.len(),
                sources.len() - skipped.len(),
                folder.display(),
                out.display()
            );
        }
        BenchWhat::MakeHighres { out, width, height, train, test_good, per_defect, min_area, max_area, seed } => {
            use loupe_engine::dataset::highres::{generate_highres, HighResSpec};
            let sides = loupe_engine::geometry::MIN_TILE..=loupe_engine::dataset::decode::MAX_IMAGE_SIDE;
            if !sides.contains(&width) || !sides.contains(&height) {
                anyhow::bail!("--width and --height are {}..={} pixels", sides.start(), sides.end());
            }
            if !(0.0 < min_area && min_area <= max_area && max_area <= 0.25) {
                anyhow::bail!("defect areas: 0 < --min-area ≤ --max-area ≤ 0.25 of the image");
            }
            let spec = HighResSpec {
                train_good: train,
                test_good,
                test_per_defect: per_defect,
                min_defect_area: min_area,
                max_defect_area: max_area,
                ..HighResSpec::camera(seed, width, height)
            };
            generate_highres(&out, &spec)?;
            println!(
                "{} good and {} defective {width}×{height} parts written to {} (seed {seed})",
                train + test_good,
                3 * per_defect,
                out.display()
            );
        }
        BenchWhat::Validate { model, data, seed, draws, engine } => {
            bench_validate(&model, &data, seed, draws, &engine)?
        }
        BenchWhat::TrainStep { method, batch, size, threads, steps, warmup, device } => {
            bench_train_step(&method, batch, size, threads, steps, warmup, &device.open()?)?
        }
        BenchWhat::Search { model, data, probes, lists, engine } => {
            bench_search(&model, &data, &probes, &lists, &engine)?
        }
        BenchWhat::Coreset { data, cache, points, ratio, engine } => {
            let dim = PATCH_CHANNELS;
            let data = match data {
                Some(folder) => folder_features(&folder, cache.as_deref(), &engine)?,
                None => clustered_features(points, dim, 64, 1),
            };
            let points = data.len() / dim;
            let started = Instant::now();
            let projected = random_projection(&data, dim, 128, 0);
            let projection_s = started.elapsed().as_secs_f64();
            let count = (points as f64 * ratio).ceil() as usize;
            let started = Instant::now();
            let selected = greedy_coreset(&projected, 128, count, 0, CoresetMethod::Auto, &NoProgress)?;
            println!(
                "coreset {} of {points} points: projection {projection_s:.1} s, greedy selection {:.1} s",
                selected.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn bench_validate(model: &Path, data: &Path, seed: u64, draws: u64, engine: &EngineArgs) -> Result<()> {
    use loupe_engine::methods::augmentation::synthetic_anomalies::random_anomaly;
    use loupe_engine::methods::planar_to_tensor;
    use loupe_engine::pipeline::{validation_split, FitRequest};
    let (loaded, device) = engine.open_model(model)?;
    let benchmark = loupe_engine::dataset::scan_mvtec(data)?;
    let defaults = FitRequest::new(loupe_engine::methods::find_method(&loaded.manifest.method)?, data.to_path_buf());
    let (_, held_out) = validation_split(benchmark.train.clone(), defaults.validation_fraction, defaults.seed);
    let size = loaded.model.image_size();
    let (decoded, _) = decode_all(&held_out, size, &|_| {});
    if decoded.len() < 2 {
        anyhow::bail!("{}: fewer than two held-out good images", data.display());
    }
    let planar: Vec<Vec<f32>> = decoded.iter().map(|image| image.to_chw_f32()).collect();
    let score = |image: &Vec<f32>| -> Result<f32> {
        let tensor = planar_to_tensor(std::slice::from_ref(image), size as usize, &device)?;
        Ok(loaded.model.score_batch(&tensor)?[0].score)
    };
    // The good images score the same in every draw.
    let good_scores: Vec<f32> = planar.iter().map(&score).collect::<Result<_>>()?;
    let last_seed = seed
        .checked_add(draws - 1)
        .ok_or_else(|| anyhow::anyhow!("--seed {seed} with --draws {draws} runs past the largest seed"))?;
    let mut aurocs = Vec::new();
    for draw_seed in seed..=last_seed {
        let mut rng = loupe_engine::rng::SplitMix64::new(draw_seed);
        let mut scores = Vec::new();
        let mut labels = Vec::new();
        for (i, good) in planar.iter().enumerate() {
            let other = &planar[(i + 1) % planar.len()];
            let anomalous = random_anomaly(good, other, size as usize, &mut rng).image;
            scores.extend([good_scores[i], score(&anomalous)?]);
            labels.extend([false, true]);
        }
        let auroc = loupe_engine::metrics::roc::auroc(&scores, &labels)?;
        println!(
            "{}: validation image AUROC {auroc:.4} ({} held-out good images of {} against the same with a synthetic anomaly, seed {draw_seed})",
            model.display(),
            decoded.len(),
            data.display()
        );
        aurocs.push(auroc);
    }
    if draws > 1 {
        let mean = aurocs.iter().sum::<f64>() / aurocs.len() as f64;
        println!(
            "{}: mean validation image AUROC {mean:.4} over {draws} draws (seeds {seed}–{last_seed})",
            model.display()
        );
    }
    Ok(())
}

fn bench_train_step(
    method: &str,
    batch: Option<usize>,
    size: Option<usize>,
    threads: Option<usize>,
    steps: usize,
    warmup: usize,
    device: &candle_core::Device,
) -> Result<()> {
    use loupe_engine::methods::reconstruction::{autoencoder, stfpm};
    use loupe_engine::methods::training::{parameter_count, time_steps};
    if let Some(threads) = threads {
        // candle's matrix products size their pool from the same variable rayon reads.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    let mut step = match method {
        "autoencoder" => autoencoder::bench_step(batch.unwrap_or(16), size.unwrap_or(64), device)?,
        "stfpm" => stfpm::bench_step(batch.unwrap_or(8), size.unwrap_or(256), device)?,
        other => anyhow::bail!("no training-step benchmark for `{other}` (autoencoder or stfpm)"),
    };
    if steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    let timings = time_steps(&mut step, warmup, steps)?;
    let median_of =
        |part: fn(&loupe_engine::methods::training::StepTiming) -> f64| median(timings.iter().map(part).collect());
    let totals: Vec<f64> = timings.iter().map(|t| t.total).collect();
    println!(
        "RESULT side=loupe model={method} {} threads={} params={} step_med_ms={:.1} step_min_ms={:.1} \
         step_max_ms={:.1} fwd_loss_med_ms={:.1} bwd_med_ms={:.1} opt_med_ms={:.1} steps={:?}",
        step.geometry,
        rayon::current_num_threads(),
        parameter_count(&step.varmap),
        median(totals.clone()),
        totals.iter().copied().fold(f64::INFINITY, f64::min),
        totals.iter().copied().fold(0.0, f64::max),
        median_of(|t| t.forward_loss),
        median_of(|t| t.backward),
        median_of(|t| t.optimizer),
        totals.iter().map(|t| (t * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    Ok(())
}

fn bench_search(model: &Path, data: &Path, probes: &[usize], lists: &[usize], engine: &EngineArgs) -> Result<()> {
    use loupe_engine::evaluate::evaluate;
    use loupe_engine::model_file::{load_bytes_with_settings, read_bounded};
    use loupe_engine::pipeline::{score_images, validation_split, FitRequest};
    let backbone = engine.load_backbone()?;
    let device = backbone.device.clone();
    let bytes = read_bounded(model)?;
    let benchmark = loupe_engine::dataset::scan_mvtec(data)?;
    let defaults = FitRequest::new(loupe_engine::methods::find_method("patchcore")?, data.to_path_buf());
    let (_, held_out) = validation_split(benchmark.train.clone(), defaults.validation_fraction, defaults.seed);
    let mut variants = vec![("exhaustive".to_string(), serde_json::json!({"search": "exhaustive"}))];
    for &l in lists {
        variants.extend(probes.iter().map(|&p| {
            let lists = if l == 0 { "default lists".to_string() } else { format!("{l} lists") };
            (
                format!("inverted, {lists}, {p} probes"),
                serde_json::json!({"search": "inverted", "search_probes": p, "search_lists": l}),
            )
        }));
    }
    let mut exhaustive_held_out: Option<Vec<loupe_engine::methods::AnomalyOutput>> = None;
    println!(
        "| search | index build | image AUROC | AUPRO | images/s (b1) | held-out good: max image-score difference \
         | max map difference (of the map's range) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, overrides) in variants {
        let started = Instant::now();
        let loaded = load_bytes_with_settings(&bytes, backbone.clone(), |settings| {
            for (key, value) in overrides.as_object().into_iter().flatten() {
                settings[key] = value.clone();
            }
        })?;
        let build_s = started.elapsed().as_secs_f64();
        if loaded.manifest.method != "patchcore" {
            anyhow::bail!(
                "{} is a {} model; the search benchmark needs PatchCore",
                model.display(),
                loaded.manifest.method
            );
        }
        let (decoded, _) = decode_all(&held_out, loaded.model.image_size(), &|_| {});
        let (outputs, _) = score_images(loaded.model.as_ref(), &decoded, 1, &device, &NoProgress)?;
        let differences = match &exhaustive_held_out {
            None => {
                exhaustive_held_out = Some(outputs);
                ("—".to_string(), "—".to_string())
            }
            Some(exact) => {
                let (mut score, mut map) = (0f32, 0f32);
                for (e, o) in exact.iter().zip(&outputs) {
                    score = score.max(((o.score - e.score) / e.score.abs().max(1e-12)).abs());
                    let (low, high) =
                        e.map.data.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                    let largest = e.map.data.iter().zip(&o.map.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    map = map.max(largest / (high - low).max(1e-12));
                }
                (format!("{score:.1e}"), format!("{:.2} %", map * 100.0))
            }
        };
        let report = evaluate(loaded.model.as_ref(), &loaded.manifest, &benchmark, 1, &device, &NoProgress)?;
        println!(
            "| {name} | {build_s:.2} s | {:.5} | {} | {:.1} | {} | {} |",
            report.image_auroc,
            report.aupro.map_or("—".to_string(), |a| format!("{a:.5}")),
            report.test_images_per_s,
            differences.0,
            differences.1
        );
    }
    println!(
        "({} held-out good images, {} test images, {} threads)",
        held_out.len(),
        benchmark.test.len(),
        rayon::current_num_threads()
    );
    Ok(())
}

fn bench_threshold(count: usize, thresholds: usize) -> Result<()> {
    use loupe::project::verdict::band_counts;
    use loupe_engine::metrics::ThresholdTable;
    use loupe_engine::rng::SplitMix64;
    let mut rng = SplitMix64::new(1);
    let labels: Vec<bool> = (0..count).map(|_| rng.next_f32() < 0.3).collect();
    let scores: Vec<f32> = labels.iter().map(|&bad| rng.next_f32() + if bad { 0.6 } else { 0.0 }).collect();
    let started = Instant::now();
    let table = ThresholdTable::new(&scores, &labels);
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut times = Vec::with_capacity(thresholds);
    let mut checksum = 0usize;
    for _ in 0..thresholds {
        let threshold = rng.next_f32() * 1.6;
        let started = Instant::now();
        let confusion = table.confusion(threshold);
        let bands = band_counts(&table, threshold, Some(threshold - 0.1));
        let rates = (confusion.far(), confusion.mar());
        times.push(started.elapsed().as_secs_f64() * 1e6);
        checksum += confusion.false_positive + bands.review + rates.0.is_some() as usize;
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    println!("{count} scores: sorted once in {build_ms:.2} ms (when a model's scores arrive)");
    println!(
        "per threshold (confusion + FAR/MAR + pass/review/reject), {thresholds} thresholds: median {:.2} µs, max {:.2} µs (bar: 1000 µs) [{checksum}]",
        median(times),
        max
    );
    Ok(())
}
