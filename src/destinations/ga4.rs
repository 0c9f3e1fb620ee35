//! Google Analytics 4 Measurement Protocol: `POST /mp/collect` (and the
//! validation endpoint `/debug/mp/collect`) on www. or region1.google-analytics.com
//! and on gtag's regional hosts `*.analytics.google.com` (`region1.analytics.google.com`;
//! the same paths, read the same way), and the web hits gtag.js and server-side Tag
//! Manager send to `/g/collect`
//! (`GET` with the hit in the query, or `POST` with shared parameters in the
//! query and one hit per body line): see [`enforce_hits`].
//!
//! One user per request: the whole body is one event for the decision, so a
//! drop blocks the request. Sale/share opt-out removes `user_id`, `user_data`,
//! `ip_override`, `user_location` and `device`, replaces `client_id` with a
//! random value and sets both `consent` signals to `DENIED`.

use super::common;
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::decide::Keep;
use crate::identify::{self, Identifiers};
use crate::model::{Category, DestKind};
use http::Method;
use serde_json::{json, Value};

pub(crate) struct Ga4Mp;

const IDENTITY: &[&str] = &[
    "user_id",
    "user_data",
    "ip_override",
    "user_location",
    "device",
];

const URLS: &[&str] = &[
    "events.params.page_location",
    "events.params.page_referrer",
    "events.params.link_url",
];

const SENSITIVE: &[&str] = &[
    "events.params.page_title",
    "events.params.search_term",
    "events.params.items",
];

const HASHED: &[(&str, common::Hasher)] = &[
    ("user_data.sha256_email_address", common::hash_email_google),
    (
        "user_data.sha256_phone_number",
        identify::hash_phone_e164_for_vendor,
    ),
    (
        "user_data.address.sha256_first_name",
        common::hash_trimmed_lowercase,
    ),
    (
        "user_data.address.sha256_last_name",
        common::hash_trimmed_lowercase,
    ),
    (
        "user_data.address.sha256_street",
        common::hash_trimmed_lowercase,
    ),
];

fn identify_body(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(v, &["user_id"], &mut ids, Identifiers::add_external);
    common::collect(v, &["user_id"], &mut ids, Identifiers::add_patient);
    common::collect(
        v,
        &["user_data.sha256_email_address"],
        &mut ids,
        Identifiers::add_email,
    );
    common::collect(
        v,
        &["user_data.sha256_phone_number"],
        &mut ids,
        Identifiers::add_phone,
    );
    ids
}

/// A fresh client id in GA's `random.timestamp` shape, unlinkable to the old one.
fn random_client_id() -> String {
    format!(
        "{}.{}",
        rand::random::<u32>(),
        1_600_000_000 + rand::random::<u32>() % 200_000_000
    )
}

fn apply(v: &mut Value, keep: &Keep, a: &mut EventApplied) {
    if keep.strip_identity {
        a.strip_with(|s| common::remove_all(v, IDENTITY, s));
        if let Value::Object(m) = v {
            if m.contains_key("client_id") {
                m.insert("client_id".into(), Value::String(random_client_id()));
                a.ch().fields_stripped.push("client_id".into());
            }
            if m.contains_key("app_instance_id") {
                let id: String = (0..4)
                    .map(|_| format!("{:08x}", rand::random::<u32>()))
                    .collect();
                m.insert("app_instance_id".into(), Value::String(id));
                a.ch().fields_stripped.push("app_instance_id".into());
            }
        }
    }
    if keep.strip_identity || keep.ldu.is_some() {
        common::set_at(v, "consent.ad_user_data", json!("DENIED"));
        common::set_at(v, "consent.ad_personalization", json!("DENIED"));
        a.ch().flags_set.push("consent.ad_user_data=DENIED".into());
        a.ch()
            .flags_set
            .push("consent.ad_personalization=DENIED".into());
    }
    if keep.limit_sensitive {
        a.strip_with(|s| common::reduce_urls(v, URLS, s));
        a.strip_with(|s| common::remove_all(v, SENSITIVE, s));
    }
    a.hash_with(|h| common::hash_all(v, HASHED, h));
}

