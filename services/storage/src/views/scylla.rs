//! The distributed read store on ScyllaDB, through the `scylla` driver. The tables are in
//! `schemas/cql/` (one per query); `conveyor ops migrate` creates them ([`migrate`]).
//!
//! Writes outside the owner ledger are last-writer-wins by version: every such statement
//! carries `USING TIMESTAMP <version>`, the version the fold in [`super`] stored the group at (a
//! description's may be one past the one it replaces, as the log orders them), and each event
//! writes only the columns of its own group, so ScyllaDB's own cell reconciliation agrees with
//! the fold. `apply` is read-then-write: it loads each touched item from `media_by_id`, folds
//! the batch in memory to learn the item's owner, liveness and timeline chunk, and then writes:
//! 1. the owner ledger (`owner_ledger`, migration 0003) for items that became live, which
//!    places each new one in a timeline chunk;
//! 2. the owner's timeline (`timeline`);
//! 3. the owner ledger for items that were deleted, and the timeline row of a deleted item
//!    that another writer placed meanwhile (its chunk comes back from that transaction);
//! 4. then `media_by_id`, the table the next `apply` reads.
//!
//! A crash between two of them leaves `media_by_id` as it was, so the redelivered batch writes
//! everything again; every statement is idempotent, so writing twice is harmless. The
//! projector applies one partition's batches one at a time, and a media id lives on one
//! partition, so no two writers fold the same item at once. The ledger is the one table where
//! writers of different items meet (an owner's items are on every partition): it is changed
//! only by lightweight transactions ([`ScyllaReadStore::settle`]). An item is counted before
//! its timeline row is written, so a chunk holding a live row is never skipped as empty; reads
//! are limited by the page, not by live counts.
//!
//! Every statement is prepared, binds every key as a parameter (so the driver routes it to a
//! replica that owns the token), is marked idempotent (so the driver may retry it), and every
//! read is paged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conveyor_schemas::cql::MIGRATIONS;
use conveyor_schemas::{Envelope, Event, MediaRow, OwnerStats, TimelinePage};
use futures::{StreamExt, TryStreamExt, stream};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::PagingState;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::unprepared::Statement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{
    DescribeGroup, MediaState, ProcessGroup, ProcessOutcome, ReadStore, UploadGroup, ViewError,
};
use crate::error::{ErrorKind, Kinded};
use conveyor_config::{ScyllaUri, ViewSettings};

/// A driver error, by its kind: the one place this backend maps them ([`CqlFailure`]).
fn storage(e: impl CqlFailure) -> ViewError {
    ViewError::Storage {
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// What kind of failure a driver error is.
///
/// - The node refusing the statement for what it is (invalid, a syntax error) is permanent, and
///   so is a value the driver cannot serialise or a row it cannot read: the same record fails
///   the same way every time. (The default `kind` below is for those row and value errors.)
/// - Everything else is transient: unavailable replicas, read and write timeouts, overload, a
///   broken connection, an empty pool, a client timeout, and unauthorised or misconfigured
///   sessions, which fail every statement alike until an operator acts.
trait CqlFailure: std::fmt::Display {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Permanent
    }
}

fn db_kind(e: &scylla::errors::DbError) -> ErrorKind {
    use scylla::errors::DbError as Db;
    match e {
        // The statement or its values, refused for what they are. Authentication,
        // authorisation and configuration errors hit every statement alike: transient.
        Db::SyntaxError
        | Db::Invalid
        | Db::AlreadyExists { .. }
        | Db::FunctionFailure { .. }
        | Db::ProtocolError => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

fn attempt_kind(e: &scylla::errors::RequestAttemptError) -> ErrorKind {
    use scylla::errors::RequestAttemptError as A;
    match e {
        A::DbError(db, _) => db_kind(db),
        A::SerializationError(_) | A::CqlRequestSerialization(_) => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

impl CqlFailure for scylla::errors::ExecutionError {
    fn kind(&self) -> ErrorKind {
        use scylla::errors::ExecutionError as E;
        match self {
            E::BadQuery(_) => ErrorKind::Permanent,
            E::LastAttemptError(attempt) => attempt_kind(attempt),
            E::PrepareError(prepare) => prepare.kind(),
            E::UseKeyspaceError(use_keyspace) => use_keyspace.kind(),
            _ => ErrorKind::Transient,
        }
    }
}

impl CqlFailure for scylla::errors::PagerExecutionError {
    fn kind(&self) -> ErrorKind {
        use scylla::errors::PagerExecutionError as E;
        match self {
            E::SerializationError(_) => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }
}

impl CqlFailure for scylla::errors::NextRowError {
    fn kind(&self) -> ErrorKind {
        match self {
            // A later page failed to arrive; a row that does not deserialise is permanent.
            scylla::errors::NextRowError::NextPageError(_) => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    }
}

impl CqlFailure for scylla::errors::NewSessionError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Transient
    }
}

impl CqlFailure for scylla::errors::UseKeyspaceError {
    fn kind(&self) -> ErrorKind {
        match self {
            scylla::errors::UseKeyspaceError::RequestError(attempt) => attempt_kind(attempt),
            _ => ErrorKind::Permanent,
        }
    }
}

impl CqlFailure for scylla::errors::SchemaAgreementError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Transient
    }
}

impl CqlFailure for scylla::errors::PrepareError {
    fn kind(&self) -> ErrorKind {
        match self {
            scylla::errors::PrepareError::AllAttemptsFailed { first_attempt } => {
                attempt_kind(first_attempt)
            }
            _ => ErrorKind::Transient,
        }
    }
}

impl CqlFailure for scylla::response::query_result::IntoRowsResultError {}
impl CqlFailure for scylla::errors::RowsError {}
impl CqlFailure for scylla::errors::TypeCheckError {}
impl CqlFailure for scylla::errors::DeserializationError {}
impl CqlFailure for serde_json::Error {}

/// A driver error with what was being done, keeping its kind.
fn context(what: impl std::fmt::Display, e: impl CqlFailure) -> ViewError {
    ViewError::Storage {
        kind: e.kind(),
        message: format!("{what}: {e}"),
    }
}

/// The month bucket of a timeline row: `yyyymm` of `created_at` (µs since the epoch, UTC).
pub fn bucket_of(created_at_us: i64) -> i32 {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(created_at_us as i128 * 1_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.year() * 100 + at.month() as i32
}

/// Every statement the store prepares. The text is the contract with `schemas/cql/`; a test
/// checks each against the tables there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stmt {
    /// Writes the upload group, with the owner, to the item's `media_by_id` row.
    UploadById,
    /// Writes the description group (`describe_v` and the one `described` cell) to the
    /// item's `media_by_id` row.
    DescribeById,
    /// Writes the processing group (`process_v` and the one `processed` cell) to the item's
    /// `media_by_id` row.
    ProcessById,
    /// Writes the tombstone (`deleted_v`) to the item's `media_by_id` row and erases every
    /// group's columns at the same timestamp.
    TombstoneById,
    /// Inserts the item's row in its owner's timeline (`timeline`), with the upload
    /// group.
    UploadByOwner,
    /// Writes the description group to the item's `timeline` row.
    DescribeByOwner,
    /// Writes the processing group to the item's `timeline` row.
    ProcessByOwner,
    /// Deletes the item's `timeline` row.
    DeleteByOwner,
    /// Reads an item's `media_by_id` row, with `deleted_v`.
    SelectById,
    /// Reads the owner's month rows in `owner_ledger` up to a given month, newest first:
    /// `(bucket, live_count, bytes, placed, chunk_live, chunk_newest)`. The timeline's walk and
    /// the stats.
    SelectMonths,
    /// Reads at most `?` rows of one chunk of one month of the owner's timeline, newest first.
    SelectTimeline,
    /// Reads at most `?` rows of one chunk of one month of the owner's timeline strictly after
    /// a `(created_at, id)` cursor, newest first.
    SelectTimelineAfter,
    /// Reads every month row of the owner's ledger with its `seq`, at `SERIAL`: the state a
    /// ledger transaction starts from.
    LedgerMonths,
    /// Reads one item's ledger row (`bytes`, `gone`, `chunk`), after [`Stmt::LedgerMonths`].
    LedgerItem,
    /// Sets the ledger's `seq` if it is still the one read: the condition of every ledger
    /// transaction (a conditional batch on the owner's partition).
    LedgerSeq,
    /// Sets one month's totals and adds to its chunk maps, inside a ledger transaction.
    LedgerMonth,
    /// Sets one item's ledger row, inside a ledger transaction.
    LedgerItemSet,
    /// Reads the node's `release_version` from `system.local`: the `/readyz` check.
    Ping,
}

/// The columns of a media item, as both media tables return them; `media_by_id` adds
/// `deleted_v`.
const ITEM_COLUMNS: &str = "id, upload_v, owner, content_type, bytes, sha256, original_key, \
     upload_title, private, describe_v, title, description, tags, process_v, processed, \
     failure_reason, described";

impl Stmt {
    /// Every statement, once each: what [`ScyllaReadStore::connect`] prepares.
    pub const ALL: [Stmt; 18] = [
        Stmt::UploadById,
        Stmt::DescribeById,
        Stmt::ProcessById,
        Stmt::TombstoneById,
        Stmt::UploadByOwner,
        Stmt::DescribeByOwner,
        Stmt::ProcessByOwner,
        Stmt::DeleteByOwner,
        Stmt::SelectById,
        Stmt::SelectMonths,
        Stmt::SelectTimeline,
        Stmt::SelectTimelineAfter,
        Stmt::LedgerMonths,
        Stmt::LedgerItem,
        Stmt::LedgerSeq,
        Stmt::LedgerMonth,
        Stmt::LedgerItemSet,
        Stmt::Ping,
    ];

    /// Whether the statement belongs to a ledger transaction, which takes its timestamp from
    /// Paxos: CQL refuses `USING TIMESTAMP` on conditional updates.
    pub fn is_ledger(self) -> bool {
        matches!(
            self,
            Stmt::LedgerMonths
                | Stmt::LedgerItem
                | Stmt::LedgerSeq
                | Stmt::LedgerMonth
                | Stmt::LedgerItemSet
        )
    }

    /// The statement's CQL, with one `?` marker per bound value ([`Write::values`]). Every
    /// write outside the ledger carries `USING TIMESTAMP ?`, bound to the version it writes
    /// at.
    pub fn cql(self) -> String {
        match self {
            // The chunk is the item's place in its owner's timeline, from the ledger.
            Stmt::UploadById => "UPDATE media_by_id USING TIMESTAMP ? SET upload_v = ?, \
                owner = ?, content_type = ?, bytes = ?, sha256 = ?, original_key = ?, \
                upload_title = ?, private = ?, chunk = ? WHERE id = ?"
                .into(),
            // The description is one cell (`described`, migration 0002), as the outcome is.
            Stmt::DescribeById => "UPDATE media_by_id USING TIMESTAMP ? SET describe_v = ?, \
                described = ? WHERE id = ?"
                .into(),
            // The outcome is one cell (`processed`), never a null: two outcomes at one timestamp
            // then resolve as the fold does (the greater value), instead of cell by cell.
            Stmt::ProcessById => "UPDATE media_by_id USING TIMESTAMP ? SET process_v = ?, \
                processed = ? WHERE id = ?"
                .into(),
            // One statement on one partition, so it lands whole: the tombstone version, and
            // every group erased at that timestamp, so older writes arriving late are shadowed.
            Stmt::TombstoneById => "UPDATE media_by_id USING TIMESTAMP ? SET deleted_v = ?, \
                upload_v = null, owner = null, content_type = null, bytes = null, \
                sha256 = null, original_key = null, upload_title = null, private = null, \
                describe_v = null, title = null, description = null, tags = null, described = null, \
                process_v = null, processed = null, failure_reason = null, chunk = null \
                WHERE id = ?"
                .into(),
            Stmt::UploadByOwner => "INSERT INTO timeline (owner, bucket, chunk, created_at, id, \
                upload_v, content_type, bytes, sha256, original_key, upload_title, private) \
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
                .into(),
            Stmt::DescribeByOwner => "UPDATE timeline USING TIMESTAMP ? SET describe_v = ?, \
                described = ? \
                WHERE owner = ? AND bucket = ? AND chunk = ? AND created_at = ? AND id = ?"
                .into(),
            Stmt::ProcessByOwner => "UPDATE timeline USING TIMESTAMP ? SET process_v = ?, \
                processed = ? \
                WHERE owner = ? AND bucket = ? AND chunk = ? AND created_at = ? AND id = ?"
                .into(),
            Stmt::DeleteByOwner => "DELETE FROM timeline USING TIMESTAMP ? \
                WHERE owner = ? AND bucket = ? AND chunk = ? AND created_at = ? AND id = ?"
                .into(),
            Stmt::SelectById => {
                format!("SELECT {ITEM_COLUMNS}, deleted_v, chunk FROM media_by_id WHERE id = ?")
            }
            Stmt::SelectMonths => "SELECT bucket, live_count, bytes, placed, chunk_live, \
                chunk_newest FROM owner_ledger WHERE owner = ? AND kind = 0 AND bucket <= ?"
                .into(),
            Stmt::SelectTimeline => format!(
                "SELECT {ITEM_COLUMNS} FROM timeline \
                 WHERE owner = ? AND bucket = ? AND chunk = ? LIMIT ?"
            ),
            Stmt::SelectTimelineAfter => format!(
                "SELECT {ITEM_COLUMNS} FROM timeline \
                 WHERE owner = ? AND bucket = ? AND chunk = ? AND (created_at, id) < (?, ?) LIMIT ?"
            ),
            Stmt::LedgerMonths => "SELECT bucket, live_count, bytes, placed, chunk_live, \
                chunk_newest, seq FROM owner_ledger WHERE owner = ? AND kind = 0"
                .into(),
            Stmt::LedgerItem => "SELECT bytes, gone, chunk FROM owner_ledger \
                WHERE owner = ? AND kind = 1 AND bucket = ? AND id = ?"
                .into(),
            Stmt::LedgerSeq => "UPDATE owner_ledger SET seq = ? WHERE owner = ? IF seq = ?".into(),
            // The maps are added to, never overwritten: an overwrite would leave a tombstone.
            Stmt::LedgerMonth => "UPDATE owner_ledger SET live_count = ?, bytes = ?, placed = ?, \
                chunk_live = chunk_live + ?, chunk_newest = chunk_newest + ? \
                WHERE owner = ? AND kind = 0 AND bucket = ? AND id = ?"
                .into(),
            Stmt::LedgerItemSet => "UPDATE owner_ledger SET bytes = ?, gone = ?, chunk = ? \
                WHERE owner = ? AND kind = 1 AND bucket = ? AND id = ?"
                .into(),
            Stmt::Ping => "SELECT release_version FROM system.local WHERE key = ?".into(),
        }
    }

    /// Rows per page for reads: a timeline page is at most 100 items plus one.
    fn page_size(self) -> i32 {
        match self {
            Stmt::SelectTimeline | Stmt::SelectTimelineAfter => 101,
            _ => 1_000,
        }
    }
}

/// One write: a statement and its bound values, in the statement's order.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The statement to run.
    pub stmt: Stmt,
    /// Its bound values, one per `?` marker, in order; `None` binds a null.
    pub values: Vec<Option<CqlValue>>,
}

/// Which column groups a batch carried events for, per item.
#[derive(Debug, Clone, Copy, Default)]
pub struct Touched {
    /// An upload: `MediaUploaded` or `MediaUploadedWithVisibility`.
    pub upload: bool,
    /// A `MediaDescribed`.
    pub describe: bool,
    /// An outcome or progress: `MediaProcessed`, `MediaProcessingFailed`, `VideoProcessed`
    /// or `MediaProcessingProgress`.
    pub process: bool,
    /// A `MediaDeleted`.
    pub delete: bool,
}

impl Touched {
    fn add(&mut self, event: &Event) {
        match event {
            Event::MediaUploaded(_) | Event::MediaUploadedWithVisibility(_) => self.upload = true,
            Event::MediaDescribed(_) => self.describe = true,
            Event::MediaProcessed(_)
            | Event::MediaProcessingFailed(_)
            | Event::VideoProcessed(_)
            | Event::MediaProcessingProgress(_) => self.process = true,
            Event::MediaDeleted(_) => self.delete = true,
        }
    }
}

/// Where an item stands in its owner's ledger (`owner_ledger`, kind 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Counted in its month's totals, with its size in bytes.
    Live {
        /// The item's size in bytes, as uploaded.
        bytes: u64,
    },
    /// Deleted: counted nowhere, and never counted again (a delete is final).
    Gone,
}

/// One item's standing as the fold has it: what a ledger transaction makes the ledger say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The item's owner: the ledger partition.
    pub owner: String,
    /// The month bucket of the item's upload ([`bucket_of`]).
    pub bucket: i32,
    /// The item's `created_at` (its upload's version, µs): the newest a chunk holds is kept.
    pub created_at: i64,
    /// The media id.
    pub id: Uuid,
    /// Where the item stands now.
    pub standing: Standing,
}

