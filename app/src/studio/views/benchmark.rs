//! Benchmark view: per category, one row per trained model (image AUROC, pixel AUROC, AUPRO@0.3, F1-max, FAR/MAR
//! at its threshold, fit time, throughput) so methods compare side by side; per defect type below; the active
//! model's worst false alarms and worst misses open in the inspector with one click. The category "your labels"
//! judges the models against the labeller's verdicts, defect types and masks.

use super::{metric, percent, Action, StudioView, ViewContext, ViewFrame};
use crate::project::sources::Split;
use crate::studio::workspace::{labelled_test_set, YOUR_LABELS};
use crate::studio::Studio;
use eframe::egui;
use loupe_engine::dataset::GOOD;
use loupe_engine::evaluate::EvalReport;
use loupe_engine::metrics::Confusion;
use std::collections::BTreeSet;

const WORST: usize = 6;

/// Whether the labels changed (verdicts, types, images) since `report` was evaluated on them.
fn labels_changed_since(studio: &Studio, report: &EvalReport) -> bool {
    let (records, _) = labelled_test_set(&studio.dir(), &studio.project.labels, &studio.images);
    let now: BTreeSet<(String, &str)> =
        records.iter().map(|r| (r.path.display().to_string(), r.label.type_name())).collect();
    let then: BTreeSet<(String, &str)> =
        report.images.iter().map(|i| (i.path.clone(), i.defect_type.as_str())).collect();
    now.len() != then.len() + report.skipped.len() || !then.is_subset(&now)
}

fn your_labels_note(ui: &mut egui::Ui, studio: &Studio, context: &ViewContext, actions: &mut Vec<Action>) {
    ui.horizontal_wrapped(|ui| {
        let changed = studio
            .project
            .active()
            .and_then(|e| e.evaluations.get(YOUR_LABELS))
            .map(|report| labels_changed_since(studio, report));
        let note = match changed {
            Some(true) => "Your labels changed since this evaluation.",
            Some(false) => {
                "Judged against your verdicts, first defect types and masks (unsure and training images left out)."
            }
            None => {
                "Label test images good and defective in the inspector to judge the models against your own labels."
            }
        };
        ui.label(note);
        let enabled = context.job.is_none() && studio.project.active_model.is_some();
        if ui.add_enabled(enabled, egui::Button::new("Re-evaluate with your labels")).clicked() {
            actions.push(Action::Reevaluate);
        }
    });
}

/// The Benchmark view (no state of its own).
pub struct BenchmarkView;

impl StudioView for BenchmarkView {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut ViewFrame<'_>) {
        show(ui, frame.studio, frame.context, frame.actions);
    }
}

