//! The object store on S3 (or any S3 API: MinIO, moto), through `aws-sdk-s3`.
//!
//! - `put` streams: a body smaller than one part is a single `PutObject`; a larger one is a
//!   multipart upload whose parts go up concurrently. Memory stays within
//!   `part size × (concurrency + 1)` whatever the object's size. A failing body aborts the
//!   multipart upload, so nothing is stored.
//! - `get` maps a range to a `Range` header, `head` to `HeadObject`, `list` pages through
//!   `ListObjectsV2`, and `promote` is `CopyObject` then `DeleteObject` (an existing target is
//!   replaced, as the trait requires, so a content-addressed key ends up holding the bytes its
//!   caller verified).
//! - Credentials come from the standard AWS chain (`AWS_ACCESS_KEY_ID`, profiles, IRSA…).

use std::ops::Range;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::media::MediaType;

use super::{
    ByteStream, GetObject, ObjectError, ObjectMeta, ObjectStore, resolve_range, validate_key,
};
use crate::error::{ErrorKind, Kinded};
use conveyor_config::ObjectSettings;

/// S3's smallest part (except the last).
const MIN_PART: usize = 5 * 1024 * 1024;
/// The type of an object whose bytes sniff as nothing Conveyor accepts.
const OCTET_STREAM: &str = "application/octet-stream";

/// The object store on an S3 bucket (or any S3 API), every key under an optional prefix.
/// Bodies of at least one part (`objects.part_size_mib`, never under S3's 5 MiB minimum) go
/// up as multipart uploads with up to `objects.upload_concurrency` parts in flight. A `put`
/// stores media keys (`originals/`, `variants/`, also under `private/`) with the
/// `Cache-Control` Conveyor's edge would send, and any key with the `Content-Type` its
/// extension or leading bytes name, when either names a known media type.
pub struct S3ObjectStore {
    client: Client,
    bucket: String,
    /// Prepended to every key, with its trailing `/`; empty for the bucket's root.
    prefix: String,
    part_size: usize,
    concurrency: usize,
}

/// An SDK error that is not a request's outcome (a builder refusing its input).
fn io(e: impl std::error::Error) -> ObjectError {
    // The SDK's `Display` says only "service error"; the context has the code and message.
    ObjectError::Storage {
        kind: ErrorKind::Permanent,
        message: format!("s3: {}", aws_sdk_s3::error::DisplayErrorContext(e)),
    }
}

/// A failed request, by its kind: the one place this backend maps the SDK's errors.
///
/// - *Not found* only for a missing key (`NoSuchKey`; `HeadObject`'s bodiless 404 is checked
///   where it is sent): a missing bucket or a wrong endpoint is the deployment's fault, not the
///   object's, and must not read as "this upload has no bytes".
/// - *Permanent* only for a request refused for what it is: 400, 411, 412, 413 and 416, unless
///   S3's error code says the request merely expired or arrived late; for `NoSuchUpload` and
///   `InvalidObjectState` (an aborted or completed multipart upload, an archived object),
///   which no retry brings back; and for a request the SDK could not build.
/// - *Transient* for the rest: no answer, throttling, 5xx, and the refusals that hit every
///   request alike until an operator acts (403 from rotated credentials or a skewed clock,
///   404 `NoSuchBucket`, 409), so records wait instead of being dead-lettered.
fn s3<E>(e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> ObjectError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    use aws_sdk_s3::error::SdkError;
    const LATE: [&str; 5] = [
        "RequestTimeout",
        "ExpiredToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "RequestExpired",
    ];
    let kind = match &e {
        SdkError::ServiceError(context) => {
            let code = context.err().code().unwrap_or_default();
            match context.raw().status().as_u16() {
                _ if code == "NoSuchKey" => ErrorKind::NotFound,
                _ if LATE.contains(&code) => ErrorKind::Transient,
                // A multipart upload that was aborted or completed, an archived object: no
                // retry brings them back.
                _ if code == "NoSuchUpload" || code == "InvalidObjectState" => ErrorKind::Permanent,
                400 | 411 | 412 | 413 | 416 => ErrorKind::Permanent,
                _ => ErrorKind::Transient,
            }
        }
        SdkError::ConstructionFailure(_) => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    };
    ObjectError::Storage {
        kind,
        message: format!("s3: {}", aws_sdk_s3::error::DisplayErrorContext(e)),
    }
}

