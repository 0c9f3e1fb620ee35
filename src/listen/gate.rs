//! The request-head gate every listener's connections pass through before
//! hyper (SPEC §4 `limits`). It holds each HTTP/1 request head back until the
//! head is complete, so a head that is too slow (`limits.header_read_timeout`:
//! 408) or too big (`limits.max_header_bytes`, or more than 100 header lines:
//! 431), or malformed (400), gets the product's JSON error and the connection
//! is closed; hyper on its own closes a slow head without a word and answers
//! an oversized one with a bare 431. It also closes keep-alive connections
//! that stay idle between requests.
//!
//! To know where the next head starts it follows each request's body framing
//! exactly as hyper does (Content-Length, chunked; RFC 9112 §6); bodies
//! themselves are bounded in [`crate::body::ClientBody`]. HTTP/2 (recognised
//! by its preface) and established CONNECT tunnels pass through untouched.
//! hyper tells the gate when a request's response is finished ([`ConnState`])
//! so an idle timer never runs while a response is still being produced.

use crate::enforce::Refusal;
use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A keep-alive connection with no request for this long is closed quietly
/// (the value hyper's header timeout used to give: clients' pools keep
/// connections 60-90 s, so they may see a close and retry, never a refusal).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// After answering a refusal (or when hyper closes with a request body still
/// unread), keep reading and discarding what the client sends for at most
/// this long / this much, so the client reads the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
/// hyper's (and httparse's) default: more header lines is a 431.
const MAX_HEADERS: usize = 100;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const READ_CHUNK: usize = 4096;

/// Told about every refusal the gate answers (metrics and the log line).
pub(crate) type OnRefused = Arc<dyn Fn(&Refusal, &str) + Send + Sync>;

#[derive(Clone)]
pub(crate) struct GateCfg {
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) on_refused: Option<OnRefused>,
}

const CONNECT_UNDECIDED: u8 = 0;
const CONNECT_TUNNEL: u8 = 1;
const CONNECT_REFUSED: u8 = 2;

/// What the service side tells the gate about one connection: whether a
/// response is still being produced, and how a CONNECT was answered.
#[derive(Default)]
pub(crate) struct ConnState {
    in_flight: AtomicUsize,
    waker: Mutex<Option<Waker>>,
    connect: AtomicU8,
}

impl ConnState {
    /// A request reached the service; the connection is busy until the
    /// returned guard (moved into the response body) is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// A CONNECT was answered: a 2xx turns the connection into a tunnel.
    pub(crate) fn connect_answered(&self, tunnel: bool) {
        let v = if tunnel {
            CONNECT_TUNNEL
        } else {
            CONNECT_REFUSED
        };
        self.connect.store(v, Ordering::Release);
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Register to be woken when the last response finishes; false when it
    /// already has (re-checked after registering, so no wake-up is lost).
    fn wake_when_idle(&self, w: &Waker) -> bool {
        if let Ok(mut slot) = self.waker.lock() {
            *slot = Some(w.clone());
        }
        self.busy()
    }
}

/// One request whose response is not finished yet.
pub(crate) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let w = self.0.waker.lock().ok().and_then(|mut s| s.take());
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// A response body that marks its request finished when hyper drops it.
pub(crate) struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B> http_body::Body for Tracked<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The body framing that follows a head, then the chunked decoder's states
/// (hyper's `ChunkedState`, byte for byte, so both agree where a body ends).
#[derive(Debug)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunked),
    /// A CONNECT head went to hyper; wait for its answer.
    ConnectPending,
    /// HTTP/2 or an established tunnel: bytes pass untouched.
    Pass,
    /// Writing a refusal, then closing.
    Answer(Answer),
    /// Closed: reads see end of file.
    Done,
}

