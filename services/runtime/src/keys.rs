//! API keys: who a `Authorization: Bearer <key>` is, kept only as hashes.
//!
//! Keys come from two places:
//! - **Issued keys**, made by `conveyor ops keys create` and kept in the object store, so every
//!   replica sees the same set: `auth/keys/{id}.json` holds the key's kind, its name (the owner,
//!   or the producing service) and the sha256 of the key, never the key itself. Revoking writes
//!   `auth/revoked/{id}`. Each replica re-reads both prefixes every `auth.refresh_ms` (2 s), so
//!   a revoked key stops working everywhere within that. An issued key reads
//!   `cvk_{id}_{secret}`: the id finds its record, and the secret is 32 random bytes, so a
//!   plain sha256 is as strong as a slow password hash would be (as GitHub's tokens are kept).
//! - **Configured keys** (`auth.api_keys`, `auth.service_keys`): `name:key`, or
//!   `name:sha256:<hex>` to keep even the configuration free of the key. They are hashed when
//!   read, and are revoked by removing them from the configuration.
//!
//! Every comparison is between hashes, in constant time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use conveyor_config::{AuthSettings, KeyList};
use conveyor_storage::ObjectStore;
use conveyor_storage::objects::ObjectError;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// A client: uploads, reads and deletes as its owner.
    Client,
    /// An internal producer: `POST /v1/events`.
    Service,
}

/// Who a valid key is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// What the key may do.
    pub kind: KeyKind,
    /// The owner (client keys) or the service (service keys).
    pub name: String,
}

/// An issued key's record, at `auth/keys/{id}.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// 16 hex digits (8 random bytes): the `{id}` in the key `cvk_{id}_{secret}`, in this
    /// record's object key and in its revocation's (`auth/revoked/{id}`).
    pub id: String,
    /// What the key may do.
    pub kind: KeyKind,
    /// The owner (client keys) or the service (service keys): a key name as
    /// `conveyor_config::check_key_name` allows.
    pub name: String,
    /// Hex sha256 of the whole key (`cvk_{id}_{secret}`).
    pub sha256: String,
    /// Unix seconds.
    pub created_at: i64,
}

const PREFIX: &str = "cvk_";

fn record_key(id: &str) -> String {
    format!("auth/keys/{id}.json")
}

fn revoked_key(id: &str) -> String {
    format!("auth/revoked/{id}")
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The id of an issued key, if `presented` has an issued key's shape.
fn issued_id(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && !secret.is_empty()).then_some(id)
}

#[derive(Default)]
struct Snapshot {
    issued: HashMap<String, (Principal, [u8; 32])>,
    revoked: HashSet<String>,
}

/// Every key this process accepts; cheap to clone.
#[derive(Clone)]
pub struct Keys {
    configured: Arc<Vec<(Principal, [u8; 32])>>,
    snapshot: Arc<RwLock<Snapshot>>,
    objects: Option<Arc<dyn ObjectStore>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("configured", &self.configured.len())
            .finish_non_exhaustive()
    }
}

fn configured(list: &KeyList, kind: KeyKind) -> Vec<(Principal, [u8; 32])> {
    list.entries()
        .filter_map(|(name, key)| {
            // Loading refuses a malformed hash (`Settings::validate`); one made in code is
            // dropped, never taken as a plain key.
            let hash = conveyor_config::key_hash(key).ok()?;
            let principal = Principal {
                kind,
                name: name.to_owned(),
            };
            Some((principal, hash))
        })
        .collect()
}

/// What a presented key is known by where it must not be kept itself, such as the rate
/// limiter's table: its sha256.
pub fn fingerprint(presented: &str) -> [u8; 32] {
    digest(presented)
}

impl Keys {
    /// The configured keys alone.
    pub fn configured(auth: &AuthSettings) -> Keys {
        let mut keys = configured(&auth.api_keys, KeyKind::Client);
        keys.extend(configured(&auth.service_keys, KeyKind::Service));
        Keys {
            configured: Arc::new(keys),
            snapshot: Arc::default(),
            objects: None,
        }
    }

    /// The configured keys and those issued into `objects`. Call [`Keys::refresh`] (or
    /// [`Keys::follow`]) before relying on issued keys.
    pub fn with_issued(auth: &AuthSettings, objects: Arc<dyn ObjectStore>) -> Keys {
        Keys {
            objects: Some(objects),
            ..Keys::configured(auth)
        }
    }

