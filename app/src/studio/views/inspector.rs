//! Inspector: one image with the active model's anomaly map overlaid by the WGSL shader — colormap, opacity,
//! threshold gate, threshold contour, ground-truth outline — with zoom (wheel), pan (drag), fit (double-click),
//! side-by-side original / overlay, and ←/→ through the gallery's order. The labeller gives a verdict and defect
//! types (`widgets::verdict_bar`) and paints a defect mask over the image (`widgets::mask_painter`).

use super::{StudioView, ViewContext, ViewFrame};
use crate::project::resolve;
use crate::project::verdict::verdict;
use crate::studio::image_loader::{ImageLoader, ImageState, LoadedImage};
use crate::studio::mask_edits::{EditedMask, MaskState};
use crate::studio::widgets::heatmap::{paint_overlay, Colormap, OverlayData, OverlayStyle};
use crate::studio::widgets::mask_painter::{MaskPainter, MaskTool};
use crate::studio::widgets::polygon_input::ImagePlacement;
use crate::studio::widgets::region_drawer::RegionDrawer;
use crate::studio::widgets::verdict_bar;
use crate::studio::workspace::ImageId;
use crate::studio::Studio;
use eframe::egui;
use loupe_engine::geometry::{CutPlan, InputGeometry};
use std::hash::{Hash, Hasher};

pub struct InspectorState {
    pub colormap: Colormap,
    pub opacity: f32,
    pub contour: bool,
    pub mask_outline: bool,
    pub hide_below_threshold: bool,
    pub side_by_side: bool,
    /// Draw the views the Train view's geometry cuts the image into, and its region of interest.
    pub tile_grid: bool,
    pub zoom: f32,
    /// Offset of the image centre from the view centre, in points.
    pub pan: egui::Vec2,
    pub mask: MaskPainter,
    pub region: RegionDrawer,
}

impl Default for InspectorState {
    fn default() -> Self {
        Self {
            colormap: Colormap::Jet,
            opacity: 0.6,
            contour: true,
            mask_outline: true,
            hide_below_threshold: true,
            side_by_side: false,
            tile_grid: false,
            zoom: 1.0,
            pan: egui::Vec2::ZERO,
            mask: MaskPainter::default(),
            region: RegionDrawer::default(),
        }
    }
}

fn toolbar(ui: &mut egui::Ui, state: &mut InspectorState) {
    ui.horizontal_wrapped(|ui| {
        egui::ComboBox::from_label("colormap").selected_text(state.colormap.name()).show_ui(ui, |ui| {
            for colormap in Colormap::ALL {
                ui.selectable_value(&mut state.colormap, colormap, colormap.name());
            }
        });
        ui.add(egui::Slider::new(&mut state.opacity, 0.0..=1.0).text("opacity"));
        ui.checkbox(&mut state.hide_below_threshold, "hide below threshold");
        ui.checkbox(&mut state.contour, "threshold contour");
        ui.checkbox(&mut state.mask_outline, "ground-truth outline");
        ui.checkbox(&mut state.side_by_side, "side by side");
        ui.checkbox(&mut state.tile_grid, "tile grid");
        if ui.button("Fit").clicked() {
            state.zoom = 1.0;
            state.pan = egui::Vec2::ZERO;
        }
        ui.label(format!("zoom {:.0} %", state.zoom * 100.0));
    });
}

/// The rectangle the whole image occupies in `view` at the current zoom and pan.
fn image_rect(view: egui::Rect, image_size: egui::Vec2, state: &InspectorState) -> egui::Rect {
    let fit = (view.width() / image_size.x).min(view.height() / image_size.y);
    egui::Rect::from_center_size(view.center() + state.pan, image_size * fit * state.zoom)
}

/// The visible part of `image` inside `view`, and the texture coordinates of that part.
fn visible_part(view: egui::Rect, image: egui::Rect) -> Option<(egui::Rect, egui::Rect)> {
    let visible = view.intersect(image);
    if visible.width() <= 0.0 || visible.height() <= 0.0 {
        return None;
    }
    let to_uv = |p: egui::Pos2| egui::pos2((p.x - image.min.x) / image.width(), (p.y - image.min.y) / image.height());
    Some((visible, egui::Rect::from_min_max(to_uv(visible.min), to_uv(visible.max))))
}

