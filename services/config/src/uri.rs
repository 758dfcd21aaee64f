//! The engine URIs, parsed once when the settings load: `log.uri`, `objects.uri` and
//! `views.uri` become [`LogUri`], [`ObjectsUri`] and [`ViewsUri`], and the rest of Conveyor
//! asks these values questions (is it embedded, does it keep events forever) instead of
//! looking at the text. Each prints back as the URI it was parsed from, in its normal form.
//!
//! The forms (docs/architecture.md, "Backends"):
//! - log: `sqlite://PATH` or `kafka://HOST:PORT[,HOST:PORT]`;
//! - objects: `file://PATH` or `s3://BUCKET[/PREFIX]`;
//! - views: `sqlite://PATH` or `scylla://HOST[:PORT][,HOST[:PORT]]/KEYSPACE` (port 9042 when
//!   none is given).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A URI that names no engine Conveyor has, or names one badly. The message quotes the URI
/// and gives the forms that are accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(String);

/// The path after `scheme`, if `uri` starts with it and the path is not empty.
fn path_of(uri: &str, scheme: &str) -> Option<PathBuf> {
    uri.strip_prefix(scheme)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Where the event log lives (`log.uri`).
#[derive(Clone, PartialEq, Eq)]
pub enum LogUri {
    /// The embedded log: one SQLite file (`sqlite://PATH`).
    Sqlite(PathBuf),
    /// Apache Kafka (`kafka://HOST:PORT[,HOST:PORT]`): the bootstrap brokers, comma-separated,
    /// as librdkafka's `bootstrap.servers` takes them.
    Kafka(String),
}

impl LogUri {
    const FORMS: &str = "sqlite://PATH or kafka://HOST:PORT[,HOST:PORT]";

    /// Whether the log is a file on this machine, under the data dir unless configured elsewhere.
    pub fn is_embedded(&self) -> bool {
        matches!(self, LogUri::Sqlite(_))
    }

    /// Whether the log keeps every event for ever, given `log.retention_ms` (which only Kafka
    /// topics have; -1, or any value up to 0, keeps them for ever there too).
    pub fn keeps_events_forever(&self, retention_ms: i64) -> bool {
        match self {
            LogUri::Sqlite(_) => true,
            LogUri::Kafka(_) => retention_ms <= 0,
        }
    }
}

impl FromStr for LogUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        if let Some(path) = path_of(uri, "sqlite://") {
            return Ok(LogUri::Sqlite(path));
        }
        if let Some(brokers) = uri.strip_prefix("kafka://") {
            let brokers = brokers.trim_end_matches('/');
            if !brokers.is_empty() {
                return Ok(LogUri::Kafka(brokers.to_owned()));
            }
        }
        Err(UriError(format!(
            "unsupported event log uri {uri:?}: expected {}",
            Self::FORMS
        )))
    }
}

impl fmt::Display for LogUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogUri::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            LogUri::Kafka(brokers) => write!(f, "kafka://{brokers}"),
        }
    }
}

/// Where media bytes, backups and archive segments live (`objects.uri`, `backup.to`,
/// `archive.to`).
#[derive(Clone, PartialEq, Eq)]
pub enum ObjectsUri {
    /// A local directory (`file://PATH`).
    Fs(PathBuf),
    /// An S3 bucket, or a prefix in one (`s3://BUCKET[/PREFIX]`). `prefix` has no slash at
    /// either end, and is empty for the whole bucket.
    S3 {
        /// The bucket's name.
        bucket: String,
        /// The key prefix every object goes under, without slashes at its ends.
        prefix: String,
    },
}

impl ObjectsUri {
    const FORMS: &str = "file://PATH or s3://BUCKET[/PREFIX]";

    /// The URI for what an operator typed: a URI as it is, a bare path as `file://` of its
    /// absolute form.
    ///
    /// # Errors
    /// A URI of a scheme no object store has.
    pub fn from_target(target: &str) -> Result<ObjectsUri, UriError> {
        if target.contains("://") {
            return target.parse();
        }
        let path = Path::new(target);
        let absolute = std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_owned());
        Ok(ObjectsUri::Fs(absolute))
    }

    /// Whether the store is a directory on this machine.
    pub fn is_embedded(&self) -> bool {
        matches!(self, ObjectsUri::Fs(_))
    }

    /// Whether the store expires objects by its own lifecycle rules (S3), so Conveyor need
    /// not sweep them one by one.
    pub fn has_lifecycle_rules(&self) -> bool {
        matches!(self, ObjectsUri::S3 { .. })
    }
}

