//! Test images, generated: no binary fixtures to keep in the repository.

use image::{ImageFormat, RgbImage};

/// A noisy JPEG (noise keeps it from compressing to nothing), distinct per `seed`.
pub fn jpeg(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| {
        let v = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed.wrapping_mul(97);
        image::Rgb([(v >> 3) as u8, (v >> 11) as u8, (x + y + seed) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode_image(&image)
        .expect("encode jpeg");
    out
}

/// A JPEG carrying an EXIF APP1 segment with the given orientation and a camera model.
pub fn jpeg_with_orientation(width: u32, height: u32, orientation: u16) -> Vec<u8> {
    let plain = jpeg(width, height, 7);
    // TIFF, little-endian: IFD0 with Orientation (0x0112, SHORT) and Model (0x0110, ASCII).
    let model = b"TestCam 1\0";
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II*\0");
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&2u16.to_le_bytes());
    let model_offset = 8 + 2 + 2 * 12 + 4;
    tiff.extend_from_slice(&0x0110u16.to_le_bytes());
    tiff.extend_from_slice(&2u16.to_le_bytes());
    tiff.extend_from_slice(&(model.len() as u32).to_le_bytes());
    tiff.extend_from_slice(&(model_offset as u32).to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes());
    tiff.extend_from_slice(model);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]);
    out
}

/// A PNG whose header claims `width`×`height`, with a token IDAT behind it.
pub fn png_bomb_header(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    for (kind, data) in [
        (&b"IHDR"[..], &ihdr[..]),
        (b"IDAT", &[0x78, 0x9c, 0x01, 0x00, 0x00, 0xff, 0xff][..]),
        (b"IEND", &[]),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32fast::hash(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

/// Decodes image bytes and returns their dimensions.
pub fn dimensions(bytes: &[u8]) -> (u32, u32) {
    let format = image::guess_format(bytes).expect("an image format");
    assert!(
        matches!(format, ImageFormat::Jpeg | ImageFormat::Png),
        "{format:?}"
    );
    let image = image::load_from_memory(bytes).expect("decodes");
    (image.width(), image.height())
}

/// A `width`×`height` photo-like image (a gradient with noise) as HEIC (`"hevc"`) or AVIF
/// (`"av1"`), encoded by libheif through libvips, as a phone saves it.
pub fn heif(width: i32, height: i32, compression: &str) -> Vec<u8> {
    use rs_vips::voption::{Setter, VOption};
    rs_vips::Vips::init("conveyor-tests").expect("libvips starts");
    let noise = rs_vips::VipsImage::gaussnoise_with_opts(
        width,
        height,
        VOption::new().set("mean", 128.0).set("sigma", 30.0),
    )
    .expect("noise");
    let rgb = rs_vips::VipsImage::bandjoin(&[
        noise.linear(&[1.0], &[40.0]).expect("r"),
        noise.linear(&[0.8], &[0.0]).expect("g"),
        noise.linear(&[0.5], &[20.0]).expect("b"),
    ])
    .expect("bands")
    .cast(rs_vips::enums::BandFormat::Uchar)
    .expect("8-bit");
    rgb.heifsave_buffer_with_opts(VOption::new().set("compression", compression).set("Q", 80))
        .expect("libheif encodes")
}

/// `jpeg` with `megabytes` of extended XMP (APP1 segments of 64 KB) before its frame header,
/// as phones store a portrait photo's depth map.
pub fn with_extended_xmp(jpeg: &[u8], megabytes: usize) -> Vec<u8> {
    let mut payload = b"http://ns.adobe.com/xmp/extension/\0".to_vec();
    payload.resize(65_000, b'x');
    let mut out = jpeg[..2].to_vec();
    for _ in 0..megabytes * 1_000_000 / payload.len() + 1 {
        out.extend_from_slice(&[0xff, 0xe1]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&payload);
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}
