//! Command-line arguments. Flags override configuration; configuration is documented on
//! [`conveyor_platform::Settings`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "conveyor",
    version,
    about = "Media and events under load: uploads → event log → processors → projectors → read API",
    long_about = "Media and events under load.\n\n\
        With no command, `conveyor` runs `serve`: every role in one process on embedded \
        backends (SQLite and a local directory under ./data), listening on 127.0.0.1:8080.\n\n\
        Configuration: built-in defaults, then --config FILE (TOML), then CONVEYOR__SECTION__KEY \
        environment variables (e.g. CONVEYOR__LOG__PARTITIONS=64), then flags. Unknown keys are \
        refused."
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "CONVEYOR_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every role in one process (the default).
    Serve(RoleArgs),
    /// Run only the upload and event-intake edge.
    Ingest(RoleArgs),
    /// Run only the processor group (image variants and metadata).
    Process(RoleArgs),
    /// Run only the transcoder group (video: probe, poster, web renditions). Needs ffmpeg and
    /// ffprobe (Debian's `ffmpeg` package); refuses to start without them.
    Transcode(RoleArgs),
    /// Run only the projector group (read models).
    Project(RoleArgs),
    /// Run only the read API (and, in embedded mode, media bytes).
    Query(RoleArgs),
    /// Run the archive group: copy the log into the object store in compressed, checksummed
    /// segments (archive/<topic>/<partition>/<first>-<last>.seg), so it outlives Kafka's
    /// retention and `ops replay --from-archive` can rebuild from it.
    Archive(RoleArgs),
    /// Operator commands.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// Exit 0 if the service at URL answers its health check (for container HEALTHCHECKs,
    /// whose images carry no curl).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// Print the API's OpenAPI 3.1 document (what `GET /openapi.json` serves; checked in as
    /// schemas/openapi.json).
    Openapi,
    /// Benchmarks that print numbers; see docs/benchmarks.md.
    #[command(subcommand)]
    Loadtest(LoadtestCommand),
}

