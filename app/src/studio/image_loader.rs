//! Full-resolution images (and their ground-truth masks) for the inspector, decoded on rayon's pool and uploaded
//! once as textures; the UI asks every frame and draws a placeholder until the image is there.

use super::widgets::heatmap::MaskImage;
use eframe::egui;
use loupe_engine::dataset::decode::open_image;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

/// Full images kept as textures (a 4096² image is 64 MiB of GPU memory).
const CACHED_IMAGES: usize = 6;

pub struct LoadedImage {
    pub texture: egui::TextureHandle,
    pub mask: Option<Arc<MaskImage>>,
    pub size: [usize; 2],
}

pub enum ImageState<'a> {
    Loading,
    Ready(&'a LoadedImage),
    Failed(&'a str),
}

type Decoded = (PathBuf, Result<(egui::ColorImage, Option<MaskImage>), String>);

pub struct ImageLoader {
    ready: HashMap<PathBuf, Result<LoadedImage, String>>,
    order: VecDeque<PathBuf>,
    pending: Vec<PathBuf>,
    sender: mpsc::Sender<Decoded>,
    receiver: mpsc::Receiver<Decoded>,
    ctx: egui::Context,
}

fn decode(path: &Path, mask: Option<&Path>, max_side: usize) -> Result<(egui::ColorImage, Option<MaskImage>), String> {
    let mut image = open_image(path)?;
    if image.width().max(image.height()) as usize > max_side {
        // Larger than the GPU allows for one texture: show it downscaled (the overlay is resolution-free).
        image = image.thumbnail(max_side as u32, max_side as u32);
    }
    let rgba = image.to_rgba8();
    let colour =
        egui::ColorImage::from_rgba_unmultiplied([rgba.width() as usize, rgba.height() as usize], rgba.as_raw());
    let mask = match mask {
        Some(mask_path) => {
            Some(MaskImage::from_gray(open_image(mask_path).map_err(|e| format!("mask: {e}"))?.to_luma8()))
        }
        None => None,
    };
    Ok((colour, mask))
}

impl ImageLoader {
    pub fn spawn(ctx: egui::Context) -> Self {
        let (sender, receiver) = mpsc::channel();
        Self { ready: HashMap::new(), order: VecDeque::new(), pending: Vec::new(), sender, receiver, ctx }
    }

    /// The image at `path`, starting its decode on first request.
    pub fn get(&mut self, path: &Path, mask: Option<&Path>) -> ImageState<'_> {
        if !self.ready.contains_key(path) && !self.pending.iter().any(|p| p == path) {
            self.pending.push(path.to_path_buf());
            let sender = self.sender.clone();
            let ctx = self.ctx.clone();
            let (path, mask) = (path.to_path_buf(), mask.map(Path::to_path_buf));
            let max_side = ctx.input(|i| i.max_texture_side);
            rayon::spawn(move || {
                let result = decode(&path, mask.as_deref(), max_side);
                let _ = sender.send((path, result));
                ctx.request_repaint();
            });
        }
        match self.ready.get(path) {
            None => ImageState::Loading,
            Some(Ok(image)) => ImageState::Ready(image),
            Some(Err(reason)) => ImageState::Failed(reason),
        }
    }

    pub fn is_ready(&self, path: &Path) -> bool {
        self.ready.get(path).is_some_and(|r| r.is_ok())
    }

    /// Uploads what finished decoding since the last frame.
    pub fn receive(&mut self, ctx: &egui::Context) {
        while let Ok((path, result)) = self.receiver.try_recv() {
            self.pending.retain(|p| p != &path);
            let loaded = result.map(|(colour, mask)| {
                let size = colour.size;
                let name = path.display().to_string();
                LoadedImage {
                    texture: ctx.load_texture(name, colour, egui::TextureOptions::LINEAR),
                    mask: mask.map(Arc::new),
                    size,
                }
            });
            if self.order.len() >= CACHED_IMAGES {
                if let Some(oldest) = self.order.pop_front() {
                    self.ready.remove(&oldest);
                }
            }
            self.order.push_back(path.clone());
            self.ready.insert(path, loaded);
        }
    }
}
