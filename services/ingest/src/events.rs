//! `POST /v1/events`: internal producers describe and delete media.
//!
//! - **Strict.** Only the two events producers own are accepted, and an unknown field anywhere
//!   is a 400 naming its JSON path: a misspelt `"titel"` must not read as "no title" and wipe
//!   the item's description.
//! - **Idempotent by `event_id`.** The first request with an `event_id` leaves a receipt
//!   (`events/{event_id}.json` in the object store, claimed with
//!   [`ObjectStore::put_if_absent`], so it holds across every edge replica): a fingerprint of
//!   what was sent and where it was appended. The same id with the same event answers with
//!   that first result and appends nothing; the same id with a different event is a 409.
//!
//! [`ObjectStore::put_if_absent`]: conveyor_storage::ObjectStore::put_if_absent

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use conveyor_runtime::http::{ApiError, ErrorBody, require_json};
use conveyor_schemas::Envelope;
use conveyor_storage::clock::now_micros;
use conveyor_storage::log::Position;
use conveyor_storage::objects::ObjectError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use conveyor_schemas::intake::{IncomingEvent, IncomingEvents};

use crate::IngestState;
use crate::receipts::{self, ABANDONED_AFTER_MICROS, Claimed, Refused, encode};

/// `POST /v1/events`'s answer: each event's fate, in the order sent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct EventsAccepted {
    accepted: Vec<AcceptedEvent>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AcceptedEvent {
    event_id: Uuid,
    aggregate_id: Uuid,
    /// Where the event is in the log.
    partition: u32,
    offset: u64,
    /// `true` when an earlier request with this `event_id` appended it, and this one appended
    /// nothing.
    replayed: bool,
}

/// What the first request with an `event_id` left behind.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Receipt {
    /// sha256 over the producer, the aggregate and the event, as sent.
    fingerprint: String,
    aggregate_id: Uuid,
    /// Where it was appended; `None` while the first request is still appending.
    position: Option<Position>,
    /// When the receipt was claimed, in microseconds since the epoch.
    claimed_at: i64,
    /// The event's version, fixed by the first claim: a retry that takes an abandoned claim
    /// over (its append may have landed, its receipt not) appends the very same event again.
    /// A delete is applied once whatever; a description re-appended after a newer one is the
    /// last in the log, so it stands (the retry is the producer's latest word). `None` in
    /// receipts written before versions were kept.
    #[serde(default)]
    version: Option<u64>,
    /// Given up by its request after a failure: a retry takes it over at once.
    #[serde(default)]
    released: bool,
}

/// Deletes the receipts claimed more than `retention` ago: past it, a request with the same
/// `event_id` is appended again. The window is `Settings::receipt_retention`: as long as the
/// log keeps events (Kafka's `log.retention_ms`; forever on the embedded log, which then never
/// sweeps). `serve`, `ingest` and `ops sweep-uploads` run this off S3; on S3 a bucket
/// lifecycle rule does it instead (`ops sweep-uploads --install-lifecycle-days`), because
/// this reads every receipt.
///
/// # Errors
/// The store's, from listing, reading or deleting. A receipt that does not parse is kept.
pub async fn sweep_receipts(
    objects: &dyn conveyor_storage::ObjectStore,
    retention: std::time::Duration,
) -> Result<usize, ObjectError> {
    let cutoff = now_micros().saturating_sub(retention.as_micros().min(i64::MAX as u128) as i64);
    // Whether the receipt at `key` is past the retention. A claim still appending (no
    // position) gets the abandonment time on top, so a slow append keeps its claim.
    let expired = |key: String| async move {
        let bytes = match objects.get_bytes(&key).await {
            Ok(bytes) => bytes,
            Err(ObjectError::NotFound) => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(match serde_json::from_slice::<Receipt>(&bytes) {
            Ok(r) if r.position.is_some() => r.claimed_at < cutoff,
            Ok(r) => r.claimed_at < cutoff.saturating_sub(ABANDONED_AFTER_MICROS),
            Err(_) => false,
        })
    };
    let mut removed = 0;
    for object in objects.list(RECEIPTS).await? {
        // Read again just before the delete: a retry may have taken over an abandoned claim
        // since the first read, and another sweeper may be running. (The store has no
        // conditional delete, so a takeover between these two reads could still be lost.)
        if expired(object.key.clone()).await? && expired(object.key.clone()).await? {
            objects.delete(&object.key).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl receipts::Receipt for Receipt {
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    fn finished(&self) -> bool {
        self.position.is_some()
    }
    fn released(&self) -> bool {
        self.released
    }
    fn claimed_at(&self) -> i64 {
        self.claimed_at
    }
}

/// Where receipts live in the object store.
pub const RECEIPTS: &str = "events/";

fn receipt_key(event_id: Uuid) -> String {
    format!("{RECEIPTS}{event_id}.json")
}

fn fingerprint(service: &str, event: &IncomingEvent) -> String {
    let mut hasher = Sha256::new();
    hasher.update(service.as_bytes());
    hasher.update([0]);
    hasher.update(event.aggregate_id.as_bytes());
    hasher.update(serde_json::to_vec(&event.payload).expect("events serialize"));
    hex::encode(hasher.finalize())
}

fn conflict(i: usize, event_id: Uuid) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "event_id_conflict",
        format!("[{i}].event_id: {event_id} was already used for a different event"),
    )
}

fn in_progress(i: usize, event_id: Uuid) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "event_in_progress",
        format!("[{i}].event_id: a request with {event_id} is still appending it; retry shortly"),
    )
}

