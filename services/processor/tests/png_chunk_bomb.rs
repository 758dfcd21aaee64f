//! A PNG whose colour-profile chunk inflates to 1 GiB, six at once: the memory a render takes
//! is bounded by the image, not by what its ancillary chunks claim. A test binary of its own,
//! so the peak RSS it reads is this test's alone.

use std::io::Write;
use std::time::{Duration, Instant};

use conveyor_config::Limits;
use conveyor_processor::render;
use flate2::Compression;
use flate2::write::ZlibEncoder;

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32fast::hash(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// A 64×64 grey-blue PNG with an `iCCP` chunk that inflates to `inflated` bytes: an ICC
/// header that declares that size (ICC.1:2010 §7.2: the size, then `acsp` at byte 36), then
/// zeros, deflated at `level`.
fn png_with_icc_bomb(inflated: usize, level: Compression) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&64u32.to_be_bytes());
    ihdr.extend_from_slice(&64u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(&mut png, b"IHDR", &ihdr);
    let mut iccp = b"bomb\0\0".to_vec(); // profile name, compression method 0
    let mut zlib = ZlibEncoder::new(Vec::new(), level);
    let mut header = [0u8; 128];
    header[..4].copy_from_slice(&(inflated as u32).to_be_bytes());
    header[12..16].copy_from_slice(b"mntr");
    header[16..20].copy_from_slice(b"RGB ");
    header[20..24].copy_from_slice(b"XYZ ");
    header[36..40].copy_from_slice(b"acsp");
    zlib.write_all(&header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..inflated / zeros.len() {
        zlib.write_all(&zeros).unwrap();
    }
    iccp.extend(zlib.finish().unwrap());
    chunk(&mut png, b"iCCP", &iccp);
    // 64 rows, each a filter byte (0: none) and 64 RGB pixels.
    let row: Vec<u8> = std::iter::once(0).chain([60, 90, 140].repeat(64)).collect();
    let rows = row.repeat(64);
    let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
    zlib.write_all(&rows).unwrap();
    chunk(&mut png, b"IDAT", &zlib.finish().unwrap());
    chunk(&mut png, b"IEND", &[]);
    png
}

/// A `/proc/self/status` field, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

#[test]
fn six_icc_bombs_at_once_stay_within_a_bounded_rss() {
    render::init().unwrap();
    // 1 GiB in 4.9 MB is refused from the chunk headers, before libpng inflates anything.
    let big = png_with_icc_bomb(1 << 30, Compression::fast());
    let err = render::render(&big, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("compressed metadata"), "{err}");
    // 512 MiB in 0.5 MB passes that check: libpng's own 8 MB chunk cap must hold it.
    let bomb = png_with_icc_bomb(1 << 29, Compression::best());
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    // Writing 5 resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmRSS:");
    let started = Instant::now();
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| render::render(&bomb, &Limits::default())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    let growth_mib = status_kib("VmHWM:").saturating_sub(before) / 1024;
    for outcome in outcomes {
        // libpng refuses the profile ("exceeds application limits": its 8 MB chunk cap) and
        // the pixels are shown.
        let r = outcome.unwrap_or_else(|e| panic!("not rendered: {e}"));
        assert_eq!((r.width, r.height), (64, 64));
    }
    assert!(
        growth_mib < 96,
        "six renders grew the RSS by {growth_mib} MiB"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}
