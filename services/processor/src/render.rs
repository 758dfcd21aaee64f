//! The image pipeline on libvips, as pure functions: bytes in, encoded variants out.
//!
//! - **Only the accepted formats load.** The format is sniffed ([`MediaType::sniff`]) and its
//!   own libvips loader is called by name (`jpegload_buffer`, `pngload_buffer`, …). libvips'
//!   loader search never runs, so none of its other loaders (ImageMagick, PDF, SVG, FITS,
//!   MATLAB, …) ever sees an upload: an allow-list, stricter than `vips_block_untrusted_set`.
//! - **Limits before pixels.** [`probe`] reads the header (libvips loads lazily) and walks the
//!   container where libvips would not stop a bomb: a JPEG's scans, a GIF's frames. Sides,
//!   pixels, frames and scans are checked before any pixel is decoded.
//! - **Shrink on load.** JPEGs decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when the largest
//!   variant still fits; everything streams (`access=sequential`), so memory follows the
//!   output, not the original.
//! - **Colour.** Every variant is 8-bit sRGB, converted from the embedded ICC profile (CMYK
//!   without one goes through libvips' built-in CMYK profile). The EXIF orientation is applied,
//!   then all metadata is stripped.
//! - **Time.** A watchdog kills the render after [`Limits::max_render_ms`].
//!
//! The engine is set up once per process by [`init`]: one libvips thread per render (the
//! processor runs `processor.workers` renders at once) and no operation cache.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use conveyor_config::Limits;
use conveyor_schemas::ExifSummary;
use conveyor_storage::media::{IMAGES, MediaType};
use conveyor_wire::headers;
use rs_vips::voption::{Setter, VOption};
use rs_vips::{Vips, VipsImage};

/// The variants, largest first: name and longest side in pixels.
pub const VARIANTS: [(&str, u32); 3] = [("large", 1600), ("small", 640), ("thumb", 256)];

/// JPEG quality of the variants (libjpeg's scale, 1–100).
const JPEG_QUALITY: i32 = 82;

/// Most compressed bytes a PNG may carry in `zTXt`, `iTXt` and `iCCP` chunks, together.
/// libpng inflates each such chunk on every read (up to its 8 MB chunk cap, after reading the
/// whole stream), so 90 chunks that each inflate to 1 GiB once cost a minute of CPU. Real
/// files carry a few KB (an ICC profile) to a few hundred KB (an editor's XMP history).
const MAX_PNG_METADATA_BYTES: u64 = 1 << 20;

/// Most tiles in a HEIF file's grid images (ISO/IEC 23008-12 §6.6.2.3): the `dimg`
/// references of every item, counted by [`headers::heif_grid_tiles`]. libheif decodes the
/// grid in one call that no kill flag interrupts, at a few ms per tile: 12,100 tiles of 64×64
/// took 30 s. Phones write 512×512 tiles (48 for 12 MP); 1,024 tiles of 256×256 cover the
/// default pixel limit.
const MAX_HEIF_TILES: u64 = 1024;

