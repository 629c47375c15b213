//! Decoding image files into model inputs, in parallel. Every failure is a `SkippedFile` naming the file and the
//! reason; the caller reports them and carries on with the rest.

use super::layout::ImageRecord;
use image::{imageops::FilterType, DynamicImage, ImageReader};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Largest side accepted; anything bigger is refused as a likely decompression bomb.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Decoder allocation ceiling (bytes).
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

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

/// Opens and decodes one file with size limits, with a message fit for a person.
pub fn open_image(path: &Path) -> Result<DynamicImage, String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read ({e})"))?;
    if metadata.len() == 0 {
        return Err("empty file (0 bytes)".into());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read ({e})"))?;
    // The content decides the format, not the extension: a text file named .jpg is "not an image".
    let format = image::guess_format(&bytes).map_err(|_| "not an image (unrecognised content)".to_string())?;
    let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            format!("refused: larger than {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} or {MAX_DECODE_BYTES} bytes decoded (possible decompression bomb)")
        }
        image::ImageError::Decoding(d) => format!("corrupt or truncated image ({d})"),
        image::ImageError::IoError(e) => format!("corrupt or truncated image ({e})"),
        image::ImageError::Unsupported(u) => format!("unsupported image ({u})"),
        other => format!("cannot decode ({other})"),
    })
}

fn decode_one(index: usize, record: &ImageRecord, size: u32) -> Result<DecodedImage, SkippedFile> {
    let skip = |path: &Path, reason: String| SkippedFile { path: path.to_path_buf(), reason };
    let image = open_image(&record.path).map_err(|reason| skip(&record.path, reason))?;
    let original_size = (image.width(), image.height());
    let rgb = image.resize_exact(size, size, FilterType::Triangle).to_rgb8().into_raw();
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
    let results: Vec<Result<DecodedImage, SkippedFile>> = records
        .par_iter()
        .enumerate()
        .map(|(index, record)| {
            let result = decode_one(index, record, size);
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
        let mask = dir.join("mask.png");
        image::GrayImage::new(5, 5).save(&mask).unwrap();
        let mut records: Vec<ImageRecord> = [&good, &gray16, &rgba, &empty, &text, &truncated, &bomb]
            .iter()
            .map(|p| ImageRecord::normal(p.to_path_buf()))
            .collect();
        records.push(ImageRecord {
            path: good.clone(),
            label: Label::Anomalous { defect_type: "spot".into() },
            mask: Some(mask.clone()),
        });
        let (images, skipped) = decode_all(&records, 16, &|_| {});
        assert_eq!(images.len(), 3);
        assert_eq!(images[1].rgb[0], 255, "16-bit white stays white");
        let reason = |p: &Path| skipped.iter().find(|s| s.path == p).map(|s| s.reason.clone()).unwrap();
        assert!(reason(&empty).contains("empty file"));
        assert!(reason(&text).contains("not an image"));
        assert!(reason(&truncated).contains("corrupt or truncated"), "{}", reason(&truncated));
        assert!(reason(&bomb).contains("decompression bomb"), "{}", reason(&bomb));
        assert!(reason(&mask).contains("mask is 5×5 but its image"), "{}", reason(&mask));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A PNG that claims huge dimensions: the decoder must refuse it before allocating.
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
