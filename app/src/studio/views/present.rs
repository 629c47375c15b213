//! Presentation mode: the window full screen for a projector — the part large with its heatmap beside it (or
//! over it), the verdict and score in large type, the threshold's FAR and MAR as two big numbers, ←/→ through a
//! playlist (worst misses, worst false alarms, one defect type, random good parts, the pinned images), and a
//! second model's heatmap beside the first on the same colour scale. F5 enters (or Project ▸ Present), Esc leaves.

use super::inspector::{overlay_key, paint_image, ready_image};
use super::{Action, StudioView, ViewFrame};
use crate::project::sources::Split;
use crate::project::verdict::verdict;
use crate::studio::image_loader::ImageLoader;
use crate::studio::widgets::heatmap::{paint_overlay, Colormap, OverlayData, OverlayStyle};
use crate::studio::workspace::ModelRuntime;
use crate::studio::Studio;
use eframe::egui;
use loupe_engine::rng::SplitMix64;

/// Random good parts shown at most, drawn with a fixed seed so a rehearsed talk shows the same ones.
const RANDOM_GOOD: usize = 12;
/// Images in the worst-misses and worst-false-alarms lists at most.
const WORST: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Playlist {
    /// Defective test images the threshold passes, lowest score first.
    WorstMisses,
    /// Good test images the threshold rejects, highest score first.
    WorstFalseAlarms,
    /// The test images of one defect type, highest score first.
    DefectType(String),
    RandomGood,
    /// The images pinned in the inspector, in pinning order.
    Pinned,
}

impl Playlist {
    fn title(&self) -> String {
        match self {
            Playlist::WorstMisses => "Worst misses".into(),
            Playlist::WorstFalseAlarms => "Worst false alarms".into(),
            Playlist::DefectType(name) => format!("Defect type: {name}"),
            Playlist::RandomGood => "Random good parts".into(),
            Playlist::Pinned => "Pinned images".into(),
        }
    }
}

pub struct PresentState {
    pub playlist: Playlist,
    pub position: usize,
    /// The heatmap drawn over the part instead of beside it.
    pub overlay: bool,
    /// A second model shown beside the active one (index into the project's models).
    pub compare_with: Option<usize>,
    /// The model last asked to load for the comparison: asked once, not every frame.
    requested: Option<usize>,
    /// The first frame chose a playlist with something in it.
    opened: bool,
}

impl Default for PresentState {
    fn default() -> Self {
        Self {
            playlist: Playlist::WorstMisses,
            position: 0,
            overlay: false,
            compare_with: None,
            requested: None,
            opened: false,
        }
    }
}

