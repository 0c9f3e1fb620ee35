//! Klaviyo (`a.klaviyo.com`, JSON:API bodies; trailing `/` optional):
//!
//! - `POST /api/events`: one event; the profile is
//!   `data.attributes.profile.data.attributes` (or the older
//!   `data.attributes.profile.{email,phone_number,external_id}` shape).
//! - `POST /api/event-bulk-create-jobs`: one decision per
//!   `data.attributes["events-bulk-create"].data[]` entry (a profile and its
//!   events; profile at `attributes.profile.data.attributes`).
//! - `POST /api/profiles`, `/api/profile-import`: one profile, `data.attributes`.
//! - `PATCH /api/profiles/{id}`: one profile, `data.attributes`, its `data.id`
//!   and the path's `{id}`.
//! - `POST /api/profile-bulk-import-jobs`: one decision per
//!   `data.attributes.profiles.data[]` profile.
//! - `POST /api/profile-subscription-bulk-create-jobs`: one decision per
//!   `data.attributes.profiles.data[]` profile, over the channels it is
//!   subscribed on (`attributes.subscriptions.{email,sms}`: marketing reads as
//!   `marketing_email` by email and `marketing_sms` by SMS; the first drop
//!   wins); a dropped profile is removed from the job.
//! - `POST /api/push-tokens`: one profile, `data.attributes.profile.data`.
//! - `POST /api/back-in-stock-subscriptions`: one profile,
//!   `data.attributes.profile.data`, over `data.attributes.channels`
//!   (`EMAIL`, `SMS`).
//! - `POST /api/profile-merge`: the profile kept (`data.id`) and each merged
//!   into it (`data.relationships.profiles.data[].id`), one decision each; a
//!   merge acts on every profile it names, so one dropped refuses the request
//!   (the others are dropped as `foreign_identifier`).
//!
//! Identifiers: `email`, `phone_number`, `external_id` (plaintext; Klaviyo does
//! not hash) and, on the endpoints that name a profile resource (PATCH, push
//! tokens, back in stock, subscriptions, merge), the profile's Klaviyo `id`,
//! looked up as an external id: the index knows it only if it was synced there,
//! so a profile named by its Klaviyo id alone is otherwise an unknown patient
//! (dropped). A subscription channel other than email and SMS is unreadable
//! (422): consentgate has no consent to decide it on.

use super::common::{self, keep_as_is};
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::decide::EventVerdict;
use crate::identify::Identifiers;
use crate::model::{Category, Channel, DestKind};
use http::Method;
use serde_json::Value;

pub(crate) struct Klaviyo;

type AddFn = fn(&mut Identifiers, &str);

/// Identifiers of a profile attributes object found at each of `prefixes` of `v`.
fn profile_ids(v: &Value, prefixes: &[&str]) -> Identifiers {
    let mut ids = Identifiers::new();
    add_profile(v, prefixes, &mut ids);
    ids
}

fn add_profile(v: &Value, prefixes: &[&str], ids: &mut Identifiers) {
    for p in prefixes {
        let at = |f: &str| format!("{p}.{f}");
        let fields: [(&str, AddFn); 6] = [
            ("email", Identifiers::add_email),
            ("$email", Identifiers::add_email),
            ("phone_number", Identifiers::add_phone),
            ("$phone_number", Identifiers::add_phone),
            ("external_id", Identifiers::add_external),
            ("$id", Identifiers::add_external),
        ];
        for (f, add) in fields {
            common::collect(v, &[at(f).as_str()], ids, add);
        }
    }
}

/// Identifiers of a JSON:API profile resource at `prefix` (`""`: `v` itself):
/// its attributes and its Klaviyo `id` (as an external id).
fn resource_ids(v: &Value, prefix: &str, ids: &mut Identifiers) {
    let at = |f: &str| match prefix {
        "" => f.to_string(),
        p => format!("{p}.{f}"),
    };
    add_profile(v, &[at("attributes").as_str()], ids);
    common::collect(v, &[at("id").as_str()], ids, Identifiers::add_external);
}

#[derive(Clone, Copy)]
enum Route<'a> {
    Event,
    EventBulk,
    Profile,
    ProfileBulk,
    ProfileUpdate(&'a str),
    SubscriptionBulk,
    PushToken,
    BackInStock,
    Merge,
}

