//! Mailchimp Transactional (Mandrill): `POST /api/1.{0-3}/messages/send`,
//! `/messages/send-template`, `/messages/send-mc-template` and
//! `/messages/send-raw`, with or without the `.json` suffix (the official SDKs
//! call `/api/1.3/....json`).
//!
//! One decision per `message.to[]` recipient. A dropped recipient is removed
//! from `message.to[]` and its entries in `message.merge_vars[]` and
//! `message.recipient_metadata[]` (matched by `rcpt`, case-insensitively) go
//! with it, so no per-recipient data of a dropped patient leaves.
//!
//! `send-raw` (see [`enforce_raw`]) carries `to[]`, the envelope recipients as
//! plain address strings, and `raw_message`, a MIME message whose `To:`, `Cc:`
//! and `Bcc:` header fields name recipients too (Mandrill sends to those when
//! `to` is absent or empty). One decision per `to[]` entry, then one per header
//! address not already in `to[]`. A dropped envelope-only recipient is removed
//! from `to[]`. The MIME headers are not rewritten (a rewritten message could
//! break its structure or a DKIM signature, and the header fields may be
//! folded, encoded or grouped), so a dropped recipient named in them refuses
//! the whole request, as does a `to[]` with every recipient dropped (Mandrill
//! would then send to the header recipients instead): every other recipient is
//! then dropped as `foreign_identifier` and the app gets
//! `blocked_by_consent_policy` (fail closed). A header section or a To/Cc/Bcc
//! field that cannot be read, or a message naming no recipient, is unreadable.

use super::common::{self, enforce_array, keep_as_is};
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::identify::{self, Identifiers};
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct Mandrill;

fn recipient_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    common::collect(v, &["email"], &mut ids, Identifiers::add_email);
    ids
}

fn rcpt_key(v: &Value) -> Option<String> {
    v.as_str()
        .map(|s| identify::normalize_email(s).unwrap_or_else(|| s.trim().to_lowercase()))
}

/// The call a Mandrill messages path names (`send-raw.json` → `send-raw`).
fn call(path: &str) -> Option<&str> {
    match common::path_segments(path).as_slice() {
        ["api", "1.0" | "1.1" | "1.2" | "1.3", "messages", c] => {
            let c = c.strip_suffix(".json").unwrap_or(c);
            matches!(
                c,
                "send" | "send-template" | "send-mc-template" | "send-raw"
            )
            .then_some(c)
        }
        _ => None,
    }
}

fn unreadable_headers() -> BodyError {
    BodyError::Unreadable(
        "`raw_message` has a header section or a To/Cc/Bcc field consentgate cannot read".into(),
    )
}

/// The addresses of the `To:`, `Cc:` and `Bcc:` fields of a MIME message's
/// header section (normalised, each once, in order). The header section ends at
/// the first empty line; folded lines are unfolded. Err: a line that is neither
/// a field nor a continuation, or an address list that cannot be read.
fn header_recipients(raw: &str) -> Result<Vec<String>, BodyError> {
    let mut fields: Vec<(&str, String)> = Vec::new();
    for line in raw.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = fields.last_mut() else {
                return Err(unreadable_headers());
            };
            value.push(' ');
            value.push_str(line.trim());
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(unreadable_headers());
        };
        if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b)) {
            return Err(unreadable_headers());
        }
        fields.push((name, value.trim().to_string()));
    }
    let mut out = Vec::new();
    for (name, value) in &fields {
        if ["to", "cc", "bcc"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            address_list(value, &mut out).map_err(|()| unreadable_headers())?;
        }
    }
    Ok(out)
}

