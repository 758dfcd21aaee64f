//! Layered configuration: built-in defaults, then an optional TOML file, then
//! `CONVEYOR__SECTION__KEY` environment variables. Unknown keys are refused at every level, so
//! a typo fails at startup instead of being silently ignored. Values with a grammar of their
//! own (the engine URIs in [`uri`], the CORS origins in [`cors`], keys, intervals) are parsed
//! as they load, so a bad one stops startup naming its key, and no other code reads their text.
//!
//! This crate is the bottom of Conveyor's stack: it imports no other Conveyor crate but the
//! schemas (for the default topic's name).
#![warn(missing_docs)]

pub mod cors;
pub mod uri;

pub use cors::CorsOrigins;
pub use uri::{LogUri, ObjectsUri, ScyllaUri, UriError, ViewsUri};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Everything a Conveyor process needs to know. Passed explicitly; never global.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where the embedded backends keep their files (log, views, objects, dev keys).
    pub data_dir: PathBuf,
    /// The address the HTTP edge listens on. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// `[http]`: what the HTTP edge allows a client connection.
    pub http: HttpSettings,
    /// `[log]`: the event log.
    pub log: LogSettings,
    /// `[objects]`: the media store.
    pub objects: ObjectSettings,
    /// `[views]`: the read store.
    pub views: ViewSettings,
    /// `[backup]`: scheduled backups.
    pub backup: BackupSettings,
    /// `[archive]`: `conveyor archive`, the log copied to the object store.
    pub archive: ArchiveSettings,
    /// `[auth]`: API keys, the per-key rate limit and the owners' quota.
    pub auth: AuthSettings,
    /// `[limits]`: the largest uploads and images accepted, and how long a render may take.
    pub limits: Limits,
    /// `[uploads]`: direct uploads through presigned or edge-signed URLs.
    pub uploads: UploadSettings,
    /// `[processor]`: the image processors' consumer group.
    pub processor: ProcessorSettings,
    /// `[video]`: what video is accepted, and how the transcoder runs.
    pub video: VideoSettings,
    /// `[projector]`: the projectors' consumer group.
    pub projector: ProjectorSettings,
    /// `[query]`: the query edge's response cache.
    pub query: QuerySettings,
    /// `[cdn]`: media URLs and the keys that sign private ones.
    pub cdn: CdnSettings,
    /// `[telemetry]`: the log output's format, and where traces go.
    pub telemetry: TelemetrySettings,
}

/// The event log: where it is, its topic, how Kafka topics are created and appended to, and
/// how many times consumers try a failing record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `sqlite://PATH`, or `kafka://host:port[,host:port]`; unset means
    /// `sqlite://<data_dir>/log.db`.
    pub uri: Option<LogUri>,
    /// The media events topic. Its dead letters go to `<topic>.dlq`. Repartitioning is a
    /// migration to a new topic (then a replay), which is why this is configurable.
    pub topic: String,
    /// Kafka replication factor for topics Conveyor creates.
    pub replication: u16,
    /// Kafka retention for topics Conveyor creates, in ms (-1 keeps records forever).
    pub retention_ms: i64,
    /// Kafka consumer session timeout, in ms: how long a dead member keeps its partitions.
    pub session_timeout_ms: u32,
    /// Partitions of a topic created by Conveyor. A group scales up to this many consumers.
    pub partitions: u32,
    /// No longer used, and accepted so existing configuration still loads: a permanent
    /// failure is never retried now (a batch is split at once, and a record that still fails
    /// goes to the dead-letter topic at once), and a transient one is retried until it
    /// succeeds. `serve` and the roles warn when it is set.
    pub max_attempts: u32,
    /// `fsync` (every group commit reaches the disk before it is acknowledged) or `os`
    /// (survives a process crash, not a power cut).
    pub durability: Durability,
    /// Kafka: how long an append waits for the brokers' acknowledgement before it fails as
    /// transient (`message.timeout.ms`), in ms; at least 1. An upload waiting on a broker that
    /// is down answers 503 after this long, or up to about twice it (seen: 12.5–19.6 s at the
    /// 10 s default) when librdkafka first waits for the brokers' metadata. Its record may still have reached the broker just
    /// before (a timeout cannot tell), so a client's retry can make a second media item; it
    /// never gets a 202 for a record that was not appended.
    pub append_timeout_ms: u32,
}

/// How far the embedded SQLite log's appends are synced before they are acknowledged
/// (`log.durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `fsync`: every group commit reaches the disk before it is acknowledged (SQLite
    /// `synchronous = FULL`).
    Fsync,
    /// `os`: written to the operating system before it is acknowledged (SQLite
    /// `synchronous = NORMAL`); survives a process crash, not a power cut.
    Os,
}

/// The media store: originals and variants, local files or S3.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectSettings {
    /// `file://PATH` or `s3://bucket[/prefix]`; unset means `file://<data_dir>/objects`.
    pub uri: Option<ObjectsUri>,
    /// S3 endpoint, for S3-compatible stores (MinIO, moto); unset means AWS.
    pub endpoint: Option<String>,
    /// S3 region; unset means the AWS chain's (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which MinIO and moto need.
    pub path_style: bool,
    /// Multipart part size in MiB (at least 5). Upload memory is part size × (concurrency + 1).
    pub part_size_mib: u64,
    /// Parts of one upload sent at once.
    pub upload_concurrency: usize,
}

