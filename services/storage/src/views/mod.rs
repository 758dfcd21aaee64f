//! Read models: `media_by_id`, `media_by_owner` and `owner_stats`, folded from events. The
//! embedded implementation is SQLite ([`sqlite::SqliteReadStore`]); the distributed one is
//! ScyllaDB ([`scylla::ScyllaReadStore`]), behind the same trait and the same conformance suite.
//!
//! The folding rules live here, as a pure function ([`MediaState::apply`]), so every store
//! agrees on them:
//! - each event owns one column group (upload, description, processing);
//! - the upload group is written once, by the item's upload event;
//! - the processing group keeps the write with the highest `version`: its events are all
//!   derived from the upload, at versions that are functions of the upload's (progress at the
//!   upload's, an outcome one past it), so no replica's clock takes part;
//! - the description group keeps the *last description in log order*: every event of one item
//!   shares a partition, and projectors apply a partition in offset order, so the log already
//!   says which description came last, whatever the clocks of the replicas that took them said.
//!   A description is stored at one past the stored one's version if its own is not greater,
//!   so a CQL store's `USING TIMESTAMP` reconciliation agrees ([`MediaState::apply`]);
//! - a delete is a tombstone, and a deleted id never shows again, whatever comes after;
//! - `owner_stats` counts a media item while it has an upload and no tombstone, and changes
//!   only when that flips.
//!
//! So applying a partition's events in log order, with any suffix of them delivered again (a
//! crash before a commit, a rebalance), gives the state of applying each once; events of
//! different items commute. Versions are bounded by the log's own clock before they get here
//! (the projector's [`clamp_to_log_time`]), so a forged far-future version cannot pin an item.

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
#[cfg(feature = "scylla")]
pub mod scylla;
pub mod sqlite;

use async_trait::async_trait;
use conveyor_schemas::{
    Envelope, Event, MediaProcessed, MediaRow, MediaStatus, OwnerStats, TimelinePage,
    VideoProcessed,
};
use uuid::Uuid;

use crate::error::{ErrorKind, Kinded};

/// Why a read store call failed. Every variant has a kind ([`Kinded`]), which is what callers
/// decide on.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The store failed; `kind` says whether retrying can help.
    #[error("read store ({kind}): {message}")]
    Storage {
        /// Transient, permanent or not found, as the backend's mapping decided.
        kind: ErrorKind,
        /// The backend's description of the failure.
        message: String,
    },
    /// An event no store may apply ([`validate`]); permanent.
    #[error("event {event_id} refused: {reason}")]
    InvalidEvent {
        /// The refused event's `event_id`.
        event_id: Uuid,
        /// Why it was refused.
        reason: String,
    },
}

impl ViewError {
    /// A [`ViewError::Storage`] of kind [`ErrorKind::Transient`], saying `message`.
    pub fn transient(message: impl std::fmt::Display) -> ViewError {
        ViewError::Storage {
            kind: ErrorKind::Transient,
            message: message.to_string(),
        }
    }

    /// A [`ViewError::Storage`] of kind [`ErrorKind::Permanent`], saying `message`.
    pub fn permanent(message: impl std::fmt::Display) -> ViewError {
        ViewError::Storage {
            kind: ErrorKind::Permanent,
            message: message.to_string(),
        }
    }
}

impl Kinded for ViewError {
    fn kind(&self) -> ErrorKind {
        match self {
            ViewError::Storage { kind, .. } => *kind,
            ViewError::InvalidEvent { .. } => ErrorKind::Permanent,
        }
    }
}

/// How far ahead of its record's append time an event's version may be, by default, in µs:
/// 1 day (`views.max_version_ahead_secs`). The projector lowers a version further ahead to that
/// bound ([`clamp_to_log_time`]); ScyllaDB itself refuses `USING TIMESTAMP` more than 3 days
/// ahead of its own clock (its `restrict_future_timestamp`), so the bound stays below that.
pub const MAX_VERSION_AHEAD_MICROS: u64 = 24 * 3600 * 1_000_000;

