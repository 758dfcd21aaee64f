//! The [`ReadStore`] conformance suite. Every implementation runs it: SQLite always, the CQL
//! store on the node named by `CONVEYOR_TEST_CQL` (Apache Cassandra in `scripts/test`). The
//! store must be empty.

use conveyor_schemas::{
    Envelope, Event, ExifSummary, MediaDeleted, MediaDescribed, MediaProcessed,
    MediaProcessingFailed, MediaStatus, MediaUploaded, OwnerStats, VariantInfo, VideoProcessed,
};
use uuid::Uuid;

use super::ReadStore;
use crate::error::Kinded;

/// 2026-01-31T23:59:00Z and one day later, in µs: timelines must page across months.
const JAN_31: u64 = 1_769_903_940_000_000;
const DAY: u64 = 86_400_000_000;

fn uploaded(id: Uuid, version: u64, owner: &str, bytes: u64) -> Envelope {
    Envelope::new(
        id,
        version,
        "conformance",
        Event::MediaUploaded(MediaUploaded {
            owner: owner.into(),
            original_key: format!("originals/{id}"),
            sha256: id.simple().to_string(),
            bytes,
            content_type: "image/jpeg".into(),
            title: Some("upload title".into()),
        }),
    )
}

fn processed(cause: &Envelope, width: u32) -> Envelope {
    cause.derive(
        "conformance",
        0,
        Event::MediaProcessed(MediaProcessed {
            width,
            height: 10,
            blurhash: "LKO2?U%2Tw=w]~RBVZRi};RPxuwH".into(),
            variants: vec![VariantInfo {
                name: "thumb".into(),
                key: "variants/x/thumb.jpg".into(),
                width: 256,
                height: 10,
                content_type: "image/jpeg".into(),
                bytes: 99,
            }],
            exif: ExifSummary::default(),
        }),
    )
}

fn video(cause: &Envelope) -> Envelope {
    let rendition = VariantInfo {
        name: "360p".into(),
        key: "variants/x/360p.mp4".into(),
        width: 640,
        height: 360,
        content_type: "video/mp4".into(),
        bytes: 12_345,
    };
    cause.derive(
        "conformance",
        0,
        Event::VideoProcessed(VideoProcessed {
            width: 640,
            height: 360,
            blurhash: "LKO2?U%2Tw=w]~RBVZRi};RPxuwH".into(),
            variants: vec![],
            duration_ms: 3_000,
            video_codec: "h264".into(),
            audio_codec: None,
            frame_rate_milli: 25_000,
            bitrate: 800_000,
            rotation: 0,
            renditions: vec![rendition],
        }),
    )
}

fn described(id: Uuid, version: u64, title: &str) -> Envelope {
    Envelope::new(
        id,
        version,
        "conformance",
        Event::MediaDescribed(MediaDescribed {
            title: Some(title.into()),
            description: Some("d".into()),
            tags: vec!["a".into()],
        }),
    )
}

fn deleted(id: Uuid, version: u64) -> Envelope {
    Envelope::new(
        id,
        version,
        "conformance",
        Event::MediaDeleted(MediaDeleted {
            deleted_by: "x".into(),
        }),
    )
}

