//! The gallery's thumbnails as textures, at most [`KEPT_TEXTURES`] of them: the ones shown longest ago are
//! dropped first, so scrolling through 20,000 images holds a screenful and some history, not the folder. An
//! image the import made no thumbnail for (a training image: the import reads only headers) is decoded on
//! rayon's pool when the gallery first shows it; a request the gallery has scrolled past before its turn came
//! is dropped unread.

use super::workspace::{thumbnail_of, StudioImage};
use eframe::egui;
use loupe_engine::dataset::decode::open_image;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

/// Thumbnail textures kept (112² RGBA: 50 KB each, 100 MB in all).
const KEPT_TEXTURES: usize = 2048;
/// A decode requested this many frames ago whose image the gallery no longer asks for is skipped.
const STALE_FRAMES: u64 = 3;
/// Decodes waiting or running at once: a fast scroll does not queue thousands.
const MAX_IN_FLIGHT: usize = 48;

pub enum ThumbnailState<'a> {
    Loading,
    Ready(&'a egui::TextureHandle),
    Failed(&'a str),
}

struct Shown {
    thumbnail: Result<egui::TextureHandle, String>,
    last_frame: u64,
}

/// What a decode sends back: the images' generation, its index, and the thumbnail (`None`: skipped as stale).
type Finished = (u64, usize, Option<Result<egui::ColorImage, String>>);

pub struct Thumbnails {
    /// Textures kept at most ([`KEPT_TEXTURES`]).
    capacity: usize,
    shown: HashMap<usize, Shown>,
    pending: HashSet<usize>,
    /// Bumped when the images change: results for the old list are dropped.
    generation: u64,
    frame: u64,
    /// Per pending index, the last frame the gallery asked for it (read by the decodes to skip stale ones).
    wanted: Arc<std::sync::Mutex<HashMap<usize, u64>>>,
    current_frame: Arc<AtomicU64>,
    sender: mpsc::Sender<Finished>,
    receiver: mpsc::Receiver<Finished>,
}

impl Default for Thumbnails {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel();
        Self {
            capacity: KEPT_TEXTURES,
            shown: HashMap::new(),
            pending: HashSet::new(),
            generation: 0,
            frame: 0,
            wanted: Arc::default(),
            current_frame: Arc::default(),
            sender,
            receiver,
        }
    }
}

impl Thumbnails {
    /// The images changed (a new import): every index means another image now.
    pub fn clear(&mut self) {
        self.shown.clear();
        self.pending.clear();
        self.wanted.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.generation += 1;
    }

    /// Whether a decode the gallery asked for has not come back yet.
    pub fn is_loading(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Call once per frame: takes finished decodes and drops the textures shown longest ago.
    pub fn begin_frame(&mut self, ctx: &egui::Context) {
        self.frame += 1;
        self.current_frame.store(self.frame, Ordering::Relaxed);
        while let Ok((generation, index, result)) = self.receiver.try_recv() {
            if generation != self.generation {
                continue;
            }
            self.pending.remove(&index);
            self.wanted.lock().unwrap_or_else(|p| p.into_inner()).remove(&index);
            if let Some(result) = result {
                let thumbnail =
                    result.map(|image| ctx.load_texture(format!("thumbnail {index}"), image, Default::default()));
                self.shown.insert(index, Shown { thumbnail, last_frame: self.frame });
            }
        }
        if self.shown.len() > self.capacity {
            let mut by_age: Vec<(u64, usize)> = self.shown.iter().map(|(&i, s)| (s.last_frame, i)).collect();
            by_age.sort_unstable();
            for (_, index) in &by_age[..self.shown.len() - self.capacity * 3 / 4] {
                self.shown.remove(index);
            }
        }
    }

    /// Image `index`'s thumbnail, starting its decode when it has none yet.
    pub fn get(&mut self, ctx: &egui::Context, index: usize, image: &StudioImage) -> ThumbnailState<'_> {
        if !self.shown.contains_key(&index) {
            if let Some(thumbnail) = &image.thumbnail {
                let texture = ctx.load_texture(format!("thumbnail {index}"), (**thumbnail).clone(), Default::default());
                self.shown.insert(index, Shown { thumbnail: Ok(texture), last_frame: self.frame });
            } else {
                self.request(ctx, index, image);
            }
        }
        match self.shown.get_mut(&index) {
            None => ThumbnailState::Loading,
            Some(shown) => {
                shown.last_frame = self.frame;
                match &shown.thumbnail {
                    Ok(texture) => ThumbnailState::Ready(texture),
                    Err(reason) => ThumbnailState::Failed(reason),
                }
            }
        }
    }

    fn request(&mut self, ctx: &egui::Context, index: usize, image: &StudioImage) {
        if self.pending.len() >= MAX_IN_FLIGHT && !self.pending.contains(&index) {
            return;
        }
        // Still wanted in this frame: a pending decode that has not started will run.
        self.wanted.lock().unwrap_or_else(|p| p.into_inner()).insert(index, self.frame);
        if !self.pending.insert(index) {
            return;
        }
        let (sender, ctx, path) = (self.sender.clone(), ctx.clone(), image.path.clone());
        let (wanted, current_frame, generation) = (self.wanted.clone(), self.current_frame.clone(), self.generation);
        rayon::spawn(move || {
            let asked = wanted.lock().unwrap_or_else(|p| p.into_inner()).remove(&index).unwrap_or(0);
            let result = (asked + STALE_FRAMES >= current_frame.load(Ordering::Relaxed))
                .then(|| open_image(&path).map(|opened| thumbnail_of(&opened)));
            let _ = sender.send((generation, index, result));
            ctx.request_repaint();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::project::Source;
    use crate::studio::workspace::{import, ImageIds};

    #[test]
    fn training_thumbnails_are_decoded_when_shown_and_the_oldest_dropped() {
        let dir = std::env::temp_dir().join(format!("loupe-thumbnails-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        loupe_engine::dataset::synthetic::generate_mvtec(
            &dir,
            &loupe_engine::dataset::synthetic::SyntheticSpec::tiny(3),
        )
        .unwrap();
        let progress = loupe_engine::progress::NoProgress;
        let images =
            import(&dir, &[Source::Benchmark(dir.clone())], 64, &ImageIds::default(), &progress).unwrap().images;
        let trains: Vec<usize> = (0..images.len()).filter(|&i| images[i].thumbnail.is_none()).collect();
        assert!(trains.len() > 8, "{} training images", trains.len());
        let ctx = egui::Context::default();
        let mut thumbnails = Thumbnails { capacity: 8, ..Default::default() };
        // Show the training images four at a time, as a scrolling gallery would.
        for screen in trains.chunks(4) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                thumbnails.begin_frame(&ctx);
                let ready = screen
                    .iter()
                    .filter(|&&i| matches!(thumbnails.get(&ctx, i, &images[i]), ThumbnailState::Ready(_)))
                    .count();
                if ready == screen.len() {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "thumbnails never arrived");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(thumbnails.shown.len() <= 8 + 4, "{} textures kept", thumbnails.shown.len());
        }
        thumbnails.begin_frame(&ctx);
        assert!(thumbnails.shown.len() <= 8);
        let last = trains.last().unwrap();
        assert!(thumbnails.shown.contains_key(last), "the most recently shown stay");
        assert!(!thumbnails.shown.contains_key(&trains[0]), "the first shown were dropped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
