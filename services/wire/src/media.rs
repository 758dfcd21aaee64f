//! The accepted media formats, and the one place that tells them apart by their leading bytes.
//!
//! Every path that names a type (the streamed upload, the direct upload's completion, the media
//! route and the S3 store's `Content-Type`) sniffs with [`MediaType::sniff`], so the formats
//! the edge accepts are exactly the ones the processor decodes.

use std::fmt;

/// An accepted format: an image, which the processor renders, or a video container, which
/// the transcoder takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaType {
    /// JPEG, `image/jpeg`.
    Jpeg,
    /// PNG, `image/png`.
    Png,
    /// WebP (a RIFF container), `image/webp`.
    WebP,
    /// GIF (87a or 89a), possibly animated, `image/gif`.
    Gif,
    /// HEIF with HEVC-coded images: what iPhones store photos as by default.
    Heic,
    /// HEIF with AV1-coded images.
    Avif,
    /// ISO-BMFF video (`.mp4`, `.m4v`).
    Mp4,
    /// QuickTime (`.mov`): what iPhones record video as.
    QuickTime,
    /// WebM: Matroska restricted to VP8/VP9/AV1 with Vorbis/Opus.
    WebM,
    /// Matroska (`.mkv`).
    Matroska,
}

/// The accepted image formats, as a client reads them in an error message.
pub const IMAGES: &str = "JPEG, PNG, WebP, GIF, HEIC or AVIF";

/// The accepted formats, as a client reads them in an error message.
pub const ACCEPTED: &str =
    "JPEG, PNG, WebP, GIF, HEIC or AVIF images, or MP4, MOV, WebM or Matroska video";

/// Leading bytes [`MediaType::sniff`] needs to see every format's signature: an ISO-BMFF
/// `ftyp` box lists its compatible brands after its 16-byte head, and encoders write up to a
/// dozen of them.
pub const SNIFF_BYTES: usize = 64;

impl MediaType {
    /// Every accepted format.
    pub const ALL: [MediaType; 10] = [
        MediaType::Jpeg,
        MediaType::Png,
        MediaType::WebP,
        MediaType::Gif,
        MediaType::Heic,
        MediaType::Avif,
        MediaType::Mp4,
        MediaType::QuickTime,
        MediaType::WebM,
        MediaType::Matroska,
    ];

    /// Whether this is a video container, for the transcoder, rather than an image.
    pub fn is_video(self) -> bool {
        matches!(
            self,
            MediaType::Mp4 | MediaType::QuickTime | MediaType::WebM | MediaType::Matroska
        )
    }

    /// The format whose signature `head` starts with, or `None` for anything else (SVG, TIFF,
    /// PDF, playlists, text). `head` should hold the first [`SNIFF_BYTES`] bytes, or the whole file
    /// when it is shorter.
    ///
    /// Signatures: JPEG `FF D8 FF` (ITU T.81 SOI plus the next marker's prefix), PNG's 8-byte
    /// signature (RFC 2083 §3.1), `GIF87a`/`GIF89a`, RIFF `WEBP`, and for HEIF an ISO-BMFF `ftyp`
    /// box (ISO/IEC 14496-12 §4.3) whose major or compatible brands name HEVC (`heic`, `heix`,
    /// `heim`, `heis`, `hevc`, `hevx`) or AV1 (`avif`, `avis`) images (ISO/IEC 23008-12 Annex B,
    /// AV1 Image File Format §9). A bare `mif1` names neither codec and is refused.
    ///
    /// Video: an `ftyp` box that names no image codec but whose major brand is QuickTime's
    /// (`qt  `) or an MP4 brand (`isom`, `iso2`–`iso6`, `mp41`, `mp42`, `avc1`, `M4V `, `M4VH`,
    /// `M4VP`, `dash`, the 3GPP `3gp4`–`3gp7` and 3GPP2 `3g2a`–`3g2c`, `XAVC`, `MSNV`, `f4v `);
    /// or an EBML header (`1A 45 DF A3`, RFC 8794 §8) whose `DocType` element (ID `42 82`) says
    /// `webm` or `matroska` (RFC 9559 §5.1). A text playlist (HLS, concat) has neither.
    pub fn sniff(head: &[u8]) -> Option<MediaType> {
        match head {
            [0xff, 0xd8, 0xff, ..] => Some(MediaType::Jpeg),
            [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, ..] => Some(MediaType::Png),
            [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(MediaType::Gif),
            [
                b'R',
                b'I',
                b'F',
                b'F',
                _,
                _,
                _,
                _,
                b'W',
                b'E',
                b'B',
                b'P',
                ..,
            ] => Some(MediaType::WebP),
            [_, _, _, _, b'f', b't', b'y', b'p', ..] => {
                heif_brand(head).or_else(|| video_brand(head))
            }
            [0x1a, 0x45, 0xdf, 0xa3, ..] => ebml_doc_type(head),
            _ => None,
        }
    }

    /// The MIME type (RFC 2046; `image/heic` and `image/avif` as IANA registers them).
    pub fn content_type(self) -> &'static str {
        match self {
            MediaType::Jpeg => "image/jpeg",
            MediaType::Png => "image/png",
            MediaType::WebP => "image/webp",
            MediaType::Gif => "image/gif",
            MediaType::Heic => "image/heic",
            MediaType::Avif => "image/avif",
            MediaType::Mp4 => "video/mp4",
            MediaType::QuickTime => "video/quicktime",
            MediaType::WebM => "video/webm",
            MediaType::Matroska => "video/x-matroska",
        }
    }

