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
pub mod triton;

pub use graph::{Dim, Graph, Value};

use crate::atomic_file::{write_atomic, write_atomic_with};
use crate::methods::AnomalyModel;
use crate::model_file::Manifest;
use anyhow::{bail, Context, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Metadata key holding the whole manifest as JSON.
pub const MANIFEST_KEY: &str = "loupe.manifest";
/// A protobuf message cannot exceed 2 GiB: above this many bytes of weights they go to an external data file.
const MAX_INLINE_BYTES: usize = 2_000_000_000;
/// Initializers smaller than this stay inside the `.onnx` file when the weights go external (shapes, axes,
/// scalars: what a reader wants without a second file), as `onnx.external_data_helper` does.
const EXTERNAL_MIN_TENSOR_BYTES: usize = 1024;
/// Each external tensor starts at a multiple of this, so a runtime may map the file instead of copying it.
const EXTERNAL_ALIGNMENT: u64 = 4096;
/// Most bytes `read_metadata` reads from a file (an ONNX file Loupe writes is under 2 GB).
const MAX_READ_BYTES: u64 = 2_147_483_648;

/// An exported model, ready to write, and what the note about it reports.
pub struct Exported {
    model: proto::ModelProto,
    pub nodes: usize,
    pub weight_bytes: usize,
}

/// Where an export puts the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightPlacement {
    /// Inside the `.onnx` file, unless they exceed what one protobuf holds (2 GB): then as [`Self::External`].
    #[default]
    Auto,
    /// In an external data file beside the model (`<file>.data`, the ONNX external data convention), which
    /// some toolchains prefer for large models.
    External,
}

/// The files an export wrote.
pub struct WrittenFiles {
    pub model_bytes: u64,
    /// The external data file and its size, when the weights went there.
    pub external_data: Option<(PathBuf, u64)>,
}

impl WrittenFiles {
    pub fn total_bytes(&self) -> u64 {
        self.model_bytes + self.external_data.as_ref().map_or(0, |(_, size)| *size)
    }
}

impl Exported {
    /// Writes the model to `path`, and its weights to `<path>.data` when `placement` (or their size) says so.
    /// Each file is written atomically, the data file first, so a `.onnx` never names data that is not there.
    pub fn write(mut self, path: &Path, placement: WeightPlacement) -> Result<WrittenFiles> {
        let file_name = path.file_name().context("the ONNX file needs a file name")?.to_string_lossy();
        let data_name = format!("{file_name}.data");
        let data_path = path.with_file_name(&data_name);
        let external = placement == WeightPlacement::External || self.weight_bytes > MAX_INLINE_BYTES;
        let external_data = if external {
            let graph = self.model.graph.as_mut().expect("an exported model has a graph");
            let size = write_external_data(&mut graph.initializer, &data_path, &data_name)?;
            Some((data_path.clone(), size))
        } else {
            None
        };
        let bytes = self.model.encode_to_vec();
        write_atomic(path, &bytes)?;
        if external_data.is_none() {
            // A data file left by an earlier external export of this path would only mislead.
            let _ = std::fs::remove_file(&data_path);
        }
        Ok(WrittenFiles { model_bytes: bytes.len() as u64, external_data })
    }

    /// The model as one protobuf, weights inline (tests and in-memory use).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.model.encode_to_vec()
    }
}

/// Moves every initializer of at least [`EXTERNAL_MIN_TENSOR_BYTES`] into the file at `data_path`, which the
/// model names by `location` (relative to the model's folder); returns the file's size.
fn write_external_data(initializers: &mut [proto::TensorProto], data_path: &Path, location: &str) -> Result<u64> {
    let mut offset = 0u64;
    write_atomic_with(data_path, |file| {
        for tensor in initializers.iter_mut().filter(|t| t.raw_data.len() >= EXTERNAL_MIN_TENSOR_BYTES) {
            let padding = offset.next_multiple_of(EXTERNAL_ALIGNMENT) - offset;
            file.write_all(&vec![0u8; padding as usize])?;
            offset += padding;
            let length = tensor.raw_data.len() as u64;
            file.write_all(&tensor.raw_data)?;
            let entry = |key: &str, value: String| proto::StringStringEntryProto { key: key.into(), value };
            tensor.external_data = vec![
                entry("location", location.into()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ];
            tensor.data_location = proto::DATA_LOCATION_EXTERNAL;
            tensor.raw_data = Vec::new();
            offset += length;
        }
        Ok(())
    })
    .with_context(|| format!("{}: cannot write the external weights", data_path.display()))?;
    Ok(offset)
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
    /// No inputs: the tuned values are constants of the graph. For servers that batch requests (Triton), where
    /// every input needs the batch dimension and a per-call scalar has none.
    Constants,
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
        ThresholdInputs::Constants => {
            (graph.scalar("decision_threshold", decision), graph.scalar("review_threshold", review))
        }
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
    let weight_bytes = graph.weight_bytes;
    let onnx = graph.into_model(&manifest.method, &manifest.loupe_version, metadata(manifest)?);
    let nodes = onnx.graph.as_ref().map_or(0, |g| g.node.len());
    Ok(Exported { model: onnx, nodes, weight_bytes })
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
        // A tiled model's graph scores one view (a tile): the line cuts, stitches and decides (README,
        // "High-resolution parts").
        ("loupe.geometry".into(), serde_json::to_string(&manifest.geometry)?),
        ("loupe.geometry_use".into(), geometry_use(&manifest.geometry)),
    ])
}

/// How a runtime feeds the graph for the model's geometry.
fn geometry_use(geometry: &crate::geometry::InputGeometry) -> String {
    if geometry.is_whole_image() {
        return "feed whole frames; score and verdict are the image's".into();
    }
    format!(
        "{}: feed each view (crop) of a frame as one image; stitch the anomaly maps (cross-fade over the overlap), \
         the image score is the stitched map's maximum inside the region, and the verdict is that score against \
         loupe.decision_threshold — the graph's own score and verdict outputs are per view",
        geometry.describe()
    )
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
