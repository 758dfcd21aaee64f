//! Bounds on the parts of a multipart body that a parser must buffer: the preamble before the
//! first boundary, and each part's headers (RFC 7578 §4, RFC 2046 §5.1.1).
//!
//! axum's parser (multer) holds everything before the first boundary in memory and scans it
//! again as each chunk arrives, so a body whose boundary never comes is buffered whole: four
//! parallel 95 MB bodies took 270 MB, and 16 MB sent in 1 KB writes cost 11 s of CPU. The
//! guard watches the stream as it passes, in linear time, and ends it with an error once the
//! preamble or a part's headers run past [`MAX_HEAD_BYTES`]. File data streams through.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use memchr::memmem::Finder;

/// Most bytes before the first boundary, and in one part's headers. Browsers send no preamble
/// and a few hundred bytes of headers.
pub const MAX_HEAD_BYTES: usize = 16 << 10;

/// Which bound a body broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// No boundary within the first [`MAX_HEAD_BYTES`].
    Preamble,
    /// A part's headers did not end within [`MAX_HEAD_BYTES`].
    PartHeaders,
}

impl Violation {
    pub fn message(self) -> String {
        match self {
            Violation::Preamble => {
                format!("no multipart boundary within the first {MAX_HEAD_BYTES} bytes of the body")
            }
            Violation::PartHeaders => {
                format!("a multipart part's headers run past {MAX_HEAD_BYTES} bytes")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("multipart body over its bounds")]
struct Refused;

enum State {
    /// Before the first delimiter.
    Preamble,
    /// Inside a part's headers, which start at this offset of the body.
    Headers(u64),
    /// Inside a part's body.
    Body,
}

/// Wraps a body stream; records the first [`Violation`] in `violation` and ends the stream.
pub struct Guard<S> {
    inner: S,
    state: State,
    /// `--boundary` for the first delimiter, `\r\n--boundary` for the rest.
    first: Finder<'static>,
    next: Finder<'static>,
    end_of_headers: Finder<'static>,
    /// The last bytes of the previous chunk, so a needle split across chunks is found.
    carry: Vec<u8>,
    /// Offset in the body of the first byte after `carry`.
    offset: u64,
    violation: Arc<OnceLock<Violation>>,
}

impl<S> Guard<S> {
    pub fn new(inner: S, boundary: &str, violation: Arc<OnceLock<Violation>>) -> Self {
        Guard {
            inner,
            state: State::Preamble,
            first: Finder::new(format!("--{boundary}").as_bytes()).into_owned(),
            next: Finder::new(format!("\r\n--{boundary}").as_bytes()).into_owned(),
            end_of_headers: Finder::new(b"\r\n\r\n").into_owned(),
            carry: Vec::new(),
            offset: 0,
            violation,
        }
    }

    /// Advances the state over `chunk`; the first violation, if any. Each byte is searched a
    /// bounded number of times (once, plus the carry), so the cost is linear in the body.
    fn scan(&mut self, chunk: &[u8]) -> Option<Violation> {
        let mut window = std::mem::take(&mut self.carry);
        // Body offset of window[0].
        let base = self.offset - window.len() as u64;
        window.extend_from_slice(chunk);
        self.offset += chunk.len() as u64;
        let end = self.offset;
        let mut at = 0;
        loop {
            let rest = &window[at..];
            match self.state {
                State::Preamble => match self.first.find(rest) {
                    Some(i) if base + (at + i) as u64 > MAX_HEAD_BYTES as u64 => {
                        return Some(Violation::Preamble);
                    }
                    Some(i) => {
                        at += i + self.first.needle().len();
                        self.state = State::Headers(base + at as u64);
                    }
                    None if end > MAX_HEAD_BYTES as u64 => return Some(Violation::Preamble),
                    None => break,
                },
                State::Headers(start) => match self.end_of_headers.find(rest) {
                    Some(i) if base + (at + i) as u64 - start > MAX_HEAD_BYTES as u64 => {
                        return Some(Violation::PartHeaders);
                    }
                    Some(i) => {
                        at += i + 4;
                        self.state = State::Body;
                    }
                    None if end - start > MAX_HEAD_BYTES as u64 => {
                        return Some(Violation::PartHeaders);
                    }
                    None => break,
                },
                State::Body => match self.next.find(rest) {
                    Some(i) => {
                        at += i + self.next.needle().len();
                        self.state = State::Headers(base + at as u64);
                    }
                    None => break,
                },
            }
        }
        // Keep just enough to find a needle that straddles this chunk and the next.
        let keep = self.next.needle().len().min(window.len() - at);
        self.carry = window[window.len() - keep..].to_vec();
        None
    }
}

impl<S, E> Stream for Guard<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.violation.get().is_some() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(violation) = self.scan(&chunk) {
                    let _ = self.violation.set(violation);
                    return Poll::Ready(Some(Err(Box::new(Refused))));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (name, value) = p.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty() && b.len() <= 70)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn run(chunks: Vec<&'static [u8]>) -> (usize, Option<Violation>) {
        let violation = Arc::new(OnceLock::new());
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        let mut guard = Guard::new(stream, "xyz", violation.clone());
        let mut passed = 0;
        while let Some(Ok(chunk)) = guard.next().await {
            passed += chunk.len();
        }
        (passed, violation.get().copied())
    }

    #[tokio::test]
    async fn well_formed_bodies_pass_whatever_their_chunking() {
        let body: &'static [u8] = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nDATA--xy\r\n--xyz\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nt\r\n--xyz--\r\n";
        assert_eq!(run(vec![body]).await, (body.len(), None));
        let bytewise: Vec<&'static [u8]> = body.chunks(1).collect();
        assert_eq!(run(bytewise).await, (body.len(), None));
    }

    #[tokio::test]
    async fn a_missing_boundary_or_endless_headers_stop_the_stream() {
        let junk: &'static [u8] = &[b'a'; 4096];
        let (passed, violation) = run(vec![junk; 100]).await;
        assert_eq!(violation, Some(Violation::Preamble));
        assert!(passed <= MAX_HEAD_BYTES, "{passed}");
        let (_, violation) = run(vec![b"--xyz\r\nX-Long: ", junk, junk, junk, junk, junk]).await;
        assert_eq!(violation, Some(Violation::PartHeaders));
        // The same in one chunk that also holds the end: the bound holds however it arrives.
        let long_preamble: &'static [u8] = Box::leak(
            [vec![b'a'; 20_000], b"--xyz\r\n\r\nDATA\r\n--xyz--".to_vec()]
                .concat()
                .into_boxed_slice(),
        );
        assert_eq!(run(vec![long_preamble]).await.1, Some(Violation::Preamble));
        let long_header: &'static [u8] = Box::leak(
            [
                b"--xyz\r\nX: ".to_vec(),
                vec![b'h'; 17_000],
                b"\r\n\r\nDATA".to_vec(),
            ]
            .concat()
            .into_boxed_slice(),
        );
        assert_eq!(run(vec![long_header]).await.1, Some(Violation::PartHeaders));
    }

    #[test]
    fn boundaries_are_read_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("multipart/form-data; charset=x; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary("text/plain; boundary=abc"), None);
        assert_eq!(boundary("multipart/form-data"), None);
    }
}
