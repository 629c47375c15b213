//! The images a fit trains on: each file decoded once, in parallel chunks, into a [`RecordStore`] that keeps
//! [`TRAINING_IMAGES_IN_MEMORY`] bytes in memory and the rest in a temporary file. Methods read them in batches
//! or by index as often as they like; the fit's memory no longer grows with the folder.

use super::decode::{decode_all, DecodedImage, SkippedFile};
use super::layout::ImageRecord;
use super::record_store::RecordStore;
use crate::geometry::{open_cut, training_inputs, InputGeometry};
use crate::progress::{check_cancelled, Progress};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::borrow::Borrow;
use std::ops::Range;

/// Bytes of decoded training images a fit keeps in memory: 2,700 images at 256² (MTD's 685 and every
/// MVTec category fit whole), the rest is read back from the temporary file.
pub const TRAINING_IMAGES_IN_MEMORY: usize = 512 << 20;
/// The same for the held-out validation images, which are read once (MTD's 76 fit; 2,000 of a 20,000-image
/// folder would otherwise add 390 MB).
pub const VALIDATION_IMAGES_IN_MEMORY: usize = 128 << 20;
/// Files decoded at once: enough to keep every core busy, few enough to hold (≈ 50 MB at 256²).
const DECODE_CHUNK: usize = 256;

/// Decoded images at one square size, by position `0..len()`.
pub struct TrainingImages {
    size: u32,
    pixels: RecordStore<u8>,
    /// Per image: the index of its record in the list it was decoded from, and the file's size.
    origins: Vec<(usize, (u32, u32))>,
}

impl TrainingImages {
    /// Decodes `records` at `size`, skipping (and returning) the files that cannot be read. Advances
    /// `progress` by one per file and stops with `Cancelled` between chunks when asked.
    pub fn decode(
        records: &[ImageRecord],
        size: u32,
        memory_budget: usize,
        progress: &dyn Progress,
    ) -> Result<(Self, Vec<SkippedFile>)> {
        let mut images = Self::empty(size, memory_budget);
        let mut skipped = Vec::new();
        for (chunk_index, chunk) in records.chunks(DECODE_CHUNK).enumerate() {
            check_cancelled(progress)?;
            let (decoded, chunk_skipped) = decode_all(chunk, size, &|n| progress.advance(n as u64));
            skipped.extend(chunk_skipped);
            for mut image in decoded {
                image.index += chunk_index * DECODE_CHUNK;
                images.push(&image)?;
            }
        }
        Ok((images, skipped))
    }

    /// [`Self::decode`] as `geometry` cuts each image: one training input per view its region keeps (every tile
    /// of a tiled model), each tagged with its file's record index. Large images are cut a few at a time.
    pub fn decode_cut(
        records: &[ImageRecord],
        size: u32,
        geometry: &InputGeometry,
        memory_budget: usize,
        progress: &dyn Progress,
    ) -> Result<(Self, Vec<SkippedFile>)> {
        if geometry.is_whole_image() {
            return Self::decode(records, size, memory_budget, progress);
        }
        let mut images = Self::empty(size, memory_budget);
        let mut skipped = Vec::new();
        let chunk = 2 * rayon::current_num_threads().max(1);
        for (chunk_index, chunk_records) in records.chunks(chunk).enumerate() {
            check_cancelled(progress)?;
            let cut: Vec<_> = chunk_records
                .par_iter()
                .enumerate()
                .map(|(i, record)| {
                    let inputs = open_cut(record, geometry, size)
                        .map(|image| training_inputs(chunk_index * chunk + i, &image, size));
                    progress.advance(1);
                    inputs
                })
                .collect();
            for result in cut {
                match result {
                    Ok(inputs) => inputs.iter().try_for_each(|input| images.push(input))?,
                    Err(skip) => skipped.push(skip),
                }
            }
        }
        Ok((images, skipped))
    }

    /// Images decoded already (tests, small sets), all in memory.
    pub fn from_decoded(decoded: &[DecodedImage]) -> Result<Self> {
        let size = decoded.first().map_or(0, |image| image.size);
        let mut images = Self::empty(size, usize::MAX);
        for image in decoded {
            images.push(image)?;
        }
        Ok(images)
    }

