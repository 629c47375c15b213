//! Ignored diagnostics of the trained methods on a benchmark folder (run one with `cargo test --release -p
//! loupe-engine -- --ignored NAME`, with the environment variables its `ignore` names): what the choices in
//! ARCHITECTURE.md's experiment history were measured with. They live here, not in the method files, so a
//! method file holds the method.

/// What the ignored benchmark diagnostics of the trained methods start from.
mod loading {
    use crate::backbone::Backbone;
    use crate::dataset::{decode_all, scan_mvtec, DecodedImage};
    use crate::methods::calibration::CALIBRATION_IMAGES;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A trained model file and a benchmark folder, named by environment variables, read for a diagnostic.
    pub struct Diagnostic<S> {
        pub backbone: Arc<Backbone>,
        pub image_size: u32,
        pub settings: S,
        pub tensors: HashMap<String, Tensor>,
        /// The first [`CALIBRATION_IMAGES`] training images (what the methods calibrate on).
        pub train_images: Vec<DecodedImage>,
        pub test_images: Vec<DecodedImage>,
        /// Per test image: whether it is defective.
        pub labels: Vec<bool>,
    }

    /// Reads the model file at `$model_variable` and the MVTec-layout folder at `$data_variable`.
    pub fn load<S: serde::de::DeserializeOwned>(model_variable: &str, data_variable: &str) -> Diagnostic<S> {
        let variable =
            |name: &str| std::path::PathBuf::from(std::env::var(name).unwrap_or_else(|_| panic!("set {name}")));
        let (path, data) = (variable(model_variable), variable(data_variable));
        let backbone =
            Arc::new(Backbone::load(&crate::backbone::weights::default_weights_path(), &Device::Cpu).unwrap());
        let manifest = crate::model_file::load(&path, backbone.clone()).unwrap().manifest;
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let benchmark = scan_mvtec(&data).unwrap();
        let train_records = &benchmark.train[..benchmark.train.len().min(CALIBRATION_IMAGES)];
        let (train_images, _) = decode_all(train_records, manifest.image_size, &|_| {});
        let (test_images, _) = decode_all(&benchmark.test, manifest.image_size, &|_| {});
        let labels = test_images.iter().map(|i| benchmark.test[i.index].label.is_anomalous()).collect();
        Diagnostic {
            backbone,
            image_size: manifest.image_size,
            settings: serde_json::from_value(manifest.settings).unwrap(),
            tensors,
            train_images,
            test_images,
            labels,
        }
    }
}

mod draem {
    use super::loading;
    use crate::methods::augmentation::draem::*;
    use crate::methods::calibration::PositionCalibration;
    use crate::methods::features::PATCH_STRIDE;
    use crate::methods::layers::channels_first;
    use candle_core::Device;