/// The decoded image, or — while it is read, or when it cannot be — a spinner or the reason in `view`.
pub fn ready_image<'a>(
    ui: &mut egui::Ui,
    view: egui::Rect,
    loader: &'a mut ImageLoader,
    path: &std::path::Path,
    mask: Option<&std::path::Path>,
) -> Option<&'a LoadedImage> {
    match loader.get(path, mask) {
        ImageState::Loading => {
            ui.put(view, egui::Spinner::new().size(32.0));
            None
        }
        ImageState::Failed(reason) => {
            ui.put(view, egui::Label::new(format!("{}: {reason}", path.display())));
            None
        }
        ImageState::Ready(loaded) => Some(loaded),
    }
}

/// Paints the image's tiles where the whole image occupies `whole`, clipped to `pane`; returns the visible part
/// and its texture coordinates (where an overlay goes), if any of it is visible.
pub fn paint_image(
    painter: &egui::Painter,
    pane: egui::Rect,
    whole: egui::Rect,
    loaded: &LoadedImage,
) -> Option<(egui::Rect, egui::Rect)> {
    let visible = visible_part(pane, whole)?;
    let scale = whole.width() / loaded.size[0] as f32;
    for tile in &loaded.tiles {
        let origin = whole.min + egui::vec2(tile.origin[0] as f32, tile.origin[1] as f32) * scale;
        let rect = egui::Rect::from_min_size(origin, egui::vec2(tile.size[0] as f32, tile.size[1] as f32) * scale);
        if let Some((tile_visible, tile_uv)) = visible_part(pane, rect) {
            painter.image(tile.texture.id(), tile_visible, tile_uv, egui::Color32::WHITE);
        }
    }
    Some(visible)
}

/// The labeller's mask of image `index` (read in the background on first use), and `use_mask` applied to it;
/// when it changed the mask, the label and the autosave learn of it.
fn with_mask(
    ctx: &egui::Context,
    studio: &mut Studio,
    index: usize,
    use_mask: impl FnOnce(Result<&mut EditedMask, Option<&str>>) -> bool,
) {
    let image = &studio.images[index];
    let key = image.label_key.clone();
    let size = [image.original_size[0] as u32, image.original_size[1] as u32];
    let file = studio.label_of(index).and_then(|label| label.mask.as_ref()).map(|m| resolve(&studio.dir(), m));
    let ctx = ctx.clone();
    let changed = match studio.masks.get(&key, file, size, move || ctx.request_repaint()) {
        MaskState::Ready(edited) => use_mask(Ok(edited)),
        MaskState::Loading => use_mask(Err(None)),
        MaskState::Failed(reason) => use_mask(Err(Some(reason))),
    };
    if changed {
        studio.changed();
        let label = studio.project.labels.entry(key.clone()).or_default();
        studio.masks.changed(&key, studio.revision, label);
        if label.is_empty() {
            studio.project.labels.remove(&key);
        }
    }
}

/// Names one model's overlay of one image (the shader caches its uploaded map by this key).
/// The views `geometry` cuts a `original_size` image into (thin yellow squares; those the region drops are
/// not drawn) and the region's outline (cyan), over the image drawn at `whole`.
fn paint_tile_grid(
    painter: &egui::Painter,
    whole: egui::Rect,
    original_size: [usize; 2],
    geometry: &InputGeometry,
    input_size: u32,
) {
    let [width, height] = original_size.map(|side| side as u32);
    if width == 0 || height == 0 {
        return;
    }
    let scale = egui::vec2(whole.width() / width as f32, whole.height() / height as f32);
    let to_screen = |x: f32, y: f32| whole.min + egui::vec2(x * scale.x, y * scale.y);
    let plan = CutPlan::new(geometry, width, height, input_size);
    let stroke = egui::Stroke::new(1.0, egui::Color32::from_rgba_unmultiplied(255, 220, 0, 200));
    for view in &plan.views {
        let corner = |x: u32, y: u32| to_screen(x.min(width) as f32, y.min(height) as f32);
        let rect = egui::Rect::from_min_max(corner(view.x, view.y), corner(view.x + view.width, view.y + view.height));
        painter.rect_stroke(rect, 0.0, stroke, egui::StrokeKind::Inside);
    }
    if let Some(region) = &geometry.region {
        let points: Vec<egui::Pos2> = region.points.iter().map(|[x, y]| to_screen(*x, *y)).collect();
        painter.add(egui::Shape::closed_line(points, egui::Stroke::new(2.0, egui::Color32::from_rgb(0, 220, 255))));
    }
}

