//! Object storage: immutable blobs by key. The embedded implementation is a local directory
//! ([`fs::FsObjectStore`]); the distributed one is S3
//! ([`s3::S3ObjectStore`]), behind the same trait.

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
pub mod fs;
#[cfg(feature = "s3")]
pub mod s3;

use crate::error::{ErrorKind, Kinded};
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

/// A body streamed into or out of a store.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// What a store knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key, as callers name it (without a store's own prefix).
    pub key: String,
    /// The object's size, in bytes.
    pub size: u64,
}

/// A (possibly partial) object body.
pub struct GetObject {
    /// Size of the whole object, not of the range.
    pub size: u64,
    /// The byte range `body` carries.
    pub range: Range<u64>,
    /// The bytes of `range`, streamed.
    pub body: ByteStream,
}

/// Why an object store call failed. Every variant has a kind ([`Kinded`]), which is what
/// callers decide on.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// No object under the key (for [`ObjectStore::promote`], under `from`). Not found.
    #[error("object not found")]
    NotFound,
    /// The key (held here) breaks the grammar [`validate_key`] checks. Permanent.
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// A range that is empty or starts at or past the end of the object ([`resolve_range`]).
    /// Permanent.
    #[error("range {start}..{end} not satisfiable for an object of {size} bytes")]
    RangeNotSatisfiable {
        /// The first byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// The object's size, in bytes.
        size: u64,
    },
    /// The body stream failed; nothing was stored.
    #[error("upload body failed: {0}")]
    Body(std::io::Error),
    /// A local file operation failed (the directory store), or the store lacks the operation
    /// asked for. Its kind is the I/O error's ([`io_kind`](crate::error::io_kind)): a missing
    /// file is not found, invalid input or data is permanent, the rest is transient.
    #[error("object store i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A remote store failed; `kind` says whether retrying can help.
    #[error("object store ({kind}): {message}")]
    Storage {
        /// Transient, permanent or not found, as the backend's mapping decided.
        kind: ErrorKind,
        /// The backend's description of the failure.
        message: String,
    },
}

impl Kinded for ObjectError {
    fn kind(&self) -> ErrorKind {
        match self {
            ObjectError::NotFound => ErrorKind::NotFound,
            ObjectError::InvalidKey(_) | ObjectError::RangeNotSatisfiable { .. } => {
                ErrorKind::Permanent
            }
            // The client's body failed; the same body fails again.
            ObjectError::Body(_) => ErrorKind::Permanent,
            ObjectError::Io(e) => crate::error::io_kind(e),
            ObjectError::Storage { kind, .. } => *kind,
        }
    }
}

/// The contract every object store keeps. Keys are `/`-separated paths of
/// `[A-Za-z0-9._-]` segments, at most 1024 bytes in all; no segment is empty, `.` or `..`.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores `body` under `key`, replacing any object there. Atomic: a reader sees the old
    /// object, or the whole new one, never a part. Returns once the object is durable. If the
    /// body stream yields an error, nothing is stored and [`ObjectError::Body`] is returned.
    async fn put(&self, key: &str, body: ByteStream) -> Result<ObjectMeta, ObjectError>;

    /// Reads `key`, or only `range` of it. A range that starts at or past the end, or is
    /// empty, is [`ObjectError::RangeNotSatisfiable`]; a range ending past the end is clamped.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<GetObject, ObjectError>;

    /// The object's metadata, or `None` if there is no such object.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError>;

    /// Removes `key`. Idempotent: deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;

    /// Makes the object at `from` available at `to`, replacing whatever is there, and removes
    /// `from`. Readers of `to` see the old object or the new one, never a part. Replacing,
    /// rather than keeping an existing `to`, means a content-addressed key always ends up
    /// holding the bytes its caller verified, even if something else was put there first.
    /// Whatever metadata `from` carried (a client's `PUT` chose it) is not kept: `to` gets
    /// the headers the store gives every object, its type sniffed from its own bytes.
    /// [`ObjectError::NotFound`] if `from` does not exist.
    async fn promote(&self, from: &str, to: &str) -> Result<(), ObjectError>;

    /// Stores `bytes` under `key` only if nothing is there yet: `Ok(true)` if this call
    /// created it, `Ok(false)` if an object was already there (left untouched). Of concurrent
    /// calls on one key, exactly one gets `true`, on every replica: an exclusive claim.
    async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, ObjectError>;

    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError>;

    /// A URL that lets anyone GET `key` directly from the store for `ttl`, if the store can
    /// issue one (S3 presigning), served as `content_type` (the server's own sniffing, never
    /// what an uploader said), inline only for images and videos and as an attachment
    /// otherwise. `None` means the store's bytes must be served by Conveyor.
    async fn presigned_get(
        &self,
        key: &str,
        ttl: std::time::Duration,
        content_type: &str,
    ) -> Result<Option<String>, ObjectError> {
        let _ = (key, ttl, content_type);
        Ok(None)
    }

    /// A URL a client can `PUT` the body of `key` to, without credentials, for `ttl`, whose
    /// signature pins `Content-Type: content_type` (a `PUT` with another type is refused by the
    /// store). `None` if the store cannot issue one (the embedded store: the edge signs its own
    /// URLs).
    async fn presigned_put(
        &self,
        key: &str,
        ttl: std::time::Duration,
        content_type: &str,
    ) -> Result<Option<String>, ObjectError> {
        let _ = (key, ttl, content_type);
        Ok(None)
    }

    /// Starts a multipart upload of `key`, typed `content_type`, in `parts` parts and returns its
    /// id and one presigned `PUT` URL per part, or `None` if the store has no multipart uploads.
    async fn presigned_multipart(
        &self,
        key: &str,
        parts: u32,
        ttl: std::time::Duration,
        content_type: &str,
    ) -> Result<Option<(String, Vec<String>)>, ObjectError> {
        let _ = (key, parts, ttl, content_type);
        Ok(None)
    }

    /// Completes a multipart upload started by [`ObjectStore::presigned_multipart`], with the
    /// ETags the part uploads returned, in part order.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), ObjectError> {
        let _ = (key, upload_id, etags);
        Err(ObjectError::Io(std::io::Error::other(
            "this store has no multipart uploads",
        )))
    }

    /// Aborts a multipart upload started by [`ObjectStore::presigned_multipart`] and never
    /// completed, so its parts stop taking space (on S3, stop being billed): nothing can reach
    /// them once the upload's record is gone. An upload that no longer exists (completed,
    /// aborted before, or expired by a lifecycle rule) is not an error. The default, for a
    /// store without multipart uploads, does nothing.
    ///
    /// # Errors
    /// The store's own failures, by their kind; retry on the next sweep.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), ObjectError> {
        let _ = (key, upload_id);
        Ok(())
    }

    /// Stores a body that is already in memory; same promises as [`ObjectStore::put`].
    async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<ObjectMeta, ObjectError> {
        self.put(
            key,
            Box::pin(futures::stream::once(async move { Ok(bytes) })),
        )
        .await
    }

    /// Reads a whole object into memory.
    async fn get_bytes(&self, key: &str) -> Result<Bytes, ObjectError> {
        use futures::TryStreamExt;
        let object = self.get(key, None).await?;
        let mut out = Vec::with_capacity(object.size as usize);
        let mut body = object.body;
        while let Some(chunk) = body.try_next().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }
}

