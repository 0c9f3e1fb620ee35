//! One delivery attempt to a vendor target, and how long to wait before the
//! next: exponential backoff with jitter, `Retry-After` honoured, a token-bucket
//! rate limit per target. The call goes through the proxy's own upstream client
//! (`upstream.resolve`, `upstream.extra_ca`, TLS 1.2+), like every upstream.

use super::target::{Payload, Target};
use crate::forward::UpstreamClient;
use http_body_util::BodyExt;
use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

/// The longest `Retry-After` honoured (a vendor asking for days is capped, and
/// the entry is parked past `sync.max_age` anyway).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);
/// The most of a vendor's answer read (errors only need a few bytes).
const MAX_ANSWER: usize = 16 << 10;
/// Time allowed for the answer's body after its head.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    /// The vendor took it (2xx, or an answer meaning "already so").
    Delivered { status: u16, reason: &'static str },
    /// The patient no longer denies what the target carries (granted again,
    /// or deleted): nothing is owed.
    Superseded,
    /// Worth retrying soon: 429, 408, 5xx, network.
    Retry {
        status: Option<u16>,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The vendor refused (other 4xx: credentials, a bad id): retried with
    /// backoff too, since the operator may fix the target, and parked past
    /// `sync.max_age`.
    Rejected { status: u16, reason: String },
}

impl Outcome {
    /// The `result` label of `consentgate_sync_deliveries_total`.
    pub(super) fn result(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Superseded => "superseded",
            Outcome::Retry { .. } => "retry",
            Outcome::Rejected { .. } => "rejected",
        }
    }
    pub(super) fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status, .. } | Outcome::Rejected { status, .. } => Some(*status),
            Outcome::Retry { status, .. } => *status,
            Outcome::Superseded => None,
        }
    }
    pub(super) fn reason(&self) -> String {
        match self {
            Outcome::Delivered { reason, .. } => (*reason).to_string(),
            Outcome::Superseded => "no_longer_denied".into(),
            Outcome::Retry { reason, .. } | Outcome::Rejected { reason, .. } => reason.clone(),
        }
    }
    pub(super) fn finished(&self) -> bool {
        matches!(self, Outcome::Delivered { .. } | Outcome::Superseded)
    }
}

/// Call the vendor for one entry.
pub(crate) async fn attempt(client: &UpstreamClient, t: &Target, p: &Payload) -> Outcome {
    let credential = match std::fs::read_to_string(&t.cfg.credentials_file) {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            return Outcome::Retry {
                status: None,
                reason: "credentials_file_unreadable".into(),
                retry_after: None,
            }
        }
    };
    let call = t.call(p, &credential);
    let uri = format!("https://{}{}", t.cfg.host, call.path);
    let mut req = http::Request::builder()
        .method(call.method)
        .uri(uri)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("consentgate/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in &call.headers {
        req = req.header(*k, v.as_str());
    }
    let req = match req.body(crate::response::full_body(call.body)) {
        Ok(r) => r,
        Err(_) => {
            return Outcome::Rejected {
                status: 0,
                reason: "request_not_buildable".into(),
            }
        }
    };
    let resp = match client.send(req).await {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Retry {
                status: None,
                reason: format!("upstream_{}", e.kind.as_str()),
                retry_after: None,
            }
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = read_bounded(resp.into_body()).await;
    if (200..300).contains(&status) {
        return Outcome::Delivered {
            status,
            reason: "accepted",
        };
    }
    if let Some(reason) = t.already_done(status, &body) {
        return Outcome::Delivered { status, reason };
    }
    if status == 429 || status == 408 || status >= 500 {
        return Outcome::Retry {
            status: Some(status),
            reason: format!("http_{status}"),
            retry_after,
        };
    }
    Outcome::Rejected {
        status,
        reason: format!("http_{status}"),
    }
}

async fn read_bounded(mut body: hyper::body::Incoming) -> Vec<u8> {
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(f)) = body.frame().await {
            if let Some(d) = f.data_ref() {
                let room = MAX_ANSWER.saturating_sub(out.len());
                out.extend_from_slice(&d[..d.len().min(room)]);
                if out.len() >= MAX_ANSWER {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(BODY_TIMEOUT, read).await;
    out
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3), capped.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let t = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        (t.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// The wait before attempt `attempts + 1`: `initial · 2^(attempts-1)` capped at
/// `max`, with full jitter in its upper half (so many entries failing together
/// do not retry together), and never less than the vendor's `Retry-After`.
pub(crate) fn backoff(
    attempts: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = 2u32.saturating_pow(attempts.saturating_sub(1).min(30));
    let base = initial.saturating_mul(exp).min(max);
    let jittered = base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
    jittered.max(retry_after.unwrap_or(Duration::ZERO))
}

/// A token bucket: `rate` calls a second, bursts of up to `rate` (at least one).
pub(crate) struct RateLimit {
    interval: Duration,
    burst: Duration,
    next: Instant,
}

impl RateLimit {
    pub(super) fn new(rate: f64) -> RateLimit {
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.0001));
        RateLimit {
            interval,
            burst: interval.mul_f64(rate.max(1.0)),
            next: Instant::now(),
        }
    }

    /// Wait for a token.
    pub(super) async fn acquire(&mut self) {
        let now = Instant::now();
        // Unused time accumulates up to one burst.
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        if self.next < earliest {
            self.next = earliest;
        }
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        self.next += self.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..50 {
            let d = backoff(1, i, m, None);
            assert!(d >= Duration::from_millis(500) && d <= i, "{d:?}");
            let d = backoff(4, i, m, None);
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(8),
                "{d:?}"
            );
            assert!(backoff(40, i, m, None) <= m);
            assert!(backoff(1, i, m, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        }
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[tokio::test]
    async fn rate_limit_spaces_calls() {
        let mut r = RateLimit::new(20.0);
        let t0 = Instant::now();
        for _ in 0..6 {
            r.acquire().await;
        }
        // One every 50 ms: no idle time has built up a burst yet.
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
    }
}