/// Why media could not be processed. Shown to clients as the failure reason.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The sniffed bytes are none of the accepted image formats ([`IMAGES`]); video is the
    /// transcoder's and is refused here too.
    #[error("not a supported image: the accepted images are {IMAGES}")]
    UnsupportedFormat,
    /// A frame's width or height is 0 or over `limits.max_side`, or its area is over
    /// `limits.max_pixels`; read from the header, before decoding.
    #[error(
        "image is {width}x{height}, over the limit of {max_side} px per side or {max_pixels} pixels"
    )]
    TooManyPixels {
        /// The frame's stored width in pixels.
        width: u32,
        /// The frame's stored height in pixels.
        height: u32,
        /// `limits.max_side`, in pixels.
        max_side: u32,
        /// `limits.max_pixels`: the most pixels (width × height) in one frame.
        max_pixels: u64,
    },
    /// An animated image with more frames than `limits.max_frames`.
    #[error("image has {frames} frames, over the limit of {max}")]
    TooManyFrames {
        /// Frames counted so far (a GIF's walk stops at the first one over the limit).
        frames: u64,
        /// `limits.max_frames`.
        max: u32,
    },
    /// A progressive JPEG with more scans than `limits.max_jpeg_scans`.
    #[error(
        "progressive JPEG has {scans} scans, over the limit of {max} (encoders write about 10)"
    )]
    TooManyScans {
        /// Scans in the file, from its marker walk.
        scans: u64,
        /// `limits.max_jpeg_scans`.
        max: u32,
    },
    /// The structure is inconsistent in a way libvips would not catch: a GIF frame outside
    /// its logical screen. The text says where.
    #[error("image is malformed: {0}")]
    Malformed(String),
    /// A PNG whose `zTXt`, `iTXt` and `iCCP` chunks carry more compressed bytes than
    /// the render's limit (1 MiB): libpng inflates each such chunk on every read.
    #[error(
        "PNG carries {bytes} bytes of compressed metadata (text and colour-profile chunks), over the limit of {max}"
    )]
    TooMuchMetadata {
        /// Compressed bytes in those chunks, together.
        bytes: u64,
        /// The limit in bytes.
        max: u64,
    },
    /// A HEIF or AVIF file whose grid images have more tiles than the render's limit
    /// (1,024): libheif decodes a grid in one call that the render's time limit cannot stop.
    #[error("HEIF image is a grid of {tiles} tiles, over the limit of {max}")]
    TooManyTiles {
        /// `dimg` references in the file.
        tiles: u64,
        /// The limit.
        max: u64,
    },
    /// The original, of this many bytes, is over `limits.max_upload_bytes`. The processor's,
    /// checked before the render.
    #[error("file of {0} bytes is over the upload limit")]
    TooLarge(u64),
    /// The original is not in the object store. The processor's, never the render's.
    #[error("the original is missing from the object store")]
    Missing,
    /// libvips could not read the header or the pixels, or convert them; the text is the
    /// reason a client reads (libvips' own words go to the log only).
    #[error("image could not be decoded: {0}")]
    Decode(String),
    /// A variant or the blurhash could not be encoded; the text names which.
    #[error("image could not be encoded: {0}")]
    Encode(String),
    /// The render ran past `limits.max_render_ms`.
    #[error("rendering took longer than the limit of {limit_ms} ms")]
    TimedOut {
        /// The limit in milliseconds.
        limit_ms: u64,
    },
    /// libvips could not start. Not the media's fault: the processor retries, and fails at
    /// start-up before it ever gets here.
    #[error("the image engine (libvips) could not start: {0}")]
    Engine(String),
}

impl MediaError {
    /// Whether the media itself is at fault, so that trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, MediaError::Engine(_))
    }
}

/// One encoded variant.
#[derive(Debug, Clone)]
pub struct Variant {
    /// The variant's name in [`VARIANTS`]: `large`, `small` or `thumb`.
    pub name: &'static str,
    /// Width in pixels, upright.
    pub width: u32,
    /// Height in pixels, upright.
    pub height: u32,
    /// `image/jpeg` for an opaque image, `image/png` for one with transparency.
    pub content_type: &'static str,
    /// The file extension that goes with `content_type`: `jpg` or `png`.
    pub extension: &'static str,
    /// The encoded file, 8-bit sRGB with all metadata stripped.
    pub bytes: Bytes,
}

/// Everything the processor learns from one original.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Dimensions after the EXIF orientation is applied.
    pub width: u32,
    /// Height in pixels, after the EXIF orientation (see [`Rendered::width`]).
    pub height: u32,
    /// The thumbnail's blurhash, 4×3 components.
    pub blurhash: String,
    /// The encoded [`VARIANTS`], largest first.
    pub variants: Vec<Variant>,
    /// Camera make, model and capture time from the EXIF block; all `None` without one.
    pub exif: ExifSummary,
}

/// What [`probe`] learns from the header, before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sniffed format, one of the accepted images.
    pub format: MediaType,
    /// Stored dimensions of the first frame, before the EXIF orientation.
    pub width: u32,
    /// Stored height of the first frame in pixels (see [`Header::width`]).
    pub height: u32,
    /// Frames (pages) in the file: 1 for a still image.
    pub frames: u64,
    /// EXIF orientation, 1–8 (1 when absent); 5–8 swap the axes.
    pub orientation: u8,
}

