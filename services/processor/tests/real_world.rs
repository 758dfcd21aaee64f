//! Real-world photos through the pipeline, one test per kind of file a camera roll holds or a
//! public bug report showed breaking an image pipeline. Every input is built here, with
//! libvips' own encoders or by hand, byte by byte; nothing binary is committed.
//!
//! Each test asserts what a user would check: the colour of the thumbnail, portrait or
//! landscape, the EXIF fields, or a failure with a reason that names the problem.

use std::time::{Duration, Instant};

use conveyor_config::Limits;
use conveyor_processor::render::{self, MediaError, Rendered, VARIANTS};
use rs_vips::VipsImage;
use rs_vips::enums::BandFormat;
use rs_vips::voption::{Setter, VOption};

// ---- generators ----

/// A `width`×`height` sRGB image of one colour.
fn solid(width: i32, height: i32, rgb: [f64; 3]) -> VipsImage {
    render::init().unwrap();
    VipsImage::black_with_opts(width, height, VOption::new().set("bands", 3))
        .unwrap()
        .linear(&[1.0, 1.0, 1.0], &rgb)
        .unwrap()
        .cast(BandFormat::Uchar)
        .unwrap()
}

/// Noise, so the JPEG is the size of a real photo's.
fn noise(width: i32, height: i32) -> VipsImage {
    render::init().unwrap();
    let band = |mean: f64| {
        VipsImage::gaussnoise_with_opts(
            width,
            height,
            VOption::new().set("mean", mean).set("sigma", 40.0),
        )
        .unwrap()
    };
    VipsImage::bandjoin(&[band(90.0), band(128.0), band(160.0)])
        .unwrap()
        .cast(BandFormat::Uchar)
        .unwrap()
}

fn jpeg(image: &VipsImage) -> Vec<u8> {
    image
        .jpegsave_buffer_with_opts(VOption::new().set("Q", 90))
        .unwrap()
}

fn progressive_jpeg(image: &VipsImage) -> Vec<u8> {
    image
        .jpegsave_buffer_with_opts(VOption::new().set("Q", 90).set("interlace", true))
        .unwrap()
}

/// `image` converted into the colour space of `profile` (a file, or libvips' built-in `cmyk`
/// or `p3`), with the profile embedded, as a camera or an editor saves it.
fn in_profile(image: &VipsImage, profile: &str) -> VipsImage {
    image
        .icc_transform_with_opts(profile, VOption::new().set("input-profile", "srgb"))
        .unwrap()
}