/// `/g/collect` parameters that identify the person (removed on a sale/share
/// opt-out; `cid` is replaced by a random one instead).
const HIT_IDENTITY: &[&str] = &["uid", "_uip", "em", "ul", "_uid"];
/// `/g/collect` URL parameters, reduced to scheme://host/ under limit_sensitive.
const HIT_URLS: &[&str] = &["dl", "dr"];

fn is_hits(path: &str) -> bool {
    common::path_segments(path) == ["g", "collect"]
}

/// One `/g/collect` request: the query's parameters apply to every hit, and each
/// body line (if any) is one hit's own parameters. A web hit names one browser,
/// so the request names at most one person: its `uid` (read as a patient and an
/// external id, like `user_id`), or the app's `X-Patient-Id`. Each hit is decided
/// (all alike) and the GA4 policy is applied to the query and to every line:
/// a sale/share opt-out or GPC removes `uid`, `_uip`, `em`, `ul`, replaces `cid`
/// and sets `npa=1` (no ad personalisation); limit_sensitive reduces `dl`/`dr`
/// to scheme://host/ and removes `dt` and every custom event parameter (`ep.*`,
/// `epn.*`). Two different `uid`s in one request are unreadable.
fn enforce_hits(
    query: Option<&str>,
    body: &[u8],
    judge: &mut dyn Judge,
) -> Result<Enforced, BodyError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| BodyError::Unreadable("/g/collect body is not UTF-8".into()))?;
    let parse = |s: &str| -> Vec<(String, String)> {
        form_urlencoded::parse(s.as_bytes()).into_owned().collect()
    };
    let mut shared = parse(query.unwrap_or(""));
    let mut lines: Vec<Vec<(String, String)>> = text
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .map(parse)
        .collect();
    let mut uids: Vec<&str> = Vec::new();
    for (k, v) in shared.iter().chain(lines.iter().flatten()) {
        if k == "uid" && !v.is_empty() && !uids.contains(&v.as_str()) {
            uids.push(v);
        }
    }
    if uids.len() > 1 {
        return Err(BodyError::Unreadable(
            "/g/collect names two users (`uid`); send one request per user".into(),
        ));
    }
    let mut ids = Identifiers::new();
    if let Some(u) = uids.first() {
        ids.add_external(u);
        ids.add_patient(u);
    }
    let hits = lines.len().max(1);
    let mut applied: Vec<EventApplied> = (0..hits)
        .map(|_| EventApplied::new(judge.decide(&ids)))
        .collect();
    let Some(keep) = applied.iter().find_map(|a| match a.verdict {
        crate::decide::EventVerdict::Keep(k) => Some(k),
        _ => None,
    }) else {
        return Ok(Enforced {
            body: None,
            events: applied,
            query: None,
        });
    };
    let mut a = EventApplied::new(crate::decide::EventVerdict::Keep(keep));
    let mut changed = hit_policy(&mut shared, &keep, &mut a, true);
    for l in lines.iter_mut() {
        changed |= hit_policy(l, &keep, &mut a, false);
    }
    for x in applied.iter_mut().filter(|x| !x.verdict.is_drop()) {
        *x = a.clone();
    }
    if !changed {
        return Ok(Enforced {
            body: None,
            events: applied,
            query: None,
        });
    }
    let encode = |pairs: &[(String, String)]| {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    };
    let new_body = (!lines.is_empty()).then(|| {
        let l: Vec<String> = lines.iter().map(|l| encode(l)).collect();
        l.join("\n").into_bytes()
    });
    Ok(Enforced {
        body: new_body,
        events: applied,
        query: Some(encode(&shared)),
    })
}