impl Header {
    /// Width and height once the EXIF orientation is applied.
    pub fn oriented(&self) -> (u32, u32) {
        if self.orientation >= 5 {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// Starts libvips once per process, for untrusted input: one worker thread per render (the
/// processor bounds renders itself), and no operation cache, since no two uploads share an
/// operation and the cache would keep decoded pixels alive. Later calls return the first
/// call's outcome.
///
/// # Errors
/// [`MediaError::Engine`] when `vips_init` fails (for example, libvips' modules are broken).
pub fn init() -> Result<(), MediaError> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            Vips::init("conveyor").map_err(|e| e.to_string())?;
            Vips::concurrency_set(1);
            Vips::cache_set_max(0);
            Vips::cache_set_max_mem(0);
            Vips::cache_set_max_files(0);
            Ok(())
        })
        .clone()
        .map_err(MediaError::Engine)
}

/// Checks the header against the limits without decoding pixels.
///
/// # Errors
/// [`MediaError::UnsupportedFormat`] for anything but the accepted formats;
/// [`MediaError::TooManyPixels`], [`MediaError::TooManyFrames`], [`MediaError::TooManyScans`],
/// [`MediaError::TooManyTiles`] or [`MediaError::TooMuchMetadata`] over a limit;
/// [`MediaError::Malformed`] for a GIF frame outside its logical screen;
/// [`MediaError::Decode`] when the header cannot be read; [`MediaError::Engine`] when
/// libvips cannot start.
pub fn probe(bytes: &[u8], limits: &Limits) -> Result<Header, MediaError> {
    let source = Source::new(bytes)?;
    inspect(&source, limits).map(|(header, _)| header)
}

/// [`probe`] on an opened source; also returns the lazily loaded image (shrink 1), so that
/// formats without shrink-on-load are read once.
fn inspect(source: &Source<'_>, limits: &Limits) -> Result<(Header, VipsImage), MediaError> {
    init()?;
    let format = source.format;
    match format {
        MediaType::Jpeg => {
            let scans = source.jpeg.scans;
            if scans > limits.max_jpeg_scans as u64 {
                return Err(MediaError::TooManyScans {
                    scans,
                    max: limits.max_jpeg_scans,
                });
            }
        }
        MediaType::Gif => check_gif(&source.bytes, limits)?,
        MediaType::Png => {
            let bytes = headers::png_metadata_bytes(&source.bytes);
            if bytes > MAX_PNG_METADATA_BYTES {
                return Err(MediaError::TooMuchMetadata {
                    bytes,
                    max: MAX_PNG_METADATA_BYTES,
                });
            }
        }
        MediaType::Heic | MediaType::Avif => {
            let tiles = headers::heif_grid_tiles(&source.bytes);
            if tiles > MAX_HEIF_TILES {
                return Err(MediaError::TooManyTiles {
                    tiles,
                    max: MAX_HEIF_TILES,
                });
            }
        }
        MediaType::WebP => {}
        MediaType::Mp4 | MediaType::QuickTime | MediaType::WebM | MediaType::Matroska => {
            return Err(MediaError::UnsupportedFormat);
        }
    }
    let image = load(source, 1)?;
    let width = positive(image.get_width());
    let height = positive(image.get_height());
    check_pixels(width, height, limits)?;
    let frames = int_field(&image, "n-pages").map_or(1, |n| positive(n).max(1) as u64);
    if frames > limits.max_frames as u64 {
        return Err(MediaError::TooManyFrames {
            frames,
            max: limits.max_frames,
        });
    }
    let orientation = int_field(&image, "orientation")
        .and_then(|o| u8::try_from(o).ok())
        .filter(|o| (1..=8).contains(o))
        .unwrap_or(1);
    let header = Header {
        format,
        width,
        height,
        frames,
        orientation,
    };
    Ok((header, image))
}

/// An integer metadata field, if the image has it. Asking libvips for a field it lacks
/// leaves a message in its error buffer, so the field's presence is checked first.
fn int_field(image: &VipsImage, name: &str) -> Option<i32> {
    (image.get_typeof(name).unwrap_or(0) != 0)
        .then(|| image.get_int(name).ok())
        .flatten()
}

