//! Gallery: every image as a thumbnail with its score badge and verdict under the active model's thresholds;
//! sorted by score or name, filtered by label, verdict, defect type and split. Click opens the inspector.

use super::{Action, StudioView, ViewFrame};
use crate::project::sources::Split;
use crate::project::verdict::{verdict, Verdict};
use crate::studio::thumbnails::{ThumbnailState, Thumbnails};
use crate::studio::Studio;
use eframe::egui;

const CELL: f32 = 132.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    #[default]
    Name,
    ScoreHighFirst,
    ScoreLowFirst,
    /// Images without the labeller's verdict first, the most suspicious (highest score) first among them.
    Triage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelFilter {
    #[default]
    All,
    Good,
    Defect,
}

#[derive(Default)]
pub struct GalleryState {
    pub sort: SortOrder,
    pub label: LabelFilter,
    pub verdict: Option<Verdict>,
    pub defect_type: Option<String>,
    pub split: Option<Split>,
}

impl GalleryState {
    /// The images shown, in display order (the inspector steps through the same order).
    pub fn order(&self, studio: &Studio) -> Vec<usize> {
        let thresholds = studio.thresholds();
        let mut shown: Vec<(usize, Option<f32>)> = studio
            .images
            .iter()
            .enumerate()
            .filter(|(_, image)| match self.label {
                LabelFilter::All => true,
                LabelFilter::Good => image.split != Split::Inspect && !image.label.is_anomalous(),
                LabelFilter::Defect => image.label.is_anomalous(),
            })
            .filter(|(_, image)| self.defect_type.as_deref().is_none_or(|t| image.label.type_name() == t))
            .filter(|(_, image)| self.split.is_none_or(|s| image.split == s))
            .map(|(index, image)| (index, studio.score_of(image)))
            .filter(|(_, score)| match (self.verdict, score, thresholds) {
                (None, _, _) => true,
                (Some(wanted), Some(score), Some((decision, review))) => verdict(*score, decision, review) == wanted,
                _ => false,
            })
            .collect();
        let by_score = |a: &Option<f32>, b: &Option<f32>| {
            a.unwrap_or(f32::NEG_INFINITY).total_cmp(&b.unwrap_or(f32::NEG_INFINITY))
        };
        match self.sort {
            SortOrder::Name => shown.sort_by(|a, b| studio.images[a.0].path.cmp(&studio.images[b.0].path)),
            SortOrder::ScoreHighFirst => shown.sort_by(|a, b| by_score(&b.1, &a.1)),
            SortOrder::ScoreLowFirst => shown.sort_by(|a, b| by_score(&a.1, &b.1)),
            SortOrder::Triage => {
                let labelled = |index: usize| studio.label_of(index).and_then(|l| l.verdict).is_some();
                shown.sort_by(|a, b| labelled(a.0).cmp(&labelled(b.0)).then_with(|| by_score(&b.1, &a.1)));
            }
        }
        shown.into_iter().map(|(index, _)| index).collect()
    }
}

pub fn verdict_colour(verdict: Verdict) -> egui::Color32 {
    match verdict {
        Verdict::Pass => egui::Color32::from_rgb(40, 150, 70),
        Verdict::Review => egui::Color32::from_rgb(200, 150, 20),
        Verdict::Reject => egui::Color32::from_rgb(200, 50, 40),
    }
}

fn filters(ui: &mut egui::Ui, studio: &Studio, state: &mut GalleryState) {
    ui.horizontal_wrapped(|ui| {
        egui::ComboBox::from_label("order")
            .selected_text(match state.sort {
                SortOrder::Name => "name",
                SortOrder::ScoreHighFirst => "score, highest first",
                SortOrder::ScoreLowFirst => "score, lowest first",
                SortOrder::Triage => "unlabelled, most suspicious first",
            })
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut state.sort, SortOrder::Name, "name");
                ui.selectable_value(&mut state.sort, SortOrder::ScoreHighFirst, "score, highest first");
                ui.selectable_value(&mut state.sort, SortOrder::ScoreLowFirst, "score, lowest first");
                ui.selectable_value(&mut state.sort, SortOrder::Triage, "unlabelled, most suspicious first");
            });
        ui.separator();
        ui.label("Label");
        ui.selectable_value(&mut state.label, LabelFilter::All, "all");
        ui.selectable_value(&mut state.label, LabelFilter::Good, "good");
        ui.selectable_value(&mut state.label, LabelFilter::Defect, "defect");
        ui.separator();
        ui.label("Verdict");
        ui.selectable_value(&mut state.verdict, None, "all");
        for v in Verdict::ALL {
            ui.selectable_value(&mut state.verdict, Some(v), v.name());
        }
        ui.separator();
        let mut types: Vec<&str> =
            studio.images.iter().filter(|i| i.label.is_anomalous()).map(|i| i.label.type_name()).collect();
        types.sort_unstable();
        types.dedup();
        egui::ComboBox::from_label("defect type")
            .selected_text(state.defect_type.clone().unwrap_or_else(|| "all defect types".into()))
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut state.defect_type, None, "all defect types");
                for t in types {
                    ui.selectable_value(&mut state.defect_type, Some(t.to_string()), t);
                }
            });
        ui.separator();
        ui.selectable_value(&mut state.split, None, "all images");
        ui.selectable_value(&mut state.split, Some(Split::Train), "train");
        ui.selectable_value(&mut state.split, Some(Split::Test), "test");
        if studio.images.iter().any(|i| i.split == Split::Inspect) {
            ui.selectable_value(&mut state.split, Some(Split::Inspect), "to inspect");
        }
    });
}

