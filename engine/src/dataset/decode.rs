//! Decoding image files into model inputs, in parallel. Every failure is a `SkippedFile` naming the file and the
//! reason; the caller reports them and carries on with the rest.

use super::layout::ImageRecord;
use image::{imageops::FilterType, DynamicImage, ImageDecoder, ImageReader};
use rayon::prelude::*;
use std::io::Seek;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

/// Largest side accepted; anything bigger is refused as a likely decompression bomb.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Decoder allocation ceiling per image (bytes).
pub const MAX_DECODE_BYTES: u64 = 1 << 30;
/// Most bytes of decoded pixels held at once by all the images being opened: decoding runs on every core, and
/// without this a folder of large images would take several times [`MAX_DECODE_BYTES`] together.
pub const MAX_DECODING_BYTES: u64 = 3 << 29;

/// Bytes of decoded pixels in flight, shared by every thread that opens images. An image waits until its bytes
/// fit; one larger than the whole budget waits until it is alone.
pub struct DecodeBudget {
    limit: u64,
    in_flight: Mutex<u64>,
    freed: Condvar,
}

impl DecodeBudget {
    pub const fn new(limit: u64) -> Self {
        Self { limit, in_flight: Mutex::new(0), freed: Condvar::new() }
    }

    /// Blocks until `bytes` (at most the whole budget) fit, then holds them until the permit is dropped.
    pub fn acquire(&self, bytes: u64) -> DecodePermit<'_> {
        let bytes = bytes.min(self.limit);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while *in_flight + bytes > self.limit {
            in_flight = self.freed.wait(in_flight).unwrap_or_else(|p| p.into_inner());
        }
        *in_flight += bytes;
        DecodePermit { budget: self, bytes }
    }

    pub fn in_flight(&self) -> u64 {
        *self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bytes held in a [`DecodeBudget`] while an opened image lives.
pub struct DecodePermit<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl Drop for DecodePermit<'_> {
    fn drop(&mut self) {
        *self.budget.in_flight.lock().unwrap_or_else(|p| p.into_inner()) -= self.bytes;
        self.budget.freed.notify_all();
    }
}

static DECODE_BUDGET: DecodeBudget = DecodeBudget::new(MAX_DECODING_BYTES);

/// A decoded image and its share of the decode budget, released when it is dropped: keep it only while its
/// pixels are needed at full size (resize, thumbnail, convert), then drop it.
pub struct OpenedImage {
    pub image: DynamicImage,
    _permit: DecodePermit<'static>,
}

impl std::ops::Deref for OpenedImage {
    type Target = DynamicImage;
    fn deref(&self) -> &DynamicImage {
        &self.image
    }
}

impl std::ops::DerefMut for OpenedImage {
    fn deref_mut(&mut self) -> &mut DynamicImage {
        &mut self.image
    }
}

/// A JPEG's data ends with an end-of-image marker after its last start-of-scan. The decoder fills a truncated
/// scan with grey without an error, so a cut-off file (an interrupted copy) would otherwise train as an image.
fn check_complete(format: image::ImageFormat, bytes: &[u8]) -> Result<(), String> {
    if format != image::ImageFormat::Jpeg {
        return Ok(());
    }
    let last_marker = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last_marker(0xDA), last_marker(0xD9)) {
        (Some(scan), Some(end)) if end > scan => Ok(()),
        _ => Err("corrupt or truncated image (the JPEG data ends before its end-of-image marker)".into()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for SkippedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// An image resized to the model's square input, RGB, row-major `size × size × 3`.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    /// Index of the record this came from.
    pub index: usize,
    pub original_size: (u32, u32),
    pub size: u32,
    pub rgb: Vec<u8>,
    /// Ground-truth mask at `size × size`, 1 = defect, when the record has one.
    pub mask: Option<Vec<u8>>,
}

impl DecodedImage {
    /// Planar float copy in [0, 1]: `3 × size × size`.
    pub fn to_chw_f32(&self) -> Vec<f32> {
        let plane = (self.size * self.size) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = px[c] as f32 / 255.0;
            }
        }
        out
    }
}

