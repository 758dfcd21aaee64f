//! One generator thread's HTTP/1.1 connections to the read target, for the reads of the mix
//! (items, timeline pages, thumbnails the edge serves): hyper's connection API directly, a
//! request built from a path and a key, and a stack of idle connections.
//!
//! It skips what reqwest does for every request: parse and IDNA-map the URL, hash the pool's
//! key, clone the client, build and copy the header map, arm a redirect policy. Profiled with
//! `perf` against nginx on one pinned CPU, those were most of the generator's cost per read:
//! wrk reached about 104,000 reads/s where the generator through reqwest reached 30,000.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, HOST, HeaderValue, LOCATION};
use hyper_util::rt::TokioIo;

/// How long a read may take before it counts as `timeout`, as the run's reqwest client.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A read's answer, when it is not a failure.
#[derive(Debug)]
pub(super) enum Answer {
    /// A success (2xx), with its whole body.
    Body(Bytes),
    /// A redirection (3xx) to this `Location`, for the caller to follow: it may name another
    /// host, as the edge's 302 to an S3 store's presigned URL does.
    Redirect(String),
}

/// Connections to one `http://` origin, shared by one thread's operations.
pub(super) struct Connections {
    /// `host:port`, connected to and sent as `Host`.
    authority: String,
    host: HeaderValue,
    /// The base URL's path, without its trailing `/`, put before every request's path.
    prefix: String,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
    /// At most this many connections at once: a read waits for one (the wait counts in its
    /// latency, which runs from its intended start), as wrk2's requests wait for one of its
    /// `-c` connections.
    slots: tokio::sync::Semaphore,
}

/// A connection that broke, or a request hyper could not make, as the report names it.
fn transport<E>(_: E) -> String {
    "transport".to_owned()
}

impl Connections {
    /// At most `limit` connections to `base` (`http://host:port[/prefix]`); `None` for any
    /// other scheme, whose reads go through reqwest.
    pub fn new(base: &str, limit: usize) -> Option<Self> {
        let url = reqwest::Url::parse(base).ok()?;
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?;
        let authority = format!("{host}:{}", url.port_or_known_default()?);
        // `Host` names the port only when it is not the scheme's own (RFC 9110, 7.2).
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Some(Self {
            host: HeaderValue::from_str(&host).ok()?,
            authority,
            prefix: url.path().trim_end_matches('/').to_owned(),
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(limit.max(1)),
        })
    }

    /// GETs `path` (`/v1/...`), with `key` as a bearer token unless it is empty, and reads the
    /// whole body.
    ///
    /// # Errors
    /// How it failed, as the run's report names it: the status when it is neither a success
    /// nor a redirection with a `Location`, `timeout` after 30 s, `connect` when no
    /// connection could be made, `transport` for a connection that broke.
    pub async fn get(&self, path: &str, key: &str) -> Result<Answer, String> {
        tokio::time::timeout(TIMEOUT, self.exchange(path, key))
            .await
            .map_err(|_| "timeout".to_owned())?
    }

    async fn exchange(&self, path: &str, key: &str) -> Result<Answer, String> {
        let mut request =
            hyper::Request::get(format!("{}{path}", self.prefix)).header(HOST, self.host.clone());
        if !key.is_empty() {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let mut request = request.body(Empty::new()).map_err(transport)?;
        let _slot = self.slots.acquire().await.map_err(transport)?;
        // An idle connection takes a request once its I/O task has finished the last exchange
        // (`ready`); one the server has closed since errs, and is left for a new one.
        let idle = self.idle.lock().unwrap().pop();
        let (mut sender, reused) = match idle {
            Some(mut sender) => match sender.ready().await {
                Ok(()) => (sender, true),
                Err(_) => (self.connect().await?, false),
            },
            None => (self.connect().await?, false),
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            // Closed between `ready` and the write, before the request went out: sent again
            // on a new connection, as any HTTP client does (hyper hands the unsent request
            // back, so it is never sent twice).
            Err(mut e) if reused && e.message().is_some() => {
                request = e.take_message().expect("checked");
                sender = self.connect().await?;
                sender.send_request(request).await.map_err(transport)?
            }
            Err(_) => return Err("transport".to_owned()),
        };
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        // Back on the stack only once its answer is read whole: it is ready for the next.
        self.idle.lock().unwrap().push(sender);
        match location {
            _ if status.is_success() => Ok(Answer::Body(body)),
            Some(location) if status.is_redirection() => Ok(Answer::Redirect(location)),
            _ => Err(status.as_u16().to_string()),
        }
    }

    /// A new connection, its I/O driven by a task on this thread's runtime.
    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|_| "connect".to_owned())?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "connect".to_owned())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_gives_the_authority_host_and_path_prefix() {
        let plain = Connections::new("http://127.0.0.1:8080", 4).unwrap();
        assert_eq!(plain.authority, "127.0.0.1:8080");
        assert_eq!(plain.host, "127.0.0.1:8080");
        assert_eq!(plain.prefix, "");
        assert_eq!(plain.slots.available_permits(), 4);

        let behind = Connections::new("http://localhost/edge/", 0).unwrap();
        assert_eq!(behind.authority, "localhost:80", "the scheme's port");
        assert_eq!(
            behind.host, "localhost",
            "Host leaves the scheme's port out"
        );
        assert_eq!(behind.prefix, "/edge");
        assert_eq!(behind.slots.available_permits(), 1, "never no connection");

        let v6 = Connections::new("http://[::1]:9000", 1).unwrap();
        assert_eq!(v6.authority, "[::1]:9000");

        assert!(
            Connections::new("https://127.0.0.1:8443", 1).is_none(),
            "TLS goes through reqwest"
        );
        assert!(Connections::new("not a url", 1).is_none());
    }
}