/// Runs the whole pipeline on one original: [`probe`], the three [`VARIANTS`], the blurhash
/// of the thumbnail, and the EXIF summary.
///
/// # Errors
/// Every [`MediaError`] but `TooLarge` and `Missing`, which are the processor's.
pub fn render(bytes: &[u8], limits: &Limits) -> Result<Rendered, MediaError> {
    let source = Source::new(bytes)?;
    let (header, opened) = inspect(&source, limits)?;
    let watchdog = Watchdog::start(limits.max_render_ms);
    let (_, largest) = VARIANTS[0];
    let loaded = match jpeg_shrink(&header, largest) {
        1 => opened,
        shrink => load(&source, shrink)?,
    };
    let exif = read_exif(&loaded);
    let mut variants = Vec::with_capacity(VARIANTS.len());
    // Each variant is made from the one before, which is already small, oriented and sRGB.
    let mut previous: Option<VipsImage> = None;
    let mut blurhash = String::new();
    for (name, long) in VARIANTS {
        let (width, height) = fit(header.oriented(), long);
        let image = match &previous {
            None => {
                let first =
                    watchdog.evaluate(first_variant(&loaded, width, height)?, header.format)?;
                drop_opaque_alpha(first)?
            }
            Some(bigger) => watchdog.evaluate(resize(bigger, width, height)?, header.format)?,
        };
        variants.push(encode(name, &image)?);
        if name == "thumb" {
            blurhash = blurhash_of(&image)?;
        }
        previous = Some(image);
    }
    let (width, height) = header.oriented();
    Ok(Rendered {
        width,
        height,
        blurhash,
        variants,
        exif,
    })
}

/// Just a thumbnail with `long` pixels on its longest side, oriented and sRGB: the benchmarked
/// path (`conveyor loadtest thumbnail`), comparable to `vipsthumbnail -s long`.
///
/// # Errors
/// As [`render`].
pub fn thumbnail(bytes: &[u8], limits: &Limits, long: u32) -> Result<Variant, MediaError> {
    let source = Source::new(bytes)?;
    let (header, opened) = inspect(&source, limits)?;
    let watchdog = Watchdog::start(limits.max_render_ms);
    let loaded = match jpeg_shrink(&header, long) {
        1 => opened,
        shrink => load(&source, shrink)?,
    };
    let (width, height) = fit(header.oriented(), long);
    let image = watchdog.evaluate(first_variant(&loaded, width, height)?, header.format)?;
    encode("thumb", &drop_opaque_alpha(image)?)
}

/// An original as libvips should read it: the bytes, repaired if need be, and how strictly.
///
/// libvips takes the bytes by reference (its blob does not copy them), so every image loaded
/// from a source must be dropped before the source is; the operation cache, which would keep
/// them longer, is off ([`init`]).
struct Source<'a> {
    bytes: std::borrow::Cow<'a, [u8]>,
    format: MediaType,
    /// The JPEG's marker walk (empty for other formats).
    jpeg: headers::JpegMarkers,
    fail_on: &'static str,
}

impl<'a> Source<'a> {
    /// libvips' `fail_on` decides when damage is an error. `truncated` matches what browsers,
    /// Pillow and ImageMagick show: warnings (stray bytes, bad restart markers) are tolerated,
    /// missing image data is not. One repair goes first: a JPEG that lacks only its 2-byte end
    /// marker (some phones' panoramas) gets it back, and is then read at `warning`, so that a
    /// file cut short mid-scan (which libjpeg reports as a warning once the marker is there)
    /// is still refused.
    fn new(bytes: &'a [u8]) -> Result<Self, MediaError> {
        let format = MediaType::sniff(bytes)
            .filter(|format| !format.is_video())
            .ok_or(MediaError::UnsupportedFormat)?;
        let jpeg = match format {
            MediaType::Jpeg => headers::jpeg_markers(bytes),
            _ => headers::JpegMarkers::default(),
        };
        if format == MediaType::Jpeg && !jpeg.ended {
            let mut repaired = Vec::with_capacity(bytes.len() + 2);
            repaired.extend_from_slice(bytes);
            repaired.extend_from_slice(&[0xff, 0xd9]);
            return Ok(Source {
                bytes: repaired.into(),
                format,
                jpeg,
                fail_on: "warning",
            });
        }
        Ok(Source {
            bytes: bytes.into(),
            format,
            jpeg,
            fail_on: "truncated",
        })
    }
}