/// The largest version a store can hold: CQL write timestamps are signed 64-bit µs.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// `version`, lowered to `appended_at + max_ahead` if it is further ahead of the time its record
/// was appended to the log (µs since the Unix epoch; on Kafka the broker's clock for topics
/// Conveyor creates, `message.timestamp.type=LogAppendTime`). Deterministic for a record, so a
/// redelivery clamps the same way; never a refusal, so a replica whose clock runs ahead cannot
/// lose an accepted write. It only bounds the numbers: the order of an item's descriptions comes
/// from the log ([`MediaState::apply`]), so a forged version never wins a later write anyway; the
/// bound keeps forged `created_at` values near the truth and every version storable.
pub fn clamp_to_log_time(version: u64, appended_at: i64, max_ahead: u64) -> u64 {
    let bound = (appended_at.max(0) as u64)
        .saturating_add(max_ahead)
        .min(MAX_VERSION);
    version.min(bound)
}

/// Refuses, as [`ViewError::InvalidEvent`] (permanent), any event no store may apply: one whose
/// version cannot be stored as a CQL write timestamp (above [`MAX_VERSION`]). Every store calls
/// this before writing anything of the batch. It never consults a clock: which clock is right
/// is not something a store can know.
pub fn validate(events: &[Envelope]) -> Result<(), ViewError> {
    for event in events {
        if event.version > MAX_VERSION {
            return Err(ViewError::InvalidEvent {
                event_id: event.event_id,
                reason: format!(
                    "version {} is above {MAX_VERSION}, the largest a store can hold",
                    event.version
                ),
            });
        }
    }
    Ok(())
}

/// The contract every read store keeps.
#[async_trait]
pub trait ReadStore: Send + Sync + 'static {
    /// Folds `events` into the read models, by the rules in this module, and returns once the
    /// result is durable. `events` are in log order for each item (a projector's batch of one
    /// partition); applying a suffix of what was applied already, again in log order, leaves the
    /// visible state unchanged.
    async fn apply(&self, events: &[Envelope]) -> Result<(), ViewError>;

    /// `media_by_id`: the media item, or `None` if it is unknown, not yet uploaded, or deleted.
    async fn media(&self, id: Uuid) -> Result<Option<MediaRow>, ViewError>;

    /// Whether the media id has a tombstone (`MediaDeleted` was applied), as opposed to
    /// being live, unknown or not yet projected. Long jobs poll it to stop work on deleted
    /// media.
    async fn is_deleted(&self, id: Uuid) -> Result<bool, ViewError>;

    /// `media_by_owner`: the owner's live media, newest first (`created_at`, then id,
    /// descending), starting strictly after `after`. At most `limit` items.
    async fn owner_timeline(
        &self,
        owner: &str,
        after: Option<(i64, Uuid)>,
        limit: usize,
    ) -> Result<TimelinePage, ViewError>;

    /// `owner_stats`: count and bytes of the owner's live media. Zero for unknown owners.
    async fn owner_stats(&self, owner: &str) -> Result<OwnerStats, ViewError>;

    /// Cheap check that the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), ViewError>;
}

/// A timeline page from up to `limit + 1` items, newest first: the extra item, if present,
/// only says that there is a next page, which starts after the page's last item.
pub fn page_of(mut items: Vec<MediaRow>, limit: usize) -> TimelinePage {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|m| (m.created_at, m.id))
    } else {
        None
    };
    TimelinePage { items, next }
}