fn invalid(message: String) -> ObjectError {
    ObjectError::Storage {
        kind: ErrorKind::Permanent,
        message: format!("s3: {message}"),
    }
}

impl S3ObjectStore {
    /// Connects to `bucket`, keeping every object under `prefix` (no slashes at its ends; empty
    /// for the whole bucket), as [`ObjectsUri::S3`](conveyor_config::ObjectsUri::S3) names
    /// them, with the endpoint, region and addressing style from `settings`.
    ///
    /// # Errors
    /// None today (the SDK connects lazily); the `Result` is the trait's error type, so a
    /// future check fits.
    pub async fn connect(
        bucket: &str,
        prefix: &str,
        settings: &ObjectSettings,
    ) -> Result<Self, ObjectError> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut config =
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.path_style);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Ok(S3ObjectStore {
            client: Client::from_conf(config.build()),
            bucket: bucket.to_owned(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            part_size: ((settings.part_size_mib as usize) * 1024 * 1024).max(MIN_PART),
            concurrency: settings.upload_concurrency.max(1),
        })
    }

    /// Sets the bucket's lifecycle rules: `incoming/` objects expire and unfinished multipart
    /// uploads are aborted after `days` (S3's own sweeper for uploads never completed), and,
    /// with `receipt_days`, event receipts (`events/`) expire after that many days (the
    /// `event_id` idempotency window). Replaces the bucket's lifecycle configuration.
    pub async fn install_upload_lifecycle(
        &self,
        days: i32,
        receipt_days: Option<i32>,
    ) -> Result<(), ObjectError> {
        use aws_sdk_s3::types::{
            AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, ExpirationStatus,
            LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
        };
        let rule = LifecycleRule::builder()
            .id("conveyor-expire-incoming")
            .status(ExpirationStatus::Enabled)
            .filter(
                LifecycleRuleFilter::builder()
                    .prefix(format!("{}incoming/", self.prefix))
                    .build(),
            )
            .expiration(LifecycleExpiration::builder().days(days).build())
            .abort_incomplete_multipart_upload(
                AbortIncompleteMultipartUpload::builder()
                    .days_after_initiation(days)
                    .build(),
            )
            .build()
            .map_err(io)?;
        let mut rules = vec![rule];
        if let Some(receipt_days) = receipt_days {
            rules.push(
                LifecycleRule::builder()
                    .id("conveyor-expire-event-receipts")
                    .status(ExpirationStatus::Enabled)
                    .filter(
                        LifecycleRuleFilter::builder()
                            .prefix(format!("{}events/", self.prefix))
                            .build(),
                    )
                    .expiration(LifecycleExpiration::builder().days(receipt_days).build())
                    .build()
                    .map_err(io)?,
            );
        }
        self.client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket)
            .lifecycle_configuration(
                BucketLifecycleConfiguration::builder()
                    .set_rules(Some(rules))
                    .build()
                    .map_err(io)?,
            )
            .send()
            .await
            .map_err(s3)?;
        Ok(())
    }

    /// The client and bucket, for operations beyond the trait (presigning, lifecycle rules).
    pub fn client(&self) -> (&Client, &str) {
        (&self.client, &self.bucket)
    }

    fn full(&self, key: &str) -> Result<String, ObjectError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// The first [`SNIFF_BYTES`](crate::media::SNIFF_BYTES) of the object at `full` (a key
    /// with this store's prefix), for sniffing its type.
    async fn leading_bytes(&self, full: &str) -> Result<Bytes, ObjectError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .range(format!("bytes=0-{}", crate::media::SNIFF_BYTES - 1))
            .send()
            .await;
        match out {
            Ok(out) => Ok(out
                .body
                .collect()
                .await
                .map_err(|e| ObjectError::Storage {
                    kind: ErrorKind::Transient,
                    message: format!("s3: reading {full}: {e}"),
                })?
                .into_bytes()),
            // An empty object has no range to give.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                Ok(Bytes::new())
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                Err(ObjectError::NotFound)
            }
            Err(e) => Err(s3(e)),
        }
    }

    async fn multipart(
        &self,
        key: &str,
        first: Bytes,
        mut body: ByteStream,
        (cache, content_type): (Option<&str>, Option<&str>),
    ) -> Result<u64, ObjectError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_cache_control(cache.map(str::to_owned))
            .set_content_type(content_type.map(str::to_owned))
            .send()
            .await
            .map_err(s3)?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| invalid("no upload id".into()))?
            .to_owned();
        let result = async {
            let mut in_flight = FuturesUnordered::new();
            let mut parts = Vec::new();
            let mut size = first.len() as u64;
            let mut number = 1;
            let mut next = Some(first);
            loop {
                if let Some(part) = next.take() {
                    let (client, bucket, key, upload_id) = (
                        self.client.clone(),
                        self.bucket.clone(),
                        key.to_owned(),
                        upload_id.clone(),
                    );
                    in_flight.push(async move {
                        let out = client
                            .upload_part()
                            .bucket(bucket)
                            .key(key)
                            .upload_id(upload_id)
                            .part_number(number)
                            .body(S3Body::from(part))
                            .send()
                            .await
                            .map_err(s3)?;
                        Ok::<_, ObjectError>(
                            CompletedPart::builder()
                                .part_number(number)
                                .set_e_tag(out.e_tag)
                                .build(),
                        )
                    });
                    number += 1;
                }
                // Keep at most `concurrency` parts in flight: memory stays bounded.
                while in_flight.len() >= self.concurrency {
                    parts.push(in_flight.next().await.expect("non-empty")?);
                }
                match read_part(&mut body, self.part_size).await? {
                    Some(part) => {
                        size += part.len() as u64;
                        next = Some(part);
                    }
                    None => break,
                }
            }
            while let Some(part) = in_flight.next().await {
                parts.push(part?);
            }
            parts.sort_by_key(|p| p.part_number());
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(s3)?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}

