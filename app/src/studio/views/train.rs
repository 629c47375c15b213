//! Train view: the methods grouped by the survey's five families (only what the engine registered), their
//! settings with the engine's defaults, the device, and the running job's progress, ETA, curve and cancel.

use super::{format_duration, Action, StudioView, ViewContext, ViewFrame};
use crate::studio::Studio;
use eframe::egui;
use egui_plot::{Line, Plot};
use loupe_engine::device::DeviceChoice;
use loupe_engine::geometry::{InputGeometry, Layout, Region, MAX_TILE, MIN_TILE};
use loupe_engine::methods::setting_docs;
use loupe_engine::methods::{find_method, Family, MethodInfo, REGISTRY};

/// The Train view (no state of its own: the choices live in the project).
pub struct TrainView;

impl StudioView for TrainView {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut ViewFrame<'_>) {
        show(ui, frame.studio, frame.context, frame.actions);
    }
}

fn show(ui: &mut egui::Ui, studio: &mut Studio, context: &ViewContext, actions: &mut Vec<Action>) {
    ui.columns(2, |columns| {
        method_list(&mut columns[0], studio);
        settings(&mut columns[1], studio, context, actions);
    });
    ui.separator();
    if let Some(job) = &context.job {
        progress(ui, job, actions);
    }
}

fn method_list(ui: &mut egui::Ui, studio: &mut Studio) {
    ui.heading("Method");
    for family in Family::ALL {
        ui.add_space(4.0);
        ui.strong(family.title());
        let members: Vec<_> = REGISTRY.iter().filter(|m| m.family == family).collect();
        if members.is_empty() {
            ui.label(egui::RichText::new("  no method of this family in this build yet").weak());
        }
        for method in members {
            let chosen = studio.project.training.method == method.name;
            if ui.selectable_label(chosen, format!("  {}", method.title)).on_hover_text(method.summary).clicked()
                && !chosen
            {
                studio.project.training.method = method.name.to_string();
                studio.project.training.settings_json = "{}".into();
                studio.changed();
            }
        }
    }
}

/// The method in two lines: what it models, then when it wins and its measured CPU cost.
fn describe(ui: &mut egui::Ui, method: &MethodInfo) {
    ui.label(egui::RichText::new(format!("{} ({})", method.title, method.family.title())).strong());
    ui.label(method.summary);
    ui.label(egui::RichText::new(method.guide).weak());
    ui.add_space(4.0);
}

/// One editor per setting the method declares, pre-filled with its default (or the project's choice).
fn settings_editor(ui: &mut egui::Ui, studio: &mut Studio) {
    let Ok(method) = find_method(&studio.project.training.method) else {
        ui.colored_label(ui.visuals().error_fg_color, format!("unknown method “{}”", studio.project.training.method));
        return;
    };
    let mut settings = (method.default_settings)();
    let overrides: serde_json::Value = serde_json::from_str(&studio.project.training.settings_json).unwrap_or_default();
    if let Ok(merged) = loupe_engine::methods::merge_settings(settings.clone(), &overrides) {
        settings = merged;
    }
    let Some(object) = settings.as_object_mut() else { return };
    let mut changed = false;
    describe(ui, method);
    if !method.presets.is_empty() {
        ui.horizontal(|ui| {
            ui.label("preset");
            if ui
                .button("CPU default")
                .on_hover_text("finishes on an MVTec-sized set within minutes on a CPU")
                .clicked()
            {
                studio.project.training.settings_json = "{}".into();
                studio.changed();
            }
            for preset in method.presets {
                if ui.button(preset.name).on_hover_text(preset.about).clicked() {
                    studio.project.training.settings_json = (preset.settings)().to_string();
                    studio.changed();
                }
            }
        });
    }
    // Common settings first; the advanced ones (worth changing only with a reason) folded away.
    let is_advanced = |key: &str| setting_docs::doc(method.name, key).is_some_and(|d| d.advanced);
    egui::Grid::new("settings").num_columns(3).striped(true).show(ui, |ui| {
        for (key, value) in object.iter_mut().filter(|(key, _)| !is_advanced(key)) {
            changed |= setting_row(ui, method, key, value);
        }
    });
    egui::CollapsingHeader::new("Advanced").id_salt("advanced settings").show(ui, |ui| {
        egui::Grid::new("advanced settings grid").num_columns(3).striped(true).show(ui, |ui| {
            for (key, value) in object.iter_mut().filter(|(key, _)| is_advanced(key)) {
                changed |= setting_row(ui, method, key, value);
            }
        });
    });
    // What training would refuse, said before the button is pressed (a project file may hold anything).
    if let Err(error) = method.settings_with(&settings) {
        ui.colored_label(ui.visuals().error_fg_color, format!("{error:#}"));
    }
    if changed {
        studio.project.training.settings_json = settings.to_string();
        studio.changed();
    }
}