    /// The format a MIME type names, for the types [`MediaType::content_type`] gives.
    pub fn from_content_type(content_type: &str) -> Option<MediaType> {
        MediaType::ALL
            .into_iter()
            .find(|t| t.content_type() == content_type)
    }

    /// The format a client's declared MIME type names: case-insensitive, parameters ignored
    /// (`video/MP4; codecs=avc1` is MP4), and the aliases clients send (`image/jpg`,
    /// `image/heif`, `video/x-m4v`).
    pub fn from_declared(content_type: &str) -> Option<MediaType> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "image/jpg" | "image/pjpeg" => Some(MediaType::Jpeg),
            "video/x-m4v" => Some(MediaType::Mp4),
            "image/heif" => Some(MediaType::Heic),
            other => MediaType::from_content_type(other),
        }
    }

    /// Whether `self` and `other` are read the same way: equal, or siblings of one container
    /// (MP4 and QuickTime are both ISO-BMFF; WebM is Matroska). A `.mov` that is really an
    /// MP4, as phones and editors write them, is what its client said it was.
    pub fn same_container(self, other: MediaType) -> bool {
        use MediaType::{Matroska, Mp4, QuickTime, WebM};
        self == other
            || matches!(
                (self, other),
                (Mp4 | QuickTime, Mp4 | QuickTime) | (WebM | Matroska, WebM | Matroska)
            )
    }

    /// The usual file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            MediaType::Jpeg => "jpg",
            MediaType::Png => "png",
            MediaType::WebP => "webp",
            MediaType::Gif => "gif",
            MediaType::Heic => "heic",
            MediaType::Avif => "avif",
            MediaType::Mp4 => "mp4",
            MediaType::QuickTime => "mov",
            MediaType::WebM => "webm",
            MediaType::Matroska => "mkv",
        }
    }

    /// The format a file extension (without the dot, any case) names.
    pub fn from_extension(extension: &str) -> Option<MediaType> {
        let extension = extension.to_ascii_lowercase();
        match extension.as_str() {
            "jpeg" | "jpe" => Some(MediaType::Jpeg),
            "heif" => Some(MediaType::Heic),
            "m4v" => Some(MediaType::Mp4),
            "qt" => Some(MediaType::QuickTime),
            other => MediaType::ALL.into_iter().find(|t| t.extension() == other),
        }
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MediaType::Jpeg => "JPEG",
            MediaType::Png => "PNG",
            MediaType::WebP => "WebP",
            MediaType::Gif => "GIF",
            MediaType::Heic => "HEIC",
            MediaType::Avif => "AVIF",
            MediaType::Mp4 => "MP4",
            MediaType::QuickTime => "QuickTime",
            MediaType::WebM => "WebM",
            MediaType::Matroska => "Matroska",
        })
    }
}