/// Opens and decodes one file with size limits, within the shared decode budget, with a message fit for a
/// person.
pub fn open_image(path: &Path) -> Result<OpenedImage, String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read ({e})"))?;
    if metadata.len() == 0 {
        return Err("empty file (0 bytes)".into());
    }
    if metadata.len() > MAX_DECODE_BYTES {
        return Err(format!(
            "refused: {} bytes is larger than any image Loupe reads ({MAX_DECODE_BYTES})",
            metadata.len()
        ));
    }
    let reading = DECODE_BUDGET.acquire(metadata.len());
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read ({e})"))?;
    // `decode_image` takes the file's and the pixels' share at once: a thread never holds one share while it
    // waits for another.
    drop(reading);
    decode_image(bytes)
}

/// Decodes an image file's bytes with size limits, within the shared decode budget (the file's bytes and the
/// decoded pixels), with a message fit for a person.
pub fn decode_image(bytes: Vec<u8>) -> Result<OpenedImage, String> {
    let file_bytes = bytes.len() as u64;
    if let Ok(format) = image::guess_format(&bytes) {
        check_complete(format, &bytes)?;
    }
    let decoder = checked_decoder(std::io::Cursor::new(bytes))?;
    // The file, the decoded pixels and one converted copy (RGB for the model, RGBA for the studio) at most.
    let (width, height) = decoder.dimensions();
    let converted = width as u64 * height as u64 * 4;
    let permit = DECODE_BUDGET.acquire(file_bytes.saturating_add(decoder.total_bytes()).saturating_add(converted));
    let image = DynamicImage::from_decoder(decoder).map_err(describe_image_error)?;
    Ok(OpenedImage { image, _permit: permit })
}

/// An image file's width and height from its header, with the checks of [`open_image`] that need no pixels: an
/// empty file, content that is no image, sides beyond the limits. Damage further into the file is found when
/// the image is decoded. For listing thousands of files quickly (the studio's training images).
pub fn probe_image(path: &Path) -> Result<(u32, u32), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read ({e})"))?;
    let length = file.metadata().map_err(|e| format!("cannot read ({e})"))?.len();
    if length == 0 {
        return Err("empty file (0 bytes)".into());
    }
    checked_decoder(std::io::BufReader::new(file)).map(|decoder| decoder.dimensions())
}

/// A decoder for an image's data, after the checks every reading makes before pixels are decoded: the content
/// decides the format, not the extension (a text file named .jpg is "not an image"); the sides and the decoded
/// bytes are within the limits.
fn checked_decoder<R: std::io::BufRead + Seek + 'static>(mut data: R) -> Result<Box<dyn ImageDecoder>, String> {
    let mut head = [0u8; 16];
    let read = data.read(&mut head).map_err(|e| format!("cannot read ({e})"))?;
    if read == 0 {
        return Err("empty file (0 bytes)".into());
    }
    let format = image::guess_format(&head[..read]).map_err(|_| "not an image (unrecognised content)".to_string())?;
    data.seek(std::io::SeekFrom::Start(0)).map_err(|e| format!("cannot read ({e})"))?;
    let mut reader = ImageReader::with_format(data, format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits.clone());
    let decoder = reader.into_decoder().map_err(describe_image_error)?;
    // `into_decoder` checks the sides, not the pixels' bytes: `ImageReader::decode` reserves them against the
    // limit itself, and so must we (a 16,384² 16-bit RGBA header asks for 2 GiB).
    let mut budget = limits;
    budget.reserve(decoder.total_bytes()).map_err(describe_image_error)?;
    Ok(Box::new(decoder))
}

fn describe_image_error(error: image::ImageError) -> String {
    match error {
        image::ImageError::Limits(_) => {
            format!("refused: larger than {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} or {MAX_DECODE_BYTES} bytes decoded (possible decompression bomb)")
        }
        image::ImageError::Decoding(d) => format!("corrupt or truncated image ({d})"),
        image::ImageError::IoError(e) => format!("corrupt or truncated image ({e})"),
        image::ImageError::Unsupported(u) => format!("unsupported image ({u})"),
        other => format!("cannot decode ({other})"),
    }
}