/// The images of `playlist` under the active model's scores and threshold, as indices into `studio.images`.
pub fn playlist_images(studio: &Studio, playlist: &Playlist) -> Vec<usize> {
    let tested = |defective: bool| {
        studio
            .images
            .iter()
            .enumerate()
            .filter(move |(_, image)| image.split == Split::Test && image.label.is_anomalous() == defective)
    };
    let scored = |images: Vec<(usize, f32)>, highest_first: bool| {
        let mut images = images;
        images.sort_by(|a, b| if highest_first { b.1.total_cmp(&a.1) } else { a.1.total_cmp(&b.1) });
        images.into_iter().map(|(index, _)| index).collect::<Vec<_>>()
    };
    let score = |index: usize| studio.score_of(&studio.images[index]);
    let decision = studio.thresholds().map(|(decision, _)| decision);
    match playlist {
        Playlist::WorstMisses | Playlist::WorstFalseAlarms => {
            let Some(decision) = decision else { return Vec::new() };
            let misses = *playlist == Playlist::WorstMisses;
            let wrong = tested(misses)
                .filter_map(|(i, _)| score(i).map(|s| (i, s)))
                .filter(|&(_, s)| (s >= decision) != misses)
                .collect();
            let mut list = scored(wrong, !misses);
            list.truncate(WORST);
            list
        }
        Playlist::DefectType(name) => {
            let of_type = tested(true).filter(|(_, image)| image.label.type_name() == name);
            scored(of_type.map(|(i, _)| (i, score(i).unwrap_or(f32::NEG_INFINITY))).collect(), true)
        }
        Playlist::RandomGood => {
            let mut good: Vec<usize> = tested(false).map(|(i, _)| i).collect();
            let mut rng = SplitMix64::new(7);
            for i in (1..good.len()).rev() {
                good.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            good.truncate(RANDOM_GOOD);
            good
        }
        Playlist::Pinned => studio
            .project
            .pinned
            .iter()
            .filter_map(|key| studio.images.iter().position(|image| &image.label_key == key))
            .collect(),
    }
}

fn defect_types(studio: &Studio) -> Vec<String> {
    let mut types: Vec<String> = studio
        .images
        .iter()
        .filter(|i| i.split == Split::Test && i.label.is_anomalous())
        .map(|i| i.label.type_name().to_string())
        .collect();
    types.sort();
    types.dedup();
    types
}

/// The small row a presenter uses before starting: which playlist, which model to compare with.
fn chooser(ui: &mut egui::Ui, studio: &Studio, state: &mut PresentState) {
    ui.horizontal_wrapped(|ui| {
        let mut lists = vec![Playlist::WorstMisses, Playlist::WorstFalseAlarms];
        lists.extend(defect_types(studio).into_iter().map(Playlist::DefectType));
        lists.extend([Playlist::RandomGood, Playlist::Pinned]);
        for list in lists {
            let chosen = state.playlist == list;
            if ui.selectable_label(chosen, list.title()).clicked() && !chosen {
                state.playlist = list;
                state.position = 0;
            }
        }
        ui.separator();
        let names: Vec<(usize, String)> = studio
            .project
            .models
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != studio.project.active_model)
            .map(|(i, m)| (i, m.name.clone()))
            .collect();
        let selected = state.compare_with.and_then(|c| names.iter().find(|(i, _)| *i == c)).map(|(_, n)| n.clone());
        egui::ComboBox::from_label("compare with")
            .selected_text(selected.unwrap_or_else(|| "no second model".into()))
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut state.compare_with, None, "no second model");
                for (index, name) in names {
                    ui.selectable_value(&mut state.compare_with, Some(index), name);
                }
            });
        ui.checkbox(&mut state.overlay, "heatmap over the part (H)");
    });
}

/// A figure in large type (`size` points at 1080p) over its caption.
fn big_number(ui: &mut egui::Ui, (value, size): (&str, f32), caption: &str, colour: egui::Color32, scale: f32) {
    ui.vertical(|ui| {
        ui.label(egui::RichText::new(value).size(size * scale).strong().color(colour));
        ui.label(egui::RichText::new(caption).size(21.0 * scale).weak());
    });
}

/// The colour scale a heatmap is drawn with: each model's own threshold in the middle of the colormap, and the
/// bottom of its map range as far below as the top is above — so two models' colours say the same thing
/// ("as far past its threshold") though their scores are on different scales.
fn relative_style(runtime: &ModelRuntime, threshold: Option<f32>, map: &loupe_engine::maps::ScoreMap) -> OverlayStyle {
    let (low, high) = runtime.map_range.unwrap_or((map.data.iter().copied().fold(f32::INFINITY, f32::min), map.max()));
    let range = match threshold {
        Some(t) if t.is_finite() && t > low => (low, 2.0 * t - low),
        _ => (low, high.max(low + f32::EPSILON)),
    };
    OverlayStyle {
        threshold: threshold.unwrap_or(f32::NEG_INFINITY),
        range,
        opacity: 0.6,
        colormap: Colormap::Jet,
        contour: threshold.is_some(),
        mask_outline: false,
        hide_below_threshold: false,
    }
}

impl StudioView for PresentState {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut ViewFrame<'_>) {
        show(ui, frame.studio, self, frame.loader, frame.context.gpu_overlay, frame.actions);
    }
}