impl Default for ObjectSettings {
    fn default() -> Self {
        ObjectSettings {
            uri: None,
            endpoint: None,
            region: None,
            path_style: false,
            part_size_mib: 8,
            upload_concurrency: 4,
        }
    }
}

/// The read store, where projectors keep the read models: embedded SQLite or ScyllaDB.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewSettings {
    /// `sqlite://PATH` or `scylla://HOST:9042[,HOST:9042]/KEYSPACE`; unset means
    /// `sqlite://<data_dir>/views.db`.
    pub uri: Option<ViewsUri>,
    /// CQL: the keyspace's replication factor in the local data centre, used when `ops migrate`
    /// creates it. `ops migrate` refuses a factor above the data centre's node count.
    pub replication_factor: u8,
    /// CQL: the data centre whose replicas `LOCAL_QUORUM` counts and whose nodes coordinate
    /// requests. Unset: the cluster's only data centre (a cluster with several must name one).
    pub local_datacenter: Option<String>,
    /// CQL: how long one read or write may take before it fails. The driver does not retry a
    /// client timeout; the consumer runtime retries the batch as transient (docs/data-model.md).
    pub request_timeout_ms: u64,
    /// CQL: how long one schema change (`ops migrate`) may take, including the wait for schema
    /// agreement. A schema change that times out is retried: every statement is idempotent.
    pub ddl_timeout_ms: u64,
    /// How far ahead of its record's append time (the log's clock: the broker's, on topics
    /// Conveyor creates) an event's version may be, in seconds; the projector lowers a version
    /// further ahead to that bound, and never refuses one. It bounds what a producer with a
    /// forged or skewed clock can make of `created_at`; order never depends on it, as the log
    /// orders an item's events. Keep it below 3 days (259200): ScyllaDB refuses write
    /// timestamps further ahead of its own clock.
    pub max_version_ahead_secs: u64,
}

impl Default for ViewSettings {
    fn default() -> Self {
        ViewSettings {
            uri: None,
            replication_factor: 3,
            local_datacenter: None,
            request_timeout_ms: 5_000,
            ddl_timeout_ms: 60_000,
            max_version_ahead_secs: 86_400,
        }
    }
}

/// Who may call the API, and how much; the keys are checked by `conveyor_runtime::keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Client keys as `owner:key,owner2:key2`, or `owner:sha256:<hex of the key's sha256>`.
    /// Empty makes `serve` create a `dev` key. Keys issued with `conveyor ops keys create`
    /// work besides these.
    pub api_keys: KeyList,
    /// Internal producers' keys for `POST /v1/events`, as `service:key,…` (or `sha256:`).
    pub service_keys: KeyList,
    /// How often each process re-reads the keys issued with `conveyor ops keys`, in
    /// milliseconds: a revoked key stops working everywhere within this.
    pub refresh_ms: u64,
    /// Requests per second each key may make, on each replica, on average; past it (and its
    /// burst), 429 with `Retry-After`. 0 turns the limit off. The default, 100, is far above
    /// what one client of a media API needs and well below what one replica serves.
    pub rate_per_sec: u32,
    /// Requests a key may make at once above its rate (a token bucket's size, GCRA in the
    /// `governor` crate).
    pub rate_burst: u32,
    /// Most bytes of originals one owner may keep, or 0 (the default) for no quota. Checked
    /// against the owner's stats before an upload is read and after it is stored; uploads
    /// still in flight are not counted, so concurrent ones can pass it by their own size.
    pub owner_quota_bytes: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            api_keys: KeyList::default(),
            service_keys: KeyList::default(),
            refresh_ms: 2_000,
            rate_per_sec: 100,
            rate_burst: 200,
            owner_quota_bytes: 0,
        }
    }
}

/// The largest uploads and images accepted (the image limits read from the headers before any
/// decoder runs), and how long one render may take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted upload, in bytes.
    pub max_upload_bytes: u64,
    /// Largest image processed, in pixels (width × height) of each frame, checked from the
    /// header before decoding. libvips streams PNGs and baseline JPEGs, so a 36 MP 16-bit RGBA
    /// PNG renders in tens of MB; WebP, HEIF and progressive JPEG decode whole, about 150–300 MB
    /// for a 7000×7000 image. Memory is bounded by this times `processor.workers`.
    pub max_pixels: u64,
    /// Largest accepted width or height, checked before decoding.
    pub max_side: u32,
    /// Most frames in an animated image (GIF, WebP, HEIF sequences), counted from the headers
    /// before decoding. Only the first frame is rendered.
    pub max_frames: u32,
    /// Most scans in a progressive JPEG. libjpeg makes a full pass over the coefficients per
    /// scan, so a few MB with thousands of scans cost minutes of CPU; encoders write about 10
    /// (`jpegtran -progressive` writes 10). libjpeg-turbo advises a limit of 500 or less
    /// (TurboJPEG's `TJPARAM_SCANLIMIT`); 100 leaves ten times the usual.
    pub max_jpeg_scans: u32,
    /// Longest a render of one original may take, in milliseconds, after which it fails as
    /// timed out. A 50 MP PNG takes about 2 s here.
    pub max_render_ms: u64,
}