fn route<'a>(method: &Method, path: &'a str) -> Option<Route<'a>> {
    let segs = common::path_segments(path);
    if *method == Method::PATCH {
        return match segs.as_slice() {
            ["api", "profiles", id] => Some(Route::ProfileUpdate(id)),
            _ => None,
        };
    }
    if *method != Method::POST {
        return None;
    }
    match segs.as_slice() {
        ["api", "events"] => Some(Route::Event),
        ["api", "event-bulk-create-jobs"] => Some(Route::EventBulk),
        ["api", "profiles" | "profile-import"] => Some(Route::Profile),
        ["api", "profile-bulk-import-jobs"] => Some(Route::ProfileBulk),
        ["api", "profile-subscription-bulk-create-jobs"] => Some(Route::SubscriptionBulk),
        ["api", "push-tokens"] => Some(Route::PushToken),
        ["api", "back-in-stock-subscriptions"] => Some(Route::BackInStock),
        ["api", "profile-merge"] => Some(Route::Merge),
        _ => None,
    }
}

/// The body, with `data` an object.
fn data_object(body: &[u8]) -> Result<Value, BodyError> {
    let root = common::parse_json(body)?;
    if !root.get("data").is_some_and(Value::is_object) {
        return Err(BodyError::Unreadable(
            "`data` is missing or not an object".into(),
        ));
    }
    Ok(root)
}

fn single(body: &[u8], prefixes: &[&str], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let root = data_object(body)?;
    Ok(common::enforce_single(&profile_ids(&root, prefixes), judge))
}

/// A subscription channel as consentgate decides it (`email`, `sms`; any case).
fn channel(name: &str) -> Result<Channel, BodyError> {
    match name.to_ascii_lowercase().as_str() {
        "email" => Ok(Channel::Email),
        "sms" => Ok(Channel::Sms),
        _ => Err(BodyError::Unreadable(
            "a subscription names a channel consentgate does not decide (email, sms)".into(),
        )),
    }
}

/// The channels of a profile's `subscriptions` object (none: the request's own).
fn subscription_channels(profile: &Value) -> Result<Vec<Option<Channel>>, BodyError> {
    match profile.pointer("/attributes/subscriptions") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => m.keys().map(|k| channel(k).map(Some)).collect(),
        Some(_) => Err(BodyError::Unreadable(
            "`attributes.subscriptions` is not an object".into(),
        )),
    }
}

/// A judge deciding each event over its own channels, in payload order (an
/// event past the list is decided in the request's context).
struct OverChannels<'j> {
    judge: &'j mut dyn Judge,
    channels: std::vec::IntoIter<Vec<Option<Channel>>>,
}

