//! The one factory that turns the configured engine URIs into implementations. A distributed
//! engine left out of the build (its Cargo feature off) is refused here, by name.

use std::sync::Arc;

use anyhow::Context;
use conveyor_config::{LogUri, ObjectSettings, ObjectsUri, Settings, ViewSettings, ViewsUri};

use crate::log::EventLog;
use crate::log::sqlite::SqliteLog;
use crate::objects::ObjectStore;
use crate::objects::fs::FsObjectStore;
use crate::views::ReadStore;
use crate::views::sqlite::SqliteReadStore;

/// The three backends a service works against.
#[derive(Clone)]
pub struct Backends {
    /// Media bytes, backups, archive segments, issued keys and event receipts.
    pub objects: Arc<dyn ObjectStore>,
    /// The event log: `media.events`, its dead letters, and every group's offsets.
    pub log: Arc<dyn EventLog>,
    /// The read models the query edge serves.
    pub views: Arc<dyn ReadStore>,
}

impl Backends {
    /// Opens the backends the settings name, and makes sure the media topics exist.
    ///
    /// # Errors
    /// A backend that cannot be opened or reached, or a topic that cannot be created, with
    /// the URI or topic in the message.
    pub async fn open(settings: &Settings) -> anyhow::Result<Backends> {
        let objects = open_objects(&settings.objects_uri(), &settings.objects).await?;
        let log = open_log(settings)?;
        let views = open_views(&settings.views_uri(), &settings.views).await?;
        for topic in [settings.topic().to_owned(), settings.dlq_topic()] {
            let existing = log
                .ensure_topic(&topic, settings.log.partitions)
                .await
                .with_context(|| format!("failed to ensure topic {topic}"))?;
            crate::log::warn_if_partitions_differ(&topic, existing, settings.log.partitions);
        }
        Ok(Backends {
            objects,
            log,
            views,
        })
    }
}

/// The error for an engine this build left out.
#[cfg(not(all(feature = "kafka", feature = "s3", feature = "scylla")))]
fn left_out(uri: &dyn std::fmt::Display, feature: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{uri}: this build of Conveyor has no {feature} support (build conveyor-storage with \
         the `{feature}` feature, which is on by default)"
    )
}

/// Opens the object store at `uri`.
///
/// # Errors
/// A directory that cannot be made, an S3 client that cannot be configured, or S3 left out of
/// this build.
pub async fn open_objects(
    uri: &ObjectsUri,
    settings: &ObjectSettings,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match uri {
        ObjectsUri::Fs(path) => {
            let store = FsObjectStore::open(path)
                .with_context(|| format!("failed to open object store at {}", path.display()))?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "s3")]
        ObjectsUri::S3 { bucket, prefix } => {
            let store = crate::objects::s3::S3ObjectStore::connect(bucket, prefix, settings)
                .await
                .with_context(|| format!("failed to open {uri}"))?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "s3"))]
        ObjectsUri::S3 { .. } => {
            let _ = settings;
            Err(left_out(uri, "s3"))
        }
    }
}

/// Opens the event log the settings name (`log.uri`).
///
/// # Errors
/// A log file that cannot be opened, Kafka settings librdkafka refuses, or Kafka left out of
/// this build.
pub fn open_log(settings: &Settings) -> anyhow::Result<Arc<dyn EventLog>> {
    let uri = settings.log_uri();
    match &uri {
        LogUri::Sqlite(path) => {
            let log = SqliteLog::open(path, settings.log.durability)
                .with_context(|| format!("failed to open event log at {}", path.display()))?;
            Ok(Arc::new(log))
        }
        #[cfg(feature = "kafka")]
        LogUri::Kafka(brokers) => {
            let log = crate::log::kafka::KafkaLog::connect(brokers, &settings.log)
                .with_context(|| format!("failed to connect to {uri}"))?;
            Ok(Arc::new(log))
        }
        #[cfg(not(feature = "kafka"))]
        LogUri::Kafka(_) => Err(left_out(&uri, "kafka")),
    }
}

/// Opens the read store at `uri`.
///
/// # Errors
/// A database file that cannot be opened, a CQL cluster that cannot be reached or has no
/// schema yet (`ops migrate`), or ScyllaDB left out of this build.
#[cfg_attr(not(feature = "scylla"), allow(unused_variables))]
pub async fn open_views(
    uri: &ViewsUri,
    settings: &ViewSettings,
) -> anyhow::Result<Arc<dyn ReadStore>> {
    match uri {
        ViewsUri::Sqlite(path) => {
            let store = SqliteReadStore::open(path)
                .with_context(|| format!("failed to open read store at {}", path.display()))?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "scylla")]
        ViewsUri::Scylla(cluster) => {
            let store = crate::views::scylla::ScyllaReadStore::connect(cluster, settings)
                .await
                .with_context(|| format!("failed to open read store at {uri}"))?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "scylla"))]
        ViewsUri::Scylla(_) => Err(left_out(uri, "scylla")),
    }
}
