//! Threshold view: the score histograms of good and defective test images with the decision threshold (drag it
//! in the plot or on the slider) and an optional review band; FAR, MAR, the confusion matrix, pass / review /
//! reject counts and the point on the ROC curve follow live — each recomputed by binary search over scores
//! sorted once, so a drag costs microseconds even for 100,000 images. The ground truth is the folders' (MVTec or
//! Folder layout) or the labeller's own verdicts; the agreement between model and labeller is drawn per threshold.

use super::{percent, Action, StudioView, ViewContext, ViewFrame};
use crate::project::verdict::{agreement, agreement_curve, band_counts};
use crate::studio::Studio;
use eframe::egui;
use egui_plot::{Bar, BarChart, Line, Plot, Points, VLine};
use loupe_engine::metrics::{roc_curve, ThresholdTable};

const BINS: usize = 40;

/// Whose word says which test images are defective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroundTruth {
    /// The benchmark folders' layout (test/<type>, Folder layout's abnormal folder).
    Folders,
    /// The labeller's verdicts on the images that did not train.
    YourLabels,
}

pub struct ThresholdState {
    pub target_far: f64,
    pub target_mar: f64,
    pub ground_truth: GroundTruth,
    /// (active model, number of scores, ground truth) the cached curve belongs to.
    cached_for: Option<(usize, usize, GroundTruth)>,
    roc: Vec<[f64; 2]>,
}

impl Default for ThresholdState {
    fn default() -> Self {
        Self {
            target_far: 0.01,
            target_mar: 0.05,
            ground_truth: GroundTruth::Folders,
            cached_for: None,
            roc: Vec::new(),
        }
    }
}

fn has_both_classes(table: &ThresholdTable) -> bool {
    !table.normal_scores().is_empty() && !table.anomalous_scores().is_empty()
}

/// The ground-truth choice, and the table of the chosen one.
fn ground_truth_bar(
    ui: &mut egui::Ui,
    studio: &Studio,
    model_index: usize,
    state: &mut ThresholdState,
    context: &ViewContext,
    actions: &mut Vec<Action>,
) -> std::sync::Arc<ThresholdTable> {
    let runtime = &studio.runtimes[model_index];
    let (folders, labels) = (&runtime.table, &runtime.labels_table);
    if !has_both_classes(labels) || (state.ground_truth == GroundTruth::Folders && !has_both_classes(folders)) {
        state.ground_truth = if has_both_classes(labels) { GroundTruth::YourLabels } else { GroundTruth::Folders };
    }
    ui.horizontal_wrapped(|ui| {
        ui.label("Ground truth");
        ui.add_enabled_ui(has_both_classes(folders), |ui| {
            ui.selectable_value(&mut state.ground_truth, GroundTruth::Folders, "benchmark folders")
                .on_disabled_hover_text("no benchmark folder with good and defective test images");
        });
        let text = format!(
            "your labels ({} good, {} defective)",
            labels.normal_scores().len(),
            labels.anomalous_scores().len()
        );
        ui.add_enabled_ui(has_both_classes(labels), |ui| {
            ui.selectable_value(&mut state.ground_truth, GroundTruth::YourLabels, text)
                .on_disabled_hover_text("label good and defective test images in the inspector, then re-evaluate");
        });
        let idle = context.job.is_none();
        if ui.add_enabled(idle, egui::Button::new("Re-evaluate with your labels")).clicked() {
            actions.push(Action::Reevaluate);
        }
    });
    match state.ground_truth {
        GroundTruth::Folders => folders.clone(),
        GroundTruth::YourLabels => labels.clone(),
    }
}

/// The text the view shows for FAR, MAR and the confusion counts at `threshold` — also what the tests read back.
pub fn rate_labels(table: &ThresholdTable, threshold: f32) -> [String; 6] {
    let c = table.confusion(threshold);
    [
        format!(
            "FAR {} ({} of {} good parts rejected)",
            percent(c.far()),
            c.false_positive,
            c.false_positive + c.true_negative
        ),
        format!(
            "MAR {} ({} of {} defects passed)",
            percent(c.mar()),
            c.false_negative,
            c.false_negative + c.true_positive
        ),
        format!("true rejects (TP) {}", c.true_positive),
        format!("false alarms (FP) {}", c.false_positive),
        format!("true passes (TN) {}", c.true_negative),
        format!("misses (FN) {}", c.false_negative),
    ]
}

fn histogram(scores: &[f32], lo: f32, width: f32, name: &str, colour: egui::Color32) -> BarChart {
    let mut counts = vec![0usize; BINS];
    for &s in scores {
        let bin = (((s - lo) / width).floor().max(0.0) as usize).min(BINS - 1);
        counts[bin] += 1;
    }
    let bars = counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            Bar::new((lo + (i as f32 + 0.5) * width) as f64, n as f64)
                .width(width as f64 * 0.95)
                .fill(colour.gamma_multiply(0.6))
        })
        .collect();
    BarChart::new(name, bars).color(colour)
}

