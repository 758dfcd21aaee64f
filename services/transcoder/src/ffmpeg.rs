//! ffprobe and ffmpeg, run on an untrusted file.
//!
//! - **Only the uploaded file is read.** Every run reads one local path through the `file`
//!   protocol alone (`-protocol_whitelist file`), with the demuxer forced from the sniffed
//!   container (`-f mov` or `-f matroska`) and no other demuxer allowed
//!   (`-format_whitelist`). So a file that is really an HLS or concat playlist, or one whose
//!   references point at other files or at URLs, is read as MP4 or Matroska and fails; no
//!   playlist demuxer, and no protocol but `file`, ever opens. (The MOV demuxer's external
//!   data references stay off: `enable_drefs` defaults to 0.)
//! - **No stdin, bounded output.** ffmpeg gets no stdin (`-nostdin`), writes only errors, and
//!   at most [`STDERR_KEPT`] bytes of them are kept for the log.
//! - **Killed with its job.** A child is killed when its job is dropped (`kill_on_drop`), times
//!   out or is aborted, and, where util-linux's `setpriv` exists, when the transcoder process
//!   itself dies, even by SIGKILL (`--pdeathsig KILL`), so no encode outlives its worker.

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use conveyor_config::VideoSettings;
use conveyor_storage::media::MediaType;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// Bytes of a child's stderr kept for the log.
pub const STDERR_KEPT: usize = 4096;

/// The demuxers a run may use: the two [`demuxer`] forces.
const DEMUXERS: &str = "mov,matroska";

/// A tool the transcoder needs and cannot run.
#[derive(Debug, thiserror::Error)]
#[error(
    "{tool} cannot run ({path}: {reason}); install Debian's `ffmpeg` package, which has both \
     ffmpeg and ffprobe (scripts/deps installs it), or set video.{tool} to its path"
)]
pub struct MissingTool {
    /// `ffmpeg` or `ffprobe`.
    pub tool: &'static str,
    /// The executable that was tried: `video.ffmpeg` or `video.ffprobe`, a name looked up
    /// in `PATH` or a path.
    pub path: String,
    reason: String,
}

/// The executables, found and checked once.
#[derive(Debug, Clone)]
pub struct Tools {
    ffmpeg: String,
    ffprobe: String,
    /// Whether util-linux's `setpriv` runs, to tie each child's life to this process.
    setpriv: bool,
}

impl Tools {
    /// Checks that ffprobe and ffmpeg run (`-version`), at start-up.
    ///
    /// # Errors
    /// [`MissingTool`], naming the first tool that does not run.
    pub fn find(settings: &VideoSettings) -> Result<Tools, MissingTool> {
        for (tool, path) in [("ffprobe", &settings.ffprobe), ("ffmpeg", &settings.ffmpeg)] {
            let ran = std::process::Command::new(path)
                .arg("-version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let reason = match ran {
                Ok(status) if status.success() => continue,
                Ok(status) => format!("`-version` {status}"),
                Err(e) => e.to_string(),
            };
            return Err(MissingTool {
                tool,
                path: path.clone(),
                reason,
            });
        }
        let setpriv = std::process::Command::new("setpriv")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !setpriv {
            tracing::warn!(
                "util-linux's setpriv is missing: an ffmpeg started by a transcoder that is \
                 killed with SIGKILL runs on until its job ends"
            );
        }
        Ok(Tools {
            ffmpeg: settings.ffmpeg.clone(),
            ffprobe: settings.ffprobe.clone(),
            setpriv,
        })
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = if self.setpriv {
            let mut c = tokio::process::Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--", program]);
            c
        } else {
            tokio::process::Command::new(program)
        };
        command
            .kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// ffprobe of `input`, as JSON with the format and every stream.
    pub fn probe(&self, media: MediaType, input: &Path) -> tokio::process::Command {
        let mut command = self.command(&self.ffprobe);
        command
            .args(["-v", "error", "-hide_banner"])
            .args(input_args(media, input))
            .args(["-print_format", "json", "-show_format", "-show_streams"])
            .stdout(Stdio::piped());
        command
    }

    /// ffmpeg with the shared options and `input`; outputs follow. `seek` goes before the
    /// input, so ffmpeg seeks in the container instead of decoding up to it.
    pub fn ffmpeg(
        &self,
        media: MediaType,
        input: &Path,
        seek: Option<Duration>,
    ) -> tokio::process::Command {
        let mut command = self.command(&self.ffmpeg);
        command.args(["-nostdin", "-hide_banner", "-nostats", "-loglevel", "error"]);
        if let Some(at) = seek {
            command.args(["-ss", &format!("{:.3}", at.as_secs_f64())]);
        }
        command.args(input_args(media, input));
        command
    }
}

/// The demuxer ffmpeg is forced to use for a sniffed container: `mov` reads MP4 and
/// QuickTime, `matroska` reads Matroska and WebM.
pub fn demuxer(media: MediaType) -> Option<&'static str> {
    match media {
        MediaType::Mp4 | MediaType::QuickTime => Some("mov"),
        MediaType::WebM | MediaType::Matroska => Some("matroska"),
        _ => None,
    }
}