/// Stores `body` under `key`, hashing it on the way: the stored size and the sha256 (hex).
pub async fn put_hashed(
    store: &dyn ObjectStore,
    key: &str,
    body: ByteStream,
) -> Result<(u64, String), ObjectError> {
    use futures::{StreamExt, TryStreamExt};
    use sha2::{Digest, Sha256};
    let hasher = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
    let tee = hasher.clone();
    let body = body
        .inspect_ok(move |chunk| tee.lock().expect("hasher lock").update(chunk))
        .boxed();
    let meta = store.put(key, body).await?;
    let sha256 = std::mem::take(&mut *hasher.lock().expect("hasher lock")).finalize();
    Ok((meta.size, hex::encode(sha256)))
}

/// Copies `from` in `source` to `to` in `target`, streaming, hashing on the way: the size and
/// the sha256 (hex) of what was sent.
pub async fn copy_hashed(
    source: &dyn ObjectStore,
    from: &str,
    target: &dyn ObjectStore,
    to: &str,
) -> Result<(u64, String), ObjectError> {
    let body = source.get(from, None).await?.body;
    put_hashed(target, to, body).await
}

/// The sha256 (hex) of an object, streamed.
pub async fn sha256_of(store: &dyn ObjectStore, key: &str) -> Result<String, ObjectError> {
    use futures::TryStreamExt;
    use sha2::{Digest, Sha256};
    let mut body = store.get(key, None).await?.body;
    let mut hasher = Sha256::new();
    while let Some(chunk) = body.try_next().await? {
        hasher.update(&chunk);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The bytes a `get` of `range` serves from an object of `size` bytes, by the contract: the
/// whole object for `None`, an end past the object clamped, a start at or past its end (or an
/// empty range) refused as [`ObjectError::RangeNotSatisfiable`].
pub fn resolve_range(range: Option<Range<u64>>, size: u64) -> Result<Range<u64>, ObjectError> {
    match range {
        None => Ok(0..size),
        Some(r) if r.start >= size || r.start >= r.end => Err(ObjectError::RangeNotSatisfiable {
            start: r.start,
            end: r.end,
            size,
        }),
        Some(r) => Ok(r.start..r.end.min(size)),
    }
}

/// Checks a key against the contract's grammar.
pub fn validate_key(key: &str) -> Result<(), ObjectError> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(ObjectError::InvalidKey(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_grammar() {
        assert!(validate_key("originals/ab12").is_ok());
        assert!(validate_key("variants/ab/thumb.jpg").is_ok());
        for bad in ["", "/abs", "a//b", "../etc/passwd", "a/./b", "a b", "a/"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }
}