impl Judge for OverChannels<'_> {
    fn decide(&mut self, ids: &Identifiers) -> EventVerdict {
        let ch = self.channels.next().unwrap_or_default();
        self.judge.decide_on(ids, &ch, true)
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

const SUBSCRIPTION_PROFILES: &str = "data.attributes.profiles.data";

fn subscription_bulk(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let mut root = common::parse_json(body)?;
    let Some(profiles) = common::array_at_mut(&mut root, SUBSCRIPTION_PROFILES) else {
        return Err(BodyError::Unreadable(format!(
            "`{SUBSCRIPTION_PROFILES}` is missing or not an array"
        )));
    };
    let channels = profiles
        .iter()
        .map(subscription_channels)
        .collect::<Result<Vec<_>, _>>()?;
    let mut over = OverChannels {
        judge,
        channels: channels.into_iter(),
    };
    let ids = |p: &Value| {
        let mut ids = Identifiers::new();
        resource_ids(p, "", &mut ids);
        ids
    };
    let (changed, applied) = common::enforce_array(profiles, &mut over, &ids, &keep_as_is);
    Ok(Enforced {
        body: changed.then(|| common::to_json(&root)),
        events: applied,
        query: None,
    })
}

/// Push tokens and back-in-stock subscriptions: one profile resource at
/// `data.attributes.profile.data` (or the older attributes-only shape).
fn profile_resource(
    body: &[u8],
    judge: &mut dyn Judge,
    back_in_stock: bool,
) -> Result<Enforced, BodyError> {
    let root = data_object(body)?;
    let mut ids = profile_ids(&root, &["data.attributes.profile"]);
    resource_ids(&root, "data.attributes.profile.data", &mut ids);
    let channels: Vec<Option<Channel>> =
        match (back_in_stock, root.pointer("/data/attributes/channels")) {
            (false, _) | (true, None | Some(Value::Null)) => Vec::new(),
            (true, Some(Value::Array(a))) => a
                .iter()
                .map(|c| match c.as_str() {
                    Some(s) => channel(s).map(Some),
                    None => Err(BodyError::Unreadable(
                        "`data.attributes.channels` holds a non-string".into(),
                    )),
                })
                .collect::<Result<_, _>>()?,
            (true, Some(_)) => {
                return Err(BodyError::Unreadable(
                    "`data.attributes.channels` is not an array".into(),
                ))
            }
        };
    let verdict = judge.decide_on(&ids, &channels, true);
    Ok(Enforced {
        body: None,
        events: vec![EventApplied::new(verdict)],
        query: None,
    })
}

/// `PATCH /api/profiles/{id}`: one profile, named by its attributes, `data.id`
/// and the path's id.
fn profile_update(
    body: &[u8],
    path_id: &str,
    judge: &mut dyn Judge,
) -> Result<Enforced, BodyError> {
    let root = data_object(body)?;
    let mut ids = Identifiers::new();
    resource_ids(&root, "data", &mut ids);
    ids.add_external(&common::percent_decode(path_id));
    Ok(common::enforce_single(&ids, judge))
}

/// `POST /api/profile-merge`: every profile named is decided; one dropped
/// refuses the merge.
fn merge(body: &[u8], judge: &mut dyn Judge) -> Result<Enforced, BodyError> {
    let root = data_object(body)?;
    let target = root
        .pointer("/data/id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            BodyError::Unreadable(
                "`data.id` (the profile merged into) is missing or not a string".into(),
            )
        })?;
    let Some(Value::Array(sources)) = root.pointer("/data/relationships/profiles/data") else {
        return Err(BodyError::Unreadable(
            "`data.relationships.profiles.data` is missing or not an array".into(),
        ));
    };
    let mut named = vec![target];
    for s in sources {
        named.push(s.get("id").and_then(Value::as_str).ok_or_else(|| {
            BodyError::Unreadable(
                "`data.relationships.profiles.data[]` holds a profile without a string `id`".into(),
            )
        })?);
    }
    let mut applied: Vec<EventApplied> = named
        .iter()
        .map(|id| {
            let mut ids = Identifiers::new();
            ids.add_external(id);
            EventApplied::new(judge.decide(&ids))
        })
        .collect();
    common::all_or_nothing(&mut applied);
    Ok(Enforced {
        body: None,
        events: applied,
        query: None,
    })
}

