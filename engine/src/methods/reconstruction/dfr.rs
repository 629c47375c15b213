//! DFR — Shi, Yang & Qi 2021, "Unsupervised anomaly segmentation via deep feature reconstruction"
//! (Neurocomputing); reference code: the authors' `DFR`.
//!
//! A convolutional autoencoder of 1×1 convolutions — one per patch, so an MLP over each patch's feature vector —
//! learns to reconstruct the multi-scale regional features of good images through a narrow latent; a defect's
//! features are reconstructed badly. Encoder in → (in + 2c)/2 → 2c → c, decoder mirrored, ReLU between, as in
//! the paper (without its batch norms: the features arrive standardised per channel). The latent size c is, as
//! in the paper, by default the fewest principal components that explain 90 % of the features' variance. The
//! anomaly map is each patch's squared reconstruction error (upsampled, blurred; optionally z-scored per
//! position against the training images, `calibrate`); the score its maximum.
//!
//! Backbone: the paper concatenates a VGG-19's sixteen layers resized to one grid (3,136 channels); here the
//! Lite0 stride-8 and stride-16 maps, 3×3-averaged (the 152 patch channels every patch method shares).

use crate::backbone::Backbone;
use crate::dataset::record_store::{RecordStore, PER_IMAGE_VALUES_IN_MEMORY};
use crate::dataset::TrainingImages;
use crate::methods::calibration::{PositionCalibration, CALIBRATION_IMAGES};
use crate::methods::features::{patch_feature_rows, patch_standardisation, PATCH_CHANNELS};
use crate::methods::gaussian::{grid_size, MomentSums};
use crate::methods::setting_docs::common;
use crate::methods::statistics::Standardise;
use crate::methods::training::{load_varmap, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord};
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Dfr,
    DfrSettings,
    name: "dfr",
    title: "DFR",
    family: Family::Reconstruction,
    summary: "An autoencoder over each patch's pretrained features; the reconstruction error is the map.",
    guide: "Wins where defects are small regions of unusual texture; trains on the features, not the pixels, so it learns in minutes. On 2 CPU cores, MTD (761 training images): fit 6 min 9 s, 29 images/s, image AUROC 0.872.",
    ranges: ["latent_dim": 0..=152, "images_per_step": 1..=256],
    docs: [
        "latent_dim" => common("Latent size", "channels", "Channels of the bottleneck (0: the fewest principal components that explain 90 % of the features' variance, as in the paper).", false),
        "calibrate" => common("Per-position calibration", "", "Z-score each patch's error against the training images' at that position (not in the paper).", true),
    ],
    smoke: ({"epochs": 4, "images_per_step": 4} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => DfrSettings::published],
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DfrSettings {
    /// c; 0 chooses it from the features' principal components.
    pub latent_dim: usize,
    /// Images whose every patch makes one optimisation step.
    pub images_per_step: usize,
    /// Z-score the error map per position against the first training images'.
    pub calibrate: bool,
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub blur_sigma: f32,
}

impl Default for DfrSettings {
    fn default() -> Self {
        // Calibrated, 24 epochs (about 6 minutes on MTD): chosen on label-free validation (ARCHITECTURE.md).
        Self { latent_dim: 0, images_per_step: 8, calibrate: true, schedule: Schedule::new(24, 1e-3), blur_sigma: 4.0 }
    }
}

impl DfrSettings {
    /// The paper's length: 700 epochs at learning rate 1e-4 (Adam there; AdamW here).
    pub fn published() -> Self {
        Self { schedule: Self::default().schedule.with(700, 1e-4), ..Self::default() }
    }
}

/// The 1×1-convolution autoencoder, as linear layers over patch rows.
struct FeatureAutoencoder {
    layers: Vec<Linear>,
}

impl FeatureAutoencoder {
    fn new(vb: VarBuilder, latent: usize) -> Result<Self> {
        let middle = (PATCH_CHANNELS + 2 * latent) / 2;
        let widths = [PATCH_CHANNELS, middle, 2 * latent, latent, 2 * latent, middle, PATCH_CHANNELS];
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, pair)| candle_nn::linear(pair[0], pair[1], vb.pp(format!("layer{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, rows: &Tensor) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut x = rows.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i != last {
                x = x.relu()?;
            }
        }
        Ok(x)
    }

    /// Each row's squared reconstruction error, `(rows,)`.
    fn errors(&self, rows: &Tensor) -> Result<Tensor> {
        Ok((self.forward(rows)? - rows)?.sqr()?.sum(1)?)
    }
}

/// The fewest principal components of `moments` that explain `share` of their variance (at least 1).
fn components_explaining(moments: &MomentSums, share: f64) -> usize {
    let eigen = moments.covariance(0.0).symmetric_eigen();
    let mut values: Vec<f64> = eigen.eigenvalues.iter().map(|v| v.max(0.0)).collect();
    values.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = values.iter().sum();
    let mut explained = 0.0;
    for (count, value) in values.iter().enumerate() {
        explained += value;
        if explained >= share * total {
            return count + 1;
        }
    }
    values.len().max(1)
}

pub struct Dfr {
    backbone: Arc<Backbone>,
    settings: DfrSettings,
    image_size: u32,
    varmap: VarMap,
    autoencoder: FeatureAutoencoder,
    standardise: Standardise,
    latent: usize,
    /// Per-position error statistics, when `calibrate` is on (else none).
    calibration: PositionCalibration,
    pub record: TrainingRecord,
}