#[derive(Debug)]
struct Answer {
    bytes: Bytes,
    phase: AnswerPhase,
    /// Set when the first byte is written: only once the connection is idle
    /// (no response under way, hyper's output flushed), so the answer never
    /// lands in the middle of another response.
    until: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerPhase {
    Write,
    Flush,
    Shutdown,
    Drain(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
    End,
}

#[derive(Debug)]
struct Chunked {
    state: ChunkState,
    size: u64,
}

impl Chunked {
    fn new() -> Chunked {
        Chunked {
            state: ChunkState::Start,
            size: 0,
        }
    }

    /// How many bytes of `data` belong to the body, and whether it ended
    /// there; `None` when the framing is broken (hyper fails the request and
    /// stops reading the connection, so the gate just stands aside).
    fn consume(&mut self, data: &[u8]) -> Option<(usize, bool)> {
        use ChunkState as S;
        let mut i = 0;
        while i < data.len() {
            if self.state == S::Body {
                let k = (self.size).min((data.len() - i) as u64);
                i += k as usize;
                self.size -= k;
                if self.size == 0 {
                    self.state = S::BodyCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match (self.state, b) {
                (S::Start | S::Size, _) if hex(b).is_some() => {
                    let d = u64::from(hex(b)?);
                    self.size = self.size.checked_mul(16)?.checked_add(d)?;
                    S::Size
                }
                (S::Size | S::SizeLws, b' ' | b'\t') => S::SizeLws,
                (S::Size | S::SizeLws, b';') => S::Extension,
                (S::Size | S::SizeLws | S::Extension, b'\r') => S::SizeLf,
                (S::Extension, b'\n') => return None,
                (S::Extension, _) => S::Extension,
                (S::SizeLf, b'\n') if self.size == 0 => S::EndCr,
                (S::SizeLf, b'\n') => S::Body,
                (S::BodyCr, b'\r') => S::BodyLf,
                (S::BodyLf, b'\n') => S::Start,
                (S::EndCr, b'\r') => S::EndLf,
                (S::Trailer, b'\r') => S::TrailerLf,
                (S::EndCr | S::Trailer, _) => S::Trailer,
                (S::TrailerLf, b'\n') => S::EndCr,
                (S::EndLf, b'\n') => S::End,
                _ => return None,
            };
            if self.state == S::End {
                return Some((i, true));
            }
        }
        Some((i, false))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Where the head in `buf` ends (just past its empty line), or from where to
/// resume the search once more bytes arrive. Leading empty lines are skipped,
/// as httparse does; a line ends with LF or CRLF.
fn find_head_end(buf: &[u8], from: usize) -> Result<usize, usize> {
    let Some(start) = buf.iter().position(|b| *b != b'\r' && *b != b'\n') else {
        return Err(0);
    };
    let mut i = from.max(start);
    while let Some(off) = buf[i..].iter().position(|b| *b == b'\n') {
        let nl = i + off;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (None, _) | (Some(b'\r'), None) => return Err(nl),
            (Some(b'\n'), _) => return Ok(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Ok(nl + 3),
            _ => i = nl + 1,
        }
    }
    Err(buf.len())
}

/// What follows a complete head: the framing hyper will apply to it
/// (RFC 9112 §6.3, in hyper's order), or why it is refused.
fn classify(head: &[u8]) -> Result<State, Refusal> {
    let bad = Refusal::bad_request;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head".into())),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::headers_too_large(format!(
                "more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return Err(bad(format!("malformed request head: {e}"))),
    }
    let http11 = req.version == Some(1);
    let mut te = false;
    let mut te_chunked = false;
    let mut length: Option<u64> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !http11 {
                return Err(bad("Transfer-Encoding in an HTTP/1.0 request".into()));
            }
            te = true;
            length = None;
            te_chunked = std::str::from_utf8(h.value).is_ok_and(|v| {
                v.rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            });
        } else if h.name.eq_ignore_ascii_case("content-length") && !te {
            let n = digits(h.value).ok_or_else(|| bad("invalid Content-Length".into()))?;
            if length.is_some_and(|prev| prev != n) {
                return Err(bad("several different Content-Length values".into()));
            }
            length = Some(n);
        }
    }
    if te && !te_chunked {
        return Err(bad("Transfer-Encoding without chunked last".into()));
    }
    let framing = if te_chunked {
        State::Chunked(Chunked::new())
    } else {
        State::Length(length.unwrap_or(0))
    };
    if req.method == Some("CONNECT") {
        return match framing {
            State::Length(0) => Ok(State::ConnectPending),
            _ => Err(bad("CONNECT with a body".into())),
        };
    }
    Ok(framing)
}

/// Content-Length digits as hyper reads them (no sign, no spaces, no overflow).
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// The whole HTTP/1.1 answer to a refused head: JSON, with the decision headers.
fn answer_bytes(r: &Refusal, request_id: &str) -> Bytes {
    let resp = crate::response::plain(r, request_id);
    let status = resp.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    for (k, v) in resp.headers() {
        out.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or("")));
    }
    let body = resp.into_body();
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// A client connection as hyper sees it, with the heads gated.
pub(crate) struct Gate<IO> {
    io: IO,
    conn: Arc<ConnState>,
    cfg: GateCfg,
    state: State,
    /// Bytes hyper may have: delivered before anything else.
    out: Bytes,
    /// Bytes read from the client, not yet classified (a partial head, or
    /// what followed a body).
    pending: BytesMut,
    /// How far `pending` was searched for the end of the head.
    scanned: usize,
    /// When the head being read began: its first byte, or for the first head
    /// of a connection, the connection itself.
    head_since: Option<Instant>,
    idle_since: Option<Instant>,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    /// The client closed its side.
    eof: bool,
    /// Closing with a body unread: drain until this instant.
    linger: Option<(Instant, usize)>,
    /// No head accepted yet (the HTTP/2 preface can only come first).
    first: bool,
    /// hyper wrote since its last completed flush.
    dirty: bool,
}

enum Fire {
    Timeout,
    Idle,
}

impl<IO> Gate<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    pub(crate) fn new(io: IO, conn: Arc<ConnState>, cfg: GateCfg) -> Gate<IO> {
        let now = Instant::now();
        Gate {
            io,
            conn,
            cfg,
            state: State::Head,
            out: Bytes::new(),
            pending: BytesMut::new(),
            scanned: 0,
            head_since: Some(now),
            idle_since: None,
            timer: Box::pin(tokio::time::sleep_until(now.into())),
            timer_at: None,
            eof: false,
            linger: None,
            first: true,
            dirty: false,
        }
    }

    /// Poll the one timer for `at` (re-armed when the instant changes).
    fn poll_timer(&mut self, cx: &mut Context<'_>, at: Instant) -> bool {
        if self.timer_at != Some(at) {
            self.timer.as_mut().reset(at.into());
            self.timer_at = Some(at);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }

    /// The head deadline or the idle deadline, whichever applies now.
    fn head_timers(&mut self, cx: &mut Context<'_>) -> Option<Fire> {
        if let Some(since) = self.head_since {
            let at = since + self.cfg.header_read_timeout;
            return self.poll_timer(cx, at).then_some(Fire::Timeout);
        }
        if self.conn.busy() && self.conn.wake_when_idle(cx.waker()) {
            self.idle_since = None;
            return None;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        self.poll_timer(cx, since + self.cfg.idle_timeout)
            .then_some(Fire::Idle)
    }

    fn refuse(&mut self, r: Refusal) {
        let id = crate::response::new_request_id();
        if let Some(f) = &self.cfg.on_refused {
            f(&r, &id);
        }
        self.pending = BytesMut::new();
        self.out = Bytes::new();
        self.state = State::Answer(Answer {
            bytes: answer_bytes(&r, &id),
            phase: AnswerPhase::Write,
            until: None,
        });
    }

    fn timed_out(&self) -> Refusal {
        Refusal::request_timeout(format!(
            "request head not complete within limits.header_read_timeout ({})",
            humantime::format_duration(self.cfg.header_read_timeout)
        ))
    }

    fn too_large(&self) -> Refusal {
        Refusal::headers_too_large(format!(
            "request head over limits.max_header_bytes ({} bytes)",
            self.cfg.max_header_bytes
        ))
    }

    /// A body ended: what follows is the next head.
    fn next_head(&mut self) {
        self.state = State::Head;
        self.scanned = 0;
        self.idle_since = None;
        self.head_since = (!self.pending.is_empty()).then(Instant::now);
    }

    /// A complete head of `end` bytes sits at the front of `pending`.
    fn accept_head(&mut self, end: usize) {
        if end > self.cfg.max_header_bytes {
            let r = self.too_large();
            return self.refuse(r);
        }
        match classify(&self.pending[..end]) {
            Ok(next) => {
                self.out = self.pending.split_to(end).freeze();
                self.first = false;
                self.state = next;
                self.scanned = 0;
                self.head_since = None;
                self.idle_since = None;
                if matches!(self.state, State::Length(0)) {
                    self.next_head();
                }
            }
            Err(r) => self.refuse(r),
        }
    }

    /// Body bytes at the front of `data`: how many, and whether the body ends.
    fn consume_body(&mut self, data: &[u8]) -> (usize, bool) {
        match &mut self.state {
            State::Length(rem) => {
                let k = (*rem).min(data.len() as u64);
                *rem -= k;
                (k as usize, *rem == 0)
            }
            State::Chunked(c) => match c.consume(data) {
                Some(x) => x,
                None => {
                    tracing::debug!("malformed chunked body; hyper will refuse it");
                    self.state = State::Pass;
                    (data.len(), false)
                }
            },
            _ => (data.len(), false),
        }
    }

    /// Write the refusal, close our side, drain what the client still sends.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let State::Answer(mut a) = std::mem::replace(&mut self.state, State::Done) else {
            return Poll::Ready(());
        };
        if a.until.is_none() {
            // A pipelined request's response is still under way (woken when it
            // ends), or hyper has not flushed it yet (woken by `poll_flush`).
            let busy = self.conn.busy() && self.conn.wake_when_idle(cx.waker());
            if busy || self.dirty {
                self.state = State::Answer(a);
                return Poll::Pending;
            }
            a.until = Some(Instant::now() + LINGER);
        }
        let until = a.until.unwrap_or_else(Instant::now);
        loop {
            let step = match a.phase {
                AnswerPhase::Write => match Pin::new(&mut self.io).poll_write(cx, &a.bytes) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        a.bytes.advance(n);
                        if a.bytes.is_empty() {
                            a.phase = AnswerPhase::Flush;
                        }
                        Poll::Ready(true)
                    }
                    Poll::Ready(_) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                },
                AnswerPhase::Flush => match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        a.phase = AnswerPhase::Shutdown;
                        Poll::Ready(true)
                    }
                    Poll::Ready(Err(_)) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                },
                AnswerPhase::Shutdown => match Pin::new(&mut self.io).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) if !self.eof => {
                        a.phase = AnswerPhase::Drain(0);
                        Poll::Ready(true)
                    }
                    Poll::Ready(_) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                },
                AnswerPhase::Drain(n) => match self.poll_drain(cx, n) {
                    Poll::Ready(Some(n)) => {
                        a.phase = AnswerPhase::Drain(n);
                        Poll::Ready(true)
                    }
                    Poll::Ready(None) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                },
            };
            match step {
                Poll::Ready(true) => continue,
                Poll::Ready(false) => return Poll::Ready(()),
                Poll::Pending => {
                    if self.poll_timer(cx, until) {
                        return Poll::Ready(());
                    }
                    self.state = State::Answer(a);
                    return Poll::Pending;
                }
            }
        }
    }

    /// Read and discard; `Some(total)` to go on, `None` once the client is
    /// done or the cap is reached.
    fn poll_drain(&mut self, cx: &mut Context<'_>, drained: usize) -> Poll<Option<usize>> {
        let mut tmp = [0u8; READ_CHUNK];
        let mut rb = ReadBuf::new(&mut tmp);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                let total = drained + rb.filled().len();
                Poll::Ready((total < LINGER_BYTES).then_some(total))
            }
            Poll::Ready(_) => {
                self.eof = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The gate's own answer is being written: hyper must not write now.
    fn answering(&self) -> bool {
        matches!(&self.state, State::Answer(a) if a.until.is_some())
    }

    fn deliver(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.out.len().min(buf.remaining());
        buf.put_slice(&self.out[..n]);
        self.out.advance(n);
    }
}