/// Direct uploads: clients send the bytes to presigned S3 URLs, or to the edge's own signed
/// URLs with the embedded object store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadSettings {
    /// How long presigned upload URLs, and uploads not yet completed, live, in seconds.
    pub ttl_secs: u64,
    /// Direct uploads at least this large (MiB) go up in presigned multipart parts.
    pub multipart_threshold_mib: u64,
    /// Part size (MiB) clients are told to use for multipart direct uploads (at least 5).
    pub part_size_mib: u64,
    /// Key for the edge's own signed upload URLs (embedded object store). Empty makes `serve`
    /// create one in the data dir; other roles then refuse embedded direct uploads.
    pub signing_key: KeyList,
}

impl Default for UploadSettings {
    fn default() -> Self {
        UploadSettings {
            ttl_secs: 3600,
            multipart_threshold_mib: 64,
            part_size_mib: 16,
            signing_key: KeyList::default(),
        }
    }
}

/// The image processors (`conveyor process`, and `serve`): their consumer group and how much
/// they do at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorSettings {
    /// Consumer group processors join.
    pub group: String,
    /// Images decoded at once in this process; 0 means one per core.
    pub workers: usize,
    /// Records of one partition in flight at once. Offsets commit up to the lowest unfinished.
    pub per_partition: usize,
}

/// Video: what is accepted, and how the transcoder (`conveyor transcode`, and `serve`) runs
/// ffprobe and ffmpeg.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoSettings {
    /// Consumer group transcoders join. It reads the same topic as the processor with its
    /// own offsets, so a backlog of videos never delays a photo.
    pub group: String,
    /// Largest accepted video, in bytes (2 GiB). Images keep `limits.max_upload_bytes`. Large
    /// files should go through the direct multipart upload (`POST /v1/uploads`).
    pub max_bytes: u64,
    /// Longest accepted video, in seconds, read by ffprobe before anything is decoded.
    pub max_duration_secs: u64,
    /// Largest accepted width or height, in pixels (4096: DCI 4K), read by ffprobe.
    pub max_side: u32,
    /// Most streams in one file (video, audio, subtitles, data). Phones write 2 to 6.
    pub max_streams: u32,
    /// The web renditions, by their short side in pixels, comma-separated (`720,360`). A
    /// rung taller than the source is skipped (never upscaled); a source smaller than every
    /// rung gets one rendition at its own size.
    pub ladder: String,
    /// libx264's constant rate factor (0–51; 23 is its default, lower is better and bigger).
    pub crf: u8,
    /// libx264's preset (`ultrafast` … `veryslow`); `veryfast` trades a little size for
    /// about 3× the speed of `medium`.
    pub preset: String,
    /// Threads ffmpeg may use per job; 0 lets ffmpeg choose (one per core).
    pub threads: u32,
    /// Jobs one transcoder runs at once.
    pub jobs: usize,
    /// A job's time limit is `job_timeout_base_secs` plus `job_timeout_factor` × the video's
    /// duration; past it, ffmpeg is killed and the video ends `failed`.
    pub job_timeout_base_secs: u64,
    /// Seconds of time limit per second of the video's duration; see
    /// `job_timeout_base_secs`.
    pub job_timeout_factor: u32,
    /// The ffmpeg and ffprobe executables (Debian's `ffmpeg` package has both): a name looked
    /// up in `PATH`, or a path.
    pub ffmpeg: String,
    /// The ffprobe executable, as `ffmpeg`.
    pub ffprobe: String,
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings {
            group: "transcoder".into(),
            max_bytes: 2 * 1024 * 1024 * 1024,
            max_duration_secs: 3600,
            max_side: 4096,
            max_streams: 16,
            ladder: "720,360".into(),
            crf: 23,
            preset: "veryfast".into(),
            threads: 0,
            jobs: 1,
            job_timeout_base_secs: 60,
            job_timeout_factor: 10,
            ffmpeg: "ffmpeg".into(),
            ffprobe: "ffprobe".into(),
        }
    }
}

impl VideoSettings {
    /// The rungs of [`VideoSettings::ladder`], largest first.
    ///
    /// # Errors
    /// A rung that is not an even number of pixels from 2 to 4320, or an empty ladder.
    pub fn rungs(&self) -> Result<Vec<u32>, String> {
        let mut rungs = self
            .ladder
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| match r.trim_end_matches('p').parse::<u32>() {
                Ok(n) if (2..=4320).contains(&n) && n % 2 == 0 => Ok(n),
                _ => Err(format!(
                    "video.ladder: {r:?} is not an even number of pixels from 2 to 4320"
                )),
            })
            .collect::<Result<Vec<u32>, String>>()?;
        if rungs.is_empty() {
            return Err("video.ladder: name at least one rendition, such as 720,360".into());
        }
        rungs.sort_unstable_by(|a, b| b.cmp(a));
        rungs.dedup();
        Ok(rungs)
    }
}

