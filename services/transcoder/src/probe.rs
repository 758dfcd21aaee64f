//! What ffprobe says of a file, read from its JSON (`-print_format json -show_format
//! -show_streams`), and the limits checked on it before anything is decoded.

use serde::Deserialize;

/// The parts of ffprobe's JSON that Conveyor reads. ffprobe writes numbers it measured as
/// strings (`"duration": "3.000000"`), and leaves out what it does not know.
#[derive(Debug, Deserialize)]
pub struct Output {
    /// Every stream in the file, in ffprobe's order (`-show_streams`); empty when ffprobe
    /// lists none.
    #[serde(default)]
    pub streams: Vec<Stream>,
    /// The container's section (`-show_format`); `None` when ffprobe leaves it out.
    pub format: Option<Format>,
}

/// One entry of ffprobe's `streams` array: a video, audio, subtitle or data stream.
#[derive(Debug, Deserialize)]
pub struct Stream {
    /// The stream's kind as ffprobe names it: `video`, `audio`, `subtitle`, `data`...
    pub codec_type: Option<String>,
    /// ffmpeg's short name of the codec (`h264`, `hevc`, `aac`...).
    pub codec_name: Option<String>,
    /// Coded width in pixels, before the pixel aspect ratio and the rotation; video only.
    pub width: Option<u32>,
    /// Coded height in pixels, before the rotation; video only.
    pub height: Option<u32>,
    /// Average frame rate as a rational string (`"30000/1001"`); `"0/0"` when unknown.
    pub avg_frame_rate: Option<String>,
    /// The lowest rate that represents every timestamp exactly, as a rational string
    /// (`"25/1"`); read when `avg_frame_rate` is unknown.
    pub r_frame_rate: Option<String>,
    /// The shape of one pixel, `W:H` (`2:1` for anamorphic video); `0:1` when unknown.
    pub sample_aspect_ratio: Option<String>,
    /// The stream's side data; the first entry with a rotation gives the video's rotation.
    #[serde(default)]
    pub side_data_list: Vec<SideData>,
    /// The stream's disposition flags; all off when ffprobe leaves them out.
    #[serde(default)]
    pub disposition: Disposition,
}

/// The disposition flags of a stream that Conveyor reads.
#[derive(Debug, Default, Deserialize)]
pub struct Disposition {
    /// 1 for an attached picture, 0 otherwise: cover art in an audio file is a "video"
    /// stream of one picture, and is not taken for the video.
    #[serde(default)]
    pub attached_pic: u8,
}

/// One entry of a stream's `side_data_list`; only the display matrix's rotation is read.
#[derive(Debug, Deserialize)]
pub struct SideData {
    /// The display matrix's rotation, in degrees counter-clockwise (`av_display_rotation_get`).
    pub rotation: Option<f64>,
}

/// ffprobe's `format` section: what the container says of the whole file.
#[derive(Debug, Deserialize)]
pub struct Format {
    /// Duration in seconds, as a decimal string (`"3.000000"`).
    pub duration: Option<String>,
    /// Overall bit rate in bits per second, as a decimal string (`"811010"`).
    pub bit_rate: Option<String>,
    /// How many streams the container holds; 0 when ffprobe leaves it out.
    #[serde(default)]
    pub nb_streams: u32,
}

/// A video, as the transcoder needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// Display size: the coded size, stretched by the pixel aspect ratio and turned by the
    /// rotation.
    pub width: u32,
    /// Display height in pixels (see [`Probe::width`]).
    pub height: u32,
    /// Degrees counter-clockwise, from the display matrix rounded to a whole degree and
    /// brought into 0..360: 0, 90, 180 or 270 for the files phones and cameras write; 0
    /// when the stream has none.
    pub rotation: u16,
    /// Duration in milliseconds, from the container's duration, rounded.
    pub duration_ms: u64,
    /// ffmpeg's name of the first video stream's codec (`h264`, `hevc`...); `unknown` when
    /// ffprobe gives none.
    pub video_codec: String,
    /// ffmpeg's name of the first audio stream's codec (`aac`, `opus`...); `None` when the
    /// file has no sound.
    pub audio_codec: Option<String>,
    /// Frame rate in thousandths of a frame per second (29970 for 30000/1001 fps), from
    /// the average frame rate or else `r_frame_rate`; 0 when neither is known.
    pub frame_rate_milli: u32,
    /// Overall bit rate in bits per second, from the container; 0 when unknown.
    pub bitrate: u64,
    /// Streams in the file: the larger of the container's count and the streams listed.
    pub streams: u32,
}

