//! Painting a defect mask over the inspector's image: brush and eraser of adjustable size, polygon, fill, and
//! undo/redo — with a key for each (B, E, P, F; V to look around; [ and ] resize the brush; Ctrl+Z, Ctrl+Shift+Z
//! or Ctrl+Y). While a tool is active the primary button paints and the secondary or middle button pans.

use super::mask_layer::MaskLayer;
use super::polygon_input::{ImagePlacement, PolygonInput};
use crate::studio::mask_edits::EditedMask;
use eframe::egui;
use loupe_engine::labels::mask::Dirty;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskTool {
    /// No painting: drag pans, double-click fits.
    Look,
    Brush,
    Eraser,
    Polygon,
    Fill,
}

impl MaskTool {
    const ALL: [(MaskTool, &'static str, egui::Key); 5] = [
        (MaskTool::Look, "look (V)", egui::Key::V),
        (MaskTool::Brush, "brush (B)", egui::Key::B),
        (MaskTool::Eraser, "eraser (E)", egui::Key::E),
        (MaskTool::Polygon, "polygon (P)", egui::Key::P),
        (MaskTool::Fill, "fill (F)", egui::Key::F),
    ];
}

pub struct MaskPainter {
    pub tool: MaskTool,
    /// Brush radius in image pixels.
    pub radius: f32,
    pub show_mask: bool,
    /// The polygon being drawn.
    polygon: PolygonInput,
    /// Where the brush was at the last frame of a drag, in image pixels.
    last: Option<[f32; 2]>,
    pub layer: MaskLayer,
}

impl Default for MaskPainter {
    fn default() -> Self {
        Self {
            tool: MaskTool::Look,
            radius: 6.0,
            show_mask: true,
            polygon: PolygonInput::default(),
            last: None,
            layer: MaskLayer::default(),
        }
    }
}

fn union(a: Option<Dirty>, b: Option<Dirty>) -> Option<Dirty> {
    match (a, b) {
        (Some(a), Some(b)) => Some([a[0].min(b[0]), a[1].min(b[1]), a[2].max(b[2]), a[3].max(b[3])]),
        (a, b) => a.or(b),
    }
}

fn whole(edited: &EditedMask) -> Dirty {
    [0, 0, edited.mask.width(), edited.mask.height()]
}

impl MaskPainter {
    /// Whether the primary button pans the image (no painting tool is active).
    pub fn pans_with_primary(&self) -> bool {
        self.tool == MaskTool::Look
    }

    /// The tool buttons, brush size and undo/redo; applies the keyboard shortcuts unless a text field has the
    /// keyboard. Returns true when the mask changed (undo or redo).
    pub fn toolbar(&mut self, ui: &mut egui::Ui, edited: Option<&mut EditedMask>) -> bool {
        let typing = ui.ctx().egui_wants_keyboard_input();
        let (mut undo, mut redo) = (false, false);
        if !typing {
            ui.input_mut(|i| {
                for (tool, _, key) in MaskTool::ALL {
                    if i.key_pressed(key) && i.modifiers.is_none() {
                        self.tool = tool;
                    }
                }
                if i.key_pressed(egui::Key::OpenBracket) {
                    self.radius = (self.radius / 1.25).max(0.5);
                }
                if i.key_pressed(egui::Key::CloseBracket) {
                    self.radius = (self.radius * 1.25).min(500.0);
                }
                redo = i.consume_key(egui::Modifiers::COMMAND | egui::Modifiers::SHIFT, egui::Key::Z)
                    || i.consume_key(egui::Modifiers::COMMAND, egui::Key::Y);
                undo = !redo && i.consume_key(egui::Modifiers::COMMAND, egui::Key::Z);
            });
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("Mask");
            for (tool, name, _) in MaskTool::ALL {
                ui.selectable_value(&mut self.tool, tool, name);
            }
            ui.add(egui::Slider::new(&mut self.radius, 0.5..=500.0).logarithmic(true).text("brush radius ([ ])"));
            let (can_undo, can_redo) =
                edited.as_ref().map_or((false, false), |e| (e.history.can_undo(), e.history.can_redo()));
            undo |= ui.add_enabled(can_undo, egui::Button::new("undo")).on_hover_text("Ctrl+Z").clicked();
            redo |=
                ui.add_enabled(can_redo, egui::Button::new("redo")).on_hover_text("Ctrl+Shift+Z or Ctrl+Y").clicked();
            ui.checkbox(&mut self.show_mask, "show mask");
            if let Some(edited) = edited.as_ref() {
                ui.label(egui::RichText::new(format!("{} px marked", edited.marked)).weak());
            }
        });
        if self.tool != MaskTool::Polygon {
            self.polygon.clear();
        }
        let Some(edited) = edited else { return false };
        let changed =
            (undo && edited.history.undo(&mut edited.mask)) || (redo && edited.history.redo(&mut edited.mask));
        if changed {
            edited.dirty = Some(whole(edited));
        }
        changed
    }

