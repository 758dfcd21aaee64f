//! The query edge: the read API over the read models, a cache in front of them, and (in
//! embedded mode) the media bytes themselves.
//!
//! `GET /v1/media/{id}` (found or not), owners' stats and the first page of their timelines are
//! served from in-process caches (moka): concurrent misses for one response are coalesced into
//! one read-store lookup, and every change a projector commits drops the entries it makes stale
//! ([`QueryState::invalidate`]). In one process (`serve`) the projector tells the cache
//! directly; a standalone query edge tails the log ([`tail_invalidations`]). A TTL bounds
//! staleness if an invalidation races a load.
#![warn(missing_docs)]

mod media;
mod views;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use conveyor_config::Settings;
use conveyor_runtime::changes::Changes;
use conveyor_runtime::http::ApiError;
use conveyor_runtime::keys::KeyKind;
use conveyor_storage::log::StartFrom;
use conveyor_storage::{Backends, EventLog};
use moka::future::Cache;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A rendered read-model response, ready to send, with who may see it.
#[derive(Debug)]
pub struct Cached {
    /// The JSON body of `GET /v1/media/{id}`, with media URLs already made.
    pub body: Bytes,
    /// The body's strong ETag, quoted: the first 12 bytes of its SHA-256, in hex.
    pub etag: String,
    /// The media's owner, matched against the viewer when the media is private.
    pub owner: String,
    /// Private media is shown to its owner only; anyone else gets the 404 of absent media.
    pub private: bool,
}

/// An owner-level response the query edge caches: an owner's stats, or the first page of their
/// timeline as its owner or as anyone else sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnerKey {
    /// The owner.
    pub owner: String,
    /// Which of their responses.
    pub view: OwnerView,
}

/// Which owner-level response an [`OwnerKey`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerView {
    /// `GET /v1/owners/{owner}/stats` (shown to the owner only).
    Stats,
    /// `GET /v1/owners/{owner}/media` without a cursor, `limit` items long, as the owner sees it
    /// (`as_owner`, private items included) or as anyone else does.
    FirstPage {
        /// The page size asked for.
        limit: usize,
        /// Whether the reader is the owner.
        as_owner: bool,
    },
}

/// A rendered response body and its ETag.
#[derive(Debug)]
pub struct Rendered {
    /// The JSON body.
    pub body: Bytes,
    /// Its strong ETag, quoted.
    pub etag: String,
}

/// What the query routes share: the backends, the response cache, and how media URLs are
/// made and readers identified.
pub struct QueryState {
    /// The storage backends; reads go to the read store (`views`) and, for `/media/`, the
    /// object store.
    pub backends: Backends,
    /// Rendered `GET /v1/media/{id}` responses by media id: at most `query.cache_capacity`
    /// entries, each for at most `query.cache_ttl_ms`, dropped when a change to its media
    /// is announced ([`QueryState::follow`], [`tail_invalidations`]).
    /// `None` is a negative entry: no such media (yet), so concurrent and repeated reads of an
    /// unknown id cost one store read per TTL too.
    pub cache: Cache<Uuid, Option<Arc<Cached>>>,
    /// Owners' stats and first timeline pages ([`OwnerKey`]), on the same capacity and TTL,
    /// coalesced like media reads, and dropped when a change to one of the owner's media is
    /// announced ([`QueryState::invalidate`]).
    pub owners: Cache<OwnerKey, Arc<Rendered>>,
    /// Which of [`owners`](Self::owners)' views each owner has had cached, so a change drops
    /// exactly those (a stats entry and a few page sizes).
    pub owner_views: Cache<String, Arc<std::sync::Mutex<std::collections::HashSet<OwnerView>>>>,
    /// The owner of every media id this edge has read, so a change to an item drops its
    /// owner's entries only.
    pub owner_of: Cache<Uuid, String>,
    /// The sniffed type of originals (keys without an extension) this edge has served: keys
    /// are content addresses, so a redirect to S3 sniffs each at most once.
    pub sniffed: Cache<String, &'static str>,
    /// Prefix of media URLs: the CDN, or empty for this edge's own `/media/`.
    pub cdn_base: String,
    /// Keys for private media URLs: the first signs, all verify.
    pub signing_keys: conveyor_config::KeyList,
    /// Lifetime of a signed URL, in seconds.
    pub signed_ttl: u64,
    /// Client keys: a request that presents one reads as its owner, and sees its private media.
    pub keys: conveyor_runtime::keys::Keys,
}

