//! `conveyor-loadtest`: Conveyor's load lab, a binary of its own so the product ships without
//! it (and without its plotting, histogram and HTTP-client dependencies). It drives the
//! product from outside, as an operator's load tool would, and uses its crates as libraries
//! only where a benchmark runs a stage in process. `conveyor loadtest …` runs this binary.
//!
//! - [`bench`]: micro-benchmarks (events, produce, thumbnail, photos), each beside a reference
//!   in the same run;
//! - [`deletes`]: an owner's reads as their deletes grow, against an owner without them;
//! - [`video`]: the transcoder against plain ffmpeg, and photos behind a video backlog;
//! - [`capacity`]: `run` (an open-model load against a deployment, with a report) and
//!   `scale` (the scaling curve over local role processes).

mod bench;
mod capacity;
mod cli;
mod deletes;
mod photos;
mod stats;
mod video;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::bench::{BenchLog, events, photos, produce, producer_performance, thumbnail};
use crate::cli::{Cli, LoadtestCommand};
use crate::stats::median_of;

/// The exit code of a run whose threshold broke, or whose `--find-capacity` found no step that
/// held: 3, so it differs from an error (1) and from clap's usage errors (2).
const THRESHOLD_BROKE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Success when the run held, [`THRESHOLD_BROKE`] when it did not.
fn verdict(held: bool) -> ExitCode {
    if held {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(THRESHOLD_BROKE)
    }
}

async fn run(command: LoadtestCommand) -> anyhow::Result<ExitCode> {
    match command {
        LoadtestCommand::Events {
            count,
            batch,
            producers,
            media,
            logs,
            views,
            recovery,
        } => {
            for log in &logs {
                for views in &views {
                    events(log, views, count, batch, producers, media, recovery).await?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LoadtestCommand::Produce {
            count,
            size,
            batch,
            logs,
            kafka_tools,
            runs,
        } => {
            for log in logs {
                let kafka = match &log {
                    BenchLog::Kafka(uri) => Some(uri),
                    BenchLog::Sqlite => None,
                };
                let reference = kafka_tools.as_deref().zip(kafka);
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                for _ in 0..runs.max(1) {
                    ours.push(produce(&log, count, size, batch).await?);
                    if let Some((tools, brokers)) = reference {
                        theirs.push(producer_performance(tools, brokers, count, size).await?);
                    }
                }
                if runs > 1 || reference.is_some() {
                    let ours = median_of(ours);
                    print!("produce on {log}: median {ours:.0} records/s over {runs} run(s)");
                    if !theirs.is_empty() {
                        let theirs = median_of(theirs);
                        print!(
                            "; Kafka's ProducerPerformance: median {theirs:.0} records/s; ratio {:.2}",
                            ours / theirs
                        );
                    }
                    println!();
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LoadtestCommand::Thumbnail { file, size, runs } => {
            thumbnail(&file, size, runs).map(|()| ExitCode::SUCCESS)
        }
        LoadtestCommand::Run {
            scenario,
            target,
            key,
            service_key,
            out,
            allow_remote,
            pid,
            max_in_flight,
            find_capacity,
            from,
            factor,
            step,
            max_steps,
            p99,
            no_reference,
            read_target,
            metrics,
        } => {
            let dev_key = |name: &str| {
                std::fs::read_to_string(Path::new("data").join(name))
                    .ok()
                    .map(|k| k.trim().to_owned())
            };
            let key = key.or_else(|| dev_key("dev-api-key")).context(
                "no client key: pass --key (or run against a `serve` whose data dir is ./data)",
            )?;
            let report = capacity::run(capacity::Options {
                scenario,
                target,
                read_target,
                metrics,
                processes: Vec::new(),
                key,
                service_key: service_key.or_else(|| dev_key("dev-service-key")),
                out,
                allow_remote,
                pid,
                max_in_flight,
                find_capacity: find_capacity.then_some(capacity::Search {
                    from,
                    factor,
                    step,
                    max_steps,
                    p99,
                }),
                reference: !no_reference,
            })
            .await?;
            Ok(verdict(report.passed()))
        }
        LoadtestCommand::Scale {
            scenario,
            kafka,
            views,
            instances,
            partitions,
            out,
            from,
            factor,
            step,
            max_steps,
            p99,
            max_in_flight,
        } => {
            let report = capacity::scale::run(capacity::scale::ScaleOptions {
                scenario,
                kafka,
                views,
                instances,
                partitions,
                out,
                search: capacity::Search {
                    from,
                    factor,
                    step,
                    max_steps,
                    p99,
                },
                max_in_flight,
            })
            .await?;
            Ok(verdict(
                report.points.iter().all(|p| p.sustainable_rate.is_some()),
            ))
        }
        LoadtestCommand::Video {
            file,
            size,
            seconds,
            runs,
            photos,
            backlog,
        } => {
            video::run(video::Options {
                file,
                size,
                seconds,
                runs,
                photos,
                backlog,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        LoadtestCommand::Deletes {
            views,
            mut steps,
            reads,
        } => {
            steps.sort_unstable();
            steps.dedup();
            deletes::deletes(&views, &steps, reads).await?;
            Ok(ExitCode::SUCCESS)
        }
        LoadtestCommand::Photos {
            dir,
            count,
            size,
            concurrency,
        } => {
            photos(dir.as_deref(), count, &size, concurrency).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
