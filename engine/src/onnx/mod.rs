//! ONNX export: a trained model, its preprocessing and its decision as one self-contained file that ONNX
//! Runtime, OpenVINO and others run without Loupe or pip.
//!
//! The graph takes the camera's frames as they come (`image`: uint8 `[N, H, W, 3]`, one size per batch), resizes
//! and scales them as Loupe's decoder does, runs the method's scoring as [`AnomalyModel::record_onnx`] records
//! it, and returns the anomaly map, the image score and the verdict. The decision and review thresholds are
//! inputs whose defaults are the tuned values; the whole manifest travels in `metadata_props`.

pub mod graph;
pub mod layers;
pub mod proto;

pub use graph::{Dim, Graph, Value};

use crate::methods::AnomalyModel;
use crate::model_file::Manifest;
use anyhow::{bail, Context, Result};
use prost::Message;
use std::path::Path;

/// Metadata key holding the whole manifest as JSON.
pub const MANIFEST_KEY: &str = "loupe.manifest";
/// A protobuf message cannot exceed 2 GiB; larger weights would need ONNX external data.
const MAX_INLINE_BYTES: usize = 2_000_000_000;
/// Most bytes `read_metadata` reads from a file (an ONNX file Loupe writes is under 2 GB).
const MAX_READ_BYTES: u64 = 2_147_483_648;

/// An exported model and what the note about it reports.
pub struct Exported {
    pub bytes: Vec<u8>,
    pub nodes: usize,
    pub weight_bytes: usize,
}

/// How the exported graph takes its thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThresholdInputs {
    /// Inputs whose defaults are the tuned values: a runtime may leave them out or move them. ONNX Runtime
    /// honours both; OpenVINO folds inputs that have defaults into constants (the tuned values then apply).
    #[default]
    WithDefaults,
    /// Inputs every call must feed (the tuned values are in the metadata): for runtimes that fold defaults.
    Required,
}

/// Writes `model` (with the thresholds and everything else its `manifest` records) as an ONNX model.
pub fn export(model: &dyn AnomalyModel, manifest: &Manifest, thresholds: ThresholdInputs) -> Result<Exported> {
    let decision = manifest.thresholds.decision.context(
        "the model has no decision threshold yet: choose one (the studio's Threshold view, or `loupe eval \
         --save-threshold`) so the exported file carries the decision",
    )?;
    let review = manifest.thresholds.review.unwrap_or(decision);
    let size = model.image_size() as usize;
    let mut graph = Graph::default();
    let frames = graph.input(
        "image",
        graph::UINT8,
        &[Dim::Dynamic("N"), Dim::Dynamic("H"), Dim::Dynamic("W"), Dim::Fixed(3)],
        "RGB frames as the camera gives them, uint8 [N, H, W, 3]; one size per batch",
    );
    let decision_doc = "reject at score >= this (tuned in Loupe: the default, or loupe.decision_threshold)";
    let review_doc = "review at review_threshold <= score < decision_threshold (tuned band: the default, or \
                      loupe.review_threshold; equal to the decision when there is none)";
    let (decision_input, review_input) = match thresholds {
        ThresholdInputs::WithDefaults => (
            graph.scalar_input_with_default("decision_threshold", decision, decision_doc),
            graph.scalar_input_with_default("review_threshold", review, review_doc),
        ),
        ThresholdInputs::Required => (
            graph.input("decision_threshold", graph::FLOAT, &[], decision_doc),
            graph.input("review_threshold", graph::FLOAT, &[], review_doc),
        ),
    };
    let images = layers::camera_to_input(&mut graph, &frames, size);
    let recorded = model.record_onnx(&mut graph, &images)?;
    let verdict = layers::verdict(&mut graph, &recorded.score, &decision_input, &review_input);
    let channel_axis = graph.ints("channel_axis", &[1], &[1]);
    let map = graph.op("Squeeze", &[&recorded.map, &channel_axis], vec![]);
    let batch = || Dim::Dynamic("N");
    graph.output(
        &map,
        "anomaly_map",
        graph::FLOAT,
        &[batch(), Dim::Fixed(size), Dim::Fixed(size)],
        "higher is more anomalous; model input size, blurred as in Loupe",
    );
    graph.output(&recorded.score, "score", graph::FLOAT, &[batch()], "image score (the map's maximum)");
    graph.output(&verdict, "verdict", graph::INT64, &[batch()], "0 pass, 1 review, 2 reject");
    if graph.weight_bytes > MAX_INLINE_BYTES {
        bail!(
            "the model's weights take {} MB, above the 2 GB an ONNX file holds inline; writing them as external \
             data is not done yet",
            graph.weight_bytes / 1_000_000
        );
    }
    let weight_bytes = graph.weight_bytes;
    let onnx = graph.into_model(&manifest.method, &manifest.loupe_version, metadata(manifest)?);
    let nodes = onnx.graph.as_ref().map_or(0, |g| g.node.len());
    Ok(Exported { bytes: onnx.encode_to_vec(), nodes, weight_bytes })
}

/// The manifest as `metadata_props`: whole (JSON, [`MANIFEST_KEY`]) and the fields a line reads most, flat.
fn metadata(manifest: &Manifest) -> Result<Vec<(String, String)>> {
    let thresholds = &manifest.thresholds;
    let optional = |value: Option<f32>| value.map_or(String::new(), |v| v.to_string());
    Ok(vec![
        (MANIFEST_KEY.into(), serde_json::to_string(manifest)?),
        ("loupe.method".into(), manifest.method.clone()),
        ("loupe.decision_threshold".into(), optional(thresholds.decision)),
        // The review input's value when there is no band (the tuned review threshold otherwise).
        ("loupe.review_threshold".into(), optional(thresholds.review.or(thresholds.decision))),
        ("loupe.threshold_rule".into(), thresholds.rule.clone()),
        ("loupe.image_size".into(), manifest.image_size.to_string()),
        ("loupe.backbone_weights_sha256".into(), manifest.backbone_weights_sha256.clone()),
        ("loupe.version".into(), manifest.loupe_version.clone()),
        ("loupe.verdicts".into(), "0 pass, 1 review, 2 reject".into()),
    ])
}

/// The `metadata_props` of an ONNX file, for `loupe export --show`.
pub fn read_metadata(path: &Path) -> Result<Vec<(String, String)>> {
    let size = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?.len();
    if size > MAX_READ_BYTES {
        bail!("{}: {} bytes, larger than an ONNX file Loupe reads", path.display(), size);
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let model = proto::ModelProto::decode(bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("{}: not an ONNX model ({e})", path.display()))?;
    Ok(model.metadata_props.into_iter().map(|entry| (entry.key, entry.value)).collect())
}
