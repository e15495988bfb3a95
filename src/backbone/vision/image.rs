//! Image inputs for vision backbones: decoding with its limits checked before
//! the pixels are decoded (a decompression bomb is refused, not decoded), EXIF
//! orientation, conversion to RGB, and the resize / center-crop / normalize
//! preprocessing a backbone was trained with (torchvision's `Resize(shorter)`,
//! `CenterCrop(crop)`, `ToTensor()`, `Normalize(mean, std)`).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::{config::LimitsConfig, Error, Result};

pub use crate::config::Resample;

/// Bounds on what a client may send as an image.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_encoded_bytes: usize,
    /// Width times height, checked from the header before decoding.
    pub max_pixels: u64,
    /// Longer side over shorter side, checked from the header before decoding:
    /// resizing the shorter side of a 1 x 25,000,000 image to 256 would ask for
    /// billions of pixels.
    pub max_aspect_ratio: u32,
    /// Bytes all images being decoded may hold at once (see [`DecodeBudget`]).
    pub max_decoding_bytes: usize,
}

/// Most pixels of an image after its resize, whatever the limits and the
/// preprocessing settings say: a second line behind the aspect-ratio check, so
/// that no image can make the resize allocate more than ~50 MB.
pub const MAX_RESIZED_PIXELS: u64 = 1 << 24;

impl ImageLimits {
    /// The image limits of the request limits in the config.
    pub fn from_config(limits: &LimitsConfig) -> Self {
        Self {
            max_encoded_bytes: limits.max_image_bytes,
            max_pixels: limits.max_image_pixels,
            max_aspect_ratio: limits.max_image_aspect_ratio,
            max_decoding_bytes: limits.max_decoding_bytes,
        }
    }
}

/// Bytes that images being decoded and preprocessed may hold at once, across
/// every request and backbone. Preparation runs before a backbone's queue
/// admits the request, so the queue's bounds do not cover it; this does.
pub struct DecodeBudget {
    /// In KiB, so that one image's share fits a `u32`.
    kib: std::sync::Arc<tokio::sync::Semaphore>,
    total_bytes: usize,
}

/// An image's share of the [`DecodeBudget`], held while it is prepared.
pub struct DecodePermit {
    _kib: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl DecodeBudget {
    pub fn new(total_bytes: usize) -> Self {
        Self {
            kib: std::sync::Arc::new(tokio::sync::Semaphore::new(total_bytes / 1024)),
            total_bytes,
        }
    }

    /// Admits the decoding of `bytes` (an encoded image; its header says how
    /// large it decodes to), or refuses at once when the budget is spent. An
    /// unreadable header takes nothing: decoding will refuse it.
    pub fn admit(&self, index: usize, bytes: &[u8]) -> Result<DecodePermit> {
        let Some((width, height)) = header_dimensions(bytes) else {
            return Ok(DecodePermit { _kib: None });
        };
        // RGBA at 8 bits while decoding, the upper bound of what it allocates.
        let needed = (u64::from(width) * u64::from(height) * 4).div_ceil(1024);
        let needed = u32::try_from(needed).unwrap_or(u32::MAX);
        match std::sync::Arc::clone(&self.kib).try_acquire_many_owned(needed) {
            Ok(permit) => Ok(DecodePermit { _kib: Some(permit) }),
            Err(_) => Err(Error::LimitExceeded(format!(
                "input {index}: images being decoded hold the most memory they may \
                 ({} bytes, limits.max_decoding_bytes); retry shortly",
                self.total_bytes
            ))),
        }
    }
}

/// Width and height from an image's header, without decoding it.
pub fn header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

/// How a backbone wants its pixels.
#[derive(Debug, Clone)]
pub struct Preprocessing {
    /// The shorter side is resized to this, keeping the aspect ratio.
    pub resize_shorter: u32,
    /// Then a centered square of this side is cut out.
    pub crop: u32,
    pub resample: Resample,
    /// Per channel (R, G, B), applied to values scaled to [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

fn invalid(index: usize, reason: impl Into<String>) -> Error {
    Error::InvalidInput {
        index,
        reason: reason.into(),
    }
}

/// Decodes an encoded PNG, JPEG or WebP into upright RGB; `index` names the
/// input in errors.
pub fn decode(index: usize, bytes: &[u8], limits: ImageLimits) -> Result<RgbImage> {
    if bytes.len() > limits.max_encoded_bytes {
        return Err(invalid(
            index,
            format!(
                "image is {} bytes; at most {} are accepted",
                bytes.len(),
                limits.max_encoded_bytes
            ),
        ));
    }
    let format =
        image::guess_format(bytes).map_err(|_| invalid(index, "not a PNG, JPEG or WebP image"))?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(invalid(
            index,
            format!("{format:?} images are not accepted; send PNG, JPEG or WebP"),
        ));
    }
    // The JPEG decoder fills in what a truncated file lacks instead of failing;
    // a JPEG that does not end with its end-of-image marker (trailing padding
    // aside) was cut short.
    if format == ImageFormat::Jpeg && !has_jpeg_end(bytes) {
        return Err(invalid(index, "JPEG is truncated: no end-of-image marker"));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = image::Limits::default();
    // The decoder's own allocation cap, as a second line behind the pixel check:
    // RGBA at 8 bits per channel for the largest image allowed.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(4));
    reader.limits(decoder_limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|err| invalid(index, format!("image header cannot be read: {err}")))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(invalid(index, "image has no pixels"));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(invalid(
            index,
            format!(
                "image is {width}x{height} ({pixels} pixels); at most {} pixels are accepted",
                limits.max_pixels
            ),
        ));
    }
    let (long, short) = (width.max(height), width.min(height));
    if u64::from(long) > u64::from(short) * u64::from(limits.max_aspect_ratio) {
        return Err(invalid(
            index,
            format!(
                "image is {width}x{height}; its longer side may be at most {} times \
                 its shorter side (limits.max_image_aspect_ratio)",
                limits.max_aspect_ratio
            ),
        ));
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|err| invalid(index, format!("image cannot be decoded: {err}")))?;
    image.apply_orientation(orientation);
    // Grayscale is replicated to three channels; alpha is dropped, as
    // Pillow's convert("RGB") does.
    Ok(image.to_rgb8())
}

/// Whether a JPEG ends with its end-of-image marker (0xFFD9), allowing for the
/// zero or 0xFF padding some writers append.
fn has_jpeg_end(bytes: &[u8]) -> bool {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && b != 0xFF)
        .map_or(0, |last| last + 1);
    // The marker's 0xD9 is the last byte that is not padding.
    end >= 2 && bytes[end - 1] == 0xD9 && bytes[end - 2] == 0xFF
}