/// The projectors (`conveyor project`, and `serve`), which fold events into the read models.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorSettings {
    /// Consumer group projectors join.
    pub group: String,
    /// Events of one partition folded into the read store per write.
    pub batch: usize,
}

/// A duration written the human way: `90s`, `15m`, `6h`, `1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub std::time::Duration);

impl Serialize for Interval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like 6h or 30m: {e}"))
        })?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom(
                "the interval must be more than zero",
            ));
        }
        Ok(Interval(duration))
    }
}

/// `conveyor archive`: the log, copied to the object store in segments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveSettings {
    /// The archive's consumer group.
    pub group: String,
    /// Most records in one segment.
    pub batch: usize,
    /// Where segments go: a directory or `s3://bucket[/prefix]`; unset means the media store
    /// (under `archive/`).
    pub to: Option<String>,
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            group: "archive".into(),
            batch: 5_000,
            to: None,
        }
    }
}

/// Scheduled backups, taken by `serve` (embedded mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSettings {
    /// How often, e.g. `6h`; unset means no scheduled backups.
    pub every: Option<Interval>,
    /// How many backups to keep; older ones and the objects only they name are removed.
    pub keep: usize,
    /// Where: a directory or `s3://bucket[/prefix]`; unset means `<data_dir>/backups`. Put it
    /// on another disk or in S3: a backup beside the data shares its fate.
    pub to: Option<String>,
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            every: None,
            keep: 7,
            to: None,
        }
    }
}

/// The query edge's in-process cache of read-model responses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuerySettings {
    /// Read-model responses kept in the in-process cache.
    pub cache_capacity: u64,
    /// Upper bound on how stale a cached response can be if an invalidation is missed, in ms.
    pub cache_ttl_ms: u64,
}

/// How read models name media URLs, and how private ones are signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdnSettings {
    /// Prefix of media URLs in read models, e.g. `https://cdn.example.com`. Empty means
    /// relative `/media/...` URLs served by the query edge itself.
    pub base_url: String,
    /// Keys signing private media URLs, `kid:secret[,kid2:secret2]`; the first signs, all
    /// verify. Empty makes `serve` create one in the data dir.
    pub signing_keys: KeyList,
    /// How long a signed private media URL lives, in seconds.
    pub signed_url_ttl_secs: u64,
}

impl Default for CdnSettings {
    fn default() -> Self {
        CdnSettings {
            base_url: String::new(),
            signing_keys: KeyList::default(),
            signed_url_ttl_secs: 3600,
        }
    }
}

/// The process's own log output and traces. `RUST_LOG` sets the log filter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// Where traces go: a Zipkin v2 collector's span endpoint over plain HTTP, such as
    /// `http://zipkin:9411/api/v2/spans` (Zipkin, Jaeger and Grafana Tempo all take it). Unset
    /// (the default), no trace is recorded or exported and no `traceparent` header is written.
    pub zipkin_endpoint: Option<String>,
    /// The share of new traces kept, 0.0 to 1.0 (default 1.0). The choice is made once, where
    /// a trace starts (an upload, or a record without a `traceparent`); every later process
    /// follows the sampled flag it receives, so a trace is kept whole or not at all.
    pub trace_sample_ratio: f64,
}

impl TelemetrySettings {
    /// Refuses an endpoint that is not an `http://` URL with a host, and a ratio outside 0..=1.
    fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(format!(
                "telemetry.trace_sample_ratio: {} is not between 0.0 and 1.0",
                self.trace_sample_ratio
            ));
        }
        if let Some(endpoint) = &self.zipkin_endpoint {
            if endpoint.is_empty() {
                return Err(
                    "telemetry.zipkin_endpoint is empty: unset it to turn traces off, \
                            or give a collector's URL, such as http://zipkin:9411/api/v2/spans"
                        .into(),
                );
            }
            let host = endpoint.strip_prefix("http://").unwrap_or_default();
            if host.split('/').next().unwrap_or_default().is_empty()
                || endpoint
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!(
                    "telemetry.zipkin_endpoint: {endpoint:?} is not an http:// URL, such as \
                     http://zipkin:9411/api/v2/spans (https is not supported: put the \
                     collector beside the pods, or an agent that forwards over TLS)"
                ));
            }
        }
        Ok(())
    }
}