/// An image already at a model's input size, made by whoever had the file open anyway (the studio's import,
/// while it draws the thumbnail), so scoring does not decode it again.
#[derive(Debug, Clone)]
pub struct ResizedImage {
    pub original_size: (u32, u32),
    /// RGB, row-major `size × size × 3`.
    pub rgb: Vec<u8>,
}

impl ResizedImage {
    /// `image` resized to the model's square input, as every decode path does it.
    pub fn of(image: &DynamicImage, size: u32) -> Self {
        let full = image.to_rgb8();
        let rgb =
            super::resize::resize_rgb(full.as_raw(), full.width() as usize, full.height() as usize, size as usize);
        Self { original_size: (image.width(), image.height()), rgb }
    }
}

fn decode_one(
    index: usize,
    record: &ImageRecord,
    size: u32,
    resized: Option<ResizedImage>,
) -> Result<DecodedImage, SkippedFile> {
    let skip = |path: &Path, reason: String| SkippedFile { path: path.to_path_buf(), reason };
    let ResizedImage { original_size, rgb } = match resized {
        Some(resized) if resized.rgb.len() == (size * size * 3) as usize => resized,
        _ => {
            let image = open_image(&record.path).map_err(|reason| skip(&record.path, reason))?;
            // Its budget is released (dropped here) before the mask takes its own: a thread never holds one
            // permit while waiting for another.
            ResizedImage::of(&image, size)
        }
    };
    let mask = match &record.mask {
        None => None,
        Some(mask_path) => {
            let mask = open_image(mask_path).map_err(|reason| skip(mask_path, format!("mask: {reason}")))?;
            if (mask.width(), mask.height()) != original_size {
                return Err(skip(
                    mask_path,
                    format!(
                        "mask is {}×{} but its image {} is {}×{}",
                        mask.width(),
                        mask.height(),
                        record.path.display(),
                        original_size.0,
                        original_size.1
                    ),
                ));
            }
            let gray = mask.resize_exact(size, size, FilterType::Nearest).to_luma8();
            Some(gray.into_raw().into_iter().map(|v| u8::from(v > 127)).collect())
        }
    };
    Ok(DecodedImage { index, original_size, size, rgb, mask })
}

/// Decodes all records in parallel, keeping record order. Returns the images and the files that were skipped.
pub fn decode_all(
    records: &[ImageRecord],
    size: u32,
    on_done: &(dyn Fn(usize) + Sync),
) -> (Vec<DecodedImage>, Vec<SkippedFile>) {
    decode_all_reusing(records, size, &|_| None, on_done)
}