/// The size torchvision's `Resize(shorter)` gives: the shorter side becomes
/// `shorter`, the longer one keeps the ratio, truncated. None when the result
/// would exceed [`MAX_RESIZED_PIXELS`] (or any side overflows).
pub fn resized_size(width: u32, height: u32, shorter: u32) -> Option<(u32, u32)> {
    if width == 0 || height == 0 {
        return None;
    }
    let scale = |long: u32, short: u32| {
        let scaled = u64::from(shorter).checked_mul(u64::from(long))? / u64::from(short);
        u32::try_from(scaled).ok()
    };
    let (new_width, new_height) = if width <= height {
        (shorter, scale(height, width)?)
    } else {
        (scale(width, height)?, shorter)
    };
    let pixels = u64::from(new_width).checked_mul(u64::from(new_height))?;
    (pixels <= MAX_RESIZED_PIXELS).then_some((new_width, new_height))
}

/// Resizes, crops and normalizes into a `[3, crop, crop]` tensor, row-major;
/// `index` names the input in errors.
pub fn preprocess(index: usize, image: &RgbImage, spec: &Preprocessing) -> Result<Vec<f32>> {
    let (width, height) = image.dimensions();
    let (new_width, new_height) =
        resized_size(width, height, spec.resize_shorter).ok_or_else(|| {
            invalid(
                index,
                format!(
                    "image is {width}x{height}; resized to a shorter side of {} it would \
                     exceed {MAX_RESIZED_PIXELS} pixels",
                    spec.resize_shorter
                ),
            )
        })?;
    let resized = resize(image, new_width, new_height, spec.resample)
        .map_err(|err| invalid(index, format!("cannot resize the image: {err}")))?;
    // torchvision's CenterCrop rounds the offset to the nearest pixel.
    let crop = spec.crop.min(new_width).min(new_height);
    let left = ((f64::from(new_width - crop)) / 2.0).round() as u32;
    let top = ((f64::from(new_height - crop)) / 2.0).round() as u32;

    let area = (crop * crop) as usize;
    let mut out = vec![0f32; 3 * area];
    // value / 255 normalized is value * scale + shift, per channel.
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * spec.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| -spec.mean[c] / spec.std[c]);
    for y in 0..crop as usize {
        let row = (top as usize + y) * new_width as usize + left as usize;
        let pixels = &resized[row * 3..(row + crop as usize) * 3];
        for (x, pixel) in pixels.chunks_exact(3).enumerate() {
            let at = y * crop as usize + x;
            for channel in 0..3 {
                out[channel * area + at] =
                    f32::from(pixel[channel]) * scale[channel] + shift[channel];
            }
        }
    }
    Ok(out)
}