impl QueryState {
    /// The state of a query edge on `backends`: the cache sized by `query.cache_capacity`
    /// and `query.cache_ttl_ms` (at least 1 ms), media URLs under `cdn.base_url` (trailing
    /// `/` dropped) signed with `cdn.signing_keys` for `cdn.signed_url_ttl_secs` (at least
    /// 60 s), and `keys` to identify readers.
    pub fn new(
        backends: Backends,
        settings: &Settings,
        keys: conveyor_runtime::keys::Keys,
    ) -> Arc<Self> {
        // At 0 from the start, so the hit ratio has data before the first read.
        for cache in ["media", "owner"] {
            for counter in [
                "conveyor_query_cache_lookups_total",
                "conveyor_query_cache_misses_total",
            ] {
                metrics::counter!(counter, "cache" => cache).increment(0);
            }
        }
        let ttl = Duration::from_millis(settings.query.cache_ttl_ms.max(1));
        let cache = Cache::builder()
            .max_capacity(settings.query.cache_capacity)
            .time_to_live(ttl)
            .build();
        let owners = Cache::builder()
            .max_capacity(settings.query.cache_capacity)
            .time_to_live(ttl)
            .build();
        // No TTL: an owner's view set must outlive every entry it lists.
        let owner_views = Cache::builder()
            .max_capacity(settings.query.cache_capacity.saturating_mul(4))
            .build();
        // Ids and owners are small; an entry outlives the responses it maps.
        let owner_of = Cache::builder()
            .max_capacity(settings.query.cache_capacity.saturating_mul(4))
            .build();
        let sniffed = Cache::builder()
            .max_capacity(settings.query.cache_capacity.saturating_mul(4))
            .build();
        Arc::new(QueryState {
            backends,
            cache,
            owners,
            owner_views,
            owner_of,
            sniffed,
            cdn_base: settings.cdn.base_url.trim_end_matches('/').to_owned(),
            signing_keys: settings.cdn.signing_keys.clone(),
            signed_ttl: settings.cdn.signed_url_ttl_secs.max(60),
            keys,
        })
    }

    /// Who is reading: the owner a presented client key belongs to, or `None` for a request
    /// without `Authorization`. Reads of public media need no key.
    ///
    /// # Errors
    /// 401 when a key is presented but is not a valid client key: a typo must not read as
    /// anonymous and quietly hide the caller's private media.
    pub fn viewer(&self, headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
        if !headers.contains_key(axum::http::header::AUTHORIZATION) {
            return Ok(None);
        }
        conveyor_runtime::http::bearer(headers)
            .and_then(|key| self.keys.lookup(key, KeyKind::Client))
            .map(|principal| Some(principal.name))
            .ok_or_else(ApiError::unauthorized)
    }

    /// The URL of a stored object. Private objects (under `private/`) get an HMAC signature
    /// over the path and an expiry. The expiry is rounded up to the next ten minutes, so a
    /// response and its URLs stay identical (and cacheable) for ten minutes at a time.
    pub fn media_url(&self, key: &str) -> String {
        let url = format!("{}/media/{key}", self.cdn_base);
        if !key.starts_with("private/") {
            return url;
        }
        let now = conveyor_storage::clock::now_micros() / 1_000_000;
        let expires = (now + self.signed_ttl as i64) / 600 * 600 + 600;
        match conveyor_runtime::signing::sign(&self.signing_keys, &media_message(key, expires)) {
            Some((kid, sig)) => format!("{url}?expires={expires}&kid={kid}&sig={sig}"),
            // No keys: the URL cannot be signed, and `/media` will refuse it.
            None => url,
        }
    }

    /// Drops what a change to media `id` makes stale: its own entry, and its owner's stats and
    /// first pages; every owner's, when this edge has not seen whose it is (a new upload).
    pub async fn invalidate(&self, id: &Uuid) {
        self.cache.invalidate(id).await;
        match self.owner_of.get(id).await {
            Some(owner) => {
                let Some(views) = self.owner_views.get(&owner).await else {
                    return;
                };
                let views: Vec<OwnerView> =
                    views.lock().expect("views lock").iter().copied().collect();
                for view in views {
                    let key = OwnerKey {
                        owner: owner.clone(),
                        view,
                    };
                    self.owners.invalidate(&key).await;
                }
            }
            None => self.owners.invalidate_all(),
        }
    }