/// [`decode_all`], taking a record's pixels from `resized` (by record index) where it has them at `size`: only
/// the rest, and the masks, are read from disk.
pub fn decode_all_reusing(
    records: &[ImageRecord],
    size: u32,
    resized: &(dyn Fn(usize) -> Option<ResizedImage> + Sync),
    on_done: &(dyn Fn(usize) + Sync),
) -> (Vec<DecodedImage>, Vec<SkippedFile>) {
    let results: Vec<Result<DecodedImage, SkippedFile>> = records
        .par_iter()
        .enumerate()
        .map(|(index, record)| {
            let result = decode_one(index, record, size, resized(index));
            on_done(1);
            result
        })
        .collect();
    let mut images = Vec::with_capacity(results.len());
    let mut skipped = Vec::new();
    for result in results {
        match result {
            Ok(image) => images.push(image),
            Err(skip) => skipped.push(skip),
        }
    }
    (images, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::layout::Label;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("loupe-decode-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bad_files_are_skipped_with_reasons_and_good_ones_kept() {
        let dir = temp_dir("bad");
        let good = dir.join("good.png");
        image::RgbImage::from_pixel(20, 10, image::Rgb([10, 200, 30])).save(&good).unwrap();
        let gray16 = dir.join("gray16.png");
        image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(8, 8, image::Luma([65535u16])).save(&gray16).unwrap();
        let rgba = dir.join("rgba.tiff");
        image::RgbaImage::from_pixel(7, 9, image::Rgba([1, 2, 3, 4])).save(&rgba).unwrap();
        let empty = dir.join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        let text = dir.join("text.jpg");
        std::fs::write(&text, b"hello, not an image").unwrap();
        let truncated = dir.join("truncated.png");
        let bytes = std::fs::read(&good).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let bomb = dir.join("bomb.png");
        write_png_header_only(&bomb, 100_000, 100_000);
        // A JPEG cut off after 3,000 bytes (an interrupted copy): the decoder alone fills the rest with grey.
        let photo = dir.join("photo.jpg");
        let mut rng = crate::rng::SplitMix64::new(3);
        image::RgbImage::from_fn(256, 256, |_, _| image::Rgb([rng.below(256) as u8, 90, 40])).save(&photo).unwrap();
        let cut_jpeg = dir.join("cut.jpg");
        let bytes = std::fs::read(&photo).unwrap();
        assert!(bytes.len() > 20_000);
        std::fs::write(&cut_jpeg, &bytes[..3000]).unwrap();
        let mask = dir.join("mask.png");
        image::GrayImage::new(5, 5).save(&mask).unwrap();
        let mut records: Vec<ImageRecord> =
            [&good, &gray16, &rgba, &empty, &text, &truncated, &bomb, &cut_jpeg, &photo]
                .iter()
                .map(|p| ImageRecord::normal(p.to_path_buf()))
                .collect();
        records.push(ImageRecord {
            path: good.clone(),
            label: Label::Anomalous { defect_type: "spot".into() },
            mask: Some(mask.clone()),
        });
        let (images, skipped) = decode_all(&records, 16, &|_| {});
        assert_eq!(images.len(), 4, "{skipped:?}");
        assert_eq!(images[1].rgb[0], 255, "16-bit white stays white");
        let reason = |p: &Path| skipped.iter().find(|s| s.path == p).map(|s| s.reason.clone()).unwrap();
        assert!(reason(&empty).contains("empty file"));
        assert!(reason(&text).contains("not an image"));
        assert!(reason(&truncated).contains("corrupt or truncated"), "{}", reason(&truncated));
        assert!(reason(&bomb).contains("decompression bomb"), "{}", reason(&bomb));
        assert!(reason(&cut_jpeg).contains("corrupt or truncated"), "{}", reason(&cut_jpeg));
        assert!(reason(&mask).contains("mask is 5×5 but its image"), "{}", reason(&mask));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn decoding_waits_for_its_share_of_the_budget() {
        let budget = DecodeBudget::new(100);
        let first = budget.acquire(70);
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                let _second = budget.acquire(50);
                budget.in_flight()
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(budget.in_flight(), 70, "the second image waits while the first holds 70 of 100");
            drop(first);
            assert_eq!(waiting.join().unwrap(), 50);
        });
        // One image larger than the whole budget goes through alone.
        let huge = budget.acquire(1_000);
        assert_eq!(budget.in_flight(), 100);
        drop(huge);
        assert_eq!(budget.in_flight(), 0);
    }

    /// A PNG that claims huge dimensions: the decoder must refuse it before allocating.
    #[test]
    fn probing_reads_the_sides_and_refuses_what_is_no_image_without_decoding() {
        let dir = temp_dir("probe");
        let good = dir.join("good.jpg");
        image::RgbImage::from_pixel(21, 13, image::Rgb([10, 200, 30])).save(&good).unwrap();
        assert_eq!(probe_image(&good), Ok((21, 13)));
        let empty = dir.join("empty.png");
        std::fs::write(&empty, b"").unwrap();
        assert!(probe_image(&empty).unwrap_err().contains("empty file"));
        let text = dir.join("text.png");
        std::fs::write(&text, b"hello, not an image").unwrap();
        assert!(probe_image(&text).unwrap_err().contains("not an image"));
        let bomb = dir.join("bomb.png");
        write_png_header_only(&bomb, 100_000, 100_000);
        assert!(probe_image(&bomb).unwrap_err().contains("decompression bomb"));
        assert!(probe_image(&dir.join("missing.png")).unwrap_err().contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn write_png_header_only(path: &Path, width: u32, height: u32) {
        let mut encoder = Vec::new();
        encoder.extend_from_slice(&[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]);
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        push_chunk(&mut encoder, b"IHDR", &ihdr);
        push_chunk(&mut encoder, b"IEND", &[]);
        std::fs::write(path, encoder).unwrap();
    }

    fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &byte in bytes {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
