//! Drawing the region of interest over the inspector's image (issue 20): the corners are clicked on the image
//! itself, in its pixels, and the closed polygon becomes the region of the next model trained — the same region
//! the Train view shows as text and `loupe fit --roi` takes.

use super::polygon_input::{ImagePlacement, PolygonInput};
use eframe::egui;
use loupe_engine::geometry::{InputGeometry, Region};

#[derive(Default)]
pub struct RegionDrawer {
    /// Clicks on the image add corners to the region (and neither pan nor paint the mask).
    pub drawing: bool,
    polygon: PolygonInput,
    /// Why the last polygon drawn was refused.
    refused: Option<String>,
}

impl RegionDrawer {
    /// The region row: draw, clear, and what the region is. Returns true when it changed `geometry`.
    pub fn toolbar(&mut self, ui: &mut egui::Ui, geometry: &mut InputGeometry) -> bool {
        let mut changed = false;
        ui.horizontal_wrapped(|ui| {
            ui.label("Region of interest");
            let label = if self.drawing { "stop drawing" } else { "draw" };
            let hint = "Click the region's corners on the image; Enter, a double-click or a click on the first \
                        corner closes it, Escape starts again. It is the region of the next model trained.";
            if ui.selectable_label(self.drawing, label).on_hover_text(hint).clicked() {
                self.drawing = !self.drawing;
                self.polygon.clear();
                self.refused = None;
            }
            if ui.add_enabled(geometry.region.is_some(), egui::Button::new("clear")).clicked() {
                geometry.region = None;
                changed = true;
            }
            let status = match (&self.refused, &geometry.region, self.polygon.corner_count()) {
                (Some(reason), _, _) => reason.clone(),
                (None, _, corners) if self.drawing && corners > 0 => format!("{corners} corners so far"),
                (None, _, _) if self.drawing => "click the first corner on the image".to_string(),
                (None, Some(region), _) => format!("{} corners; trained and scored inside only", region.points.len()),
                (None, None, _) => "the whole image".to_string(),
            };
            ui.label(egui::RichText::new(status).weak());
        });
        changed
    }

    /// Applies clicks on `response` while drawing; when the polygon closes it becomes `geometry`'s region and
    /// drawing stops. Returns true when it changed `geometry`.
    pub fn interact(
        &mut self,
        ui: &egui::Ui,
        response: &egui::Response,
        placement: ImagePlacement,
        geometry: &mut InputGeometry,
    ) -> bool {
        if !self.drawing {
            return false;
        }
        let Some(corners) = self.polygon.interact(ui, response, placement) else { return false };
        let region = Region { points: corners.iter().map(|&[x, y]| [x as f32, y as f32]).collect() };
        match region.check() {
            Ok(()) => {
                geometry.region = Some(region);
                self.drawing = false;
                self.refused = None;
                true
            }
            Err(reason) => {
                self.refused = Some(reason.to_string());
                false
            }
        }
    }

    /// The polygon being drawn.
    pub fn paint(&self, painter: &egui::Painter, response: &egui::Response, placement: ImagePlacement) {
        self.polygon.paint(painter, response, placement, egui::Stroke::new(2.0, egui::Color32::from_rgb(0, 220, 255)));
    }
}
