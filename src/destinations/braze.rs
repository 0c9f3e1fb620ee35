//! Braze REST API (`rest.{instance}.braze.com`, `*.braze.eu`).
//!
//! - `POST /users/track`: every `attributes[]`, `events[]` and `purchases[]`
//!   object is one event (decided in that order). Identifiers: `external_id`
//!   (taken both as an external id and as a patient id), `email`, `phone`;
//!   `braze_id` and `user_alias` name no patient we can check, so an object
//!   carrying only those is an unknown patient and is dropped. An array left
//!   empty is removed.
//! - `POST /messages/send`: every `external_user_ids[]` entry is one recipient
//!   (external id and patient id). `user_aliases[]` entries are recipients
//!   with no checkable identity (dropped as unknown). A send addressed to a
//!   `segment_id`, an `audience` or a `broadcast` cannot be enforced per
//!   recipient and is refused (`unenforceable_audience`, 451).
//!   Each message kind in `messages` is decided with its channel: `email` by
//!   email, `sms` and `whats_app` by SMS, with the request's category read on
//!   that channel (marketing is `marketing_email` by email, `marketing_sms` by
//!   SMS); push kinds, `content_card` and `webhook` reach no channel the consent
//!   model names and are decided in the request's category. An unknown kind is
//!   unreadable (422). Braze sends every kind to every recipient listed, so a
//!   kind no recipient may receive is removed, and then a recipient is kept
//!   only if every kind left may reach them (dropped otherwise, with the reason
//!   of the first kind denied).
//!
//! Category: `marketing_email` by default for both endpoints, with no channel
//! on `/users/track`; `X-Consent-Category` names another per request.

use super::common::{self, enforce_array, keep_as_is};
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::decide::EventVerdict;
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct Braze;

fn user_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    for x in common::strings_at(v, "external_id") {
        ids.add_external(&x);
        ids.add_patient(&x);
    }
    common::collect(v, &["email"], &mut ids, Identifiers::add_email);
    common::collect(v, &["phone"], &mut ids, Identifiers::add_phone);
    ids
}

fn recipient_ids(v: &Value) -> Identifiers {
    let mut ids = Identifiers::new();
    if let Some(x) = v.as_str() {
        ids.add_external(x);
        ids.add_patient(x);
    }
    ids
}

fn enforce_track(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let Value::Object(obj) = &mut root else {
        return Err(BodyError::Unreadable("body is not a JSON object".into()));
    };
    let mut events: Vec<EventApplied> = Vec::new();
    let mut changed = false;
    let mut any = false;
    for key in ["attributes", "events", "purchases"] {
        let Some(list) = obj.get_mut(key) else {
            continue;
        };
        let Value::Array(list) = list else {
            return Err(BodyError::Unreadable(format!("`{key}` is not an array")));
        };
        if list.iter().any(|x| !x.is_object()) {
            return Err(BodyError::Unreadable(format!(
                "`{key}` holds a non-object entry"
            )));
        }
        any = true;
        let (c, applied) = enforce_array(list, judge, &user_ids, &keep_as_is);
        if c && list.is_empty() {
            obj.shift_remove(key);
        }
        changed |= c;
        events.extend(applied);
    }
    if !any {
        return Err(BodyError::Unreadable(
            "none of `attributes`, `events`, `purchases` present".into(),
        ));
    }
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events,
        query: None,
    })
}

/// The channel a `messages` kind reaches its recipient over (`None`: one the
/// consent model does not name, e.g. push); `Err` for a kind we do not know.
fn kind_channel(kind: &str) -> Result<Option<Channel>, ()> {
    match kind {
        "email" => Ok(Some(Channel::Email)),
        // WhatsApp goes to the phone number, like Twilio's `whatsapp:` sends.
        "sms" | "whats_app" => Ok(Some(Channel::Sms)),
        "apple_push" | "android_push" | "kindle_push" | "web_push" | "content_card" | "webhook" => {
            Ok(None)
        }
        _ => Err(()),
    }
}

/// The message kinds of a send with their channels, in payload order (a kind
/// set to `null` is none).
fn message_kinds(
    obj: &serde_json::Map<String, Value>,
) -> Result<Vec<(String, Option<Channel>)>, BodyError> {
    let msgs = match obj.get("messages") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(BodyError::Unreadable("`messages` is not an object".into())),
    };
    let mut kinds = Vec::new();
    for (k, v) in msgs {
        if v.is_null() {
            continue;
        }
        let ch = kind_channel(k).map_err(|()| {
            // Name the key only when it reads as a kind name, never as data.
            let plain = k.len() <= 32 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            BodyError::Unreadable(match plain {
                true => format!("`messages.{k}` is not a message kind consentgate decides"),
                false => "`messages` holds a message kind consentgate does not decide".into(),
            })
        })?;
        kinds.push((k.clone(), ch));
    }
    Ok(kinds)
}