fn show(
    ui: &mut egui::Ui,
    studio: &mut Studio,
    state: &mut PresentState,
    loader: &mut ImageLoader,
    gpu_overlay: bool,
    actions: &mut Vec<Action>,
) {
    // Type scales with the window (in points: a hi-DPI 4K screen at 2 pixels per point is 1920 × 1080 points),
    // so it reads the same from the back of a room at 1080p and at 4K.
    let scale = (ui.available_width() / 1920.0).min(ui.available_height() / 1040.0).clamp(0.6, 2.0);
    if ui.input(|i| i.key_pressed(egui::Key::H)) {
        state.overlay = !state.overlay;
    }
    chooser(ui, studio, state);
    let scored = studio.active_runtime().is_some_and(|runtime| !runtime.scores.is_empty());
    if !state.opened && scored && !studio.images.is_empty() {
        // Open on the first playlist with something to show (a good model may miss nothing).
        state.opened = true;
        let first_type = defect_types(studio).into_iter().next().map(Playlist::DefectType);
        let candidates = [Some(Playlist::WorstMisses), Some(Playlist::WorstFalseAlarms), first_type];
        if let Some(list) = candidates.into_iter().flatten().find(|l| !playlist_images(studio, l).is_empty()) {
            state.playlist = list;
        }
    }
    let list = playlist_images(studio, &state.playlist);
    let step = ui.input(|i| i.key_pressed(egui::Key::ArrowRight) as i32 - i.key_pressed(egui::Key::ArrowLeft) as i32);
    if !list.is_empty() {
        state.position = (state.position as i32 + step).clamp(0, list.len() as i32 - 1) as usize;
    }
    let Some(&index) = list.get(state.position) else {
        let why = match (&state.playlist, studio.thresholds()) {
            (_, None) if studio.project.models.is_empty() => "No model yet: train one first.",
            (Playlist::WorstMisses | Playlist::WorstFalseAlarms, None) => "The model has no decision threshold yet.",
            (Playlist::WorstMisses, _) => "No defect is missed at this threshold.",
            (Playlist::WorstFalseAlarms, _) => "No good part is rejected at this threshold.",
            (Playlist::Pinned, _) => "No image pinned: pin images in the inspector (Pin for presenting).",
            _ => "No image in this playlist.",
        };
        ui.centered_and_justified(|ui| ui.label(egui::RichText::new(why).size(32.0 * scale)));
        return;
    };
    let image = studio.images[index].clone();
    let compare = state.compare_with.filter(|&i| i < studio.runtimes.len() && Some(i) != studio.project.active_model);
    if let Some(other) = compare.filter(|&other| state.requested != Some(other)) {
        state.requested = Some(other);
        if studio.runtimes[other].model.is_none() {
            actions.push(Action::LoadModel(other));
        }
    }
    egui::Panel::right("present-figures").exact_size(420.0 * scale).show(ui, |ui| {
        figures(ui, studio, &image, (state.position, list.len(), &state.playlist), compare, scale);
    });
    let (view, _) = ui.allocate_exact_size(ui.available_size(), egui::Sense::hover());
    let Some(loaded) = ready_image(ui, view, loader, &image.path, None) else { return };
    // Panes: the part, then one heatmap per model shown (or the heatmap over the part).
    let mut models: Vec<usize> = studio.project.active_model.into_iter().collect();
    models.extend(compare);
    let panes = if state.overlay { models.len().max(1) } else { models.len() + 1 };
    let width = view.width() / panes as f32;
    let image_size = egui::vec2(loaded.size[0] as f32, loaded.size[1] as f32);
    for pane_index in 0..panes {
        let pane = egui::Rect::from_min_size(
            view.min + egui::vec2(width * pane_index as f32, 0.0),
            egui::vec2(width, view.height()),
        )
        .shrink(6.0 * scale);
        let caption_height = 34.0 * scale;
        let picture = egui::Rect::from_min_max(pane.min, pane.max - egui::vec2(0.0, caption_height));
        let fit = (picture.width() / image_size.x).min(picture.height() / image_size.y);
        let whole = egui::Rect::from_center_size(picture.center(), image_size * fit);
        let painter = ui.painter_at(pane);
        let Some((visible, uv)) = paint_image(&painter, picture, whole, loaded) else { continue };
        let model = match state.overlay {
            true => models.get(pane_index).copied(),
            false => pane_index.checked_sub(1).and_then(|m| models.get(m).copied()),
        };
        let caption = match model {
            None => format!("{} · {}", image.file_name(), image.folder_truth()),
            Some(m) => studio.project.models[m].name.clone(),
        };
        painter.text(
            egui::pos2(pane.center().x, pane.max.y - caption_height / 2.0),
            egui::Align2::CENTER_CENTER,
            caption,
            egui::FontId::proportional(22.0 * scale),
            ui.visuals().strong_text_color(),
        );
        let Some(model) = model else { continue };
        let runtime = &studio.runtimes[model];
        let Some(map) = runtime.maps.get(&image.id).cloned() else {
            let note =
                if runtime.model.is_none() { "loading this model's heatmaps…" } else { "no heatmap for this image" };
            painter.text(
                visible.center(),
                egui::Align2::CENTER_CENTER,
                note,
                egui::FontId::proportional(20.0 * scale),
                egui::Color32::WHITE,
            );
            continue;
        };
        if gpu_overlay {
            let entry = &studio.project.models[model];
            let style = relative_style(runtime, entry.decision, &map);
            let data = OverlayData { key: overlay_key(Some(&entry.file), image.id), map, mask: None };
            paint_overlay(&painter, visible, uv, &data, &style);
        }
    }
}