/// A JPEG with `segments` inserted right after its start marker (each a marker byte and a
/// payload; the length is filled in).
fn with_segments(jpeg: &[u8], segments: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    for (marker, payload) in segments {
        out.extend_from_slice(&[0xff, *marker]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(payload);
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A little-endian TIFF IFD entry: tag, type, count, value or offset.
fn entry(tag: u16, kind: u16, count: u32, value: u32) -> Vec<u8> {
    let mut e = tag.to_le_bytes().to_vec();
    e.extend_from_slice(&kind.to_le_bytes());
    e.extend_from_slice(&count.to_le_bytes());
    e.extend_from_slice(&value.to_le_bytes());
    e
}

/// An EXIF APP1 payload as two real cameras wrote it: make, model, orientation 6 (rotate
/// 90° clockwise to show) and the date taken, plus one damaged part. With `bad_gps_link`, the
/// GPS sub-IFD's next-IFD offset is `0xFFFFFFFF`; otherwise an ImageDescription's value
/// offset points past the end of the data.
fn broken_exif(bad_gps_link: bool) -> Vec<u8> {
    const ASCII: u16 = 2;
    const SHORT: u16 = 3;
    const LONG: u16 = 4;
    const BYTE: u16 = 1;
    let make = b"Phonemaker\0";
    let model = b"Phone 12 Pro\0";
    let date = b"2024:05:17 10:11:12\0";
    // Layout: header (8), IFD0 (2 + 6×12 + 4 = 78) at 8, exif IFD (2 + 12 + 4 = 18) at 86,
    // GPS IFD (18) at 104, then the strings from 122.
    let (ifd0, exif_ifd, gps_ifd, strings) = (8u32, 86u32, 104u32, 122u32);
    let (make_at, model_at) = (strings, strings + make.len() as u32);
    let date_at = model_at + model.len() as u32;
    let mut t = b"II*\0".to_vec();
    t.extend_from_slice(&ifd0.to_le_bytes());
    t.extend_from_slice(&6u16.to_le_bytes());
    let description = if bad_gps_link { 1 } else { 0x00ff_ff00 };
    t.extend(entry(0x010e, ASCII, 40, description)); // ImageDescription
    t.extend(entry(0x010f, ASCII, make.len() as u32, make_at));
    t.extend(entry(0x0110, ASCII, model.len() as u32, model_at));
    t.extend(entry(0x0112, SHORT, 1, 6)); // Orientation
    t.extend(entry(0x8769, LONG, 1, exif_ifd));
    t.extend(entry(0x8825, LONG, 1, gps_ifd));
    t.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(t.len() as u32, exif_ifd);
    t.extend_from_slice(&1u16.to_le_bytes());
    t.extend(entry(0x9003, ASCII, date.len() as u32, date_at)); // DateTimeOriginal
    t.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(t.len() as u32, gps_ifd);
    t.extend_from_slice(&1u16.to_le_bytes());
    t.extend(entry(0x0000, BYTE, 4, 0x0000_0202)); // GPSVersionID 2.2.0.0
    let next = if bad_gps_link { u32::MAX } else { 0 };
    t.extend_from_slice(&next.to_le_bytes());
    assert_eq!(t.len() as u32, strings);
    t.extend_from_slice(make);
    t.extend_from_slice(model);
    t.extend_from_slice(date);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(t);
    app1
}

/// The last scan of a progressive JPEG repeated until the file has `scans` of them. libjpeg
/// warns about the bogus progression and decodes every one.
fn scan_bomb(progressive: &[u8], scans: usize) -> Vec<u8> {
    let last_sos = progressive
        .windows(2)
        .rposition(|w| w == [0xff, 0xda])
        .expect("a scan");
    let eoi = progressive.len() - 2;
    let scan = &progressive[last_sos..eoi];
    let existing = progressive
        .windows(2)
        .filter(|w| *w == [0xff, 0xda])
        .count();
    let mut out = progressive[..eoi].to_vec();
    for _ in existing..scans {
        out.extend_from_slice(scan);
    }
    out.extend_from_slice(&progressive[eoi..]);
    out
}

/// A GIF89a with a `screen` logical screen and one frame per entry of `frames`
/// (`(x, y, width, height)`), each holding only an LZW clear and end code: the headers are
/// all a limit check may read.
fn gif(screen: (u16, u16), frames: &[(u16, u16, u16, u16)]) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&screen.0.to_le_bytes());
    g.extend_from_slice(&screen.1.to_le_bytes());
    g.extend_from_slice(&[0x80, 0, 0]); // a 2-colour global table
    g.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    for &(x, y, w, h) in frames {
        g.push(0x2c);
        for v in [x, y, w, h] {
            g.extend_from_slice(&v.to_le_bytes());
        }
        g.push(0);
        // LZW minimum code size 2; one sub-block with a clear code and an end code.
        g.extend_from_slice(&[2, 2, 0x4c, 0x01, 0]);
    }
    g.push(0x3b);
    g
}

// ---- checks ----

fn rendered(bytes: &[u8]) -> Rendered {
    render::render(bytes, &Limits::default()).unwrap_or_else(|e| panic!("not rendered: {e}"))
}

fn variant<'a>(r: &'a Rendered, name: &str) -> &'a render::Variant {
    r.variants.iter().find(|v| v.name == name).unwrap()
}

/// The RGB of the pixel at `(x, y)` of an encoded variant, as a browser would decode it.
fn pixel(encoded: &[u8], x: i32, y: i32) -> Vec<f64> {
    let image = VipsImage::new_from_buffer(encoded, "").unwrap();
    assert_eq!(image.get_bands(), 3, "variants are 3-band sRGB");
    image.getpoint(x, y).unwrap()
}

fn assert_close(got: &[f64], want: [f64; 3], tolerance: f64, what: &str) {
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= tolerance,
        "{what}: got {got:?}, want {want:?} ± {tolerance}"
    );
}

// ---- the cases ----