impl<IO> AsyncRead for Gate<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.out.is_empty() {
                this.deliver(buf);
                return Poll::Ready(Ok(()));
            }
            match this.state {
                State::Done => return Poll::Ready(Ok(())),
                State::Answer(_) => {
                    if this.poll_answer(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.state = State::Done;
                }
                State::Pass => {
                    if this.pending.is_empty() {
                        return Pin::new(&mut this.io).poll_read(cx, buf);
                    }
                    this.out = this.pending.split().freeze();
                }
                State::ConnectPending => match this.conn.connect.load(Ordering::Acquire) {
                    CONNECT_TUNNEL => this.state = State::Pass,
                    CONNECT_REFUSED => {
                        this.conn
                            .connect
                            .store(CONNECT_UNDECIDED, Ordering::Release);
                        this.next_head();
                    }
                    // Nothing is read until hyper has answered the CONNECT: what
                    // follows is either tunnel bytes or the next head.
                    _ => {
                        if this.conn.wake_when_idle(cx.waker()) {
                            return Poll::Pending;
                        }
                        // Finished without a decision (cancelled): stand aside.
                        this.state = State::Pass;
                    }
                },
                State::Length(_) | State::Chunked(_) => {
                    if !this.pending.is_empty() {
                        let pending = std::mem::take(&mut this.pending);
                        let (k, ended) = this.consume_body(&pending);
                        this.pending = pending;
                        this.out = this.pending.split_to(k).freeze();
                        if ended {
                            this.next_head();
                        }
                        continue;
                    }
                    // Body bytes go straight into hyper's buffer; whatever
                    // follows the body is taken back as the next head.
                    let before = buf.filled().len();
                    match Pin::new(&mut this.io).poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {}
                        other => return other,
                    }
                    let got = buf.filled().len() - before;
                    if got == 0 {
                        this.eof = true;
                        return Poll::Ready(Ok(()));
                    }
                    let (k, ended) = this.consume_body(&buf.filled()[before..]);
                    if k < got {
                        this.pending.extend_from_slice(&buf.filled()[before + k..]);
                        buf.set_filled(before + k);
                    }
                    if ended {
                        this.next_head();
                    }
                    if k > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                State::Head => {
                    let p = &this.pending[..];
                    let preface_so_far = this.first
                        && !p.is_empty()
                        && H2_PREFACE.starts_with(&p[..p.len().min(H2_PREFACE.len())]);
                    if preface_so_far && p.len() >= H2_PREFACE.len() {
                        this.state = State::Pass;
                        continue;
                    }
                    if !preface_so_far {
                        match find_head_end(&this.pending, this.scanned) {
                            Ok(end) => {
                                this.accept_head(end);
                                continue;
                            }
                            Err(resume) => this.scanned = resume,
                        }
                    }
                    if this.pending.len() > this.cfg.max_header_bytes {
                        let r = this.too_large();
                        this.refuse(r);
                        continue;
                    }
                    match this.head_timers(cx) {
                        Some(Fire::Timeout) => {
                            let r = this.timed_out();
                            this.refuse(r);
                            continue;
                        }
                        Some(Fire::Idle) => {
                            this.state = State::Done;
                            continue;
                        }
                        None => {}
                    }
                    let room = (this.cfg.max_header_bytes + 1 - this.pending.len()).min(READ_CHUNK);
                    let mut tmp = [0u8; READ_CHUNK];
                    let mut rb = ReadBuf::new(&mut tmp[..room]);
                    match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    if rb.filled().is_empty() {
                        // The client closed; a partial head is dropped with it.
                        this.eof = true;
                        this.pending.clear();
                        this.state = State::Done;
                        return Poll::Ready(Ok(()));
                    }
                    if this.head_since.is_none() {
                        this.head_since = Some(Instant::now());
                    }
                    this.idle_since = None;
                    this.pending.extend_from_slice(rb.filled());
                }
            }
        }
    }
}