/// `file:` and the path, so that a path with a colon is never read as a protocol.
pub fn file_arg(path: &Path) -> OsString {
    let mut arg = OsString::from("file:");
    arg.push(path);
    arg
}

fn input_args(media: MediaType, input: &Path) -> Vec<OsString> {
    [
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        DEMUXERS,
        "-f",
        demuxer(media).unwrap_or("mov"),
        "-i",
    ]
    .into_iter()
    .map(OsString::from)
    .chain([file_arg(input)])
    .collect()
}

/// Why a run did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The child could not be started, or waiting for it failed: worth another try.
    #[error("could not start it: {0}")]
    Spawn(#[source] std::io::Error),
    /// It ran past its deadline and was killed.
    #[error("it ran past its deadline and was killed")]
    TimedOut,
    /// Its `abort` token was cancelled (the media was deleted, or the transcoder is
    /// stopping), and it was killed.
    #[error("it was stopped")]
    Aborted,
    /// It exited with an error code: the file is the cause. `stderr` is for the log.
    #[error("it failed ({status})")]
    Failed {
        /// The exit status, with its code.
        status: ExitStatus,
        /// The first [`STDERR_KEPT`] bytes of its stderr, lossily decoded as UTF-8.
        stderr: String,
    },
    /// It was killed by a signal it was not sent here (the OOM killer, an operator): worth
    /// another try.
    #[error("it was killed ({status})")]
    Killed {
        /// The exit status, which has no code, only the signal.
        status: ExitStatus,
        /// The first [`STDERR_KEPT`] bytes of its stderr, lossily decoded as UTF-8.
        stderr: String,
    },
}

impl RunError {
    /// Whether another try may succeed: the machine's fault, not the file's.
    pub fn is_transient(&self) -> bool {
        matches!(self, RunError::Spawn(_) | RunError::Killed { .. })
    }
}

/// Runs `command` until it exits, `deadline` passes or `abort` is cancelled; the last two
/// kill it. When `progress` is given, stdout is ffmpeg's `-progress pipe:1` report, and each
/// `out_time_us` it reads is sent there. Returns stdout otherwise (at most `max_stdout`
/// bytes: ffprobe's JSON).
pub async fn run(
    mut command: tokio::process::Command,
    deadline: tokio::time::Instant,
    abort: &CancellationToken,
    progress: Option<tokio::sync::watch::Sender<Duration>>,
    max_stdout: usize,
) -> Result<Vec<u8>, RunError> {
    if progress.is_some() {
        command.stdout(Stdio::piped());
    }
    let mut child = command.spawn().map_err(RunError::Spawn)?;
    let stderr = child.stderr.take().map(|s| {
        tokio::spawn(async move {
            let mut kept = Vec::new();
            let _ = s.take(STDERR_KEPT as u64).read_to_end(&mut kept).await;
            String::from_utf8_lossy(&kept).into_owned()
        })
    });
    let stdout = child.stdout.take().map(|out| {
        tokio::spawn(async move {
            match progress {
                Some(progress) => {
                    let mut lines = tokio::io::BufReader::new(out).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(us) = line
                            .strip_prefix("out_time_us=")
                            .and_then(|v| v.trim().parse::<u64>().ok())
                        {
                            let _ = progress.send(Duration::from_micros(us));
                        }
                    }
                    Vec::new()
                }
                None => {
                    let mut kept = Vec::new();
                    let _ = out.take(max_stdout as u64).read_to_end(&mut kept).await;
                    kept
                }
            }
        })
    });
    let status = tokio::select! {
        status = child.wait() => status.map_err(RunError::Spawn)?,
        _ = tokio::time::sleep_until(deadline) => {
            let _ = child.kill().await;
            return Err(RunError::TimedOut);
        }
        _ = abort.cancelled() => {
            let _ = child.kill().await;
            return Err(RunError::Aborted);
        }
    };
    let stderr = match stderr {
        Some(task) => task.await.unwrap_or_default(),
        None => String::new(),
    };
    let stdout = match stdout {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    if status.success() {
        return Ok(stdout);
    }
    if status.code().is_none() {
        return Err(RunError::Killed { status, stderr });
    }
    Err(RunError::Failed { status, stderr })
}
