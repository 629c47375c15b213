//! CutPaste — Li et al. 2021, "CutPaste: Self-Supervised Learning for Anomaly Detection and Localization"
//! (CVPR); reference code: the authors' `cutpaste` repository and anomalib's data-augmentation utilities.
//!
//! The paper fine-tunes an ImageNet ResNet-18 to tell normal images from their CutPaste and CutPaste-Scar
//! versions (three classes), then fits a Gaussian density estimator (GDE) to the normal images' embeddings;
//! its patch-level variant applies the GDE to the embeddings of patches for a map. Here the pretrained
//! network is the frozen Lite0 (its locally aware stride-8 patch features, as PatchCore's), and what learns is
//! a per-patch embedding network on top: a two-layer perceptron trained, with a linear classifier, to label
//! every patch normal / cut-pasted / scar — the generators' masks say which patches they changed, so the
//! patch-level task is supervised directly (a patch is "changed" if any of its 8×8 pixels is). The classes
//! are weighted so the few changed patches count as much as the many unchanged ones.
//! Score: the GDE (one Gaussian over the normal patches' embeddings, shrunk towards a scaled identity) gives
//! each patch its Mahalanobis distance: the map (upsampled, Gaussian σ = 4); image score: its maximum.

use crate::methods::setting_docs::common;
use super::synthetic_anomalies::{cutpaste, patch_labels, scar};
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::methods::features::{patch_feature_rows, patch_standardisation, PATCH_CHANNELS, PATCH_STRIDE};
use crate::methods::gaussian::{whitening_matrix, MomentSums};
use crate::methods::statistics::Standardise;
use crate::methods::training::{
    load_varmap, take_tensor, train, varmap_state, Schedule, ShuffledBatches, TrainingRecord,
};
use crate::methods::{
    images_to_tensor, outputs_from_cells, planar_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext,
    RecordedScores,
};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use crate::rng::SplitMix64;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    Cutpaste,
    CutpasteSettings,
    name: "cutpaste",
    title: "CutPaste",
    family: Family::DataAugmentation,
    summary: "Patch embeddings trained to spot CutPaste / scar augmentations; Gaussian density of normal patches.",
    guide: "Wins on small irregular defects (scratches, cracks) on textured surfaces. On 2 CPU cores, MTD (761 training images): fit 3 min 40 s, 46 images/s, image AUROC 0.845.",
    ranges: ["embedding_dim": 2..=1024, "shrinkage": 0..=1],
    docs: [
        "embedding_dim" => common("Embedding size", "", "Dimensions of the learnt image embedding the Gaussian density is fitted on.", true),
        "shrinkage" => common("Covariance shrinkage", "", "λ in (1 − λ)·Σ + λ·(tr Σ / d)·I: steadies the Gaussian on few images.", true),
    ],
    smoke: ({"epochs": 4, "steps_per_epoch": 10, "images_per_step": 4} at 96, floors [0.9, 0.85, 0.5]),
    presets: ["published": "the paper's training length, for a GPU" => CutpasteSettings::published],
);

/// Classes of the self-supervised task.
const NORMAL: u32 = 0;
const CUT_PASTE: u32 = 1;
const SCAR: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CutpasteSettings {
    /// Epochs, learning rate, weight decay, time budget, seed and AdamW's β₁: the schedule every trained method shares.
    #[serde(flatten)]
    pub schedule: Schedule,
    pub steps_per_epoch: usize,
    /// Normal images per step; each also enters as a CutPaste and a scar version.
    pub images_per_step: usize,
    pub embedding_dim: usize,
    /// λ of the GDE's covariance shrinkage: (1 − λ)·Σ + λ·(tr Σ / d)·I.
    pub shrinkage: f64,
    pub blur_sigma: f32,
}

impl Default for CutpasteSettings {
    fn default() -> Self {
        Self {
            schedule: Schedule::new(8, 1e-3),
            steps_per_epoch: 25,
            images_per_step: 8,
            embedding_dim: 128,
            shrinkage: 0.1,
            blur_sigma: 4.0,
        }
    }
}

impl CutpasteSettings {
    /// The paper's training length for a GPU: 256 epochs of 96 images (32 normal + their two augmentations), at
    /// ≈ 10 steps an epoch for an MVTec-sized set (the paper uses SGD at 0.03; Loupe's optimiser is AdamW).
    pub fn published() -> Self {
        Self {
            schedule: Schedule { epochs: 256, ..Self::default().schedule },
            steps_per_epoch: 10,
            images_per_step: 32,
            ..Self::default()
        }
    }
}