/// The right column: verdict and score in large type, then FAR and MAR at the threshold, the playlist position.
fn figures(
    ui: &mut egui::Ui,
    studio: &Studio,
    image: &crate::studio::workspace::StudioImage,
    (position, count, playlist): (usize, usize, &Playlist),
    compare: Option<usize>,
    scale: f32,
) {
    ui.add_space(12.0 * scale);
    ui.label(egui::RichText::new(playlist.title()).size(26.0 * scale).strong());
    ui.label(egui::RichText::new(format!("{} of {count}", position + 1)).size(20.0 * scale).weak());
    ui.add_space(20.0 * scale);
    let mut models: Vec<usize> = studio.project.active_model.into_iter().collect();
    models.extend(compare);
    for model in models {
        let entry = &studio.project.models[model];
        let runtime = &studio.runtimes[model];
        ui.label(egui::RichText::new(&entry.name).size(22.0 * scale));
        let score = runtime.scores.get(&image.id).copied();
        match (score, entry.decision) {
            (Some(score), Some(decision)) => {
                let v = verdict(score, decision, entry.review);
                let colour = super::gallery::verdict_colour(v);
                big_number(
                    ui,
                    (&v.name().to_uppercase(), 60.0),
                    &format!("score {score:.3} · threshold {decision:.3}"),
                    colour,
                    scale,
                );
            }
            (Some(score), None) => big_number(
                ui,
                (&format!("{score:.3}"), 60.0),
                "score (no threshold yet)",
                ui.visuals().text_color(),
                scale,
            ),
            (None, _) => {
                ui.label(egui::RichText::new("not scored").size(28.0 * scale).weak());
            }
        }
        if let Some(decision) = entry.decision {
            let confusion = runtime.table.confusion(decision);
            ui.horizontal(|ui| {
                big_number(
                    ui,
                    (&super::percent(confusion.far()), 44.0),
                    "FAR: good parts rejected",
                    egui::Color32::from_rgb(220, 70, 60),
                    scale,
                );
                ui.add_space(24.0 * scale);
                big_number(
                    ui,
                    (&super::percent(confusion.mar()), 44.0),
                    "MAR: defects passed",
                    egui::Color32::from_rgb(235, 140, 30),
                    scale,
                );
            });
        }
        ui.add_space(24.0 * scale);
    }
    ui.with_layout(egui::Layout::bottom_up(egui::Align::Min), |ui| {
        ui.label(
            egui::RichText::new("Left / right arrow: next image · H: heatmap over or beside · Esc: leave")
                .size(16.0 * scale)
                .weak(),
        );
        ui.label(
            egui::RichText::new("Colours: each model's threshold is the middle (green) of the scale")
                .size(16.0 * scale)
                .weak(),
        );
    });
}