/// One event's fate in this request.
enum Fate {
    /// Appended now; its receipt (if it has an `event_id`) is to be completed.
    New(Box<Envelope>, Option<(Uuid, String)>),
    /// Appended by an earlier request with the same `event_id` and the same event.
    Replayed(Uuid, Uuid, Position),
}

/// Append events from an internal producer (a service key): describe or delete media.
/// Idempotent by `event_id`.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    request_body = IncomingEvents,
    responses(
        (status = 202, description = "Appended (or replayed); durable in the log", body = EventsAccepted),
        (status = 400, description = "Malformed JSON, an unknown field (named by its JSON path), trailing input, or no events", body = ErrorBody),
        (status = 401, description = "No valid service key", body = ErrorBody),
        (status = 409, description = "An `event_id` used for a different event, or one still being appended", body = ErrorBody),
        (status = 413, description = "A body over 2 MiB", body = ErrorBody),
        (status = 415, description = "Not `application/json`", body = ErrorBody),
    ),
    security(("service_key" = [])))]
pub(crate) async fn post_events(
    State(state): State<Arc<IngestState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let service = state.service(&headers)?;
    require_json(&headers)?;
    let incoming = conveyor_wire::intake::parse(&body)
        .map_err(|message| ApiError::bad_request("invalid_json", message))?;
    let mut seen = HashSet::new();
    for (i, e) in incoming.iter().enumerate() {
        if let Some(id) = e.event_id.filter(|id| !seen.insert(*id)) {
            return Err(ApiError::bad_request(
                "invalid_json",
                format!("[{i}].event_id: {id} appears twice in this request"),
            ));
        }
    }
    let mut fates = Vec::with_capacity(incoming.len());
    let mut claimed = Vec::new();
    for (i, e) in incoming.into_iter().enumerate() {
        let fate = match e.event_id {
            None => Ok(Fate::New(
                Box::new(Envelope::new(
                    e.aggregate_id,
                    state.clock.next(),
                    &service,
                    e.payload.into(),
                )),
                None,
            )),
            Some(event_id) => claim(&state, i, event_id, &service, e).await,
        };
        match fate {
            Ok(fate) => {
                if let Fate::New(envelope, Some((_, fingerprint))) = &fate {
                    claimed.push(abandoned(envelope, fingerprint.clone()));
                }
                fates.push(fate);
            }
            Err(e) => {
                release(&state, &claimed).await;
                return Err(e);
            }
        }
    }
    let new: Vec<Envelope> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::New(envelope, _) => Some(Envelope::clone(envelope)),
            Fate::Replayed(..) => None,
        })
        .collect();
    let mut positions = match state.append(&new).await {
        Ok(positions) => positions.into_iter(),
        Err(e) => {
            release(&state, &claimed).await;
            return Err(e);
        }
    };
    let mut accepted = Vec::with_capacity(fates.len());
    for fate in fates {
        let (event_id, aggregate_id, position, replayed) = match fate {
            Fate::New(envelope, receipt) => {
                let position = positions.next().expect("one position per appended event");
                if let Some((_, fingerprint)) = receipt {
                    complete(&state, &envelope, fingerprint, position).await?;
                }
                (envelope.event_id, envelope.aggregate_id, position, false)
            }
            Fate::Replayed(event_id, aggregate_id, position) => {
                (event_id, aggregate_id, position, true)
            }
        };
        accepted.push(AcceptedEvent {
            event_id,
            aggregate_id,
            partition: position.partition,
            offset: position.offset,
            replayed,
        });
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(EventsAccepted { accepted }),
    )
        .into_response())
}

