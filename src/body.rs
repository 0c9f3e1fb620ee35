//! Bodies: bounded reading, and Content-Encoding decode / re-encode
//! (gzip, deflate, br, zstd). Decoded size is bounded too (no zip bombs).
//!
//! Every request body a listener hands on is a [`ClientBody`]: the client's
//! body with the `limits.body_read_timeout` deadline, so a slow trickle or a
//! body shorter than its Content-Length ends in time, whether the body is
//! read here or streamed upstream. [`read_limited`] holds bodies in memory
//! against the process-wide [`Budget`] (`limits.inflight_body_bytes`); the
//! reservation lives inside the returned `Bytes`, so it is released exactly
//! when the last copy of the body is freed, on every path (errors and
//! cancellation included).

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::borrow::Cow;
use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyReadError {
    /// Over `max_body_bytes` (413).
    TooLarge,
    /// Unknown Content-Encoding (415), carrying the encoding name.
    UnknownEncoding(String),
    /// Could not be read or decoded (422).
    Unreadable(String),
    /// Not complete within `limits.body_read_timeout` (408), carrying it.
    TimedOut(Duration),
    /// Holding it would pass `limits.inflight_body_bytes` (503 `overloaded`).
    Overloaded,
}

impl Encoding {
    /// From a Content-Encoding header value. Only one coding is accepted.
    pub(crate) fn parse(v: Option<&str>) -> Result<Encoding, BodyReadError> {
        let Some(v) = v else {
            return Ok(Encoding::Identity);
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "deflate" => Ok(Encoding::Deflate),
            "br" => Ok(Encoding::Brotli),
            "zstd" => Ok(Encoding::Zstd),
            other => Err(BodyReadError::UnknownEncoding(
                other
                    .chars()
                    .filter(|c| c.is_ascii_graphic() || *c == ',')
                    .take(64)
                    .collect(),
            )),
        }
    }
}

/// The bytes of request bodies held in memory across all requests at once,
/// bounded by `limits.inflight_body_bytes`. One per process, shared by every
/// listener (the admin thread included).
#[derive(Debug, Default)]
pub(crate) struct Budget {
    used: AtomicU64,
}

impl Budget {
    pub(crate) fn new() -> Arc<Budget> {
        Arc::new(Budget::default())
    }

    #[cfg(test)]
    /// Bytes reserved right now.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserve `n` bytes if that keeps the total within `cap`. The cap is
    /// passed in (not stored) so a config reload applies to the next request.
    pub(crate) fn try_reserve(self: &Arc<Self>, n: u64, cap: u64) -> Option<Reservation> {
        self.take(n, cap).then(|| Reservation {
            budget: self.clone(),
            bytes: n,
        })
    }

    fn take(&self, n: u64, cap: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= cap)
            })
            .is_ok()
    }
}

/// Bytes held against the [`Budget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    /// Hold `total` bytes in all: more from the budget if it allows, or give the
    /// surplus back (a Content-Length reserved up front, trued up at the end).
    fn resize(&mut self, total: u64, cap: u64) -> bool {
        if total > self.bytes {
            if !self.budget.take(total - self.bytes, cap) {
                return false;
            }
        } else {
            self.budget
                .used
                .fetch_sub(self.bytes - total, Ordering::AcqRel);
        }
        self.bytes = total;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A body held in memory, with the budget it holds: freed together.
struct Held {
    data: Vec<u8>,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// What a listener applies to every request body (from `limits`).
#[derive(Clone, Debug)]
pub(crate) struct BodyLimits {
    pub timeout: Duration,
    pub budget: Arc<Budget>,
    /// `limits.inflight_body_bytes` when the request arrived.
    pub budget_cap: u64,
}

/// Why a [`ClientBody`] stopped.
#[derive(Debug)]
pub(crate) enum ClientBodyError {
    /// `limits.body_read_timeout` passed before the body was complete.
    TimedOut(Duration),
    /// The connection failed or the body was malformed.
    Read(Box<dyn std::error::Error + Send + Sync>),
}

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientBodyError::TimedOut(t) => {
                write!(
                    f,
                    "request body not complete within {}",
                    humantime::format_duration(*t)
                )
            }
            ClientBodyError::Read(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientBodyError::TimedOut(_) => None,
            ClientBodyError::Read(e) => Some(e.as_ref()),
        }
    }
}

/// A request body as a listener received it, with its read deadline (counted
/// from when the request head arrived) and the budget [`read_limited`] holds
/// it against.
pub(crate) struct ClientBody<B = hyper::body::Incoming> {
    inner: B,
    deadline: Instant,
    /// Armed the first time the body has to wait for the client.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    limits: Option<BodyLimits>,
    /// Set once the deadline has passed: the body stays failed.
    expired: bool,
}

