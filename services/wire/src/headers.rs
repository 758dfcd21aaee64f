//! Walks over image containers' headers that decode nothing: what the processor checks before
//! it lets a decoder near a file (`services/processor/src/render.rs`). Each walk stops where
//! the structure breaks and leaves the rest to the decoder; none allocates, and each takes
//! time linear in its input.

/// What a walk over a JPEG's markers finds (ITU T.81 Annex B).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JpegMarkers {
    /// Start-of-scan segments: 1 for a baseline image, about 10 for a progressive one.
    pub scans: u64,
    /// Whether an end-of-image marker was reached.
    pub ended: bool,
}

/// Walks a JPEG's marker segments and entropy-coded data without decoding anything: each
/// scan costs a full pass over the coefficients in libjpeg, so a file of a few MB with
/// thousands of scans costs minutes of CPU before its first row comes out. Stops at the end
/// marker, or where the structure breaks (the decoder then judges the rest).
pub fn jpeg_markers(bytes: &[u8]) -> JpegMarkers {
    let mut found = JpegMarkers::default();
    let mut i = 2; // past SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xff {
            return found;
        }
        let marker = bytes[i + 1];
        match marker {
            0xff => i += 1, // fill byte
            0xd9 => {
                found.ended = true;
                return found;
            }
            0x01 | 0xd0..=0xd7 => i += 2, // TEM, RSTn: no length
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4) else {
                    return found;
                };
                let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                if len < 2 {
                    return found;
                }
                i += 2 + len;
                if marker == 0xda {
                    found.scans += 1;
                    i = skip_entropy_coded(bytes, i);
                }
            }
        }
    }
    found
}

/// The index of the marker that ends the entropy-coded data starting at `i`: the first `FF`
/// followed by neither a stuffed `00` nor a restart marker `D0`–`D7`.
fn skip_entropy_coded(bytes: &[u8], mut i: usize) -> usize {
    while let Some(at) = bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == 0xff))
    {
        i += at;
        match bytes.get(i + 1) {
            Some(0x00 | 0xd0..=0xd7) => i += 2,
            Some(0xff) => i += 1,
            Some(_) => return i,
            None => return bytes.len(),
        }
    }
    bytes.len()
}

/// A GIF ends inside a screen or image descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// A GIF's logical screen, in pixels (GIF89a §18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GifScreen {
    /// The logical screen's width, in pixels (a 16-bit field in the file).
    pub width: u32,
    /// The logical screen's height, in pixels (a 16-bit field in the file).
    pub height: u32,
}

/// One frame's rectangle on the screen, in pixels (GIF89a §20, the image descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GifFrame {
    /// The frame's left edge: its offset from the screen's left edge, in pixels.
    pub x: u32,
    /// The frame's top edge: its offset from the screen's top edge, in pixels.
    pub y: u32,
    /// The frame's width, in pixels.
    pub width: u32,
    /// The frame's height, in pixels.
    pub height: u32,
}

/// A GIF's screen and its frames, read from the descriptors alone (GIF89a §18–§23: a screen
/// descriptor, then image descriptors and extensions, each followed by length-prefixed
/// sub-blocks, which are skipped, never decompressed).
///
/// # Errors
/// [`Truncated`] when the screen descriptor is cut short; a frame whose descriptor is cut
/// short is an `Err` item, and ends the frames.
pub fn gif_frames(bytes: &[u8]) -> Result<(GifScreen, GifFrames<'_>), Truncated> {
    let screen = GifScreen {
        width: u16_le(bytes, 6).ok_or(Truncated)?,
        height: u16_le(bytes, 8).ok_or(Truncated)?,
    };
    let flags = *bytes.get(10).ok_or(Truncated)?;
    let frames = GifFrames {
        bytes,
        at: 13 + color_table_len(flags),
        done: false,
    };
    Ok((screen, frames))
}

/// The frames of [`gif_frames`], in file order.
#[derive(Debug, Clone)]
pub struct GifFrames<'a> {
    bytes: &'a [u8],
    at: usize,
    done: bool,
}

impl Iterator for GifFrames<'_> {
    type Item = Result<GifFrame, Truncated>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.bytes;
        while !self.done {
            let i = self.at;
            match bytes.get(i) {
                Some(0x2c) => {
                    let descriptor = (|| {
                        let frame = GifFrame {
                            x: u16_le(bytes, i + 1)?,
                            y: u16_le(bytes, i + 3)?,
                            width: u16_le(bytes, i + 5)?,
                            height: u16_le(bytes, i + 7)?,
                        };
                        Some((frame, *bytes.get(i + 9)?))
                    })();
                    let Some((frame, flags)) = descriptor else {
                        self.done = true;
                        return Some(Err(Truncated));
                    };
                    // Past the descriptor, the local colour table and the LZW code size.
                    match skip_sub_blocks(bytes, i + 10 + color_table_len(flags) + 1) {
                        Some(next) => self.at = next,
                        None => self.done = true,
                    }
                    return Some(Ok(frame));
                }
                Some(0x21) => match skip_sub_blocks(bytes, i + 2) {
                    Some(next) => self.at = next,
                    None => self.done = true,
                },
                // The trailer, the end, or bytes that are not GIF: the decoder judges the rest.
                _ => self.done = true,
            }
        }
        None
    }
}

fn u16_le(bytes: &[u8], i: usize) -> Option<u32> {
    bytes
        .get(i..i.checked_add(2)?)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
}

/// Where the sub-blocks starting at `i` end (past their zero-length terminator), or `None`
/// when the bytes end first.
fn skip_sub_blocks(bytes: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *bytes.get(i)? as usize;
        i += 1 + len;
        if len == 0 {
            return Some(i);
        }
    }
}

