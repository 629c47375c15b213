//! A polygon clicked corner by corner over the inspector's image, in image pixels: a click adds a corner; Enter,
//! a double-click or a click on the first corner closes it; Escape starts again. The mask painter's polygon tool
//! and the region-of-interest drawer both draw with it.

use eframe::egui;

/// A click this close (in points) to the polygon's first corner closes it.
const CLOSE_DISTANCE: f32 = 8.0;

#[derive(Default)]
pub struct PolygonInput {
    /// Corners so far, in image pixels.
    corners: Vec<[f64; 2]>,
}

/// Where the whole image is drawn (`image`, in points) and its size in pixels: the two ends of every conversion.
#[derive(Clone, Copy)]
pub struct ImagePlacement {
    pub image: egui::Rect,
    pub size: [f32; 2],
}

impl ImagePlacement {
    pub fn to_pixel(&self, p: egui::Pos2) -> [f32; 2] {
        let Self { image, size } = self;
        [(p.x - image.min.x) / image.width() * size[0], (p.y - image.min.y) / image.height() * size[1]]
    }

    pub fn to_screen(&self, pixel: [f64; 2]) -> egui::Pos2 {
        let Self { image, size } = self;
        egui::pos2(
            image.min.x + pixel[0] as f32 / size[0] * image.width(),
            image.min.y + pixel[1] as f32 / size[1] * image.height(),
        )
    }
}

impl PolygonInput {
    pub fn clear(&mut self) {
        self.corners.clear();
    }

    pub fn corner_count(&self) -> usize {
        self.corners.len()
    }

    /// Applies the pointer and keys on `response`; returns the polygon (three or more corners) when it closes.
    pub fn interact(
        &mut self,
        ui: &egui::Ui,
        response: &egui::Response,
        placement: ImagePlacement,
    ) -> Option<Vec<[f64; 2]>> {
        let primary = egui::PointerButton::Primary;
        if ui.input(|i| i.key_pressed(egui::Key::Escape)) {
            self.corners.clear();
        }
        let mut close = ui.input(|i| i.key_pressed(egui::Key::Enter)) || response.double_clicked_by(primary);
        if response.clicked_by(primary) && !close {
            if let Some(pos) = response.interact_pointer_pos() {
                let first = self.corners.first().map(|p| placement.to_screen(*p));
                if self.corners.len() >= 3 && first.is_some_and(|f| f.distance(pos) <= CLOSE_DISTANCE) {
                    close = true;
                } else {
                    let at = placement.to_pixel(pos);
                    self.corners.push([at[0] as f64, at[1] as f64]);
                }
            }
        }
        (close && self.corners.len() >= 3).then(|| std::mem::take(&mut self.corners))
    }

    /// The corners so far joined by lines, and a line on to the pointer.
    pub fn paint(
        &self,
        painter: &egui::Painter,
        response: &egui::Response,
        placement: ImagePlacement,
        stroke: egui::Stroke,
    ) {
        if self.corners.is_empty() {
            return;
        }
        let mut points: Vec<egui::Pos2> = self.corners.iter().map(|p| placement.to_screen(*p)).collect();
        if let Some(hover) = response.hover_pos() {
            points.push(hover);
        }
        painter.add(egui::Shape::line(points, stroke));
    }
}