impl Dfr {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: DfrSettings) -> Result<Self> {
        let standardise = patch_standardisation(context, images, "DFR")?;
        let device = context.device.clone();
        let progress = context.progress;
        let positions = grid_size(context.image_size).pow(2);
        // The standardised features of every training image, once (the backbone is frozen).
        progress.begin("features", images.len() as u64);
        let mut rows = RecordStore::new("DFR training features", positions * PATCH_CHANNELS, PER_IMAGE_VALUES_IN_MEMORY);
        let mut moments = MomentSums::new(PATCH_CHANNELS);
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let features = standardise.apply(&patch_feature_rows(&context.backbone, &images_to_tensor(&batch, &device)?)?)?;
            let values = features.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            // Every 16th patch estimates the principal components: plenty for 152 channels.
            values.chunks_exact(PATCH_CHANNELS).step_by(16).for_each(|row| moments.add(row));
            rows.extend(&values)?;
            progress.advance(batch.len() as u64);
        }
        let latent = if settings.latent_dim == 0 { components_explaining(&moments, 0.9) } else { settings.latent_dim };
        let varmap = VarMap::new();
        let autoencoder = FeatureAutoencoder::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), latent)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, settings.schedule.seed ^ 0xdf);
        let plan = settings.schedule.plan(batches.steps_per_epoch());
        let record = train(&varmap, &plan, progress, |_, step| {
            let chosen = batches.batch(step);
            let x = Tensor::from_vec(rows.gather(chosen)?, (chosen.len() * positions, PATCH_CHANNELS), &device)?;
            Ok(autoencoder.errors(&x)?.mean_all()?)
        })?;
        let calibration = if settings.calibrate {
            let count = images.len().min(CALIBRATION_IMAGES);
            let mut maps = Vec::with_capacity(count * positions);
            for image in 0..count {
                let x = Tensor::from_vec(rows.record(image)?, (positions, PATCH_CHANNELS), &device)?;
                maps.extend(autoencoder.errors(&x)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?);
            }
            PositionCalibration::from_maps(&[maps], &[positions])
        } else {
            PositionCalibration::none()
        };
        let backbone = context.backbone.clone();
        let image_size = context.image_size;
        Ok(Self { backbone, settings, image_size, varmap, autoencoder, standardise, latent, calibration, record })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: DfrSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let device = backbone.device.clone();
        let standardise = Standardise::take(&mut tensors, "standardise", PATCH_CHANNELS, &device)?;
        let calibration = match settings.calibrate {
            true => PositionCalibration::take(&mut tensors, &[grid_size(image_size).pow(2)])?,
            false => PositionCalibration::none(),
        };
        // The latent size was chosen at fit time: read it off the bottleneck layer's weight `(c, 2c)`.
        let latent = tensors.get("layer2.weight").map_or(0, |t| t.dims().first().copied().unwrap_or(0));
        if !(1..=PATCH_CHANNELS).contains(&latent) {
            bail!("DFR's latent size {latent} is outside 1..={PATCH_CHANNELS}");
        }
        let varmap = load_varmap(tensors, &device, "DFR", |vb| FeatureAutoencoder::new(vb.clone(), latent).map(|_| ()))?;
        let autoencoder = FeatureAutoencoder::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), latent)?;
        let record = TrainingRecord::default();
        Ok(Self { backbone, settings, image_size, varmap, autoencoder, standardise, latent, calibration, record })
    }

    /// The bottleneck's width (chosen from the principal components when the setting is 0).
    pub fn latent(&self) -> usize {
        self.latent
    }
}

impl AnomalyModel for Dfr {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let side = grid_size(self.image_size);
        let rows = self.standardise.apply(&patch_feature_rows(&self.backbone, images)?)?;
        let errors: Vec<f32> = self.autoencoder.errors(&rows)?.to_device(&Device::Cpu)?.to_vec1()?;
        Ok(self.calibration.outputs(&errors, side, self.image_size as usize, self.settings.blur_sigma))
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let side = grid_size(self.image_size);
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, true);
        let rows = layers::positions_as_rows(graph, &features);
        let rows = layers::standardise(graph, &rows, &self.standardise)?;
        let last = self.autoencoder.layers.len() - 1;
        let mut x = rows.clone();
        for (i, layer) in self.autoencoder.layers.iter().enumerate() {
            x = layers::linear(graph, &x, layer)?;
            if i != last {
                x = graph.op("Relu", &[&x], vec![]).with_shape(x.shape.clone());
            }
        }
        let difference = graph.op("Sub", &[&x, &rows], vec![]);
        let channels = graph.ints("axis", &[1], &[-1]);
        let errors = graph
            .op("ReduceSumSquare", &[&difference, &channels], vec![attr_int("keepdims", 0)])
            .with_shape(vec![images.shape[0], Some(side * side)]);
        let cells = match self.settings.calibrate {
            true => layers::calibrate(graph, &errors, &self.calibration, 0),
            false => errors,
        };
        Ok(layers::map_and_score(graph, &cells, side, self.image_size as usize, self.settings.blur_sigma))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(self.standardise.state("standardise")?);
        state.extend(self.calibration.state()?);
        Ok(state)
    }
}
