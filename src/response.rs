//! What the app is answered with: request ids, the decision headers, JSON
//! answers (shared by the proxy, the admin listener and the consent API) and the
//! rendering of a [`Refusal`].

use crate::enforce::{Answer, Detail, Refusal, RequestDecision};
use crate::forward::ProxyBody;
use crate::refusal::{self, Explanation, Notice, Shape};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use serde_json::Value;

const H_DECISION: &str = "x-consentgate-decision";
const H_REQUEST_ID: &str = "x-consentgate-request-id";

/// A 128-bit random request id as 32 hex characters.
pub(crate) fn new_request_id() -> String {
    let id: u128 = rand::random();
    format!("{id:032x}")
}

fn empty_body() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn full_body(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body that goes upstream in slices of at most 64 KiB of the same buffer
/// (no copy): the TLS writer, which cannot write vectored, copies each frame it
/// is given into its own buffer, so one 8 MiB frame would be held twice.
pub(crate) fn sliced_body(data: Bytes) -> ProxyBody {
    Sliced(data).map_err(|never| match never {}).boxed_unsync()
}

const SLICE: usize = 64 * 1024;

struct Sliced(Bytes);

impl http_body::Body for Sliced {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.0.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.0.len().min(SLICE);
        let chunk = self.0.split_to(n);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.len() as u64)
    }
}

/// Set `x-consentgate-decision` and `x-consentgate-request-id`.
pub(crate) fn stamp(h: &mut HeaderMap, decision: RequestDecision, request_id: &str) {
    h.insert(
        HeaderName::from_static(H_DECISION),
        HeaderValue::from_static(decision.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(HeaderName::from_static(H_REQUEST_ID), v);
    }
}

/// A JSON answer (never cached); map the body into the listener's body type.
pub(crate) fn json(status: StatusCode, body: &Value) -> Response<Bytes> {
    // A Value always serialises.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Bytes::from(bytes));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The plain JSON answer to a refusal, with the decision headers (listeners
/// whose refusals have no destination: the admin API, a refused request head).
pub(crate) fn plain(r: &Refusal, request_id: &str) -> Response<Bytes> {
    let out = render(r, Shape::Plain, request_id);
    let mut resp = Response::new(Bytes::from(out.body));
    *resp.status_mut() = StatusCode::from_u16(out.status).unwrap_or(StatusCode::BAD_REQUEST);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(out.content_type),
    );
    stamp(resp.headers_mut(), RequestDecision::Blocked, request_id);
    resp
}

fn render(r: &Refusal, shape: Shape, request_id: &str) -> refusal::Rendered {
    let explanation = match &r.detail {
        Detail::Text(d) => Explanation::Detail(d),
        Detail::Reasons(v) => Explanation::Reasons(v),
    };
    let notice = Notice {
        status: r.status,
        error: r.code,
        request_id,
        explanation,
    };
    refusal::render(shape, &notice)
}

/// The app's answer to a refusal, with the decision headers.
pub(crate) fn refusal(r: &Refusal, request_id: &str) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = match r.answer {
        Answer::Synthetic(s) => {
            let mut resp = Response::new(full_body(Bytes::from_static(s.body.as_bytes())));
            *resp.status_mut() = status;
            if !s.body.is_empty() {
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            resp
        }
        Answer::Grpc(code) => grpc_trailers_only(r, code, request_id),
        Answer::Json(shape) => {
            let out = render(r, shape, request_id);
            let mut resp = Response::new(full_body(out.body));
            *resp.status_mut() = StatusCode::from_u16(out.status).unwrap_or(status);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(out.content_type),
            );
            resp
        }
    };
    stamp(resp.headers_mut(), RequestDecision::Blocked, request_id);
    resp
}

/// A gRPC "trailers-only" answer: HTTP 200, `application/grpc`, `grpc-status` and
/// a percent-encoded `grpc-message` (gRPC over HTTP/2) in the only HEADERS frame,
/// which ends the stream. The message reads like the vendor shapes'
/// (`consentgate: <code>: <detail> [request_id …]`).
fn grpc_trailers_only(r: &Refusal, code: u8, request_id: &str) -> Response<ProxyBody> {
    let detail = match &r.detail {
        Detail::Text(d) => d.clone(),
        Detail::Reasons(v) => v.join(", "),
    };
    let message = format!(
        "consentgate: {}: {detail} [request_id {request_id}]",
        r.code
    );
    let mut encoded = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let mut resp = Response::new(empty_body());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(u16::from(code)),
    );
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert(HeaderName::from_static("grpc-message"), v);
    }
    resp
}

/// A 200 with no body and the decision headers (an accepted CONNECT).
pub(crate) fn connect_established(request_id: &str) -> Response<ProxyBody> {
    let mut r = Response::new(empty_body());
    stamp(r.headers_mut(), RequestDecision::Allowed, request_id);
    r
}