/// Claims `event_id` for this request, or finds the first request's result.
async fn claim(
    state: &IngestState,
    i: usize,
    event_id: Uuid,
    service: &str,
    event: IncomingEvent,
) -> Result<Fate, ApiError> {
    let key = receipt_key(event_id);
    let fingerprint = fingerprint(service, &event);
    let fresh = state.clock.next();
    let make = |previous: Option<&Receipt>| Receipt {
        fingerprint: fingerprint.clone(),
        aggregate_id: event.aggregate_id,
        position: None,
        claimed_at: now_micros(),
        // Taken over with the first claim's version: its append may have landed.
        version: Some(previous.and_then(|p| p.version).unwrap_or(fresh)),
        released: false,
    };
    match receipts::claim(&*state.backends.objects, &key, &fingerprint, make).await {
        Ok(Claimed::Held { receipt, .. }) => {
            let version = receipt.version.expect("claims carry their version");
            let mut envelope =
                Envelope::new(event.aggregate_id, version, service, event.payload.into());
            envelope.event_id = event_id;
            Ok(Fate::New(Box::new(envelope), Some((event_id, fingerprint))))
        }
        Ok(Claimed::Finished(first)) => Ok(Fate::Replayed(
            event_id,
            first.aggregate_id,
            first.position.expect("a finished receipt has its position"),
        )),
        Err(Refused::Conflict) => Err(conflict(i, event_id)),
        Err(Refused::InUse) => Err(in_progress(i, event_id)),
        Err(Refused::Store(e)) => Err(ApiError::backend(e)),
        Err(Refused::Corrupt(e)) => Err(ApiError::internal(e)),
    }
}

/// Records where a claimed event landed, so that a retry answers with it.
async fn complete(
    state: &IngestState,
    envelope: &Envelope,
    fingerprint: String,
    position: Position,
) -> Result<(), ApiError> {
    let receipt = Receipt {
        fingerprint,
        aggregate_id: envelope.aggregate_id,
        position: Some(position),
        claimed_at: now_micros(),
        version: Some(envelope.version),
        released: false,
    };
    let body = encode(&receipt);
    state
        .backends
        .objects
        .put_bytes(&receipt_key(envelope.event_id), body)
        .await
        .map_err(ApiError::backend)?;
    Ok(())
}

/// A claim given up after a failure: a receipt without a position that a retry takes over at
/// once, with the same version (the failed append may have landed anyway).
fn abandoned(envelope: &Envelope, fingerprint: String) -> (Uuid, Receipt) {
    let receipt = Receipt {
        fingerprint,
        aggregate_id: envelope.aggregate_id,
        position: None,
        claimed_at: now_micros(),
        version: Some(envelope.version),
        released: true,
    };
    (envelope.event_id, receipt)
}

/// Gives up this request's claims after a failure, so that a retry can take them.
async fn release(state: &IngestState, claimed: &[(Uuid, Receipt)]) {
    for (id, receipt) in claimed {
        let body = encode(receipt);
        let _ = state
            .backends
            .objects
            .put_bytes(&receipt_key(*id), body)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_storage::ObjectStore;
    use conveyor_storage::objects::fs::FsObjectStore;

    #[tokio::test]
    async fn receipts_past_the_retention_are_swept_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsObjectStore::open(dir.path()).unwrap();
        let day = 24 * 3600 * 1_000_000i64;
        let (old, recent, appending) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let week = 7 * day;
        for (id, age, position) in [
            (old, 8 * day, Some(1)),
            (recent, day, Some(2)),
            // A claim still appending, just past the retention: it is kept for the
            // abandonment time on top.
            (appending, week + 1_000_000, None),
        ] {
            let receipt = Receipt {
                fingerprint: "f".into(),
                aggregate_id: Uuid::new_v4(),
                position: position.map(|offset| Position {
                    partition: 0,
                    offset,
                }),
                claimed_at: now_micros() - age,
                version: None,
                released: false,
            };
            let body = Bytes::from(serde_json::to_vec(&receipt).unwrap());
            store.put_bytes(&receipt_key(id), body).await.unwrap();
        }
        store
            .put_bytes("events/not-a-receipt.json", Bytes::from_static(b"{"))
            .await
            .unwrap();
        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        assert_eq!(sweep_receipts(&store, week).await.unwrap(), 1);
        assert!(store.head(&receipt_key(old)).await.unwrap().is_none());
        assert!(store.head(&receipt_key(recent)).await.unwrap().is_some());
        assert!(store.head(&receipt_key(appending)).await.unwrap().is_some());
        assert!(
            store
                .head("events/not-a-receipt.json")
                .await
                .unwrap()
                .is_some()
        );
    }
}