    /// Who `presented` is, if it is a valid key of `kind`.
    pub fn lookup(&self, presented: &str, kind: KeyKind) -> Option<Principal> {
        self.identify(presented).filter(|p| p.kind == kind)
    }

    /// Who `presented` is, whatever its kind.
    pub fn identify(&self, presented: &str) -> Option<Principal> {
        let hash = digest(presented);
        if let Some(id) = issued_id(presented) {
            let snapshot = self.snapshot.read().expect("keys lock");
            if snapshot.revoked.contains(id) {
                return None;
            }
            if let Some((principal, stored)) = snapshot.issued.get(id)
                && constant_time_eq(stored, &hash)
            {
                return Some(principal.clone());
            }
            // Not an issued key after all: a configured key may have the same shape.
        }
        let mut found = None;
        for (principal, stored) in self.configured.iter() {
            if constant_time_eq(stored, &hash) {
                found = Some(principal.clone());
            }
        }
        found
    }

    /// Re-reads the issued keys and revocations.
    pub async fn refresh(&self) -> Result<(), ObjectError> {
        let Some(objects) = &self.objects else {
            return Ok(());
        };
        let revoked = revoked_ids(&**objects).await?;
        let listed = objects.list("auth/keys/").await?;
        let mut issued = HashMap::with_capacity(listed.len());
        for object in listed {
            let Some(id) = object
                .key
                .strip_prefix("auth/keys/")
                .and_then(|k| k.strip_suffix(".json"))
            else {
                continue;
            };
            let known = self
                .snapshot
                .read()
                .expect("keys lock")
                .issued
                .get(id)
                .cloned();
            let entry = match known {
                Some(entry) => entry,
                None => match read_record(&**objects, id).await {
                    Ok(Some(record)) => record,
                    Ok(None) => continue,
                    Err(e) => return Err(e),
                },
            };
            issued.insert(id.to_owned(), entry);
        }
        let mut snapshot = self.snapshot.write().expect("keys lock");
        snapshot.issued = issued;
        snapshot.revoked = revoked;
        Ok(())
    }

    /// Refreshes every `every` until `stop`; a failed refresh keeps the last good set.
    pub async fn follow(self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "could not re-read the issued API keys; keeping the last set");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// The ids of revoked keys.
async fn revoked_ids(objects: &dyn ObjectStore) -> Result<HashSet<String>, ObjectError> {
    Ok(objects
        .list("auth/revoked/")
        .await?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix("auth/revoked/").map(str::to_owned))
        .collect())
}

async fn read_record(
    objects: &dyn ObjectStore,
    id: &str,
) -> Result<Option<(Principal, [u8; 32])>, ObjectError> {
    let bytes = match objects.get_bytes(&record_key(id)).await {
        Ok(bytes) => bytes,
        Err(ObjectError::NotFound) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Ok(record) = serde_json::from_slice::<KeyRecord>(&bytes) else {
        tracing::warn!(id, "an issued key's record does not parse; it is ignored");
        return Ok(None);
    };
    let Some(hash) = hex::decode(&record.sha256)
        .ok()
        .and_then(|h| <[u8; 32]>::try_from(h).ok())
    else {
        return Ok(None);
    };
    let principal = Principal {
        kind: record.kind,
        name: record.name,
    };
    Ok(Some((principal, hash)))
}

/// Issues a key: stores its record and returns the key, which is shown this once.
pub async fn issue(
    objects: &dyn ObjectStore,
    kind: KeyKind,
    name: &str,
) -> Result<(KeyRecord, String), ObjectError> {
    use rand::RngCore;
    conveyor_config::check_key_name(name).map_err(|message| ObjectError::Storage {
        kind: conveyor_storage::ErrorKind::Permanent,
        message,
    })?;
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let id = hex::encode(id);
    let key = format!("{PREFIX}{id}_{}", hex::encode(secret));
    let record = KeyRecord {
        id: id.clone(),
        kind,
        name: name.to_owned(),
        sha256: hex::encode(digest(&key)),
        created_at: conveyor_storage::clock::now_micros() / 1_000_000,
    };
    let body = Bytes::from(serde_json::to_vec(&record).expect("records serialize"));
    if !objects.put_if_absent(&record_key(&id), body).await? {
        return Err(ObjectError::Storage {
            kind: conveyor_storage::ErrorKind::Transient,
            message: format!("key id {id} exists already; run the command again"),
        });
    }
    Ok((record, key))
}

/// An issued key and whether it is revoked.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedKey {
    /// The key's record; serialized flat, its fields beside `revoked`.
    #[serde(flatten)]
    pub record: KeyRecord,
    /// Whether the key is revoked (`auth/revoked/{id}` exists).
    pub revoked: bool,
}