/// Opens `source` with its own format's loader, lazily: only the header is read until pixels
/// are asked for. `shrink` (1, 2, 4 or 8) is JPEG's decode-time downscale; other formats
/// ignore it. Animated formats load their first frame.
fn load(source: &Source<'_>, shrink: i32) -> Result<VipsImage, MediaError> {
    let bytes: &[u8] = &source.bytes;
    let options = VOption::new()
        .set("access", "sequential")
        .set("fail_on", source.fail_on);
    Vips::error_clear();
    let loaded = match source.format {
        MediaType::Jpeg => {
            VipsImage::jpegload_buffer_with_opts(bytes, options.set("shrink", shrink))
        }
        MediaType::Png => VipsImage::pngload_buffer_with_opts(bytes, options),
        MediaType::WebP => VipsImage::webpload_buffer_with_opts(bytes, options),
        MediaType::Gif => VipsImage::gifload_buffer_with_opts(bytes, options),
        MediaType::Heic | MediaType::Avif => VipsImage::heifload_buffer_with_opts(bytes, options),
        // Refused by `Source::new`: video is the transcoder's, which renders a poster frame.
        MediaType::Mp4 | MediaType::QuickTime | MediaType::WebM | MediaType::Matroska => {
            return Err(MediaError::UnsupportedFormat);
        }
    };
    loaded.map_err(|e| {
        failed(
            &e,
            MediaError::Decode(format!("not a readable {} file", source.format)),
        )
    })
}

/// The reason a client reads for a libvips failure, by the step that failed. libvips' own
/// words go to the log only: its error buffer is one per process, so it can hold another
/// upload's messages.
fn failed(error: &rs_vips::error::Error, reason: MediaError) -> MediaError {
    tracing::debug!(libvips = %vips_reason(error), %reason, "libvips failed");
    Vips::error_clear();
    reason
}

/// The largest JPEG shrink-on-load factor that still leaves `long` pixels on the longest side
/// and at least one on the shortest. libvips 8.14 rounds the shrunk sides down and aborts the
/// process (a failed assertion, not an error) when one reaches 0, as a 10000×3 panorama at
/// 1/4 would.
fn jpeg_shrink(header: &Header, long: u32) -> i32 {
    if header.format != MediaType::Jpeg {
        return 1;
    }
    let (stored_long, stored_short) = (
        header.width.max(header.height),
        header.width.min(header.height),
    );
    [8, 4, 2]
        .into_iter()
        .find(|&s| stored_long / s >= long && stored_short / s >= 1)
        .map_or(1, |s| s as i32)
}

/// Fits `(width, height)` inside a `long`-pixel box, never upscaling and never below 1 pixel
/// a side (a 10000×3 panorama's large variant is 1600×1).
fn fit((width, height): (u32, u32), long: u32) -> (u32, u32) {
    let current = width.max(height);
    if current <= long {
        return (width, height);
    }
    let scale = long as f64 / current as f64;
    (
        ((width as f64 * scale).round() as u32).max(1),
        ((height as f64 * scale).round() as u32).max(1),
    )
}

/// The first variant, from the loaded original: resized to exactly `width`×`height` (which
/// [`fit`] computed from the original's proportions, so libvips never rounds a side to 0),
/// turned upright by its EXIF orientation, and converted to 8-bit sRGB from its embedded
/// profile.
fn first_variant(loaded: &VipsImage, width: u32, height: u32) -> Result<VipsImage, MediaError> {
    let mut options = VOption::new()
        .set("height", height as i32)
        .set("size", "force");
    // Only a tagged image is converted through its profile: libvips 8.14 shifts untagged
    // sRGB (an R of 10 comes out as 67) when asked to export it. CMYK without a profile goes
    // through libvips' built-in CMYK profile either way.
    if loaded.get_typeof("icc-profile-data").unwrap_or(0) != 0 {
        // libvips 8.14's name; later versions keep it as an alias of `output-profile`.
        options = options.set("export-profile", "srgb");
    }
    let resized = loaded
        .thumbnail_image_with_opts(width as i32, options)
        .map_err(|e| failed(&e, resize_failed()))?;
    // Grey, 16-bit and other untagged spaces come out of the thumbnail in their own space.
    resized
        .colourspace(rs_vips::enums::Interpretation::Srgb)
        .map_err(|e| failed(&e, resize_failed()))
}