    /// Image AUROC of a trained model's map and of each of its discriminator's input channels on a benchmark
    /// folder, raw and z-scored per position, at two blurs: what the discriminator adds to its inputs.
    #[test]
    #[ignore = "diagnostic: LOUPE_DRAEM_MODEL=model.safetensors LOUPE_DRAEM_DATA=mvtec-folder"]
    fn score_variants_on_a_benchmark() {
        use crate::maps::ScoreMap;
        use crate::methods::images_to_tensor;
        let diagnostic = loading::load::<DraemSettings>("LOUPE_DRAEM_MODEL", "LOUPE_DRAEM_DATA");
        let (train_images, test_images, labels) =
            (&diagnostic.train_images, &diagnostic.test_images, &diagnostic.labels);
        let image_size = diagnostic.image_size;
        let model = Draem::load(diagnostic.backbone, image_size, diagnostic.settings, diagnostic.tensors).unwrap();
        let size = image_size as usize;
        let positions = (size / PATCH_STRIDE).pow(2);
        // Per image, one plane of `positions` cells per term: the input channels, then the map.
        let terms = |images: &[crate::dataset::DecodedImage]| -> Vec<Vec<Vec<f32>>> {
            let mut out = Vec::new();
            for chunk in images.chunks(16) {
                let refs: Vec<&crate::dataset::DecodedImage> = chunk.iter().collect();
                let batch = images_to_tensor(&refs, &Device::Cpu).unwrap();
                let input = pooled_channels_last(&batch, model.settings.downsample).unwrap();
                let reconstruction = model.reconstructive.forward(&input).unwrap();
                let cells = model.deviations.cells(&batch, &input, &reconstruction, model.settings.downsample).unwrap();
                let cells = channels_first(&cells).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let probability = model.probability_cells(&batch).unwrap();
                for (image, map) in
                    cells.chunks_exact(positions * DISCRIMINATIVE_INPUT).zip(probability.chunks_exact(positions))
                {
                    let mut planes: Vec<Vec<f32>> = image.chunks_exact(positions).map(|plane| plane.to_vec()).collect();
                    // The deviation prior alone: the two levels' deviations summed.
                    planes.push(planes[0].iter().zip(&planes[1]).map(|(a, b)| a + b).collect());
                    planes.push(map.to_vec());
                    out.push(planes);
                }
            }
            out
        };
        let (train_terms, test_terms) = (terms(train_images), terms(test_images));
        for term in 0..DISCRIMINATIVE_INPUT + 2 {
            let name = match term - DISCRIMINATIVE_INPUT.min(term) {
                _ if term < DISCRIMINATIVE_INPUT => format!("input {term}"),
                0 => "input 0 + input 1".to_string(),
                _ => "map".to_string(),
            };
            let train_maps: Vec<f32> = train_terms.iter().flat_map(|t| t[term].clone()).collect();
            let calibration = PositionCalibration::from_maps(&[train_maps], &[positions]);
            for calibrated in [false, true] {
                for sigma in [0.0, 4.0] {
                    let maxima: Vec<f32> = test_terms
                        .iter()
                        .map(|t| {
                            let mut values = t[term].clone();
                            if calibrated {
                                calibration.calibrate(0, &mut values);
                            }
                            let grid = size / PATCH_STRIDE;
                            ScoreMap::new(grid, grid, values).resized(size, size).blurred(sigma).max()
                        })
                        .collect();
                    let auroc = crate::metrics::roc::auroc(&maxima, labels).unwrap();
                    eprintln!("{name}: calibrated {calibrated}, sigma {sigma}: max {auroc:.4}");
                }
            }
        }
    }
}