/// Every issued key, oldest first.
pub async fn list(objects: &dyn ObjectStore) -> Result<Vec<IssuedKey>, ObjectError> {
    let revoked = revoked_ids(objects).await?;
    let mut keys = Vec::new();
    for object in objects.list("auth/keys/").await? {
        let bytes = match objects.get_bytes(&object.key).await {
            Ok(b) => b,
            Err(ObjectError::NotFound) => continue,
            Err(e) => return Err(e),
        };
        if let Ok(record) = serde_json::from_slice::<KeyRecord>(&bytes) {
            let revoked = revoked.contains(&record.id);
            keys.push(IssuedKey { record, revoked });
        }
    }
    keys.sort_by_key(|k| (k.record.created_at, k.record.id.clone()));
    Ok(keys)
}

/// Revokes the issued key `id`. `Ok(false)` if there is no such key.
pub async fn revoke(objects: &dyn ObjectStore, id: &str) -> Result<bool, ObjectError> {
    if objects.head(&record_key(id)).await?.is_none() {
        return Ok(false);
    }
    objects
        .put_bytes(&revoked_key(id), Bytes::from_static(b""))
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_storage::objects::fs::FsObjectStore;

    fn auth(api: &str, service: &str) -> AuthSettings {
        AuthSettings {
            api_keys: KeyList::parse(api).unwrap(),
            service_keys: KeyList::parse(service).unwrap(),
            ..AuthSettings::default()
        }
    }

    #[test]
    fn configured_keys_match_by_hash_and_by_kind() {
        let hashed = hex::encode(digest("bob-key"));
        let keys = Keys::configured(&auth(
            &format!("alice:alice-key,bob:sha256:{hashed}"),
            "describer:svc",
        ));
        let alice = keys.lookup("alice-key", KeyKind::Client).unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(keys.lookup("bob-key", KeyKind::Client).unwrap().name, "bob");
        assert_eq!(keys.lookup("svc", KeyKind::Client), None, "wrong kind");
        assert_eq!(
            keys.lookup("svc", KeyKind::Service).unwrap().name,
            "describer"
        );
        assert_eq!(keys.lookup("alice-key2", KeyKind::Client), None);
        assert_eq!(
            keys.lookup(&format!("sha256:{hashed}"), KeyKind::Client),
            None
        );
    }

    #[test]
    fn a_malformed_hash_is_never_a_key_and_configured_keys_may_look_issued() {
        let issued_shape = format!("cvk_{}_{}", "a".repeat(16), "b".repeat(64));
        let keys = Keys::configured(&auth(
            &format!("bob:sha256:abcd,ann:SHA256:abcd,eve:{issued_shape}"),
            "",
        ));
        assert_eq!(keys.lookup("sha256:abcd", KeyKind::Client), None);
        assert_eq!(keys.lookup("SHA256:abcd", KeyKind::Client), None);
        assert_eq!(
            keys.lookup(&issued_shape, KeyKind::Client).unwrap().name,
            "eve"
        );
    }

    #[tokio::test]
    async fn issued_keys_work_after_a_refresh_and_stop_when_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(FsObjectStore::open(dir.path()).unwrap());
        let keys = Keys::with_issued(&auth("", ""), store.clone());
        let (record, key) = issue(&*store, KeyKind::Client, "carol").await.unwrap();
        assert_eq!(keys.lookup(&key, KeyKind::Client), None, "not read yet");
        keys.refresh().await.unwrap();
        assert_eq!(keys.lookup(&key, KeyKind::Client).unwrap().name, "carol");
        // The last hex digit changed (a key that ends in 0 gets a 1): one in sixteen keys
        // ended in the digit this used to put there, and the "forgery" was the key itself.
        let last = if key.ends_with('0') { '1' } else { '0' };
        let forged = format!("{}{last}", &key[..key.len() - 1]);
        assert_eq!(keys.lookup(&forged, KeyKind::Client), None);
        let stored = String::from_utf8(
            store
                .get_bytes(&record_key(&record.id))
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(
            !stored.contains(&key[PREFIX.len() + 17..]),
            "only the hash is stored"
        );
        assert!(revoke(&*store, &record.id).await.unwrap());
        assert!(!revoke(&*store, "0000000000000000").await.unwrap());
        keys.refresh().await.unwrap();
        assert_eq!(keys.lookup(&key, KeyKind::Client), None, "revoked");
        let listed = list(&*store).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].revoked);
    }
}