/// How log lines are written (`telemetry.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `text`: compact lines, for people.
    Text,
    /// `json`: one JSON object per line, the event's fields flattened into it, for log
    /// pipelines.
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("data"),
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            http: HttpSettings::default(),
            log: LogSettings::default(),
            objects: ObjectSettings::default(),
            views: ViewSettings::default(),
            backup: BackupSettings::default(),
            archive: ArchiveSettings::default(),
            auth: AuthSettings::default(),
            limits: Limits::default(),
            uploads: UploadSettings::default(),
            processor: ProcessorSettings::default(),
            video: VideoSettings::default(),
            projector: ProjectorSettings::default(),
            query: QuerySettings::default(),
            cdn: CdnSettings::default(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

/// What the HTTP edge allows a client connection, so that idle, slow or half-sent requests
/// cannot hold it open.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// How long a client may take to send a request's head, in milliseconds. hyper starts the
    /// clock when it waits for a head, so this is also how long an idle keep-alive connection
    /// stays open: a load balancer in front should close idle connections sooner (AWS ALB's
    /// default of 60 s must be lowered). 30 s is hyper's own default; nginx waits 60 s.
    pub header_read_timeout_ms: u64,
    /// Longest wait for the next chunk of a request body, in milliseconds, after which the
    /// request fails: an upload that stalls is cut off rather than held. (tower-http's
    /// `RequestBodyTimeout`.)
    pub body_idle_timeout_ms: u64,
    /// Slowest average a request body may arrive at, in bytes per second, once
    /// `body_rate_grace_ms` has passed; 0 turns the check off. The idle timeout alone lets a
    /// client hold an upload, and a slot under `max_connections`, with a byte every 29 s; this
    /// makes holding every slot cost `max_connections × rate` of real bandwidth (16 MiB/s at the
    /// defaults). Only time spent waiting on the client counts, not time the server spends
    /// storing what came. 4 KiB/s passes a phone on EDGE; Kestrel's `MinRequestBodyDataRate`,
    /// the same rule, defaults to 240 B/s after 5 s.
    pub min_body_rate_bytes_per_sec: u64,
    /// How long a request body may take before `min_body_rate_bytes_per_sec` applies, in
    /// milliseconds: a client's connection ramps up, and small bodies finish inside it.
    pub body_rate_grace_ms: u64,
    /// Longest a response may wait for the client to take more of it, in milliseconds. A
    /// client that stops reading would otherwise hold its connection, and a slot under
    /// `max_connections`, for as long as it likes.
    pub write_stall_timeout_ms: u64,
    /// Most client connections open at once; past it, new ones are closed at once (and
    /// counted in `conveyor_connections_refused_total`). Each costs a task and its buffers;
    /// keep it under the process's file-descriptor limit.
    pub max_connections: usize,
    /// How long a shutdown waits for open requests before closing their connections, in
    /// milliseconds.
    pub drain_timeout_ms: u64,
    /// Origins whose browser scripts may call the API (CORS), comma-separated, such as
    /// `https://app.example.com,https://admin.example.com`, or `*` for any. Empty (the
    /// default) sends no CORS headers, so browsers keep other origins out. Keys travel in
    /// `Authorization`, never in cookies, so no origin is ever sent `Allow-Credentials`.
    pub cors_origins: CorsOrigins,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_read_timeout_ms: 30_000,
            body_idle_timeout_ms: 30_000,
            min_body_rate_bytes_per_sec: 4 * 1024,
            body_rate_grace_ms: 10_000,
            write_stall_timeout_ms: 30_000,
            max_connections: 4_096,
            drain_timeout_ms: 30_000,
            cors_origins: CorsOrigins::None,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            uri: None,
            topic: conveyor_schemas::MEDIA_EVENTS.to_owned(),
            replication: 1,
            retention_ms: 7 * 24 * 3600 * 1000,
            session_timeout_ms: 10_000,
            partitions: 32,
            max_attempts: 5,
            durability: Durability::Fsync,
            append_timeout_ms: 10_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_upload_bytes: 100 * 1024 * 1024,
            max_pixels: 50_000_000,
            max_side: 10_000,
            max_frames: 1_000,
            max_jpeg_scans: 100,
            max_render_ms: 30_000,
        }
    }
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        ProcessorSettings {
            group: "processor".into(),
            workers: 0,
            per_partition: 2,
        }
    }
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        ProjectorSettings {
            group: "projector".into(),
            batch: 512,
        }
    }
}

impl Default for QuerySettings {
    fn default() -> Self {
        QuerySettings {
            cache_capacity: 100_000,
            cache_ttl_ms: 5_000,
        }
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            format: LogFormat::Text,
            zipkin_endpoint: None,
            trace_sample_ratio: 1.0,
        }
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Settings {
    /// Defaults, then `file` if given, then the `CONVEYOR__…` environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from_pairs(file, vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// Like [`Settings::load`], with the environment given as pairs, so tests and config
    /// checks run exactly the parsing the binary runs.
    pub fn load_from_pairs<'a>(
        file: Option<&Path>,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        for (key, value) in pairs {
            let Some(rest) = key.strip_prefix("CONVEYOR__") else {
                continue;
            };
            let path = rest.to_ascii_lowercase().replace("__", ".");
            figment = figment.merge(Serialized::global(&path, env_value(value)));
        }
        let settings: Settings = figment.extract().map_err(|e| ConfigError(flatten(e)))?;
        settings.validate().map_err(ConfigError)?;
        Ok(settings)
    }

