//! Operator commands.

use std::path::PathBuf;

use conveyor_platform::Settings;
use conveyor_platform::backends::open_log;
use conveyor_schemas::MEDIA_EVENTS;

use crate::cli::OpsCommand;

pub async fn run(config: &Option<PathBuf>, command: OpsCommand) -> anyhow::Result<()> {
    match command {
        OpsCommand::Lag {
            target,
            group,
            json,
        } => {
            let mut settings = Settings::load(config.as_deref())?;
            if let Some(dir) = target.data_dir {
                settings.data_dir = dir;
            }
            lag(&settings, group, json).await
        }
        OpsCommand::Config => {
            let settings = Settings::load(config.as_deref())?;
            println!("{settings:#?}");
            Ok(())
        }
    }
}

async fn lag(settings: &Settings, group: Option<String>, json: bool) -> anyhow::Result<()> {
    let log = open_log(settings)?;
    let groups = match group {
        Some(g) => vec![g],
        None => log.groups(MEDIA_EVENTS).await?,
    };
    let mut rows = Vec::new();
    for group in &groups {
        for p in log.lag(MEDIA_EVENTS, group).await? {
            rows.push(serde_json::json!({
                "group": group, "topic": MEDIA_EVENTS, "partition": p.partition,
                "committed": p.committed, "end": p.end, "lag": p.lag(),
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no consumer group has committed on {MEDIA_EVENTS} yet");
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