impl FromStr for ObjectsUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        if let Some(path) = path_of(uri, "file://") {
            return Ok(ObjectsUri::Fs(path));
        }
        if let Some(rest) = uri.strip_prefix("s3://").filter(|r| !r.is_empty()) {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !bucket.is_empty() {
                return Ok(ObjectsUri::S3 {
                    bucket: bucket.to_owned(),
                    prefix: prefix.trim_matches('/').to_owned(),
                });
            }
        }
        Err(UriError(format!(
            "unsupported object store uri {uri:?}: expected {}",
            Self::FORMS
        )))
    }
}

impl fmt::Display for ObjectsUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectsUri::Fs(path) => write!(f, "file://{}", path.display()),
            ObjectsUri::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            ObjectsUri::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// A CQL cluster and keyspace: `scylla://HOST[:PORT][,HOST[:PORT]]/KEYSPACE`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScyllaUri {
    /// Contact points, each `host:port` (9042 when the URI gave no port).
    pub hosts: Vec<String>,
    /// The keyspace: lowercase letters, digits and `_`, starting with a letter, at most 48
    /// characters (CQL's own limit), since it is spliced into DDL, which cannot bind it.
    pub keyspace: String,
}

impl ScyllaUri {
    /// The same cluster with another keyspace, such as a test's or a benchmark's own.
    ///
    /// # Errors
    /// A keyspace name CQL DDL could not take as it is (see [`ScyllaUri::keyspace`]).
    pub fn with_keyspace(&self, keyspace: &str) -> Result<ScyllaUri, UriError> {
        format!("scylla://{}/{keyspace}", self.hosts.join(",")).parse()
    }
}

impl FromStr for ScyllaUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        let bad = |why: &str| {
            UriError(format!(
                "bad read store uri {uri:?}: {why}; expected scylla://HOST:9042[,HOST:9042]/KEYSPACE"
            ))
        };
        let rest = uri
            .strip_prefix("scylla://")
            .ok_or_else(|| bad("not scylla://"))?;
        let (hosts, keyspace) = rest.split_once('/').ok_or_else(|| bad("no keyspace"))?;
        let hosts: Vec<String> = hosts
            .split(',')
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            return Err(bad("no hosts"));
        }
        let valid = keyspace.len() <= 48
            && keyspace.starts_with(|c: char| c.is_ascii_lowercase())
            && keyspace
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(bad(
                "the keyspace must be lowercase letters, digits and _, starting with a letter",
            ));
        }
        Ok(ScyllaUri {
            hosts: hosts.into_iter().map(with_default_port).collect(),
            keyspace: keyspace.to_owned(),
        })
    }
}

fn with_default_port(host: String) -> String {
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host
    } else {
        format!("{host}:9042")
    }
}

impl fmt::Display for ScyllaUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scylla://{}/{}", self.hosts.join(","), self.keyspace)
    }
}

/// Where the read models live (`views.uri`).
#[derive(Clone, PartialEq, Eq)]
pub enum ViewsUri {
    /// The embedded read store: one SQLite file (`sqlite://PATH`).
    Sqlite(PathBuf),
    /// ScyllaDB or Apache Cassandra (`scylla://…`).
    Scylla(ScyllaUri),
}

impl ViewsUri {
    /// Whether the read store is a file on this machine.
    pub fn is_embedded(&self) -> bool {
        matches!(self, ViewsUri::Sqlite(_))
    }

    /// Whether the store's schema is applied by `ops migrate` (CQL) rather than by the store
    /// itself when it opens (SQLite).
    pub fn needs_migrations(&self) -> bool {
        matches!(self, ViewsUri::Scylla(_))
    }
}