/// The writes of one batch besides the ledger's, in the order [`ScyllaReadStore::apply`] runs
/// them.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Writes to `timeline`, run between the ledger's live entries and its gone ones.
    pub owner_side: Vec<Write>,
    /// Writes to `media_by_id`, run once every owner-side write succeeded: the next `apply`
    /// reads this table, so a crash before it makes the redelivered batch write everything
    /// again.
    pub by_id: Vec<Write>,
}

fn big(v: u64) -> Option<CqlValue> {
    Some(CqlValue::BigInt(v as i64))
}

fn text(s: &str) -> Option<CqlValue> {
    Some(CqlValue::Text(s.to_owned()))
}

fn opt_text(s: Option<&String>) -> Option<CqlValue> {
    s.map(|s| CqlValue::Text(s.clone()))
}

fn upload_values(u: &UploadGroup) -> Vec<Option<CqlValue>> {
    vec![
        big(u.version),
        text(&u.content_type),
        big(u.bytes),
        text(&u.sha256),
        text(&u.original_key),
        opt_text(u.title.as_ref()),
        Some(CqlValue::Boolean(u.private)),
    ]
}

fn describe_values(d: &DescribeGroup) -> Vec<Option<CqlValue>> {
    vec![big(d.version), text(&d.encode())]
}

fn process_values(p: &ProcessGroup) -> Vec<Option<CqlValue>> {
    vec![big(p.version), text(&p.outcome.encode())]
}

/// Where the item stands after the batch, for the owner ledger: `None` when the batch carried
/// neither its upload nor its delete (nothing else moves it), or its upload is unknown (no
/// owner yet).
pub fn ledger_entry(state: &MediaState, touched: Touched) -> Option<LedgerEntry> {
    let upload = state.upload.as_ref()?;
    (touched.upload || touched.delete).then(|| LedgerEntry {
        owner: upload.owner.clone(),
        bucket: bucket_of(upload.version as i64),
        created_at: upload.version as i64,
        id: state.id,
        standing: match state.deleted {
            Some(_) => Standing::Gone,
            None => Standing::Live {
                bytes: upload.bytes,
            },
        },
    })
}