/// The upload column group, owned by `MediaUploaded` and `MediaUploadedWithVisibility`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadGroup {
    /// The upload event's version, in µs since the Unix epoch; also the item's `created_at`.
    pub version: u64,
    /// The uploader: the name of the client key the upload was made with.
    pub owner: String,
    /// The original's media type, sniffed from its bytes at upload.
    pub content_type: String,
    /// The original's size, in bytes.
    pub bytes: u64,
    /// The hex sha256 of the original's bytes.
    pub sha256: String,
    /// The original's object key (`originals/{sha256}`, under `private/` for private media).
    pub original_key: String,
    /// The title given at upload, if any; a description's title takes precedence.
    pub title: Option<String>,
    /// Whether the media is private (served only through signed URLs).
    pub private: bool,
}

/// The description column group, owned by `MediaDescribed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeGroup {
    /// The version it is stored at, in µs since the Unix epoch: its event's, or one past the
    /// description it replaced if that one's was not lower (log order beats the clocks).
    pub version: u64,
    /// The described title; `None` leaves the upload's title showing.
    pub title: Option<String>,
    /// The described description, if any.
    pub description: Option<String>,
    /// The described tags, in order; empty when there are none.
    pub tags: Vec<String>,
    /// The event ids of the last [`APPLIED_KEPT`] descriptions applied to the item, newest
    /// last: a description appended again (a producer's retry that took over its own
    /// abandoned request, after a newer one) is recognised and changes nothing. Empty for
    /// groups stored before this was kept.
    pub applied: Vec<Uuid>,
}

/// How many applied description event ids an item remembers ([`DescribeGroup::applied`]): a
/// retry comes back within seconds, a few descriptions later at most.
pub const APPLIED_KEPT: usize = 8;

/// How the description group is stored in the CQL `described` text column: one cell. Unknown
/// fields are ignored, so a later release may add some.
#[derive(serde::Serialize, serde::Deserialize)]
struct DescribedCell {
    /// The group's version, first: two cells at one timestamp hold the same one, and a reader
    /// can tell a cell left behind by a newer write to the legacy columns.
    v: u64,
    title: Option<String>,
    description: Option<String>,
    tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    a: Vec<Uuid>,
}

impl DescribeGroup {
    /// The group as one text value, `{"v":…,"title":…,"description":…,"tags":[…],"a":[…]}`
    /// (`a`: [`DescribeGroup::applied`], left out when empty).
    ///
    /// One cell, so a CQL store never merges two descriptions field by field: of two cells at
    /// one timestamp (two projectors writing one item during a rebalance), CQL keeps the
    /// greater value whole.
    pub fn encode(&self) -> String {
        serde_json::to_string(&DescribedCell {
            v: self.version,
            title: self.title.clone(),
            description: self.description.clone(),
            tags: self.tags.clone(),
            a: self.applied.clone(),
        })
        .expect("a description serializes")
    }

    /// The group [`encode`](Self::encode) wrote.
    pub fn decode(text: &str) -> Result<DescribeGroup, serde_json::Error> {
        let cell: DescribedCell = serde_json::from_str(text)?;
        Ok(DescribeGroup {
            version: cell.v,
            title: cell.title,
            description: cell.description,
            tags: cell.tags,
            applied: cell.a,
        })
    }
}

/// The processing column group, owned by `MediaProcessed` and `MediaProcessingFailed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessGroup {
    /// The version of the event that wrote it, in µs since the Unix epoch (for progress, its
    /// upload's version).
    pub version: u64,
    /// What processing came to, or how far it is.
    pub outcome: ProcessOutcome,
}

/// The processing column group's value: an outcome, or a long job's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessOutcome {
    /// A photo, processed: its dimensions, BlurHash, variants and EXIF.
    Processed(MediaProcessed),
    /// Processing failed, for the reason held here, which clients see.
    Failed(String),
    /// A video, transcoded.
    Video(VideoProcessed),
    /// A long job under way, this far (0–100).
    Progress(u8),
}

/// How a failure is stored in the `processed` text column, beside successes (which are the
/// [`MediaProcessed`] JSON, whose first key is `width`, and which has no `failed`). Unknown
/// fields are ignored, so a later release may add some.
#[derive(serde::Serialize, serde::Deserialize)]
struct FailedCell {
    failed: String,
}

