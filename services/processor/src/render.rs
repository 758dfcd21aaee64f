//! The image pipeline, as pure functions: bytes in, encoded variants out.
//!
//! - Limits first: the header's dimensions are checked against the pixel and side limits
//!   before any pixel is decoded, so decompression bombs cost nothing.
//! - JPEGs decode at reduced size (DCT scaling, like libvips' shrink-on-load): only as many
//!   pixels as the largest variant needs are ever produced.
//! - Variants are resized in a cascade (large, then small from large, then thumb from small)
//!   with a Lanczos filter, never upscaled, then rotated by the EXIF orientation.

use std::io::Cursor;

use bytes::Bytes;
use conveyor_platform::config::Limits;
use conveyor_schemas::ExifSummary;
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage, RgbaImage};

/// The variants, largest first: name and longest side in pixels.
pub const VARIANTS: [(&str, u32); 3] = [("large", 1600), ("small", 640), ("thumb", 256)];

/// Why media could not be processed. Shown to clients as the failure reason.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("not a supported image (jpeg, png, webp or gif)")]
    UnsupportedFormat,
    #[error(
        "image is {width}x{height}, over the limit of {max_side} px per side or {max_pixels} pixels"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error("file of {0} bytes is over the upload limit")]
    TooLarge(u64),
    #[error("the original is missing from the object store")]
    Missing,
    #[error("image could not be decoded: {0}")]
    Decode(String),
    #[error("image could not be encoded: {0}")]
    Encode(String),
}

/// One encoded variant.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: &'static str,
    pub width: u32,
    pub height: u32,
    pub content_type: &'static str,
    pub extension: &'static str,
    pub bytes: Bytes,
}

/// Everything the processor learns from one original.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Dimensions after the EXIF orientation is applied.
    pub width: u32,
    pub height: u32,
    pub blurhash: String,
    pub variants: Vec<Variant>,
    pub exif: ExifSummary,
}

struct Exif {
    orientation: Orientation,
    summary: ExifSummary,
}

fn read_exif(bytes: &[u8]) -> Exif {
    let mut exif = Exif {
        orientation: Orientation::NoTransforms,
        summary: ExifSummary::default(),
    };
    let Ok(parsed) = exif::Reader::new().read_from_container(&mut Cursor::new(bytes)) else {
        return exif;
    };
    let text = |tag| {
        parsed
            .get_field(tag, exif::In::PRIMARY)
            .map(|f| match &f.value {
                exif::Value::Ascii(v) => v
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).trim().to_owned())
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => f.display_value().to_string(),
            })
    };
    exif.summary.camera_make = text(exif::Tag::Make).filter(|s| !s.is_empty());
    exif.summary.camera_model = text(exif::Tag::Model).filter(|s| !s.is_empty());
    exif.summary.taken_at = text(exif::Tag::DateTimeOriginal).filter(|s| !s.is_empty());
    if let Some(value) = parsed
        .get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|f| f.value.get_uint(0))
    {
        exif.orientation = Orientation::from_exif(value as u8).unwrap_or(Orientation::NoTransforms);
    }
    exif
}

fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Checks the header against the limits, without decoding pixels. Returns the format and the
/// stored (pre-orientation) dimensions.
pub fn probe(bytes: &[u8], limits: &Limits) -> Result<(ImageFormat, u32, u32), MediaError> {
    let format = image::guess_format(bytes).map_err(|_| MediaError::UnsupportedFormat)?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif
    ) {
        return Err(MediaError::UnsupportedFormat);
    }
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    if width == 0
        || height == 0
        || width > limits.max_side
        || height > limits.max_side
        || width as u64 * height as u64 > limits.max_pixels
    {
        return Err(MediaError::TooManyPixels {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    Ok((format, width, height))
}

/// A decoded image: RGB, or RGBA when the source has transparency.
enum Pixels {
    Rgb(RgbImage),
    Rgba(RgbaImage),
}

impl Pixels {
    fn dimensions(&self) -> (u32, u32) {
        match self {
            Pixels::Rgb(i) => i.dimensions(),
            Pixels::Rgba(i) => i.dimensions(),
        }
    }
}

/// Decodes with at least `min_long` pixels on the longest side where the codec can shrink on
/// load (JPEG), or at full size otherwise.
fn decode(
    bytes: &[u8],
    format: ImageFormat,
    limits: &Limits,
    min_long: u32,
) -> Result<Pixels, MediaError> {
    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes, min_long).map(Pixels::Rgb);
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_pixels * 4 + (64 << 20));
    reader.limits(image_limits);
    let image = reader
        .decode()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    Ok(if image.color().has_alpha() {
        Pixels::Rgba(image.into_rgba8())
    } else {
        Pixels::Rgb(image.into_rgb8())
    })
}