/// One setting: its label in words (help, unit, range, paper value and key on hover), its editor, its unit.
/// Returns whether the value changed.
fn setting_row(ui: &mut egui::Ui, method: &MethodInfo, key: &str, value: &mut serde_json::Value) -> bool {
    let range = method.range_of(key);
    let doc = setting_docs::doc(method.name, key);
    let mut hover = doc.map(|d| d.help.to_string()).unwrap_or_default();
    if let Some(unit) = doc.map(|d| d.unit).filter(|u| !u.is_empty()) {
        hover.push_str(&format!("\nunit: {unit}"));
    }
    if let Some(range) = range {
        hover.push_str(&format!("\nallowed: {}", range.describe()));
    }
    if let Some(paper) = doc.and_then(|d| d.paper) {
        hover.push_str(&format!("\npaper: {paper}"));
    }
    hover.push_str(&format!("\nsetting: {key}"));
    let label = ui.label(doc.map_or(key, |d| d.label)).on_hover_text(hover.trim_start());
    let (min, max) = range.map_or((f64::MIN, f64::MAX), |r| (r.min, r.max));
    let mut changed = false;
    let editor = match value {
        serde_json::Value::Number(number) => {
            let mut v = number.as_f64().unwrap_or_default();
            let (speed, decimals) = if number.is_f64() { (0.001, 6) } else { (1.0, 0) };
            let response = ui.add(egui::DragValue::new(&mut v).speed(speed).max_decimals(decimals).range(min..=max));
            if response.changed() {
                // Integer settings are non-negative; `as` saturates at u64::MAX.
                let new = if number.is_f64() {
                    serde_json::Number::from_f64(v)
                } else {
                    Some(serde_json::Number::from(v.round().max(0.0) as u64))
                };
                if let Some(new) = new {
                    *number = new;
                    changed = true;
                }
            }
            response
        }
        serde_json::Value::Bool(flag) => ui.checkbox(flag, ""),
        serde_json::Value::String(text) => ui.text_edit_singleline(text),
        other => ui.label(other.to_string()),
    };
    changed |= editor.changed();
    editor.labelled_by(label.id);
    ui.label(doc.map_or("", |d| d.unit));
    ui.end_row();
    changed
}

fn layout_name(layout: &Layout) -> &'static str {
    match layout {
        Layout::Whole => "whole image, resized",
        Layout::KeepAspect => "whole image, aspect ratio kept",
        Layout::Tiles { .. } => "tiles (high-resolution parts)",
    }
}

/// The corners of a region as the text field shows and reads them: `x,y; x,y; …`.
fn region_text(region: Option<&Region>) -> String {
    region.map_or(String::new(), |r| r.points.iter().map(|[x, y]| format!("{x},{y}")).collect::<Vec<_>>().join("; "))
}