pub fn overlay_key(model_file: Option<&std::path::PathBuf>, image: ImageId) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    model_file.hash(&mut hasher);
    image.hash(&mut hasher);
    hasher.finish()
}

impl StudioView for InspectorState {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut ViewFrame<'_>) {
        let order = frame.browse.order(frame.studio);
        show(ui, frame.studio, self, frame.loader, &order, frame.context);
    }
}

fn show(
    ui: &mut egui::Ui,
    studio: &mut Studio,
    state: &mut InspectorState,
    loader: &mut ImageLoader,
    order: &[usize],
    context: &ViewContext,
) {
    let Some(index) = studio.selected.filter(|&i| i < studio.images.len()).or_else(|| order.first().copied()) else {
        ui.label("No image: import some, then pick one in the gallery.");
        return;
    };
    studio.selected = Some(index);
    let position = order.iter().position(|&i| i == index);
    let step = ui.input(|i| i.key_pressed(egui::Key::ArrowRight) as i32 - i.key_pressed(egui::Key::ArrowLeft) as i32);
    if let (Some(position), true) = (position, step != 0) {
        let next = (position as i32 + step).clamp(0, order.len() as i32 - 1) as usize;
        studio.selected = Some(order[next]);
    }
    let shown = studio.selected.unwrap_or(index);
    let image = studio.images[shown].clone();
    let score = studio.score_of(&image);
    ui.horizontal(|ui| {
        ui.strong(image.file_name());
        ui.label(format!("· {} · {}×{}", image.folder_truth(), image.original_size[0], image.original_size[1]));
        if let Some(score) = score {
            ui.label(format!("· score {score:.4}"));
            if let Some((decision, review)) = studio.thresholds() {
                let v = verdict(score, decision, review);
                ui.colored_label(super::gallery::verdict_colour(v), v.name());
            }
        }
        if let Some(position) = position {
            ui.label(format!("· {} of {} (left/right arrow keys)", position + 1, order.len()));
        }
        let pinned = studio.project.pinned.iter().position(|key| key == &image.label_key);
        let pin = ui.selectable_label(pinned.is_some(), "Pin for presenting");
        if pin.on_hover_text("Adds the image to the presentation's pinned playlist (F5 presents)").clicked() {
            match pinned {
                Some(at) => drop(studio.project.pinned.remove(at)),
                None => studio.project.pinned.push(image.label_key.clone()),
            }
            studio.changed();
        }
    });
    if verdict_bar::show(ui, studio, shown) {
        if let Some(next) = order.iter().position(|&i| i == shown).and_then(|p| order.get(p + 1)) {
            studio.selected = Some(*next);
            ui.ctx().request_repaint();
        }
    }
    let runtime = studio.active_runtime();
    let map = runtime.and_then(|r| r.maps.get(&image.id).cloned());
    let map_range = runtime.and_then(|r| r.map_range);
    let model_loading = runtime.is_some_and(|r| r.model.is_none());
    let ctx = ui.ctx().clone();
    toolbar(ui, state);
    let mut start_empty = false;
    with_mask(&ctx, studio, shown, |mask| match mask {
        Ok(edited) => state.mask.toolbar(ui, Some(edited)),
        Err(reason) => {
            state.mask.toolbar(ui, None);
            if let Some(reason) = reason {
                ui.horizontal(|ui| {
                    ui.colored_label(ui.visuals().error_fg_color, format!("The defect mask cannot be read: {reason}"));
                    start_empty = ui.button("Start an empty mask").clicked();
                });
            }
            false
        }
    });
    if state.region.toolbar(ui, &mut studio.project.training.geometry) {
        studio.changed();
    }
    if state.region.drawing {
        // The region is drawn on the image: no painting tool takes the clicks, and the grid shows where it goes.
        if state.mask.tool != MaskTool::Look {
            state.region.drawing = false;
        } else {
            state.tile_grid = true;
        }
    }
    if start_empty {
        let size = [image.original_size[0] as u32, image.original_size[1] as u32];
        studio.masks.start_empty(&image.label_key, size);
    }
    if !context.gpu_overlay {
        ui.colored_label(ui.visuals().warn_fg_color, "This renderer has no wgpu: heatmaps cannot be drawn.");
    }
    let map_note = match (&map, studio.project.active_model) {
        (Some(_), _) => None,
        (None, None) => Some("No model yet: train one to see heatmaps."),
        (None, Some(_)) if model_loading => Some("The model is loading…"),
        (None, Some(_)) => Some("This image has no heatmap: only test images are scored."),
    };
    if let Some(note) = map_note {
        ui.label(note);
    }
    let (view, response) = ui.allocate_exact_size(ui.available_size(), egui::Sense::click_and_drag());
    let Some(loaded) = ready_image(ui, view, loader, &image.path, image.mask.as_deref()) else { return };
    let primary_pans = state.mask.pans_with_primary() && !state.region.drawing;
    if response.double_clicked() && primary_pans {
        state.zoom = 1.0;
        state.pan = egui::Vec2::ZERO;
    }
    let pans = (primary_pans && response.dragged_by(egui::PointerButton::Primary))
        || response.dragged_by(egui::PointerButton::Secondary)
        || response.dragged_by(egui::PointerButton::Middle);
    if pans {
        state.pan += response.drag_delta();
    }
    if response.hovered() {
        let scroll = ui.input(|i| i.smooth_scroll_delta.y);
        if scroll != 0.0 {
            let factor = (scroll / 200.0).exp();
            let new_zoom = (state.zoom * factor).clamp(0.2, 64.0);
            // Keep the point under the pointer still while zooming.
            if let Some(pointer) = response.hover_pos() {
                let centre = view.center() + state.pan;
                state.pan += (pointer - centre) * (1.0 - new_zoom / state.zoom);
            }
            state.zoom = new_zoom;
        }
    }
    let panes: Vec<(egui::Rect, bool)> = if state.side_by_side {
        let (left, right) = view.split_left_right_at_fraction(0.5);
        vec![(left.shrink(2.0), false), (right.shrink(2.0), true)]
    } else {
        vec![(view, true)]
    };
    let image_size = egui::vec2(loaded.size[0] as f32, loaded.size[1] as f32);
    let (threshold, _) = studio.thresholds().unwrap_or((f32::NEG_INFINITY, None));
    // The pane a stroke started in (or the pointer is over) maps the pointer to image pixels.
    let pointer = ui.input(|i| if i.pointer.any_down() { i.pointer.press_origin() } else { i.pointer.hover_pos() });
    let active_pane = panes.iter().map(|(pane, _)| *pane).find(|pane| pointer.is_some_and(|p| pane.contains(p)));
    if let Some(pane) = active_pane {
        let whole = image_rect(pane, image_size, state);
        if state.region.drawing {
            let placement = ImagePlacement { image: whole, size: image_size.into() };
            if state.region.interact(ui, &response, placement, &mut studio.project.training.geometry) {
                studio.changed();
            }
        } else {
            with_mask(&ctx, studio, shown, |mask| {
                mask.is_ok_and(|edited| state.mask.interact(ui, &response, whole, edited))
            });
        }
    }
    for (pane, with_overlay) in panes {
        let painter = ui.painter_at(pane);
        painter.rect_filled(pane, 0.0, egui::Color32::from_gray(20));
        let whole = image_rect(pane, image_size, state);
        let Some((visible, uv)) = paint_image(&painter, pane, whole, loaded) else { continue };
        if let (Some(map), true, true) = (&map, with_overlay, context.gpu_overlay) {
            let range = map_range.unwrap_or((map.data.iter().copied().fold(f32::INFINITY, f32::min), map.max()));
            let style = OverlayStyle {
                threshold,
                range: if state.hide_below_threshold && threshold.is_finite() {
                    (threshold, range.1.max(threshold))
                } else {
                    range
                },
                opacity: state.opacity,
                colormap: state.colormap,
                contour: state.contour && threshold.is_finite(),
                mask_outline: state.mask_outline,
                hide_below_threshold: state.hide_below_threshold && threshold.is_finite(),
            };
            let data = OverlayData {
                key: overlay_key(studio.project.active().map(|m| &m.file), image.id),
                map: map.clone(),
                mask: loaded.mask.clone(),
            };
            paint_overlay(&painter, visible, uv, &data, &style);
        }
        if state.tile_grid {
            let training = &studio.project.training;
            paint_tile_grid(&painter, whole, image.original_size, &training.geometry, training.image_size);
            state.region.paint(&painter, &response, ImagePlacement { image: whole, size: image_size.into() });
        }
        // The labeller's mask goes over the heatmap: it is what they are working on.
        with_mask(&ctx, studio, shown, |mask| {
            if let Ok(edited) = mask {
                state.mask.paint(&painter, &response, whole, edited, &image.label_key);
            }
            false
        });
    }
}
