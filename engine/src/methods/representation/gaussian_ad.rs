//! Gaussian-AD — Rippel, Mertens & Merhof 2020, "Modeling the Distribution of Normal Data in Pre-Trained Deep
//! Features for Anomaly Detection" (ICPR); reference code: the authors' `gaussian-ad-mvtec`.
//!
//! Each chosen backbone block's output, averaged over the image, is one vector per level; a multivariate
//! Gaussian is fitted per level with Ledoit–Wolf shrinkage (a few hundred good images are fewer than a level's
//! dimensions can estimate alone). The image score is the sum over levels of the Mahalanobis distances. It
//! judges the whole image and does not localise: its map is the score everywhere.
//!
//! Backbone: the paper uses EfficientNet-B4's nine levels; here the Lite0 blocks Loupe loads (0–10, strides 2
//! to 16), by default the last two. The deeper stride-32 blocks are not loaded for any method.

use crate::backbone::efficientnet_lite0::{block_configs, EfficientNetLite0, STRIDE16_BLOCK};
use crate::backbone::Backbone;
use crate::dataset::TrainingImages;
use crate::maps::ScoreMap;
use crate::methods::gaussian::{ledoit_wolf, mahalanobis, whitening_matrix};
use crate::methods::setting_docs::common;
use crate::methods::training::take_tensor;
use crate::methods::{images_to_tensor, AnomalyModel, AnomalyOutput, Family, FitContext, RecordedScores};
use crate::onnx::graph::attr_int;
use crate::onnx::{layers, Graph, Value};
use crate::progress::check_cancelled;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

