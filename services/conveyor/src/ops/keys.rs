//! API keys issued into the object store: `ops keys`.

use std::path::PathBuf;

use conveyor_storage::backends::open_objects;

use super::{require_data_dir, settings};
use crate::cli::KeysCommand;

pub(crate) async fn keys(config: &Option<PathBuf>, command: KeysCommand) -> anyhow::Result<()> {
    use conveyor_runtime::keys::{self, KeyKind};
    let target = match &command {
        KeysCommand::Create { target, .. }
        | KeysCommand::List { target, .. }
        | KeysCommand::Revoke { target, .. } => target.clone(),
    };
    let settings = settings(config, target)?;
    require_data_dir(&settings)?;
    let objects = open_objects(&settings.objects_uri(), &settings.objects).await?;
    match command {
        KeysCommand::Create { name, service, .. } => {
            conveyor_config::check_key_name(&name).map_err(anyhow::Error::msg)?;
            let kind = if service {
                KeyKind::Service
            } else {
                KeyKind::Client
            };
            let (record, key) = keys::issue(&*objects, kind, &name).await?;
            let kind = if service { "service" } else { "client" };
            eprintln!(
                "issued {kind} key {} for {name}; it is shown only now, keep it secret:",
                record.id
            );
            println!("{key}");
        }
        KeysCommand::List { json, .. } => {
            let listed = keys::list(&*objects).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                println!(
                    "{:<18} {:<8} {:<24} {:<22} STATE",
                    "ID", "KIND", "NAME", "CREATED"
                );
                for k in listed {
                    let created = time::OffsetDateTime::from_unix_timestamp(k.record.created_at)
                        .ok()
                        .and_then(|t| {
                            t.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        })
                        .unwrap_or_default();
                    println!(
                        "{:<18} {:<8} {:<24} {:<22} {}",
                        k.record.id,
                        format!("{:?}", k.record.kind).to_lowercase(),
                        k.record.name,
                        created,
                        if k.revoked { "revoked" } else { "active" }
                    );
                }
            }
        }
        KeysCommand::Revoke { id, .. } => {
            // Never echo what was given: it may be the key itself.
            anyhow::ensure!(
                id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "that is not a key id: an id is the 16 lowercase hex digits after `cvk_` \
                 (see `conveyor ops keys list`)"
            );
            anyhow::ensure!(
                keys::revoke(&*objects, &id).await?,
                "no issued key has the id {id}"
            );
            println!(
                "revoked {id}; every replica refuses it within {} ms",
                settings.auth.refresh_ms
            );
        }
    }
    Ok(())
}
