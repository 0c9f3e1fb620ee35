//! Opt-outs learned on the egress path (SPEC §13): a vendor answer that says
//! the person has opted out becomes a consent change for the patient the
//! request named, before the app sees the end of that answer, so the app's next
//! request is decided by it.
//!
//! Vendors are data: each [`Rule`] names the destination, the HTTP status, a
//! test of the (small, JSON) answer body and the change it means. Today one:
//! Twilio's 21610 ("Attempt to send to unsubscribed recipient", a 400 from the
//! Messages endpoint) → `channels.sms: denied` (Twilio blocks every message to
//! that number from the sender, reminders included, until the patient texts START).
//!
//! The pipeline's Learn step ([`watch`]) wraps the answer's body only when a
//! rule's destination and status match, the request named a patient, the body is
//! JSON, uncompressed and at most [`MAX_PEEK`] bytes: the body is collected
//! (bounded), the rule tested, the change made durable (bounded by
//! [`LEARN_TIMEOUT`]), and only then are the unchanged bytes handed on. Any
//! other answer streams through untouched.

use crate::forward::{BoxError, ProxyBody};
use crate::model::Channel;
use crate::optout::{ConsentChange, OptOuts};
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The largest answer body peeked at. Vendor error bodies are a few hundred bytes.
const MAX_PEEK: usize = 16 << 10;
/// The longest the app's answer waits for the change to be durable.
const LEARN_TIMEOUT: Duration = Duration::from_secs(5);

/// One vendor answer that means "opted out".
pub(crate) struct Rule {
    pub(crate) destination: &'static str,
    pub(crate) vendor: &'static str,
    /// The `kind` label of `consentgate_optouts_learned_total`.
    pub(crate) kind: &'static str,
    pub(crate) status: u16,
    pub(crate) matches: fn(&serde_json::Value) -> bool,
    pub(crate) change: fn() -> ConsentChange,
}

fn twilio_21610(v: &serde_json::Value) -> bool {
    match v.get("code") {
        Some(serde_json::Value::Number(n)) => n.as_u64() == Some(21610),
        Some(serde_json::Value::String(s)) => s.trim() == "21610",
        _ => false,
    }
}

const RULES: &[Rule] = &[Rule {
    destination: "twilio_sms",
    vendor: "twilio",
    kind: "21610",
    status: 400,
    matches: twilio_21610,
    change: || ConsentChange::deny_channel(Channel::Sms),
}];

/// Applies learned opt-outs.
pub(crate) struct Learner {
    pub(crate) optouts: OptOuts,
}

impl Learner {
    async fn learn(&self, rule: &'static Rule, named: Vec<Arc<str>>, request_id: String) {
        let change = (rule.change)();
        for pid in named {
            match self
                .optouts
                .apply(
                    rule.vendor,
                    rule.kind,
                    &pid,
                    &change,
                    &[],
                    &[],
                    Some(&request_id),
                )
                .await
            {
                Ok(_) => {}
                Err(e) => tracing::error!(request_id = %request_id, vendor = rule.vendor,
                    kind = rule.kind, error = %e, "learned opt-out not written"),
            }
        }
    }
}

/// The patients a request named: those of its events that went upstream (all
/// of them in shadow mode), deduplicated.
pub(crate) fn named(e: &crate::enforce::Enforcement) -> Vec<Arc<str>> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<Arc<str>> = Vec::new();
    for (ev, d) in e.events() {
        if ev.verdict.is_drop() && !e.shadow {
            continue;
        }
        for i in d.patients() {
            if let Some(p) = e.patients.get(i).filter(|_| seen.insert(i)) {
                out.push(Arc::from(p));
            }
        }
    }
    out
}

/// The pipeline's Learn step: the body the app gets for an upstream answer.
pub(crate) fn watch(
    learner: Option<&Arc<Learner>>,
    dest: &str,
    named: &[Arc<str>],
    request_id: &str,
    parts: &http::response::Parts,
    body: Incoming,
) -> ProxyBody {
    let rule = learner.and_then(|_| {
        RULES
            .iter()
            .find(|r| r.destination == dest && r.status == parts.status.as_u16())
    });
    let small =
        crate::enforce::declared_length(&parts.headers).is_none_or(|n| n <= MAX_PEEK as u64);
    let json = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    let plain = parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    match (learner, rule) {
        (Some(l), Some(rule)) if !named.is_empty() && small && json && plain => LearnBody {
            inner: body,
            state: State::Collecting(BytesMut::new()),
            learn: Some(Pending {
                learner: l.clone(),
                rule,
                named: named.to_vec(),
                request_id: request_id.to_string(),
            }),
        }
        .boxed_unsync(),
        _ => body.map_err(BoxError::from).boxed_unsync(),
    }
}