/// Why a file is not a video Conveyor takes. Shown to clients as the failure reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No video stream, cover art (an attached picture) aside.
    #[error("the file has no video stream")]
    NoVideo,
    /// The video stream's coded width or height is 0 or missing.
    #[error("the video stream has no picture size ({width}x{height})")]
    NoPictureSize {
        /// Coded width in pixels, 0 when missing.
        width: u32,
        /// Coded height in pixels, 0 when missing.
        height: u32,
    },
    /// The container gives no positive, finite duration.
    #[error("the video has no duration that can be read")]
    NoDuration,
    /// Longer than `video.max_duration_secs`, by the container's duration or, after the
    /// encode, by what was measured.
    #[error("the video is {seconds} s long, over the limit of {limit} s")]
    TooLong {
        /// The video's length in seconds, rounded up.
        seconds: u64,
        /// The limit in seconds.
        limit: u64,
    },
    /// The display size's longer side is over `video.max_side`.
    #[error("the video is {width}x{height}, over the limit of {limit} px per side")]
    TooLarge {
        /// Display width in pixels.
        width: u32,
        /// Display height in pixels.
        height: u32,
        /// The limit on either side, in pixels.
        limit: u32,
    },
    /// More streams than `video.max_streams`.
    #[error("the file has {streams} streams, over the limit of {limit}")]
    TooManyStreams {
        /// Streams in the file (see [`Probe::streams`]).
        streams: u32,
        /// The limit.
        limit: u32,
    },
}

/// The limits [`Probe::from_output`] holds a file to (`video.*` settings).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest accepted duration, in seconds (`video.max_duration_secs`).
    pub max_duration_secs: u64,
    /// Largest accepted display width or height, in pixels (`video.max_side`).
    pub max_side: u32,
    /// Most streams in one file (`video.max_streams`).
    pub max_streams: u32,
}

impl Probe {
    /// The probe of ffprobe's `output`, if it is within `limits`.
    ///
    /// # Errors
    /// [`Refused`] when the file has no video stream (cover art does not count), a video
    /// stream with no picture size, no readable duration, or is over a limit.
    pub fn from_output(output: &Output, limits: Limits) -> Result<Probe, Refused> {
        let format = output.format.as_ref();
        let streams = format
            .map(|f| f.nb_streams)
            .unwrap_or_default()
            .max(output.streams.len() as u32);
        if streams > limits.max_streams {
            return Err(Refused::TooManyStreams {
                streams,
                limit: limits.max_streams,
            });
        }
        let video = output
            .streams
            .iter()
            .find(|s| s.codec_type.as_deref() == Some("video") && s.disposition.attached_pic == 0)
            .ok_or(Refused::NoVideo)?;
        let (coded_width, coded_height) = (video.width.unwrap_or(0), video.height.unwrap_or(0));
        if coded_width == 0 || coded_height == 0 {
            return Err(Refused::NoPictureSize {
                width: coded_width,
                height: coded_height,
            });
        }
        // Anamorphic video (HDV's 1440x1080 shown at 1920x1080) is shown wider than coded.
        let (num, den) = video
            .sample_aspect_ratio
            .as_deref()
            .and_then(|r| r.split_once(':'))
            .and_then(|(n, d)| Some((n.parse::<u64>().ok()?, d.parse::<u64>().ok()?)))
            .filter(|&(n, d)| n > 0 && d > 0 && n <= 100 * d && d <= 100 * n)
            .unwrap_or((1, 1));
        let coded_width = u32::try_from((u64::from(coded_width) * num + den / 2) / den)
            .unwrap_or(u32::MAX)
            .max(1);
        let rotation = video
            .side_data_list
            .iter()
            .find_map(|d| d.rotation)
            .map(|r| (r.round() as i64).rem_euclid(360) as u16)
            .unwrap_or(0);
        let (width, height) = if rotation % 180 == 90 {
            (coded_height, coded_width)
        } else {
            (coded_width, coded_height)
        };
        if width.max(height) > limits.max_side {
            return Err(Refused::TooLarge {
                width,
                height,
                limit: limits.max_side,
            });
        }
        let seconds = format
            .and_then(|f| f.duration.as_deref())
            .and_then(|d| d.parse::<f64>().ok())
            .filter(|d| d.is_finite() && *d > 0.0)
            .ok_or(Refused::NoDuration)?;
        if seconds > limits.max_duration_secs as f64 {
            return Err(Refused::TooLong {
                seconds: seconds.ceil() as u64,
                limit: limits.max_duration_secs,
            });
        }
        let frame_rate_milli = [&video.avg_frame_rate, &video.r_frame_rate]
            .into_iter()
            .find_map(|rate| rate.as_deref().and_then(rational_milli))
            .unwrap_or(0);
        let audio_codec = output
            .streams
            .iter()
            .find(|s| s.codec_type.as_deref() == Some("audio"))
            .and_then(|s| s.codec_name.clone());
        Ok(Probe {
            width,
            height,
            rotation,
            duration_ms: (seconds * 1000.0).round() as u64,
            video_codec: video.codec_name.clone().unwrap_or_else(|| "unknown".into()),
            audio_codec,
            frame_rate_milli,
            bitrate: format
                .and_then(|f| f.bit_rate.as_deref())
                .and_then(|b| b.parse().ok())
                .unwrap_or(0),
            streams,
        })
    }