/// How progress is stored: the percentage as three digits, so that the greater encoding is
/// the greater percentage (`{"progress":"040"}` < `{"progress":"100"}`).
#[derive(serde::Serialize, serde::Deserialize)]
struct ProgressCell {
    progress: String,
}

impl ProcessOutcome {
    /// The outcome as one text value: the `MediaProcessed` or `VideoProcessed` JSON,
    /// `{"failed":"<reason>"}`, or `{"progress":"<three digits>"}`.
    ///
    /// This is also the tiebreak between two outcomes at one version: the greater encoding
    /// wins, which is how CQL reconciles two live cells written at one timestamp. So a success
    /// beats a failure (`{"w…` > `{"f…`), on every store and in every order of arrival, and
    /// the highest progress stands. (Progress is written at its upload's version, below every
    /// outcome's, so it never ties with one.)
    pub fn encode(&self) -> String {
        match self {
            ProcessOutcome::Processed(m) => {
                serde_json::to_string(m).expect("MediaProcessed serializes")
            }
            ProcessOutcome::Video(v) => {
                serde_json::to_string(v).expect("VideoProcessed serializes")
            }
            ProcessOutcome::Failed(reason) => serde_json::to_string(&FailedCell {
                failed: reason.clone(),
            })
            .expect("a failure serializes"),
            ProcessOutcome::Progress(percent) => serde_json::to_string(&ProgressCell {
                progress: format!("{:03}", percent.min(&100)),
            })
            .expect("progress serializes"),
        }
    }

    /// The outcome [`encode`](Self::encode) wrote. A video's JSON is told from a photo's by
    /// the fields only it has (`duration_ms`, `renditions`).
    pub fn decode(text: &str) -> Result<ProcessOutcome, serde_json::Error> {
        if let Ok(FailedCell { failed }) = serde_json::from_str(text) {
            return Ok(ProcessOutcome::Failed(failed));
        }
        if let Ok(ProgressCell { progress }) = serde_json::from_str(text) {
            let percent = progress.parse::<u8>().map_err(serde::de::Error::custom)?;
            return Ok(ProcessOutcome::Progress(percent.min(100)));
        }
        if let Ok(video) = serde_json::from_str::<VideoProcessed>(text) {
            return Ok(ProcessOutcome::Video(video));
        }
        serde_json::from_str(text).map(ProcessOutcome::Processed)
    }
}

/// Everything a store keeps about one media id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaState {
    /// The media id: its events' `aggregate_id`.
    pub id: Uuid,
    /// The upload group, once an upload event was folded in.
    pub upload: Option<UploadGroup>,
    /// The description group, once a `MediaDescribed` was folded in.
    pub describe: Option<DescribeGroup>,
    /// The processing group, once an outcome or a progress event was folded in.
    pub process: Option<ProcessGroup>,
    /// Version of the newest tombstone.
    pub deleted: Option<u64>,
}

/// Puts `value` in `slot` if it is newer: a higher version, or, at an equal version, one that
/// `wins_tie` prefers. Returns whether the slot changed.
fn newer<T>(
    slot: &mut Option<T>,
    version: u64,
    current: impl Fn(&T) -> u64,
    value: impl FnOnce() -> T,
    wins_tie: impl Fn(&T, &T) -> bool,
) -> bool {
    match slot {
        Some(existing) if current(existing) > version => false,
        Some(existing) if current(existing) == version => {
            let candidate = value();
            if wins_tie(&candidate, existing) {
                *slot = Some(candidate);
                true
            } else {
                false
            }
        }
        _ => {
            *slot = Some(value());
            true
        }
    }
}

/// The tiebreak of groups that one event alone writes at a version (an upload, a tombstone):
/// two at one version are that event redelivered, so the first one folded stays.
fn keep_first<T>(_: &T, _: &T) -> bool {
    false
}

