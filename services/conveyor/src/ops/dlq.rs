//! Dead letters: listing them and appending them back to their topics (`ops dlq`).

use std::collections::HashSet;
use std::time::Duration;

use conveyor_config::Settings;
use conveyor_storage::log::{Delivered, EventLog, StartFrom};
use indicatif::ProgressBar;

/// The group whose committed offsets on the dead-letter topic mark what has been redriven.
pub const REDRIVE_GROUP: &str = "dlq-redrive";

pub(crate) fn letter_json(d: &Delivered) -> serde_json::Value {
    serde_json::json!({
        "dlq_partition": d.partition, "dlq_offset": d.offset,
        "key": String::from_utf8_lossy(&d.key),
        "headers": d.headers.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "bytes": d.value.len(),
    })
}

/// Dead letters past the redrive group's committed offsets.
pub async fn dead_letters(log: &dyn EventLog, dlq: &str) -> anyhow::Result<Vec<Delivered>> {
    let mut out = Vec::new();
    for p in log.lag(dlq, REDRIVE_GROUP).await? {
        if p.lag() > 0 {
            out.extend(
                log.read(dlq, p.partition, p.committed, p.lag() as usize)
                    .await?,
            );
        }
    }
    Ok(out)
}

/// Appends each waiting dead letter back to its original topic (once per original record,
/// however many groups dead-lettered it), then commits the redrive group past it.
pub async fn redrive(log: &dyn EventLog, settings: &Settings) -> anyhow::Result<usize> {
    let dlq = settings.dlq_topic();
    let ends: Vec<(u32, u64)> = log
        .lag(&dlq, REDRIVE_GROUP)
        .await?
        .iter()
        .map(|l| (l.partition, l.end))
        .collect();
    let total: u64 = log
        .lag(&dlq, REDRIVE_GROUP)
        .await?
        .iter()
        .map(|l| l.lag())
        .sum();
    if total == 0 {
        return Ok(0);
    }
    let bar = ProgressBar::new(total);
    let mut sub = log
        .subscribe(&dlq, REDRIVE_GROUP, StartFrom::Earliest)
        .await?;
    let mut seen = HashSet::new();
    let mut redriven = 0;
    let mut done = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while done < total {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "redrive timed out with {} of {total} done",
            done
        );
        let batch = sub.poll(500, Duration::from_millis(500)).await?;
        let mut commits = Vec::new();
        for letter in batch {
            let end = ends
                .iter()
                .find(|(p, _)| *p == letter.partition)
                .map(|(_, e)| *e)
                .unwrap_or(0);
            if letter.offset >= end {
                continue; // dead-lettered after this redrive started: next time
            }
            let origin = (
                letter
                    .header("dlq-topic")
                    .unwrap_or(settings.topic())
                    .to_owned(),
                letter.header("dlq-partition").unwrap_or("").to_owned(),
                letter.header("dlq-offset").unwrap_or("").to_owned(),
            );
            if seen.insert(origin.clone()) {
                let mut record = letter.to_record();
                record.headers.retain(|(k, _)| !k.starts_with("dlq-"));
                record.headers.push((
                    "redriven-from".into(),
                    format!("{}/{}", letter.partition, letter.offset),
                ));
                log.append(&origin.0, vec![record]).await?;
                redriven += 1;
            }
            commits.push((letter.partition, letter.offset + 1));
            done += 1;
            bar.inc(1);
        }
        sub.commit(&commits).await?;
    }
    bar.finish_and_clear();
    Ok(redriven)
}