/// The Gallery view: its sort and filters are the frame's `browse` (the inspector follows the same order).
pub struct GalleryView;

impl StudioView for GalleryView {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut ViewFrame<'_>) {
        show(ui, frame.studio, frame.browse, frame.thumbnails, frame.actions);
    }
}

fn show(
    ui: &mut egui::Ui,
    studio: &mut Studio,
    state: &mut GalleryState,
    thumbnails: &mut Thumbnails,
    actions: &mut Vec<Action>,
) {
    filters(ui, studio, state);
    ui.separator();
    let order = state.order(studio);
    if order.is_empty() {
        ui.label(if studio.images.is_empty() {
            "No images yet: use Import to add a folder."
        } else {
            "No image matches these filters."
        });
        return;
    }
    let thresholds = studio.thresholds();
    let spacing = ui.spacing().item_spacing.x;
    // Leave room for the scroll bar.
    let columns = (((ui.available_width() - 16.0 + spacing) / (CELL + spacing)).floor() as usize).max(1);
    let rows = order.len().div_ceil(columns);
    egui::ScrollArea::vertical().auto_shrink([false, false]).show_rows(ui, CELL + 34.0, rows, |ui, visible| {
        for row in visible {
            ui.horizontal(|ui| {
                for &index in order.iter().skip(row * columns).take(columns) {
                    let image = &studio.images[index];
                    let score = studio.score_of(image);
                    let selected = studio.selected == Some(index);
                    let thumbnail = thumbnails.get(ui.ctx(), index, image);
                    ui.vertical(|ui| {
                        ui.set_width(CELL);
                        let button = match thumbnail {
                            ThumbnailState::Ready(texture) => {
                                let size = texture.size_vec2() * (CELL - 12.0) / texture.size_vec2().max_elem();
                                egui::Button::image(egui::Image::new((texture.id(), size)))
                            }
                            ThumbnailState::Loading => {
                                egui::Button::new("…").min_size(egui::vec2(CELL - 4.0, CELL - 4.0))
                            }
                            ThumbnailState::Failed(_) => {
                                egui::Button::new("cannot read").min_size(egui::vec2(CELL - 4.0, CELL - 4.0))
                            }
                        };
                        let hover = match thumbnail {
                            ThumbnailState::Failed(reason) => format!("{}: {reason}", image.path.display()),
                            _ => image.path.display().to_string(),
                        };
                        let response = ui.add(button.selected(selected)).on_hover_text(hover);
                        if response.clicked() {
                            actions.push(Action::Inspect(index));
                        }
                        let label = image.folder_truth();
                        let labelled = studio.label_of(index).and_then(|l| l.verdict);
                        ui.horizontal(|ui| {
                            ui.label(egui::RichText::new(image.file_name()).small());
                            if let Some(verdict) = labelled {
                                ui.label(egui::RichText::new(format!("labelled {}", verdict.name())).small().strong());
                            }
                        });
                        ui.horizontal(|ui| {
                            ui.label(egui::RichText::new(label).small().weak());
                            if let Some(score) = score {
                                let (text, colour) = match thresholds {
                                    Some((decision, review)) => {
                                        let v = verdict(score, decision, review);
                                        (format!("{score:.2} {}", v.name()), verdict_colour(v))
                                    }
                                    None => (format!("{score:.2}"), ui.visuals().weak_text_color()),
                                };
                                ui.label(
                                    egui::RichText::new(text)
                                        .small()
                                        .color(egui::Color32::WHITE)
                                        .background_color(colour),
                                );
                            }
                        });
                    });
                }
            });
        }
    });
}
