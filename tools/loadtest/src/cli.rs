//! The lab's command line: one subcommand per benchmark or load run.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::bench::{BenchLog, BenchViews};

/// `conveyor-loadtest`, also run as `conveyor loadtest`.
#[derive(Debug, Parser)]
#[command(
    name = "conveyor-loadtest",
    version,
    about = "Conveyor's load lab: benchmarks against references, load runs against a deployment, scaling curves",
    long_about = "Conveyor's load lab: benchmarks that print numbers beside a reference measured \
        in the same run (plain SQLite, Kafka's ProducerPerformance, vipsthumbnail, ffmpeg, wrk), \
        `run` against any deployment, and `scale` over local role processes on Kafka. Nothing \
        here passes or fails on speed, except `run`'s own thresholds. See docs/benchmarks.md."
)]
pub struct Cli {
    /// What to measure.
    #[command(subcommand)]
    pub command: LoadtestCommand,
}

/// The lab's commands.
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
        logs: Vec<BenchLog>,
        /// Read stores to project into, each with every log: `sqlite` (in the temp dir) and/or
        /// `scylla://host:9042/keyspace` (a fresh keyspace per run, replication factor 1,
        /// dropped at the end).
        #[arg(long = "views", default_value = "sqlite")]
        views: Vec<BenchViews>,
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
        logs: Vec<BenchLog>,
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
        views: Option<conveyor_config::ScyllaUri>,
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
    /// What an owner's deletes cost their timeline page and stats reads, as the deletes grow:
    /// the owner keeps 10 items from before the deletes and 10 from after, and each read is
    /// timed beside an owner with the same 20 items and no deletes (the floor); on CQL also
    /// beside the tables and queries of the release before the owner ledger. Medians.
    Deletes {
        /// The read store: `sqlite` (in a temp dir) or `scylla://host:9042/keyspace` (a fresh
        /// keyspace, replication factor 1, dropped at the end).
        #[arg(long, default_value = "sqlite")]
        views: BenchViews,
        /// Cumulative delete counts to measure at, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        steps: Vec<u64>,
        /// Timed reads of each kind per step and owner.
        #[arg(long, default_value_t = 30)]
        reads: usize,
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