    /// Notes that `key` is about to be cached, so [`invalidate`](Self::invalidate) finds it.
    pub async fn note_owner_view(&self, key: &OwnerKey) {
        let views = self
            .owner_views
            .get_with(key.owner.clone(), async { Arc::default() })
            .await;
        views.lock().expect("views lock").insert(key.view);
    }

    /// Drops every cached response.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
        self.owners.invalidate_all();
    }

    /// Drops every cached response that `changes` announces, until `stop`.
    pub fn follow(
        self: &Arc<Self>,
        changes: &Changes,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut rx = changes.subscribe();
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    received = rx.recv() => match received {
                        Ok(id) => state.invalidate(&id).await,
                        // Missed some: drop everything rather than serve stale entries.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => state.invalidate_all(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        })
    }
}

/// For a query edge without a projector beside it: tails `media.events` from its end, outside
/// any group, and drops the cache entry of every id an event names: once when it reads the
/// record, and again once `projector_group` has committed past it, that is, once the read
/// model holds the event. So an entry reloaded between the append and the projection (which
/// the first drop alone would leave for up to `query.cache_ttl_ms`) is dropped as soon as the
/// projection is done: a delete hides the item on every replica within
/// [`PROJECTED_CHECK`] of its projection.
pub async fn tail_invalidations(
    state: Arc<QueryState>,
    log: Arc<dyn EventLog>,
    topic: String,
    projector_group: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let group = format!("query-cache-{}", Uuid::now_v7());
    let mut sub = log.subscribe(&topic, &group, StartFrom::Latest).await?;
    // Ids to drop again once the projector's committed offset passes theirs, per partition
    // (a partition's records arrive in offset order).
    let mut pending: HashMap<u32, VecDeque<(u64, Uuid)>> = HashMap::new();
    let mut check = tokio::time::interval(PROJECTED_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = check.tick(), if !pending.is_empty() => {
                match log.lag(&topic, &projector_group).await {
                    Ok(lags) => {
                        for lag in lags {
                            let Some(ids) = pending.get_mut(&lag.partition) else { continue };
                            while ids.front().is_some_and(|(offset, _)| *offset < lag.committed) {
                                let (_, id) = ids.pop_front().expect("checked");
                                state.invalidate(&id).await;
                            }
                        }
                        pending.retain(|_, ids| !ids.is_empty());
                    }
                    // The TTL still bounds staleness; look again at the next tick.
                    Err(e) => tracing::debug!(error = %e, "cannot read the projector's offsets"),
                }
            }
            polled = sub.poll(1024, Duration::from_millis(500)) => {
                for record in polled? {
                    if let Some(id) = std::str::from_utf8(&record.key)
                        .ok()
                        .and_then(|k| Uuid::parse_str(k).ok())
                    {
                        state.invalidate(&id).await;
                        let ids = pending.entry(record.partition).or_default();
                        // Bounded: past it, the TTL is the bound, as it was.
                        if ids.len() < MAX_PENDING {
                            ids.push_back((record.offset, id));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// How often a standalone query edge looks at the projector's committed offsets while ids wait
/// for their projection.
pub const PROJECTED_CHECK: Duration = Duration::from_millis(100);

/// Most ids one partition keeps waiting for their projection (a projector far behind): the
/// oldest are dropped once, and their entries expire with the TTL.
const MAX_PENDING: usize = 65_536;

/// What a private media URL signs.
pub fn media_message(key: &str, expires: i64) -> String {
    format!("GET\n/media/{key}\n{expires}")
}

/// The query routes' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    views::get_media,
    views::owner_timeline,
    views::owner_stats,
    media::get_object,
))]
pub struct QueryApi;

/// The read routes.
pub fn router(state: Arc<QueryState>) -> Router {
    Router::new()
        .route("/v1/media/{id}", get(views::get_media))
        .route("/v1/owners/{owner}/media", get(views::owner_timeline))
        .route("/v1/owners/{owner}/stats", get(views::owner_stats))
        .route("/media/{*key}", get(media::get_object))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use conveyor_schemas::{MediaRow, OwnerStats, TimelinePage};
    use conveyor_storage::views::ViewError;
    use conveyor_storage::views::sqlite::SqliteReadStore;
    use conveyor_storage::{ObjectStore, ReadStore};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    /// The SQLite read store, counting the reads that reach it.
    struct Counting {
        store: SqliteReadStore,
        media: AtomicUsize,
        timeline: AtomicUsize,
        stats: AtomicUsize,
    }

    #[async_trait]
    impl ReadStore for Counting {
        async fn apply(&self, events: &[conveyor_schemas::Envelope]) -> Result<(), ViewError> {
            self.store.apply(events).await
        }
        async fn media(&self, id: Uuid) -> Result<Option<MediaRow>, ViewError> {
            self.media.fetch_add(1, Ordering::SeqCst);
            // Slow enough that the requests below all arrive while the first read runs.
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.store.media(id).await
        }
        async fn is_deleted(&self, id: Uuid) -> Result<bool, ViewError> {
            self.store.is_deleted(id).await
        }
        async fn owner_timeline(
            &self,
            owner: &str,
            after: Option<(i64, Uuid)>,
            limit: usize,
        ) -> Result<TimelinePage, ViewError> {
            self.timeline.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.store.owner_timeline(owner, after, limit).await
        }
        async fn owner_stats(&self, owner: &str) -> Result<OwnerStats, ViewError> {
            self.stats.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.store.owner_stats(owner).await
        }
        async fn ping(&self) -> Result<(), ViewError> {
            self.store.ping().await
        }
    }

    async fn get_all(router: &Router, path: &str, key: Option<&str>, n: usize) -> Vec<u16> {
        let requests = (0..n).map(|_| {
            let mut request = axum::http::Request::get(path);
            if let Some(key) = key {
                request = request.header("authorization", format!("Bearer {key}"));
            }
            router
                .clone()
                .oneshot(request.body(axum::body::Body::empty()).unwrap())
        });
        futures::future::join_all(requests)
            .await
            .into_iter()
            .map(|r| r.unwrap().status().as_u16())
            .collect()
    }

    /// Reported: 300 concurrent reads of one owner's stats were 300 store reads, and reads of
    /// unknown ids were not coalesced either. Stats, first timeline pages and misses are now
    /// cached and coalesced, and a change drops them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_of_stats_pages_and_unknown_ids_cost_one_store_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::for_test(dir.path());
        settings.query.cache_ttl_ms = 60_000;
        let counting = Arc::new(Counting {
            store: SqliteReadStore::open(dir.path().join("views.db")).unwrap(),
            media: AtomicUsize::new(0),
            timeline: AtomicUsize::new(0),
            stats: AtomicUsize::new(0),
        });
        let objects: Arc<dyn ObjectStore> = Arc::new(
            conveyor_storage::objects::fs::FsObjectStore::open(dir.path().join("objects")).unwrap(),
        );
        let log: Arc<dyn EventLog> = Arc::new(
            conveyor_storage::log::sqlite::SqliteLog::open(
                dir.path().join("log.db"),
                conveyor_config::Durability::Os,
            )
            .unwrap(),
        );
        let backends = Backends {
            objects,
            log,
            views: counting.clone(),
        };
        let keys = conveyor_runtime::keys::Keys::configured(&settings.auth);
        let state = QueryState::new(backends, &settings, keys);
        let router = router(state.clone());

        let stats = get_all(&router, "/v1/owners/alice/stats", Some("alice-key"), 300).await;
        assert!(stats.iter().all(|s| *s == 200), "{stats:?}");
        assert_eq!(counting.stats.load(Ordering::SeqCst), 1, "one stats read");
        let page = get_all(&router, "/v1/owners/alice/media", None, 300).await;
        assert!(page.iter().all(|s| *s == 200));
        assert_eq!(counting.timeline.load(Ordering::SeqCst), 1, "one page read");
        let unknown = format!("/v1/media/{}", Uuid::now_v7());
        let missing = get_all(&router, &unknown, None, 300).await;
        assert!(missing.iter().all(|s| *s == 404));
        assert_eq!(counting.media.load(Ordering::SeqCst), 1, "one miss read");

        // A change to an item this edge has not seen (a new upload) drops every owner's.
        state.invalidate(&Uuid::now_v7()).await;
        get_all(&router, "/v1/owners/alice/stats", Some("alice-key"), 10).await;
        assert_eq!(
            counting.stats.load(Ordering::SeqCst),
            2,
            "read again after a change"
        );
    }
}