/// Runs every check against `store`, which must be empty: upserts and gets, redelivery,
/// out-of-order versions, tombstones, progress, timelines paged across months, stats after a
/// reversed replay, deletes below the upload's version, ties between outcomes, descriptions in
/// log order whatever their versions, and no version refused for a clock.
///
/// # Panics
/// On the first broken promise.
pub async fn run(store: &dyn ReadStore) {
    store.ping().await.expect("ping");

    // Upsert and get.
    let a = Uuid::now_v7();
    let up = uploaded(a, JAN_31, "alice", 100);
    store.apply(std::slice::from_ref(&up)).await.unwrap();
    let row = store
        .media(a)
        .await
        .unwrap()
        .expect("uploaded media is visible");
    assert_eq!(
        (row.status, row.owner.as_str(), row.bytes),
        (MediaStatus::Pending, "alice", 100)
    );
    assert_eq!(row.created_at, JAN_31 as i64);
    assert_eq!(
        store.media(Uuid::now_v7()).await.unwrap(),
        None,
        "unknown id"
    );

    // Processing, then redelivery of everything: identical rows and stats.
    let done = processed(&up, 640);
    store.apply(std::slice::from_ref(&done)).await.unwrap();
    let row = store.media(a).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.width, row.variants.len()),
        (MediaStatus::Processed, Some(640), 1)
    );
    let stats_before = store.owner_stats("alice").await.unwrap();
    assert_eq!(
        stats_before,
        OwnerStats {
            media_count: 1,
            bytes: 100
        }
    );
    store
        .apply(&[up.clone(), done.clone(), up.clone()])
        .await
        .unwrap();
    assert_eq!(
        store.media(a).await.unwrap().unwrap(),
        row,
        "redelivery changes nothing"
    );
    assert_eq!(
        store.owner_stats("alice").await.unwrap(),
        stats_before,
        "stats count once"
    );

    // Descriptions in log order: the later one wins whatever its version (a replica whose
    // clock is behind took it), in one batch and across batches; column groups do not
    // overwrite each other.
    store
        .apply(&[
            described(a, JAN_31 + 20, "first"),
            described(a, JAN_31 + 10, "second, from a clock behind"),
        ])
        .await
        .unwrap();
    let row = store.media(a).await.unwrap().unwrap();
    assert_eq!(row.title.as_deref(), Some("second, from a clock behind"));
    store
        .apply(&[described(a, JAN_31 + 5, "newer")])
        .await
        .unwrap();
    let row = store.media(a).await.unwrap().unwrap();
    assert_eq!(row.title.as_deref(), Some("newer"), "in the next batch too");
    assert_eq!(
        row.status,
        MediaStatus::Processed,
        "a description leaves processing alone"
    );
    let reprocessed = processed(&up, 640);
    store.apply(&[reprocessed]).await.unwrap();
    assert_eq!(
        store.media(a).await.unwrap().unwrap().title.as_deref(),
        Some("newer")
    );

    // Tombstones: a delete hides the row and its stats; an older event never brings it back.
    let b = Uuid::now_v7();
    let up_b = uploaded(b, JAN_31 + DAY, "alice", 50);
    store.apply(std::slice::from_ref(&up_b)).await.unwrap();
    assert_eq!(
        store.owner_stats("alice").await.unwrap(),
        OwnerStats {
            media_count: 2,
            bytes: 150
        }
    );
    store.apply(&[deleted(b, JAN_31 + DAY + 5)]).await.unwrap();
    store
        .apply(&[
            processed(&up_b, 10),
            up_b.clone(),
            described(b, JAN_31 + DAY + 1, "zombie"),
        ])
        .await
        .unwrap();
    assert_eq!(store.media(b).await.unwrap(), None, "deleted stays deleted");
    assert!(store.is_deleted(b).await.unwrap());
    assert!(!store.is_deleted(a).await.unwrap(), "live");
    assert!(!store.is_deleted(Uuid::now_v7()).await.unwrap(), "unknown");
    assert_eq!(
        store.owner_stats("alice").await.unwrap(),
        OwnerStats {
            media_count: 1,
            bytes: 100
        }
    );
    // A delete that arrives before its upload still wins.
    let c = Uuid::now_v7();
    store
        .apply(&[deleted(c, JAN_31 + 9), uploaded(c, JAN_31 + 1, "alice", 7)])
        .await
        .unwrap();
    assert_eq!(store.media(c).await.unwrap(), None);
    assert!(store.is_deleted(c).await.unwrap());
    assert_eq!(store.owner_stats("alice").await.unwrap().media_count, 1);

    // A long job's progress shows as `processing`, the highest percentage stands, and the
    // outcome replaces it, whichever arrives first.
    let v = Uuid::now_v7();
    let up_v = uploaded(v, JAN_31 + 2 * DAY, "vic", 1_000);
    store
        .apply(&[
            up_v.clone(),
            up_v.progress("t", 0, 40),
            up_v.progress("t", 0, 20),
        ])
        .await
        .unwrap();
    let row = store.media(v).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.progress),
        (MediaStatus::Processing, Some(40))
    );
    store
        .apply(&[video(&up_v), up_v.progress("t", 0, 90)])
        .await
        .unwrap();
    let row = store.media(v).await.unwrap().unwrap();
    assert_eq!((row.status, row.progress), (MediaStatus::Processed, None));
    let summary = row.video.expect("the video's summary");
    assert_eq!(
        (summary.duration_ms, summary.renditions.len(), row.width),
        (3_000, 1, Some(640))
    );

    // Timelines: newest first, pages that cross a month boundary, nothing lost or repeated.
    let mut ids = Vec::new();
    let mut events = Vec::new();
    for i in 0..25u64 {
        let id = Uuid::now_v7();
        // Eleven hours apart: the timeline spans Jan 30 to Feb 10.
        events.push(uploaded(id, JAN_31 - DAY + i * DAY * 11 / 24, "carol", 1));
        ids.push(id);
    }
    store.apply(&events).await.unwrap();
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = store.owner_timeline("carol", cursor, 7).await.unwrap();
        assert!(page.items.len() <= 7);
        seen.extend(page.items.iter().map(|m| m.id));
        pages += 1;
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every item once, newest first");
    assert_eq!(pages, 4);
    assert!(
        store
            .owner_timeline("nobody", None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Stats after replaying the whole history again, in reverse order.
    let mut history = vec![up.clone(), done, up_b, deleted(b, JAN_31 + DAY + 5)];
    history.extend(events);
    history.reverse();
    store.apply(&history).await.unwrap();
    assert_eq!(
        store.owner_stats("alice").await.unwrap(),
        OwnerStats {
            media_count: 1,
            bytes: 100
        }
    );
    assert_eq!(
        store.owner_stats("carol").await.unwrap(),
        OwnerStats {
            media_count: 25,
            bytes: 25
        }
    );
    assert_eq!(
        store.owner_stats("nobody").await.unwrap(),
        OwnerStats::default()
    );

    deletes_below_the_upload_version(store).await;
    outcomes_at_one_version(store).await;
    descriptions_at_one_version(store).await;
    no_clock_refuses_a_version(store).await;
    a_heavy_deleter(store).await;
}

/// Applies `events` as a projector does: a transient error (on CQL, a contended transaction
/// whose Paxos round timed out on a busy node) is retried, a few times.
async fn apply_as_projector(store: &dyn ReadStore, events: &[Envelope]) {
    for attempt in 1.. {
        match store.apply(events).await {
            Ok(()) => return,
            Err(e) if e.is_transient() && attempt < 10 => continue,
            Err(e) => panic!("apply, attempt {attempt}: {e}"),
        }
    }
}

/// Deleted items in a heavy deleter's timeline, beyond the test Cassandra node's
/// `tombstone_failure_threshold` (1,500, `infra/engines/cassandra`): a read that passed them
/// all would fail.
const HEAVY_DELETES: u64 = 2_500;

/// An owner keeps three old items, uploads 2,500 more in the same month and deletes them, and
/// keeps two new ones. Their stats, and every page of their timeline, are exactly the five
/// kept, and no read passes the deletes (on CQL the test node fails a read that passes 1,500
/// tombstones). Every batch of deletes is applied by two writers at once, as a projector and
/// its successor after a rebalance would: nothing counts twice.
async fn a_heavy_deleter(store: &dyn ReadStore) {
    let owner = "heavy-deleter";
    let at = |i: u64| JAN_31 - DAY + i * 1_000;
    let mut kept: Vec<Uuid> = Vec::new();
    let mut old = Vec::new();
    for i in 0..3 {
        let id = Uuid::now_v7();
        old.push(uploaded(id, at(i), owner, 10));
        kept.push(id);
    }
    store.apply(&old).await.unwrap();
    let bulk: Vec<Envelope> = (0..HEAVY_DELETES)
        .map(|i| uploaded(Uuid::now_v7(), at(10 + i), owner, 1_000))
        .collect();
    for batch in bulk.chunks(500) {
        apply_as_projector(store, batch).await;
    }
    let deletes: Vec<Envelope> = bulk
        .iter()
        .map(|u| deleted(u.aggregate_id, u.version + 1))
        .collect();
    for batch in deletes.chunks(500) {
        tokio::join!(
            apply_as_projector(store, batch),
            apply_as_projector(store, batch)
        );
    }
    let mut new = Vec::new();
    for i in 0..2 {
        let id = Uuid::now_v7();
        new.push(uploaded(id, at(10 + HEAVY_DELETES + i), owner, 10));
        kept.push(id);
    }
    store.apply(&new).await.unwrap();
    kept.reverse();
    assert_eq!(
        store.owner_stats(owner).await.unwrap(),
        OwnerStats {
            media_count: 5,
            bytes: 50
        },
        "only the kept items count"
    );
    let page = store.owner_timeline(owner, None, 100).await.unwrap();
    assert_eq!(
        page.items.iter().map(|m| m.id).collect::<Vec<_>>(),
        kept,
        "the five kept, newest first"
    );
    assert_eq!(page.next, None);
    let (mut seen, mut cursor) = (Vec::new(), None);
    loop {
        let page = store.owner_timeline(owner, cursor, 2).await.unwrap();
        seen.extend(page.items.iter().map(|m| m.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, kept, "pages of two: every kept item once, in order");

    // A projector that lost the partition, still applying an upload, beside its successor
    // applying the upload and its delete: the item ends up nowhere, whichever lands first.
    for i in 0..20 {
        let up = uploaded(Uuid::now_v7(), at(20 + HEAVY_DELETES + i), owner, 10);
        let both = [up.clone(), deleted(up.aggregate_id, up.version + 1)];
        tokio::join!(
            apply_as_projector(store, std::slice::from_ref(&up)),
            apply_as_projector(store, &both)
        );
    }
    let page = store.owner_timeline(owner, None, 100).await.unwrap();
    assert_eq!(
        page.items.iter().map(|m| m.id).collect::<Vec<_>>(),
        kept,
        "no deleted item left behind by the stale writer"
    );
    assert_eq!(store.owner_stats(owner).await.unwrap().media_count, 5);
}

/// A delete whose version is below its upload's (a producer's clock behind the ingest's): the
/// item leaves the timeline and the stats too, whichever arrives first. On CQL a row tombstone
/// hides only cells written at or below its timestamp, so this needs more than `USING
/// TIMESTAMP <delete version>`.
async fn deletes_below_the_upload_version(store: &dyn ReadStore) {
    for (owner, upload_first) in [("dave", true), ("erin", false)] {
        let id = Uuid::now_v7();
        let up = uploaded(id, JAN_31 + 500, owner, 9);
        let done = processed(&up, 12);
        let gone = deleted(id, JAN_31 + 400);
        if upload_first {
            store.apply(&[up, done]).await.unwrap();
            store.apply(&[gone]).await.unwrap();
        } else {
            store.apply(&[gone]).await.unwrap();
            store.apply(&[up, done]).await.unwrap();
        }
        assert_eq!(store.media(id).await.unwrap(), None, "{owner}: deleted");
        let timeline = store.owner_timeline(owner, None, 10).await.unwrap();
        assert!(
            timeline.items.is_empty(),
            "{owner}: the timeline still shows {:?}",
            timeline.items
        );
        assert_eq!(
            store.owner_stats(owner).await.unwrap(),
            OwnerStats::default(),
            "{owner}: stats"
        );
    }
}

/// Two outcomes of one upload at one version (two processors racing, a producer's retry):
/// the documented tiebreak, the greater encoding ([`super::ProcessOutcome::encode`]), in
/// either order of arrival. A success beats a failure; of two failures the greater reason
/// stays, whole: never an empty reason.
async fn outcomes_at_one_version(store: &dyn ReadStore) {
    let failure = |cause: &Envelope, version: u64, reason: &str| {
        Envelope::new(
            cause.aggregate_id,
            version,
            "conformance",
            Event::MediaProcessingFailed(MediaProcessingFailed {
                reason: reason.into(),
            }),
        )
    };
    for (owner, success_first) in [("frank", true), ("gail", false)] {
        let up = uploaded(Uuid::now_v7(), JAN_31 + 600, owner, 3);
        let ok = processed(&up, 320);
        let failed = failure(&up, ok.version, "decoder gave up");
        let (first, second) = if success_first {
            (ok, failed)
        } else {
            (failed, ok)
        };
        store.apply(&[up.clone(), first]).await.unwrap();
        store.apply(&[second]).await.unwrap();
        let row = store.media(up.aggregate_id).await.unwrap().unwrap();
        assert_eq!(
            (row.status, row.width, row.failure_reason.as_deref()),
            (MediaStatus::Processed, Some(320), None),
            "{owner}: the success wins the tie"
        );
        let listed = store.owner_timeline(owner, None, 10).await.unwrap();
        assert_eq!(listed.items, vec![row], "{owner}: the timeline agrees");

        let up = uploaded(Uuid::now_v7(), JAN_31 + 700, owner, 3);
        let at = JAN_31 + 800;
        let (first, second) = if success_first {
            ("a: too many pixels", "b: not an image")
        } else {
            ("b: not an image", "a: too many pixels")
        };
        store
            .apply(&[up.clone(), failure(&up, at, first)])
            .await
            .unwrap();
        store.apply(&[failure(&up, at, second)]).await.unwrap();
        let row = store.media(up.aggregate_id).await.unwrap().unwrap();
        assert_eq!(
            (row.status, row.failure_reason.as_deref()),
            (MediaStatus::Failed, Some("b: not an image")),
            "{owner}: the greater failure wins the tie, whole"
        );
    }
}

/// Two descriptions of one item at one version, in either log order: the later one stays,
/// whole, on every store; never a mix of the two (a CQL store holding them as several cells
/// would merge them cell by cell).
async fn descriptions_at_one_version(store: &dyn ReadStore) {
    let describe = |id: Uuid, title: Option<&str>, description: Option<&str>, tags: &[&str]| {
        Envelope::new(
            id,
            JAN_31 + 900,
            "conformance",
            Event::MediaDescribed(MediaDescribed {
                title: title.map(Into::into),
                description: description.map(Into::into),
                tags: tags.iter().map(|t| t.to_string()).collect(),
            }),
        )
    };
    for (owner, greater_first) in [("ines", true), ("jon", false)] {
        let up = uploaded(Uuid::now_v7(), JAN_31 + 800, owner, 3);
        let id = up.aggregate_id;
        // `g` encodes greater (its title), `l` has the greater description and tags: a store
        // merging the fields one by one would keep g's title beside l's description, which
        // neither event said.
        let g = describe(id, Some("b title"), Some("a description"), &["a"]);
        let l = describe(id, Some("a title"), Some("z description"), &["z"]);
        let (first, second) = if greater_first { (g, l) } else { (l, g) };
        store.apply(&[up, first]).await.unwrap();
        store.apply(&[second]).await.unwrap();
        let row = store.media(id).await.unwrap().unwrap();
        assert_eq!(
            (
                row.title.as_deref(),
                row.description.as_deref(),
                row.tags.len()
            ),
            if greater_first {
                (Some("a title"), Some("z description"), 1)
            } else {
                (Some("b title"), Some("a description"), 1)
            },
            "{owner}: the later description, whole"
        );
        let listed = store.owner_timeline(owner, None, 10).await.unwrap();
        assert_eq!(listed.items, vec![row], "{owner}: the timeline agrees");
    }
}

/// No clock refuses an event: a version days ahead of this process's clock is applied (the
/// projector bounds versions by the log's append time instead), and a later description still
/// replaces it. Only a version no store can hold (above `i64::MAX`, the CQL timestamp's range)
/// is refused, as permanent, with nothing of it written.
async fn no_clock_refuses_a_version(store: &dyn ReadStore) {
    use crate::error::{ErrorKind, Kinded};
    let id = Uuid::now_v7();
    let now = crate::clock::now_micros() as u64;
    store
        .apply(&[
            uploaded(id, now + 2 * DAY, "hana", 1),
            described(id, now + 2 * DAY + 1, "ahead"),
        ])
        .await
        .expect("a version two days ahead is applied");
    store
        .apply(&[described(id, now, "after it in the log")])
        .await
        .unwrap();
    let row = store.media(id).await.unwrap().expect("visible");
    assert_eq!(row.title.as_deref(), Some("after it in the log"));
    assert_eq!(store.owner_stats("hana").await.unwrap().media_count, 1);

    let unstorable = Uuid::now_v7();
    let error = store
        .apply(&[uploaded(unstorable, super::MAX_VERSION + 1, "ivo", 1)])
        .await
        .expect_err("a version above i64::MAX is refused");
    assert_eq!(error.kind(), ErrorKind::Permanent, "{error}");
    assert_eq!(store.media(unstorable).await.unwrap(), None);
    assert_eq!(
        store.owner_stats("ivo").await.unwrap(),
        OwnerStats::default()
    );
}
