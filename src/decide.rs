//! Decide: the default policy of SPEC §6, applied to one event. Pure: it reads the
//! matched consent records and the request context, and returns a verdict that the
//! destination adapter applies to the event.

use crate::consent::ConsentView;
use crate::model::{Category, Channel, DestKind, Grant};
use std::collections::HashMap;

/// Why an event was dropped, tagged or passed. Label values of
/// `consentgate_events_total{reason}` and of the audit `reason` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    UnknownPatient,
    ConsentDenied,
    ChannelDenied,
    ConsentStale,
    SaleShareOptOut,
    Gpc,
    LimitSensitive,
    Granted,
    /// The egress guard found an identifier of someone the request may not send for.
    ForeignIdentifier,
}

impl Reason {
    /// The policy step that produced this reason (the audit `rule` field).
    pub(crate) fn rule(self) -> &'static str {
        match self {
            Reason::ConsentStale => "policy.stale_fail_closed",
            Reason::UnknownPatient => "policy.1_identify",
            Reason::ConsentDenied | Reason::ChannelDenied => "policy.2_consent",
            Reason::SaleShareOptOut | Reason::Gpc => "policy.3_sale_share",
            Reason::LimitSensitive => "policy.4_limit_sensitive",
            Reason::Granted => "policy.5_forward",
            Reason::ForeignIdentifier => "guard.foreign_identifier",
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownPatient => "unknown_patient",
            Reason::ConsentDenied => "consent_denied",
            Reason::ChannelDenied => "channel_denied",
            Reason::ConsentStale => "consent_stale",
            Reason::SaleShareOptOut => "sale_share_opt_out",
            Reason::Gpc => "gpc",
            Reason::LimitSensitive => "limit_sensitive",
            Reason::Granted => "granted",
            Reason::ForeignIdentifier => "foreign_identifier",
        }
    }
}

/// Meta's limited-data-use geography (other platforms only use the flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ldu {
    pub(crate) country: u32,
    pub(crate) state: u32,
}

/// What to do with an event that is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    /// Strip identity fields (sale/share opt-out or GPC on an ad platform).
    pub(crate) strip_identity: bool,
    /// Set the platform's limited-data-use / consent-denied signal.
    pub(crate) ldu: Option<Ldu>,
    /// Reduce URLs to scheme://host/ and strip content/search/custom fields.
    pub(crate) limit_sensitive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventVerdict {
    Drop(Reason),
    Keep(Keep),
}

impl EventVerdict {
    pub fn is_drop(&self) -> bool {
        matches!(self, EventVerdict::Drop(_))
    }
    /// The reason recorded for the event: the drop reason, or the strongest
    /// step that changed it, or `granted`.
    pub(crate) fn reason(&self, gpc_trigger: bool) -> Reason {
        match self {
            EventVerdict::Drop(r) => *r,
            EventVerdict::Keep(k) if k.strip_identity || k.ldu.is_some() => {
                if gpc_trigger {
                    Reason::Gpc
                } else {
                    Reason::SaleShareOptOut
                }
            }
            EventVerdict::Keep(k) if k.limit_sensitive => Reason::LimitSensitive,
            EventVerdict::Keep(_) => Reason::Granted,
        }
    }
}

/// Per-category policy from the config (`categories:`), shipped defaults otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub(crate) defaults: HashMap<Category, Grant>,
    pub(crate) fail_closed_when_stale: HashMap<Category, bool>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            defaults: Category::ALL
                .iter()
                .map(|c| (*c, c.shipped_default()))
                .collect(),
            fail_closed_when_stale: Category::ALL
                .iter()
                .map(|c| (*c, c.shipped_fail_closed_when_stale()))
                .collect(),
        }
    }
}

/// The request-level context one event is decided in.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    pub category: Category,
    pub channel: Option<Channel>,
    pub kind: DestKind,
    /// The request carried `Sec-GPC: 1`.
    pub header_gpc: bool,
    /// The consent source is older than `max_staleness`.
    pub stale: bool,
}