fn resize_failed() -> MediaError {
    MediaError::Decode("its colours or size could not be converted".into())
}

/// The image without its alpha band when every pixel is opaque (GIFs always load with one),
/// so that it is encoded as JPEG. `image` is in memory, so the check is one pass over it.
fn drop_opaque_alpha(image: VipsImage) -> Result<VipsImage, MediaError> {
    if !image.hasalpha() {
        return Ok(image);
    }
    let bands = image.get_bands();
    let alpha = image
        .extract_band(bands - 1)
        .and_then(|a| a.min())
        .map_err(|e| failed(&e, resize_failed()))?;
    if alpha < 255.0 {
        return Ok(image);
    }
    image
        .extract_band_with_opts(0, VOption::new().set("n", bands - 1))
        .and_then(|i| i.copy_memory())
        .map_err(|e| failed(&e, resize_failed()))
}

/// A later variant from the one before it, which is already upright and sRGB; never larger
/// than its source.
fn resize(bigger: &VipsImage, width: u32, height: u32) -> Result<VipsImage, MediaError> {
    let width = width.min(positive(bigger.get_width())).max(1);
    let height = height.min(positive(bigger.get_height())).max(1);
    let options = VOption::new()
        .set("height", height as i32)
        .set("size", "force")
        .set("no-rotate", true);
    bigger
        .thumbnail_image_with_opts(width as i32, options)
        .map_err(|e| failed(&e, resize_failed()))
}

/// JPEG when opaque, PNG when the image has transparency; metadata stripped.
fn encode(name: &'static str, image: &VipsImage) -> Result<Variant, MediaError> {
    let (bytes, content_type, extension) = if image.hasalpha() {
        let options = VOption::new().set("strip", true).set("compression", 6);
        let bytes = image.pngsave_buffer_with_opts(options);
        (bytes, "image/png", "png")
    } else {
        let options = VOption::new()
            .set("Q", JPEG_QUALITY)
            .set("strip", true)
            .set("optimize-coding", true);
        let bytes = image.jpegsave_buffer_with_opts(options);
        (bytes, "image/jpeg", "jpg")
    };
    let bytes =
        bytes.map_err(|e| failed(&e, MediaError::Encode(format!("{name} as {extension}"))))?;
    Ok(Variant {
        name,
        width: positive(image.get_width()),
        height: positive(image.get_height()),
        content_type,
        extension,
        bytes: Bytes::from(bytes),
    })
}

fn blurhash_of(thumb: &VipsImage) -> Result<String, MediaError> {
    // A 32-pixel rendition is plenty for a 4×3-component hash and keeps it under a millisecond.
    let (width, height) = fit(
        (positive(thumb.get_width()), positive(thumb.get_height())),
        32,
    );
    let small = resize(thumb, width, height)?;
    let (width, height) = (positive(small.get_width()), positive(small.get_height()));
    let bands = small.get_bands().max(1) as usize;
    let pixels = small.write_to_memory();
    let rgba: Vec<u8> = pixels
        .chunks_exact(bands)
        .flat_map(|p| match p {
            [r, g, b, a, ..] => [*r, *g, *b, *a],
            [r, g, b] => [*r, *g, *b, 255],
            [l, a] => [*l, *l, *l, *a],
            [l] => [*l, *l, *l, 255],
            [] => [0, 0, 0, 255],
        })
        .collect();
    blurhash::encode(4, 3, width, height, &rgba)
        .map_err(|e| MediaError::Encode(format!("blurhash: {e}")))
}

/// Stops renders that run past their time limit. libvips checks an image's kill flag between
/// tiles, so a render stops within a tile's work of the deadline. (A decoder stuck before its
/// first tile is bounded by the header checks instead: see [`Limits::max_jpeg_scans`].)
struct Watchdog {
    limit_ms: u64,
    expired: Arc<AtomicBool>,
    watch: mpsc::Sender<Arc<VipsImage>>,
}

