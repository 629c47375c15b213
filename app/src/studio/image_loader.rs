//! Full-resolution images (and their ground-truth masks) for the inspector, decoded on rayon's pool and uploaded
//! once as textures; the UI asks every frame and draws a placeholder until the image is there. Large images are
//! cut into tiles and uploaded a few tiles per frame: a 4096² image in one texture costs one ~45 ms frame.

use super::widgets::heatmap::MaskImage;
use eframe::egui;
use loupe_engine::dataset::decode::open_image;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

/// Full images kept as textures (a 4096² image is 64 MiB of GPU memory).
const CACHED_IMAGES: usize = 6;
const TILE_SIDE: usize = 1024;
/// Bytes uploaded per frame at most (one full tile: ~4 ms on a software renderer).
const UPLOAD_BUDGET: usize = TILE_SIDE * TILE_SIDE * 4;

pub struct Tile {
    pub texture: egui::TextureHandle,
    /// Top-left pixel and size of the tile in the image.
    pub origin: [usize; 2],
    pub size: [usize; 2],
}

pub struct LoadedImage {
    pub tiles: Vec<Tile>,
    pub mask: Option<Arc<MaskImage>>,
    pub size: [usize; 2],
}

struct DecodedImage {
    tiles: Vec<([usize; 2], egui::ColorImage)>,
    mask: Option<MaskImage>,
    size: [usize; 2],
}

/// An image whose tiles are being uploaded over several frames.
struct Uploading {
    path: PathBuf,
    pending: Vec<([usize; 2], egui::ColorImage)>,
    done: LoadedImage,
}

pub enum ImageState<'a> {
    Loading,
    Ready(&'a LoadedImage),
    Failed(&'a str),
}

type Decoded = (PathBuf, Result<DecodedImage, String>);

pub struct ImageLoader {
    ready: HashMap<PathBuf, Result<LoadedImage, String>>,
    order: VecDeque<PathBuf>,
    pending: Vec<PathBuf>,
    uploading: Vec<Uploading>,
    sender: mpsc::Sender<Decoded>,
    receiver: mpsc::Receiver<Decoded>,
    ctx: egui::Context,
}

/// Images larger than this per side are shown downscaled (the overlay is resolution-free).
const MAX_SHOWN_SIDE: u32 = 8192;

fn decode(path: &Path, mask: Option<&Path>) -> Result<DecodedImage, String> {
    let mut image = open_image(path)?;
    if image.width().max(image.height()) > MAX_SHOWN_SIDE {
        *image = image.thumbnail(MAX_SHOWN_SIDE, MAX_SHOWN_SIDE);
    }
    let rgba = image.to_rgba8();
    let (width, height) = (rgba.width() as usize, rgba.height() as usize);
    let mut tiles = Vec::new();
    for top in (0..height).step_by(TILE_SIDE) {
        for left in (0..width).step_by(TILE_SIDE) {
            let (w, h) = (TILE_SIDE.min(width - left), TILE_SIDE.min(height - top));
            let tile = image::imageops::crop_imm(&rgba, left as u32, top as u32, w as u32, h as u32).to_image();
            tiles.push(([left, top], egui::ColorImage::from_rgba_unmultiplied([w, h], tile.as_raw())));
        }
    }
    // The image's decode budget is released before the mask takes its own (never hold one while waiting).
    drop(image);
    let mask = match mask {
        Some(mask_path) => {
            Some(MaskImage::from_gray(open_image(mask_path).map_err(|e| format!("mask: {e}"))?.to_luma8()))
        }
        None => None,
    };
    Ok(DecodedImage { tiles, mask, size: [width, height] })
}

impl ImageLoader {
    pub fn spawn(ctx: egui::Context) -> Self {
        let (sender, receiver) = mpsc::channel();
        Self {
            ready: HashMap::new(),
            order: VecDeque::new(),
            pending: Vec::new(),
            uploading: Vec::new(),
            sender,
            receiver,
            ctx,
        }
    }

    /// The image at `path`, starting its decode on first request.
    pub fn get(&mut self, path: &Path, mask: Option<&Path>) -> ImageState<'_> {
        if !self.ready.contains_key(path) && !self.pending.iter().any(|p| p == path) {
            self.pending.push(path.to_path_buf());
            let sender = self.sender.clone();
            let ctx = self.ctx.clone();
            let (path, mask) = (path.to_path_buf(), mask.map(Path::to_path_buf));
            rayon::spawn(move || {
                let result = decode(&path, mask.as_deref());
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

    /// Takes what finished decoding and uploads tiles within this frame's budget; returns how many it uploaded.
    pub fn receive(&mut self, ctx: &egui::Context) -> usize {
        let mut uploaded = 0;
        while let Ok((path, result)) = self.receiver.try_recv() {
            match result {
                Ok(decoded) => {
                    let mut pending = decoded.tiles;
                    pending.reverse();
                    let done = LoadedImage { tiles: Vec::new(), mask: decoded.mask.map(Arc::new), size: decoded.size };
                    self.uploading.push(Uploading { path, pending, done });
                }
                Err(reason) => self.finish(path, Err(reason)),
            }
        }
        let mut budget = UPLOAD_BUDGET;
        while let Some(current) = self.uploading.first_mut() {
            while budget > 0 {
                let Some((origin, tile)) = current.pending.pop() else { break };
                budget = budget.saturating_sub(tile.pixels.len() * 4);
                let size = tile.size;
                let name = format!("{} @{},{}", current.path.display(), origin[0], origin[1]);
                let texture = ctx.load_texture(name, tile, egui::TextureOptions::LINEAR);
                current.done.tiles.push(Tile { texture, origin, size });
                uploaded += 1;
            }
            if !current.pending.is_empty() {
                ctx.request_repaint();
                break;
            }
            let finished = self.uploading.remove(0);
            self.finish(finished.path, Ok(finished.done));
        }
        uploaded
    }

    fn finish(&mut self, path: PathBuf, loaded: Result<LoadedImage, String>) {
        self.pending.retain(|p| p != &path);
        if self.order.len() >= CACHED_IMAGES {
            if let Some(oldest) = self.order.pop_front() {
                self.ready.remove(&oldest);
            }
        }
        self.order.push_back(path.clone());
        self.ready.insert(path, loaded);
    }
}
