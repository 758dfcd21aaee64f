//! Receipts: what the first request with an id (a `POST /v1/events` `event_id`, an
//! `Idempotency-Key`) leaves in the object store, so that a retry of it, on any edge replica,
//! answers as the first did and appends nothing new. One protocol for both:
//! - the first request claims the receipt with [`ObjectStore::put_if_absent`] (exactly one of
//!   concurrent claims wins, across replicas);
//! - a request whose fingerprint differs from the receipt's is a conflict;
//! - a finished receipt is the first answer;
//! - a receipt given up after a failure (released), or claimed longer ago than
//!   [`ABANDONED_AFTER_MICROS`] without finishing, is taken over: the taker gets the first
//!   request's receipt, to append the very same event (its append may have landed);
//! - any other receipt belongs to a request still running.
//!
//! [`ObjectStore::put_if_absent`]: conveyor_storage::ObjectStore::put_if_absent

use bytes::Bytes;
use conveyor_storage::ObjectStore;
use conveyor_storage::objects::ObjectError;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A receipt without an answer older than this was left by a request that died before its
/// append; a retry takes it over. Appends time out well within it (`log.append_timeout_ms`).
pub(crate) const ABANDONED_AFTER_MICROS: i64 = 60_000_000;

/// What a receipt tells the protocol.
pub(crate) trait Receipt: Serialize + DeserializeOwned {
    /// The fingerprint of the request that claimed it.
    fn fingerprint(&self) -> &str;
    /// Whether its request finished (a retry gets its answer).
    fn finished(&self) -> bool;
    /// Whether its request gave it up after a failure.
    fn released(&self) -> bool;
    /// When it was claimed, in µs since the epoch.
    fn claimed_at(&self) -> i64;
}

/// How a claim ended.
pub(crate) enum Claimed<R> {
    /// This request holds the receipt it wrote; `taken_over` when it was made from an earlier
    /// request's, which failed or died.
    Held {
        /// The receipt written.
        receipt: R,
        /// Whether it took over an earlier request's.
        taken_over: bool,
    },
    /// The first request finished: its receipt.
    Finished(R),
}

/// Why a claim was refused.
pub(crate) enum Refused {
    /// The id was used for a different request.
    Conflict,
    /// The request that holds the id still runs.
    InUse,
    /// The store failed, or holds a receipt that does not parse.
    Store(ObjectError),
    /// A receipt that does not parse.
    Corrupt(serde_json::Error),
}

/// Claims the receipt at `key` for a request with `fingerprint`: writes `make(None)`, or, when
/// an earlier request failed or died, `make(Some(&its receipt))`.
pub(crate) async fn claim<R: Receipt>(
    objects: &dyn ObjectStore,
    key: &str,
    fingerprint: &str,
    mut make: impl FnMut(Option<&R>) -> R,
) -> Result<Claimed<R>, Refused> {
    let mut receipt = make(None);
    let mut taken_over = false;
    for _ in 0..2 {
        if objects
            .put_if_absent(key, encode(&receipt))
            .await
            .map_err(Refused::Store)?
        {
            return Ok(Claimed::Held {
                receipt,
                taken_over,
            });
        }
        let existing = match objects.get_bytes(key).await {
            Ok(bytes) => bytes,
            // Taken over and removed between our claim and our read: claim again.
            Err(ObjectError::NotFound) => continue,
            Err(e) => return Err(Refused::Store(e)),
        };
        let existing: R = serde_json::from_slice(&existing).map_err(Refused::Corrupt)?;
        if existing.fingerprint() != fingerprint {
            return Err(Refused::Conflict);
        }
        if existing.finished() {
            return Ok(Claimed::Finished(existing));
        }
        let now = conveyor_storage::clock::now_micros();
        if existing.released() || now - existing.claimed_at() > ABANDONED_AFTER_MICROS {
            receipt = make(Some(&existing));
            taken_over = true;
            objects.delete(key).await.map_err(Refused::Store)?;
            continue;
        }
        return Err(Refused::InUse);
    }
    Err(Refused::InUse)
}

/// `receipt` as the JSON stored.
pub(crate) fn encode(receipt: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(receipt).expect("receipts serialize"))
}