    /// What serde cannot check: key names and hashed keys, and the CORS origins. Run on every
    /// load, so `serve` refuses a bad value before it opens anything, and `ops config` names it.
    fn validate(&self) -> Result<(), String> {
        // Each key names one owner or one service: a key listed twice under different names
        // would act as whichever was read last.
        let mut seen: std::collections::HashMap<[u8; 32], (&str, &str)> = Default::default();
        for (setting, list) in [
            ("auth.api_keys", &self.auth.api_keys),
            ("auth.service_keys", &self.auth.service_keys),
        ] {
            for (name, key) in list.entries() {
                check_key_name(name).map_err(|e| format!("{setting}: {e}"))?;
                let hash = key_hash(key).map_err(|e| format!("{setting}: {name:?}'s key {e}"))?;
                if let Some((before_setting, before)) = seen.insert(hash, (setting, name))
                    && (before_setting, before) != (setting, name)
                {
                    return Err(format!(
                        "{setting}: {name:?} has the same key as {before:?} in \
                         {before_setting}; give each owner and service a key of its own"
                    ));
                }
            }
        }
        for (setting, target) in [
            ("archive.to", &self.archive.to),
            ("backup.to", &self.backup.to),
        ] {
            if let Some(target) = target {
                ObjectsUri::from_target(target).map_err(|e| format!("{setting}: {e}"))?;
            }
        }
        self.video.rungs()?;
        self.telemetry.check()?;
        if self.video.crf > 51 {
            return Err("video.crf: libx264 takes 0 to 51".into());
        }
        Ok(())
    }

    /// Settings for tests: a data dir of the caller's, port 0, OS durability, fast caches.
    pub fn for_test(data_dir: &Path) -> Settings {
        let mut settings = Settings {
            data_dir: data_dir.to_owned(),
            listen: "127.0.0.1:0".parse().expect("valid address"),
            ..Settings::default()
        };
        settings.log.partitions = 8;
        settings.log.durability = Durability::Os;
        settings.query.cache_ttl_ms = 500;
        settings.auth.api_keys = KeyList::parse("alice:alice-key,bob:bob-key").expect("valid keys");
        settings.auth.service_keys = KeyList::parse("describer:service-key").expect("valid keys");
        // Tests drive load from one key, as a load generator would; the rate-limit tests set
        // their own rate.
        settings.auth.rate_per_sec = 0;
        settings.uploads.signing_key =
            KeyList::parse("k2:new-signing-key,k1:old-signing-key").expect("valid keys");
        settings.cdn.signing_keys =
            KeyList::parse("m2:new-media-key,m1:old-media-key").expect("valid keys");
        settings
    }

    /// The media events topic.
    pub fn topic(&self) -> &str {
        &self.log.topic
    }

    /// Where records that keep failing go.
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.log.topic)
    }

    /// How long `POST /v1/events` remembers an `event_id` (its receipt), or `None` for as
    /// long as the store keeps it. The window is the log's own: a Kafka topic's retention
    /// (`log.retention_ms`), past which the event is gone from the log too. The embedded
    /// SQLite log never drops events, and a retention of -1 (or any value up to 0) keeps them
    /// forever, so then the receipts stay too.
    pub fn receipt_retention(&self) -> Option<std::time::Duration> {
        (!self.log_uri().keeps_events_forever(self.log.retention_ms))
            .then(|| std::time::Duration::from_millis(self.log.retention_ms as u64))
    }

    /// The event log: `log.uri`, or the embedded log at `<data_dir>/log.db`.
    pub fn log_uri(&self) -> LogUri {
        self.log
            .uri
            .clone()
            .unwrap_or_else(|| LogUri::Sqlite(self.data_dir.join("log.db")))
    }

    /// The media store: `objects.uri`, or the directory `<data_dir>/objects`.
    pub fn objects_uri(&self) -> ObjectsUri {
        self.objects
            .uri
            .clone()
            .unwrap_or_else(|| ObjectsUri::Fs(self.data_dir.join("objects")))
    }

    /// Where the archive's segments go: `archive.to`, or the media store.
    ///
    /// # Errors
    /// An `archive.to` of no object store's scheme (refused when the settings load too).
    pub fn archive_uri(&self) -> Result<ObjectsUri, UriError> {
        match &self.archive.to {
            Some(to) => ObjectsUri::from_target(to),
            None => Ok(self.objects_uri()),
        }
    }

    /// Where backups go: `backup.to`, or the directory `<data_dir>/backups`.
    ///
    /// # Errors
    /// A `backup.to` of no object store's scheme (refused when the settings load too).
    pub fn backup_uri(&self) -> Result<ObjectsUri, UriError> {
        match &self.backup.to {
            Some(to) => ObjectsUri::from_target(to),
            None => Ok(ObjectsUri::Fs(self.data_dir.join("backups"))),
        }
    }

    /// The read store: `views.uri`, or the embedded store at `<data_dir>/views.db`.
    pub fn views_uri(&self) -> ViewsUri {
        self.views
            .uri
            .clone()
            .unwrap_or_else(|| ViewsUri::Sqlite(self.data_dir.join("views.db")))
    }
}