enum State {
    /// Reading the answer (at most MAX_PEEK bytes).
    Collecting(BytesMut),
    /// The change is being made durable; then these bytes go out.
    Learning(tokio::task::JoinHandle<()>, Bytes),
    /// Hand these bytes on, then the rest of the body as it comes.
    Passing(Option<Bytes>),
    Done,
}

/// What to learn once the whole answer is in.
struct Pending {
    learner: Arc<Learner>,
    rule: &'static Rule,
    named: Vec<Arc<str>>,
    request_id: String,
}

struct LearnBody {
    inner: Incoming,
    state: State,
    learn: Option<Pending>,
}

impl Body for LearnBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Collecting(buf) => match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(d) => {
                            buf.extend_from_slice(&d);
                            if buf.len() > MAX_PEEK {
                                // Not the small answer we look for: pass it on as it is.
                                let held = std::mem::take(buf).freeze();
                                this.state = State::Passing(Some(held));
                            }
                        }
                        // Trailers: not a small JSON answer either.
                        Err(frame) => {
                            let held = std::mem::take(buf).freeze();
                            this.state = State::Passing(Some(held));
                            if let Ok(t) = frame.into_trailers() {
                                return Poll::Ready(Some(Ok(Frame::trailers(t))));
                            }
                        }
                    },
                    Poll::Ready(Some(Err(e))) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    Poll::Ready(None) => {
                        let all = std::mem::take(buf).freeze();
                        let hit = this.learn.as_ref().is_some_and(|p| {
                            serde_json::from_slice::<serde_json::Value>(&all)
                                .is_ok_and(|v| (p.rule.matches)(&v))
                        });
                        this.state = match (hit, this.learn.take()) {
                            (true, Some(p)) => {
                                let task = tokio::spawn(async move {
                                    let id = p.request_id.clone();
                                    let work = p.learner.learn(p.rule, p.named, p.request_id);
                                    if tokio::time::timeout(LEARN_TIMEOUT, work).await.is_err() {
                                        tracing::error!(request_id = %id,
                                            "learned opt-out not durable within the time allowed");
                                    }
                                });
                                State::Learning(task, all)
                            }
                            _ => State::Passing(Some(all)),
                        };
                    }
                },
                State::Learning(task, held) => match Pin::new(task).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => {
                        let held = std::mem::take(held);
                        this.state = State::Passing(Some(held));
                    }
                },
                State::Passing(held) => {
                    if let Some(h) = held.take() {
                        if !h.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(h))));
                        }
                    }
                    return match Pin::new(&mut this.inner).poll_frame(cx) {
                        Poll::Ready(None) => {
                            this.state = State::Done;
                            Poll::Ready(None)
                        }
                        Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(BoxError::from))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        let held = match &self.state {
            State::Done => return SizeHint::with_exact(0),
            State::Collecting(b) => b.len(),
            State::Learning(_, b) | State::Passing(Some(b)) => b.len(),
            State::Passing(None) => 0,
        } as u64;
        let inner = self.inner.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(inner.lower().saturating_add(held));
        if let Some(u) = inner.upper() {
            h.set_upper(u.saturating_add(held));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_21610_answer_and_nothing_else() {
        let r = &RULES[0];
        assert!((r.matches)(
            &serde_json::json!({"code": 21610, "message": "Attempt to send to unsubscribed recipient", "status": 400})
        ));
        assert!((r.matches)(&serde_json::json!({"code": "21610"})));
        assert!(!(r.matches)(&serde_json::json!({"code": 21211})));
        assert!(!(r.matches)(&serde_json::json!([21610])));
        assert_eq!((r.change)(), ConsentChange::deny_channel(Channel::Sms));
    }
}