#[test]
fn variants_fit_their_boxes_and_never_upscale() {
    let r = rendered(&jpeg(&noise(3000, 2000)));
    let sizes: Vec<_> = r
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
    assert_eq!((r.width, r.height), (3000, 2000));
    assert!(!r.blurhash.is_empty());
    let small = rendered(&jpeg(&noise(300, 200)));
    let sizes: Vec<_> = small.variants.iter().map(|v| (v.width, v.height)).collect();
    assert_eq!(sizes, vec![(300, 200), (300, 200), (256, 171)]);
    for v in &small.variants {
        let decoded = VipsImage::new_from_buffer(&v.bytes, "").unwrap();
        assert_eq!(
            (decoded.get_width() as u32, decoded.get_height() as u32),
            (v.width, v.height)
        );
        assert_eq!(v.content_type, "image/jpeg");
    }
}

#[test]
fn cmyk_jpegs_keep_their_colours_with_and_without_a_profile() {
    // A brick red inside the print gamut. Read as light, its ink amounts come out near black.
    let brick = [180.0, 70.0, 50.0];
    let cmyk = in_profile(&solid(64, 48, brick), "cmyk");
    assert_eq!(cmyk.get_bands(), 4);
    let with_profile = jpeg(&cmyk);
    let without = cmyk
        .jpegsave_buffer_with_opts(VOption::new().set("Q", 90).set("strip", true))
        .unwrap();
    assert!(
        without.len() + 1000 < with_profile.len(),
        "the profile was stripped"
    );
    for (what, file) in [("embedded profile", with_profile), ("no profile", without)] {
        let r = rendered(&file);
        assert_close(&pixel(&variant(&r, "thumb").bytes, 0, 0), brick, 12.0, what);
        assert_close(
            &pixel(&variant(&r, "large").bytes, 63, 47),
            brick,
            12.0,
            what,
        );
    }
}

#[test]
fn wide_gamut_and_grey_photos_come_out_srgb() {
    let green = [40.0, 170.0, 70.0];
    let profiles = [
        ("Display P3", "p3".to_owned()),
        (
            "Adobe RGB (1998)",
            // Ghostscript's Adobe RGB (1998)-compatible profile, from Debian's libgs-common,
            // which the test script installs.
            "/usr/share/color/icc/ghostscript/a98.icc".to_owned(),
        ),
    ];
    for (what, profile) in profiles {
        assert!(
            std::path::Path::new(&profile).exists() || !profile.starts_with('/'),
            "{profile} is missing: apt-get install libgs-common (scripts/test does)"
        );
        let wide = in_profile(&solid(64, 64, green), &profile);
        let stored = wide.getpoint(0, 0).unwrap();
        let shift = stored
            .iter()
            .zip(green)
            .map(|(s, g)| (s - g).abs())
            .fold(0.0, f64::max);
        assert!(
            shift > 15.0,
            "{what}: the stored numbers differ visibly ({stored:?})"
        );
        let r = rendered(&jpeg(&wide));
        assert_close(
            &pixel(&variant(&r, "thumb").bytes, 10, 10),
            green,
            6.0,
            what,
        );
    }
    let grey = solid(64, 64, [120.0; 3])
        .colourspace(rs_vips::enums::Interpretation::BW)
        .unwrap();
    assert_eq!(grey.get_bands(), 1);
    let r = rendered(&jpeg(&grey));
    assert_close(
        &pixel(&variant(&r, "thumb").bytes, 5, 5),
        [120.0; 3],
        4.0,
        "grey",
    );
}

#[test]
fn a_broken_exif_entry_costs_that_entry_only() {
    let landscape = jpeg(&noise(400, 300));
    for bad_gps_link in [true, false] {
        let file = with_segments(&landscape, &[(0xe1, broken_exif(bad_gps_link))]);
        let r = rendered(&file);
        let case = if bad_gps_link {
            "GPS next-IFD 0xFFFFFFFF"
        } else {
            "offset past the end"
        };
        assert_eq!(
            (r.width, r.height),
            (300, 400),
            "{case}: rotated to portrait"
        );
        let thumb = variant(&r, "thumb");
        assert_eq!((thumb.width, thumb.height), (192, 256), "{case}");
        assert_eq!(r.exif.camera_make.as_deref(), Some("Phonemaker"), "{case}");
        assert_eq!(
            r.exif.camera_model.as_deref(),
            Some("Phone 12 Pro"),
            "{case}"
        );
        assert_eq!(
            r.exif.taken_at.as_deref(),
            Some("2024:05:17 10:11:12"),
            "{case}"
        );
    }
}