fn show(ui: &mut egui::Ui, studio: &mut Studio, context: &ViewContext, actions: &mut Vec<Action>) {
    let categories: BTreeSet<String> =
        studio.project.models.iter().flat_map(|m| m.evaluations.keys().cloned()).collect();
    if categories.is_empty() {
        ui.label("Nothing evaluated yet: import a benchmark folder (MVTec or Folder layout) and train a model.");
        your_labels_note(ui, studio, context, actions);
        return;
    }
    egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
        if !categories.contains(YOUR_LABELS) {
            your_labels_note(ui, studio, context, actions);
        }
        for category in &categories {
            ui.heading(category);
            if category == YOUR_LABELS {
                your_labels_note(ui, studio, context, actions);
            }
            egui::Grid::new(("models", category)).num_columns(10).striped(true).show(ui, |ui| {
                for title in [
                    "model",
                    "image AUROC",
                    "pixel AUROC",
                    "AUPRO@0.3",
                    "F1-max",
                    "threshold",
                    "FAR",
                    "MAR",
                    "fit",
                    "images/s",
                ] {
                    ui.strong(title);
                }
                ui.end_row();
                for entry in &studio.project.models {
                    let Some(report) = entry.evaluations.get(category) else { continue };
                    // FAR/MAR at the threshold chosen in the studio, which may differ from the one at evaluation.
                    let confusion = entry.decision.map(|t| confusion_at(report, t));
                    ui.label(&entry.name);
                    ui.label(format!("{:.3}", report.image_auroc));
                    ui.label(metric(report.pixel_auroc));
                    ui.label(metric(report.aupro));
                    ui.label(format!("{:.3}", report.f1_max));
                    ui.label(entry.decision.map(|t| format!("{t:.4}")).unwrap_or_else(|| "—".into()));
                    ui.label(percent(confusion.and_then(|c| c.far())));
                    ui.label(percent(confusion.and_then(|c| c.mar())));
                    ui.label(format!("{:.1} s", entry.fit_seconds));
                    ui.label(format!("{:.1}", report.test_images_per_s));
                    ui.end_row();
                }
            });
            egui::CollapsingHeader::new("per defect type").id_salt(("types", category)).default_open(true).show(
                ui,
                |ui| {
                    egui::Grid::new(("types grid", category)).num_columns(6).striped(true).show(ui, |ui| {
                        for title in ["model", "defect type", "images", "image AUROC", "pixel AUROC", "AUPRO@0.3"] {
                            ui.strong(title);
                        }
                        ui.end_row();
                        for entry in &studio.project.models {
                            let Some(report) = entry.evaluations.get(category) else { continue };
                            for (defect_type, per_type) in &report.per_defect_type {
                                ui.label(&entry.name);
                                ui.label(defect_type);
                                ui.label(per_type.images.to_string());
                                ui.label(metric(per_type.image_auroc));
                                ui.label(metric(per_type.pixel_auroc));
                                ui.label(metric(per_type.aupro));
                                ui.end_row();
                            }
                        }
                    });
                },
            );
            ui.separator();
        }
        worst_cases(ui, studio, actions);
    });
}

/// The confusion of one category's images at `threshold` (one pass, no sorting: this runs every frame).
fn confusion_at(report: &EvalReport, threshold: f32) -> Confusion {
    let mut confusion = Confusion::default();
    for image in &report.images {
        match (image.defect_type != GOOD, image.score >= threshold) {
            (true, true) => confusion.true_positive += 1,
            (true, false) => confusion.false_negative += 1,
            (false, true) => confusion.false_positive += 1,
            (false, false) => confusion.true_negative += 1,
        }
    }
    confusion
}

/// The active model's highest-scoring good images and lowest-scoring defective ones.
fn worst_cases(ui: &mut egui::Ui, studio: &Studio, actions: &mut Vec<Action>) {
    let Some(entry) = studio.project.active() else { return };
    ui.heading(format!("Worst cases of {}", entry.name));
    let scored: Vec<(usize, f32, bool)> = studio
        .images
        .iter()
        .enumerate()
        .filter(|(_, image)| image.split == Split::Test)
        .filter_map(|(i, image)| studio.score_of(image).map(|s| (i, s, image.label.is_anomalous())))
        .collect();
    let mut false_alarms: Vec<_> = scored.iter().filter(|s| !s.2).collect();
    false_alarms.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut misses: Vec<_> = scored.iter().filter(|s| s.2).collect();
    misses.sort_by(|a, b| a.1.total_cmp(&b.1));
    ui.columns(2, |columns| {
        let lists = [
            ("Worst false alarms (good, highest scores)", &false_alarms),
            ("Worst misses (defective, lowest scores)", &misses),
        ];
        for (ui, (title, list)) in columns.iter_mut().zip(lists) {
            ui.strong(title);
            for &&(index, score, _) in list.iter().take(WORST) {
                let image = &studio.images[index];
                let text = format!("{score:.4}  {}  ({})", image.file_name(), image.label.type_name());
                if ui.link(text).on_hover_text("open in the inspector").clicked() {
                    actions.push(Action::Inspect(index));
                }
            }
        }
    });
}