/// The HEIF flavour an `ftyp` box declares: its major brand, then its compatible brands, in
/// the box and inside `head`.
fn heif_brand(head: &[u8]) -> Option<MediaType> {
    let size = u32::from_be_bytes(head[..4].try_into().ok()?) as usize;
    // Only the first SNIFF_BYTES count, so that the answer never depends on how much of the
    // file the caller had read (the `sniff` fuzz target found a brand at byte 76 deciding it).
    let end = size.clamp(8, head.len().min(SNIFF_BYTES));
    // Major brand at 8..12, minor version at 12..16, compatible brands from 16.
    let major = head.get(8..12).into_iter();
    let compatible = head.get(16..end).unwrap_or_default().chunks_exact(4);
    major.chain(compatible).find_map(|brand| match brand {
        b"heic" | b"heix" | b"heim" | b"heis" | b"hevc" | b"hevx" => Some(MediaType::Heic),
        b"avif" | b"avis" => Some(MediaType::Avif),
        _ => None,
    })
}

/// The video an `ftyp` box declares by its major brand (ISO/IEC 14496-12 §4.3, 14496-14;
/// QuickTime File Format, "File Type Compatibility Atom"; the MP4 registration authority's
/// brand list), read only within the head: the ISO and MP4 brands, Apple's `M4V `, DASH,
/// 3GPP and 3GPP2 (phones), Adobe's `f4v `, and cameras' MP4s (Sony's `XAVC` and `MSNV`).
/// Audio-only brands (`M4A `, `M4B `) are not video.
fn video_brand(head: &[u8]) -> Option<MediaType> {
    match head.get(8..12)? {
        b"qt  " => Some(MediaType::QuickTime),
        b"isom" | b"iso2" | b"iso3" | b"iso4" | b"iso5" | b"iso6" | b"mp41" | b"mp42" | b"avc1"
        | b"M4V " | b"M4VH" | b"M4VP" | b"dash" | b"3gp4" | b"3gp5" | b"3gp6" | b"3gp7"
        | b"3g2a" | b"3g2b" | b"3g2c" | b"XAVC" | b"MSNV" | b"f4v " => Some(MediaType::Mp4),
        _ => None,
    }
}