/// Parses an environment value the way figment's `Env` provider does.
fn env_value(value: &str) -> figment::value::Value {
    value
        .parse()
        .unwrap_or_else(|_| figment::value::Value::from(value.to_owned()))
}

/// Each of figment's errors as `key: what was wrong`, without figment's source locations and
/// value types (which are the loader's, not the operator's). A message that already names its
/// key (`http.cors_origins: …`) is left as it is.
fn flatten(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let what = e.kind.to_string();
            if key.is_empty() || what.starts_with(&key) {
                what
            } else {
                format!("{key}: {what}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The sha256 a configured key is checked against: the key's own, or for a key kept as its
/// hash, `sha256:<64 hex digits>` (the prefix in any case), that hash.
///
/// # Errors
/// A key that starts with `sha256:` but is not 64 hex digits after it. Such a key is never
/// taken as a plain key: whoever could read the configuration could then present it.
pub fn key_hash(key: &str) -> Result<[u8; 32], String> {
    use sha2::Digest;
    let hashed = key
        .get(..7)
        .filter(|prefix| prefix.eq_ignore_ascii_case("sha256:"))
        .map(|_| &key[7..]);
    let Some(hex) = hashed else {
        return Ok(sha2::Sha256::digest(key.as_bytes()).into());
    };
    hex::decode(hex)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| {
            "starts with `sha256:` but is not 64 hex digits after it; a key kept as its hash \
             is `name:sha256:<64 hex digits>`, from `printf %s KEY | sha256sum`"
                .to_owned()
        })
}

/// Checks an owner's or a service's name: 1 to 64 of `A-Z a-z 0-9 . _ @ -`, not only dots.
/// Owner names appear in paths (`/v1/owners/{owner}/media`) and in logs, so nothing else is
/// allowed in them.
pub fn check_key_name(name: &str) -> Result<(), String> {
    const RULE: &str =
        "a key name is 1 to 64 of A-Z, a-z, 0-9, `.`, `_`, `@` and `-`, and not only dots";
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-');
    if name.len() > 64 {
        // Not echoed: a key pasted where its name goes would be printed.
        return Err(format!(
            "a name of {} bytes is too long: {RULE}",
            name.len()
        ));
    }
    if name.is_empty() || !name.chars().all(allowed) || name.chars().all(|c| c == '.') {
        return Err(format!("{name:?} is not a key name: {RULE}"));
    }
    Ok(())
}

/// `name:key` pairs. The keys are secrets: `Debug` shows only the names. Serialization writes
/// the keys in full (`name:key,…`, so that it round-trips), and only the defaults, whose lists
/// are empty, are ever serialized.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KeyList(Vec<(String, String)>);

impl KeyList {
    /// Parses `name:key,name2:key2`. Names and keys must be non-empty.
    pub fn parse(text: &str) -> Result<KeyList, String> {
        let mut pairs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, key) = item
                .split_once(':')
                .ok_or_else(|| format!("key entry {item:?} is not `name:key`"))?;
            if name.is_empty() || key.is_empty() {
                return Err("key entries need a name and a key".into());
            }
            pairs.push((name.to_owned(), key.to_owned()));
        }
        Ok(KeyList(pairs))
    }

    /// Whether the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every `(name, key)`, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, k)| (n.as_str(), k.as_str()))
    }

    /// The first entry: the key new signatures use (later entries still verify, for rotation).
    pub fn first(&self) -> Option<(&str, &str)> {
        self.0.first().map(|(n, k)| (n.as_str(), k.as_str()))
    }

    /// The key named `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.as_str())
    }

    /// Adds `name:key` after the existing entries (so it does not become [`KeyList::first`]
    /// unless the list was empty). Neither is checked.
    pub fn push(&mut self, name: &str, key: &str) {
        self.0.push((name.to_owned(), key.to_owned()));
    }
}

impl fmt::Debug for KeyList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        write!(f, "KeyList({names:?}, keys redacted)")
    }
}

impl Serialize for KeyList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Writes every key in full, as `name:key,…`, so the list round-trips through
        // `Deserialize`. Only the defaults are serialized (into figment), and their lists are
        // empty; `ops config` prints `Debug`, which redacts the keys.
        let text: Vec<String> = self.0.iter().map(|(n, k)| format!("{n}:{k}")).collect();
        serializer.serialize_str(&text.join(","))
    }
}