/// The headers S3 should serve an object with, so that a CDN (or a presigned GET) in front of
/// the bucket gets what Conveyor's own edge would send: media keys are immutable, private ones
/// are for private caches only, and the type comes from the extension or the leading bytes.
fn object_headers(key: &str, head: &[u8]) -> (Option<&'static str>, Option<&'static str>) {
    let media = key.trim_start_matches("private/");
    let cache = if !(media.starts_with("originals/") || media.starts_with("variants/")) {
        None
    } else if key.starts_with("private/") {
        Some("private, max-age=3600, immutable")
    } else {
        Some("public, max-age=31536000, immutable")
    };
    let by_extension = key
        .rsplit_once('.')
        .and_then(|(_, ext)| MediaType::from_extension(ext));
    let content_type = by_extension
        .or_else(|| MediaType::sniff(head))
        .map(MediaType::content_type);
    (cache, content_type)
}

/// Reads up to `size` bytes from the body; `None` once it is exhausted.
async fn read_part(body: &mut ByteStream, size: usize) -> Result<Option<Bytes>, ObjectError> {
    let mut part = BytesMut::with_capacity(size);
    while part.len() < size {
        match body.next().await {
            Some(Ok(chunk)) => part.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(ObjectError::Body(e)),
            None => break,
        }
    }
    Ok(if part.is_empty() {
        None
    } else {
        Some(part.freeze())
    })
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    async fn put(&self, key: &str, body: ByteStream) -> Result<ObjectMeta, ObjectError> {
        let full = self.full(key)?;
        // Parts are read until the body ends, and once more after: a fused stream may be
        // polled past its end (many streams, `unfold` among them, panic otherwise).
        let mut body: ByteStream = body.fuse().boxed();
        let first = read_part(&mut body, self.part_size)
            .await?
            .unwrap_or_default();
        let size = if first.len() < self.part_size {
            let size = first.len() as u64;
            let (cache, content_type) = object_headers(key, &first);
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .set_cache_control(cache.map(str::to_owned))
                .set_content_type(content_type.map(str::to_owned))
                .body(S3Body::from(first))
                .send()
                .await
                .map_err(s3)?;
            size
        } else {
            let headers = object_headers(key, &first);
            self.multipart(&full, first, body, headers).await?
        };
        Ok(ObjectMeta {
            key: key.to_owned(),
            size,
        })
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<GetObject, ObjectError> {
        let full = self.full(key)?;
        let size = self.head(key).await?.ok_or(ObjectError::NotFound)?.size;
        let range = resolve_range(range, size)?;
        let mut request = self.client.get_object().bucket(&self.bucket).key(&full);
        if range != (0..size) {
            request = request.range(format!("bytes={}-{}", range.start, range.end - 1));
        }
        let out = request.send().await.map_err(|e| match s3(e) {
            e if e.kind() == ErrorKind::NotFound => ObjectError::NotFound,
            e => e,
        })?;
        let body = futures::stream::unfold(out.body, |mut body| async move {
            body.next()
                .await
                .map(|chunk| (chunk.map_err(std::io::Error::other), body))
        })
        .boxed();
        Ok(GetObject { size, range, body })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        let full = self.full(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(s3(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let full = self.full(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(s3)?;
        Ok(())
    }

    async fn promote(&self, from: &str, to: &str) -> Result<(), ObjectError> {
        let (source, target) = (self.full(from)?, self.full(to)?);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&source)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
                return Err(ObjectError::NotFound);
            }
            Err(e) => return Err(s3(e)),
        };
        // The target's headers follow its key (public or private) and its own bytes: never the
        // source's metadata, which a client's presigned PUT chose (`text/html` on a JPEG once
        // made S3 serve a content address as a page). CopyObject takes objects up to 5 GiB,
        // far above the upload limit, and replaces the target atomically.
        let head = self.leading_bytes(&source).await?;
        let (cache, content_type) = object_headers(to, &head);
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .key(&target)
            .copy_source(format!("{}/{}", self.bucket, source))
            .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
            .set_cache_control(cache.map(str::to_owned))
            .content_type(content_type.unwrap_or(OCTET_STREAM))
            .send()
            .await
            .map_err(s3)?;
        self.delete(from).await
    }

    async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, ObjectError> {
        // A conditional write (`If-None-Match: *`): S3 answers 412 Precondition Failed when
        // the key exists, and 409 ConditionalRequestConflict to the loser of a race.
        let outcome = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key)?)
            .if_none_match("*")
            .body(S3Body::from(bytes))
            .send()
            .await;
        match outcome {
            Ok(_) => Ok(true),
            Err(e)
                if e.raw_response()
                    .is_some_and(|r| matches!(r.status().as_u16(), 409 | 412)) =>
            {
                Ok(false)
            }
            Err(e) => Err(s3(e)),
        }
    }

    async fn presigned_get(
        &self,
        key: &str,
        ttl: std::time::Duration,
        content_type: &str,
    ) -> Result<Option<String>, ObjectError> {
        let full = self.full(key)?;
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).map_err(io)?;
        // Response header overrides, part of the signature: S3 serves the type Conveyor
        // sniffed whatever the object's metadata says, and only media inline. (S3 has no
        // override for `X-Content-Type-Options`; the CDN in front adds it, infra/cdn.)
        let inline = content_type.starts_with("image/") || content_type.starts_with("video/");
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .response_content_type(content_type)
            .set_response_content_disposition((!inline).then(|| "attachment".to_owned()))
            .presigned(config)
            .await
            .map_err(s3)?;
        Ok(Some(request.uri().to_owned()))
    }

    async fn presigned_put(
        &self,
        key: &str,
        ttl: std::time::Duration,
        content_type: &str,
    ) -> Result<Option<String>, ObjectError> {
        let full = self.full(key)?;
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).map_err(io)?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .content_type(content_type)
            .presigned(config)
            .await
            .map_err(s3)?;
        Ok(Some(request.uri().to_owned()))
    }

    async fn presigned_multipart(
        &self,
        key: &str,
        parts: u32,
        ttl: std::time::Duration,
        content_type: &str,
    ) -> Result<Option<(String, Vec<String>)>, ObjectError> {
        let full = self.full(key)?;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .content_type(content_type)
            .send()
            .await
            .map_err(s3)?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| invalid("no upload id".into()))?
            .to_owned();
        let mut urls = Vec::with_capacity(parts as usize);
        for number in 1..=parts as i32 {
            let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).map_err(io)?;
            let request = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .part_number(number)
                .presigned(config)
                .await
                .map_err(s3)?;
            urls.push(request.uri().to_owned());
        }
        Ok(Some((upload_id, urls)))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), ObjectError> {
        let full = self.full(key)?;
        let parts = etags
            .iter()
            .enumerate()
            .map(|(i, etag)| {
                CompletedPart::builder()
                    .part_number(i as i32 + 1)
                    .e_tag(etag)
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(s3)?;
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), ObjectError> {
        let full = self.full(key)?;
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Completed, aborted before, or expired by a lifecycle rule: nothing to free.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_no_such_upload()) =>
            {
                Ok(())
            }
            Err(e) => Err(s3(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{prefix}", self.prefix))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(s3)?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: key.to_owned(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on a fresh bucket of the S3 API named by `CONVEYOR_TEST_S3`, or `None` after a
    /// loud skip notice.
    pub(crate) async fn test_store(part_size_mib: u64) -> Option<S3ObjectStore> {
        let endpoint = crate::testing::engine(crate::testing::S3, "an S3 test")?;
        let settings = ObjectSettings {
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            path_style: true,
            part_size_mib,
            upload_concurrency: 3,
            ..ObjectSettings::default()
        };
        let bucket = format!("conveyor-test-{}", uuid::Uuid::new_v4().simple());
        let store = S3ObjectStore::connect(&bucket, "some/prefix", &settings)
            .await
            .unwrap();
        store
            .client
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("create bucket");
        Some(store)
    }

    #[tokio::test]
    async fn conformance() {
        if let Some(store) = test_store(5).await {
            super::super::conformance::run(&store).await;
        }
    }

    #[tokio::test]
    async fn large_bodies_go_up_in_concurrent_parts_and_failures_store_nothing() {
        let Some(store) = test_store(5).await else {
            return;
        };
        // 21 MiB in 64 KiB chunks: five parts, four of 5 MiB and one of 1 MiB.
        let chunk = Bytes::from((0..65_536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        // An `unfold` stream, like the upload edge's, panics if polled after its end.
        let source = chunk.clone();
        let body = futures::stream::unfold(0, move |n| {
            let chunk = source.clone();
            async move { (n < 336).then(|| (Ok::<_, std::io::Error>(chunk), n + 1)) }
        });
        let meta = store.put("originals/big", body.boxed()).await.unwrap();
        assert_eq!(meta.size, 21 * 1024 * 1024);
        let back = store.get_bytes("originals/big").await.unwrap();
        assert_eq!(back.len(), 21 * 1024 * 1024);
        assert!(back.chunks(65_536).all(|c| c == &chunk[..]));
        let tail = store
            .get("originals/big", Some(21 * 1024 * 1024 - 3..u64::MAX))
            .await
            .unwrap();
        assert_eq!(tail.range.end - tail.range.start, 3);

        // A body that fails after two parts aborts the multipart upload: nothing appears.
        let mut failing: Vec<std::io::Result<Bytes>> =
            (0..170).map(|_| Ok(chunk.clone())).collect();
        failing.push(Err(std::io::Error::other("client went away")));
        let err = store
            .put("originals/broken", futures::stream::iter(failing).boxed())
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectError::Body(_)), "{err}");
        assert_eq!(store.head("originals/broken").await.unwrap(), None);
        let (client, bucket) = store.client();
        let pending = client
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        assert!(
            pending.uploads().is_empty(),
            "the failed upload was aborted"
        );
    }

    #[tokio::test]
    async fn the_upload_lifecycle_rule_expires_incoming() {
        let Some(store) = test_store(5).await else {
            return;
        };
        store.install_upload_lifecycle(2, Some(7)).await.unwrap();
        let (client, bucket) = store.client();
        let rules = client
            .get_bucket_lifecycle_configuration()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        let rule = &rules.rules()[0];
        assert_eq!(rule.expiration().and_then(|e| e.days()), Some(2));
        let filter = rule.filter().and_then(|f| f.prefix()).unwrap_or_default();
        assert_eq!(filter, "some/prefix/incoming/");
        let receipts = &rules.rules()[1];
        assert_eq!(receipts.expiration().and_then(|e| e.days()), Some(7));
        let filter = receipts
            .filter()
            .and_then(|f| f.prefix())
            .unwrap_or_default();
        assert_eq!(filter, "some/prefix/events/");
    }

    #[tokio::test]
    async fn presigned_gets_serve_the_bytes_without_credentials() {
        let Some(store) = test_store(5).await else {
            return;
        };
        store
            .put_bytes(
                "variants/x/thumb.jpg",
                Bytes::from_static(b"thumbnail bytes"),
            )
            .await
            .unwrap();
        let url = store
            .presigned_get(
                "variants/x/thumb.jpg",
                std::time::Duration::from_secs(60),
                "image/jpeg",
            )
            .await
            .unwrap()
            .unwrap();
        let (head, fetched) = reqwest_get(&url).await;
        assert_eq!(fetched, b"thumbnail bytes");
        assert!(head.contains("content-type: image/jpeg"), "{head}");
        assert!(
            !head.contains("content-disposition"),
            "media is inline: {head}"
        );
    }

    /// Reported: a direct upload whose PUT said `Content-Type: text/html` was served by S3 as
    /// `text/html` through the redirect. The promoted object's type is sniffed from its bytes,
    /// whatever the source's metadata says; a presigned GET pins the type it is given, and
    /// what is not media only as an attachment.
    #[tokio::test]
    async fn a_promoted_object_is_typed_by_its_bytes_not_by_its_uploader() {
        let Some(store) = test_store(5).await else {
            return;
        };
        let jpeg = [&[0xFFu8, 0xD8, 0xFF, 0xE0][..], &[0u8; 60]].concat();
        let (client, bucket) = store.client();
        client
            .put_object()
            .bucket(bucket)
            .key(store.full("incoming/forged").unwrap())
            .content_type("text/html")
            .body(S3Body::from(jpeg.clone()))
            .send()
            .await
            .unwrap();
        store
            .promote("incoming/forged", "originals/forged")
            .await
            .unwrap();
        let head = client
            .head_object()
            .bucket(bucket)
            .key(store.full("originals/forged").unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_type(), Some("image/jpeg"));

        let url = store
            .presigned_get(
                "originals/forged",
                std::time::Duration::from_secs(60),
                "application/octet-stream",
            )
            .await
            .unwrap()
            .unwrap();
        // S3 serves a presigned GET's signed `response-*` overrides; moto 5.1 ignores them,
        // so the URL is checked to carry them.
        assert!(
            url.contains("response-content-type=application%2Foctet-stream"),
            "{url}"
        );
        assert!(
            url.contains("response-content-disposition=attachment"),
            "{url}"
        );
        let (_, bytes) = reqwest_get(&url).await;
        assert_eq!(bytes, jpeg, "the signature covers the overrides");
    }

    /// A plain HTTP GET with no AWS credentials, as a browser or CDN would make it: the
    /// response's head, lowercased, and its body.
    async fn reqwest_get(url: &str) -> (String, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("http://").expect("loopback test endpoint");
        let (host, path) = rest.split_once('/').unwrap();
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let at = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (
            String::from_utf8_lossy(&response[..at]).to_lowercase(),
            response[at..].to_vec(),
        )
    }
}
