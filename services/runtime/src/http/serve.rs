//! The server loop: connections held to `http.*` (deadlines on request heads, body chunks and
//! writes, a minimum body rate, a cap on connections), and a graceful drain on stop.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;

use super::ApiError;

/// Serves `router` on `listener` until `stop`, then drains: open requests get
/// `drain_timeout_ms` to finish. Unlike `axum::serve`, connections are held to `settings`:
/// a deadline on every request head (which also closes idle keep-alive connections), a
/// deadline between body chunks, a minimum average body rate, a deadline on stalled writes,
/// and a cap on open connections (past it, new connections are closed at once).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    settings: &conveyor_config::HttpSettings,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let min_rate = MinBodyRate {
        bytes_per_sec: settings.min_body_rate_bytes_per_sec,
        grace: std::time::Duration::from_millis(settings.body_rate_grace_ms),
    };
    let router = router
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_millis(settings.body_idle_timeout_ms.max(1)),
        ))
        .layer(axum::middleware::map_request(move |request: Request| {
            std::future::ready(min_rate.apply(request))
        }));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_millis(
            settings.header_read_timeout_ms.max(1),
        ));
    // A client may close its sending side once its request is out and still read the answer.
    builder.http1().half_close(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1)));
    // Shown from the start, at 0, so an alert on them has a series before the first event.
    metrics::counter!("conveyor_connections_refused_total").increment(0);
    metrics::counter!("conveyor_write_stalls_total").increment(0);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // wait a moment rather than spin.
                    tracing::warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("conveyor_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let write_stall = std::time::Duration::from_millis(settings.write_stall_timeout_ms.max(1));
        let header_read_timeout =
            std::time::Duration::from_millis(settings.header_read_timeout_ms.max(1));
        let service =
            hyper_util::service::TowerToHyperService::new(router.clone().map_request(
                |r: hyper::Request<hyper::body::Incoming>| r.map(axum::body::Body::new),
            ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let _open = OpenConnection::counted();
            // hyper's head deadline starts once it reads; a connection that never sends its
            // first byte (while the HTTP/1 or HTTP/2 preface is sniffed) is held to it here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let io = TokioIo::new(WriteDeadline::new(stream, write_stall));
            let connection = builder
                .serve_connection_with_upgrades(io, service)
                .into_owned();
            let _ = watcher.watch(connection).await;
        });
    }
    drop(listener);
    let drain = std::time::Duration::from_millis(settings.drain_timeout_ms);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the drain timeout; closing their connections");
    }
    Ok(())
}

/// Counts a connection in `conveyor_connections_open` for as long as it lives, so an operator
/// sees how close a replica is to `http.max_connections`.
struct OpenConnection;

impl OpenConnection {
    fn counted() -> OpenConnection {
        metrics::gauge!("conveyor_connections_open").increment(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("conveyor_connections_open").decrement(1.0);
    }
}

/// The error a request body ends with when the client sends it too slowly: it arrived
/// slower than `http.min_body_rate_bytes_per_sec` on average once the grace
/// (`http.body_rate_grace_ms`) was over. (A pause longer than `http.body_idle_timeout_ms`
/// ends the body with tower-http's `TimeoutError` instead.)
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived slower than {bytes_per_sec} bytes/s on average")]
pub struct BodyTooSlow {
    bytes_per_sec: u64,
}

/// What a failed read of a request body means for the client, from the error's cause
/// (its source chain, never its text): 408 `body_too_slow` when the client sent too slowly
/// or stopped ([`BodyTooSlow`], tower-http's idle [`TimeoutError`]), and otherwise 400
/// `incomplete_body`, since a body that ends before its declared length or a client that
/// goes away is the client's doing. Both are logged at INFO, as client errors.
///
/// [`TimeoutError`]: tower_http::timeout::TimeoutError
pub fn body_read_error(error: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(slow) = e.downcast_ref::<BodyTooSlow>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_too_slow",
                slow.to_string(),
            );
        }
        if e.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_too_slow",
                "the request body stopped arriving for longer than the idle timeout",
            );
        }
        cause = e.source();
    }
    ApiError::bad_request(
        "incomplete_body",
        "the request body ended early or broke off before it was complete",
    )
}

/// The minimum average rate a request body must arrive at (`http.min_body_rate_*`).
#[derive(Debug, Clone, Copy)]
struct MinBodyRate {
    bytes_per_sec: u64,
    grace: std::time::Duration,
}

impl MinBodyRate {
    fn apply(self, request: Request) -> Request {
        if self.bytes_per_sec == 0 {
            return request;
        }
        request.map(|body| {
            axum::body::Body::new(RateBody {
                inner: body,
                rate: self,
                received: 0,
                waited: std::time::Duration::ZERO,
                waiting: None,
            })
        })
    }

    /// How long the client may have kept the server waiting, in all, once `received` bytes
    /// have arrived: every byte earns `1 / bytes_per_sec` seconds, and the grace is free.
    fn allowance(self, received: u64) -> std::time::Duration {
        let earned =
            std::time::Duration::from_secs_f64(received as f64 / self.bytes_per_sec as f64);
        self.grace.max(earned)
    }
}

/// A request body held to [`MinBodyRate`]. Only the time the server spends waiting on the
/// client counts, from a poll that found nothing until the next chunk; time the handler
/// spends elsewhere (storing the last chunk, say) does not. The body fails with
/// [`BodyTooSlow`] once the wait passes the allowance.
struct RateBody {
    inner: axum::body::Body,
    rate: MinBodyRate,
    received: u64,
    /// Waited on the client so far, not counting the wait under way.
    waited: std::time::Duration,
    /// The wait under way: when it began, and its deadline.
    waiting: Option<(tokio::time::Instant, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl http_body::Body for RateBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                let (received, rate, waited) = (this.received, this.rate, this.waited);
                let (_, deadline) = this.waiting.get_or_insert_with(|| {
                    let now = tokio::time::Instant::now();
                    let left = rate.allowance(received).saturating_sub(waited);
                    (now, Box::pin(tokio::time::sleep_until(now + left)))
                });
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTooSlow {
                        bytes_per_sec: rate.bytes_per_sec,
                    })))),
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(frame) => {
                if let Some((since, _)) = this.waiting.take() {
                    this.waited += since.elapsed();
                }
                if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
                    this.received += data.len() as u64;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes may not stall: a client that stops reading makes every write
/// wait, holding its connection, and a slot under the cap, for as long as it likes. A write or
/// flush that makes no progress for `limit` fails with `TimedOut`, and hyper drops the
/// connection.
struct WriteDeadline<IO> {
    io: IO,
    limit: std::time::Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    fn new(io: IO, limit: std::time::Duration) -> Self {
        WriteDeadline {
            io,
            limit,
            stalled: None,
        }
    }

    /// After the inner write returned `Pending`: pending still, or timed out.
    fn waiting<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        let limit = self.limit;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                metrics::counter!("conveyor_write_stalls_total").increment(1);
                std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client stopped reading the response",
                )))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn progressed<T>(&mut self, ready: std::io::Result<T>) -> std::task::Poll<std::io::Result<T>> {
        self.stalled = None;
        std::task::Poll::Ready(ready)
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.io).poll_write(cx, buf) {
            std::task::Poll::Ready(r) => this.progressed(r),
            std::task::Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            std::task::Poll::Ready(r) => this.progressed(r),
            std::task::Poll::Pending => this.waiting(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.io).poll_flush(cx) {
            std::task::Poll::Ready(r) => this.progressed(r),
            std::task::Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
