//! The menu bar, the file dialogs it opens (on their own threads: rfd blocks until answered) and what their
//! answers start; folders dropped on the window.

use super::*;

pub(super) const INSPECT_HINT: &str = "New parts: scored by the active model and labelled by you, never trained on";

pub(super) enum DialogResult {
    OpenProject(PathBuf),
    NewProject(PathBuf),
    SaveAs(PathBuf),
    ImportNormal(PathBuf),
    ImportBenchmark(PathBuf),
    ImportToInspect(PathBuf),
    ImportLabelme(PathBuf),
    ExportLabels(PathBuf),
    ExportModel(PathBuf),
    ExportOnnx(PathBuf),
    ExportBundle(PathBuf),
    ExportReport(PathBuf),
}

impl StudioApp {
    pub(super) fn spawn_dialog(&self, make: impl FnOnce() -> Option<DialogResult> + Send + 'static) {
        let sender = self.dialogs.0.clone();
        // rfd's dialogs block their thread until the user answers: never the UI thread.
        std::thread::spawn(move || {
            if let Some(result) = make() {
                let _ = sender.send(result);
            }
        });
    }

    pub(super) fn handle_dialogs(&mut self, ctx: &egui::Context) {
        while let Ok(result) = self.dialogs.1.try_recv() {
            match result {
                DialogResult::OpenProject(path) => match Project::load(&path) {
                    Ok(project) => self.open_project(ctx, project, path),
                    Err(error) => self.error(format!("{error:#} — the file was left untouched")),
                },
                DialogResult::NewProject(path) => {
                    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    let project = Project::new(&name);
                    match project.save(&path) {
                        Ok(()) => self.open_project(ctx, project, path),
                        Err(error) => self.error(format!("{error:#}")),
                    }
                }
                DialogResult::SaveAs(path) => self.save_as(path),
                DialogResult::ImportNormal(path) => self.add_source(ctx, Source::NormalFolder(path)),
                DialogResult::ImportBenchmark(path) => self.add_folder(ctx, path),
                DialogResult::ImportToInspect(path) => self.add_source(ctx, Source::Inspect(path)),
                DialogResult::ImportLabelme(folder) => self.start_labelme_import(ctx, folder),
                DialogResult::ExportLabels(folder) => self.start_labels_export(ctx, folder),
                DialogResult::ExportModel(path) => self.export_model(path),
                DialogResult::ExportOnnx(path) => self.start_onnx_export(ctx, path),
                DialogResult::ExportBundle(path) => self.start_bundle_export(ctx, path),
                DialogResult::ExportReport(path) => self.start_report_export(ctx, path),
            }
        }
    }

    pub(super) fn menu_bar(&mut self, ui: &mut egui::Ui) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("Project", |ui| {
                if ui.button("New…").clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe project", &["ron"])
                            .set_file_name("project.ron")
                            .save_file()
                            .map(DialogResult::NewProject)
                    });
                }
                if ui.button("Open…").clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe project", &["ron"])
                            .pick_file()
                            .map(DialogResult::OpenProject)
                    });
                }
                if ui.button("Save").clicked() {
                    self.flush_save();
                }
                if ui.button("Save as…").clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe project", &["ron"])
                            .save_file()
                            .map(DialogResult::SaveAs)
                    });
                }
                let has_model = self.studio.project.active_model.is_some();
                if ui.button("Present (F5)").on_hover_text("Full screen for a projector; Esc returns").clicked() {
                    self.present(ui.ctx(), true);
                }
                let export_report = egui::Button::new("Export report…");
                if ui
                    .add_enabled(has_model, export_report)
                    .on_hover_text(
                        "One HTML file for people without Loupe: what was trained on what, the thresholds and what \
                         they cost, ROC and score plots, the worst misses and false alarms with heatmaps",
                    )
                    .clicked()
                {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("HTML report", &["html"])
                            .set_file_name("report.html")
                            .save_file()
                            .map(DialogResult::ExportReport)
                    });
                }
                ui.separator();
                if ui.button("Open the demo project").clicked() {
                    match demo::ensure_demo_project().and_then(|p| Ok((Project::load(&p)?, p))) {
                        Ok((project, path)) => self.open_project(ui.ctx(), project, path),
                        Err(error) => self.error(format!("{error:#}")),
                    }
                }
            });
            ui.menu_button("Import", |ui| {
                if ui.button("Folder of good images…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportNormal));
                }
                if ui.button("Benchmark folder (MVTec layout)…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportBenchmark));
                }
                if ui.button("Folder of images to inspect…").on_hover_text(INSPECT_HINT).clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportToInspect));
                }
                ui.separator();
                ui.label("or type a folder path:");
                ui.text_edit_singleline(&mut self.path_input);
                let typed = PathBuf::from(self.path_input.trim());
                if ui.button("Import this folder").clicked() && !self.path_input.trim().is_empty() {
                    self.add_folder(ui.ctx(), typed);
                } else if ui.button("Import it as images to inspect").on_hover_text(INSPECT_HINT).clicked()
                    && !self.path_input.trim().is_empty()
                {
                    if typed.is_dir() {
                        self.add_source(ui.ctx(), Source::Inspect(typed));
                    } else {
                        self.error(format!("{}: not a folder", typed.display()));
                    }
                }
                ui.label("Folders can also be dropped on the window.");
            });
            ui.menu_button("Labels", |ui| {
                if ui.button("Import labelme files (a folder of .json)…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ImportLabelme));
                }
                if ui.button("Export labelled images (MVTec layout)…").clicked() {
                    self.spawn_dialog(|| rfd::FileDialog::new().pick_folder().map(DialogResult::ExportLabels));
                }
            });
            ui.menu_button("Model", |ui| {
                let has_model = self.studio.project.active_model.is_some();
                if ui.add_enabled(has_model, egui::Button::new("Export the active model…")).clicked() {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe model", &["safetensors"])
                            .save_file()
                            .map(DialogResult::ExportModel)
                    });
                }
                let export_onnx = egui::Button::new("Export the active model as ONNX…");
                if ui
                    .add_enabled(has_model, export_onnx)
                    .on_hover_text(
                        "One file that ONNX Runtime, OpenVINO and others run without Loupe: backbone weights, resize \
                         and the decision thresholds inside",
                    )
                    .clicked()
                {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("ONNX model", &["onnx"])
                            .save_file()
                            .map(DialogResult::ExportOnnx)
                    });
                }
                let export_bundle = egui::Button::new("Export the active model for a line PC (Loupe bundle)…");
                if ui
                    .add_enabled(has_model, export_bundle)
                    .on_hover_text(
                        "The model file with the backbone weights inside: `loupe infer` runs it where the weights \
                         were never fetched",
                    )
                    .clicked()
                {
                    self.spawn_dialog(|| {
                        rfd::FileDialog::new()
                            .add_filter("Loupe model", &["safetensors"])
                            .set_file_name("model.bundle.safetensors")
                            .save_file()
                            .map(DialogResult::ExportBundle)
                    });
                }
            });
            ui.separator();
            for view in View::ALL {
                ui.selectable_value(&mut self.view, view, view.title());
            }
        });
    }

    pub(super) fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        for path in dropped {
            if path.is_dir() {
                self.add_folder(ctx, path);
            } else if path.extension().is_some_and(|e| e == "ron") {
                self.dialogs.0.send(DialogResult::OpenProject(path)).ok();
            } else {
                self.error(format!("{}: drop a folder of images or a .ron project", path.display()));
            }
        }
    }
}
