//! `Idempotency-Key` on `POST /v1/media` and `POST /v1/uploads/{id}/complete`, with the
//! semantics of the IETF draft (draft-ietf-httpapi-idempotency-key-header-06) as Stripe and
//! others use it:
//! - a retry with the same key and the same request gets the first answer, and makes no second
//!   item: an upload answered 503 during a broker hang may have been appended anyway, and its
//!   retry appends the very same event (same media id, event id and version), which every
//!   consumer applies once;
//! - the same key with another request (other bytes, title or visibility; another upload) is
//!   **409** `idempotency_key_reused` (the draft says 422; this API answers every conflict of a
//!   key with 409, as it does for `event_id`);
//! - the same key while its first request is still running is **409** `idempotency_key_in_use`.
//!
//! Keys are per owner (one client's key never meets another's) and are remembered as long as
//! `POST /v1/events` receipts are (`Settings::receipt_retention`: as long as the log keeps
//! events), under `events/idempotency/` in the object store, claimed with
//! [`ObjectStore::put_if_absent`] so the rule holds across every edge replica. The receipt
//! sweep and the S3 lifecycle rule for `events/` remove them.
//!
//! [`ObjectStore::put_if_absent`]: conveyor_storage::ObjectStore::put_if_absent

use axum::http::{HeaderMap, StatusCode};
use conveyor_runtime::http::ApiError;
use conveyor_storage::clock::now_micros;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::IngestState;
use crate::accepted::Accepted;
use crate::receipts::{self, Claimed, Refused, encode};

/// The request header.
pub const HEADER: &str = "idempotency-key";

/// Where the receipts live: under the event receipts' prefix, so their sweep and lifecycle
/// rule cover these too.
const PREFIX: &str = "events/idempotency/";

/// The longest key accepted, in bytes. The draft leaves it to the server; Stripe's is 255.
pub const MAX_KEY_BYTES: usize = 255;

/// The `Idempotency-Key` of a request, if it has one: 1 to [`MAX_KEY_BYTES`] printable ASCII
/// characters, spaces included (the draft's sf-string, unquoted as clients send it, or
/// quoted).
///
/// # Errors
/// 400 `invalid_idempotency_key` for an empty, overlong or non-ASCII key, or one sent twice.
pub(crate) fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |why: &str| {
        ApiError::bad_request("invalid_idempotency_key", format!("Idempotency-Key: {why}"))
    };
    if values.next().is_some() {
        return Err(invalid("sent more than once"));
    }
    let text = value
        .to_str()
        .map_err(|_| invalid("not printable ASCII"))?
        .trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if text.is_empty() || text.len() > MAX_KEY_BYTES {
        return Err(invalid(&format!("1 to {MAX_KEY_BYTES} characters")));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(invalid("not printable ASCII"));
    }
    Ok(Some(text.to_owned()))
}

/// The fingerprint of a request: sha256 over its parts, each length-prefixed.
pub(crate) fn fingerprint(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// What a key's first request reserved, and, once it answered, what it answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Receipt {
    fingerprint: String,
    /// The media id the first request made (or completed).
    aggregate_id: Uuid,
    /// `MediaUploaded`'s event id and version, fixed by the first request, so a takeover
    /// appends the very same event.
    event_id: Uuid,
    version: u64,
    /// When the key was claimed, in µs since the epoch (the receipt sweep reads this).
    claimed_at: i64,
    /// Given up after a failure: a retry takes it over at once.
    #[serde(default)]
    released: bool,
    /// The first answer, once there is one.
    #[serde(default)]
    answer: Option<Answer>,
    /// Always `None`: lets the event receipts' sweep read this receipt (it keeps receipts
    /// without a position for [`ABANDONED_AFTER_MICROS`](receipts::ABANDONED_AFTER_MICROS)
    /// longer).
    #[serde(default)]
    position: Option<conveyor_storage::log::Position>,
}

impl receipts::Receipt for Receipt {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    fn finished(&self) -> bool {
        self.answer.is_some()
    }
    fn released(&self) -> bool {
        self.released
    }
    fn claimed_at(&self) -> i64 {
        self.claimed_at
    }
}

/// The fields of the first 202.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Answer {
    sha256: String,
    bytes: u64,
    content_type: String,
}

/// The ids a request appends its event with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserved {
    /// The media id.
    pub id: Uuid,
    /// `MediaUploaded`'s event id.
    pub event_id: Uuid,
    /// `MediaUploaded`'s version.
    pub version: u64,
}

/// A key this request holds: it must [`finish`](Ticket::finish) or
/// [`release`](Ticket::release) it.
pub(crate) struct Ticket {
    object: String,
    receipt: Receipt,
    /// Whether the key was taken over from a request that failed or died.
    taken_over: bool,
}

/// What a request with a key does.
pub(crate) enum Claim {
    /// Run, with these ids (a takeover gets the first request's).
    Run(Ticket),
    /// Answer with the first request's 202.
    Replay(Accepted),
}