/// The outcome for one event, with the trace `explain` prints.
#[derive(Clone, Debug)]
pub struct Decision {
    pub verdict: EventVerdict,
    /// Whether GPC (header or record) triggered the tagging.
    pub(crate) gpc_trigger: bool,
    /// The records the event matched (for pseudonyms and record versions).
    pub(crate) records: Vec<ConsentView>,
    /// The identifiers the event was looked up by (filled by the pipeline).
    pub identifiers: Vec<crate::identify::IdKey>,
    /// Policy steps in order, each with its outcome (only from `decide_traced`).
    pub(crate) steps: Vec<(&'static str, String)>,
}

impl Policy {
    pub(crate) fn grant(&self, rec: &ConsentView, c: Category) -> Grant {
        rec.category(c)
            .or_else(|| self.defaults.get(&c).copied())
            .unwrap_or(c.shipped_default())
    }

    fn fails_closed_when_stale(&self, c: Category) -> bool {
        self.fail_closed_when_stale
            .get(&c)
            .copied()
            .unwrap_or(c.shipped_fail_closed_when_stale())
    }

    /// SPEC §6: steps 1-2 end the event; 3-5 accumulate. Several matches: the
    /// most restrictive outcome wins. No trace is built (the proxy's hot path).
    pub fn decide(&self, ctx: &Context, records: Vec<ConsentView>) -> Decision {
        self.decide_with(ctx, records, false)
    }

    /// [`Policy::decide`] with every step's outcome recorded (for `explain`).
    pub(crate) fn decide_traced(&self, ctx: &Context, records: Vec<ConsentView>) -> Decision {
        self.decide_with(ctx, records, true)
    }