impl<'de> Deserialize<'de> for KeyList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        KeyList::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_receipts_live_as_long_as_the_log_keeps_events() {
        let load = |pairs: &[(&str, &str)]| {
            Settings::load_from_pairs(None, pairs.iter().copied())
                .unwrap()
                .receipt_retention()
        };
        assert_eq!(load(&[]), None, "the embedded log never drops events");
        let kafka = ("CONVEYOR__LOG__URI", "kafka://127.0.0.1:9092");
        assert_eq!(
            load(&[kafka]),
            Some(std::time::Duration::from_secs(7 * 24 * 3600))
        );
        assert_eq!(load(&[kafka, ("CONVEYOR__LOG__RETENTION_MS", "-1")]), None);
    }

    #[test]
    fn malformed_hashed_keys_bad_names_and_bad_origins_refuse_to_load() {
        let load = |key: &str, value: &str| Settings::load_from_pairs(None, [(key, value)]);
        let hash = "ab".repeat(32);
        assert!(load("CONVEYOR__AUTH__API_KEYS", &format!("bob:sha256:{hash}")).is_ok());
        let upper = hash.to_uppercase();
        assert!(load("CONVEYOR__AUTH__API_KEYS", &format!("bob:SHA256:{upper}")).is_ok());
        let both = Settings::load_from_pairs(
            None,
            [
                ("CONVEYOR__AUTH__API_KEYS", "ann:shared"),
                ("CONVEYOR__AUTH__SERVICE_KEYS", "svc:shared"),
            ],
        );
        assert!(both.unwrap_err().to_string().contains("same key"));
        let pasted = format!("cvk_{}", "a".repeat(90));
        let e = load("CONVEYOR__AUTH__API_KEYS", &format!("{pasted}:k")).unwrap_err();
        assert!(
            !e.to_string().contains(&pasted),
            "a pasted key is not echoed: {e}"
        );
        for (key, value, named) in [
            ("CONVEYOR__AUTH__API_KEYS", "bob:sha256:abcd", "bob"),
            (
                "CONVEYOR__AUTH__SERVICE_KEYS",
                &format!("svc:sha256:{}x", &hash[1..]),
                "svc",
            ),
            ("CONVEYOR__AUTH__API_KEYS", "..:k1", ".."),
            ("CONVEYOR__AUTH__API_KEYS", "a b:k1", "a b"),
            ("CONVEYOR__AUTH__API_KEYS", "bob:SHA256:abcd", "bob"),
            (
                "CONVEYOR__AUTH__API_KEYS",
                "ann:same,bob:same",
                "same key as \"ann\"",
            ),
            ("CONVEYOR__HTTP__CORS_ORIGINS", "garbage", "garbage"),
        ] {
            let e = load(key, value).expect_err(value).to_string();
            assert!(e.contains(named), "{e}");
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let s = Settings::load_from_pairs(None, []).unwrap();
        assert_eq!(s.log.partitions, 32);
        assert_eq!(s.limits.max_upload_bytes, 100 * 1024 * 1024);
        assert_eq!(s.limits.max_pixels, 50_000_000);
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.log_uri().to_string(), "sqlite://data/log.db");
    }

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("conveyor.toml");
        std::fs::write(&file, "data_dir = \"/srv/a\"\n[log]\npartitions = 16\n").unwrap();
        let s = Settings::load_from_pairs(
            Some(&file),
            [
                ("CONVEYOR__LOG__PARTITIONS", "64"),
                ("CONVEYOR__AUTH__API_KEYS", "alice:k1,bob:k2"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/srv/a"));
        assert_eq!(s.log.partitions, 64);
        assert_eq!(s.auth.api_keys.get("bob"), Some("k2"));
        assert_eq!(s.auth.api_keys.get("carol"), None);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Settings::load_from_pairs(None, [("CONVEYOR__LOG__PARTITONS", "8")]).unwrap_err();
        assert!(err.to_string().contains("partitons"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[limits]\nmax_upload = 5\n").unwrap();
        assert!(Settings::load_from_pairs(Some(&file), []).is_err());
    }

    /// An engine URI or an origin list is refused as the settings load, naming its key once,
    /// without the loader's source locations; a well-formed one loads as its typed value.
    #[test]
    fn bad_engine_uris_and_origins_are_refused_by_key() {
        for (var, value, named) in [
            (
                "CONVEYOR__LOG__URI",
                "mysql://x",
                "log.uri: unsupported event log uri",
            ),
            (
                "CONVEYOR__OBJECTS__URI",
                "s3://",
                "objects.uri: unsupported object store uri",
            ),
            (
                "CONVEYOR__VIEWS__URI",
                "scylla://h/Bad",
                "views.uri: bad read store uri",
            ),
            (
                "CONVEYOR__HTTP__CORS_ORIGINS",
                "https://a.example/app",
                "http.cors_origins: ",
            ),
            (
                "CONVEYOR__BACKUP__TO",
                "ftp://x",
                "backup.to: unsupported object store uri",
            ),
        ] {
            let e = Settings::load_from_pairs(None, [(var, value)])
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{e}");
            assert!(!e.contains(".rs:") && e.matches(named).count() == 1, "{e}");
        }
        let s =
            Settings::load_from_pairs(None, [("CONVEYOR__LOG__URI", "kafka://k:9092")]).unwrap();
        assert_eq!(s.log_uri(), LogUri::Kafka("k:9092".into()));
    }

    #[test]
    fn malformed_keys_are_refused_and_secrets_stay_hidden() {
        assert!(
            Settings::load_from_pairs(None, [("CONVEYOR__AUTH__API_KEYS", "nocolon")]).is_err()
        );
        let keys = KeyList::parse("alice:supersecret").unwrap();
        assert!(!format!("{keys:?}").contains("supersecret"));
    }
}