/// RGB bytes of `image` resized to `width` x `height` as Pillow resizes:
/// a separable convolution whose filter widens by the scale when shrinking
/// (antialiasing), in fixed point, with SIMD where the CPU has it.
fn resize(
    image: &RgbImage,
    width: u32,
    height: u32,
    resample: Resample,
) -> std::result::Result<Vec<u8>, String> {
    use fast_image_resize::{images, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    let source = images::ImageRef::new(
        image.width(),
        image.height(),
        image.as_raw(),
        PixelType::U8x3,
    )
    .map_err(|err| err.to_string())?;
    let mut resized = images::Image::new(width, height, PixelType::U8x3);
    let filter = match resample {
        Resample::Bilinear => FilterType::Bilinear,
        Resample::Bicubic => FilterType::CatmullRom,
    };
    Resizer::new()
        .resize(
            &source,
            &mut resized,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter)),
        )
        .map_err(|err| err.to_string())?;
    Ok(resized.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayAlphaImage, ImageEncoder, LumaA, Rgb};

    const LIMITS: ImageLimits = ImageLimits {
        max_encoded_bytes: 1 << 20,
        max_pixels: 1 << 20,
        max_aspect_ratio: 32,
        max_decoding_bytes: 1 << 24,
    };

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    /// A tiny PNG whose header claims `width` x `height`: a decompression bomb's
    /// shape (its few data bytes would not even fill a row).
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        for (kind, data) in [
            (&b"IHDR"[..], ihdr),
            (
                &b"IDAT"[..],
                vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
            ),
            (&b"IEND"[..], vec![]),
        ] {
            bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut chunk = kind.to_vec();
            chunk.extend_from_slice(&data);
            bytes.extend_from_slice(&chunk);
            bytes.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        bytes
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A JPEG with an EXIF APP1 segment setting `orientation`.
    fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
        let mut plain = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 95)
            .write_image(
                image.as_raw(),
                image.width(),
                image.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        // TIFF header (big endian), one IFD entry: Orientation (0x0112), SHORT, 1.
        let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes());
        tiff.extend_from_slice(&0x0112u16.to_be_bytes());
        tiff.extend_from_slice(&3u16.to_be_bytes());
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_be_bytes());
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = plain[..2].to_vec(); // SOI
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&plain[2..]);
        out
    }

    #[test]
    fn gray_with_alpha_becomes_rgb() {
        let gray = GrayAlphaImage::from_pixel(3, 2, LumaA([100, 7]));
        let rgb = decode(0, &png(&DynamicImage::ImageLumaA8(gray)), LIMITS).unwrap();
        assert_eq!(rgb.dimensions(), (3, 2));
        assert_eq!(*rgb.get_pixel(2, 1), Rgb([100, 100, 100]));
    }

    #[test]
    fn truncated_jpeg_is_refused() {
        let image = RgbImage::from_fn(32, 16, |x, y| Rgb([x as u8 * 8, y as u8 * 16, 128]));
        let full = jpeg_with_orientation(&image, 1);
        assert!(decode(0, &full, LIMITS).is_ok());
        let mut padded = full.clone();
        padded.extend_from_slice(&[0, 0, 0xFF]);
        assert!(
            decode(0, &padded, LIMITS).is_ok(),
            "trailing padding is fine"
        );
        let err = decode(3, &full[..full.len() * 2 / 3], LIMITS).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 4 wide, 2 high; orientation 6 means "rotate 90 degrees clockwise".
        let wide = RgbImage::from_fn(4, 2, |x, _| {
            if x == 0 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let upright = decode(0, &jpeg_with_orientation(&wide, 6), LIMITS).unwrap();
        assert_eq!(upright.dimensions(), (2, 4));
        // The red left column is now the top row.
        assert!(upright.get_pixel(0, 0)[0] > 200 && upright.get_pixel(1, 0)[0] > 200);
        assert!(upright.get_pixel(0, 3)[2] > 200);
    }

    #[test]
    fn bombs_oversized_and_corrupt_inputs_are_refused_by_index() {
        let bomb = png_claiming(100_000, 100_000);
        let err = decode(4, &bomb, LIMITS).unwrap_err().to_string();
        assert!(
            err.starts_with("input 4:") && err.contains("pixels"),
            "{err}"
        );
        // Within the pixel limit the same header is simply a broken image.
        assert!(decode(4, &png_claiming(16, 16), LIMITS).is_err());

        let big = vec![0u8; LIMITS.max_encoded_bytes + 1];
        assert!(decode(1, &big, LIMITS)
            .unwrap_err()
            .to_string()
            .contains("bytes"));

        assert!(decode(2, b"definitely not an image", LIMITS).is_err());
        let image = DynamicImage::ImageRgb8(RgbImage::new(8, 8));
        let truncated = &png(&image)[..40];
        assert!(decode(3, truncated, LIMITS).is_err());

        // Within the pixel limit but far beyond the aspect-ratio limit.
        let err = decode(6, &png_claiming(1, 100_000), LIMITS)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("input 6:") && err.contains("max_image_aspect_ratio"),
            "{err}"
        );

        let mut gif = b"GIF89a".to_vec();
        gif.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0]);
        assert!(decode(5, &gif, LIMITS)
            .unwrap_err()
            .to_string()
            .contains("not accepted"));
    }

    #[test]
    fn resize_sizes_are_checked_and_bounded() {
        assert_eq!(resized_size(640, 480, 256), Some((341, 256)));
        assert_eq!(resized_size(480, 640, 256), Some((256, 341)));
        assert_eq!(resized_size(0, 480, 256), None);
        // 256 x 6.4e9 overflows u32: refused, never wrapped.
        assert_eq!(resized_size(1, 25_000_000, 256), None);
        assert_eq!(resized_size(25_000_000, 1, 256), None);
        // Fits in u32 but not in the resize budget.
        assert_eq!(resized_size(158, 158_227, 256), None);
        // 256 x 65,536 is exactly the budget of 2^24 pixels.
        assert_eq!(resized_size(1, 256, 256), Some((256, 1 << 16)));
        assert_eq!(resized_size(1, 257, 256), None);
    }

    #[test]
    fn preprocessing_refuses_an_image_whose_resize_is_too_large() {
        let spec = Preprocessing {
            resize_shorter: 256,
            crop: 224,
            resample: Resample::Bilinear,
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        let sliver = RgbImage::new(1, 100_000);
        let err = preprocess(9, &sliver, &spec).unwrap_err().to_string();
        assert!(
            err.starts_with("input 9:") && err.contains("exceed"),
            "{err}"
        );
    }

    #[test]
    fn preprocessing_resizes_the_shorter_side_crops_and_normalizes() {
        let spec = Preprocessing {
            resize_shorter: 8,
            crop: 6,
            resample: Resample::Bilinear,
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 1.0],
        };
        // A constant image keeps its value through any resampling.
        let flat = RgbImage::from_pixel(20, 10, Rgb([255, 51, 0]));
        let tensor = preprocess(0, &flat, &spec).unwrap();
        assert_eq!(tensor.len(), 3 * 6 * 6);
        let area = 36;
        assert!(tensor[..area].iter().all(|v| (v - 1.0).abs() < 1e-6));
        assert!(tensor[area..2 * area]
            .iter()
            .all(|v| (v - (0.2 - 0.25) / 0.25).abs() < 1e-6));
        assert!(tensor[2 * area..].iter().all(|v| v.abs() < 1e-6));

        // The crop is centred: a bright square in the middle stays in the middle.
        let marked = RgbImage::from_fn(16, 16, |x, y| {
            if (7..9).contains(&x) && (7..9).contains(&y) {
                Rgb([255, 255, 255])
            } else {
                Rgb([0, 0, 0])
            }
        });
        let spec = Preprocessing {
            resize_shorter: 16,
            crop: 8,
            mean: [0.0; 3],
            std: [1.0; 3],
            ..spec
        };
        let tensor = preprocess(0, &marked, &spec).unwrap();
        let at = |x: usize, y: usize| tensor[y * 8 + x];
        assert!(at(3, 3) > 0.9 && at(4, 4) > 0.9);
        assert!(at(0, 0) < 0.1 && at(7, 7) < 0.1);
    }
}