    /// Seconds of video, for progress and time limits.
    pub fn seconds(&self) -> f64 {
        self.duration_ms as f64 / 1000.0
    }
}

/// `"30000/1001"` as 29970; `None` for `0/0` and other rates ffprobe writes when it does not
/// know.
fn rational_milli(rate: &str) -> Option<u32> {
    let (num, den) = rate.split_once('/')?;
    let (num, den) = (num.parse::<u64>().ok()?, den.parse::<u64>().ok()?);
    if num == 0 || den == 0 {
        return None;
    }
    u32::try_from(num * 1000 / den).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_duration_secs: 3600,
        max_side: 4096,
        max_streams: 16,
    };

    /// Trimmed from ffprobe 5.1's output for a phone's portrait clip.
    const PORTRAIT: &str = r#"{
        "streams": [
            {"index": 0, "codec_name": "h264", "codec_type": "video", "width": 640, "height": 360,
             "r_frame_rate": "25/1", "avg_frame_rate": "30000/1001",
             "disposition": {"default": 1, "attached_pic": 0},
             "side_data_list": [{"side_data_type": "Display Matrix", "rotation": -90}]},
            {"index": 1, "codec_name": "aac", "codec_type": "audio", "sample_rate": "48000"}
        ],
        "format": {"nb_streams": 2, "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
                   "duration": "3.000000", "bit_rate": "811010"}
    }"#;

    #[test]
    fn display_size_turns_with_the_rotation() {
        let output: Output = serde_json::from_str(PORTRAIT).unwrap();
        let probe = Probe::from_output(&output, LIMITS).unwrap();
        assert_eq!((probe.width, probe.height, probe.rotation), (360, 640, 270));
        assert_eq!(probe.duration_ms, 3000);
        assert_eq!(probe.frame_rate_milli, 29970);
        assert_eq!(probe.audio_codec.as_deref(), Some("aac"));
        assert_eq!(probe.bitrate, 811_010);
    }

    #[test]
    fn limits_and_missing_video_are_refused() {
        let output: Output = serde_json::from_str(PORTRAIT).unwrap();
        let short = Limits {
            max_duration_secs: 2,
            ..LIMITS
        };
        assert_eq!(
            Probe::from_output(&output, short),
            Err(Refused::TooLong {
                seconds: 3,
                limit: 2
            })
        );
        let narrow = Limits {
            max_side: 600,
            ..LIMITS
        };
        assert!(matches!(
            Probe::from_output(&output, narrow),
            Err(Refused::TooLarge { .. })
        ));
        let one = Limits {
            max_streams: 1,
            ..LIMITS
        };
        assert!(matches!(
            Probe::from_output(&output, one),
            Err(Refused::TooManyStreams { streams: 2, .. })
        ));
        let cover_art: Output = serde_json::from_str(
            r#"{"streams": [{"codec_type": "video", "width": 600, "height": 600,
                             "disposition": {"attached_pic": 1}},
                            {"codec_type": "audio", "codec_name": "mp3"}],
                "format": {"duration": "200.0", "nb_streams": 2}}"#,
        )
        .unwrap();
        assert_eq!(
            Probe::from_output(&cover_art, LIMITS),
            Err(Refused::NoVideo)
        );
        let anamorphic: Output = serde_json::from_str(
            r#"{"streams": [{"codec_type": "video", "width": 1440, "height": 1080,
                             "sample_aspect_ratio": "4:3"}],
                "format": {"duration": "1.0", "nb_streams": 1}}"#,
        )
        .unwrap();
        let probe = Probe::from_output(&anamorphic, LIMITS).unwrap();
        assert_eq!((probe.width, probe.height), (1920, 1080));
        let empty: Output = serde_json::from_str(
            r#"{"streams": [{"codec_type": "video", "width": 0, "height": 0}],
                "format": {"duration": "1.0", "nb_streams": 1}}"#,
        )
        .unwrap();
        assert_eq!(
            Probe::from_output(&empty, LIMITS),
            Err(Refused::NoPictureSize {
                width: 0,
                height: 0
            })
        );
        let no_duration: Output = serde_json::from_str(
            r#"{"streams": [{"codec_type": "video", "width": 6, "height": 6}], "format": {}}"#,
        )
        .unwrap();
        assert_eq!(
            Probe::from_output(&no_duration, LIMITS),
            Err(Refused::NoDuration)
        );
    }
}