    /// Applies the pointer on `response` (the view, showing the whole image at `image`) to the mask; true when
    /// the mask changed.
    pub fn interact(
        &mut self,
        ui: &egui::Ui,
        response: &egui::Response,
        image: egui::Rect,
        edited: &mut EditedMask,
    ) -> bool {
        let size = [edited.mask.width() as f32, edited.mask.height() as f32];
        let to_pixel = |p: egui::Pos2| ImagePlacement { image, size }.to_pixel(p);
        let primary = egui::PointerButton::Primary;
        let mut dirty = None;
        match self.tool {
            MaskTool::Look => {}
            MaskTool::Brush | MaskTool::Eraser => {
                let defect = self.tool == MaskTool::Brush;
                if response.drag_started_by(primary) {
                    edited.history.record(&edited.mask);
                    // The drag is recognised a few points after the press: start the stroke where it was pressed.
                    self.last = ui.input(|i| i.pointer.press_origin()).map(to_pixel);
                }
                if response.dragged_by(primary) {
                    if let Some(at) = response.interact_pointer_pos().map(to_pixel) {
                        let from = self.last.unwrap_or(at);
                        dirty = edited.mask.stroke(from, at, self.radius, defect);
                        self.last = Some(at);
                    }
                }
                if response.drag_stopped_by(primary) {
                    self.last = None;
                }
                if response.clicked_by(primary) {
                    if let Some(at) = response.interact_pointer_pos().map(to_pixel) {
                        edited.history.record(&edited.mask);
                        dirty = edited.mask.stroke(at, at, self.radius, defect);
                    }
                }
            }
            MaskTool::Polygon => {
                if let Some(polygon) = self.polygon.interact(ui, response, ImagePlacement { image, size }) {
                    edited.history.record(&edited.mask);
                    dirty = edited.mask.fill_polygon(&polygon, true);
                }
            }
            MaskTool::Fill => {
                if response.clicked_by(primary) {
                    if let Some(at) = response.interact_pointer_pos().map(to_pixel) {
                        if at[0] >= 0.0 && at[1] >= 0.0 {
                            edited.history.record(&edited.mask);
                            dirty = edited.mask.flood_fill(at[0] as u32, at[1] as u32);
                        }
                    }
                }
            }
        }
        edited.dirty = union(edited.dirty, dirty);
        dirty.is_some()
    }

    /// The mask, the polygon being drawn and the brush outline under the pointer.
    pub fn paint(
        &mut self,
        painter: &egui::Painter,
        response: &egui::Response,
        image: egui::Rect,
        edited: &mut EditedMask,
        key: &str,
    ) {
        let size = [edited.mask.width() as f32, edited.mask.height() as f32];
        // An untouched new mask is empty: no texture upload for every image browsed.
        if self.show_mask && edited.has_content() {
            self.layer.sync(painter.ctx(), key, edited.version, &edited.mask, edited.dirty.take());
            self.layer.paint(painter, image, [edited.mask.width(), edited.mask.height()]);
        }
        let stroke = egui::Stroke::new(1.5, egui::Color32::YELLOW);
        self.polygon.paint(painter, response, ImagePlacement { image, size }, stroke);
        if let (MaskTool::Brush | MaskTool::Eraser, Some(hover)) = (self.tool, response.hover_pos()) {
            painter.circle_stroke(hover, self.radius * image.width() / size[0], stroke);
        }
    }
}