/// What to write for one item, given its state after the batch, which groups the batch
/// carried, and its timeline chunk (`None` if the ledger never placed it: then it has no
/// timeline row to write or delete). Pure, so every statement and value is unit-tested
/// without a node.
pub fn plan_item(state: &MediaState, touched: Touched, chunk: Option<i32>, plan: &mut Plan) {
    let id = Some(CqlValue::Uuid(state.id));
    // The timeline key, once the upload is known and the ledger has placed it.
    let key = state.upload.as_ref().zip(chunk).map(|(u, chunk)| {
        (
            u,
            [
                text(&u.owner),
                Some(CqlValue::Int(bucket_of(u.version as i64))),
                Some(CqlValue::Int(chunk)),
                big(u.version),
                id.clone(),
            ],
        )
    });
    if let Some(deleted) = state.deleted {
        if let Some((_, row_key)) = &key {
            // A row tombstone hides only cells written at or below its timestamp, and a delete
            // is final whatever its version: so the timeline row is deleted at or above every
            // version written to it. Nothing writes it again once the item is deleted (the
            // fold keeps it deleted), so a high timestamp shadows nothing live.
            let written = [
                state.upload.as_ref().map(|g| g.version),
                state.describe.as_ref().map(|g| g.version),
                state.process.as_ref().map(|g| g.version),
            ];
            let at = big(written.into_iter().flatten().fold(deleted, u64::max));
            let mut values = vec![at];
            values.extend(row_key.iter().cloned());
            plan.owner_side.push(Write {
                stmt: Stmt::DeleteByOwner,
                values,
            });
        }
        if touched.delete {
            plan.by_id.push(Write {
                stmt: Stmt::TombstoneById,
                values: vec![big(deleted), big(deleted), id],
            });
        }
        return;
    }
    if let Some((upload, row_key)) = &key {
        // A newly placed row also carries the groups that arrived before its upload.
        let describe = state
            .describe
            .as_ref()
            .filter(|_| touched.describe || touched.upload);
        let process = state
            .process
            .as_ref()
            .filter(|_| touched.process || touched.upload);
        if touched.upload {
            let mut values = row_key.to_vec();
            values.extend(upload_values(upload));
            values.push(big(upload.version));
            plan.owner_side.push(Write {
                stmt: Stmt::UploadByOwner,
                values,
            });
        }
        // `UPDATE … USING TIMESTAMP <version> SET <group> WHERE <row key>`.
        let mut update = |stmt, version, group: Vec<Option<CqlValue>>| {
            let mut values = vec![big(version)];
            values.extend(group);
            values.extend(row_key.iter().cloned());
            plan.owner_side.push(Write { stmt, values });
        };
        if let Some(d) = describe {
            update(Stmt::DescribeByOwner, d.version, describe_values(d));
        }
        if let Some(p) = process {
            update(Stmt::ProcessByOwner, p.version, process_values(p));
        }
    }
    // `UPDATE media_by_id USING TIMESTAMP <version> SET <group> WHERE id = ?`.
    let mut update = |stmt, version, group: Vec<Option<CqlValue>>| {
        let mut values = vec![big(version)];
        values.extend(group);
        values.push(id.clone());
        plan.by_id.push(Write { stmt, values });
    };
    if let Some(u) = state.upload.as_ref().filter(|_| touched.upload) {
        let mut group = upload_values(u);
        group.insert(1, text(&u.owner));
        group.push(chunk.map(CqlValue::Int));
        update(Stmt::UploadById, u.version, group);
    }
    if let Some(d) = state.describe.as_ref().filter(|_| touched.describe) {
        update(Stmt::DescribeById, d.version, describe_values(d));
    }
    if let Some(p) = state.process.as_ref().filter(|_| touched.process) {
        update(Stmt::ProcessById, p.version, process_values(p));
    }
}

/// Reads an item and its timeline chunk from a `media_by_id` row ([`Stmt::SelectById`]).
fn placed_from_row(mut row: Row) -> Result<(MediaState, Option<i32>), ViewError> {
    let chunk = match row.columns.pop().flatten() {
        Some(CqlValue::Int(chunk)) => Some(chunk),
        _ => None,
    };
    Ok((state_from_row(row)?, chunk))
}

/// Reads an item from a row of [`ITEM_COLUMNS`] (plus `deleted_v` from `media_by_id`).
fn state_from_row(row: Row) -> Result<MediaState, ViewError> {
    let mut cols = row.columns.into_iter();
    let mut next = || cols.next().flatten();
    let bad = |what: &str| ViewError::permanent(format!("read store row: unexpected {what}"));
    let id = match next() {
        Some(CqlValue::Uuid(id)) => id,
        _ => return Err(bad("id")),
    };
    let as_u64 = |v: Option<CqlValue>| match v {
        Some(CqlValue::BigInt(n)) => Some(n as u64),
        _ => None,
    };
    let as_text = |v: Option<CqlValue>| match v {
        Some(CqlValue::Text(s)) => Some(s),
        _ => None,
    };
    let upload_v = as_u64(next());
    let owner = as_text(next());
    let content_type = as_text(next());
    let bytes = as_u64(next());
    let sha256 = as_text(next());
    let original_key = as_text(next());
    let upload_title = as_text(next());
    let private = matches!(next(), Some(CqlValue::Boolean(true)));
    let describe_v = as_u64(next());
    let title = as_text(next());
    let description = as_text(next());
    let tags = match next() {
        Some(CqlValue::List(items)) => items.into_iter().filter_map(|t| as_text(Some(t))).collect(),
        _ => Vec::new(),
    };
    let process_v = as_u64(next());
    let processed = as_text(next());
    let failure_reason = as_text(next());
    let described = as_text(next());
    let deleted = as_u64(next());
    let upload = match (upload_v, owner) {
        (Some(version), Some(owner)) => Some(UploadGroup {
            version,
            owner,
            content_type: content_type.unwrap_or_default(),
            bytes: bytes.unwrap_or_default(),
            sha256: sha256.unwrap_or_default(),
            original_key: original_key.unwrap_or_default(),
            title: upload_title,
            private,
        }),
        _ => None,
    };
    // The one cell when it holds the group at `describe_v`; else the legacy columns: rows
    // from before migration 0002, or a description an older binary wrote during an upgrade
    // (it writes the legacy columns and `describe_v`, and leaves the cell at its old version).
    let cell = match &described {
        Some(text) => Some(DescribeGroup::decode(text).map_err(storage)?),
        None => None,
    };
    let describe = match (describe_v, cell) {
        (None, _) => None,
        (Some(version), Some(cell)) if cell.version == version => Some(cell),
        (Some(version), _) => Some(DescribeGroup {
            version,
            title,
            description,
            tags,
            applied: Vec::new(),
        }),
    };
    let process = match process_v {
        None => None,
        Some(version) => Some(ProcessGroup {
            version,
            outcome: match processed {
                Some(text) => ProcessOutcome::decode(&text).map_err(storage)?,
                // Rows written before failures moved into `processed`.
                None => ProcessOutcome::Failed(failure_reason.unwrap_or_default()),
            },
        }),
    };
    Ok(MediaState {
        id,
        upload,
        describe,
        process,
        deleted,
    })
}

/// Statements in flight at once, per `apply` phase and per stats read.
const CONCURRENCY: usize = 64;

/// The read store on ScyllaDB (or any CQL cluster): one session whose requests run at
/// `LOCAL_QUORUM`, token-aware, with every [`Stmt`] prepared once and marked idempotent.
pub struct ScyllaReadStore {
    session: Arc<Session>,
    prepared: HashMap<Stmt, PreparedStatement>,
}

/// A session whose requests run at `LOCAL_QUORUM`, coordinated by the local data centre's
/// nodes, routed to a replica of the token, and failing after `request_timeout_ms`.
///
/// The local data centre is `views.local_datacenter`, or the cluster's only one. Without one,
/// `LOCAL_QUORUM` would count replicas in whichever data centre each coordinator happens to be.
async fn connect(uri: &ScyllaUri, settings: &ViewSettings) -> Result<Session, ViewError> {
    let profile = |datacenter: Option<String>| {
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = datacenter {
            policy = policy.prefer_datacenter(dc).permit_dc_failover(false);
        }
        ExecutionProfile::builder()
            .consistency(Consistency::LocalQuorum)
            .load_balancing_policy(policy.build())
            .request_timeout(Some(Duration::from_millis(settings.request_timeout_ms)))
            .build()
    };
    let mut handle = profile(settings.local_datacenter.clone()).into_handle();
    let session = SessionBuilder::new()
        .known_nodes(&uri.hosts)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(handle.clone())
        .build()
        .await
        .map_err(|e| {
            context(
                format_args!("cannot connect to the CQL nodes {:?}", uri.hosts),
                e,
            )
        })?;
    let datacenters = datacenters(&session);
    if datacenters.is_empty() {
        return Err(ViewError::transient(format!(
            "the CQL nodes {:?} have not reported their data centres yet",
            uri.hosts
        )));
    }
    match &settings.local_datacenter {
        Some(dc) if !datacenters.contains_key(dc) => Err(ViewError::permanent(format!(
            "views.local_datacenter is {dc:?}, but the cluster's data centres are {:?}",
            datacenters.keys().collect::<Vec<_>>()
        ))),
        Some(_) => Ok(session),
        None if datacenters.len() == 1 => {
            let only = datacenters.into_keys().next();
            handle.map_to_another_profile(profile(only));
            Ok(session)
        }
        None => Err(ViewError::permanent(format!(
            "the cluster has several data centres ({:?}): set views.local_datacenter \
             (CONVEYOR__VIEWS__LOCAL_DATACENTER) to the one this deployment runs in",
            datacenters.keys().collect::<Vec<_>>()
        ))),
    }
}

/// The cluster's data centres and how many nodes each has.
fn datacenters(session: &Session) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for node in session.get_cluster_state().get_nodes_info() {
        if let Some(dc) = &node.datacenter {
            *out.entry(dc.clone()).or_default() += 1;
        }
    }
    out
}

impl ScyllaReadStore {
    /// Connects, checks that `ops migrate` has brought the keyspace up to date, and prepares
    /// every statement.
    pub async fn connect(uri: &ScyllaUri, settings: &ViewSettings) -> Result<Self, ViewError> {
        let session = connect(uri, settings).await?;
        let applied = applied_migrations(&session, &uri.keyspace).await?;
        if let Some(missing) = MIGRATIONS
            .iter()
            .find(|m| !applied.iter().any(|(v, _)| *v == m.version as i32))
        {
            return Err(ViewError::permanent(format!(
                "keyspace {} lacks schema migration {}: run `conveyor ops migrate`",
                uri.keyspace, missing.name
            )));
        }
        session
            .use_keyspace(&uri.keyspace, false)
            .await
            .map_err(storage)?;
        Self::prepare(session).await
    }

    /// Prepares every statement on a session already in the keyspace.
    async fn prepare(session: Session) -> Result<Self, ViewError> {
        let mut prepared = HashMap::new();
        for stmt in Stmt::ALL {
            let mut p = session
                .prepare(Statement::new(stmt.cql()).with_page_size(stmt.page_size()))
                .await
                .map_err(|e| context(format_args!("cannot prepare {stmt:?}"), e))?;
            // Every statement sets absolute values at a fixed timestamp or reads, and a ledger
            // transaction is conditional on the `seq` it read: retrying one after a timeout
            // cannot change the outcome.
            p.set_is_idempotent(true);
            // A serial read completes any transaction in flight on the owner's partition, so
            // the `seq` a transaction starts from is the latest; the item reads after it, and
            // the transaction's commit, are at QUORUM, so they see and leave at least that
            // state in every data centre; anything committed later bumps `seq` and fails the
            // transaction's condition. SERIAL and QUORUM, not their LOCAL_ forms: projectors in
            // two data centres must not both win. In one data centre they are the same.
            match stmt {
                Stmt::LedgerMonths => p.set_consistency(Consistency::Serial),
                Stmt::LedgerItem => p.set_consistency(Consistency::Quorum),
                _ => {}
            }
            prepared.insert(stmt, p);
        }
        Ok(ScyllaReadStore {
            session: Arc::new(session),
            prepared,
        })
    }