/// The addresses of an RFC 5322 address list (display names, quoted strings,
/// comments and groups read; each address once, normalised) appended to `out`.
fn address_list(v: &str, out: &mut Vec<String>) -> Result<(), ()> {
    let mut items = vec![String::new()];
    let (mut comment, mut quoted, mut angle, mut group) = (0u32, false, false, false);
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        let cur = items.last_mut().ok_or(())?;
        if quoted {
            match c {
                '\\' => cur.push(chars.next().ok_or(())?),
                '"' => {
                    quoted = false;
                    cur.push('"');
                }
                _ => cur.push(c),
            }
            continue;
        }
        if comment > 0 {
            match c {
                '\\' => {
                    chars.next().ok_or(())?;
                }
                '(' => comment += 1,
                ')' => comment -= 1,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                cur.push('"');
            }
            '(' => comment = 1,
            ')' => return Err(()),
            '<' if !angle => {
                angle = true;
                cur.push('<');
            }
            '>' if angle => {
                angle = false;
                cur.push('>');
            }
            '<' | '>' => return Err(()),
            ',' if !angle => items.push(String::new()),
            // `Group name: a@x, b@y;` (the name is no address).
            ':' if !angle && !group => {
                group = true;
                cur.clear();
            }
            ';' if !angle && group => {
                group = false;
                items.push(String::new());
            }
            ':' | ';' if !angle => return Err(()),
            _ => cur.push(c),
        }
    }
    if quoted || comment > 0 || angle || group {
        return Err(());
    }
    for item in &items {
        let t = item.trim();
        if t.is_empty() {
            continue;
        }
        // The last `<`: a quoted display name may hold one too.
        let addr = match t.rfind('<') {
            Some(start) => {
                let inner = t[start + 1..].strip_suffix('>').ok_or(())?;
                // An obsolete source route (`<@relay:a@x>`) is not the address.
                match inner.strip_prefix('@') {
                    Some(r) => r.split_once(':').ok_or(())?.1,
                    None => inner,
                }
            }
            None => t,
        };
        let (local, domain) = addr.trim().rsplit_once('@').ok_or(())?;
        if local.is_empty()
            || domain.is_empty()
            || addr
                .trim()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(());
        }
        let n = identify::normalize_email(addr).ok_or(())?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(())
}

/// `send-raw`: the `to[]` envelope recipients and the MIME header recipients
/// of `raw_message`, decided as the module documentation says.
fn enforce_raw(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let Value::Object(obj) = &mut root else {
        return Err(BodyError::Unreadable("body is not a JSON object".into()));
    };
    let Some(Value::String(raw)) = obj.get("raw_message") else {
        return Err(BodyError::Unreadable(
            "`raw_message` is missing or not a string".into(),
        ));
    };
    let headers = header_recipients(raw)?;
    let to: Vec<String> = match obj.get("to") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|r| r.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| BodyError::Unreadable("`to` holds a non-string recipient".into()))?,
        Some(_) => {
            return Err(BodyError::Unreadable(
                "`to` is not an array of addresses".into(),
            ))
        }
    };
    if to.is_empty() && headers.is_empty() {
        return Err(BodyError::Unreadable(
            "send-raw names no recipient (neither `to` nor a To/Cc/Bcc header)".into(),
        ));
    }
    let to_keys: Vec<Option<String>> = to.iter().map(|r| identify::normalize_email(r)).collect();
    let header_only: Vec<&String> = headers
        .iter()
        .filter(|h| !to_keys.iter().flatten().any(|k| k == *h))
        .collect();
    let mut applied = Vec::with_capacity(to.len() + header_only.len());
    for r in to
        .iter()
        .map(String::as_str)
        .chain(header_only.iter().map(|h| h.as_str()))
    {
        let mut ids = Identifiers::new();
        ids.add_email(r);
        applied.push(EventApplied::new(judge.decide(&ids)));
    }
    // The guard reads each kept envelope recipient once every one is decided.
    if let Some(Value::Array(list)) = obj.get_mut("to") {
        for (i, r) in list.iter_mut().enumerate() {
            if !applied[i].verdict.is_drop() && judge.guard(i, r).is_err() {
                applied[i].verdict =
                    crate::decide::EventVerdict::Drop(crate::decide::Reason::ForeignIdentifier);
            }
        }
    }
    let dropped = |addr: &String| match to_keys.iter().position(|k| k.as_ref() == Some(addr)) {
        Some(i) => applied[i].verdict.is_drop(),
        None => header_only
            .iter()
            .position(|h| *h == addr)
            .is_some_and(|j| applied[to.len() + j].verdict.is_drop()),
    };
    let header_dropped = headers.iter().any(dropped);
    let envelope_gone = !to.is_empty() && applied[..to.len()].iter().all(|a| a.verdict.is_drop());
    if header_dropped || envelope_gone {
        common::all_or_nothing(&mut applied);
        return Ok(Enforced {
            body: None,
            events: applied,
            query: None,
        });
    }
    let changed = applied[..to.len()].iter().any(|a| a.verdict.is_drop());
    if changed {
        if let Some(Value::Array(list)) = obj.get_mut("to") {
            let mut i = 0;
            list.retain(|_| {
                i += 1;
                !applied[i - 1].verdict.is_drop()
            });
        }
    }
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events: applied,
        query: None,
    })
}