impl<B> ClientBody<B> {
    pub(crate) fn new(inner: B, limits: BodyLimits) -> ClientBody<B> {
        ClientBody {
            inner,
            deadline: Instant::now() + limits.timeout,
            timer: None,
            limits: Some(limits),
            expired: false,
        }
    }

    fn timeout(&self) -> Duration {
        self.limits.as_ref().map(|l| l.timeout).unwrap_or_default()
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Some(Err(ClientBodyError::TimedOut(this.timeout()))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // A body that keeps arriving but not fast enough ends too.
                if frame.is_data() && Instant::now() >= this.deadline {
                    this.expired = true;
                    return Poll::Ready(Some(Err(ClientBodyError::TimedOut(this.timeout()))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError::Read(e.into())))),
            Poll::Ready(None) => {
                this.timer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::from_std(this.deadline);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.expired = true;
                        Poll::Ready(Some(Err(ClientBodyError::TimedOut(this.timeout()))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.expired && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Read a whole client body, refusing more than `limit` bytes, more time than
/// `limits.body_read_timeout`, or more memory than the budget has left. A
/// declared length is reserved before the first byte is read (refused at once
/// when the budget cannot take it), then trued up to what arrived.
pub(crate) async fn read_limited<B>(
    mut body: ClientBody<B>,
    limit: u64,
) -> Result<Bytes, BodyReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyReadError::TooLarge);
    }
    let expected = declared.unwrap_or(0);
    let mut reservation = match &body.limits {
        Some(l) => Some(
            l.budget
                .try_reserve(expected, l.budget_cap)
                .ok_or(BodyReadError::Overloaded)?,
        ),
        None => None,
    };
    let cap = body.limits.as_ref().map(|l| l.budget_cap).unwrap_or(0);
    // A declared length is allocated once, exactly; a chunked body grows.
    let mut buf = Vec::with_capacity(expected as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e {
            ClientBodyError::TimedOut(t) => BodyReadError::TimedOut(t),
            ClientBodyError::Read(e) => {
                BodyReadError::Unreadable(format!("body could not be read: {e}"))
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing the body is judged by
        };
        let total = buf.len() as u64 + data.len() as u64;
        if total > limit {
            return Err(BodyReadError::TooLarge);
        }
        if let Some(r) = reservation.as_mut() {
            if total > r.bytes && !r.resize(total, cap) {
                return Err(BodyReadError::Overloaded);
            }
        }
        buf.extend_from_slice(&data);
    }
    match reservation {
        Some(mut r) => {
            r.resize(buf.len() as u64, cap);
            Ok(Bytes::from_owner(Held {
                data: buf,
                _reservation: r,
            }))
        }
        None => Ok(Bytes::from(buf)),
    }
}

/// Decode to plain bytes, at most `limit` decoded bytes.
pub(crate) fn decode(
    enc: Encoding,
    data: &[u8],
    limit: u64,
) -> Result<Cow<'_, [u8]>, BodyReadError> {
    // The identity body is read where it lies: no copy of a large batch.
    let reader: Box<dyn Read + '_> = match enc {
        Encoding::Identity => return Ok(Cow::Borrowed(data)),
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
        Encoding::Deflate => {
            // "deflate" is zlib-wrapped per RFC 9110; some clients send raw deflate.
            if data.len() >= 2 && (u16::from(data[0]) << 8 | u16::from(data[1])).is_multiple_of(31)
            {
                Box::new(flate2::read::ZlibDecoder::new(data))
            } else {
                Box::new(flate2::read::DeflateDecoder::new(data))
            }
        }
        Encoding::Brotli => Box::new(brotli::Decompressor::new(data, 4096)),
        Encoding::Zstd => Box::new(
            zstd::stream::read::Decoder::new(data)
                .map_err(|e| BodyReadError::Unreadable(format!("zstd: {e}")))?,
        ),
    };
    let mut out = Vec::new();
    let n = reader
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| BodyReadError::Unreadable(format!("could not decode {enc:?} body: {e}")))?;
    if n as u64 > limit {
        return Err(BodyReadError::TooLarge);
    }
    Ok(Cow::Owned(out))
}

/// Encode again with the same coding the client used.
pub(crate) fn encode(enc: Encoding, data: &[u8]) -> Result<Vec<u8>, String> {
    let io = |e: std::io::Error| format!("could not encode body: {e}");
    match enc {
        Encoding::Identity => Ok(data.to_vec()),
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            w.write_all(data).map_err(io)?;
            w.finish().map_err(io)
        }
        Encoding::Deflate => {
            let mut w = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            w.write_all(data).map_err(io)?;
            w.finish().map_err(io)
        }
        Encoding::Brotli => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(data).map_err(io)?;
            }
            Ok(out)
        }
        Encoding::Zstd => zstd::stream::encode_all(data, 3).map_err(io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body fed by the test, one chunk at a time; it ends when the sender goes.
    struct Chan(tokio::sync::mpsc::Receiver<Bytes>, Option<u64>);

    impl Body for Chan {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.get_mut()
                .0
                .poll_recv(cx)
                .map(|o| o.map(|b| Ok(Frame::data(b))))
        }
        fn size_hint(&self) -> SizeHint {
            self.1.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    fn chan(len: Option<u64>) -> (tokio::sync::mpsc::Sender<Bytes>, Chan) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        (tx, Chan(rx, len))
    }

    fn limits(budget: &Arc<Budget>, cap: u64, timeout: Duration) -> BodyLimits {
        BodyLimits {
            timeout,
            budget: budget.clone(),
            budget_cap: cap,
        }
    }

    #[tokio::test]
    async fn the_budget_is_held_by_the_bytes_and_given_back_on_every_path() {
        let budget = Budget::new();
        let long = Duration::from_secs(60);
        // A declared length is reserved up front, then trued up to what came.
        let (tx, body) = chan(Some(10));
        tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        drop(tx);
        let held = read_limited(ClientBody::new(body, limits(&budget, 100, long)), 1000)
            .await
            .unwrap();
        assert_eq!(&held[..], b"0123456789");
        assert_eq!(budget.used(), 10);
        let copy = held.clone();
        drop(held);
        assert_eq!(budget.used(), 10, "a copy still holds the memory");
        drop(copy);
        assert_eq!(budget.used(), 0);

        // No room for a declared length: refused before reading.
        let _hog = budget.try_reserve(95, 100).unwrap();
        let (_tx, body) = chan(Some(10));
        let r = read_limited(ClientBody::new(body, limits(&budget, 100, long)), 1000).await;
        assert_eq!(r, Err(BodyReadError::Overloaded));
        // A chunked body runs out of room as it arrives; its part is given back.
        let (tx, body) = chan(None);
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        tx.send(Bytes::from_static(b"defgh")).await.unwrap();
        let r = read_limited(ClientBody::new(body, limits(&budget, 100, long)), 1000).await;
        assert_eq!(r, Err(BodyReadError::Overloaded));
        assert_eq!(budget.used(), 95);
        drop(_hog);
        assert_eq!(budget.used(), 0);

        // A read cancelled half-way (the client went away) gives it back too.
        let (tx, body) = chan(Some(50));
        tx.send(Bytes::from_static(b"part")).await.unwrap();
        let read = read_limited(ClientBody::new(body, limits(&budget, 100, long)), 1000);
        let cancelled = tokio::time::timeout(Duration::from_millis(50), read).await;
        assert!(cancelled.is_err());
        assert_eq!(budget.used(), 0);
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_that_stalls_or_trickles_times_out() {
        let budget = Budget::new();
        let t = Duration::from_millis(100);
        let (tx, body) = chan(Some(10));
        tx.send(Bytes::from_static(b"01234")).await.unwrap();
        let started = Instant::now();
        let r = read_limited(ClientBody::new(body, limits(&budget, 100, t)), 1000).await;
        assert_eq!(r, Err(BodyReadError::TimedOut(t)));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(budget.used(), 0);
        drop(tx);
        // Arriving all the time, but not finished by the deadline.
        let (tx, body) = chan(None);
        tokio::spawn(async move {
            while tx.send(Bytes::from_static(b"x")).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let r = read_limited(ClientBody::new(body, limits(&budget, 1 << 20, t)), 1 << 20).await;
        assert_eq!(r, Err(BodyReadError::TimedOut(t)));
    }

    #[test]
    fn round_trips_every_coding() {
        let data = br#"{"data":[{"event_name":"Lead"}]}"#.repeat(20);
        for enc in [
            Encoding::Gzip,
            Encoding::Deflate,
            Encoding::Brotli,
            Encoding::Zstd,
        ] {
            let e = encode(enc, &data).unwrap();
            assert_eq!(&*decode(enc, &e, 1 << 20).unwrap(), &data[..], "{enc:?}");
            assert_eq!(decode(enc, &e, 10), Err(BodyReadError::TooLarge), "{enc:?}");
        }
        assert!(matches!(
            Encoding::parse(Some("foo")),
            Err(BodyReadError::UnknownEncoding(_))
        ));
        assert!(matches!(
            decode(Encoding::Gzip, b"not gzip", 100),
            Err(BodyReadError::Unreadable(_))
        ));
    }
}