impl Adapter for Klaviyo {
    fn name(&self) -> &str {
        "klaviyo"
    }
    fn display_name(&self) -> &str {
        "Klaviyo"
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
        host == "a.klaviyo.com"
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        route(method, path).is_some()
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        match route(req.method, req.path).unwrap_or(Route::Event) {
            Route::ProfileUpdate(id) => profile_update(body, id, judge),
            Route::SubscriptionBulk => subscription_bulk(body, judge),
            Route::PushToken => profile_resource(body, judge, false),
            Route::BackInStock => profile_resource(body, judge, true),
            Route::Merge => merge(body, judge),
            Route::Event => single(
                body,
                &[
                    "data.attributes.profile.data.attributes",
                    "data.attributes.profile",
                ],
                judge,
            ),
            Route::Profile => single(body, &["data.attributes"], judge),
            Route::EventBulk => common::enforce_json_batch_at(
                body,
                "data.attributes.events-bulk-create.data",
                judge,
                &|e: &Value| profile_ids(e, &["attributes.profile.data.attributes"]),
                &keep_as_is,
            ),
            Route::ProfileBulk => common::enforce_json_batch_at(
                body,
                "data.attributes.profiles.data",
                judge,
                &|p: &Value| profile_ids(p, &["attributes"]),
                &keep_as_is,
            ),
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        SyntheticOk {
            status: 202,
            body: "",
        }
    }
    fn identifier_fields(&self) -> &str {
        "profile attributes email/phone_number/external_id; profile id (resource endpoints)"
    }
    fn ldu_signal(&self) -> &str {
        "none"
    }
    fn refusal_shape(&self) -> crate::refusal::Shape {
        crate::refusal::Shape::Klaviyo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::common::testkit::*;
    use serde_json::json;

    fn run_post(path: &str, body: &Value) -> Result<Enforced, BodyError> {
        run(Method::POST, path, body)
    }

    fn run(method: Method, path: &str, body: &Value) -> Result<Enforced, BodyError> {
        let store = store();
        let mut d = decider_for(&Klaviyo, &store);
        let bytes = serde_json::to_vec(body).unwrap();
        Klaviyo.enforce(&req(&method, "a.klaviyo.com", path), &bytes, &mut d)
    }

    fn event(profile: Value) -> Value {
        json!({"data": {"type": "event", "attributes": {
            "properties": {"clinic": "oncology"},
            "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Page"}}},
            "profile": {"data": {"type": "profile", "attributes": profile}}
        }}})
    }

    #[test]
    fn klaviyo_routes() {
        assert!(Klaviyo.matches_host("a.klaviyo.com"));
        assert!(!Klaviyo.matches_host("klaviyo.com"));
        for p in [
            "/api/events",
            "/api/events/",
            "/api/event-bulk-create-jobs/",
            "/api/profiles/",
            "/api/profile-import",
            "/api/profile-bulk-import-jobs/",
        ] {
            assert!(Klaviyo.inspects(&Method::POST, p), "{p}");
        }
        assert!(!Klaviyo.inspects(&Method::GET, "/api/events/"));
        assert!(!Klaviyo.inspects(&Method::POST, "/api/lists/"));
        for p in [
            "/api/profile-subscription-bulk-create-jobs/",
            "/api/push-tokens",
            "/api/back-in-stock-subscriptions/",
            "/api/profile-merge/",
        ] {
            assert!(Klaviyo.inspects(&Method::POST, p), "{p}");
        }
        assert!(Klaviyo.inspects(&Method::PATCH, "/api/profiles/01GDDKASAP8TKDDA2GRZDSVP4H/"));
        assert!(!Klaviyo.inspects(&Method::PATCH, "/api/profiles/"));
        assert!(!Klaviyo.inspects(&Method::PATCH, "/api/lists/L1/"));
        assert!(!Klaviyo.inspects(&Method::POST, "/api/profiles/01GDD/"));
    }

    /// The default policy over the channels a request asks about (a plain
    /// closure ignores them).
    struct OnChannels(crate::consent::ConsentStore);

    impl Judge for OnChannels {
        fn decide(&mut self, ids: &Identifiers) -> EventVerdict {
            self.decide_on(ids, &[], true)
        }
        fn decide_on(
            &mut self,
            ids: &Identifiers,
            channels: &[Option<Channel>],
            _: bool,
        ) -> EventVerdict {
            use crate::decide::{Context, Policy};
            let chs = match channels {
                [] => vec![Some(Channel::Email)],
                c => c.to_vec(),
            };
            let mut last = None;
            for ch in chs {
                let ctx = Context {
                    category: ch.map_or(Category::MarketingEmail, |c| {
                        Category::MarketingEmail.on_channel(c)
                    }),
                    channel: ch,
                    kind: DestKind::Email,
                    header_gpc: false,
                    stale: false,
                };
                let v = Policy::default().decide(&ctx, self.0.lookup(ids)).verdict;
                if v.is_drop() {
                    return v;
                }
                last = Some(v);
            }
            last.unwrap_or(EventVerdict::Drop(crate::decide::Reason::UnknownPatient))
        }
        fn guard(&mut self, _: usize, _: &mut Value) -> Result<Vec<String>, crate::guard::Reason> {
            Ok(Vec::new())
        }
        fn guard_text(&mut self, _: usize, _: &[u8]) -> crate::guard::Scan {
            crate::guard::Scan::default()
        }
    }

    fn run_on(method: Method, path: &str, body: &Value) -> Result<Enforced, BodyError> {
        let mut j = OnChannels(store());
        let bytes = serde_json::to_vec(body).unwrap();
        Klaviyo.enforce(&req(&method, "a.klaviyo.com", path), &bytes, &mut j)
    }

    fn sub(email: &str, channels: &[&str]) -> Value {
        let mut subs = serde_json::Map::new();
        for c in channels {
            subs.insert(
                c.to_string(),
                json!({"marketing": {"consent": "SUBSCRIBED"}}),
            );
        }
        json!({"type": "profile", "attributes": {"email": email, "subscriptions": subs}})
    }

    #[test]
    fn klaviyo_subscription_bulk_decides_each_profile_on_its_channels() {
        let body = json!({"data": {"type": "profile-subscription-bulk-create-job", "attributes": {
            "custom_source": "Clinic signup",
            "profiles": {"data": [
                sub("jane.roe@example.com", &["email"]),
                sub("deny.me@example.com", &["email"]),
                // P-1009: email channel denied, marketing SMS granted.
                sub("email.denied.channel@example.com", &["sms"]),
                sub("email.denied.channel@example.com", &["email", "sms"]),
                sub("unknown.person@example.com", &["email"])
            ]}},
            "relationships": {"list": {"data": {"type": "list", "id": "Y6nRLr"}}}}});
        let out = run_on(
            Method::POST,
            "/api/profile-subscription-bulk-create-jobs",
            &body,
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false, true, false, true, true]);
        let bytes = out.body.unwrap();
        assert_absent(
            &bytes,
            &["deny.me@example.com", "unknown.person@example.com"],
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v["data"]["attributes"]["profiles"]["data"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(v["data"]["relationships"]["list"]["data"]["id"], "Y6nRLr");
        // A channel consentgate cannot decide is unreadable, before any decision.
        let bad = json!({"data": {"attributes": {"profiles": {"data": [
            sub("jane.roe@example.com", &["email"]), sub("jane.roe@example.com", &["whatsapp"])]}}}});
        assert!(matches!(
            run_on(
                Method::POST,
                "/api/profile-subscription-bulk-create-jobs",
                &bad
            ),
            Err(BodyError::Unreadable(_))
        ));
    }

    #[test]
    fn klaviyo_push_token_back_in_stock_patch_and_merge() {
        let profile = |attrs: Value| json!({"data": {"type": "profile", "id": "01GDDKASAP8TKDDA2GRZDSVP4H", "attributes": attrs}});
        let push = |attrs: Value| {
            json!({"data": {"type": "push-token", "attributes": {
            "token": "1234567890", "platform": "ios", "vendor": "apns",
            "enablement_status": "AUTHORIZED", "background": "AVAILABLE",
            "profile": profile(attrs)}}})
        };
        let out = run_on(
            Method::POST,
            "/api/push-tokens",
            &push(json!({"email": "jane.roe@example.com"})),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        assert!(out.body.is_none());
        let out = run_on(
            Method::POST,
            "/api/push-tokens",
            &push(json!({"phone_number": "+14155550102"})),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        // Only a Klaviyo id the index does not know: an unknown patient.
        let out = run_on(Method::POST, "/api/push-tokens", &push(json!({}))).unwrap();
        assert_eq!(drops(&out.events), vec![true]);

        let bis = |email: &str, channels: Value| {
            json!({"data": {"type": "back-in-stock-subscription",
            "attributes": {"channels": channels, "profile": profile(json!({"email": email}))},
            "relationships": {"variant": {"data": {"type": "catalog-variant", "id": "$custom:::$default:::SKU-1"}}}}})
        };
        let p = "/api/back-in-stock-subscriptions";
        let d = |b: &Value| drops(&run_on(Method::POST, p, b).unwrap().events);
        assert_eq!(
            d(&bis("jane.roe@example.com", json!(["EMAIL"]))),
            vec![false]
        );
        assert_eq!(
            d(&bis("email.denied.channel@example.com", json!(["SMS"]))),
            vec![false]
        );
        assert_eq!(
            d(&bis(
                "email.denied.channel@example.com",
                json!(["EMAIL", "SMS"])
            )),
            vec![true]
        );
        assert_eq!(d(&bis("deny.me@example.com", json!(["SMS"]))), vec![true]);
        assert!(matches!(
            run_on(
                Method::POST,
                p,
                &bis("jane.roe@example.com", json!(["PUSH"]))
            ),
            Err(BodyError::Unreadable(_))
        ));

        let patch = "/api/profiles/01GDDKASAP8TKDDA2GRZDSVP4H";
        let out = run(
            Method::PATCH,
            patch,
            &profile(json!({"email": "jane.roe@example.com", "first_name": "Jane"})),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        let out = run(
            Method::PATCH,
            patch,
            &profile(json!({"external_id": "crm:0031x00000den"})),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        // The path's id is looked up too (an index that synced it as an external id).
        let out = run(
            Method::PATCH,
            "/api/profiles/crm:0031x00000den",
            &json!({"data": {"type": "profile", "attributes": {"properties": {"x": 1}}}}),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);

        let merge = |into: &str, from: &[&str]| {
            json!({"data": {"type": "profile-merge", "id": into,
            "relationships": {"profiles": {"data": from.iter().map(|i| json!({"type": "profile", "id": i})).collect::<Vec<_>>()}}}})
        };
        let out = run(
            Method::POST,
            "/api/profile-merge",
            &merge("crm:0031x00000abc", &["crm:0031x00000abc"]),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![false, false]);
        assert!(out.body.is_none());
        // One profile that must not be sent refuses the whole merge.
        let out = run(
            Method::POST,
            "/api/profile-merge",
            &merge("crm:0031x00000abc", &["crm:0031x00000den"]),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true, true]);
        assert_eq!(
            out.events[0].verdict,
            EventVerdict::Drop(crate::decide::Reason::ForeignIdentifier)
        );
        for bad in [
            json!({"data": {"type": "profile-merge", "relationships": {"profiles": {"data": []}}}}),
            json!({"data": {"type": "profile-merge", "id": "a", "relationships": {"profiles": {"data": [{"type": "profile"}]}}}}),
            json!({"data": {"type": "profile-merge", "id": "a"}}),
        ] {
            assert!(matches!(
                run(Method::POST, "/api/profile-merge", &bad),
                Err(BodyError::Unreadable(_))
            ));
        }
    }

    #[test]
    fn klaviyo_single_event_and_profile() {
        let out = run_post(
            "/api/events/",
            &event(json!({"email": "jane.roe@example.com"})),
        )
        .unwrap();
        assert!(out.body.is_none());
        assert_eq!(drops(&out.events), vec![false]);
        let out = run_post(
            "/api/events/",
            &event(json!({"phone_number": "+14155550102"})),
        )
        .unwrap();
        assert_eq!(drops(&out.events), vec![true]);
        let old = json!({"data": {"type": "event", "attributes": {
            "profile": {"email": "email.denied.channel@example.com"}, "properties": {}}}});
        assert_eq!(
            drops(&run_post("/api/events", &old).unwrap().events),
            vec![true]
        );
        let prof = json!({"data": {"type": "profile", "attributes": {
            "external_id": "crm:0031x00000abc", "first_name": "Jane"}}});
        let out = run_post("/api/profile-import/", &prof).unwrap();
        assert_eq!(drops(&out.events), vec![false]);
        assert!(out.body.is_none());
    }

    #[test]
    fn klaviyo_event_bulk_mixed() {
        let entry = |email: &str| {
            json!({"type": "event-bulk-create", "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
                "events": {"data": [{"type": "event", "attributes": {"properties": {}}}]}}})
        };
        let body = json!({"data": {"type": "event-bulk-create-job", "attributes": {
        "events-bulk-create": {"data": [
            entry("jane.roe@example.com"),
            entry("deny.me@example.com"),
            entry("unknown.person@example.com"),
            entry("email.denied.channel@example.com")
        ]}}}});
        let out = run_post("/api/event-bulk-create-jobs/", &body).unwrap();
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
    }

    #[test]
    fn klaviyo_profile_bulk_mixed() {
        let body = json!({"data": {"type": "profile-bulk-import-job", "attributes": {
            "profiles": {"data": [
                {"type": "profile", "attributes": {"email": "jane.roe@example.com"}},
                {"type": "profile", "attributes": {"phone_number": "+14155550102", "email": "x@y.org"}},
                {"type": "profile", "attributes": {"email": "MIXED.CASE@gmail.com"}}
            ]}},
            "relationships": {"lists": {"data": [{"type": "list", "id": "L1"}]}}}});
        let out = run_post("/api/profile-bulk-import-jobs/", &body).unwrap();
        assert_eq!(drops(&out.events), vec![false, true, false]);
        let bytes = out.body.unwrap();
        assert_absent(&bytes, &["+14155550102", "x@y.org"]);
    }

    #[test]
    fn klaviyo_malformed_is_unreadable() {
        let store = store();
        let mut d = decider_for(&Klaviyo, &store);
        for (path, bad) in [
            ("/api/events/", &b"{\"data\":"[..]),
            ("/api/events/", br#"{"data":[]}"#),
            (
                "/api/profile-bulk-import-jobs/",
                br#"{"data":{"attributes":{}}}"#,
            ),
            ("/api/event-bulk-create-jobs/", br#"[]"#),
        ] {
            let r = req(&Method::POST, "a.klaviyo.com", path);
            assert!(matches!(
                Klaviyo.enforce(&r, bad, &mut d),
                Err(BodyError::Unreadable(_))
            ));
        }
    }
}