impl Adapter for Mandrill {
    fn name(&self) -> &str {
        "mandrill"
    }
    fn display_name(&self) -> &str {
        "Mailchimp Transactional (Mandrill)"
    }
    fn kind(&self) -> DestKind {
        DestKind::Email
    }
    fn default_category(&self) -> Category {
        Category::MarketingEmail
    }
    fn channel(&self) -> Option<Channel> {
        Some(Channel::Email)
    }
    fn matches_host(&self, host: &str) -> bool {
        host == "mandrillapp.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        *method == Method::POST && call(path).is_some()
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        if call(req.path) == Some("send-raw") {
            return enforce_raw(body, judge);
        }
        let mut root = common::parse_json(body)?;
        let Some(Value::Object(msg)) = root.get_mut("message") else {
            return Err(BodyError::Unreadable(
                "`message` is missing or not an object".into(),
            ));
        };
        let Some(Value::Array(to)) = msg.get_mut("to") else {
            return Err(BodyError::Unreadable(
                "`message.to` is missing or not an array".into(),
            ));
        };
        if to.iter().any(|r| !r.is_object()) {
            return Err(BodyError::Unreadable(
                "`message.to` holds a non-object recipient".into(),
            ));
        }
        let before: Vec<Option<String>> = to.iter().map(|r| rcpt_key(&r["email"])).collect();
        let (changed, applied) = enforce_array(to, judge, &recipient_ids, &keep_as_is);
        if changed {
            let kept: Vec<Option<String>> = to.iter().map(|r| rcpt_key(&r["email"])).collect();
            let dropped: Vec<String> = before
                .into_iter()
                .flatten()
                .filter(|e| !kept.iter().flatten().any(|k| k == e))
                .collect();
            for key in ["merge_vars", "recipient_metadata"] {
                if let Some(Value::Array(list)) = msg.get_mut(key) {
                    list.retain(
                        |entry| !matches!(rcpt_key(&entry["rcpt"]), Some(r) if dropped.contains(&r)),
                    );
                }
            }
        }
        Ok(Enforced {
            body: changed.then(|| common::to_json(&root)),
            events: applied,
            query: None,
        })
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: "[]",
        }
    }
    fn identifier_fields(&self) -> &str {
        "message.to[].email (merge_vars[]/recipient_metadata[].rcpt follow); send-raw: to[], raw_message To/Cc/Bcc"
    }
    fn ldu_signal(&self) -> &str {
        "none"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Mandrill
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    fn run(path: &str, body: &[u8]) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&Mandrill, &store);
        Mandrill.enforce(&req(&Method::POST, "mandrillapp.com", path), body, &mut d)
    }

    #[test]
    fn mandrill_routes() {
        assert!(Mandrill.matches_host("mandrillapp.com"));
        for p in [
            "/api/1.0/messages/send",
            "/api/1.0/messages/send.json",
            "/api/1.0/messages/send-template",
            "/api/1.0/messages/send-template.json",
        ] {
            assert!(Mandrill.inspects(&Method::POST, p), "{p}");
        }
        assert!(Mandrill.inspects(&Method::POST, "/api/1.3/messages/send-raw.json"));
        assert!(Mandrill.inspects(&Method::POST, "/api/1.0/messages/send-raw"));
        assert!(!Mandrill.inspects(&Method::POST, "/api/1.3/messages/send-raw.xml"));
        assert!(!Mandrill.inspects(&Method::POST, "/api/1.0/users/ping"));
        assert!(!Mandrill.inspects(&Method::GET, "/api/1.0/messages/send"));
    }

    #[test]
    fn mandrill_send_template_mixed() {
        let body = json!({
            "key": "k",
            "template_name": "flu",
            "template_content": [],
            "message": {
                "subject": "Flu shots",
                "to": [
                    {"email": "jane.roe@example.com", "name": "Jane", "type": "to"},
                    {"email": "Deny.Me@example.com", "type": "cc"},
                    {"email": "unknown.person@example.com", "type": "bcc"},
                    {"email": "email.denied.channel@example.com"}
                ],
                "merge_vars": [
                    {"rcpt": "jane.roe@example.com", "vars": [{"name": "FNAME", "content": "Jane"}]},
                    {"rcpt": "deny.me@example.com", "vars": [{"name": "FNAME", "content": "D"}]},
                    {"rcpt": "unknown.person@example.com", "vars": []}
                ],
                "recipient_metadata": [
                    {"rcpt": "email.denied.channel@example.com", "values": {"mrn": "7"}},
                    {"rcpt": "jane.roe@example.com", "values": {"mrn": "1"}}
                ]
            }
        });
        let out = run(
            "/api/1.0/messages/send-template.json",
            &serde_json::to_vec(&body).unwrap(),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &[
                "deny.me@example.com",
                "unknown.person@example.com",
                "email.denied.channel@example.com",
            ],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["message"]["to"].as_array().unwrap().len(), 1);
        assert_eq!(v["message"]["merge_vars"].as_array().unwrap().len(), 1);
        assert_eq!(
            v["message"]["recipient_metadata"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn mandrill_all_kept_unchanged() {
        let body = br#"{"message":{"to":[{"email":"jane.roe@example.com"}],"html":"<p>hi</p>"}}"#;
        let out = run("/api/1.0/messages/send", body).unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
    }

    fn raw(to: Option<&[&str]>, headers: &str) -> Vec<u8> {
        let mut b = json!({
            "key": "k",
            "raw_message": format!("{headers}\r\nSubject: Flu shots\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nTo: body.text@example.com is not a header\r\n"),
            "from_email": "news@hospital.example",
            "async": false
        });
        if let Some(t) = to {
            b["to"] = json!(t);
        }
        serde_json::to_vec(&b).unwrap()
    }

    const RAW: &str = "/api/1.3/messages/send-raw.json";

    #[test]
    fn mandrill_raw_header_parsing() {
        let mut out = Vec::new();
        address_list(
            r#""Roe, Jane <x>" <Jane.Roe@Example.com>, x@y.org (a comment, with comma), Team: a@b.c, "q" <@relay.example:d@e.f>;, , undisclosed-recipients:;"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, ["jane.roe@example.com", "x@y.org", "a@b.c", "d@e.f"]);
        for bad in [
            "Roe, Jane <a@b.c>",
            "<a@b.c",
            "a@b.c>",
            "\"open",
            "(open a@b.c",
            "a b@c.d",
            "nobody",
        ] {
            assert!(address_list(bad, &mut Vec::new()).is_err(), "{bad}");
        }
        let h = header_recipients(
            "From: news@hospital.example\r\nTo: Jane <jane.roe@example.com>,\r\n\tdeny.me@example.com\r\ncc: x@y.org\r\nBCC: x@y.org\r\nReply-To: r@y.org\r\n\r\nTo: not@header.example",
        )
        .unwrap();
        assert_eq!(
            h,
            ["jane.roe@example.com", "deny.me@example.com", "x@y.org"]
        );
        for bad in [
            " folded first",
            "no colon here\r\n\r\n",
            "From sender Mon Jan 1 12:00:00 2026\nTo: a@b.c",
        ] {
            assert!(header_recipients(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mandrill_raw_envelope_recipient_dropped_from_to() {
        // Jane in the headers and the envelope; deny.me and an unknown only in the envelope.
        let body = raw(
            Some(&[
                "jane.roe@example.com",
                "deny.me@example.com",
                "unknown.person@example.com",
            ]),
            "From: news@hospital.example\r\nTo: Jane Roe <jane.roe@example.com>",
        );
        let out = run(RAW, &body).unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &["deny.me@example.com", "unknown.person@example.com"],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["to"], json!(["jane.roe@example.com"]));
        // Everyone kept: the body leaves as it came.
        let body = raw(Some(&["jane.roe@example.com"]), "To: jane.roe@example.com");
        let out = run(RAW, &body).unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
    }

    #[test]
    fn mandrill_raw_header_recipient_dropped_refuses_whole() {
        use crate::decide::{EventVerdict, Reason};
        for (to, headers, n) in [
            // Denied in a Cc header, not in the envelope.
            (
                Some(&["jane.roe@example.com"][..]),
                "To: jane.roe@example.com\r\nCc: Deny <Deny.Me@example.com>",
                2,
            ),
            // Denied in both.
            (
                Some(&["jane.roe@example.com", "deny.me@example.com"][..]),
                "To: jane.roe@example.com, deny.me@example.com",
                2,
            ),
            // No envelope: the headers are the recipients; an unknown in Bcc.
            (
                None,
                "To: jane.roe@example.com\r\nBcc: unknown.person@example.com",
                2,
            ),
            // Every envelope recipient dropped: Mandrill would fall back to the headers.
            (
                Some(&["deny.me@example.com"][..]),
                "To: jane.roe@example.com",
                2,
            ),
        ] {
            let out = run(RAW, &raw(to, headers)).unwrap();
            assert_eq!(out.events.len(), n, "{headers}");
            assert!(out.events.iter().all(|e| e.verdict.is_drop()), "{headers}");
            assert!(out.body.is_none());
            assert!(out
                .events
                .iter()
                .any(|e| e.verdict == EventVerdict::Drop(Reason::ForeignIdentifier)));
        }
        // Headers only, all granted: forwarded unchanged.
        let out = run(
            RAW,
            &raw(None, "To: jane.roe@example.com, Mixed.Case@Gmail.com"),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false, false]);
        assert!(out.body.is_none());
    }

    #[test]
    fn mandrill_raw_unreadable() {
        for bad in [
            br#"{"raw_message": 5, "to": ["jane.roe@example.com"]}"#.to_vec(),
            br#"{"to": ["jane.roe@example.com"]}"#.to_vec(),
            br#"{"raw_message": "To: jane.roe@example.com

hi", "to": [{"email": "jane.roe@example.com"}]}"#
                .to_vec(),
            br#"{"raw_message": "To: jane.roe@example.com

hi", "to": "jane.roe@example.com"}"#
                .to_vec(),
            br#"{"raw_message": "just some text

hi", "to": ["jane.roe@example.com"]}"#
                .to_vec(),
            br#"{"raw_message": "To: Roe, Jane <jane.roe@example.com>

hi"}"#
                .to_vec(),
            br#"{"raw_message": "Subject: nobody

hi"}"#
                .to_vec(),
            br#"[]"#.to_vec(),
        ] {
            let r = run(RAW, &bad);
            let Err(BodyError::Unreadable(msg)) = r else {
                panic!("{}: {r:?}", String::from_utf8_lossy(&bad))
            };
            assert!(!msg.contains("jane"), "{msg}");
        }
    }

    #[test]
    fn mandrill_malformed_is_unreadable() {
        for bad in [
            &b"{"[..],
            br#"{"message":[]}"#,
            br#"{"message":{"to":{}}}"#,
            br#"{"message":{"to":["a@b.c"]}}"#,
        ] {
            assert!(matches!(
                run("/api/1.0/messages/send", bad),
                Err(BodyError::Unreadable(_))
            ));
        }
    }
}