impl<IO> AsyncWrite for Gate<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.answering() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.dirty = true;
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.answering() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.dirty = true;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            this.dirty = false;
            if matches!(this.state, State::Answer(_)) {
                // A refusal waits for this flush (same task: poll it again).
                cx.waker().wake_by_ref();
            }
        }
        r
    }

    /// hyper closing an HTTP/1 connection with a request body still unread
    /// (an early refusal) or a partial head: close our side, then drain what
    /// the client still sends for a moment, so it reads the answer rather than
    /// a reset. Tunnels and HTTP/2 close plainly.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let unread = match this.state {
            State::Length(_) | State::Chunked(_) => true,
            State::Head => !this.pending.is_empty(),
            State::Answer(_) | State::Done => return Poll::Ready(Ok(())),
            State::Pass | State::ConnectPending => false,
        };
        if !unread || this.eof {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        let (until, mut drained) = match this.linger {
            Some(l) => l,
            None => {
                std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                (Instant::now() + LINGER, 0)
            }
        };
        loop {
            match this.poll_drain(cx, drained) {
                Poll::Ready(Some(n)) => drained = n,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    this.linger = Some((until, drained));
                    if this.poll_timer(cx, until) {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_handles_crlf_lf_and_split_reads() {
        let h = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(find_head_end(h, 0), Ok(h.len() - 4));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0), Ok(24));
        assert_eq!(find_head_end(b"\r\n\r\nGET / HTTP/1.0\r\n\r\n", 0), Ok(22));
        // Split right inside the terminator: resume from the last LF.
        let part = b"GET / HTTP/1.1\r\nHost: a\r\n\r";
        let resume = find_head_end(part, 0).unwrap_err();
        let mut whole = part.to_vec();
        whole.push(b'\n');
        assert_eq!(find_head_end(&whole, resume), Ok(whole.len()));
        assert_eq!(find_head_end(b"\r\n", 0), Err(0));
    }

    #[test]
    fn framing_mirrors_hyper() {
        let f = |h: &str| classify(h.as_bytes());
        assert!(matches!(
            f("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
            Ok(State::Length(12))
        ));
        assert!(matches!(
            f("POST / HTTP/1.1\r\ncontent-length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Ok(State::Chunked(_))
        ));
        assert!(matches!(f("GET / HTTP/1.1\r\n\r\n"), Ok(State::Length(0))));
        assert!(matches!(
            f("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
            Ok(State::ConnectPending)
        ));
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "NOT A REQUEST\r\n\r\n",
        ] {
            assert_eq!(f(bad).unwrap_err().status, 400, "{bad}");
        }
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let r = f(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err();
        assert_eq!(r.status, 431);
    }

    #[test]
    fn chunked_ends_where_hyper_ends() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1";
        let mut c = Chunked::new();
        let (k, ended) = c.consume(body).unwrap();
        assert!(ended);
        assert_eq!(&body[k..], b"GET / HTTP/1.1");
        // Byte by byte gives the same answer.
        let mut c = Chunked::new();
        let mut total = 0;
        for b in body.iter() {
            let (k, ended) = c.consume(std::slice::from_ref(b)).unwrap();
            total += k;
            if ended {
                break;
            }
        }
        assert_eq!(total, body.len() - 14);
        assert!(Chunked::new().consume(b"5\nhello").is_none());
        assert!(Chunked::new().consume(b"zz\r\n").is_none());
    }
}

/// The gate in front of a real hyper server, over an in-memory connection.
#[cfg(test)]
mod with_hyper {
    use super::*;
    use crate::config::Limits;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A server behind the gate: `/slow` answers after 300 ms, every other
    /// path with the length of the body it read.
    fn server(header_timeout: Duration, idle: Duration, max_head: usize) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        let limits = Limits {
            header_read_timeout: header_timeout,
            max_header_bytes: max_head as u64,
            ..Limits::default()
        };
        let mut cfg = crate::listen::gate_cfg(&limits, None);
        cfg.idle_timeout = idle;
        tokio::spawn(async move {
            let handler = |req: hyper::Request<hyper::body::Incoming>| async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let n = req.into_body().collect().await.map(|b| b.to_bytes().len());
                hyper::Response::new(Full::new(Bytes::from(format!("read {}", n.unwrap_or(0)))))
            };
            crate::listen::serve_http(server, &limits, cfg, None, handler).await;
        });
        client
    }

    async fn read_all(c: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .expect("the server closes")
            .unwrap();
        String::from_utf8_lossy(&out).to_string()
    }

    async fn read_some(c: &mut DuplexStream, until: &str) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1024];
        while !String::from_utf8_lossy(&out).contains(until) {
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(&out).to_string()
    }

    #[tokio::test]
    async fn keep_alive_idle_is_not_a_slow_head() {
        let mut c = server(Duration::from_millis(200), IDLE_TIMEOUT, 8192);
        c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_some(&mut c, "read 0")
            .await
            .starts_with("HTTP/1.1 200"));
        // Idle for longer than the head timeout, then a prompt head.
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_some(&mut c, "read 0")
            .await
            .starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn idle_keep_alive_closes_quietly() {
        let mut c = server(Duration::from_secs(5), Duration::from_millis(200), 8192);
        c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let first = read_all(&mut c).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert_eq!(
            first.matches("HTTP/1.1").count(),
            1,
            "no 408 after: {first}"
        );
    }

    #[tokio::test]
    async fn a_response_under_way_is_never_cut_by_a_refusal() {
        let mut c = server(Duration::from_secs(5), IDLE_TIMEOUT, 1024);
        let mut req = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nX-Big: ".to_vec();
        req.extend_from_slice(&[b'a'; 4000]);
        c.write_all(&req).await.unwrap();
        let all = read_all(&mut c).await;
        let ok = all.find("HTTP/1.1 200").expect("the first response");
        let refused = all.find("HTTP/1.1 431").expect("then the refusal");
        assert!(ok < refused, "{all}");
        assert!(all[ok..refused].contains("read 0"), "{all}");
        assert!(all.contains("\"error\":\"headers_too_large\""), "{all}");
    }

    #[tokio::test]
    async fn pipelined_requests_after_chunked_and_sized_bodies() {
        let mut c = server(Duration::from_secs(5), IDLE_TIMEOUT, 8192);
        c.write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
              GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let all = read_all(&mut c).await;
        assert_eq!(all.matches("HTTP/1.1 200").count(), 3, "{all}");
        let order: Vec<usize> = ["read 5", "read 3", "read 0"]
            .iter()
            .map(|s| all.find(s).unwrap_or_else(|| panic!("{s} in {all}")))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{all}");
    }

    #[tokio::test]
    async fn slow_and_malformed_heads_get_json() {
        let mut c = server(Duration::from_millis(200), IDLE_TIMEOUT, 8192);
        c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let all = read_all(&mut c).await;
        assert!(all.starts_with("HTTP/1.1 408 "), "{all}");
        assert!(all.contains("x-consentgate-decision: blocked"), "{all}");
        assert!(all.contains("\"error\":\"request_timeout\""), "{all}");
        let mut c = server(Duration::from_secs(5), IDLE_TIMEOUT, 8192);
        c.write_all(b"POST /a HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n")
            .await
            .unwrap();
        let all = read_all(&mut c).await;
        assert!(all.starts_with("HTTP/1.1 400 "), "{all}");
        assert!(all.contains("\"error\":\"bad_request\""), "{all}");
    }
}