/// How the model sees each image (rows of the settings grid): the layout, a tile's side and overlap in image
/// pixels, and a region of interest typed as `x,y,width,height` or corners (applied when the field loses focus)
/// or drawn in the inspector, whose "tile grid" shows the result on the image.
fn geometry_editor(ui: &mut egui::Ui, geometry: &mut InputGeometry, input_size: u32) -> bool {
    let mut changed = false;
    let label = ui.label("input");
    let combo = egui::ComboBox::from_id_salt("layout").selected_text(layout_name(&geometry.layout)).show_ui(ui, |ui| {
        for layout in [Layout::Whole, Layout::KeepAspect, Layout::Tiles { tile: 512, overlap: 64 }] {
            let selected = std::mem::discriminant(&layout) == std::mem::discriminant(&geometry.layout);
            if ui.add(egui::Button::selectable(selected, layout_name(&layout))).clicked() && !selected {
                geometry.layout = layout;
                changed = true;
            }
        }
    });
    combo.response.labelled_by(label.id);
    ui.end_row();
    if let Layout::Tiles { tile, overlap } = &mut geometry.layout {
        let label = ui.label("tile side (image px)");
        let side = ui.add(egui::DragValue::new(tile).range(MIN_TILE..=MAX_TILE).speed(16.0));
        changed |= side.labelled_by(label.id).changed();
        ui.end_row();
        let label = ui.label("tile overlap (image px)");
        let most = *tile / 2;
        *overlap = (*overlap).min(most);
        changed |= ui.add(egui::DragValue::new(overlap).range(0..=most).speed(4.0)).labelled_by(label.id).changed();
        ui.end_row();
        // The downscale is the tile's side against the input's: say it, since it decides the smallest defect seen.
        ui.label("");
        let scale = input_size as f32 / *tile as f32;
        let note = format!(
            "each tile is scaled by {scale:.2} to the {input_size}² input ({:.1} image px per input px)",
            1.0 / scale
        );
        ui.label(egui::RichText::new(note).weak());
        ui.end_row();
    }
    let label = ui.label("region of interest (image px)");
    let id = ui.scope_id().with("region_text");
    // The text being typed, its error, and the region it was shown for: a region drawn in the inspector since
    // replaces the text.
    let (mut text, mut error) = match ui.data_mut(|d| d.get_temp::<(String, Option<String>, Option<Region>)>(id)) {
        Some((text, error, shown_for)) if shown_for == geometry.region => (text, error),
        _ => (region_text(geometry.region.as_ref()), None),
    };
    ui.vertical(|ui| {
        let hint = "everywhere; or x,y,width,height; or x1,y1; x2,y2; x3,y3 …";
        let field = ui.add(egui::TextEdit::singleline(&mut text).hint_text(hint)).labelled_by(label.id);
        if field.lost_focus() {
            let parsed = if text.trim().is_empty() { Ok(None) } else { Region::parse(&text).map(Some) };
            match parsed {
                Ok(region) => {
                    error = None;
                    if region != geometry.region {
                        geometry.region = region;
                        text = region_text(geometry.region.as_ref());
                        changed = true;
                    }
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        if let Some(error) = &error {
            ui.colored_label(ui.visuals().error_fg_color, error);
        }
    });
    ui.data_mut(|d| d.insert_temp(id, (text, error, geometry.region.clone())));
    ui.end_row();
    changed
}

fn settings(ui: &mut egui::Ui, studio: &mut Studio, context: &ViewContext, actions: &mut Vec<Action>) {
    ui.heading("Settings");
    settings_editor(ui, studio);
    ui.add_space(6.0);
    let training = &mut studio.project.training;
    let mut changed = false;
    egui::Grid::new("training").num_columns(2).show(ui, |ui| {
        let label = ui.label("image size (px)");
        let size = ui.add(egui::DragValue::new(&mut training.image_size).range(32..=1024).speed(8.0));
        changed |= size.labelled_by(label.id).changed();
        ui.end_row();
        changed |= geometry_editor(ui, &mut training.geometry, training.image_size);
        let label = ui.label("threshold: FAR on held-out good images ≤");
        let mut far = training.target_far * 100.0;
        let target = ui.add(egui::DragValue::new(&mut far).range(0.0..=50.0).speed(0.1).suffix(" %"));
        if target.labelled_by(label.id).changed() {
            training.target_far = far / 100.0;
            changed = true;
        }
        ui.end_row();
        let label = ui.label("device");
        let combo = egui::ComboBox::from_id_salt("device").selected_text(training.device.clone()).show_ui(ui, |ui| {
            for device in [DeviceChoice::Cpu, DeviceChoice::Cuda, DeviceChoice::Metal] {
                let name = device.to_string();
                let label = if device.is_built() { name.clone() } else { format!("{name} (not in this build)") };
                let response =
                    ui.add_enabled(device.is_built(), egui::Button::selectable(training.device == name, label));
                if response.clicked() {
                    training.device = name;
                    changed = true;
                }
            }
        });
        combo.response.labelled_by(label.id);
        ui.end_row();
    });
    if changed {
        studio.changed();
    }
    ui.add_space(6.0);
    let training = crate::studio::workspace::TrainingSet::of(&studio.images, &studio.project.labels);
    let train_images = training.records.len();
    let can_train = context.job.is_none() && context.weights_present && train_images > 0;
    let title = find_method(&studio.project.training.method).map(|m| m.title).unwrap_or("?");
    let button = ui.add_enabled(can_train, egui::Button::new(format!("Train {title}")));
    if button.clicked() {
        actions.push(Action::Train);
    }
    if !context.weights_present {
        ui.label("needs the backbone weights (see the banner above)");
    } else if train_images == 0 {
        ui.label("needs good training images: use Import");
    } else {
        ui.label(format!("on {train_images} good training images (10 % held out to choose the threshold)"));
    }
    if let Some(left_out) = training.left_out() {
        ui.label(format!("{left_out} — a person's word outranks the folder's"));
    }
}

fn progress(ui: &mut egui::Ui, job: &crate::studio::jobs::JobStatus, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        ui.strong(&job.title);
        ui.label(format!("— {} ({} elapsed)", job.stage, format_duration(job.started.elapsed())));
        if ui.button("Cancel").clicked() {
            actions.push(Action::CancelJob);
        }
    });
    let text = match (job.fraction(), job.eta()) {
        (Some(f), Some(eta)) => {
            format!("{} / {} · {:.0} % · ETA {}", job.done, job.total, f * 100.0, format_duration(eta))
        }
        (Some(f), None) => format!("{} / {} · {:.0} %", job.done, job.total, f * 100.0),
        (None, _) => "working…".into(),
    };
    let bar = egui::ProgressBar::new(job.fraction().unwrap_or(0.0)).text(text).animate(job.fraction().is_none());
    ui.add(bar);
    let (curve, y_label) = if job.loss_curve.is_empty() {
        (job.progress_curve.clone(), "progress of this stage")
    } else {
        (job.loss_curve.clone(), "loss")
    };
    Plot::new("job curve")
        .height(140.0)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .y_axis_label(y_label)
        .show(ui, |plot| {
            plot.line(Line::new(y_label, curve).allow_band(false));
        });
    egui::ScrollArea::vertical().max_height(80.0).stick_to_bottom(true).show(ui, |ui| {
        for note in &job.notes {
            ui.label(egui::RichText::new(note).monospace().small());
        }
    });
}