/// Bytes of the colour table a GIF flags byte declares: 3 × 2^(n+1) when its top bit is set.
fn color_table_len(flags: u8) -> usize {
    if flags & 0x80 == 0 {
        0
    } else {
        3 << ((flags & 0x07) + 1)
    }
}

/// Data bytes of a PNG's `zTXt`, `iTXt` and `iCCP` chunks (text and colour profiles, mostly
/// compressed; PNG specification, ISO/IEC 15948, §11.3), from a walk over the chunk headers
/// that ends at the first `IDAT` or `IEND`, or where the structure breaks.
pub fn png_metadata_bytes(bytes: &[u8]) -> u64 {
    let mut total = 0u64;
    let mut i = 8;
    while let Some(head) = bytes.get(i..i + 8) {
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as u64;
        match &head[4..8] {
            b"zTXt" | b"iTXt" | b"iCCP" => total += length,
            b"IDAT" | b"IEND" => break,
            _ => {}
        }
        let Some(next) = usize::try_from(length)
            .ok()
            .and_then(|l| i.checked_add(12)?.checked_add(l))
        else {
            break;
        };
        i = next;
    }
    total
}

/// ISO-BMFF boxes in `data` (ISO/IEC 14496-12 §4.2): type and payload. Stops where the
/// structure breaks.
pub fn boxes(data: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    let mut i = 0usize;
    std::iter::from_fn(move || {
        let head = data.get(i..i + 8)?;
        let kind: [u8; 4] = head[4..8].try_into().ok()?;
        let (header, size) = match u32::from_be_bytes(head[..4].try_into().ok()?) {
            0 => (8, data.len() - i),
            1 => (
                16,
                usize::try_from(u64::from_be_bytes(
                    data.get(i + 8..i + 16)?.try_into().ok()?,
                ))
                .ok()?,
            ),
            n => (8, n as usize),
        };
        let payload = data.get(i + header..i.checked_add(size)?)?;
        i += size.max(header);
        Some((kind, payload))
    })
}

/// The tiles of a HEIF file's grid images: the `dimg` references in its `meta` box's `iref`
/// (ISO/IEC 23008-12 §9.3, §6.6.2.3), over every item, so a grid that is not the primary
/// item counts too. 0 for a file without references.
pub fn heif_grid_tiles(bytes: &[u8]) -> u64 {
    let Some((_, meta)) = boxes(bytes).find(|(kind, _)| kind == b"meta") else {
        return 0;
    };
    // `meta` and `iref` are full boxes: a version byte and 3 flag bytes first.
    let Some((_, iref)) = meta
        .get(4..)
        .and_then(|children| boxes(children).find(|(kind, _)| kind == b"iref"))
    else {
        return 0;
    };
    let Some(&version) = iref.first() else {
        return 0;
    };
    let id_size = if version == 0 { 2 } else { 4 };
    let mut tiles = 0u64;
    for (kind, reference) in boxes(iref.get(4..).unwrap_or_default()) {
        if &kind != b"dimg" {
            continue;
        }
        // from_item_ID, reference_count (u16), then that many to_item_IDs.
        if let Some(count) = reference.get(id_size..id_size + 2) {
            tiles += u16::from_be_bytes([count[0], count[1]]) as u64;
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gif_walk_reads_descriptors_and_skips_sub_blocks() {
        // Header, a 10x8 screen with a 2-entry global table, a graphic control extension, a
        // 4x3 frame at 6,5 with one data sub-block, then a frame cut short.
        let mut gif = b"GIF89a".to_vec();
        gif.extend([10, 0, 8, 0, 0x80, 0, 0]);
        gif.extend([0; 6]);
        gif.extend([0x21, 0xf9, 4, 0, 0, 0, 0, 0]);
        gif.extend([0x2c, 6, 0, 5, 0, 4, 0, 3, 0, 0, 2, 2, 0xaa, 0xbb, 0]);
        gif.extend([0x2c, 1, 0]);
        let (screen, frames) = gif_frames(&gif).unwrap();
        assert_eq!(
            screen,
            GifScreen {
                width: 10,
                height: 8
            }
        );
        let frames: Vec<_> = frames.collect();
        assert_eq!(
            frames,
            [
                Ok(GifFrame {
                    x: 6,
                    y: 5,
                    width: 4,
                    height: 3
                }),
                Err(Truncated)
            ]
        );
        assert_eq!(gif_frames(b"GIF89a\x01").unwrap_err(), Truncated);
    }

    #[test]
    fn the_scan_walk_counts_scans_and_sees_the_end() {
        // SOI, a 4-byte APP0, SOS with 2 bytes of data (one stuffed FF, one RST), SOS, EOI.
        let jpeg = [
            0xff, 0xd8, 0xff, 0xe0, 0x00, 0x04, 0x00, 0x00, //
            0xff, 0xda, 0x00, 0x02, 0x12, 0xff, 0x00, 0xff, 0xd3, 0x34, //
            0xff, 0xda, 0x00, 0x02, 0x56, //
            0xff, 0xd9,
        ];
        assert_eq!(
            jpeg_markers(&jpeg),
            JpegMarkers {
                scans: 2,
                ended: true
            }
        );
        assert_eq!(
            jpeg_markers(&jpeg[..jpeg.len() - 2]),
            JpegMarkers {
                scans: 2,
                ended: false
            }
        );
        // A segment length that runs off the end, or garbage where a marker should be.
        assert_eq!(jpeg_markers(&[0xff, 0xd8, 0xff, 0xe1, 0x7f]).scans, 0);
        assert_eq!(
            jpeg_markers(&[0xff, 0xd8, 0x00, 0x00]),
            JpegMarkers::default()
        );
    }
}