#[derive(Debug, Clone, Args, Default)]
pub struct RoleArgs {
    /// Data directory for the embedded backends [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Print each consumer group's lag per partition.
    Lag {
        #[command(flatten)]
        target: RoleArgs,
        /// Only this group (default: every group that has committed).
        #[arg(long)]
        group: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check configuration (file and environment) and print it, keys redacted.
    Config,
    /// Copy every object from one store to another (e.g. the embedded directory into S3).
    /// Resumable: objects already at the target with the same size are skipped. Each copy is
    /// verified by reading it back and comparing sha256.
    MigrateObjects {
        /// Source store: file://PATH or s3://BUCKET[/PREFIX].
        #[arg(long)]
        from: String,
        /// Target store: file://PATH or s3://BUCKET[/PREFIX].
        #[arg(long)]
        to: String,
        /// Objects copied at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Only keys under this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Remove direct uploads never completed (older than `uploads.ttl_secs`), and on a local
    /// store event receipts older than `log.retention_ms`. `serve` and `ingest` also do this
    /// every few minutes.
    SweepUploads {
        #[command(flatten)]
        target: RoleArgs,
        /// On S3, also install bucket lifecycle rules: `incoming/` (and unfinished multipart
        /// uploads) expire after this many days, and event receipts (`events/`, the
        /// `event_id` idempotency window) after `log.retention_ms`.
        #[arg(long)]
        install_lifecycle_days: Option<i32>,
    },
    /// Create or update the read-model schema in ScyllaDB: the keyspace (replication factor
    /// from `views.replication_factor`) and every migration in `schemas/cql/` not yet applied.
    /// Idempotent. Refuses if an applied migration file has changed since. The embedded SQLite
    /// store creates its schema itself and needs nothing.
    Migrate {
        #[command(flatten)]
        target: RoleArgs,
    },
    /// Rebuild a read model from the log without downtime: project into a fresh table
    /// generation under a new consumer group, catch up, switch reads atomically, drop the old
    /// generation. Queries keep answering throughout. An interrupted replay resumes.
    Replay {
        #[command(flatten)]
        target: RoleArgs,
        /// Which read model: `media` (media_by_id, media_by_owner and owner_stats).
        #[arg(long)]
        projection: String,
        /// Abandon an interrupted replay and start again from the log's first event.
        #[arg(long)]
        from_start: bool,
        /// Read the archive's segments first (`conveyor archive`), then continue from the log:
        /// for events older than the log's retention.
        #[arg(long)]
        from_archive: bool,
    },
    /// Show each group's lag per partition, events per second, dead letters and the health of
    /// every backend, in one screen.
    Status {
        #[command(flatten)]
        target: RoleArgs,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Take a consistent online backup of the embedded mode: the log and read models (SQLite's
    /// online backup API) and the media, with a manifest of sizes, counts and sha256s. Objects
    /// are content-addressed, so only new ones are copied. Safe while serving.
    Backup {
        #[command(flatten)]
        target: RoleArgs,
        /// A directory or s3://BUCKET[/PREFIX] [default: backup.to, or <data_dir>/backups].
        #[arg(long)]
        to: Option<String>,
        /// Objects copied at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Afterwards, keep only the newest N backups (and the objects they name).
        #[arg(long)]
        keep: Option<usize>,
    },
    /// Restore a backup into an empty data dir (and empty media store), checking every file and
    /// object against the manifest. Refuses a corrupt or incomplete backup, and leaves nothing
    /// behind when it does.
    Restore {
        #[command(flatten)]
        target: RoleArgs,
        /// A directory or s3://BUCKET[/PREFIX] holding backups.
        #[arg(long)]
        from: String,
        /// Which backup [default: the newest complete one]. `--list` shows them.
        #[arg(long)]
        id: Option<String>,
        /// List the complete backups and exit.
        #[arg(long)]
        list: bool,
        /// Objects copied at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// API keys issued into the object store, which every replica re-reads every
    /// `auth.refresh_ms`. Only their sha256 is stored: a key is shown once, when created.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Topic administration.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Dead letters: records that kept failing.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key and print it (once: only its hash is kept).
    Create {
        #[command(flatten)]
        target: RoleArgs,
        /// The owner a client key acts as, or the service a `--service` key names.
        name: String,
        /// A service key, for `POST /v1/events`, instead of a client key.
        #[arg(long)]
        service: bool,
    },
    /// List issued keys: id, kind, name, creation time and whether revoked. Never the keys.
    List {
        #[command(flatten)]
        target: RoleArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an issued key by its id; every replica refuses it within `auth.refresh_ms`.
    Revoke {
        #[command(flatten)]
        target: RoleArgs,
        /// The key's id (`ops keys list`; the 16 hex digits after `cvk_`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the media topic and its dead-letter topic if missing (partitions, replication and
    /// retention from config). Idempotent; refuses a partition count that differs.
    Ensure {
        #[command(flatten)]
        target: RoleArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters not yet redriven.
    List {
        #[command(flatten)]
        target: RoleArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Append every dead letter not yet redriven back to its original topic, once per original
    /// record, and mark it redriven.
    Redrive {
        #[command(flatten)]
        target: RoleArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum LoadtestCommand {
    /// Append MediaDescribed events to the embedded log and project them; print events/s.
    Events {
        /// Events to append.
        #[arg(long, default_value_t = 200_000)]
        count: usize,
        /// Events per append call.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Concurrent producers.
        #[arg(long, default_value_t = 4)]
        producers: usize,
        /// Distinct media ids the events describe.
        #[arg(long, default_value_t = 10_000)]
        media: usize,
        /// Event logs to measure, one after the other in this run: `sqlite` (embedded, in a
        /// temp dir) and/or `kafka://host:port` (a fresh topic each run).
        #[arg(long = "log", default_value = "sqlite")]
        logs: Vec<String>,
        /// Read stores to project into, each with every log: `sqlite` (in the temp dir) and/or
        /// `scylla://host:9042/keyspace` (a fresh keyspace per run, replication factor 1,
        /// dropped at the end).
        #[arg(long = "views", default_value = "sqlite")]
        views: Vec<String>,
        /// Then time `ops replay` of the same events, and `ops backup` against `dd` copying
        /// the same database files (embedded log only).
        #[arg(long)]
        recovery: bool,
    },
    /// Raw producer throughput: append records of SIZE bytes, in batches, and wait for every
    /// acknowledgement.
    Produce {
        #[arg(long, default_value_t = 200_000)]
        count: usize,
        /// Payload bytes per record.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Records per append call.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Event logs to measure, as for `events`.
        #[arg(long = "log", default_value = "sqlite")]
        logs: Vec<String>,
        /// A folder of Apache Kafka's jars (the one `scripts/engines` caches:
        /// ~/.cache/conveyor/engines/kafka-3.9.1). With it, every Kafka log is also measured with
        /// Kafka's own `ProducerPerformance`, same record size, count, acks, idempotence,
        /// compression, linger and partitions, interleaved with Conveyor's runs.
        #[arg(long, value_name = "DIR")]
        kafka_tools: Option<PathBuf>,
        /// Runs of each, interleaved; medians are reported.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Photos per second through the whole embedded pipeline (upload over HTTP, process,
    /// project), against `vipsthumbnail` over the same files in one process.
    Photos {
        /// A folder of photos to upload (JPEG, PNG, WebP, GIF, HEIC, AVIF). Without it,
        /// `--count` noise JPEGs of `--size` are made first.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Photos to make when no `--dir` is given.
        #[arg(long, default_value_t = 40)]
        count: usize,
        /// Size of the photos made, `WIDTHxHEIGHT` (4000x3000 is 12 MP).
        #[arg(long, default_value = "4000x3000")]
        size: String,
        /// Uploads in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Drive a deployment with a scenario (stages of offered rate, a weighted mix of
    /// operations) in an open model, watch its pipeline (upload → processed, every group's
    /// lag, the server's CPU and RSS), and write report.json and report.html. Thresholds in the
    /// scenario set the exit code: 0 when all hold, 3 when one breaks (or when not even the
    /// first step of --find-capacity held), 1 on an error.
    Run {
        /// The scenario, TOML: `[[stages]]` (`constant`: rate, duration; `ramp`: from, to,
        /// duration; `steps`: from, to, step, every; `spike`: base, peak, spike, duration),
        /// `[mix]` weights (upload_photo, upload_direct, read_item, read_timeline,
        /// fetch_thumbnail, post_events), `[photos]` (size = "WIDTHxHEIGHT", 800x600 by
        /// default; count, the distinct noise JPEGs made, 8 by default) and `thresholds` (such as
        /// "read_item p99 < 200ms", "processed p99 < 5s", "errors < 1%", "lag bounded"). See
        /// docs/benchmarks.md.
        scenario: PathBuf,
        /// The deployment's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        target: String,
        /// A client key for uploads and reads: the key itself, not a file [default: the key
        /// in the file data/dev-api-key, as `serve` makes it].
        #[arg(long, env = "CONVEYOR_LOADTEST_KEY")]
        key: Option<String>,
        /// A service key, for `post_events`: the key itself, not a file [default: the key in
        /// the file data/dev-service-key].
        #[arg(long, env = "CONVEYOR_LOADTEST_SERVICE_KEY")]
        service_key: Option<String>,
        /// Where report.json and report.html go.
        #[arg(long, default_value = "loadtest-report")]
        out: PathBuf,
        /// Allow a target that is not on this machine.
        #[arg(long)]
        allow_remote: bool,
        /// The server process to sample CPU and RSS from [default: the one listening on the
        /// target's port, when it is local].
        #[arg(long)]
        pid: Option<u32>,
        /// Most operations in flight; past it, operations are counted as dropped.
        #[arg(long, default_value_t = 512)]
        max_in_flight: usize,
        /// Ignore the scenario's stages: offer its mix at rising constant rates, a step at a
        /// time, until one breaks (p99 over --p99, 1 % errors, under 90 % achieved, or a
        /// consumer group's lag growing), and report the highest rate that held and the stage
        /// that broke, with the evidence. The scenario's thresholds are not judged: the search
        /// breaks them by design, so each step is judged instead.
        #[arg(long)]
        find_capacity: bool,
        /// The first step's rate, operations per second.
        #[arg(long, default_value_t = 10.0, requires = "find_capacity")]
        from: f64,
        /// Each step's rate is the last one's times this.
        #[arg(long, default_value_t = 1.5, requires = "find_capacity")]
        factor: f64,
        /// Length of each step.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, requires = "find_capacity")]
        step: std::time::Duration,
        /// Most steps.
        #[arg(long, default_value_t = 12, requires = "find_capacity")]
        max_steps: usize,
        /// A step holds while its p99 (all operations) is under this.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration, requires = "find_capacity")]
        p99: std::time::Duration,
        /// Skip the reference at the end: when the mix reads items, wrk (Debian's `wrk`)
        /// reads one as hard as it can for 5 s, then the generator offers that rate for 5 s,
        /// and the report shows whether the generator kept up (within 10 %).
        #[arg(long)]
        no_reference: bool,
        /// Send reads (items, timelines, thumbnails) here instead of --target: a `query` role
        /// of its own, where no load balancer routes by path.
        #[arg(long)]
        read_target: Option<String>,
        /// Another `/metrics` URL to read consumer lag from (repeat it): the consumer roles
        /// (`process`, `project`) of a distributed deployment publish their groups' lag.
        #[arg(long = "metrics")]
        metrics: Vec<String>,
    },
    /// The scaling curve on Kafka: for each count in --instances, start one `ingest`, one
    /// `query` and that many `process` and `project` instances as local processes, run
    /// `--find-capacity` against them, and stop them. Writes scale.json and scale.html (the
    /// sustainable rate at each count, what broke, CPU per role at capacity, and a sizing table
    /// from the measured per-core figures), and each count's own report under n<count>/.
    /// Exit 3 when a count held no step.
    Scale {
        /// The scenario: its `[mix]` and `[photos]` (its stages are not used).
        scenario: PathBuf,
        /// Kafka's bootstrap address; each count gets a topic and groups of its own.
        #[arg(long, value_name = "HOST:PORT")]
        kafka: String,
        /// A CQL read store, `scylla://host:9042/keyspace` (each count gets a keyspace of its
        /// own, dropped after) [default: SQLite in the run's data dir, shared by the
        /// projectors].
        #[arg(long)]
        views: Option<String>,
        /// Instance counts of `process` and `project`, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        instances: Vec<usize>,
        /// Partitions of each count's topic.
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Where scale.json, scale.html and each count's report go.
        #[arg(long, default_value = "loadtest-scale")]
        out: PathBuf,
        /// The first step's rate, operations per second.
        #[arg(long, default_value_t = 20.0)]
        from: f64,
        /// Each step's rate is the last one's times this.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// Length of each step.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        step: std::time::Duration,
        /// Most steps per count.
        #[arg(long, default_value_t = 10)]
        max_steps: usize,
        /// A step holds while its p99 (all operations) is under this.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        p99: std::time::Duration,
        /// Most operations in flight; past it, operations are counted as dropped.
        #[arg(long, default_value_t = 512)]
        max_in_flight: usize,
    },
    /// Video through the embedded pipeline (upload → processed) against the plain `ffmpeg`
    /// command with the same outputs on the same file; then photo latency, idle and behind a
    /// backlog of videos (the transcoder's own consumer group keeps them apart).
    Video {
        /// A video to use (MP4, MOV, WebM, Matroska). Without it, a clip of `--size` and
        /// `--seconds` is made with ffmpeg (testsrc2 pictures and a tone).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Size of the clip made, `WIDTHxHEIGHT`.
        #[arg(long, default_value = "1280x720")]
        size: String,
        /// Length of the clip made, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
        /// Runs of each, interleaved; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Photos (1600x1200) timed one at a time, idle and then behind the backlog.
        #[arg(long, default_value_t = 20)]
        photos: usize,
        /// Videos queued as the backlog.
        #[arg(long, default_value_t = 3)]
        backlog: usize,
    },
    /// Time thumbnails of one image against `vipsthumbnail` on the same file.
    Thumbnail {
        /// A JPEG, PNG, WebP, GIF, HEIC or AVIF file.
        file: PathBuf,
        /// Longest side of the thumbnail.
        #[arg(long, default_value_t = 256)]
        size: u32,
        /// Runs of each; the median is reported.
        #[arg(long, default_value_t = 9)]
        runs: usize,
    },
}