    fn empty(size: u32, memory_budget: usize) -> Self {
        let record_len = (size * size * 3) as usize;
        Self { size, pixels: RecordStore::new("training images", record_len, memory_budget), origins: Vec::new() }
    }

    fn push(&mut self, image: &DecodedImage) -> Result<()> {
        if image.size != self.size {
            bail!("training image {} is {}² among images of {}²", image.index, image.size, self.size);
        }
        self.pixels.extend(&image.rgb)?;
        self.origins.push((image.index, image.original_size));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.origins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// The files the images came from: fewer than [`Self::len`] when each gives several tiles.
    pub fn source_files(&self) -> usize {
        let mut indices: Vec<usize> = self.origins.iter().map(|&(index, _)| index).collect();
        indices.dedup();
        indices.len()
    }

    /// Side of the square images.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Images kept in the temporary file rather than in memory.
    pub fn spilled(&self) -> usize {
        self.pixels.spilled()
    }

    /// Image `position`.
    pub fn get(&self, position: usize) -> Result<DecodedImage> {
        let Some(&(index, original_size)) = self.origins.get(position) else {
            bail!("training image {position} of {}", self.len())
        };
        Ok(DecodedImage { index, original_size, size: self.size, rgb: self.pixels.record(position)?, mask: None })
    }

    /// Images at `positions`, in that order.
    pub fn select(&self, positions: impl IntoIterator<Item = impl Borrow<usize>>) -> Result<Vec<DecodedImage>> {
        positions.into_iter().map(|position| self.get(*position.borrow())).collect()
    }

    /// The images at `positions` in batches of `batch_size`, in order: what a pass over the training set reads.
    pub fn batches(
        &self,
        positions: Range<usize>,
        batch_size: usize,
    ) -> impl Iterator<Item = Result<Vec<DecodedImage>>> + '_ {
        let end = positions.end.min(self.len());
        (positions.start..end)
            .step_by(batch_size.max(1))
            .map(move |first| self.select(first..(first + batch_size.max(1)).min(end)))
    }

    /// Every image in batches of `batch_size`.
    pub fn all_batches(&self, batch_size: usize) -> impl Iterator<Item = Result<Vec<DecodedImage>>> + '_ {
        self.batches(0..self.len(), batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    #[test]
    fn images_beyond_the_budget_read_back_equal_to_a_plain_decode() {
        let dir = std::env::temp_dir().join(format!("loupe-training-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut records = Vec::new();
        for i in 0..7u8 {
            let path = dir.join(format!("{i}.png"));
            image::RgbImage::from_fn(20 + i as u32, 12, |x, y| image::Rgb([i * 30, x as u8 * 9, y as u8 * 17]))
                .save(&path)
                .unwrap();
            records.push(ImageRecord::normal(path));
        }
        let broken = dir.join("broken.png");
        std::fs::write(&broken, b"not an image").unwrap();
        records.insert(3, ImageRecord::normal(broken.clone()));
        let (plain, plain_skipped) = decode_all(&records, 16, &|_| {});
        // Room for two images in memory: five go to the file.
        let (images, skipped) = TrainingImages::decode(&records, 16, 2 * 16 * 16 * 3, &NoProgress).unwrap();
        assert_eq!(skipped, plain_skipped);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].path, broken);
        assert_eq!((images.len(), images.spilled()), (7, 5));
        for (position, expected) in plain.iter().enumerate() {
            let image = images.get(position).unwrap();
            assert_eq!((image.index, image.original_size), (expected.index, expected.original_size));
            assert_eq!(image.rgb, expected.rgb, "image {position}");
        }
        let batches: Vec<Vec<usize>> =
            images.all_batches(3).map(|batch| batch.unwrap().iter().map(|i| i.index).collect()).collect();
        assert_eq!(batches, [vec![0, 1, 2], vec![4, 5, 6], vec![7]], "record indices skip the broken file");
        assert_eq!(images.batches(5..20, 4).count(), 1, "a range past the end stops at the end");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