#[test]
fn megabytes_of_metadata_before_the_frame_header_are_read_through() {
    // Extended XMP as phones write a portrait's depth map: 3 MB in 64 KB APP1 segments.
    let chunk = {
        let mut c = b"http://ns.adobe.com/xmp/extension/\0".to_vec();
        c.resize(65_000, b'x');
        c
    };
    let segments: Vec<_> = (0..48).map(|_| (0xe1, chunk.clone())).collect();
    let file = with_segments(&jpeg(&solid(320, 200, [10.0, 20.0, 200.0])), &segments);
    assert!(file.len() > 3_000_000);
    let r = rendered(&file);
    assert_eq!((r.width, r.height), (320, 200));
    assert_close(
        &pixel(&variant(&r, "thumb").bytes, 3, 3),
        [10.0, 20.0, 200.0],
        8.0,
        "xmp",
    );
}

#[test]
fn a_jpeg_missing_only_its_end_marker_is_shown_and_a_cut_one_is_not() {
    let blue = [30.0, 120.0, 200.0];
    let full = jpeg(&solid(800, 600, blue));
    assert_eq!(full[full.len() - 2..], [0xff, 0xd9]);
    let no_end = full[..full.len() - 2].to_vec();
    let mut with_trailer = no_end.clone();
    with_trailer.extend(b"VENDOR-PANORAMA-TRAILER".repeat(64));
    for (what, file) in [
        ("no end marker", no_end),
        ("no end marker, trailer", with_trailer),
    ] {
        let r = rendered(&file);
        assert_close(
            &pixel(&variant(&r, "large").bytes, 700, 500),
            blue,
            6.0,
            what,
        );
    }
    let photo = jpeg(&noise(800, 600));
    let cut = &photo[..photo.len() / 2];
    let err = render::render(cut, &Limits::default()).unwrap_err();
    assert!(matches!(err, MediaError::Decode(_)), "{err}");
}