method_info!(
    GaussianAd,
    GaussianAdSettings,
    name: "gaussian-ad",
    title: "Gaussian-AD",
    family: Family::Representation,
    summary: "A multivariate Gaussian of each backbone level's image-averaged features; summed Mahalanobis distances.",
    guide: "Wins when a defect changes the whole part's look (texture, colour) and only the verdict matters; does not localise. On 2 CPU cores, MTD (761 training images): fit 15 s, 79 images/s, image AUROC 0.896.",
    ranges: ["levels": 0..=10, "regularization": 0..=1000],
    docs: [
        "levels" => common("Backbone levels", "", "Backbone blocks whose image-averaged output is modelled (0–10; the default is the last two).", false),
        "regularization" => common("Covariance ε", "", "Added to each level's shrunk covariance diagonal.", true),
    ],
    smoke: ({} at 96, floors [0.9, 0.0, 0.0]),
    localises: false,
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct GaussianAdSettings {
    /// Backbone blocks modelled, ascending.
    pub levels: Vec<usize>,
    /// ε added to each shrunk covariance's diagonal.
    pub regularization: f64,
}

impl Default for GaussianAdSettings {
    fn default() -> Self {
        // The last two stride-16 blocks: chosen on label-free validation (ARCHITECTURE.md, "New methods").
        Self { levels: vec![9, 10], regularization: 0.0 }
    }
}

/// One level's Gaussian: its mean and whitening matrix (see [`crate::methods::gaussian`]).
struct LevelGaussian {
    mean: Vec<f32>,
    whitening: Vec<f32>,
}

pub struct GaussianAd {
    backbone: Arc<Backbone>,
    settings: GaussianAdSettings,
    image_size: u32,
    levels: Vec<LevelGaussian>,
}

fn check_levels(levels: &[usize]) -> Result<()> {
    if levels.is_empty() || levels.iter().any(|&l| l > STRIDE16_BLOCK) || !levels.windows(2).all(|w| w[0] < w[1]) {
        bail!("levels must be distinct blocks in 0..={STRIDE16_BLOCK}, ascending, got {levels:?}");
    }
    Ok(())
}

fn channels(level: usize) -> usize {
    block_configs()[level].out_channels
}

/// Each level's features averaged over the image: per level, `batch × channels` values.
fn pooled_levels(backbone: &Backbone, images: &Tensor, levels: &[usize]) -> Result<Vec<Vec<f32>>> {
    let maps = backbone.net.forward_taps(&EfficientNetLite0::normalize(images)?, levels)?;
    maps.iter().map(|map| Ok(map.mean((2, 3))?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?)).collect()
}

impl GaussianAd {
    pub fn fit(context: &FitContext, images: &TrainingImages, settings: GaussianAdSettings) -> Result<Self> {
        check_levels(&settings.levels)?;
        if images.len() < 2 {
            bail!("Gaussian-AD needs at least two training images, got {}", images.len());
        }
        let progress = context.progress;
        progress.begin("features", images.len() as u64);
        let mut pooled = vec![Vec::new(); settings.levels.len()];
        for batch in images.all_batches(context.batch_size) {
            check_cancelled(progress)?;
            let batch = batch?;
            let levels = pooled_levels(&context.backbone, &images_to_tensor(&batch, &context.device)?, &settings.levels)?;
            pooled.iter_mut().zip(levels).for_each(|(all, level)| all.extend(level));
            progress.advance(batch.len() as u64);
        }
        progress.begin("fitting the Gaussians", 1);
        let levels = settings
            .levels
            .iter()
            .zip(&pooled)
            .map(|(&level, vectors)| {
                let (mean, covariance) = ledoit_wolf(vectors, channels(level), settings.regularization);
                let whitening = whitening_matrix(&covariance)?;
                Ok(LevelGaussian { mean: mean.iter().map(|&m| m as f32).collect(), whitening })
            })
            .collect::<Result<Vec<_>>>()?;
        progress.advance(1);
        Ok(Self { backbone: context.backbone.clone(), settings, image_size: context.image_size, levels })
    }

    pub fn load(
        backbone: Arc<Backbone>,
        image_size: u32,
        settings: GaussianAdSettings,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        check_levels(&settings.levels)?;
        let levels = settings
            .levels
            .iter()
            .map(|&level| {
                let c = channels(level);
                let mut take = |what: &str, shape: &[usize]| -> Result<Vec<f32>> {
                    let tensor = take_tensor(&mut tensors, &format!("level{level}.{what}"), shape, &Device::Cpu)?;
                    Ok(tensor.flatten_all()?.to_vec1()?)
                };
                Ok(LevelGaussian { mean: take("mean", &[c])?, whitening: take("whitening", &[c, c])? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { backbone, settings, image_size, levels })
    }
}

impl AnomalyModel for GaussianAd {
    model_basics!();

    fn score_batch(&self, images: &Tensor) -> Result<Vec<AnomalyOutput>> {
        let pooled = pooled_levels(&self.backbone, images, &self.settings.levels)?;
        let batch = images.dim(0)?;
        let size = self.image_size as usize;
        Ok((0..batch)
            .map(|b| {
                let score: f32 = self
                    .levels
                    .iter()
                    .zip(&pooled)
                    .map(|(gaussian, vectors)| {
                        let c = gaussian.mean.len();
                        let delta: Vec<f32> =
                            vectors[b * c..(b + 1) * c].iter().zip(&gaussian.mean).map(|(x, m)| x - m).collect();
                        mahalanobis(&gaussian.whitening, &delta)
                    })
                    .sum();
                AnomalyOutput { score, map: ScoreMap::new(size, size, vec![score; size * size]) }
            })
            .collect())
    }

    fn record_onnx(&self, graph: &mut Graph, images: &Value) -> Result<RecordedScores> {
        let maps = layers::backbone_taps(graph, &self.backbone, images, &self.settings.levels)?;
        let mut total: Option<Value> = None;
        for (map, gaussian) in maps.iter().zip(&self.levels) {
            let c = gaussian.mean.len();
            let spatial = graph.ints("axes", &[2], &[2, 3]);
            let pooled = graph.op("ReduceMean", &[map, &spatial], vec![attr_int("keepdims", 0)]);
            let mean = graph.floats("mean", &[c], &gaussian.mean);
            let delta = graph.op("Sub", &[&pooled, &mean], vec![]);
            // |W·δ| with δ as a row: δ times Wᵀ.
            let transposed: Vec<f32> = (0..c * c).map(|index| gaussian.whitening[(index % c) * c + index / c]).collect();
            let whitening_t = graph.floats("whitening_t", &[c, c], &transposed);
            let whitened = graph.op("MatMul", &[&delta, &whitening_t], vec![]);
            let channels = graph.ints("axis", &[1], &[1]);
            let squared = graph.op("ReduceSumSquare", &[&whitened, &channels], vec![attr_int("keepdims", 0)]);
            let distance = graph.op("Sqrt", &[&squared], vec![]).with_shape(vec![images.shape[0]]);
            total = Some(match total {
                None => distance,
                Some(sum) => graph.op("Add", &[&sum, &distance], vec![]).with_shape(vec![images.shape[0]]),
            });
        }
        let score = total.context("Gaussian-AD has no levels")?;
        Ok(RecordedScores { map: layers::constant_map(graph, &score, self.image_size as usize), score })
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = Vec::new();
        for (&level, gaussian) in self.settings.levels.iter().zip(&self.levels) {
            let c = gaussian.mean.len();
            state.push((format!("level{level}.mean"), Tensor::from_vec(gaussian.mean.clone(), c, &Device::Cpu)?));
            let whitening = Tensor::from_vec(gaussian.whitening.clone(), (c, c), &Device::Cpu)?;
            state.push((format!("level{level}.whitening"), whitening));
        }
        Ok(state)
    }
}