/// The trained part: patch features → embedding (→ class logits while training).
struct Head {
    hidden: Linear,
    embedding: Linear,
    classifier: Linear,
}

impl Head {
    fn new(vb: VarBuilder, embedding_dim: usize) -> Result<Self> {
        Ok(Self {
            hidden: candle_nn::linear(PATCH_CHANNELS, embedding_dim, vb.pp("hidden"))?,
            embedding: candle_nn::linear(embedding_dim, embedding_dim, vb.pp("embedding"))?,
            classifier: candle_nn::linear(embedding_dim, 3, vb.pp("classifier"))?,
        })
    }

    fn embed(&self, standardised_rows: &Tensor) -> Result<Tensor> {
        Ok(self.embedding.forward(&self.hidden.forward(standardised_rows)?.relu()?)?)
    }

    fn logits(&self, embeddings: &Tensor) -> Result<Tensor> {
        Ok(self.classifier.forward(&embeddings.relu()?)?)
    }
}

pub struct Cutpaste {
    backbone: Arc<Backbone>,
    settings: CutpasteSettings,
    image_size: u32,
    varmap: VarMap,
    head: Head,
    standardise: Standardise,
    /// GDE mean `(1, d)` and transposed whitening `(d, d)`.
    mean: Tensor,
    whitening_t: Tensor,
    pub record: TrainingRecord,
}

impl Cutpaste {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: CutpasteSettings) -> Result<Self> {
        let standardise = patch_standardisation(context, images, "CutPaste")?;
        let device = context.device.clone();
        let progress = context.progress;
        let size = context.image_size as usize;

        let varmap = VarMap::new();
        let head = Head::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), settings.embedding_dim)?;
        let mut batches = ShuffledBatches::new(images.len(), settings.images_per_step, settings.schedule.seed ^ 0xc7);
        let mut rng = SplitMix64::new(settings.schedule.seed ^ 0xc0ffee);
        let plan = settings.schedule.plan(settings.steps_per_epoch);
        let record = train(&varmap, &plan, progress, |epoch, step| {
            let chosen = batches.cycling(epoch, settings.steps_per_epoch, step).to_vec();
            let mut inputs = Vec::with_capacity(3 * chosen.len());
            let mut labels = Vec::new();
            for &i in &chosen {
                let image = images.get(i)?.to_chw_f32();
                let grid = size.div_ceil(PATCH_STRIDE);
                labels.extend(std::iter::repeat_n(NORMAL, grid * grid));
                let pasted = cutpaste(&image, size, &mut rng);
                labels.extend(patch_labels(&pasted.mask, size, CUT_PASTE));
                let scarred = scar(&image, size, &mut rng);
                labels.extend(patch_labels(&scarred.mask, size, SCAR));
                inputs.extend([image, pasted.image, scarred.image]);
            }
            let rows = standardise
                .apply(&patch_feature_rows(&context.backbone, &planar_to_tensor(&inputs, size, &device)?)?)?;
            let logits = head.logits(&head.embed(&rows)?)?;
            // Changed and unchanged patches weigh half each.
            let changed = labels.iter().filter(|&&l| l != NORMAL).count().max(1) as f32;
            let unchanged = labels.iter().filter(|&&l| l == NORMAL).count().max(1) as f32;
            let weights: Vec<f32> =
                labels.iter().map(|&l| if l == NORMAL { 0.5 / unchanged } else { 0.5 / changed }).collect();
            let targets = Tensor::new(labels.as_slice(), &device)?.unsqueeze(1)?;
            let log_probabilities = candle_nn::ops::log_softmax(&logits, 1)?.gather(&targets, 1)?.squeeze(1)?;
            let weights = Tensor::new(weights.as_slice(), &device)?;
            Ok(log_probabilities.mul(&weights)?.sum_all()?.neg()?)
        })?;

        // The GDE over every normal patch's embedding.
        progress.begin("density of normal patches", images.len() as u64);
        let mut moments = MomentSums::new(settings.embedding_dim);
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let rows = patch_feature_rows(&context.backbone, &images_to_tensor(&batch, &device)?)?;
            let embeddings = head.embed(&standardise.apply(&rows)?)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
            embeddings.iter().for_each(|e| moments.add(e));
            progress.advance(batch.len() as u64);
        }
        let (mean, whitening_t) = gde(&moments, settings.shrinkage, &device)?;
        Ok(Self {
            backbone: context.backbone.clone(),
            settings,
            image_size: context.image_size,
            varmap,
            head,
            standardise,
            mean,
            whitening_t,
            record,
        })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: CutpasteSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let device = backbone.device.clone();
        let d = settings.embedding_dim;
        let standardise = Standardise::take(&mut tensors, "standardise", PATCH_CHANNELS, &device)?;
        let mean = take_tensor(&mut tensors, "gde.mean", &[1, d], &device)?;
        let whitening_t = take_tensor(&mut tensors, "gde.whitening_t", &[d, d], &device)?;
        let varmap = load_varmap(tensors, &device, "CutPaste", |vb| Head::new(vb.clone(), d).map(|_| ()))?;
        let head = Head::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), d)?;
        Ok(Self {
            backbone,
            settings,
            image_size,
            varmap,
            head,
            standardise,
            mean,
            whitening_t,
            record: TrainingRecord::default(),
        })
    }
}