/// Two outcomes at one version: the greater encoding wins ([`ProcessOutcome::encode`]).
fn greater_outcome(candidate: &ProcessGroup, existing: &ProcessGroup) -> bool {
    candidate.outcome.encode() > existing.outcome.encode()
}

impl MediaState {
    /// The state of an item no event has touched: every group empty, no tombstone.
    pub fn new(id: Uuid) -> Self {
        MediaState {
            id,
            upload: None,
            describe: None,
            process: None,
            deleted: None,
        }
    }

    /// Folds one event in. Returns whether anything changed.
    pub fn apply(&mut self, event: &Envelope) -> bool {
        let v = event.version;
        match &event.payload {
            Event::MediaUploaded(_) | Event::MediaUploadedWithVisibility(_) => {
                let (e, visibility) = event.payload.upload().expect("an upload event");
                newer(
                    &mut self.upload,
                    v,
                    |g| g.version,
                    || UploadGroup {
                        version: v,
                        owner: e.owner.clone(),
                        content_type: e.content_type.clone(),
                        bytes: e.bytes,
                        sha256: e.sha256.clone(),
                        original_key: e.original_key.clone(),
                        title: e.title.clone(),
                        private: visibility == conveyor_schemas::Visibility::Private,
                    },
                    keep_first,
                )
            }
            Event::MediaDescribed(e) => {
                // The last description in log order wins, whatever its version says: the log
                // orders an item's events, the replicas' clocks do not. Stored one past the
                // previous one if need be, so CQL's reconciliation by timestamp agrees. One
                // applied already (the same event appended again) changes nothing.
                let (version, mut applied) = match &self.describe {
                    Some(d) if d.applied.contains(&event.event_id) => return false,
                    Some(d) => (
                        v.max(d.version.saturating_add(1)).min(MAX_VERSION),
                        d.applied.clone(),
                    ),
                    None => (v, Vec::new()),
                };
                applied.push(event.event_id);
                if applied.len() > APPLIED_KEPT {
                    applied.remove(0);
                }
                self.describe = Some(DescribeGroup {
                    version,
                    title: e.title.clone(),
                    description: e.description.clone(),
                    tags: e.tags.clone(),
                    applied,
                });
                true
            }
            Event::MediaProcessed(e) => newer(
                &mut self.process,
                v,
                |g| g.version,
                || ProcessGroup {
                    version: v,
                    outcome: ProcessOutcome::Processed(e.clone()),
                },
                greater_outcome,
            ),
            Event::MediaProcessingFailed(e) => newer(
                &mut self.process,
                v,
                |g| g.version,
                || ProcessGroup {
                    version: v,
                    outcome: ProcessOutcome::Failed(e.reason.clone()),
                },
                greater_outcome,
            ),
            Event::VideoProcessed(e) => newer(
                &mut self.process,
                v,
                |g| g.version,
                || ProcessGroup {
                    version: v,
                    outcome: ProcessOutcome::Video(e.clone()),
                },
                greater_outcome,
            ),
            Event::MediaProcessingProgress(e) => newer(
                &mut self.process,
                v,
                |g| g.version,
                || ProcessGroup {
                    version: v,
                    outcome: ProcessOutcome::Progress(e.percent.min(100)),
                },
                greater_outcome,
            ),
            Event::MediaDeleted(_) => newer(&mut self.deleted, v, |d| *d, || v, keep_first),
        }
    }

    /// Whether clients can see this item.
    pub fn is_live(&self) -> bool {
        self.upload.is_some() && self.deleted.is_none()
    }

    /// This item's contribution to its owner's stats: `(owner, bytes)` while live.
    pub fn counted(&self) -> Option<(&str, u64)> {
        match (&self.upload, self.deleted) {
            (Some(u), None) => Some((u.owner.as_str(), u.bytes)),
            _ => None,
        }
    }