/// A judge asking over the channels of the message kinds a recipient gets.
struct Over<'j> {
    judge: &'j mut dyn Judge,
    channels: Vec<Option<Channel>>,
}

impl Judge for Over<'_> {
    fn decide(&mut self, ids: &Identifiers) -> EventVerdict {
        self.judge.decide_on(ids, &self.channels, true)
    }
    fn guard(
        &mut self,
        index: usize,
        event: &mut Value,
    ) -> Result<Vec<String>, crate::guard::Reason> {
        self.judge.guard(index, event)
    }
    fn guard_text(&mut self, index: usize, json: &[u8]) -> crate::guard::Scan {
        self.judge.guard_text(index, json)
    }
}

const RECIPIENTS: [&str; 2] = ["external_user_ids", "user_aliases"];

fn enforce_send(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let Value::Object(obj) = &mut root else {
        return Err(BodyError::Unreadable("body is not a JSON object".into()));
    };
    for key in ["segment_id", "audience", "broadcast"] {
        let set = match obj.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(BodyError::Forbidden {
                code: "unenforceable_audience",
                detail: format!("`{key}` addresses recipients that cannot be checked one by one"),
            });
        }
    }
    let mut any = false;
    for key in RECIPIENTS {
        let Some(list) = obj.get(key) else {
            continue;
        };
        let Value::Array(list) = list else {
            return Err(BodyError::Unreadable(format!("`{key}` is not an array")));
        };
        if key == "external_user_ids" && list.iter().any(|x| !x.is_string()) {
            return Err(BodyError::Unreadable(
                "`external_user_ids` holds a non-string entry".into(),
            ));
        }
        any = true;
    }
    if !any {
        return Err(BodyError::Unreadable(
            "no `external_user_ids` or `user_aliases` recipients".into(),
        ));
    }
    // Braze sends every kind to every recipient: a kind no recipient may get
    // over its channel is removed; then a recipient is kept only if every
    // kind left may reach them.
    let kinds = message_kinds(obj)?;
    let mut channels: Vec<Option<Channel>> = Vec::new();
    for (_, ch) in &kinds {
        if !channels.contains(ch) {
            channels.push(*ch);
        }
    }
    let mut open = Vec::new();
    if channels.len() > 1 {
        for ch in &channels {
            let someone = RECIPIENTS
                .iter()
                .filter_map(|k| obj.get(*k).and_then(Value::as_array))
                .flatten()
                .any(|r| !judge.decide_on(&recipient_ids(r), &[*ch], false).is_drop());
            if someone {
                open.push(*ch);
            }
        }
    }
    let mut removed: Vec<String> = Vec::new();
    if !open.is_empty() && open.len() < channels.len() {
        if let Some(Value::Object(msgs)) = obj.get_mut("messages") {
            for (k, ch) in &kinds {
                if !open.contains(ch) {
                    msgs.shift_remove(k);
                    removed.push(format!("messages.{k}"));
                }
            }
        }
        channels = open;
    }
    let mut over = Over { judge, channels };
    let mut events = Vec::new();
    let mut changed = !removed.is_empty();
    for key in RECIPIENTS {
        let Some(Value::Array(list)) = obj.get_mut(key) else {
            continue;
        };
        let (c, mut applied) = enforce_array(list, &mut over, &recipient_ids, &keep_as_is);
        if c && list.is_empty() {
            obj.shift_remove(key);
        }
        for a in applied.iter_mut().filter(|a| !a.verdict.is_drop()) {
            a.strip_with(|v| v.extend(removed.iter().cloned()));
        }
        changed |= c;
        events.extend(applied);
    }
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events,
        query: None,
    })
}

