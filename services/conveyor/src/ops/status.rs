//! What an operator looks at: each group's lag (`ops lag`) and the one-screen status of
//! groups, dead letters, backends and access (`ops status`).

use std::time::Duration;

use conveyor_config::Settings;
use conveyor_storage::backends::{open_log, open_objects};

use conveyor_storage::log::EventLog;

use super::REDRIVE_GROUP;

pub(crate) async fn lag(
    settings: &Settings,
    group: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let log = open_log(settings)?;
    let topic = settings.topic();
    let groups = match group {
        Some(g) => vec![g],
        None => log.groups(topic).await?,
    };
    let mut rows = Vec::new();
    for group in &groups {
        for p in log.lag(topic, group).await? {
            rows.push(serde_json::json!({
                "group": group, "topic": topic, "partition": p.partition,
                "committed": p.committed, "end": p.end, "lag": p.lag(),
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no consumer group has committed on {topic} yet");
        return Ok(());
    }
    println!(
        "{:<24} {:>9} {:>12} {:>12} {:>10}",
        "GROUP", "PARTITION", "COMMITTED", "END", "LAG"
    );
    for r in &rows {
        println!(
            "{:<24} {:>9} {:>12} {:>12} {:>10}",
            r["group"].as_str().unwrap_or(""),
            r["partition"],
            r["committed"],
            r["end"],
            r["lag"]
        );
    }
    Ok(())
}

/// One backend's health, as `ops status` reports it.
#[derive(Debug, serde::Serialize)]
pub struct Health {
    /// The backend's URI, as the configuration names it.
    pub uri: String,
    /// Whether the check (open the backend, then one cheap call) succeeded within 10 s.
    pub ok: bool,
    /// How long the check took, in milliseconds (10,000 or so when it timed out).
    pub latency_ms: f64,
    /// Why the check failed (the error chain, or `no answer in 10 s`); `None` when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

async fn health<F: std::future::Future<Output = anyhow::Result<()>>>(
    uri: String,
    check: F,
) -> Health {
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), check).await;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("no answer in 10 s".to_owned()),
    };
    Health {
        uri,
        ok: error.is_none(),
        latency_ms: started.elapsed().as_secs_f64() * 1e3,
        error,
    }
}

/// One consumer group's lag on the media topic, as `ops status` reports it.
#[derive(Debug, serde::Serialize)]
pub struct GroupStatus {
    /// The group's name (`processor`, `projector`, …).
    pub group: String,
    /// Records past the group's committed offsets (end minus committed), summed over every
    /// partition.
    pub lag: u64,
    /// One JSON object per partition: `{"partition", "committed", "end", "lag"}`.
    pub partitions: Vec<serde_json::Value>,
}

/// Everything `ops status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// The media events topic (`log.topic`).
    pub topic: String,
    /// False until a role or `ops topics ensure` creates it.
    pub topic_exists: bool,
    /// The sum of the topic's end offsets: every record ever appended to it, including any
    /// retention has removed. 0 when the log is down or the topic does not exist.
    pub records: u64,
    /// Records appended per second, from the end offsets sampled about one second apart.
    pub events_per_sec: f64,
    /// Every consumer group that has committed on the topic.
    pub groups: Vec<GroupStatus>,
    /// Dead letters not yet redriven: the dead-letter topic's lag for the redrive group; 0
    /// when that cannot be read.
    pub dead_letters: u64,
    /// Each backend's health, by name: `log`, `objects` and `views`.
    pub backends: std::collections::BTreeMap<&'static str, Health>,
    /// Rate limits, quota and key counts, as this configuration sets them.
    pub access: Access,
}

/// Who may call the API, and how much, as this command's configuration sets it: run it with
/// the servers' configuration (the manifests share one ConfigMap) to see what they enforce.
/// The issued keys are read from the shared object store, so those are every replica's.
#[derive(Debug, serde::Serialize)]
pub struct Access {
    /// Requests per second per key, per replica (`auth.rate_per_sec`); 0 is unlimited.
    pub rate_per_sec: u32,
    /// `auth.rate_burst`, as the limiter applies it: never below the rate.
    pub rate_burst: u32,
    /// Bytes of originals per owner (`auth.owner_quota_bytes`); 0 is unlimited.
    pub owner_quota_bytes: u64,
    /// Keys in the configuration (client and service).
    pub configured_keys: usize,
    /// Keys issued with `ops keys create` and not revoked, or `None` when the store is down.
    pub issued_keys: Option<usize>,
    /// Issued keys that were revoked, or `None` when the store is down.
    pub revoked_keys: Option<usize>,
}

/// Gathers lag, throughput (end offsets sampled one second apart), dead letters waiting, and
/// each backend's health. Never fails on an unhealthy backend: it reports it.
pub async fn status(settings: &Settings) -> anyhow::Result<Status> {
    let topic = settings.topic().to_owned();
    let mut backends = std::collections::BTreeMap::new();
    let objects_uri = settings.objects_uri();
    backends.insert(
        "objects",
        health(objects_uri.to_string(), async {
            let store = open_objects(&objects_uri, &settings.objects).await?;
            store.head("conveyor-status-probe").await?;
            Ok(())
        })
        .await,
    );
    let views_uri = settings.views_uri();
    backends.insert(
        "views",
        health(views_uri.to_string(), async {
            let views = conveyor_storage::backends::open_views(&views_uri, &settings.views).await?;
            views.ping().await?;
            Ok(())
        })
        .await,
    );
    let log = open_log(settings);
    let mut topic_exists = true;
    let log_health = health(settings.log_uri().to_string(), async {
        let log = log.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        match log.partitions(&topic).await {
            // The log answers; the topic is simply not created yet.
            Err(conveyor_storage::log::LogError::UnknownTopic(_)) => topic_exists = false,
            other => {
                other?;
            }
        }
        Ok(())
    })
    .await;
    let log_ok = log_health.ok;
    backends.insert("log", log_health);
    let issued = match open_objects(&objects_uri, &settings.objects).await {
        Ok(store) => conveyor_runtime::keys::list(&*store).await.ok(),
        Err(_) => None,
    };
    let access = Access {
        rate_per_sec: settings.auth.rate_per_sec,
        // As the limiter applies it: never below the rate.
        rate_burst: settings.auth.rate_burst.max(settings.auth.rate_per_sec),
        owner_quota_bytes: settings.auth.owner_quota_bytes,
        configured_keys: settings.auth.api_keys.entries().count()
            + settings.auth.service_keys.entries().count(),
        issued_keys: issued
            .as_ref()
            .map(|keys| keys.iter().filter(|k| !k.revoked).count()),
        revoked_keys: issued.map(|keys| keys.iter().filter(|k| k.revoked).count()),
    };
    let mut status = Status {
        topic: topic.clone(),
        topic_exists,
        records: 0,
        events_per_sec: 0.0,
        groups: Vec::new(),
        dead_letters: 0,
        backends,
        access,
    };
    let (Ok(log), true, true) = (log, log_ok, topic_exists) else {
        return Ok(status);
    };
    let ends = |log: std::sync::Arc<dyn EventLog>, topic: String| async move {
        anyhow::Ok(
            log.lag(&topic, "conveyor-status")
                .await?
                .iter()
                .map(|l| l.end)
                .sum::<u64>(),
        )
    };
    let started = std::time::Instant::now();
    let before = ends(log.clone(), topic.clone()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = ends(log.clone(), topic.clone()).await?;
    status.records = after;
    status.events_per_sec = (after - before) as f64 / started.elapsed().as_secs_f64();
    for group in log.groups(&topic).await? {
        let lag = log.lag(&topic, &group).await?;
        status.groups.push(GroupStatus {
            lag: lag.iter().map(|l| l.lag()).sum(),
            partitions: lag
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "partition": l.partition, "committed": l.committed,
                        "end": l.end, "lag": l.lag(),
                    })
                })
                .collect(),
            group,
        });
    }
    // Dead letters waiting: the DLQ's end past what redrive has taken.
    if let Ok(lag) = log.lag(&settings.dlq_topic(), REDRIVE_GROUP).await {
        status.dead_letters = lag.iter().map(|l| l.lag()).sum();
    }
    Ok(status)
}

