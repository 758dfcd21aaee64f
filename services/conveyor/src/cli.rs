//! Command-line arguments. Flags override configuration; configuration is documented on
//! [`conveyor_config::Settings`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

// clap and the doc comments below: a doc comment on an argument is its `--help` text; one on
// a `flatten` or `subcommand` field is ignored. One on a type (`Cli`, `RoleArgs`, the command
// enums) is set as the about of the command it is added to, then replaced by the explicit
// `about`/`long_about` of `Cli` or by the doc comment of the variant that names the type, so
// every such variant keeps a doc comment of its own.

/// The `conveyor` command line: the global `--config` and the command to run.
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

    /// The command to run; `None` (no command given) runs `serve` with default [`RoleArgs`].
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `conveyor`'s commands: one role (or all of them) to run, operator commands, and tools.
/// Each variant's own doc comment is its line in `conveyor --help`.
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
        /// The URL to GET; an answer of 2xx within 3 s is healthy.
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// Print the API's OpenAPI 3.1 document (what `GET /openapi.json` serves; checked in as
    /// schemas/openapi.json).
    Openapi,
    /// The load lab: benchmarks against references, `loadtest run` against a deployment, and
    /// `loadtest scale`. It is a binary of its own, `conveyor-loadtest` (the crate
    /// tools/loadtest), which this runs when it is installed beside `conveyor` or on PATH;
    /// `conveyor loadtest --help` lists its commands. See docs/benchmarks.md.
    #[command(disable_help_flag = true)]
    Loadtest {
        /// The lab's command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// The flags every role and most `ops` commands take, over the configuration's `data_dir`
/// and `listen`. `None` keeps the configured value; `ops` commands read `--data-dir` only.
#[derive(Debug, Clone, Args, Default)]
pub struct RoleArgs {
    /// Data directory for the embedded backends [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

/// `conveyor ops` commands: operator work against the backends the configuration names. Each
/// variant's own doc comment is its `--help`.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Print each consumer group's lag per partition.
    Lag {
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
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
        from: conveyor_config::ObjectsUri,
        /// Target store: file://PATH or s3://BUCKET[/PREFIX].
        #[arg(long)]
        to: conveyor_config::ObjectsUri,
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
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
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
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
        #[command(flatten)]
        target: RoleArgs,
    },
    /// Rebuild a read model from the log without downtime: project into a fresh table
    /// generation under a new consumer group, catch up, switch reads atomically, drop the old
    /// generation. Queries keep answering throughout. An interrupted replay resumes.
    Replay {
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
        #[command(flatten)]
        target: RoleArgs,
        /// Which read model: `media` (the items, the owners' timelines and their stats).
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
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
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
        /// The data directory to back up (`--data-dir`); `--listen` is ignored.
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
        /// The data directory to restore into (`--data-dir`); `--listen` is ignored.
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

/// `conveyor ops keys` commands: API keys issued into the object store.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key and print it (once: only its hash is kept).
    Create {
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
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
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
        #[command(flatten)]
        target: RoleArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an issued key by its id; every replica refuses it within `auth.refresh_ms`.
    Revoke {
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
        #[command(flatten)]
        target: RoleArgs,
        /// The key's id (`ops keys list`; the 16 hex digits after `cvk_`).
        id: String,
    },
}

/// `conveyor ops topics` commands: administration of the log's topics.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the media topic and its dead-letter topic if missing (partitions, replication and
    /// retention from config), and print each one's partition count. Idempotent; an existing
    /// topic keeps its count, and a count that differs from `log.partitions` is pointed out.
    Ensure {
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
        #[command(flatten)]
        target: RoleArgs,
    },
}

/// `conveyor ops dlq` commands: the dead-letter topic, where records that kept failing go.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters not yet redriven.
    List {
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
        #[command(flatten)]
        target: RoleArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Append every dead letter not yet redriven back to its original topic, once per original
    /// record, and mark it redriven.
    Redrive {
        /// The deployment's data directory (`--data-dir`); `--listen` is ignored.
        #[command(flatten)]
        target: RoleArgs,
    },
}

/// The load lab's binary, which `conveyor loadtest` runs.
pub const LOADTEST_BINARY: &str = "conveyor-loadtest";

/// Runs `conveyor loadtest ARGS` as `conveyor-loadtest ARGS`, the way `cargo foo` runs
/// `cargo-foo`: the lab is a binary of its own, so the product carries none of its code or
/// dependencies. The lab is looked for beside this executable first (where `cargo build`
/// puts it, and where a package installs both), then on `PATH`. On success this process
/// becomes the lab (`exec`), so its exit code, signals and terminal are the lab's.
///
/// # Errors
/// When the lab is not installed, saying how to build it; or when it cannot be executed.
pub fn run_loadtest(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let Some(lab) = find_binary(LOADTEST_BINARY) else {
        anyhow::bail!(
            "`conveyor loadtest` runs the load lab, {LOADTEST_BINARY}, which is not installed \
             beside this binary or on PATH; build it with \
             `cargo build --release -p conveyor-loadtest` (scripts/test builds it too)"
        );
    };
    // Usage lines then read `conveyor loadtest …`, as the user typed it.
    let error = std::process::Command::new(&lab)
        .arg0("conveyor loadtest")
        .args(args)
        .exec();
    Err(anyhow::Error::new(error).context(format!("failed to run {}", lab.display())))
}

/// The executable `name` beside this one (where `cargo build` puts a workspace's binaries,
/// and where a package installs them together), or else the first on `PATH`; `None` when
/// neither has it. A file without an execute bit does not count, as for a shell.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |path: &PathBuf| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(name)))
        .filter(runnable);
    beside.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join(name))
            .find(runnable)
    })
}