    /// The row clients see, if the item is live.
    pub fn to_row(&self) -> Option<MediaRow> {
        let upload = self.upload.as_ref().filter(|_| self.deleted.is_none())?;
        let mut row = MediaRow {
            id: self.id,
            owner: upload.owner.clone(),
            status: MediaStatus::Pending,
            content_type: upload.content_type.clone(),
            bytes: upload.bytes,
            sha256: upload.sha256.clone(),
            original_key: upload.original_key.clone(),
            width: None,
            height: None,
            title: None,
            description: None,
            tags: Vec::new(),
            blurhash: None,
            variants: Vec::new(),
            exif: None,
            failure_reason: None,
            progress: None,
            video: None,
            private: upload.private,
            created_at: upload.version as i64,
        };
        match self.process.as_ref().map(|p| &p.outcome) {
            None => {}
            Some(ProcessOutcome::Processed(p)) => {
                row.status = MediaStatus::Processed;
                row.width = Some(p.width);
                row.height = Some(p.height);
                row.blurhash = Some(p.blurhash.clone());
                row.variants = p.variants.clone();
                row.exif = Some(p.exif.clone());
            }
            Some(ProcessOutcome::Video(v)) => {
                row.status = MediaStatus::Processed;
                row.width = Some(v.width);
                row.height = Some(v.height);
                row.blurhash = Some(v.blurhash.clone());
                row.variants = v.variants.clone();
                row.video = Some(v.into());
            }
            Some(ProcessOutcome::Failed(reason)) => {
                row.status = MediaStatus::Failed;
                row.failure_reason = Some(reason.clone());
            }
            Some(ProcessOutcome::Progress(percent)) => {
                row.status = MediaStatus::Processing;
                row.progress = Some(*percent);
            }
        }
        (row.title, row.description, row.tags) = match &self.describe {
            Some(d) => (
                d.title.clone().or_else(|| upload.title.clone()),
                d.description.clone(),
                d.tags.clone(),
            ),
            None => (upload.title.clone(), None, Vec::new()),
        };
        Some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_schemas::{MediaDeleted, MediaDescribed, MediaUploaded};

    fn ev(id: Uuid, version: u64, payload: Event) -> Envelope {
        Envelope::new(id, version, "test", payload)
    }

    fn uploaded(owner: &str) -> Event {
        Event::MediaUploaded(MediaUploaded {
            owner: owner.into(),
            original_key: "originals/x".into(),
            sha256: "x".into(),
            bytes: 10,
            content_type: "image/png".into(),
            title: Some("from upload".into()),
        })
    }

    fn describe(title: &str) -> Event {
        Event::MediaDescribed(MediaDescribed {
            title: Some(title.into()),
            description: None,
            tags: vec![],
        })
    }

    #[test]
    fn events_of_different_groups_give_one_row_in_every_order() {
        let id = Uuid::now_v7();
        let events = [
            ev(id, 10, uploaded("alice")),
            ev(id, 20, describe("t1")),
            ev(
                id,
                11,
                Event::MediaProcessingFailed(conveyor_schemas::MediaProcessingFailed {
                    reason: "bad".into(),
                }),
            ),
            ev(
                id,
                10,
                Event::MediaProcessingProgress(conveyor_schemas::MediaProcessingProgress {
                    percent: 40,
                }),
            ),
        ];
        let mut reference = MediaState::new(id);
        events.iter().for_each(|e| {
            reference.apply(e);
        });
        // All 24 permutations, each applied twice.
        let mut idx = [0usize, 1, 2, 3];
        let mut permutations = vec![];
        permute(&mut idx, 0, &mut permutations);
        for order in permutations {
            let mut state = MediaState::new(id);
            for i in order.iter().chain(order.iter()) {
                state.apply(&events[*i]);
            }
            assert_eq!(state.to_row(), reference.to_row(), "order {order:?}");
        }
        let row = reference.to_row().unwrap();
        assert_eq!(row.title.as_deref(), Some("t1"));
        assert_eq!(
            row.status,
            MediaStatus::Failed,
            "the outcome beats progress"
        );
    }

    /// Reported: a description taken by a replica whose clock was 5 s behind, 1 s after
    /// another, was lost. The last description in log order wins, whatever the versions say,
    /// and a redelivered suffix of the log ends where it ended the first time.
    #[test]
    fn the_last_description_in_log_order_wins_whatever_its_version() {
        let id = Uuid::now_v7();
        let second = 1_000_000;
        let log = [
            ev(id, 100 * second, uploaded("alice")),
            ev(id, 101 * second, describe("first")),
            // Taken 1 s later by a replica 5 s behind.
            ev(id, 97 * second, describe("second")),
            // And at the very same version as the one before it.
            ev(id, 97 * second, describe("third")),
        ];
        let mut state = MediaState::new(id);
        for (i, event) in log.iter().enumerate() {
            assert!(state.apply(event), "event {i} changes the item");
        }
        let stored = state.describe.clone().unwrap();
        assert_eq!(stored.title.as_deref(), Some("third"));
        assert!(
            stored.version > 101 * second + 1,
            "stored above every description before it: {}",
            stored.version
        );
        // A crash before the commit: the last two are delivered again, in log order.
        for event in &log[2..] {
            state.apply(event);
        }
        assert_eq!(
            state.to_row().unwrap().title.as_deref(),
            Some("third"),
            "a redelivered suffix ends where it ended"
        );
        // The first description appended again (a producer's retry that took over its own
        // request after the others): applied already, so it changes nothing.
        assert!(!state.apply(&log[1]), "a description applied already");
        assert_eq!(state.to_row().unwrap().title.as_deref(), Some("third"));
        // The memory is bounded.
        for i in 0..(APPLIED_KEPT as u64 + 3) {
            state.apply(&ev(id, 200 * second + i, describe("more")));
        }
        assert_eq!(state.describe.unwrap().applied.len(), APPLIED_KEPT);
    }

    #[test]
    fn versions_are_clamped_to_the_log_time_and_never_refused_for_a_clock() {
        let day = 86_400 * 1_000_000;
        let now = 1_800_000_000 * 1_000_000u64;
        assert_eq!(clamp_to_log_time(now + 2 * day, now as i64, day), now + day);
        assert_eq!(
            clamp_to_log_time(now - 2 * day, now as i64, day),
            now - 2 * day
        );
        assert_eq!(clamp_to_log_time(u64::MAX, i64::MAX, day), MAX_VERSION);
        assert_eq!(
            clamp_to_log_time(5, -1, 0),
            0,
            "a log time before 1970 is 0"
        );
        let id = Uuid::now_v7();
        assert!(validate(&[ev(id, now + 400 * day, uploaded("a"))]).is_ok());
        assert!(validate(&[ev(id, MAX_VERSION + 1, uploaded("a"))]).is_err());
    }

    fn permute(items: &mut [usize; 4], k: usize, out: &mut Vec<[usize; 4]>) {
        if k == items.len() {
            out.push(*items);
            return;
        }
        for i in k..items.len() {
            items.swap(k, i);
            permute(items, k + 1, out);
            items.swap(k, i);
        }
    }

    #[test]
    fn a_tombstone_hides_the_item_whatever_comes_later() {
        let id = Uuid::now_v7();
        let mut state = MediaState::new(id);
        state.apply(&ev(id, 10, uploaded("alice")));
        assert_eq!(state.counted(), Some(("alice", 10)));
        state.apply(&ev(
            id,
            50,
            Event::MediaDeleted(MediaDeleted {
                deleted_by: "alice".into(),
            }),
        ));
        state.apply(&ev(
            id,
            11,
            Event::MediaProcessingFailed(conveyor_schemas::MediaProcessingFailed {
                reason: "late".into(),
            }),
        ));
        assert_eq!(state.to_row(), None);
        assert_eq!(state.counted(), None);
    }
}
