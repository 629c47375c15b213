//! Exporting the active model (Loupe file, ONNX, bundle) and the project's report, with the thresholds of the
//! moment.

use super::*;

impl StudioApp {
    pub(super) fn export_model(&mut self, path: PathBuf) {
        let studio = &self.studio;
        let Some(index) = studio.project.active_model else { return };
        let entry = &studio.project.models[index];
        let runtime = &studio.runtimes[index];
        match (&runtime.model, &runtime.manifest) {
            (Some(model), Some(manifest)) => {
                self.saver.save_model(path, model.clone(), manifest.clone(), entry.clone());
            }
            _ => self.error("the model is still loading; export it when it is ready"),
        }
    }

    /// The active model and its manifest with the thresholds the project holds now, or why there is none yet.
    pub(super) fn active_model_as_tuned(&mut self) -> Option<(std::sync::Arc<dyn AnomalyModel>, Manifest)> {
        let studio = &self.studio;
        let index = studio.project.active_model?;
        let entry = &studio.project.models[index];
        let runtime = &studio.runtimes[index];
        let (Some(model), Some(mut manifest)) = (runtime.model.clone(), runtime.manifest.clone()) else {
            self.error("the model is still loading; export it when it is ready");
            return None;
        };
        (manifest.thresholds.decision, manifest.thresholds.review) = (entry.decision, entry.review);
        Some((model, manifest))
    }

    /// Writes the active model as ONNX with the thresholds the project holds now (a job: a large memory bank
    /// takes seconds).
    pub fn start_onnx_export(&mut self, ctx: &egui::Context, path: PathBuf) {
        let Some((model, manifest)) = self.active_model_as_tuned() else { return };
        self.spawn_job(ctx, "Exporting to ONNX", move |progress| {
            progress.begin("recording the graph", 0);
            let exported = loupe_engine::onnx::export(model.as_ref(), &manifest, Default::default())?;
            let written = exported.write(&path, Default::default())?;
            Ok(JobOutput::Reported(format!(
                "exported {} ({:.1} MB): uint8 frames in; anomaly map, score and verdict out",
                path.display(),
                written.total_bytes() as f64 / 1e6
            )))
        });
    }

    /// Writes the active model with its backbone weights inside (a Loupe bundle) and the thresholds of the moment.
    pub fn start_bundle_export(&mut self, ctx: &egui::Context, path: PathBuf) {
        let Some((model, manifest)) = self.active_model_as_tuned() else { return };
        let weights = self.weights.clone();
        self.spawn_job(ctx, "Exporting a Loupe bundle", move |progress| {
            progress.begin("writing the model and its backbone weights", 0);
            let backbone_weights = loupe_engine::backbone::weights::read_weights(&weights)?;
            loupe_engine::model_file::save_bundle(&path, model.as_ref(), &manifest, &backbone_weights)?;
            Ok(JobOutput::Reported(format!(
                "exported {}: `loupe infer --model` runs it on a machine without the backbone weights",
                path.display()
            )))
        });
    }

    /// Writes the active model's report (one HTML file, see `crate::report`) with the thresholds of the moment.
    pub fn start_report_export(&mut self, ctx: &egui::Context, path: PathBuf) {
        let project = self.studio.project.clone();
        let dir = self.studio.dir();
        let (backbones, weights) = (self.backbones.clone(), self.weights.clone());
        self.spawn_job(ctx, "Writing the report", move |progress| {
            let device: DeviceChoice = project.training.device.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let backbone = backbones.get(device, &weights, progress)?;
            let open_model = |file: &std::path::Path| loupe_engine::model_file::load(file, backbone.clone());
            let bytes = crate::report::write(&project, &dir, None, (&open_model, &backbone.device), &path, progress)?;
            Ok(JobOutput::Reported(format!(
                "wrote the report {} ({:.0} kB): one file that opens in any browser, offline",
                path.display(),
                bytes as f64 / 1e3
            )))
        });
    }
}