/// The GA4 policy on one set of hit parameters; `shared` (the query) also
/// carries the request-level signals. True when anything changed.
fn hit_policy(
    p: &mut Vec<(String, String)>,
    keep: &Keep,
    a: &mut EventApplied,
    shared: bool,
) -> bool {
    let before = p.clone();
    let mut stripped = Vec::new();
    if keep.strip_identity {
        p.retain(|(k, _)| {
            let id = HIT_IDENTITY.contains(&k.as_str());
            if id {
                stripped.push(k.clone());
            }
            !id
        });
        for (k, v) in p.iter_mut() {
            if k == "cid" {
                *v = random_client_id();
                stripped.push("cid".into());
            }
        }
    }
    if (keep.strip_identity || keep.ldu.is_some()) && shared {
        p.retain(|(k, _)| k != "npa");
        p.push(("npa".into(), "1".into()));
        if !a.flags_set().iter().any(|f| f == "npa=1") {
            a.ch().flags_set.push("npa=1".into());
        }
    }
    if keep.limit_sensitive {
        for (k, v) in p.iter_mut() {
            if HIT_URLS.contains(&k.as_str()) {
                let r = common::reduce_url(v);
                if r != *v {
                    *v = r;
                    stripped.push(k.clone());
                }
            }
        }
        p.retain(|(k, _)| {
            let sensitive = k == "dt" || k.starts_with("ep.") || k.starts_with("epn.");
            if sensitive {
                stripped.push(if k == "dt" { k.clone() } else { "ep.*".into() });
            }
            !sensitive
        });
    }
    for s in stripped {
        if !a.fields_stripped().contains(&s) {
            a.ch().fields_stripped.push(s);
        }
    }
    *p != before
}