impl FromStr for ViewsUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        if let Some(path) = path_of(uri, "sqlite://") {
            return Ok(ViewsUri::Sqlite(path));
        }
        if uri.starts_with("scylla://") {
            return uri.parse().map(ViewsUri::Scylla);
        }
        Err(UriError(format!(
            "unsupported read store uri {uri:?}: expected sqlite://PATH or \
             scylla://HOST:9042[,HOST:9042]/KEYSPACE"
        )))
    }
}

impl fmt::Display for ViewsUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ViewsUri::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            ViewsUri::Scylla(uri) => uri.fmt(f),
        }
    }
}

/// Serde as the URI's text: settings files and `CONVEYOR__…` variables give URIs as strings,
/// and serializing writes the same text back. (`ops config` prints `Debug`, not this.)
macro_rules! serde_as_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_text!(LogUri, ObjectsUri, ViewsUri, ScyllaUri);

/// `Debug` as the URI's text, quoted: `ops config` prints the settings with `Debug`, and shows
/// each URI as it would be written.
macro_rules! debug_as_text {
    ($($ty:ty),*) => {$(
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.to_string(), f)
            }
        }
    )*};
}

debug_as_text!(LogUri, ObjectsUri, ViewsUri, ScyllaUri);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_uri_prints_back_as_it_was_written() {
        for uri in ["sqlite:///data/log.db", "kafka://a:9092,b:9092"] {
            assert_eq!(uri.parse::<LogUri>().unwrap().to_string(), uri);
        }
        for uri in [
            "file:///data/objects",
            "s3://media",
            "s3://media/some/prefix",
        ] {
            assert_eq!(uri.parse::<ObjectsUri>().unwrap().to_string(), uri);
        }
        for uri in ["sqlite:///data/views.db", "scylla://a:9042,b:9043/media"] {
            assert_eq!(uri.parse::<ViewsUri>().unwrap().to_string(), uri);
        }
    }

    #[test]
    fn a_uri_of_no_engine_is_refused_with_the_forms_that_work() {
        let error = "mysql://db".parse::<LogUri>().unwrap_err().to_string();
        assert!(
            error.contains("mysql://db") && error.contains("kafka://"),
            "{error}"
        );
        for bad in ["kafka://", "sqlite://", "redis://x"] {
            assert!(bad.parse::<LogUri>().is_err(), "{bad}");
        }
        for bad in ["s3://", "s3:///prefix", "file://", "sqlite://x"] {
            assert!(bad.parse::<ObjectsUri>().is_err(), "{bad}");
        }
        for bad in ["sqlite://", "file://x", "scylla://h"] {
            assert!(bad.parse::<ViewsUri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn scylla_hosts_get_the_default_port_and_keyspaces_are_plain_names() {
        assert_eq!(
            "scylla://a:9042,b/media".parse::<ScyllaUri>().unwrap(),
            ScyllaUri {
                hosts: vec!["a:9042".into(), "b:9042".into()],
                keyspace: "media".into()
            }
        );
        for bad in [
            "scylla://a/",
            "scylla:///media",
            "scylla://a/Media",
            "scylla://a/media;drop",
            "scylla://a",
        ] {
            assert!(bad.parse::<ScyllaUri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_questions_code_asks_of_a_uri() {
        let kafka: LogUri = "kafka://k:9092".parse().unwrap();
        assert!(!kafka.is_embedded());
        assert!(!kafka.keeps_events_forever(1_000) && kafka.keeps_events_forever(-1));
        assert!(
            "sqlite://l.db"
                .parse::<LogUri>()
                .unwrap()
                .keeps_events_forever(1_000)
        );
        assert!(
            "s3://b"
                .parse::<ObjectsUri>()
                .unwrap()
                .has_lifecycle_rules()
        );
        assert!("file:///o".parse::<ObjectsUri>().unwrap().is_embedded());
        assert!(
            "scylla://h/k"
                .parse::<ViewsUri>()
                .unwrap()
                .needs_migrations()
        );
        assert_eq!(
            ObjectsUri::from_target("s3://b/p").unwrap(),
            ObjectsUri::S3 {
                bucket: "b".into(),
                prefix: "p".into()
            }
        );
        assert!(ObjectsUri::from_target("backups").unwrap().is_embedded());
    }
}
