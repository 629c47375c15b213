//! An NVIDIA Triton Inference Server model repository from the ONNX export: `REPO/<name>/config.pbtxt` (ONNX
//! Runtime backend, dynamic batching) and `REPO/<name>/1/model.onnx`.
//!
//! Triton batches requests along the first dimension of every input and output, so the export for it takes
//! its thresholds as graph constants ([`ThresholdInputs::Constants`]): a per-call scalar input has no batch
//! dimension. The config is protobuf text written from a template: it is a dozen fixed lines whose only
//! variables are names and sizes, and `tests/triton_repository.py` parses it with Triton's own `ModelConfig`
//! message (the `tritonclient` package) to prove it well-formed.

use super::{export, ThresholdInputs, WeightPlacement, WrittenFiles};
use crate::atomic_file::write_atomic;
use crate::methods::AnomalyModel;
use crate::model_file::Manifest;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct TritonOptions {
    /// The model's name in the repository (its folder).
    pub name: String,
    /// Largest batch Triton's dynamic batcher forms.
    pub max_batch_size: usize,
    /// How long the batcher waits for more requests to fill a batch.
    pub max_queue_delay_us: u64,
}

/// The written repository entry.
pub struct TritonModel {
    pub folder: PathBuf,
    pub config: PathBuf,
    pub onnx: WrittenFiles,
}

/// A Triton model name from a file stem: letters, digits, `-`, `_` and `.` kept, anything else `_`.
pub fn model_name(stem: &str) -> String {
    let name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if name.trim_matches('.').is_empty() {
        "loupe_model".into()
    } else {
        name
    }
}

/// Writes `model` as a Triton model repository entry under `repository`.
pub fn write_repository(
    model: &dyn AnomalyModel,
    manifest: &Manifest,
    repository: &Path,
    options: &TritonOptions,
) -> Result<TritonModel> {
    if options.name != model_name(&options.name) || options.name.starts_with('.') {
        bail!("`{}` cannot name a Triton model (letters, digits, '-', '_' and '.' only)", options.name);
    }
    if options.max_batch_size == 0 {
        bail!("the maximum batch size must be at least 1");
    }
    let exported = export(model, manifest, ThresholdInputs::Constants)?;
    let folder = repository.join(&options.name);
    let version = folder.join("1");
    std::fs::create_dir_all(&version).with_context(|| format!("{}: cannot create", version.display()))?;
    let onnx = exported.write(&version.join("model.onnx"), WeightPlacement::Auto)?;
    let config = folder.join("config.pbtxt");
    write_atomic(&config, config_text(manifest, model.image_size() as usize, options).as_bytes())?;
    Ok(TritonModel { folder, config, onnx })
}

fn config_text(manifest: &Manifest, map_size: usize, options: &TritonOptions) -> String {
    let decision = manifest.thresholds.decision.unwrap_or(f32::NAN);
    let band = match manifest.thresholds.review {
        Some(review) if review < decision => format!("review at {review} <= score < {decision}"),
        _ => "no review band".into(),
    };
    format!(
        r#"# Written by Loupe {version} from a {method} model. The thresholds are constants of the graph, as tuned in
# Loupe: reject at score >= {decision}, {band}; verdict 0 pass, 1 review, 2 reject.
# Requests batch together when their frames have the same height and width.
name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [
  {{
    name: "image"
    data_type: TYPE_UINT8
    dims: [ -1, -1, 3 ]
  }}
]
output [
  {{
    name: "anomaly_map"
    data_type: TYPE_FP32
    dims: [ {map_size}, {map_size} ]
  }},
  {{
    name: "score"
    data_type: TYPE_FP32
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }},
  {{
    name: "verdict"
    data_type: TYPE_INT64
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {delay}
}}
"#,
        version = manifest.loupe_version,
        method = manifest.method,
        name = options.name,
        max_batch = options.max_batch_size,
        delay = options.max_queue_delay_us,
    )
}

#[cfg(test)]
mod tests {
    use super::model_name;

    #[test]
    fn model_names_keep_only_what_triton_accepts() {
        assert_eq!(model_name("padim-mtd_v2.1"), "padim-mtd_v2.1");
        assert_eq!(model_name("line 3/padim"), "line_3_padim");
        assert_eq!(model_name(".."), "loupe_model");
    }
}