impl Adapter for Ga4Mp {
    fn name(&self) -> &str {
        "ga4_mp"
    }
    fn display_name(&self) -> &str {
        "Google Analytics 4 Measurement Protocol"
    }
    fn kind(&self) -> DestKind {
        DestKind::Analytics
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        matches!(
            host,
            "www.google-analytics.com" | "region1.google-analytics.com"
        ) || common::host_matches("*.analytics.google.com", host)
    }
    fn query_params(&self) -> &'static [&'static str] {
        &["measurement_id", "api_secret", "firebase_app_id"]
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        let hits = (*method == Method::GET || *method == Method::POST) && is_hits(path);
        hits || common::post_path_matches(method, path, &|s| {
            matches!(s, ["mp", "collect"] | ["debug", "mp", "collect"])
        })
    }
    fn reads_query(&self, _method: &Method, path: &str) -> bool {
        is_hits(path)
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        if is_hits(req.path) {
            return enforce_hits(req.query, body, judge);
        }
        common::enforce_json_single(body, judge, &identify_body, &apply)
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 204,
            body: "",
        }
    }
    fn identifier_fields(&self) -> &str {
        "user_id, user_data.sha256_email_address, user_data.sha256_phone_number"
    }
    fn ldu_signal(&self) -> &str {
        "consent.ad_user_data / ad_personalization DENIED; client_id randomised"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::adkit;
    use serde_json::json;

    fn view() -> RequestView<'static> {
        RequestView {
            method: &Method::POST,
            host: "www.google-analytics.com",
            path: "/mp/collect",
            query: Some("measurement_id=G-XXXX&api_secret=s"),
            content_type: Some("application/json"),
        }
    }

    fn body(user_id: &str, email: &str) -> Vec<u8> {
        common::to_json(&json!({
            "client_id": "123456.7654321",
            "user_id": user_id,
            "ip_override": "203.0.113.7",
            "user_data": {"sha256_email_address": [email]},
            "events": [{"name":"page_view","params":{
                "page_location":"https://hospital.example/oncology/book?dr=7",
                "page_referrer":"https://hospital.example/search?q=chemo",
                "page_title":"Book chemotherapy",
                "engagement_time_msec": 100}},
              {"name":"view_item","params":{"items":[{"item_name":"HIV test"}],
                "search_term":"hiv"}}]
        }))
    }

    fn run(b: &[u8]) -> Enforced {
        let mut decide = adkit::decider(DestKind::Analytics);
        Ga4Mp.enforce(&view(), b, &mut decide).unwrap()
    }

    #[test]
    fn granted_hashes_plaintext_with_gmail_rule() {
        let r = run(&body("P-1001", "Jane.Roe@Example.com"));
        let out = r.body.unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["user_id"], "P-1001");
        assert_eq!(
            v["user_data"]["sha256_email_address"][0],
            identify::sha256_hex(b"jane.roe@example.com")
        );
        assert_eq!(v["events"][0]["params"]["page_title"], "Book chemotherapy");
        assert_eq!(
            common::hash_email_google("Mixed.Case@Gmail.com"),
            identify::sha256_hex(b"mixedcase@gmail.com")
        );
        assert_eq!(
            identify::hash_phone_e164_for_vendor("+1 (415) 555-0100"),
            identify::sha256_hex(b"+14155550100")
        );
    }

    #[test]
    fn denied_and_unknown_users_are_dropped() {
        for b in [
            body("P-1002", "deny.me@example.com"),
            body("", &identify::sha256_hex(b"unknown.person@example.com")),
        ] {
            let r = run(&b);
            assert_eq!(r.events.len(), 1);
            assert!(r.events[0].verdict.is_drop());
            let out = r.body.unwrap();
            adkit::assert_absent(&out, &["deny.me@example.com", "unknown.person@example.com"]);
        }
    }

    #[test]
    fn sale_share_opt_out_strips_identity_and_denies_consent() {
        let r = run(&body("P-1003", "opt.out@example.com"));
        let out = r.body.unwrap();
        adkit::assert_absent(&out, &["P-1003", "opt.out@example.com", "203.0.113.7"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("user_id").is_none() && v.get("user_data").is_none());
        assert!(v.get("ip_override").is_none());
        assert_ne!(v["client_id"], "123456.7654321");
        assert_eq!(
            v["consent"],
            json!({"ad_user_data":"DENIED","ad_personalization":"DENIED"})
        );
        // Not limit_sensitive: content stays.
        assert_eq!(v["events"][1]["params"]["search_term"], "hiv");
    }

    #[test]
    fn limit_sensitive_reduces_urls_and_content() {
        let r = run(&body("P-1004", "limited@example.com"));
        let out = r.body.unwrap();
        adkit::assert_no_plaintext(&out, &["limited@example.com", "oncology", "chemo", "hiv"]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let p0 = &v["events"][0]["params"];
        assert_eq!(p0["page_location"], "https://hospital.example/");
        assert_eq!(p0["page_referrer"], "https://hospital.example/");
        assert!(p0.get("page_title").is_none());
        assert_eq!(p0["engagement_time_msec"], 100);
        assert_eq!(v["events"][1]["params"], json!({}));
        assert_eq!(v["user_id"], "P-1004");
        assert!(v.get("consent").is_none());
    }

    #[test]
    fn unchanged_and_malformed() {
        let b = common::to_json(&json!({"client_id":"1.2","user_id":"P-1001",
            "events":[{"name":"page_view","params":{}}]}));
        assert_eq!(run(&b).body, None);
        let mut decide = adkit::decider(DestKind::Analytics);
        for bad in [&b"{\"events\":["[..], &b"[1,2]"[..]] {
            assert!(matches!(
                Ga4Mp.enforce(&view(), bad, &mut decide),
                Err(BodyError::Unreadable(_))
            ));
        }
        assert!(Ga4Mp.inspects(&Method::POST, "/debug/mp/collect"));
        // gtag's regional hosts route here too; the bare name and look-alikes do not.
        assert!(Ga4Mp.matches_host("region1.analytics.google.com"));
        assert!(!Ga4Mp.matches_host("analytics.google.com"));
        assert!(!Ga4Mp.matches_host("region1.analytics.google.com.evil.test"));
        assert!(!Ga4Mp.matches_host("evilanalytics.google.com"));
        // Web hits are read too (their query is the hit: `reads_query`).
        assert!(Ga4Mp.inspects(&Method::POST, "/g/collect"));
        assert!(Ga4Mp.inspects(&Method::GET, "/g/collect"));
        assert!(Ga4Mp.reads_query(&Method::GET, "/g/collect"));
        assert!(!Ga4Mp.reads_query(&Method::POST, "/mp/collect"));
        assert!(!Ga4Mp.inspects(&Method::GET, "/mp/collect"));
    }
}