/// WebM or Matroska, from the `DocType` element of the EBML header within the head. The
/// header's children come in any order, each as an ID, a size (a one-byte VINT here: the
/// doc type is a short ASCII string) and the data.
fn ebml_doc_type(head: &[u8]) -> Option<MediaType> {
    let head = &head[..head.len().min(SNIFF_BYTES)];
    let at = head.windows(2).skip(4).position(|w| w == [0x42, 0x82])? + 4;
    let size = usize::from(head.get(at + 2)? & 0x7f);
    // Trailing NULs are padding (RFC 8794 §7.4: a String is read up to its first NUL); a
    // muxer that rewrites the header in place writes `webm` into `matroska`'s 8 bytes.
    let doc_type = head.get(at + 3..at + 3 + size)?;
    let end = doc_type
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(doc_type.len());
    match &doc_type[..end] {
        b"webm" => Some(MediaType::WebM),
        b"matroska" => Some(MediaType::Matroska),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ftyp(major: &[u8; 4], compatible: &[&[u8; 4]]) -> Vec<u8> {
        let size = 16 + 4 * compatible.len() as u32;
        let mut b = size.to_be_bytes().to_vec();
        b.extend_from_slice(b"ftyp");
        b.extend_from_slice(major);
        b.extend_from_slice(&[0, 0, 0, 0]);
        for c in compatible {
            b.extend_from_slice(*c);
        }
        b.extend_from_slice(b"\0\0\0\x08meta");
        b
    }

    #[test]
    fn heif_is_told_apart_by_its_brands() {
        assert_eq!(
            MediaType::sniff(&ftyp(b"heic", &[b"mif1", b"heic"])),
            Some(MediaType::Heic)
        );
        assert_eq!(
            MediaType::sniff(&ftyp(b"mif1", &[b"mif1", b"miaf", b"heic"])),
            Some(MediaType::Heic)
        );
        assert_eq!(
            MediaType::sniff(&ftyp(b"avif", &[b"mif1", b"miaf"])),
            Some(MediaType::Avif)
        );
        // Video by its major brand; a HEIF that names no image codec is nothing.
        assert_eq!(
            MediaType::sniff(&ftyp(b"isom", &[b"isom", b"mp41"])),
            Some(MediaType::Mp4)
        );
        assert_eq!(
            MediaType::sniff(&ftyp(b"qt  ", &[b"qt  "])),
            Some(MediaType::QuickTime)
        );
        assert_eq!(MediaType::sniff(&ftyp(b"mif1", &[b"mif1"])), None);
        assert_eq!(MediaType::sniff(&ftyp(b"M4A ", &[b"isom"])), None);
        for camera in [b"XAVC", b"3gp4", b"MSNV"] {
            assert_eq!(
                MediaType::sniff(&ftyp(camera, &[b"isom"])),
                Some(MediaType::Mp4)
            );
        }
    }

    #[test]
    fn declared_types_are_read_as_clients_write_them() {
        assert_eq!(
            MediaType::from_declared("video/MP4; codecs=avc1"),
            Some(MediaType::Mp4)
        );
        assert_eq!(
            MediaType::from_declared("video/x-m4v"),
            Some(MediaType::Mp4)
        );
        assert_eq!(
            MediaType::from_declared(" Image/JPG "),
            Some(MediaType::Jpeg)
        );
        assert_eq!(MediaType::from_declared("audio/mp4"), None);
        assert!(MediaType::QuickTime.same_container(MediaType::Mp4));
        assert!(MediaType::WebM.same_container(MediaType::Matroska));
        assert!(!MediaType::Mp4.same_container(MediaType::WebM));
        assert!(!MediaType::Jpeg.same_container(MediaType::Png));
        // A brand past the box's own size belongs to the next box.
        let mut lying = ftyp(b"mif1", &[]);
        lying.extend_from_slice(b"heic");
        assert_eq!(MediaType::sniff(&lying), None);
    }

    #[test]
    fn other_formats_and_short_heads() {
        assert_eq!(MediaType::sniff(b"\xff\xd8\xff\xe0"), Some(MediaType::Jpeg));
        assert_eq!(MediaType::sniff(b"\x89PNG\r\n\x1a\n"), Some(MediaType::Png));
        assert_eq!(MediaType::sniff(b"GIF89a"), Some(MediaType::Gif));
        assert_eq!(
            MediaType::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(MediaType::WebP)
        );
        for foreign in [
            &b"<svg xmlns='http://www.w3.org/2000/svg'/>"[..],
            b"II*\0",
            b"MM\0*",
            b"%PDF-1.7",
            b"\x89PNG",
            b"\0\0\0\x08ftyp",
            b"",
        ] {
            assert_eq!(MediaType::sniff(foreign), None, "{foreign:?}");
        }
        for t in MediaType::ALL {
            assert_eq!(MediaType::from_content_type(t.content_type()), Some(t));
            assert_eq!(MediaType::from_extension(t.extension()), Some(t));
        }
    }

    #[test]
    fn matroska_and_webm_by_doc_type() {
        // The head of a WebM file ffmpeg wrote: EBMLVersion, ReadVersion, MaxIDLength,
        // MaxSizeLength, then DocType.
        let webm = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04\x42\xf3\x81\x08\x42\x82\x84webm\x42\x87\x81\x02";
        assert_eq!(MediaType::sniff(webm), Some(MediaType::WebM));
        let mkv = b"\x1a\x45\xdf\xa3\xa3\x42\x82\x88matroska\x42\x87\x81\x04";
        assert_eq!(MediaType::sniff(mkv), Some(MediaType::Matroska));
        // Reported: `webm` padded with NULs to `matroska`'s length was refused.
        let padded = b"\x1a\x45\xdf\xa3\xa3\x42\x82\x88webm\0\0\0\0\x42\x87\x81\x04";
        assert_eq!(MediaType::sniff(padded), Some(MediaType::WebM));
        for foreign in [
            &b"\x1a\x45\xdf\xa3\x42\x82\x84webx"[..],
            b"\x1a\x45\xdf\xa3\x42\x82\x88matr",
            b"\x1a\x45\xdf\xa3",
            b"#EXTM3U\n#EXT-X-VERSION:3\nfile:///etc/passwd\n",
            b"ffconcat version 1.0\nfile '/etc/passwd'\n",
        ] {
            assert_eq!(MediaType::sniff(foreign), None, "{foreign:?}");
        }
        assert!(MediaType::Matroska.is_video() && !MediaType::Heic.is_video());
    }
}