impl Adapter for Braze {
    fn name(&self) -> &str {
        "braze"
    }
    fn display_name(&self) -> &str {
        "Braze"
    }
    fn kind(&self) -> DestKind {
        DestKind::Email
    }
    fn default_category(&self) -> Category {
        Category::MarketingEmail
    }
    fn matches_host(&self, host: &str) -> bool {
        host.strip_prefix("rest.")
            .is_some_and(|rest| common::host_matches("*.braze.com", rest))
            || common::host_matches("*.braze.eu", host)
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        *method == Method::POST
            && matches!(
                common::path_segments(path).as_slice(),
                ["users", "track"] | ["messages", "send"]
            )
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        match common::path_segments(req.path).as_slice() {
            ["messages", "send"] => enforce_send(body, judge),
            _ => enforce_track(body, judge),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 200,
            body: r#"{"message":"success"}"#,
        }
    }
    fn identifier_fields(&self) -> &str {
        "external_id, email, phone; external_user_ids[]"
    }
    fn ldu_signal(&self) -> &str {
        "none (segment/audience/broadcast sends refused)"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Braze
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    const HOST: &str = "rest.iad-01.braze.com";

    fn run(path: &str, body: &Value) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&Braze, &store);
        let bytes = serde_json::to_vec(body).unwrap();
        Braze.enforce(&req(&Method::POST, HOST, path), &bytes, &mut d)
    }

    #[test]
    fn braze_routes() {
        assert!(Braze.matches_host("rest.iad-01.braze.com"));
        assert!(Braze.matches_host("rest.fra-01.braze.eu"));
        assert!(!Braze.matches_host("rest.braze.com"));
        assert!(!Braze.matches_host("dashboard-01.braze.com"));
        assert!(!Braze.matches_host("braze.eu"));
        assert!(Braze.inspects(&Method::POST, "/users/track"));
        assert!(Braze.inspects(&Method::POST, "/messages/send"));
        assert!(!Braze.inspects(&Method::GET, "/users/track"));
        assert!(!Braze.inspects(&Method::POST, "/users/export/ids"));
    }

    #[test]
    fn braze_users_track_mixed() {
        let body = json!({
            "attributes": [
                {"external_id": "braze:1020", "first_name": "S"},
                {"email": "deny.me@example.com", "phone": "+14155550102", "home_city": "SF"},
                {"user_alias": {"alias_name": "a1", "alias_label": "crm"}, "email": "unknown.person@example.com"}
            ],
            "events": [
                {"external_id": "P-1001", "name": "booked_consult", "time": "2026-11-20T10:00:00Z"},
                {"email": "email.denied.channel@example.com", "name": "viewed", "time": "2026-11-20T10:00:00Z"}
            ],
            "purchases": [
                {"braze_id": "b-1", "product_id": "x", "currency": "USD", "price": 1, "time": "2026-11-20T10:00:00Z"}
            ]
        });
        let out = run("/users/track", &body).unwrap();
        // P-1009: email channel denied, but Braze sets no channel → kept.
        assert_eq!(
            drops(&out.events),
            vec![false, true, true, false, false, true]
        );
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &[
                "deny.me@example.com",
                "+14155550102",
                "unknown.person@example.com",
            ],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["attributes"].as_array().unwrap().len(), 1);
        assert_eq!(v["events"].as_array().unwrap().len(), 2);
        assert!(v.get("purchases").is_none());
    }

    #[test]
    fn braze_messages_send() {
        let body = json!({
            "external_user_ids": ["P-1001", "crm:0031x00000den", "nobody-1"],
            "messages": {"email": {"app_id": "a", "subject": "Hi", "body": "<p>x</p>"}}
        });
        let out = run("/messages/send", &body).unwrap();
        assert_eq!(drops(&out.events), vec![false, true, true]);
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["external_user_ids"], json!(["P-1001"]));
        let seg = json!({"segment_id": "seg", "messages": {"email": {}}});
        assert!(matches!(
            run("/messages/send", &seg),
            Err(BodyError::Forbidden {
                code: "unenforceable_audience",
                ..
            })
        ));
        let all_ok = json!({"external_user_ids": ["crm:0031x00000abc"], "broadcast": false});
        let out = run("/messages/send", &all_ok).unwrap();
        assert!(out.body.is_none());
    }

    /// A judge that decides per channel as the proxy does (closures ignore it).
    struct ByChannel<'a> {
        store: &'a crate::consent::ConsentStore,
        category: Category,
        recorded: usize,
    }

    impl Judge for ByChannel<'_> {
        fn decide(&mut self, ids: &Identifiers) -> EventVerdict {
            self.decide_on(ids, &[], true)
        }
        fn decide_on(
            &mut self,
            ids: &Identifiers,
            channels: &[Option<Channel>],
            record: bool,
        ) -> EventVerdict {
            use crate::decide::{Context, Policy};
            let own = [None];
            let channels = if channels.is_empty() {
                &own[..]
            } else {
                channels
            };
            self.recorded += usize::from(record);
            let mut out = None;
            for ch in channels {
                let ctx = Context {
                    category: ch.map_or(self.category, |c| self.category.on_channel(c)),
                    channel: *ch,
                    kind: DestKind::Email,
                    header_gpc: false,
                    stale: false,
                };
                let v = Policy::default()
                    .decide(&ctx, self.store.lookup(ids))
                    .verdict;
                if v.is_drop() {
                    return v;
                }
                out.get_or_insert(v);
            }
            out.unwrap_or(EventVerdict::Drop(crate::decide::Reason::UnknownPatient))
        }
        fn guard(&mut self, _: usize, _: &mut Value) -> Result<Vec<String>, crate::guard::Reason> {
            Ok(Vec::new())
        }
        fn guard_text(&mut self, _: usize, _: &[u8]) -> crate::guard::Scan {
            crate::guard::Scan::default()
        }
    }

    fn send_by_channel(body: &Value, category: Category) -> (Result<Enforced, BodyError>, usize) {
        let store = store();
        let mut j = ByChannel {
            store: &store,
            category,
            recorded: 0,
        };
        let bytes = serde_json::to_vec(body).unwrap();
        let out = Braze.enforce(&req(&Method::POST, HOST, "/messages/send"), &bytes, &mut j);
        (out, j.recorded)
    }

    #[test]
    fn braze_message_kinds_decided_by_channel() {
        use crate::decide::Reason;
        let email = json!({"subject": "Hi", "body": "<p>x</p>"});
        let sms = json!({"subscription_group_id": "g", "body": "x"});
        // P-1009: email channel denied. P-1006: SMS channel denied, no marketing_sms.
        let body = json!({"external_user_ids": ["P-1001", "P-1009", "P-1006"],
                          "messages": {"email": email, "sms": sms}});
        let (out, recorded) = send_by_channel(&body, Category::MarketingEmail);
        let out = out.unwrap();
        assert_eq!(recorded, 3, "one recorded decision per recipient");
        assert_eq!(
            out.events.iter().map(|e| e.verdict).collect::<Vec<_>>()[1..],
            [
                EventVerdict::Drop(Reason::ChannelDenied),
                EventVerdict::Drop(Reason::ConsentDenied)
            ]
        );
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(v["external_user_ids"], json!(["P-1001"]));
        assert_eq!(v["messages"], json!({"email": email, "sms": sms}));
        // A kind nobody may receive goes; those left get the rest.
        let body = json!({"external_user_ids": ["P-1009"],
                          "messages": {"email": email, "sms": sms, "apple_push": {"alert": "x"}}});
        let out = send_by_channel(&body, Category::MarketingEmail).0.unwrap();
        assert!(!out.events[0].verdict.is_drop());
        assert_eq!(out.events[0].fields_stripped(), ["messages.email"]);
        let v: Value = serde_json::from_slice(&out.body.unwrap()).unwrap();
        assert_eq!(
            v["messages"],
            json!({"sms": sms, "apple_push": {"alert": "x"}})
        );
        // Reminders: the category is kept, the channel still decides.
        let body = json!({"external_user_ids": ["P-1006", "P-1007"], "messages": {"sms": sms}});
        let out = send_by_channel(&body, Category::AppointmentReminders)
            .0
            .unwrap();
        assert_eq!(drops(&out.events), vec![true, false]);
        // Unknown or malformed kinds are unreadable.
        for bad in [
            json!({"external_user_ids": ["P-1001"], "messages": {"pigeon": {}}}),
            json!({"external_user_ids": ["P-1001"], "messages": {"Email": email}}),
            json!({"external_user_ids": ["P-1001"], "messages": "email"}),
        ] {
            assert!(matches!(
                send_by_channel(&bad, Category::MarketingEmail).0,
                Err(BodyError::Unreadable(_))
            ));
        }
    }

    #[test]
    fn braze_malformed_is_unreadable() {
        for (path, bad) in [
            ("/users/track", json!({"attributes": {}})),
            ("/users/track", json!({"attributes": ["x"]})),
            ("/users/track", json!({})),
            ("/messages/send", json!({"external_user_ids": [1]})),
            ("/messages/send", json!([])),
        ] {
            assert!(matches!(run(path, &bad), Err(BodyError::Unreadable(_))));
        }
        let store = store();
        let mut d = decider_for(&Braze, &store);
        assert!(matches!(
            Braze.enforce(&req(&Method::POST, HOST, "/users/track"), b"{x", &mut d),
            Err(BodyError::Unreadable(_))
        ));
    }
}