    fn prepared(&self, stmt: Stmt) -> &PreparedStatement {
        &self.prepared[&stmt]
    }

    async fn write_all(&self, writes: Vec<Write>) -> Result<(), ViewError> {
        stream::iter(writes)
            .map(|w| async move {
                self.session
                    .execute_unpaged(self.prepared(w.stmt), w.values)
                    .await
                    .map(|_| ())
                    .map_err(|e| context(format_args!("{:?}", w.stmt), e))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    /// The first page of a single-partition read: one row or a handful.
    async fn rows(&self, stmt: Stmt, values: Vec<Option<CqlValue>>) -> Result<Vec<Row>, ViewError> {
        let (result, _) = self
            .session
            .execute_single_page(self.prepared(stmt), values, PagingState::start())
            .await
            .map_err(storage)?;
        result
            .into_rows_result()
            .map_err(storage)?
            .rows::<Row>()
            .map_err(storage)?
            .map(|r| r.map_err(storage))
            .collect()
    }

    async fn load(&self, id: Uuid) -> Result<MediaState, ViewError> {
        self.load_placed(id).await.map(|(state, _)| state)
    }

    /// An item's state and its timeline chunk, as `media_by_id` has them.
    async fn load_placed(&self, id: Uuid) -> Result<(MediaState, Option<i32>), ViewError> {
        let rows = self
            .rows(Stmt::SelectById, vec![Some(CqlValue::Uuid(id))])
            .await?;
        match rows.into_iter().next() {
            Some(row) => placed_from_row(row),
            None => Ok((MediaState::new(id), None)),
        }
    }

    /// The owner's months at or before `at_most`, newest first, as `(bucket, month)`.
    async fn months(
        &self,
        owner: &str,
        at_most: i32,
    ) -> Result<Vec<(i32, LedgerMonth)>, ViewError> {
        self.session
            .execute_iter(self.prepared(Stmt::SelectMonths).clone(), (owner, at_most))
            .await
            .map_err(storage)?
            .rows_stream::<MonthRow>()
            .map_err(storage)?
            .map(|r| r.map(LedgerMonth::from_row).map_err(storage))
            .try_collect()
            .await
    }

    /// Up to `want` rows of one month of the owner's timeline, newest first, strictly after
    /// `after` if given: the month's chunks with something live, merged, newest first by the
    /// newest item each ever held; the walk stops at a chunk whose newest item is older than
    /// the `want`-th row found so far. A chunk is read with `LIMIT want`, not its live count: an
    /// upload placed in it after the months were read would push its oldest row past that
    /// count, and the page's cursor past that row. A chunk has held at most [`CHUNK_ROWS`]
    /// items, so the read passes at most that many deleted rows.
    async fn month_rows(
        &self,
        owner: &str,
        bucket: i32,
        month: &LedgerMonth,
        after: Option<(i64, Uuid)>,
        want: usize,
    ) -> Result<Vec<MediaRow>, ViewError> {
        // `(chunk, newest created_at it ever held)` of the chunks with something live.
        let mut chunks: Vec<(i32, i64)> = month
            .chunk_live
            .iter()
            .filter(|(_, live)| **live > 0)
            .map(|(chunk, _)| {
                let newest = month.chunk_newest.get(chunk).copied().unwrap_or(i64::MAX);
                (*chunk, newest)
            })
            .collect();
        chunks.sort_by_key(|(chunk, newest)| std::cmp::Reverse((*newest, *chunk)));
        let mut found: Vec<MediaRow> = Vec::new();
        for (chunk, newest) in chunks {
            if found.len() >= want
                && found
                    .get(want - 1)
                    .is_some_and(|last| newest < last.created_at)
            {
                break;
            }
            let limit = Some(CqlValue::Int(want.min(i32::MAX as usize) as i32));
            let mut values = vec![
                text(owner),
                Some(CqlValue::Int(bucket)),
                Some(CqlValue::Int(chunk)),
            ];
            let stmt = match after {
                Some((created_at, id)) => {
                    values.push(Some(CqlValue::BigInt(created_at)));
                    values.push(Some(CqlValue::Uuid(id)));
                    Stmt::SelectTimelineAfter
                }
                None => Stmt::SelectTimeline,
            };
            values.push(limit);
            let mut rows = self
                .session
                .execute_iter(self.prepared(stmt).clone(), values)
                .await
                .map_err(storage)?
                .rows_stream::<Row>()
                .map_err(storage)?;
            while let Some(row) = rows.try_next().await.map_err(storage)? {
                // A row whose upload cells are gone (a write racing a delete) is not an item.
                if let Some(item) = state_from_row(row)?.to_row() {
                    found.push(item);
                }
            }
            found.sort_by_key(|m| std::cmp::Reverse((m.created_at, m.id)));
            found.truncate(want);
        }
        Ok(found)
    }

    /// Makes the owner ledger say what `entries` say, each owner's in its own transactions,
    /// and returns the timeline chunk of every entry's item that has one (every live one).
    ///
    /// Idempotent: an item already where its entry puts it is left alone, so a replayed
    /// batch changes nothing, and an item keeps the chunk it was first placed in. Errors:
    /// transient when a transaction keeps losing to others on the same owner
    /// ([`LEDGER_ATTEMPTS`]), or when the store fails.
    pub async fn settle(&self, entries: Vec<LedgerEntry>) -> Result<HashMap<Uuid, i32>, ViewError> {
        let mut by_owner: HashMap<String, Vec<LedgerEntry>> = HashMap::new();
        for entry in entries {
            by_owner.entry(entry.owner.clone()).or_default().push(entry);
        }
        let placed: Vec<HashMap<Uuid, i32>> = stream::iter(by_owner)
            .map(|(owner, mut entries)| async move {
                // Placed in time order, so a chunk's items are close in time and a timeline
                // page reads few chunks.
                entries.sort_by_key(|e| (e.created_at, e.id));
                let mut placed = HashMap::new();
                for chunk in entries.chunks(LEDGER_BATCH) {
                    placed.extend(self.settle_owner(&owner, chunk).await?);
                }
                Ok::<_, ViewError>(placed)
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(placed.into_iter().flatten().collect())
    }

    /// One owner's entries (at most [`LEDGER_BATCH`]) in one transaction: read the months
    /// serially and then the items, work out the changes, and write them in one conditional batch on
    /// the owner's partition, `IF seq = <the seq read>`. A batch that loses to another writer
    /// starts again from a fresh read. Returns the entries' chunks.
    async fn settle_owner(
        &self,
        owner: &str,
        entries: &[LedgerEntry],
    ) -> Result<HashMap<Uuid, i32>, ViewError> {
        let mut backoff = Duration::from_millis(2);
        for _ in 0..LEDGER_ATTEMPTS {
            let (seq, mut months) = self.ledger_months(owner).await?;
            let rows: Vec<Option<LedgerItem>> = futures::future::try_join_all(
                entries
                    .iter()
                    .map(|e| self.ledger_item(owner, e.bucket, e.id)),
            )
            .await?;
            let mut placed = HashMap::new();
            let mut writes: Vec<(&LedgerEntry, Option<i32>)> = Vec::new();
            let mut changed: BTreeMap<i32, (BTreeSet<i32>, BTreeSet<i32>)> = BTreeMap::new();
            for (entry, row) in entries.iter().zip(rows) {
                let month = months.entry(entry.bucket).or_default();
                let touched = changed.entry(entry.bucket).or_default();
                let chunk = row.as_ref().and_then(|r| r.chunk);
                if let Some(chunk) = chunk {
                    placed.insert(entry.id, chunk);
                }
                match (row, entry.standing) {
                    // A delete is final, and an upload's size never changes.
                    (Some(LedgerItem { gone: true, .. }), _)
                    | (Some(LedgerItem { gone: false, .. }), Standing::Live { .. }) => continue,
                    (Some(LedgerItem { bytes, .. }), Standing::Gone) => {
                        month.live -= 1;
                        month.bytes -= bytes as i64;
                        if let Some(chunk) = chunk {
                            *month.chunk_live.entry(chunk).or_default() -= 1;
                            touched.0.insert(chunk);
                        }
                    }
                    (None, Standing::Live { bytes }) => {
                        // Chunk n of a month takes its items n·CHUNK_ROWS .. (n+1)·CHUNK_ROWS:
                        // no chunk ever holds more than CHUNK_ROWS items, live or deleted.
                        let chunk = (month.placed / CHUNK_ROWS) as i32;
                        month.placed += 1;
                        month.live += 1;
                        month.bytes += bytes as i64;
                        *month.chunk_live.entry(chunk).or_default() += 1;
                        let newest = month.chunk_newest.entry(chunk).or_insert(i64::MIN);
                        *newest = (*newest).max(entry.created_at);
                        touched.0.insert(chunk);
                        touched.1.insert(chunk);
                        placed.insert(entry.id, chunk);
                        writes.push((entry, Some(chunk)));
                        continue;
                    }
                    // Deleted before it was counted: remember it, so a late upload is not.
                    (None, Standing::Gone) => {}
                }
                writes.push((entry, chunk));
            }
            if writes.is_empty() {
                return Ok(placed);
            }
            let next = seq.unwrap_or(0) + 1;
            let mut batch = Batch::new(BatchType::Logged);
            batch.set_consistency(Consistency::Quorum);
            batch.set_serial_consistency(Some(SerialConsistency::Serial));
            batch.set_is_idempotent(true);
            let mut values: Vec<Vec<Option<CqlValue>>> = Vec::new();
            batch.append_statement(self.prepared(Stmt::LedgerSeq).clone());
            values.push(vec![
                Some(CqlValue::BigInt(next)),
                text(owner),
                seq.map(CqlValue::BigInt),
            ]);
            // Every transaction writes a month row, so a partition with a `seq` always has
            // one, and the months' read always sees the `seq`.
            let int_map = |entries: Vec<(i32, i64)>| {
                Some(CqlValue::Map(
                    entries
                        .into_iter()
                        .map(|(k, v)| (CqlValue::Int(k), CqlValue::BigInt(v)))
                        .collect(),
                ))
            };
            for (bucket, (live_chunks, newest_chunks)) in changed {
                let month = &months[&bucket];
                let live = live_chunks
                    .iter()
                    .map(|c| (*c, month.chunk_live[c]))
                    .collect();
                let newest = newest_chunks
                    .iter()
                    .map(|c| (*c, month.chunk_newest[c]))
                    .collect();
                batch.append_statement(self.prepared(Stmt::LedgerMonth).clone());
                values.push(vec![
                    Some(CqlValue::BigInt(month.live)),
                    Some(CqlValue::BigInt(month.bytes)),
                    Some(CqlValue::BigInt(month.placed)),
                    int_map(live),
                    int_map(newest),
                    text(owner),
                    Some(CqlValue::Int(bucket)),
                    Some(CqlValue::Uuid(Uuid::nil())),
                ]);
            }
            for (entry, chunk) in writes {
                let (bytes, gone) = match entry.standing {
                    Standing::Live { bytes } => (Some(CqlValue::BigInt(bytes as i64)), false),
                    Standing::Gone => (None, true),
                };
                batch.append_statement(self.prepared(Stmt::LedgerItemSet).clone());
                values.push(vec![
                    bytes,
                    Some(CqlValue::Boolean(gone)),
                    chunk.map(CqlValue::Int),
                    text(owner),
                    Some(CqlValue::Int(entry.bucket)),
                    Some(CqlValue::Uuid(entry.id)),
                ]);
            }
            let result = self
                .session
                .batch(&batch, values)
                .await
                .map_err(|e| context("the owner ledger's transaction", e))?;
            if applied(result)? {
                return Ok(placed);
            }
            // Another projector changed this owner since the read: read again, after a
            // jittered pause so two losers do not collide again in step.
            let jitter = rand::random_range(0..=backoff.as_micros() as u64);
            tokio::time::sleep(Duration::from_micros(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        Err(ViewError::transient(format!(
            "the owner ledger of {owner:?} kept changing under {LEDGER_ATTEMPTS} transactions"
        )))
    }

    /// The ledger's `seq` (`None` for an owner never counted) and its months, read serially
    /// (`SERIAL`).
    async fn ledger_months(
        &self,
        owner: &str,
    ) -> Result<(Option<i64>, HashMap<i32, LedgerMonth>), ViewError> {
        let mut seq = None;
        let mut months = HashMap::new();
        let mut rows = self
            .session
            .execute_iter(self.prepared(Stmt::LedgerMonths).clone(), (owner,))
            .await
            .map_err(storage)?
            .rows_stream::<LedgerMonthRow>()
            .map_err(storage)?;
        while let Some((bucket, live, bytes, placed, chunk_live, chunk_newest, s)) =
            rows.try_next().await.map_err(storage)?
        {
            seq = seq.or(s);
            let row = (bucket, live, bytes, placed, chunk_live, chunk_newest);
            let (bucket, month) = LedgerMonth::from_row(row);
            months.insert(bucket, month);
        }
        Ok((seq, months))
    }

    /// Every live item in `media_by_id`, a full scan in pages of 1,000 (for the fill).
    async fn live_items(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<MediaState, ViewError>> + Unpin, ViewError> {
        let scan = Statement::new(format!(
            "SELECT {ITEM_COLUMNS}, deleted_v, chunk FROM media_by_id"
        ))
        .with_page_size(1_000);
        let rows = self
            .session
            .query_iter(scan, ())
            .await
            .map_err(storage)?
            .rows_stream::<Row>()
            .map_err(storage)?;
        Ok(rows
            .map(|row| placed_from_row(row.map_err(storage)?).map(|(state, _)| state))
            .try_filter(|s| futures::future::ready(s.upload.is_some() && s.deleted.is_none())))
    }

    /// One item's ledger row; `None` if it has none.
    async fn ledger_item(
        &self,
        owner: &str,
        bucket: i32,
        id: Uuid,
    ) -> Result<Option<LedgerItem>, ViewError> {
        let rows = self
            .rows(
                Stmt::LedgerItem,
                vec![
                    text(owner),
                    Some(CqlValue::Int(bucket)),
                    Some(CqlValue::Uuid(id)),
                ],
            )
            .await?;
        Ok(rows.into_iter().next().map(|row| {
            let mut cols = row.columns.into_iter();
            let bytes = cols.next().flatten();
            let gone = cols.next().flatten();
            let chunk = cols.next().flatten();
            LedgerItem {
                bytes: match bytes {
                    Some(CqlValue::BigInt(b)) => b.max(0) as u64,
                    _ => 0,
                },
                gone: matches!(gone, Some(CqlValue::Boolean(true))),
                chunk: match chunk {
                    Some(CqlValue::Int(c)) => Some(c),
                    _ => None,
                },
            }
        }))
    }
}

/// One item's row in the ledger (kind 1).
#[derive(Debug, Clone, Copy)]
struct LedgerItem {
    /// Its size in bytes, counted in its month while it is live.
    bytes: u64,
    /// Deleted: uncounted, for good.
    gone: bool,
    /// Its timeline chunk; `None` for an item deleted before it was placed.
    chunk: Option<i32>,
}

/// One month of an owner's ledger (kind 0): what a page walks, the stats sum, and a
/// transaction reads and rewrites.
#[derive(Debug, Clone, Default)]
struct LedgerMonth {
    /// Live items uploaded in the month.
    live: i64,
    /// Their bytes.
    bytes: i64,
    /// Items ever placed in the month's timeline: the next goes in chunk `placed / CHUNK_ROWS`.
    placed: i64,
    /// Live items per chunk.
    chunk_live: HashMap<i32, i64>,
    /// The newest `created_at` ever placed in each chunk.
    chunk_newest: HashMap<i32, i64>,
}

/// A month row as [`Stmt::SelectMonths`] reads it (and [`Stmt::LedgerMonths`] before `seq`).
type MonthRow = (
    i32,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<HashMap<i32, i64>>,
    Option<HashMap<i32, i64>>,
);

/// A month row as [`Stmt::LedgerMonths`] reads it: a [`MonthRow`], then the partition's `seq`.
type LedgerMonthRow = (
    i32,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<HashMap<i32, i64>>,
    Option<HashMap<i32, i64>>,
    Option<i64>,
);

impl LedgerMonth {
    fn from_row((bucket, live, bytes, placed, chunk_live, chunk_newest): MonthRow) -> (i32, Self) {
        let month = LedgerMonth {
            live: live.unwrap_or(0),
            bytes: bytes.unwrap_or(0),
            placed: placed.unwrap_or(0),
            chunk_live: chunk_live.unwrap_or_default(),
            chunk_newest: chunk_newest.unwrap_or_default(),
        };
        (bucket, month)
    }
}

/// Items a timeline chunk receives in its life, so the most deleted rows a read of one chunk
/// can pass: Cassandra's `tombstone_warn_threshold` (1,000 by default). (The rows it returns
/// add their null cells, such as an upload without a title: at most one page's worth.)
pub const CHUNK_ROWS: i64 = 1_000;

/// Items in one ledger transaction at most. A conditional batch is one mutation of one
/// partition; Cassandra warns at 5 KiB of batch and refuses 50 KiB
/// (`batch_size_warn_threshold`, `batch_size_fail_threshold`), and an item's statement is
/// about 60 bytes.
const LEDGER_BATCH: usize = 50;

/// Transactions one owner's entries may lose to other writers before `settle` gives up with a
/// transient error (the projector then retries the whole batch).
const LEDGER_ATTEMPTS: u32 = 30;

/// Whether a conditional statement or batch was applied: its result's `[applied]` column.
fn applied(result: scylla::response::query_result::QueryResult) -> Result<bool, ViewError> {
    let rows = result.into_rows_result().map_err(storage)?;
    let first = rows
        .rows::<Row>()
        .map_err(storage)?
        .next()
        .transpose()
        .map_err(storage)?;
    Ok(matches!(
        first.and_then(|r| r.columns.into_iter().next().flatten()),
        Some(CqlValue::Boolean(true))
    ))
}

#[async_trait]
impl ReadStore for ScyllaReadStore {
    async fn apply(&self, events: &[Envelope]) -> Result<(), ViewError> {
        super::validate(events)?;
        let mut touched: HashMap<Uuid, Touched> = HashMap::new();
        for event in events {
            touched
                .entry(event.aggregate_id)
                .or_default()
                .add(&event.payload);
        }
        let loaded: Vec<(Uuid, (MediaState, Option<i32>))> = stream::iter(touched.keys().copied())
            .map(|id| async move { self.load_placed(id).await.map(|s| (id, s)) })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        let mut states = HashMap::with_capacity(loaded.len());
        let mut chunks = HashMap::new();
        for (id, (state, chunk)) in loaded {
            states.insert(id, state);
            if let Some(chunk) = chunk {
                chunks.insert(id, chunk);
            }
        }
        for event in events {
            if let Some(state) = states.get_mut(&event.aggregate_id) {
                state.apply(event);
            }
        }
        // Counted before its timeline row appears (so a chunk holding a live row is never
        // skipped as empty), uncounted after it is gone.
        let (live, gone): (Vec<_>, Vec<_>) = states
            .values()
            .filter_map(|state| ledger_entry(state, touched[&state.id]))
            .partition(|e| matches!(e.standing, Standing::Live { .. }));
        chunks.extend(self.settle(live).await?);
        // An item `media_by_id` has no chunk for (its by-id write did not happen yet, or it
        // predates the ledger) has it in the ledger, if it was ever placed.
        let unplaced: Vec<(String, i32, Uuid)> = states
            .values()
            .filter(|s| !chunks.contains_key(&s.id))
            .filter_map(|s| {
                let u = s.upload.as_ref()?;
                Some((u.owner.clone(), bucket_of(u.version as i64), s.id))
            })
            .collect();
        let found: Vec<(Uuid, Option<LedgerItem>)> = stream::iter(unplaced)
            .map(|(owner, bucket, id)| async move {
                self.ledger_item(&owner, bucket, id).await.map(|r| (id, r))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        chunks.extend(
            found
                .into_iter()
                .filter_map(|(id, r)| Some((id, r?.chunk?))),
        );
        let mut plan = Plan::default();
        for (id, state) in &states {
            plan_item(state, touched[id], chunks.get(id).copied(), &mut plan);
        }
        self.write_all(plan.owner_side).await?;
        // A deleted item another writer placed since the lookups above (a projector that lost
        // its partition, still applying the upload) has its chunk now: delete that row too, at
        // the same timestamp at or above every version, which shadows the late insert
        // whichever lands first.
        let mut late = Plan::default();
        for (id, chunk) in self.settle(gone).await? {
            if let Some(state) = states.get(&id).filter(|_| !chunks.contains_key(&id)) {
                plan_item(state, Touched::default(), Some(chunk), &mut late);
            }
        }
        self.write_all(late.owner_side).await?;
        self.write_all(plan.by_id).await
    }

    async fn media(&self, id: Uuid) -> Result<Option<MediaRow>, ViewError> {
        Ok(self.load(id).await?.to_row())
    }

    async fn is_deleted(&self, id: Uuid) -> Result<bool, ViewError> {
        Ok(self.load(id).await?.deleted.is_some())
    }

    async fn owner_timeline(
        &self,
        owner: &str,
        after: Option<(i64, Uuid)>,
        limit: usize,
    ) -> Result<TimelinePage, ViewError> {
        let start = after.map_or(i32::MAX, |(created_at, _)| bucket_of(created_at));
        let mut items: Vec<MediaRow> = Vec::with_capacity(limit + 1);
        for (bucket, month) in self.months(owner, start).await? {
            // A month with nothing live is skipped unread, whatever it once held.
            if month.live <= 0 {
                continue;
            }
            let after = after.filter(|_| bucket == start);
            let want = limit + 1 - items.len();
            items.extend(self.month_rows(owner, bucket, &month, after, want).await?);
            if items.len() > limit {
                break;
            }
        }
        Ok(super::page_of(items, limit))
    }

    async fn owner_stats(&self, owner: &str) -> Result<OwnerStats, ViewError> {
        // One row per month the owner has uploaded in, none of them ever deleted.
        let (count, bytes) = self
            .months(owner, i32::MAX)
            .await?
            .iter()
            .fold((0i64, 0i64), |(c, b), (_, m)| (c + m.live, b + m.bytes));
        Ok(OwnerStats {
            media_count: count.max(0) as u64,
            bytes: bytes.max(0) as u64,
        })
    }

    async fn ping(&self) -> Result<(), ViewError> {
        self.rows(Stmt::Ping, vec![text("local")]).await.map(|_| ())
    }
}

/// What `migrate` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// The migrations this call applied, by name, in order.
    pub applied: Vec<&'static str>,
    /// The migrations found applied already, with the same text, by name.
    pub already: Vec<&'static str>,
}

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    scope text, version int, name text, sha256 text,
    PRIMARY KEY (scope, version))";

/// The migrations recorded in `keyspace`, as `(version, sha256)`; none if it does not exist.
async fn applied_migrations(
    session: &Session,
    keyspace: &str,
) -> Result<Vec<(i32, String)>, ViewError> {
    let exists = session
        .query_iter(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, "schema_migrations"),
        )
        .await
        .map_err(storage)?
        .rows_stream::<(String,)>()
        .map_err(storage)?
        .try_next()
        .await
        .map_err(storage)?
        .is_some();
    if !exists {
        return Ok(Vec::new());
    }
    session
        .query_iter(
            format!("SELECT version, sha256 FROM {keyspace}.schema_migrations WHERE scope = ?"),
            ("conveyor",),
        )
        .await
        .map_err(storage)?
        .rows_stream::<(i32, String)>()
        .map_err(storage)?
        .map(|r| r.map_err(storage))
        .try_collect()
        .await
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Whether `keyspace.table` has `column`, from the node's schema tables.
async fn column_exists(
    session: &Session,
    keyspace: &str,
    table: &str,
    column: &str,
) -> Result<bool, ViewError> {
    let rows = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns \
             WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (keyspace, table, column),
        )
        .await
        .map_err(storage)?
        .into_rows_result()
        .map_err(storage)?
        .rows_num();
    Ok(rows > 0)
}

/// Attempts at one schema change before `ops migrate` gives up.
const DDL_ATTEMPTS: u32 = 5;

/// Creates the keyspace if needed and applies every migration not yet applied, in order.
/// Idempotent; refuses to go on if an applied file has changed since.
pub async fn migrate(uri: &ScyllaUri, settings: &ViewSettings) -> Result<MigrateReport, ViewError> {
    let session = connect(uri, settings).await?;
    let ks = &uri.keyspace;
    // Every data centre gets `replication_factor` replicas, so a deployment in any of them can
    // read and write at LOCAL_QUORUM. An RF above a data centre's node count is accepted by the
    // node with a warning, and then every LOCAL_QUORUM request there fails as unavailable:
    // refuse it before creating anything.
    let rf = settings.replication_factor as usize;
    if rf == 0 {
        return Err(ViewError::permanent(
            "views.replication_factor is 0: a keyspace needs at least one replica",
        ));
    }
    let datacenters = datacenters(&session);
    for (dc, &nodes) in &datacenters {
        if rf > nodes {
            return Err(ViewError::permanent(format!(
                "views.replication_factor is {rf}, more than the {nodes} node(s) of data centre \
                 {dc:?}: set CONVEYOR__VIEWS__REPLICATION_FACTOR to {nodes} or fewer, or add nodes"
            )));
        }
    }
    let replication: Vec<String> = datacenters
        .keys()
        .map(|dc| format!("'{dc}': {rf}"))
        .collect();
    let ddl_timeout = Duration::from_millis(settings.ddl_timeout_ms);
    let ddl = |cql: String| {
        let session = &session;
        async move {
            let mut statement = Statement::new(cql.as_str());
            statement.set_request_timeout(Some(ddl_timeout));
            statement.set_is_idempotent(true);
            // Schema changes are idempotent (`IF NOT EXISTS`), so a timed-out or unavailable
            // one is sent again, up to DDL_ATTEMPTS times.
            let mut delay = Duration::from_millis(200);
            for attempt in 1..=DDL_ATTEMPTS {
                let result = match session.query_unpaged(statement.clone(), ()).await {
                    Ok(_) => tokio::time::timeout(ddl_timeout, session.await_schema_agreement())
                        .await
                        .map_err(|_| ViewError::transient("schema agreement timed out"))
                        .and_then(|agreed| agreed.map(|_| ()).map_err(storage)),
                    Err(e) => Err(context(&cql, e)),
                };
                match result {
                    Err(e) if e.is_transient() && attempt < DDL_ATTEMPTS => {
                        tracing::warn!(error = %e, attempt, "schema change failed, retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    other => return other,
                }
            }
            unreachable!("the last attempt returns")
        }
    };
    ddl(format!(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', {}}}",
        replication.join(", ")
    ))
    .await?;
    session.use_keyspace(ks, false).await.map_err(storage)?;
    ddl(MIGRATIONS_TABLE.to_owned()).await?;
    let applied = applied_migrations(&session, ks).await?;
    let mut report = MigrateReport::default();
    for m in MIGRATIONS {
        let hash = sha256_hex(m.text);
        match applied.iter().find(|(v, _)| *v == m.version as i32) {
            Some((_, recorded)) if *recorded == hash => {
                report.already.push(m.name);
                continue;
            }
            Some(_) => {
                return Err(ViewError::permanent(format!(
                    "migration {} was changed after it was applied to {ks}; \
                     a released migration is never edited: add a new file instead",
                    m.name
                )));
            }
            None => {}
        }
        for statement in m.statements() {
            // `ALTER TABLE … ADD` is not idempotent in CQL: skip it when the column is there
            // (a migration that failed half way, or a retried timeout, already added it).
            let Some(add) = conveyor_schemas::cql::AddColumn::parse(&statement) else {
                ddl(statement).await?;
                continue;
            };
            if column_exists(&session, ks, &add.table, &add.column).await? {
                continue;
            }
            // A retry of an ADD that landed before its answer was lost is refused as
            // "already exists": the column being there is the success it was after.
            if let Err(e) = ddl(statement).await
                && !column_exists(&session, ks, &add.table, &add.column).await?
            {
                return Err(e);
            }
        }
        if m.name == "0003_owner_ledger" {
            let counted = fill_ledger(uri, settings).await?;
            tracing::info!(counted, "filled the owner ledger from media_by_id");
        }
        session
            .query_unpaged(
                "INSERT INTO schema_migrations (scope, version, name, sha256) VALUES (?, ?, ?, ?)",
                ("conveyor", m.version as i32, m.name, hash),
            )
            .await
            .map_err(storage)?;
        report.applied.push(m.name);
    }
    Ok(report)
}

/// Items per fill step: how many `media_by_id` rows are read before their timeline rows are
/// written.
const FILL_STEP: usize = 2_000;

/// Fills the owner ledger and the timeline (migration 0003) from `media_by_id`, in two scans:
/// 1. every live item is counted in its owner's month and placed in a chunk, each owner's in
///    upload order (so an old month's chunks are in time order, as new ones are, and a page
///    reads one or two), which holds about 100 bytes per live item in memory;
/// 2. every live item's timeline row is written with every group it has, and its chunk in
///    `media_by_id`.
///
/// The same transactions and writes as the projector's, so filling twice, or beside another
/// `ops migrate`, places each item once. Returns the live items seen.
async fn fill_ledger(uri: &ScyllaUri, settings: &ViewSettings) -> Result<u64, ViewError> {
    let session = connect(uri, settings).await?;
    session
        .use_keyspace(&uri.keyspace, false)
        .await
        .map_err(storage)?;
    let store = ScyllaReadStore::prepare(session).await?;
    // Everything but the delete: a deleted item's columns were erased with its tombstone.
    let all = Touched {
        upload: true,
        describe: true,
        process: true,
        delete: false,
    };
    let mut entries = Vec::new();
    let mut items = store.live_items().await?;
    while let Some(state) = items.try_next().await? {
        entries.extend(ledger_entry(&state, all));
    }
    let seen = entries.len() as u64;
    tracing::info!(seen, "placing the live items in the owner ledger");
    let chunks = store.settle(entries).await?;
    let (mut step, mut written) = (Vec::with_capacity(FILL_STEP), 0u64);
    let mut items = store.live_items().await?;
    loop {
        let state = items.try_next().await?;
        let done = state.is_none();
        step.extend(state);
        if step.len() >= FILL_STEP || (done && !step.is_empty()) {
            let mut plan = Plan::default();
            for state in step.drain(..) {
                plan_item(&state, all, chunks.get(&state.id).copied(), &mut plan);
                written += 1;
            }
            store.write_all(plan.owner_side).await?;
            store.write_all(plan.by_id).await?;
            tracing::info!(written, seen, "writing the timeline");
        }
        if done {
            return Ok(seen);
        }
    }
}

/// Drops a keyspace: for tests, which each migrate a fresh one.
pub async fn drop_keyspace(uri: &ScyllaUri, settings: &ViewSettings) -> Result<(), ViewError> {
    let session = connect(uri, settings).await?;
    // Dropping a keyspace snapshots and removes its SSTables: a schema change's timeout, not a
    // request's.
    let mut drop = Statement::new(format!("DROP KEYSPACE IF EXISTS {}", uri.keyspace));
    drop.set_request_timeout(Some(Duration::from_millis(settings.ddl_timeout_ms)));
    session.query_unpaged(drop, ()).await.map_err(storage)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_schemas::cql::TableDef;
    use conveyor_schemas::{MediaDeleted, MediaDescribed, MediaProcessingFailed, MediaUploaded};

    const JAN_31: u64 = 1_769_903_940_000_000;
    /// The timeline chunk the plan tests place items in.
    const CHUNK: i32 = 3;

    fn tables() -> Vec<TableDef> {
        conveyor_schemas::cql::final_tables().unwrap()
    }

    /// The words of a statement that name columns: everything that is not a keyword, a
    /// marker, a literal or the table.
    fn identifiers(cql: &str) -> Vec<String> {
        const KEYWORDS: &[&str] = &[
            "SELECT",
            "FROM",
            "WHERE",
            "AND",
            "UPDATE",
            "SET",
            "USING",
            "TIMESTAMP",
            "INSERT",
            "INTO",
            "VALUES",
            "DELETE",
            "null",
            "LIMIT",
            "IF",
        ];
        cql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '*'))
            .filter(|w| !w.is_empty() && !KEYWORDS.contains(w) && *w != "*")
            .filter(|w| !w.contains('.'))
            .filter(|w| !w.chars().all(|c| c.is_ascii_digit()))
            .map(str::to_owned)
            .collect()
    }

    fn table_of(cql: &str) -> String {
        let words: Vec<&str> = cql.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| matches!(*w, "FROM" | "INTO" | "UPDATE"))
            .unwrap();
        words[at + 1].to_owned()
    }

    #[test]
    fn every_statement_names_real_columns_and_binds_the_whole_partition_key() {
        let tables = tables();
        for stmt in Stmt::ALL {
            let cql = stmt.cql();
            let table = table_of(&cql);
            if table.starts_with("system.") {
                continue;
            }
            let def = tables
                .iter()
                .find(|t| t.name == table)
                .unwrap_or_else(|| panic!("{stmt:?}: no table {table}"));
            for word in identifiers(&cql) {
                if word == table {
                    continue;
                }
                assert!(
                    def.has_column(&word),
                    "{stmt:?}: {table} has no column {word}"
                );
            }
            // Token-aware routing needs every partition-key column bound, in the WHERE clause
            // or the VALUES list.
            for key in &def.partition_key {
                let bound = cql.contains(&format!("{key} = ?"))
                    || (cql.starts_with("INSERT") && cql.contains(&format!("{key},")));
                assert!(bound, "{stmt:?} must bind partition key {key}");
            }
            assert!(
                cql.starts_with("SELECT") || cql.contains("USING TIMESTAMP ?") || stmt.is_ledger(),
                "{stmt:?}: every write outside the ledger's transactions is versioned"
            );
            assert!(!cql.contains("ALLOW FILTERING"), "{stmt:?}");
        }
    }

    fn ev(id: Uuid, version: u64, payload: Event) -> Envelope {
        Envelope::new(id, version, "test", payload)
    }

    fn uploaded() -> Event {
        Event::MediaUploaded(MediaUploaded {
            owner: "alice".into(),
            original_key: "originals/ab".into(),
            sha256: "ab".into(),
            bytes: 42,
            content_type: "image/png".into(),
            title: None,
        })
    }

    fn fold(events: &[Envelope]) -> (MediaState, Touched) {
        let mut state = MediaState::new(events[0].aggregate_id);
        let mut touched = Touched::default();
        for e in events {
            state.apply(e);
            touched.add(&e.payload);
        }
        (state, touched)
    }

    fn plan_of(state: &MediaState, touched: Touched) -> Plan {
        let mut plan = Plan::default();
        plan_item(state, touched, Some(CHUNK), &mut plan);
        for w in plan.owner_side.iter().chain(&plan.by_id) {
            assert_eq!(
                w.stmt.cql().matches('?').count(),
                w.values.len(),
                "{:?} binds one value per marker",
                w.stmt
            );
        }
        plan
    }

    /// A batch that carried only an upload.
    const ONLY_UPLOAD: Touched = Touched {
        upload: true,
        describe: false,
        process: false,
        delete: false,
    };

    fn stmts(writes: &[Write]) -> Vec<Stmt> {
        writes.iter().map(|w| w.stmt).collect()
    }

    #[test]
    fn an_upload_writes_its_group_everywhere_at_its_version() {
        let id = Uuid::now_v7();
        let (state, touched) = fold(&[ev(id, JAN_31, uploaded())]);
        let plan = plan_of(&state, touched);
        assert_eq!(stmts(&plan.owner_side), [Stmt::UploadByOwner]);
        assert_eq!(
            ledger_entry(&state, touched),
            Some(LedgerEntry {
                owner: "alice".into(),
                bucket: 202601,
                created_at: JAN_31 as i64,
                id,
                standing: Standing::Live { bytes: 42 }
            }),
            "counted in its month"
        );
        let v = Some(CqlValue::BigInt(JAN_31 as i64));
        let jan = Some(CqlValue::Int(202601));
        let alice = text("alice");
        let uuid = Some(CqlValue::Uuid(id));
        assert_eq!(
            plan.owner_side[0].values,
            [
                alice.clone(),
                jan,
                Some(CqlValue::Int(CHUNK)),
                v.clone(),
                uuid.clone(),
                v.clone(),
                text("image/png"),
                big(42),
                text("ab"),
                text("originals/ab"),
                None,
                Some(CqlValue::Boolean(false)),
                v.clone(),
            ]
        );
        assert_eq!(
            plan.by_id,
            [Write {
                stmt: Stmt::UploadById,
                values: vec![
                    v.clone(),
                    v,
                    alice,
                    text("image/png"),
                    big(42),
                    text("ab"),
                    text("originals/ab"),
                    None,
                    Some(CqlValue::Boolean(false)),
                    Some(CqlValue::Int(CHUNK)),
                    uuid,
                ],
            }],
            "the chunk goes with the upload group, so later events find the row"
        );
    }

    /// The tombstone erases every group, so it must name every column but the key and
    /// `deleted_v`, including those later migrations add.
    #[test]
    fn the_tombstone_erases_every_column_of_media_by_id() {
        let tables = tables();
        let by_id = tables.iter().find(|t| t.name == "media_by_id").unwrap();
        let cql = Stmt::TombstoneById.cql();
        for (column, _) in &by_id.columns {
            if column == "id" || column == "deleted_v" {
                continue;
            }
            assert!(
                cql.contains(&format!(" {column} = null")),
                "the tombstone leaves {column}: {cql}"
            );
        }
    }

    #[test]
    fn a_description_writes_only_its_own_columns() {
        let id = Uuid::now_v7();
        let describe = ev(
            id,
            JAN_31 + 5,
            Event::MediaDescribed(MediaDescribed {
                title: Some("t".into()),
                description: None,
                tags: vec!["x".into()],
            }),
        );
        // Before its upload: only media_by_id, since the timeline row's key is not known yet.
        let (state, touched) = fold(std::slice::from_ref(&describe));
        let plan = plan_of(&state, touched);
        assert!(plan.owner_side.is_empty());
        let v = big(JAN_31 + 5);
        // One cell for the group, never a null (migration 0002).
        let group = vec![
            v.clone(),
            v.clone(),
            // With the event ids of the descriptions applied (a re-appended one is known).
            text(&format!(
                r#"{{"v":{},"title":"t","description":null,"tags":["x"],"a":["{}"]}}"#,
                JAN_31 + 5,
                describe.event_id
            )),
        ];
        let mut by_id = group.clone();
        by_id.push(Some(CqlValue::Uuid(id)));
        assert_eq!(
            plan.by_id,
            [Write {
                stmt: Stmt::DescribeById,
                values: by_id
            }]
        );
        // After it: the timeline row too, keyed by the upload; no upload columns anywhere.
        let mut state = state;
        state.apply(&ev(id, JAN_31, uploaded()));
        let plan = plan_of(
            &state,
            Touched {
                describe: true,
                ..Touched::default()
            },
        );
        assert_eq!(stmts(&plan.owner_side), [Stmt::DescribeByOwner]);
        let mut by_owner = group;
        by_owner.extend([
            text("alice"),
            Some(CqlValue::Int(202601)),
            Some(CqlValue::Int(CHUNK)),
            big(JAN_31),
            Some(CqlValue::Uuid(id)),
        ]);
        assert_eq!(plan.owner_side[0].values, by_owner);
        assert_eq!(stmts(&plan.by_id), [Stmt::DescribeById]);
    }

    #[test]
    fn an_upload_after_other_groups_carries_them_into_the_timeline() {
        let id = Uuid::now_v7();
        let up = ev(id, JAN_31, uploaded());
        let failed = up.derive(
            "test",
            0,
            Event::MediaProcessingFailed(MediaProcessingFailed {
                reason: "bad".into(),
            }),
        );
        let (state, _) = fold(&[failed, up]);
        let plan = plan_of(&state, ONLY_UPLOAD);
        assert_eq!(
            stmts(&plan.owner_side),
            [Stmt::UploadByOwner, Stmt::ProcessByOwner]
        );
        assert_eq!(
            &plan.owner_side[1].values[..4],
            [
                big(JAN_31 + 1),
                big(JAN_31 + 1),
                text(r#"{"failed":"bad"}"#),
                text("alice")
            ],
            "the outcome is one cell, then the row key"
        );
        assert_eq!(
            stmts(&plan.by_id),
            [Stmt::UploadById],
            "only what the batch carried"
        );
    }

    #[test]
    fn a_delete_removes_the_timeline_row_and_uncounts_the_item_before_the_tombstone() {
        let id = Uuid::now_v7();
        let dv = JAN_31 + 1_000;
        let (state, touched) = fold(&[
            ev(id, JAN_31, uploaded()),
            ev(
                id,
                dv,
                Event::MediaDeleted(MediaDeleted {
                    deleted_by: "alice".into(),
                }),
            ),
        ]);
        let plan = plan_of(&state, touched);
        let key = [
            text("alice"),
            Some(CqlValue::Int(202601)),
            Some(CqlValue::Int(CHUNK)),
        ];
        let uuid = Some(CqlValue::Uuid(id));
        assert_eq!(
            plan.owner_side,
            [Write {
                stmt: Stmt::DeleteByOwner,
                values: vec![
                    big(dv),
                    key[0].clone(),
                    key[1].clone(),
                    key[2].clone(),
                    big(JAN_31),
                    uuid.clone()
                ],
            },]
        );
        let gone = LedgerEntry {
            owner: "alice".into(),
            bucket: 202601,
            created_at: JAN_31 as i64,
            id,
            standing: Standing::Gone,
        };
        assert_eq!(ledger_entry(&state, touched), Some(gone.clone()));
        assert_eq!(
            plan.by_id,
            [Write {
                stmt: Stmt::TombstoneById,
                values: vec![big(dv), big(dv), uuid]
            }]
        );
        // A late upload for a deleted item writes no live data, only the removal again.
        let (mut late, _) = fold(&[ev(
            id,
            dv,
            Event::MediaDeleted(MediaDeleted {
                deleted_by: "alice".into(),
            }),
        )]);
        late.apply(&ev(id, JAN_31, uploaded()));
        let plan = plan_of(&late, ONLY_UPLOAD);
        assert_eq!(stmts(&plan.owner_side), [Stmt::DeleteByOwner]);
        assert_eq!(
            ledger_entry(&late, ONLY_UPLOAD),
            Some(gone),
            "never counted"
        );
        assert!(plan.by_id.is_empty());
    }

    #[test]
    fn buckets_are_utc_months() {
        assert_eq!(bucket_of(JAN_31 as i64), 202601);
        assert_eq!(bucket_of(JAN_31 as i64 + 60_000_001), 202602);
        assert_eq!(bucket_of(0), 197001);
    }

    /// The conformance suite, on a real node. Each run migrates a fresh keyspace and drops it.
    #[tokio::test]
    async fn conformance_on_a_real_node() {
        let Some(base) = crate::testing::engine(crate::testing::CQL, "the CQL conformance suite")
        else {
            return;
        };
        let uri: ScyllaUri = format!("{base}_{}", &Uuid::now_v7().simple().to_string()[20..])
            .parse()
            .unwrap();
        let settings = ViewSettings {
            replication_factor: 1,
            ..ViewSettings::default()
        };
        let first = migrate(&uri, &settings).await.expect("migrate");
        assert_eq!(first.applied.len(), MIGRATIONS.len());
        let again = migrate(&uri, &settings).await.expect("migrate again");
        assert_eq!(
            (again.applied.len(), again.already.len()),
            (0, MIGRATIONS.len())
        );
        let store = ScyllaReadStore::connect(&uri, &settings)
            .await
            .expect("connect");
        super::super::conformance::run(&store).await;
        drop_keyspace(&uri, &settings).await.expect("drop keyspace");
    }
}

#[cfg(test)]
mod migrations_on_a_real_node {
    use super::*;

    fn keyspace_uri(base: &str) -> ScyllaUri {
        format!("{base}_{}", &Uuid::now_v7().simple().to_string()[20..])
            .parse()
            .unwrap()
    }

    /// A fresh keyspace on the test node, migrated, at replication factor 1; `None` when no
    /// node is named (which fails the test under CI).
    async fn migrated() -> Option<(ScyllaUri, ViewSettings)> {
        let base = crate::testing::engine(crate::testing::CQL, "the CQL migration tests")?;
        let uri = keyspace_uri(&base);
        let settings = ViewSettings {
            replication_factor: 1,
            ..ViewSettings::default()
        };
        migrate(&uri, &settings).await.expect("migrate");
        Some((uri, settings))
    }

    /// A replication factor above the data centre's node count is refused before anything is
    /// created, naming both numbers; a data centre that does not exist is refused by name.
    #[tokio::test]
    async fn migrate_refuses_more_replicas_than_nodes_and_creates_nothing() {
        let Some(base) = crate::testing::engine(crate::testing::CQL, "the CQL migration tests")
        else {
            return;
        };
        let uri = keyspace_uri(&base);
        let three = ViewSettings {
            replication_factor: 3,
            ..ViewSettings::default()
        };
        let error = migrate(&uri, &three).await.expect_err("RF 3 on one node");
        let message = error.to_string();
        assert_eq!(error.kind(), ErrorKind::Permanent, "{message}");
        assert!(
            message.contains("replication_factor is 3") && message.contains("the 1 node(s)"),
            "{message}"
        );
        let parsed = uri.clone();
        let session = connect(&parsed, &ViewSettings::default()).await.unwrap();
        let found = session
            .query_unpaged(
                "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
                (parsed.keyspace.as_str(),),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .rows_num();
        assert_eq!(found, 0, "nothing was created");

        let elsewhere = ViewSettings {
            replication_factor: 1,
            local_datacenter: Some("no-such-dc".into()),
            ..ViewSettings::default()
        };
        let error = migrate(&uri, &elsewhere)
            .await
            .expect_err("unknown data centre");
        assert!(error.to_string().contains("no-such-dc"), "{error}");
    }

    /// A migration that added its columns but was not recorded (the process died in between,
    /// or the record's write timed out) runs again without failing on the columns it added.
    #[tokio::test]
    async fn a_half_applied_column_migration_runs_again() {
        let Some((uri, settings)) = migrated().await else {
            return;
        };
        let parsed = uri.clone();
        let session = connect(&parsed, &settings).await.unwrap();
        let last = MIGRATIONS.last().unwrap();
        session
            .query_unpaged(
                format!(
                    "DELETE FROM {}.schema_migrations WHERE scope = 'conveyor' AND version = ?",
                    parsed.keyspace
                ),
                (last.version as i32,),
            )
            .await
            .unwrap();
        let again = migrate(&uri, &settings).await.expect("migrate again");
        assert_eq!(again.applied, [last.name]);
        ScyllaReadStore::connect(&uri, &settings).await.unwrap();
        drop_keyspace(&uri, &settings).await.unwrap();
    }

    /// A keyspace written by the release before the ledger (`media_by_id` only, as it wrote
    /// it) gets its ledger and timeline from `ops migrate`: stats and pages are the live items,
    /// newest first, and a later delete finds the item's row.
    #[tokio::test]
    async fn migrate_fills_the_ledger_and_the_timeline_from_media_by_id() {
        let Some((uri, settings)) = migrated().await else {
            return;
        };
        let session = connect(&uri, &settings).await.unwrap();
        session.use_keyspace(&uri.keyspace, false).await.unwrap();
        // Back to version 2: no ledger, no timeline, no chunk column.
        for cql in [
            "DROP TABLE owner_ledger",
            "DROP TABLE timeline",
            "ALTER TABLE media_by_id DROP chunk",
            "DELETE FROM schema_migrations WHERE scope = 'conveyor' AND version = 3",
        ] {
            session.query_unpaged(cql, ()).await.unwrap();
            session.await_schema_agreement().await.unwrap();
        }
        // What version 2 wrote: three live items of one owner, one deleted (its tombstone
        // erased every column but `deleted_v`), and one of another owner.
        const FEB: i64 = 1_769_990_400_000_000;
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let owners = ["dana", "dana", "dana", "dana", "eve"];
        for (i, (id, owner)) in ids.iter().zip(owners).enumerate() {
            let v = FEB + i as i64 * 1_000;
            session
                .query_unpaged(
                    "INSERT INTO media_by_id (id, upload_v, owner, content_type, bytes, sha256, \
                     original_key, private) VALUES (?, ?, ?, 'image/png', 7, 'ab', 'originals/ab', \
                     false) USING TIMESTAMP ?",
                    (*id, v, owner, v),
                )
                .await
                .unwrap();
        }
        session
            .query_unpaged(
                "UPDATE media_by_id USING TIMESTAMP ? SET deleted_v = ?, upload_v = null, \
                 owner = null, content_type = null, bytes = null, sha256 = null, \
                 original_key = null, private = null WHERE id = ?",
                (FEB + 10_000, FEB + 10_000, ids[1]),
            )
            .await
            .unwrap();
        let again = migrate(&uri, &settings).await.expect("migrate with a fill");
        assert_eq!(again.applied, ["0003_owner_ledger"]);
        let store = ScyllaReadStore::connect(&uri, &settings).await.unwrap();
        let stats = store.owner_stats("dana").await.unwrap();
        assert_eq!((stats.media_count, stats.bytes), (3, 21));
        let page = store.owner_timeline("dana", None, 10).await.unwrap();
        let listed: Vec<Uuid> = page.items.iter().map(|m| m.id).collect();
        assert_eq!(listed, [ids[3], ids[2], ids[0]], "live, newest first");
        assert_eq!(store.owner_stats("eve").await.unwrap().media_count, 1);
        // A fill run again (a retried migration) places nothing twice.
        fill_ledger(&uri, &settings).await.unwrap();
        assert_eq!(store.owner_stats("dana").await.unwrap().media_count, 3);
        // The filled item's row is found by a later delete.
        let delete = Envelope::new(
            ids[3],
            (FEB + 20_000) as u64,
            "test",
            Event::MediaDeleted(conveyor_schemas::MediaDeleted {
                deleted_by: "dana".into(),
            }),
        );
        store.apply(&[delete]).await.unwrap();
        let page = store.owner_timeline("dana", None, 10).await.unwrap();
        let listed: Vec<Uuid> = page.items.iter().map(|m| m.id).collect();
        assert_eq!(listed, [ids[2], ids[0]]);
        assert_eq!(store.owner_stats("dana").await.unwrap().media_count, 2);
        drop_keyspace(&uri, &settings).await.unwrap();
    }

    /// Eight migrations of different keyspaces at once (eight test processes starting
    /// together) all succeed: schema changes wait for agreement and retry when they time out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eight_concurrent_migrations_all_succeed() {
        let Some(base) = crate::testing::engine(crate::testing::CQL, "the CQL migration tests")
        else {
            return;
        };
        let settings = ViewSettings {
            replication_factor: 1,
            ..ViewSettings::default()
        };
        let uris: Vec<ScyllaUri> = (0..8).map(|_| keyspace_uri(&base)).collect();
        let results =
            futures::future::join_all(uris.iter().map(|uri| migrate(uri, &settings))).await;
        for (uri, result) in uris.iter().zip(results) {
            let report = result.unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(report.applied.len(), MIGRATIONS.len(), "{uri}");
        }
        for uri in &uris {
            ScyllaReadStore::connect(uri, &settings)
                .await
                .unwrap_or_else(|e| panic!("{uri}: {e}"));
            drop_keyspace(uri, &settings).await.unwrap();
        }
    }
}
