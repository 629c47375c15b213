//! The painted defect mask drawn over the image: translucent red where the labeller marked a defect. Kept as
//! tiled textures (a 4096² mask in one texture is a 64 MiB upload) and, while a brush moves, only the part a
//! stroke changed is uploaded again.

use eframe::egui;
use loupe_engine::labels::mask::{DefectMask, Dirty};

const TILE_SIDE: u32 = 1024;
const DEFECT: egui::Color32 = egui::Color32::from_rgba_premultiplied(110, 10, 10, 110);

struct Tile {
    texture: egui::TextureHandle,
    origin: [u32; 2],
    size: [u32; 2],
}

#[derive(Default)]
pub struct MaskLayer {
    /// Which mask (label key) and which of its versions the textures show.
    shown: Option<(String, u64)>,
    tiles: Vec<Tile>,
}

fn colours(mask: &DefectMask, rect: Dirty) -> egui::ColorImage {
    let (width, height) = ((rect[2] - rect[0]) as usize, (rect[3] - rect[1]) as usize);
    let mut pixels = Vec::with_capacity(width * height);
    for y in rect[1]..rect[3] {
        let row = &mask.pixels()[(y * mask.width()) as usize..][..mask.width() as usize];
        pixels.extend(row[rect[0] as usize..rect[2] as usize].iter().map(|&m| {
            if m != 0 {
                DEFECT
            } else {
                egui::Color32::TRANSPARENT
            }
        }));
    }
    egui::ColorImage::new([width, height], pixels)
}

impl MaskLayer {
    /// Brings the textures up to date with version `version` of the mask of `key`; `dirty` is what changed since
    /// the version shown (uploads everything when another mask or an unknown version was shown).
    pub fn sync(&mut self, ctx: &egui::Context, key: &str, version: u64, mask: &DefectMask, dirty: Option<Dirty>) {
        let same_mask = self.shown.as_ref().is_some_and(|(k, _)| k == key);
        let current = self.shown.as_ref().is_some_and(|(k, v)| k == key && *v == version);
        if current {
            return;
        }
        match dirty {
            Some(dirty) if same_mask && !self.tiles.is_empty() => {
                for tile in &mut self.tiles {
                    let part = [
                        dirty[0].max(tile.origin[0]),
                        dirty[1].max(tile.origin[1]),
                        dirty[2].min(tile.origin[0] + tile.size[0]),
                        dirty[3].min(tile.origin[1] + tile.size[1]),
                    ];
                    if part[0] < part[2] && part[1] < part[3] {
                        let at = [(part[0] - tile.origin[0]) as usize, (part[1] - tile.origin[1]) as usize];
                        tile.texture.set_partial(at, colours(mask, part), egui::TextureOptions::NEAREST);
                    }
                }
            }
            _ => {
                self.tiles.clear();
                for top in (0..mask.height()).step_by(TILE_SIDE as usize) {
                    for left in (0..mask.width()).step_by(TILE_SIDE as usize) {
                        let size = [TILE_SIDE.min(mask.width() - left), TILE_SIDE.min(mask.height() - top)];
                        let rect = [left, top, left + size[0], top + size[1]];
                        let texture = ctx.load_texture(
                            format!("mask {key} @{left},{top}"),
                            colours(mask, rect),
                            egui::TextureOptions::NEAREST,
                        );
                        self.tiles.push(Tile { texture, origin: [left, top], size });
                    }
                }
            }
        }
        self.shown = Some((key.to_string(), version));
    }

    /// Draws the mask over `image` (the rectangle the whole image occupies), clipped to the painter's area.
    pub fn paint(&self, painter: &egui::Painter, image: egui::Rect, mask_size: [u32; 2]) {
        let scale = egui::vec2(image.width() / mask_size[0] as f32, image.height() / mask_size[1] as f32);
        let clip = painter.clip_rect();
        for tile in &self.tiles {
            let min = image.min + egui::vec2(tile.origin[0] as f32 * scale.x, tile.origin[1] as f32 * scale.y);
            let rect = egui::Rect::from_min_size(
                min,
                egui::vec2(tile.size[0] as f32 * scale.x, tile.size[1] as f32 * scale.y),
            );
            let visible = clip.intersect(rect);
            if visible.width() <= 0.0 || visible.height() <= 0.0 {
                continue;
            }
            let uv = egui::Rect::from_min_max(
                egui::pos2((visible.min.x - rect.min.x) / rect.width(), (visible.min.y - rect.min.y) / rect.height()),
                egui::pos2((visible.max.x - rect.min.x) / rect.width(), (visible.max.y - rect.min.y) / rect.height()),
            );
            painter.image(tile.texture.id(), visible, uv, egui::Color32::WHITE);
        }
    }
}