fn decode_jpeg(bytes: &[u8], min_long: u32) -> Result<RgbImage, MediaError> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder
        .read_info()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    let info = decoder
        .info()
        .ok_or_else(|| MediaError::Decode("missing jpeg header".into()))?;
    let (w, h) = (info.width as u32, info.height as u32);
    let long = w.max(h);
    if long > min_long {
        // The smallest DCT scale (1/8 … 1) whose output still covers `min_long`.
        let want_w = (w * min_long).div_ceil(long).max(1);
        let want_h = (h * min_long).div_ceil(long).max(1);
        decoder
            .scale(
                want_w.min(u16::MAX as u32) as u16,
                want_h.min(u16::MAX as u32) as u16,
            )
            .map_err(|e| MediaError::Decode(e.to_string()))?;
    }
    let pixels = decoder
        .decode()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    let info = decoder
        .info()
        .ok_or_else(|| MediaError::Decode("missing jpeg header".into()))?;
    let (w, h) = (info.width as u32, info.height as u32);
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&l| [l, l, l]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => pixels
            .chunks_exact(4)
            .flat_map(|p| {
                let k = p[3] as u16;
                [
                    (p[0] as u16 * k / 255) as u8,
                    (p[1] as u16 * k / 255) as u8,
                    (p[2] as u16 * k / 255) as u8,
                ]
            })
            .collect(),
        jpeg_decoder::PixelFormat::L16 => {
            return Err(MediaError::Decode("16-bit jpeg is not supported".into()));
        }
    };
    RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| MediaError::Decode("jpeg pixel buffer has the wrong size".into()))
}

/// Fits `(w, h)` inside a `long`-pixel box, never upscaling.
fn fit(w: u32, h: u32, long: u32) -> (u32, u32) {
    let current = w.max(h);
    if current <= long {
        return (w, h);
    }
    let scale = long as f64 / current as f64;
    (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    )
}

fn resize(
    src: &Pixels,
    width: u32,
    height: u32,
    resizer: &mut Resizer,
) -> Result<Pixels, MediaError> {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (width, height) {
        return Ok(match src {
            Pixels::Rgb(i) => Pixels::Rgb(i.clone()),
            Pixels::Rgba(i) => Pixels::Rgba(i.clone()),
        });
    }
    let (buffer, pixel_type) = match src {
        Pixels::Rgb(i) => (i.as_raw().as_slice(), PixelType::U8x3),
        Pixels::Rgba(i) => (i.as_raw().as_slice(), PixelType::U8x4),
    };
    let source = fast_image_resize::images::ImageRef::new(sw, sh, buffer, pixel_type)
        .map_err(|e| MediaError::Encode(e.to_string()))?;
    let mut target = Image::new(width, height, pixel_type);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    resizer
        .resize(&source, &mut target, &options)
        .map_err(|e| MediaError::Encode(e.to_string()))?;
    let raw = target.into_vec();
    let bad = || MediaError::Encode("resized buffer has the wrong size".into());
    Ok(match src {
        Pixels::Rgb(_) => Pixels::Rgb(RgbImage::from_raw(width, height, raw).ok_or_else(bad)?),
        Pixels::Rgba(_) => Pixels::Rgba(RgbaImage::from_raw(width, height, raw).ok_or_else(bad)?),
    })
}

fn encode(
    pixels: &Pixels,
    orientation: Orientation,
) -> Result<(DynamicImage, Bytes, &'static str, &'static str), MediaError> {
    let mut image = match pixels {
        Pixels::Rgb(i) => DynamicImage::ImageRgb8(i.clone()),
        Pixels::Rgba(i) => DynamicImage::ImageRgba8(i.clone()),
    };
    image.apply_orientation(orientation);
    let mut out = Vec::new();
    let (content_type, extension) = match pixels {
        Pixels::Rgb(_) => {
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 82);
            image
                .write_with_encoder(encoder)
                .map_err(|e| MediaError::Encode(e.to_string()))?;
            ("image/jpeg", "jpg")
        }
        Pixels::Rgba(_) => {
            image
                .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
                .map_err(|e| MediaError::Encode(e.to_string()))?;
            ("image/png", "png")
        }
    };
    Ok((image, Bytes::from(out), content_type, extension))
}

