//! The one factory that turns configured URIs into backend implementations.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::config::{ObjectSettings, Settings, ViewSettings};
use crate::log::EventLog;
use crate::log::kafka::KafkaLog;
use crate::log::sqlite::SqliteLog;
use crate::objects::ObjectStore;
use crate::objects::fs::FsObjectStore;
use crate::objects::s3::S3ObjectStore;
use crate::views::ReadStore;
use crate::views::scylla::ScyllaReadStore;
use crate::views::sqlite::SqliteReadStore;

/// The three backends a service works against.
#[derive(Clone)]
pub struct Backends {
    pub objects: Arc<dyn ObjectStore>,
    pub log: Arc<dyn EventLog>,
    pub views: Arc<dyn ReadStore>,
}

impl Backends {
    /// Opens the backends the settings name, and makes sure the media topics exist.
    pub async fn open(settings: &Settings) -> anyhow::Result<Backends> {
        let objects = open_objects(&settings.objects_uri(), &settings.objects).await?;
        let log = open_log(settings)?;
        let views = open_views(&settings.views_uri(), &settings.views).await?;
        for topic in [settings.topic().to_owned(), settings.dlq_topic()] {
            log.ensure_topic(&topic, settings.log.partitions)
                .await
                .with_context(|| format!("failed to ensure topic {topic}"))?;
        }
        Ok(Backends {
            objects,
            log,
            views,
        })
    }
}

fn path_of(uri: &str, scheme: &str) -> Option<PathBuf> {
    uri.strip_prefix(scheme)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

pub async fn open_objects(
    uri: &str,
    settings: &ObjectSettings,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    if let Some(path) = path_of(uri, "file://") {
        let store = FsObjectStore::open(&path)
            .with_context(|| format!("failed to open object store at {}", path.display()))?;
        return Ok(Arc::new(store));
    }
    if uri.starts_with("s3://") {
        let store = S3ObjectStore::connect(uri, settings)
            .await
            .with_context(|| format!("failed to open {uri}"))?;
        return Ok(Arc::new(store));
    }
    bail!("unsupported object store uri {uri:?}: expected file://PATH or s3://BUCKET[/PREFIX]")
}

pub fn open_log(settings: &Settings) -> anyhow::Result<Arc<dyn EventLog>> {
    let uri = settings.log_uri();
    if let Some(path) = path_of(&uri, "sqlite://") {
        let log = SqliteLog::open(&path, settings.log.durability)
            .with_context(|| format!("failed to open event log at {}", path.display()))?;
        return Ok(Arc::new(log));
    }
    if uri.starts_with("kafka://") {
        let log = KafkaLog::connect(&uri, &settings.log)
            .with_context(|| format!("failed to connect to {uri}"))?;
        return Ok(Arc::new(log));
    }
    bail!(
        "unsupported event log uri {uri:?}: expected sqlite://PATH or kafka://HOST:PORT[,HOST:PORT]"
    )
}

pub async fn open_views(uri: &str, settings: &ViewSettings) -> anyhow::Result<Arc<dyn ReadStore>> {
    if let Some(path) = path_of(uri, "sqlite://") {
        let store = SqliteReadStore::open(&path)
            .with_context(|| format!("failed to open read store at {}", path.display()))?
            .with_max_version_ahead(settings.max_version_ahead_secs);
        return Ok(Arc::new(store));
    }
    if uri.starts_with("scylla://") {
        let store = ScyllaReadStore::connect(uri, settings)
            .await
            .with_context(|| format!("failed to open read store at {uri}"))?;
        return Ok(Arc::new(store));
    }
    bail!(
        "unsupported read store uri {uri:?}: expected sqlite://PATH or \
         scylla://HOST:9042[,HOST:9042]/KEYSPACE"
    )
}