    fn decide_with(&self, ctx: &Context, records: Vec<ConsentView>, on: bool) -> Decision {
        let mut t = Trace {
            on,
            steps: Vec::new(),
        };
        let drop = |reason: Reason, mut t: Trace, records| {
            t.push("outcome", || format!("drop: {}", reason.as_str()));
            Decision {
                verdict: EventVerdict::Drop(reason),
                gpc_trigger: false,
                records,
                identifiers: Vec::new(),
                steps: t.steps,
            }
        };
        if ctx.stale && self.fails_closed_when_stale(ctx.category) {
            t.push("staleness", || {
                "consent source stale; category fails closed".into()
            });
            return drop(Reason::ConsentStale, t, records);
        }
        if records.is_empty() {
            t.push("1_identify", || "no patient found".into());
            return drop(Reason::UnknownPatient, t, records);
        }
        t.push("1_identify", || {
            format!("{} record(s) matched", records.len())
        });
        for r in &records {
            if self.grant(r, ctx.category) == Grant::Denied {
                t.push("2_consent", || format!("{} denied", ctx.category));
                return drop(Reason::ConsentDenied, t, records);
            }
            if let Some(ch) = ctx.channel {
                if r.channel(ch) == Some(Grant::Denied) {
                    t.push("2_consent", || format!("channel {} denied", ch.as_str()));
                    return drop(Reason::ChannelDenied, t, records);
                }
            }
        }
        t.push("2_consent", || format!("{} granted", ctx.category));
        let mut keep = Keep::default();
        let mut gpc_trigger = false;
        if ctx.kind.is_ads_or_analytics() {
            let record_gpc = records.iter().any(|r| r.gpc());
            let opt_out = records.iter().any(|r| r.sale_share_opt_out());
            if opt_out || record_gpc || ctx.header_gpc {
                gpc_trigger = !opt_out;
                keep.strip_identity = true;
                let ca = records
                    .iter()
                    .any(|r| r.jurisdiction.as_deref() == Some("US-CA"));
                keep.ldu = Some(if ca {
                    Ldu {
                        country: 1,
                        state: 1000,
                    }
                } else {
                    Ldu {
                        country: 0,
                        state: 0,
                    }
                });
                let trigger = if opt_out {
                    "sale_share_opt_out"
                } else if record_gpc {
                    "gpc"
                } else {
                    "Sec-GPC header"
                };
                t.push("3_sale_share", || {
                    format!("strip identity, limited data use (trigger: {trigger})")
                });
            } else {
                t.push("3_sale_share", || "not opted out".into());
            }
            if records.iter().any(|r| r.limit_sensitive()) {
                keep.limit_sensitive = true;
                t.push("4_limit_sensitive", || {
                    "reduce URLs, strip content fields".into()
                });
            } else {
                t.push("4_limit_sensitive", || "not limited".into());
            }
        }
        t.push("5_forward", || {
            "keep; hash plaintext identifiers the platform expects hashed".into()
        });
        Decision {
            verdict: EventVerdict::Keep(keep),
            gpc_trigger,
            records,
            identifiers: Vec::new(),
            steps: t.steps,
        }
    }
}

/// Policy steps, recorded only when tracing.
struct Trace {
    on: bool,
    steps: Vec<(&'static str, String)>,
}

impl Trace {
    fn push(&mut self, step: &'static str, outcome: impl FnOnce() -> String) {
        if self.on {
            self.steps.push((step, outcome()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::consent::ConsentRecord;

    fn rec(json: &str) -> ConsentView {
        ConsentView::from(&ConsentRecord::from_json(json.as_bytes()).unwrap())
    }
    fn ctx(category: Category, kind: DestKind) -> Context {
        Context {
            category,
            channel: None,
            kind,
            header_gpc: false,
            stale: false,
        }
    }

    #[test]
    fn default_policy_in_order() {
        let p = Policy::default();
        let ads = ctx(Category::Advertising, DestKind::AdPlatform);
        assert_eq!(
            p.decide(&ads, vec![]).verdict,
            EventVerdict::Drop(Reason::UnknownPatient)
        );
        let plain = rec(r#"{"patient_id":"A","updated_at":"2026-01-01T00:00:00Z"}"#);
        assert_eq!(
            p.decide(&ads, vec![plain.clone()]).verdict,
            EventVerdict::Drop(Reason::ConsentDenied)
        );
        let ca = rec(
            r#"{"patient_id":"B","jurisdiction":"US-CA","categories":{"advertising":"granted"},"sale_share_opt_out":true,"limit_sensitive":true,"updated_at":"2026-01-01T00:00:00Z"}"#,
        );
        let d = p.decide(&ads, vec![ca]);
        assert_eq!(
            d.verdict,
            EventVerdict::Keep(Keep {
                strip_identity: true,
                ldu: Some(Ldu {
                    country: 1,
                    state: 1000
                }),
                limit_sensitive: true
            })
        );
        let email = ctx(Category::MarketingEmail, DestKind::Email);
        assert_eq!(
            p.decide(&email, vec![plain]).verdict,
            EventVerdict::Keep(Keep::default())
        );
    }

    #[test]
    fn most_restrictive_of_several_wins_and_stale_fails_closed() {
        let p = Policy::default();
        let a = rec(
            r#"{"patient_id":"A","categories":{"marketing_email":"granted"},"updated_at":"2026-01-01T00:00:00Z"}"#,
        );
        let b = rec(
            r#"{"patient_id":"B","channels":{"email":"denied"},"updated_at":"2026-01-01T00:00:00Z"}"#,
        );
        let mut c = ctx(Category::MarketingEmail, DestKind::Email);
        c.channel = Some(Channel::Email);
        assert_eq!(
            p.decide(&c, vec![a.clone(), b]).verdict,
            EventVerdict::Drop(Reason::ChannelDenied)
        );
        c.stale = true;
        assert_eq!(
            p.decide(&c, vec![a.clone()]).verdict,
            EventVerdict::Drop(Reason::ConsentStale)
        );
        let mut r = ctx(Category::AppointmentReminders, DestKind::Sms);
        r.stale = true;
        assert!(!p.decide(&r, vec![a]).verdict.is_drop());
    }

    #[test]
    fn header_gpc_tags_with_geolocation() {
        let p = Policy::default();
        let a = rec(
            r#"{"patient_id":"A","categories":{"advertising":"granted"},"updated_at":"2026-01-01T00:00:00Z"}"#,
        );
        let mut c = ctx(Category::Advertising, DestKind::AdPlatform);
        c.header_gpc = true;
        let d = p.decide(&c, vec![a]);
        assert!(d.gpc_trigger);
        assert_eq!(d.verdict.reason(d.gpc_trigger), Reason::Gpc);
        let EventVerdict::Keep(k) = d.verdict else {
            panic!()
        };
        assert_eq!(
            k.ldu,
            Some(Ldu {
                country: 0,
                state: 0
            })
        );
    }
}