/// Runs the whole pipeline on one original.
pub fn render(bytes: &[u8], limits: &Limits) -> Result<Rendered, MediaError> {
    let (format, stored_w, stored_h) = probe(bytes, limits)?;
    let exif = read_exif(bytes);
    let largest = VARIANTS[0].1;
    let decoded = decode(bytes, format, limits, largest)?;
    let mut resizer = Resizer::new();
    let mut variants = Vec::with_capacity(VARIANTS.len());
    let mut source = decoded;
    let mut thumb_for_hash = None;
    for (name, long) in VARIANTS {
        // Target size from the original's dimensions, so DCT scaling never changes the result.
        let (w, h) = fit(stored_w, stored_h, long);
        let (sw, sh) = source.dimensions();
        let (w, h) = (w.min(sw), h.min(sh));
        let resized = resize(&source, w, h, &mut resizer)?;
        let (oriented, encoded, content_type, extension) = encode(&resized, exif.orientation)?;
        variants.push(Variant {
            name,
            width: oriented.width(),
            height: oriented.height(),
            content_type,
            extension,
            bytes: encoded,
        });
        if name == "thumb" {
            thumb_for_hash = Some(oriented);
        }
        source = resized;
    }
    let thumb = thumb_for_hash.expect("the thumb variant is always rendered");
    let blurhash = blurhash_of(&thumb)?;
    let (width, height) = if swaps_axes(exif.orientation) {
        (stored_h, stored_w)
    } else {
        (stored_w, stored_h)
    };
    Ok(Rendered {
        width,
        height,
        blurhash,
        variants,
        exif: exif.summary,
    })
}

fn blurhash_of(image: &DynamicImage) -> Result<String, MediaError> {
    // A 32-pixel rendition is plenty for a 4×3-component hash and keeps it under a millisecond.
    let small = image.thumbnail(32, 32).into_rgba8();
    blurhash::encode(4, 3, small.width(), small.height(), small.as_raw())
        .map_err(|e| MediaError::Encode(format!("blurhash: {e}")))
}

/// Just a thumbnail with `long` pixels on its longest side, oriented: the benchmarked path
/// (`conveyor loadtest thumbnail`), comparable to `vipsthumbnail -s long`.
pub fn thumbnail(bytes: &[u8], limits: &Limits, long: u32) -> Result<Variant, MediaError> {
    let (format, stored_w, stored_h) = probe(bytes, limits)?;
    let exif = read_exif(bytes);
    let decoded = decode(bytes, format, limits, long)?;
    let (w, h) = fit(stored_w, stored_h, long);
    let (sw, sh) = decoded.dimensions();
    let resized = resize(&decoded, w.min(sw), h.min(sh), &mut Resizer::new())?;
    let (oriented, bytes, content_type, extension) = encode(&resized, exif.orientation)?;
    Ok(Variant {
        name: "thumb",
        width: oriented.width(),
        height: oriented.height(),
        content_type,
        extension,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let image = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .encode_image(&image)
            .unwrap();
        out
    }

    #[test]
    fn variants_fit_their_boxes_and_never_upscale() {
        let rendered = render(&jpeg(3000, 2000), &Limits::default()).unwrap();
        let sizes: Vec<(&str, u32, u32)> = rendered
            .variants
            .iter()
            .map(|v| (v.name, v.width, v.height))
            .collect();
        assert_eq!(
            sizes,
            vec![
                ("large", 1600, 1067),
                ("small", 640, 427),
                ("thumb", 256, 171)
            ]
        );
        assert_eq!((rendered.width, rendered.height), (3000, 2000));
        assert!(!rendered.blurhash.is_empty());
        let small = render(&jpeg(300, 200), &Limits::default()).unwrap();
        let sizes: Vec<(u32, u32)> = small.variants.iter().map(|v| (v.width, v.height)).collect();
        assert_eq!(sizes, vec![(300, 200), (300, 200), (256, 171)]);
        for v in &small.variants {
            let decoded = image::load_from_memory(&v.bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (v.width, v.height));
        }
    }

    #[test]
    fn a_header_over_the_pixel_limit_is_refused_before_decoding() {
        // A real 1×1 PNG whose header is rewritten to claim 100000×100000 (CRC fixed up).
        let mut png = Vec::new();
        RgbImage::new(1, 1)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let started = std::time::Instant::now();
        let err = render(&png, &Limits::default()).unwrap_err();
        assert!(
            matches!(err, MediaError::TooManyPixels { width: 100_000, .. }),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn truncated_and_foreign_bytes_are_media_errors() {
        let full = jpeg(800, 600);
        let err = render(&full[..full.len() / 3], &Limits::default()).unwrap_err();
        assert!(matches!(err, MediaError::Decode(_)), "{err}");
        assert!(matches!(
            render(b"%PDF-1.7 not an image", &Limits::default()),
            Err(MediaError::UnsupportedFormat)
        ));
    }
}
