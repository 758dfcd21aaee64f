//! Test videos, made by ffmpeg from its own sources (`testsrc2` pictures, a `sine` tone), and
//! the checks a player would make of a rendition.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs ffmpeg with `args` (inputs and codecs) into a file with extension `ext`, and returns
/// the file's bytes.
pub fn make(args: &[&str], ext: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join(format!("video.{ext}"));
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error"])
        .args(args)
        .arg("-y")
        .arg(&out)
        .status()
        .expect("ffmpeg runs (scripts/deps installs Debian's ffmpeg)");
    assert!(status.success(), "ffmpeg {args:?} failed");
    std::fs::read(&out).expect("the video ffmpeg wrote")
}

/// `testsrc2` pictures of `width`×`height` (25 fps), as long as `length` says (`-t 2`,
/// `-frames:v 1`), then `rest` (filters and codecs).
fn pictures(width: u32, height: u32, length: &[&str], rest: &[&str], ext: &str) -> Vec<u8> {
    let picture = format!("testsrc2=size={width}x{height}:rate=25");
    let mut args = vec!["-f", "lavfi", "-i", &picture];
    args.extend_from_slice(length);
    args.extend_from_slice(rest);
    make(&args, ext)
}

/// libx264 at its fastest, 8-bit 4:2:0.
const X264: [&str; 6] = [
    "-c:v",
    "libx264",
    "-preset",
    "ultrafast",
    "-pix_fmt",
    "yuv420p",
];

/// H.264 and AAC in MP4, `seconds` long.
pub fn mp4(width: u32, height: u32, seconds: u32) -> Vec<u8> {
    let seconds = seconds.to_string();
    let tone = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"];
    let mut rest = X264.to_vec();
    rest.extend(["-c:a", "aac", "-shortest"]);
    pictures(
        width,
        height,
        &[&tone[..], &["-t", &seconds]].concat(),
        &rest,
        "mp4",
    )
}

/// A QuickTime file of `width`×`height` pictures whose container asks players to turn it by
/// 90° (as phones record portrait video).
pub fn rotated_mov(width: u32, height: u32) -> Vec<u8> {
    // ffmpeg writes the display matrix for `rotate` only when it copies the stream, so the
    // picture is encoded first and then remuxed.
    let dir = tempfile::tempdir().expect("temp dir");
    let upright = dir.path().join("upright.mp4");
    std::fs::write(&upright, mp4(width, height, 2)).expect("write");
    let upright = upright.to_string_lossy().into_owned();
    make(
        &[
            "-i",
            &upright,
            "-c",
            "copy",
            "-an",
            "-metadata:s:v:0",
            "rotate=90",
        ],
        "mov",
    )
}

/// H.264 in MP4 whose pixels are twice as wide as tall (sample aspect ratio 2:1), as
/// anamorphic HDV and DV are: shown at twice its coded width.
pub fn anamorphic(width: u32, height: u32) -> Vec<u8> {
    let rest = [&["-vf", "setsar=2/1"][..], &X264].concat();
    pictures(width, height, &["-t", "2"], &rest, "mp4")
}

/// A clip of one frame.
pub fn one_frame(width: u32, height: u32) -> Vec<u8> {
    pictures(width, height, &["-frames:v", "1"], &X264, "mp4")
}

/// VP9 in WebM, no audio.
pub fn webm(width: u32, height: u32) -> Vec<u8> {
    let vp9 = [
        "-c:v",
        "libvpx-vp9",
        "-b:v",
        "200k",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
    ];
    pictures(width, height, &["-t", "2"], &vp9, "webm")
}

/// 10-bit H.264 (High 10) in MP4.
pub fn ten_bit(width: u32, height: u32) -> Vec<u8> {
    let ten = [
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p10le",
    ];
    pictures(width, height, &["-t", "2"], &ten, "mp4")
}

/// ffprobe's JSON (format and streams) for `bytes`.
pub fn probe(bytes: &[u8]) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("probed");
    std::fs::write(&path, bytes).expect("write");
    probe_path(&path)
}

/// ffprobe's JSON (format and streams) for the file at `path`.
pub fn probe_path(path: &Path) -> Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ffprobe JSON")
}

/// The types of an MP4's top-level boxes, in file order (`ftyp`, `moov`, `mdat`, …).
pub fn top_level_boxes(bytes: &[u8]) -> Vec<String> {
    let mut boxes = Vec::new();
    let mut at = 0usize;
    while at + 8 <= bytes.len() {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as u64;
        let kind = String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned();
        let size = match size {
            1 if at + 16 <= bytes.len() => {
                u64::from_be_bytes(bytes[at + 8..at + 16].try_into().unwrap())
            }
            0 => (bytes.len() - at) as u64,
            n => n,
        };
        boxes.push(kind);
        if size < 8 {
            break;
        }
        at = at.saturating_add(size as usize);
    }
    boxes
}

/// How many processes' command lines mention `needle` (a job directory, a data dir).
pub fn processes_mentioning(needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(needle))
        .count()
}