impl StudioView for ThresholdState {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut ViewFrame<'_>) {
        show(ui, frame.studio, self, frame.context, frame.actions);
    }
}

fn show(
    ui: &mut egui::Ui,
    studio: &mut Studio,
    state: &mut ThresholdState,
    context: &ViewContext,
    actions: &mut Vec<Action>,
) {
    let Some(model_index) = studio.project.active_model else {
        ui.label("No model yet: train one (open Train) to choose its threshold.");
        return;
    };
    let table = ground_truth_bar(ui, studio, model_index, state, context, actions);
    let (normal, anomalous) = (table.normal_scores(), table.anomalous_scores());
    if normal.is_empty() || anomalous.is_empty() {
        ui.label(
            "The threshold panel needs scored good and defective test images: import a benchmark folder and train, \
             or label test images good and defective in the inspector.",
        );
        return;
    }
    let key = (model_index, normal.len() + anomalous.len(), state.ground_truth);
    if state.cached_for != Some(key) {
        let scores: Vec<f32> = normal.iter().chain(anomalous).copied().collect();
        let labels: Vec<bool> = normal.iter().map(|_| false).chain(anomalous.iter().map(|_| true)).collect();
        state.roc = roc_curve(&scores, &labels)
            .map(|c| c.fpr.into_iter().zip(c.tpr).map(|(x, y)| [x, y]).collect())
            .unwrap_or_default();
        state.cached_for = Some(key);
    }
    let lo = normal[0].min(anomalous[0]);
    let hi = normal[normal.len() - 1].max(anomalous[anomalous.len() - 1]);
    let span = (hi - lo).max(1e-6);
    let (slider_lo, slider_hi) = (lo - 0.02 * span, hi + 0.02 * span);
    let entry = studio.project.models[model_index].clone();
    // Without a chosen threshold the view proposes the middle of the scores; it becomes the model's only when the
    // user moves it or presses a button (opening the view chooses nothing).
    let proposal = (lo + hi) / 2.0;
    let mut decision = entry.decision.unwrap_or(proposal);
    let mut review = entry.review;
    // Sliders that clamp and round every frame would report a change nobody made (a stored threshold is shown
    // as it is; the user's edits are rounded and clamped).
    const EDITS_ONLY: egui::SliderClamping = egui::SliderClamping::Edits;
    // Set by the user's own actions only.
    let mut moved = false;
    if entry.decision.is_none() {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            "No threshold chosen yet: the one shown is a proposal (the middle of the scores). Drag it or press a \
             button to choose it.",
        );
    }

    ui.horizontal_wrapped(|ui| {
        let mut far_percent = state.target_far * 100.0;
        if ui.button("Threshold for FAR ≤").clicked() {
            if let Some(t) = table.threshold_for_far(state.target_far) {
                decision = t;
                moved = true;
            }
        }
        if ui.add(egui::DragValue::new(&mut far_percent).range(0.0..=100.0).speed(0.1).suffix(" %")).changed() {
            state.target_far = far_percent / 100.0;
        }
        ui.separator();
        let mut mar_percent = state.target_mar * 100.0;
        if ui.button("Threshold for MAR ≤").clicked() {
            if let Some(t) = table.threshold_for_mar(state.target_mar) {
                decision = t;
                moved = true;
            }
        }
        if ui.add(egui::DragValue::new(&mut mar_percent).range(0.0..=100.0).speed(0.1).suffix(" %")).changed() {
            state.target_mar = mar_percent / 100.0;
        }
        ui.separator();
        if ui.button("F1-max").clicked() {
            if let Some((t, _)) = table.f1_max() {
                decision = t;
                moved = true;
            }
        }
    });
    ui.spacing_mut().slider_width = (ui.available_width() - 260.0).clamp(160.0, 900.0);
    moved |= ui
        .add(
            egui::Slider::new(&mut decision, slider_lo..=slider_hi)
                .text("Decision threshold")
                .max_decimals(4)
                .clamping(EDITS_ONLY),
        )
        .changed();
    ui.horizontal(|ui| {
        let mut band = review.is_some();
        if ui.checkbox(&mut band, "Review band").changed() {
            review = band.then_some(decision - 0.1 * span);
            moved = true;
        }
        if let Some(r) = review.as_mut() {
            moved |= ui
                .add(
                    egui::Slider::new(r, slider_lo..=decision)
                        .text("Review threshold")
                        .max_decimals(4)
                        .clamping(EDITS_ONLY),
                )
                .changed();
        }
    });

    let width = span / BINS as f32 * (1.0 + 1e-4);
    let plot = Plot::new("score histogram")
        .height(220.0)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .x_axis_label("image score")
        .y_axis_label("images")
        .legend(egui_plot::Legend::default())
        .show(ui, |plot| {
            plot.bar_chart(histogram(normal, lo, width, "good", egui::Color32::from_rgb(60, 160, 90)));
            plot.bar_chart(histogram(anomalous, lo, width, "defective", egui::Color32::from_rgb(210, 70, 60)));
            plot.vline(VLine::new("decision threshold", decision as f64).color(egui::Color32::WHITE).width(2.0));
            if let Some(r) = review {
                plot.vline(
                    VLine::new("review threshold", r as f64).color(egui::Color32::from_rgb(230, 180, 30)).width(1.5),
                );
            }
        });
    // Dragging (or clicking) in the histogram moves the decision threshold to the pointer.
    if plot.response.dragged() || plot.response.clicked() {
        if let Some(pointer) = plot.response.interact_pointer_pos() {
            decision = (plot.transform.value_from_position(pointer).x as f32).clamp(slider_lo, slider_hi);
            moved = true;
        }
    }
    // Only the user's own move chooses (and keeps the review threshold at or below the decision): a proposal
    // shown under a review threshold from the fit must not become the model's by being clamped against.
    if moved {
        if let Some(r) = review.as_mut() {
            *r = r.min(decision);
        }
        let model = &mut studio.project.models[model_index];
        model.decision = Some(decision);
        model.review = review;
        studio.changed();
    }

    let confusion = table.confusion(decision);
    let labels = rate_labels(&table, decision);
    ui.columns(2, |columns| {
        let ui = &mut columns[0];
        ui.heading(&labels[0]);
        ui.heading(&labels[1]);
        egui::Grid::new("confusion").num_columns(3).striped(true).show(ui, |ui| {
            ui.label("");
            ui.strong("rejected");
            ui.strong("passed");
            ui.end_row();
            ui.strong("defective");
            ui.label(&labels[2]);
            ui.label(&labels[5]);
            ui.end_row();
            ui.strong("good");
            ui.label(&labels[3]);
            ui.label(&labels[4]);
            ui.end_row();
        });
        let bands = band_counts(&table, decision, review);
        ui.label(format!("pass {} · review {} · reject {}", bands.pass, bands.review, bands.reject));
        ui.label(format!("F1 at this threshold {:.3}", confusion.f1()));
        let labelled: Vec<_> = studio
            .images
            .iter()
            .filter_map(|image| {
                let verdict = studio.project.labels.get(&image.label_key)?.verdict?;
                Some((studio.score_of(image)?, verdict))
            })
            .collect();
        match agreement(labelled.iter().copied(), decision) {
            (_, 0) => {
                ui.label("Agreement with your labels: no labelled image has a score yet (label in the inspector).")
            }
            (agreeing, counted) => ui.label(format!(
                "Agreement with your labels {} ({agreeing} of {counted} labelled images)",
                percent(Some(agreeing as f64 / counted as f64))
            )),
        };
        let answers = studio.project.labels.values().filter_map(|label| label.review);
        let accepted = answers.clone().filter(|a| *a == loupe_engine::labels::ReviewAnswer::Accepted).count();
        let rejected = answers.count() - accepted;
        if accepted + rejected > 0 {
            ui.label(format!("In review you accepted {accepted} and rejected {rejected} of the model's verdicts"));
        }
        let ui = &mut columns[1];
        let point = [confusion.far().unwrap_or(0.0), 1.0 - confusion.mar().unwrap_or(0.0)];
        Plot::new("roc")
            .height(220.0)
            .include_x(0.0)
            .include_x(1.0)
            .include_y(0.0)
            .include_y(1.0)
            .allow_drag(false)
            .allow_zoom(false)
            .allow_scroll(false)
            .x_axis_label("FAR (false-positive rate)")
            .y_axis_label("1 − MAR (true-positive rate)")
            .show(ui, |plot| {
                plot.line(Line::new("ROC", state.roc.clone()).allow_band(false));
                plot.points(Points::new("this threshold", vec![point]).radius(5.0).color(egui::Color32::WHITE));
            });
        let curve = agreement_curve(labelled.iter().copied());
        if !curve.is_empty() {
            Plot::new("agreement")
                .height(140.0)
                .include_y(0.0)
                .include_y(1.0)
                .allow_drag(false)
                .allow_zoom(false)
                .allow_scroll(false)
                .x_axis_label("decision threshold")
                .y_axis_label("agreement")
                .show(ui, |plot| {
                    plot.line(Line::new("agreement with your labels", curve).allow_band(false));
                    plot.vline(VLine::new("decision threshold", decision as f64).color(egui::Color32::WHITE));
                });
        }
    });
}