fn object_key(owner: &str, key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(owner.as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    format!("{PREFIX}{}.json", hex::encode(hasher.finalize()))
}

/// Claims `owner`'s `key` for a request with `fingerprint`, reserving `fresh` ids for it, or
/// finds what the key's first request did.
///
/// # Errors
/// 409 `idempotency_key_reused` when the key was used for another request, 409
/// `idempotency_key_in_use` while its first request runs, and the store's failures.
pub(crate) async fn claim(
    state: &IngestState,
    owner: &str,
    key: &str,
    fingerprint: String,
    fresh: Reserved,
) -> Result<Claim, ApiError> {
    let object = object_key(owner, key);
    let make = |previous: Option<&Receipt>| {
        // A takeover gets the ids of the request that failed: its append may have landed.
        let reserved = previous.map_or(fresh, |p| Reserved {
            id: p.aggregate_id,
            event_id: p.event_id,
            version: p.version,
        });
        Receipt {
            fingerprint: fingerprint.clone(),
            aggregate_id: reserved.id,
            event_id: reserved.event_id,
            version: reserved.version,
            claimed_at: now_micros(),
            released: false,
            answer: None,
            position: None,
        }
    };
    match receipts::claim(&*state.backends.objects, &object, &fingerprint, make).await {
        Ok(Claimed::Held {
            receipt,
            taken_over,
        }) => Ok(Claim::Run(Ticket {
            object,
            receipt,
            taken_over,
        })),
        Ok(Claimed::Finished(first)) => {
            let answer = first.answer.expect("a finished receipt has its answer");
            Ok(Claim::Replay(accepted(first.aggregate_id, answer)))
        }
        Err(Refused::Conflict) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "Idempotency-Key: already used for a different request; use a new key for a new \
             upload",
        )),
        Err(Refused::InUse) => Err(in_use()),
        Err(Refused::Store(e)) => Err(ApiError::backend(e)),
        Err(Refused::Corrupt(e)) => Err(ApiError::internal(e)),
    }
}

fn in_use() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_in_use",
        "Idempotency-Key: a request with this key is still running; retry shortly",
    )
}

fn accepted(id: Uuid, answer: Answer) -> Accepted {
    Accepted {
        id,
        status: "pending",
        sha256: answer.sha256,
        bytes: answer.bytes,
        content_type: answer.content_type,
        links: conveyor_runtime::http::SelfLink {
            this: format!("/v1/media/{id}"),
        },
    }
}

impl Ticket {
    /// Whether the key was taken over from an earlier request that failed or died (whose
    /// append may have landed).
    pub(crate) fn taken_over(&self) -> bool {
        self.taken_over
    }

    /// The ids this request appends with.
    pub(crate) fn reserved(&self) -> Reserved {
        Reserved {
            id: self.receipt.aggregate_id,
            event_id: self.receipt.event_id,
            version: self.receipt.version,
        }
    }

    /// Records the request's answer, so a retry gets it.
    ///
    /// # Errors
    /// The store's: the answer is then not remembered, and a retry appends the same event again
    /// (harmless: it is applied once) and answers the same.
    pub(crate) async fn finish(
        mut self,
        state: &IngestState,
        answer: &Accepted,
    ) -> Result<(), ApiError> {
        self.receipt.answer = Some(Answer {
            sha256: answer.sha256.clone(),
            bytes: answer.bytes,
            content_type: answer.content_type.clone(),
        });
        state
            .backends
            .objects
            .put_bytes(&self.object, encode(&self.receipt))
            .await
            .map(|_| ())
            .map_err(ApiError::backend)
    }

    /// Forgets the key after a failure of a request that is idempotent on its own (a
    /// completion), so nothing of it stays behind.
    pub(crate) async fn forget(self, state: &IngestState) {
        let _ = state.backends.objects.delete(&self.object).await;
    }

    /// Gives the key up after a failure, so a retry takes it over at once with the same ids.
    pub(crate) async fn release(mut self, state: &IngestState) {
        self.receipt.released = true;
        let _ = state
            .backends
            .objects
            .put_bytes(&self.object, encode(&self.receipt))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(HEADER, v.parse().unwrap());
        }
        headers
    }

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(key(&headers(&[])).unwrap(), None);
        assert_eq!(
            key(&headers(&["8e03978e-40d5-43e8-bc93-6894a57f9324"])).unwrap(),
            Some("8e03978e-40d5-43e8-bc93-6894a57f9324".into())
        );
        assert_eq!(
            key(&headers(&["\"quoted\""])).unwrap(),
            Some("quoted".into())
        );
        for bad in [&[""][..], &["\"\""], &["a", "b"]] {
            let e = key(&headers(bad)).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "invalid_idempotency_key")
            );
        }
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(key(&headers(&[&long])).is_err());
        assert_eq!(object_key("alice", "k"), object_key("alice", "k"));
        assert_ne!(
            object_key("alice", "k"),
            object_key("bob", "k"),
            "keys are per owner"
        );
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
    }
}