impl Watchdog {
    fn start(limit_ms: u64) -> Self {
        let (watch, images) = mpsc::channel::<Arc<VipsImage>>();
        let expired = Arc::new(AtomicBool::new(false));
        let deadline = std::time::Instant::now() + Duration::from_millis(limit_ms);
        let flag = expired.clone();
        std::thread::spawn(move || {
            let mut watched = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match images.recv_timeout(left) {
                    Ok(image) => watched.push(image),
                    // The render finished and dropped its end.
                    Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
            flag.store(true, Ordering::SeqCst);
            for image in &watched {
                image.set_kill(true);
            }
            // Images registered after the deadline are killed as they arrive.
            for image in images {
                image.set_kill(true);
            }
        });
        Watchdog {
            limit_ms,
            expired,
            watch,
        }
    }

    /// Computes `image` into memory, or fails with [`MediaError::TimedOut`] past the deadline.
    /// A failure here is the decoder's: the data ran out or broke.
    fn evaluate(&self, image: VipsImage, format: MediaType) -> Result<VipsImage, MediaError> {
        let timed_out = || MediaError::TimedOut {
            limit_ms: self.limit_ms,
        };
        if self.expired.load(Ordering::SeqCst) {
            return Err(timed_out());
        }
        let image = Arc::new(image);
        // The watchdog thread outlives its receiver only if it already gave up.
        let _ = self.watch.send(image.clone());
        let computed = image.copy_memory();
        if self.expired.load(Ordering::SeqCst) {
            return Err(timed_out());
        }
        computed.map_err(|e| {
            failed(
                &e,
                MediaError::Decode(format!("the {format} data is damaged or cut short")),
            )
        })
    }
}

/// libvips' own words for a failure, on one line, for the log.
fn vips_reason(error: &rs_vips::error::Error) -> String {
    let text = match error {
        rs_vips::error::Error::InitializationError(m)
        | rs_vips::error::Error::IOError(m)
        | rs_vips::error::Error::OperationError(m) => m,
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(1000) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn positive(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn check_pixels(width: u32, height: u32, limits: &Limits) -> Result<(), MediaError> {
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
    Ok(())
}

/// Checks every frame of a GIF against the limits and its logical screen, and counts them,
/// without decompressing any ([`headers::gif_frames`]).
fn check_gif(bytes: &[u8], limits: &Limits) -> Result<(), MediaError> {
    let truncated = |_| MediaError::Decode("GIF ends inside its headers".into());
    let (screen, frames) = headers::gif_frames(bytes).map_err(truncated)?;
    for (n, frame) in frames.enumerate() {
        let f = frame.map_err(truncated)?;
        check_pixels(f.width, f.height, limits)?;
        if f.x + f.width > screen.width || f.y + f.height > screen.height {
            return Err(MediaError::Malformed(format!(
                "GIF frame {} ({}x{} at {},{}) lies outside its {}x{} screen",
                n + 1,
                f.width,
                f.height,
                f.x,
                f.y,
                screen.width,
                screen.height
            )));
        }
        let frames = n as u64 + 1;
        if frames > limits.max_frames as u64 {
            return Err(MediaError::TooManyFrames {
                frames,
                max: limits.max_frames,
            });
        }
    }
    Ok(())
}

/// The EXIF summary, read tolerantly: a broken entry or IFD costs that entry, not the rest.
/// The EXIF block is the one libvips found in the file (JPEG APP1, PNG `eXIf`, WebP `EXIF`,
/// HEIF `Exif` item), parsed by `kamadak-exif`. (The orientation is libvips' own reading,
/// applied in [`first_variant`].)
fn read_exif(image: &VipsImage) -> ExifSummary {
    if image.get_typeof("exif-data").unwrap_or(0) == 0 {
        return ExifSummary::default();
    }
    let Ok(blob) = image.get_blob("exif-data") else {
        return ExifSummary::default();
    };
    // libvips keeps the APP1 payload, `Exif\0\0` then the TIFF structure.
    let tiff = blob.strip_prefix(b"Exif\0\0").unwrap_or(&blob).to_vec();
    let mut reader = exif::Reader::new();
    reader.continue_on_error(true);
    let parsed = reader.read_raw(tiff).or_else(|e| {
        e.distill_partial_result(|errors| {
            tracing::debug!(?errors, "EXIF entries skipped");
        })
    });
    let Ok(parsed) = parsed else {
        return ExifSummary::default();
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
            .filter(|s| !s.is_empty())
    };
    ExifSummary {
        camera_make: text(exif::Tag::Make),
        camera_model: text(exif::Tag::Model),
        taken_at: text(exif::Tag::DateTimeOriginal),
    }
}