mod autoencoder {
    use super::loading;
    use crate::maps::ScoreMap;
    use crate::methods::calibration::PositionCalibration;
    use crate::methods::images_to_tensor;
    use crate::methods::reconstruction::autoencoder::*;
    use crate::methods::ssim::{mean_ssim, ssim_map};
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    #[ignore]
    fn step_timing() {
        let settings = AutoencoderSettings::default();
        let varmap = VarMap::new();
        let network = Network::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), 128, &settings).unwrap();
        let x = Tensor::rand(0f32, 1f32, (16, 128, 128, 3), &Device::Cpu).unwrap();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let r = network.forward(&x).unwrap();
            let l2 = (&x - &r).unwrap().sqr().unwrap().mean_all().unwrap();
            let t1 = t.elapsed();
            let ssim = mean_ssim(&x, &r).unwrap().mean_all().unwrap();
            let loss = (l2.clone() + ssim.affine(-1.0, 1.0).unwrap()).unwrap();
            let t2 = t.elapsed();
            let g = l2.backward().unwrap();
            let t3 = t.elapsed();
            drop(g);
            let g = loss.backward().unwrap();
            let t4 = t.elapsed();
            drop(g);
            eprintln!("forward {t1:?} +ssim {t2:?} backward(l2) {:?} backward(all) {:?}", t3 - t2, t4 - t3);
        }
    }

    /// Image AUROC of map variants of a trained model on a benchmark folder, each z-scored per pixel against
    /// the first 200 training images: which terms and which smoothing make the image score.
    #[test]
    #[ignore = "diagnostic: LOUPE_AE_MODEL=model.safetensors LOUPE_AE_DATA=mvtec-folder"]
    fn map_variants_on_a_benchmark() {
        let diagnostic = loading::load::<AutoencoderSettings>("LOUPE_AE_MODEL", "LOUPE_AE_DATA");
        let (train_images, test_images, labels) =
            (&diagnostic.train_images, &diagnostic.test_images, &diagnostic.labels);
        let image_size = diagnostic.image_size;
        let model_backbone = diagnostic.backbone.clone();
        let model =
            Autoencoder::load(diagnostic.backbone, image_size, diagnostic.settings, diagnostic.tensors).unwrap();
        // Per image: (1 − SSIM) and squared error maps, channel-averaged, at the network's size.
        let terms = |images: &[crate::dataset::DecodedImage]| -> Vec<[Vec<f32>; 3]> {
            let mut out = Vec::new();
            for chunk in images.chunks(16) {
                let refs: Vec<&crate::dataset::DecodedImage> = chunk.iter().collect();
                let (input, reconstruction) =
                    model.reconstruct(&images_to_tensor(&refs, &Device::Cpu).unwrap()).unwrap();
                let dissimilarity =
                    ssim_map(&input, &reconstruction).unwrap().affine(-1.0, 1.0).unwrap().mean(3).unwrap();
                let error = (&input - &reconstruction).unwrap().sqr().unwrap().mean(3).unwrap();
                // Perceptual: squared distance of the Lite0 patch features of input and reconstruction, both
                // at the network's resolution brought back to the model's image size.
                let up = |t: &Tensor| {
                    let factor = model.settings.downsample;
                    let (_, h, w, _) = t.dims4().unwrap();
                    crate::methods::layers::channels_first(t)
                        .unwrap()
                        .upsample_nearest2d(h * factor, w * factor)
                        .unwrap()
                };
                let features =
                    |t: &Tensor| crate::methods::features::patch_feature_rows(&model_backbone, &up(t)).unwrap();
                let grid = (image_size as usize) / 8;
                let perceptual = (features(&input) - features(&reconstruction))
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum(1)
                    .unwrap()
                    .reshape((chunk.len(), grid, grid))
                    .unwrap();
                for b in 0..chunk.len() {
                    let flat = |t: &Tensor| t.get(b).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    out.push([flat(&dissimilarity), flat(&error), flat(&perceptual)]);
                }
            }
            out
        };
        let (train_terms, test_terms) = (terms(train_images), terms(test_images));
        let side = (train_terms[0][0].len() as f64).sqrt() as usize;
        let size = image_size as usize;
        let grid = size / 8;
        let train_perceptual: Vec<f32> = train_terms.iter().flat_map(|t| t[2].clone()).collect();
        let calibration = PositionCalibration::from_maps(&[train_perceptual], &[grid * grid]);
        for sigma in [0.0, 4.0, 8.0] {
            let maxima: Vec<f32> = test_terms
                .iter()
                .map(|t| {
                    let mut values = t[2].clone();
                    calibration.calibrate(0, &mut values);
                    ScoreMap::new(grid, grid, values).resized(size, size).blurred(sigma).max()
                })
                .collect();
            eprintln!("perceptual sigma {sigma}: max {:.4}", crate::metrics::roc::auroc(&maxima, labels).unwrap());
        }
        let combine = |t: &[Vec<f32>; 3], weights: [f32; 2]| -> Vec<f32> {
            t[0].iter().zip(&t[1]).map(|(a, b)| weights[0] * a + weights[1] * b).collect()
        };
        for (name, weights) in [("ssim+l2", [1.0, 1.0]), ("ssim", [1.0, 0.0]), ("l2", [0.0, 1.0])] {
            let train_maps: Vec<f32> = train_terms.iter().flat_map(|t| combine(t, weights)).collect();
            let calibration = PositionCalibration::from_maps(&[train_maps], &[side * side]);
            for sigma in [0.0, 4.0, 8.0, 16.0] {
                let mut maxima = Vec::new();
                let mut means = Vec::new();
                for t in &test_terms {
                    let mut values = combine(t, weights);
                    calibration.calibrate(0, &mut values);
                    let map = ScoreMap::new(side, side, values).resized(size, size).blurred(sigma);
                    maxima.push(map.max());
                    means.push(map.data.iter().sum::<f32>() / map.data.len() as f32);
                }
                let max_auroc = crate::metrics::roc::auroc(&maxima, labels).unwrap();
                let mean_auroc = crate::metrics::roc::auroc(&means, labels).unwrap();
                eprintln!("{name:8} sigma {sigma:4}: max {max_auroc:.4}  mean {mean_auroc:.4}");
            }
        }
    }
}
