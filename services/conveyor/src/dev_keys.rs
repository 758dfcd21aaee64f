//! The development keys `serve` makes for itself in the data dir when none are configured, so
//! `scripts/run` works with no set-up and a restart (or a restored backup) answers to the same
//! keys. Production roles never make keys: they take them from the configuration.

use std::path::Path;

use anyhow::Context;
use conveyor_config::{KeyList, Settings};

/// The files of the keys `serve` creates in the data dir when none are configured, and reads
/// back on later starts, so restarts keep working with the same keys: a `dev` client key
/// (`auth.api_keys`), the media-URL and upload-URL signing keys (`cdn.signing_keys`,
/// `uploads.signing_key`) and a `dev` service key (`auth.service_keys`). Backups carry them,
/// so a restored data dir answers to the same keys.
pub const DEV_KEY_FILES: [&str; 4] = [
    "dev-api-key",
    "dev-media-key",
    "dev-signing-key",
    "dev-service-key",
];

/// Fills each empty key setting from its file in the data dir, creating the file (mode 0600)
/// with a fresh random key on the first start; prints the client and service keys so a
/// developer can use them.
///
/// # Errors
/// A key file that cannot be written.
pub fn ensure(settings: &mut Settings) -> anyhow::Result<()> {
    if settings.auth.api_keys.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-api-key"))?;
        println!(
            "dev api key for owner `dev`: {key}  (saved in {})",
            settings.data_dir.join("dev-api-key").display()
        );
        settings.auth.api_keys =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    if settings.cdn.signing_keys.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-media-key"))?;
        settings.cdn.signing_keys =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    if settings.uploads.signing_key.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-signing-key"))?;
        settings.uploads.signing_key =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    if settings.auth.service_keys.is_empty() {
        let key = dev_key(&settings.data_dir.join("dev-service-key"))?;
        println!(
            "dev service key for `dev`: {key}  (saved in {})",
            settings.data_dir.join("dev-service-key").display()
        );
        settings.auth.service_keys =
            KeyList::parse(&format!("dev:{key}")).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

fn dev_key(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim();
        if !existing.is_empty() {
            return Ok(existing.to_owned());
        }
    }
    let key = format!("cvk_{}", uuid::Uuid::new_v4().simple());
    std::fs::write(path, format!("{key}\n"))
        .with_context(|| format!("failed to write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(key)
}