/// Mean `(1, d)` and transposed whitening matrix `(d, d)` of the shrunk Gaussian.
fn gde(moments: &MomentSums, shrinkage: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let covariance = moments.covariance(0.0);
    let d = covariance.nrows();
    let scale = covariance.trace() / d as f64;
    let shrunk = covariance * (1.0 - shrinkage) + nalgebra::DMatrix::identity(d, d) * (shrinkage * scale + 1e-9);
    let whitening = whitening_matrix(&shrunk)?;
    let mean: Vec<f32> = moments.mean().iter().map(|&m| m as f32).collect();
    Ok((Tensor::from_vec(mean, (1, d), device)?, Tensor::from_vec(whitening, (d, d), device)?.t()?.contiguous()?))
}

impl AnomalyModel for Cutpaste {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let batch = images.dim(0)?;
        let rows = patch_feature_rows(&self.backbone, images)?;
        let embeddings = self.head.embed(&self.standardise.apply(&rows)?)?;
        let distances = embeddings
            .broadcast_sub(&self.mean)?
            .matmul(&self.whitening_t)?
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let size = self.image_size as usize;
        let grid = size.div_ceil(PATCH_STRIDE);
        Ok(outputs_from_cells(&distances[..batch * grid * grid], grid, size, self.settings.blur_sigma))
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let (fine, coarse) = layers::backbone_features(graph, &self.backbone, images)?;
        let features = layers::patch_features(graph, &fine, &coarse, true);
        let grid = features.dim(2);
        let rows = layers::positions_as_rows(graph, &features);
        let rows = layers::standardise(graph, &rows, &self.standardise)?;
        let hidden = layers::linear(graph, &rows, &self.head.hidden)?;
        let hidden = graph.op("Relu", &[&hidden], vec![]).with_shape(hidden.shape);
        let embeddings = layers::linear(graph, &hidden, &self.head.embedding)?;
        // The Gaussian density estimate's Mahalanobis distance: |(e − μ)·Wᵀ|.
        let mean = self.mean.to_device(&Device::Cpu)?;
        let d = mean.elem_count();
        let mean = graph.floats("gde_mean", &[d], &mean.flatten_all()?.to_vec1::<f32>()?);
        let whitening_t = self.whitening_t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let whitening_t = graph.floats("gde_whitening_t", &[d, d], &whitening_t);
        let centred = graph.op("Sub", &[&embeddings, &mean], vec![]);
        let whitened = graph.op("MatMul", &[&centred, &whitening_t], vec![]);
        let last = graph.ints("axis", &[1], &[-1]);
        let squared = graph.op("ReduceSumSquare", &[&whitened, &last], vec![attr_int("keepdims", 0)]);
        let distances = graph.op("Sqrt", &[&squared], vec![]).with_shape(vec![images.shape[0], Some(grid * grid)]);
        Ok(layers::map_and_score(graph, &distances, grid, self.image_size as usize, self.settings.blur_sigma))
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = varmap_state(&self.varmap)?;
        state.extend(self.standardise.state("standardise")?);
        state.push(("gde.mean".into(), self.mean.to_device(&Device::Cpu)?));
        state.push(("gde.whitening_t".into(), self.whitening_t.to_device(&Device::Cpu)?));
        Ok(state)
    }
}