#[test]
fn a_progressive_jpeg_with_thousands_of_scans_fails_fast() {
    let progressive = progressive_jpeg(&noise(1200, 900));
    assert!(
        rendered(&progressive).variants.len() == VARIANTS.len(),
        "an honest one renders"
    );
    let bomb = scan_bomb(&progressive, 5_000);
    let started = Instant::now();
    let err = render::render(&bomb, &Limits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooManyScans {
                scans: 5_000,
                max: 100
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("5000 scans"), "{err}");
    // Milliseconds alone; decoding the 5,000 scans would take minutes. The bound is wide
    // because the machine is shared (it once took 3.2 s beside a load test).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_36_megapixel_16_bit_rgba_png_is_rendered() {
    render::init().unwrap();
    let rgba = VipsImage::black_with_opts(7200, 5000, VOption::new().set("bands", 4))
        .unwrap()
        .linear(&[1.0; 4], &[20000.0, 40000.0, 60000.0, 32896.0])
        .unwrap()
        .cast(BandFormat::Ushort)
        .unwrap()
        .copy_with_opts(VOption::new().set("interpretation", "rgb16"))
        .unwrap();
    let png = rgba
        .pngsave_buffer_with_opts(VOption::new().set("compression", 1).set("bitdepth", 16))
        .unwrap();
    let r = rendered(&png);
    assert_eq!((r.width, r.height), (7200, 5000));
    let thumb = variant(&r, "thumb");
    assert_eq!(
        (thumb.content_type, thumb.width, thumb.height),
        ("image/png", 256, 178)
    );
    let decoded = VipsImage::new_from_buffer(&thumb.bytes, "").unwrap();
    assert_eq!(decoded.get_bands(), 4, "alpha kept");
    // 16-bit 20000/40000/60000 of 65535 is 8-bit 78/156/233; alpha 32896 is 128.
    let p = decoded.getpoint(100, 100).unwrap();
    assert_close(&p[..3], [78.0, 156.0, 233.0], 2.0, "16 to 8 bits");
    assert!((p[3] - 128.0).abs() <= 1.0, "alpha {}", p[3]);
}

#[test]
fn a_render_past_its_time_limit_stops_with_a_reason() {
    let png = solid(6000, 6000, [1.0, 2.0, 3.0])
        .pngsave_buffer_with_opts(VOption::new().set("compression", 1))
        .unwrap();
    let limits = Limits {
        max_render_ms: 1,
        ..Limits::default()
    };
    let started = Instant::now();
    let err = render::render(&png, &limits).unwrap_err();
    assert!(matches!(err, MediaError::TimedOut { limit_ms: 1 }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn gif_frames_are_checked_from_their_headers() {
    // A 1×1 screen with an 8000×6000 frame: 48 MP that the screen size would hide.
    let hidden = gif((1, 1), &[(0, 0, 8000, 6000)]);
    let err = render::render(&hidden, &Limits::default()).unwrap_err();
    assert!(matches!(err, MediaError::Malformed(_)), "{err}");
    assert!(err.to_string().contains("8000x6000"), "{err}");
    // Over the pixel limit, whatever the screen says.
    let huge = gif((60000, 60000), &[(0, 0, 60000, 60000)]);
    assert!(matches!(
        render::render(&huge, &Limits::default()).unwrap_err(),
        MediaError::TooManyPixels { width: 60000, .. }
    ));
    let many = gif((4, 4), &[(0, 0, 4, 4); 12]);
    let limits = Limits {
        max_frames: 10,
        ..Limits::default()
    };
    let err = render::render(&many, &limits).unwrap_err();
    assert!(
        matches!(err, MediaError::TooManyFrames { max: 10, .. }),
        "{err}"
    );
    // Within the limits, an animation renders its first frame.
    let anim = gif((4, 4), &[(0, 0, 4, 4); 3]);
    let r = rendered(&anim);
    assert_eq!((r.width, r.height), (4, 4));
}

#[test]
fn extreme_panoramas_get_the_full_large_variant() {
    // A 10000×1 JPEG once came out 1250×1: the reduced-size decode went one step too far.
    for ((w, h), want) in [
        ((10000, 1), (1600, 1)),
        ((1, 10000), (1, 1600)),
        ((10000, 3), (1600, 1)),
        ((10000, 40), (1600, 6)),
    ] {
        let r = rendered(&jpeg(&noise(w, h)));
        let large = variant(&r, "large");
        assert_eq!((large.width, large.height), want, "{w}x{h}");
        assert_eq!((r.width, r.height), (w as u32, h as u32));
    }
}

#[test]
fn heic_and_avif_from_phones_are_rendered() {
    let orange = [230.0, 140.0, 30.0];
    for compression in ["hevc", "av1"] {
        let file = solid(640, 480, orange)
            .heifsave_buffer_with_opts(VOption::new().set("compression", compression).set("Q", 90))
            .unwrap();
        let r = rendered(&file);
        assert_eq!((r.width, r.height), (640, 480), "{compression}");
        let thumb = variant(&r, "thumb");
        assert_eq!(thumb.content_type, "image/jpeg", "{compression}");
        assert_close(&pixel(&thumb.bytes, 20, 20), orange, 12.0, compression);
    }
}

#[test]
fn headers_over_the_limits_and_foreign_formats_are_refused_before_decoding() {
    let bomb = {
        // A real 1×1 PNG whose header is rewritten to claim 100000×100000 (CRC fixed up).
        let mut png = solid(1, 1, [0.0; 3]).pngsave_buffer().unwrap();
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    };
    let started = Instant::now();
    let err = render::render(&bomb, &Limits::default()).unwrap_err();
    assert!(
        matches!(err, MediaError::TooManyPixels { width: 100_000, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    let tiff = solid(16, 16, [1.0; 3]).tiffsave_buffer().unwrap();
    for foreign in [
        tiff,
        b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"/>".to_vec(),
        b"%PDF-1.7 not an image".to_vec(),
    ] {
        let err = render::render(&foreign, &Limits::default()).unwrap_err();
        assert!(matches!(err, MediaError::UnsupportedFormat), "{err}");
        assert!(
            err.to_string().contains("HEIC"),
            "names the accepted formats: {err}"
        );
    }
}

#[test]
fn failure_reasons_say_what_is_wrong_in_plain_words() {
    // A render that reads metadata first, then broken files: libvips' process-wide error
    // buffer must not leak into the reasons.
    rendered(&jpeg(&noise(64, 48)));
    let photo = jpeg(&noise(800, 600));
    let cut = render::render(&photo[..photo.len() / 2], &Limits::default()).unwrap_err();
    assert_eq!(
        cut.to_string(),
        "image could not be decoded: the JPEG data is damaged or cut short"
    );
    let header_only = render::render(&[0xff, 0xd8, 0xff], &Limits::default()).unwrap_err();
    assert_eq!(
        header_only.to_string(),
        "image could not be decoded: not a readable JPEG file"
    );
    let png = solid(300, 200, [9.0, 9.0, 9.0]).pngsave_buffer().unwrap();
    let err = render::render(&png[..png.len() - 40], &Limits::default()).unwrap_err();
    assert!(matches!(err, MediaError::Decode(_)), "{err}");
    assert!(!err.to_string().contains("vips"), "{err}");
}

#[test]
fn pngs_with_megabytes_of_compressed_metadata_are_refused_from_their_chunks() {
    // Two zTXt chunks of 600 KB each: a minute of inflating if they were 1 GiB bombs.
    let png = solid(16, 16, [1.0; 3]).pngsave_buffer().unwrap();
    let mut bombed = png[..33].to_vec(); // signature and IHDR
    for _ in 0..2 {
        let data = [b"Comment\0\0".to_vec(), vec![0x78; 600_000]].concat();
        bombed.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = bombed.len();
        bombed.extend_from_slice(b"zTXt");
        bombed.extend_from_slice(&data);
        let crc = crc32fast::hash(&bombed[start..]);
        bombed.extend_from_slice(&crc.to_be_bytes());
    }
    bombed.extend_from_slice(&png[33..]);
    let started = Instant::now();
    let err = render::render(&bombed, &Limits::default()).unwrap_err();
    assert!(matches!(err, MediaError::TooMuchMetadata { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_heif_grid_of_thousands_of_tiles_is_refused_from_its_references() {
    fn boxed(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        [
            &((payload.len() + 8) as u32).to_be_bytes()[..],
            kind,
            payload,
        ]
        .concat()
    }
    // iref (version 0) with one `dimg` reference from item 1 to 12,100 tiles.
    let mut dimg = 1u16.to_be_bytes().to_vec();
    dimg.extend_from_slice(&12_100u16.to_be_bytes());
    for tile in 0..12_100u16 {
        dimg.extend_from_slice(&(tile + 2).to_be_bytes());
    }
    let iref = boxed(
        b"iref",
        &[&[0, 0, 0, 0][..], &boxed(b"dimg", &dimg)].concat(),
    );
    let meta = boxed(b"meta", &[&[0, 0, 0, 0][..], &iref].concat());
    let file = [boxed(b"ftyp", b"heic\0\0\0\0mif1heic"), meta].concat();
    let err = render::render(&file, &Limits::default()).unwrap_err();
    assert!(
        matches!(err, MediaError::TooManyTiles { tiles: 12_100, .. }),
        "{err}"
    );
}

#[test]
fn opaque_gifs_become_jpegs_and_webp_exif_is_read() {
    let gif = solid(120, 80, [200.0, 40.0, 40.0])
        .gifsave_buffer()
        .unwrap();
    let r = rendered(&gif);
    assert_eq!(
        variant(&r, "thumb").content_type,
        "image/jpeg",
        "no alpha to keep"
    );
    assert_close(
        &pixel(&variant(&r, "thumb").bytes, 5, 5),
        [200.0, 40.0, 40.0],
        12.0,
        "gif",
    );

    let with_exif = with_segments(&jpeg(&noise(400, 300)), &[(0xe1, broken_exif(false))]);
    let webp = VipsImage::new_from_buffer(&with_exif, "")
        .unwrap()
        .webpsave_buffer()
        .unwrap();
    let r = rendered(&webp);
    assert_eq!(r.exif.camera_make.as_deref(), Some("Phonemaker"));
    assert_eq!((r.width, r.height), (300, 400), "orientation 6 applied");
}