pub(crate) fn print_status(status: &Status) {
    let a = &status.access;
    let or_unlimited = |n: u64, unit: &str| {
        if n == 0 {
            "unlimited".to_owned()
        } else {
            format!("{n} {unit}")
        }
    };
    let count = |n: Option<usize>| n.map_or("?".to_owned(), |n| n.to_string());
    println!(
        "ACCESS\n  rate per key {} (burst {}), quota per owner {}\n  keys: {} configured, {} issued, {} revoked\n",
        or_unlimited(a.rate_per_sec.into(), "req/s"),
        a.rate_burst,
        or_unlimited(a.owner_quota_bytes, "bytes"),
        a.configured_keys,
        count(a.issued_keys),
        count(a.revoked_keys),
    );
    println!("BACKENDS");
    for (name, h) in &status.backends {
        let state = if h.ok { "ok" } else { "DOWN" };
        println!(
            "  {name:<8} {state:<5} {:>8.1} ms  {}{}",
            h.latency_ms,
            h.uri,
            h.error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    if !status.topic_exists {
        println!(
            "\nLOG {}: the topic does not exist yet (start a role or run `conveyor ops topics ensure`)",
            status.topic
        );
        return;
    }
    println!(
        "\nLOG {}: {} records, {:.0} events/s, {} dead letters waiting",
        status.topic, status.records, status.events_per_sec, status.dead_letters
    );
    if status.groups.is_empty() {
        println!("\nno consumer group has committed yet");
        return;
    }
    println!("\n{:<28} {:>10}  LAG PER PARTITION", "GROUP", "LAG");
    for g in &status.groups {
        let per: Vec<String> = g
            .partitions
            .iter()
            .map(|p| format!("{}:{}", p["partition"], p["lag"]))
            .collect();
        println!("{:<28} {:>10}  {}", g.group, g.lag, per.join(" "));
    }
}
