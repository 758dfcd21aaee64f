//! The [`ObjectStore`] conformance suite. Every implementation runs it: the directory store
//! always, S3 when its test endpoint is configured. It panics on the first broken promise.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{ObjectError, ObjectStore};

async fn read_all(
    store: &dyn ObjectStore,
    key: &str,
    range: Option<std::ops::Range<u64>>,
) -> Vec<u8> {
    let object = store.get(key, range).await.expect("get");
    let chunks: Vec<Bytes> = object.body.try_collect().await.expect("read body");
    chunks.concat()
}

/// Runs every check against `store`, which must be empty.
pub async fn run(store: &dyn ObjectStore) {
    // Put and get round-trip, across many chunks.
    let chunks: Vec<Bytes> = (0..64u8).map(|i| Bytes::from(vec![i; 1000])).collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let body = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
    let meta = store.put("originals/abc", body).await.expect("put");
    assert_eq!(meta.size, 64_000);
    assert_eq!(read_all(store, "originals/abc", None).await, expected);

    // Head.
    assert_eq!(
        store.head("originals/abc").await.unwrap().map(|m| m.size),
        Some(64_000)
    );
    assert_eq!(store.head("originals/missing").await.unwrap(), None);

    // Ranges: inside, clamped at the end, and past the end.
    assert_eq!(
        read_all(store, "originals/abc", Some(1000..1003)).await,
        vec![1, 1, 1]
    );
    let tail = store
        .get("originals/abc", Some(63_998..70_000))
        .await
        .unwrap();
    assert_eq!((tail.size, tail.range.clone()), (64_000, 63_998..64_000));
    assert!(matches!(
        store.get("originals/abc", Some(64_000..64_001)).await,
        Err(ObjectError::RangeNotSatisfiable { .. })
    ));

    // Missing objects and bad keys.
    assert!(matches!(
        store.get("originals/missing", None).await,
        Err(ObjectError::NotFound)
    ));
    assert!(matches!(
        store.get("../escape", None).await,
        Err(ObjectError::InvalidKey(_))
    ));
    assert!(matches!(
        store.put_bytes("a//b", Bytes::from_static(b"x")).await,
        Err(ObjectError::InvalidKey(_))
    ));

    // A failing body stores nothing, and does not clobber an existing object.
    let failing = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"partial")),
        Err(std::io::Error::other("client went away")),
    ])
    .boxed();
    assert!(matches!(
        store.put("originals/abc", failing).await,
        Err(ObjectError::Body(_))
    ));
    assert_eq!(read_all(store, "originals/abc", None).await.len(), 64_000);
    let failing = futures::stream::iter(vec![Err(std::io::Error::other("boom"))]).boxed();
    assert!(store.put("originals/never", failing).await.is_err());
    assert_eq!(store.head("originals/never").await.unwrap(), None);

    // Overwrite replaces the whole object.
    store
        .put_bytes("originals/abc", Bytes::from_static(b"short"))
        .await
        .unwrap();
    assert_eq!(read_all(store, "originals/abc", None).await, b"short");

    // Promote moves; promoting onto an existing key replaces it (a target that does not hold
    // what its name says is corrected) and drops the source.
    store
        .put_bytes("incoming/u1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    store.promote("incoming/u1", "originals/h1").await.unwrap();
    assert_eq!(read_all(store, "originals/h1", None).await, b"one");
    assert_eq!(store.head("incoming/u1").await.unwrap(), None);
    store
        .put_bytes("incoming/u2", Bytes::from_static(b"two"))
        .await
        .unwrap();
    store.promote("incoming/u2", "originals/h1").await.unwrap();
    assert_eq!(read_all(store, "originals/h1", None).await, b"two");
    assert_eq!(store.head("incoming/u2").await.unwrap(), None);

    // An exclusive claim: the first put_if_absent creates, every later one leaves it alone.
    let claim = "uploads/c1.claim";
    assert!(
        store
            .put_if_absent(claim, Bytes::from_static(b"first"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_if_absent(claim, Bytes::from_static(b"second"))
            .await
            .unwrap()
    );
    assert_eq!(read_all(store, claim, None).await, b"first");
    let racers = futures::future::join_all(
        (0..8).map(|i| store.put_if_absent("uploads/c2.claim", Bytes::from(vec![i as u8; 4]))),
    )
    .await;
    let winners = racers.into_iter().filter(|r| *r.as_ref().unwrap()).count();
    assert_eq!(winners, 1, "exactly one of 8 concurrent claims wins");
    store.delete("uploads/c2.claim").await.unwrap();
    assert!(matches!(
        store.promote("incoming/gone", "originals/x").await,
        Err(ObjectError::NotFound)
    ));

    // List by prefix, sorted.
    store
        .put_bytes("variants/h1/thumb.jpg", Bytes::from_static(b"t"))
        .await
        .unwrap();
    store
        .put_bytes("variants/h1/large.jpg", Bytes::from_static(b"l"))
        .await
        .unwrap();
    store
        .put_bytes("variants/h2/thumb.jpg", Bytes::from_static(b"t"))
        .await
        .unwrap();
    let keys: Vec<String> = store
        .list("variants/h1/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, vec!["variants/h1/large.jpg", "variants/h1/thumb.jpg"]);
    let originals: Vec<String> = store
        .list("originals/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(originals, vec!["originals/abc", "originals/h1"]);
    assert!(store.list("nothing-here/").await.unwrap().is_empty());

    // Delete is idempotent.
    store.delete("originals/abc").await.unwrap();
    store.delete("originals/abc").await.unwrap();
    assert_eq!(store.head("originals/abc").await.unwrap(), None);
}
