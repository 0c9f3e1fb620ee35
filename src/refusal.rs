//! Refusals in the vendor's shape (SPEC §7): the one place that turns a
//! refusal (status, error code, request id, reasons or a detail) into the
//! status, content type and body the app receives.
//!
//! Vendor SDKs parse the vendor's own error body. Given consentgate's plain
//! `{"error": "<code>", ...}` some of them crash (Meta's Python SDK calls
//! `.get` on the string, its Node SDK `JSON.parse`s it; google-api-core does
//! the same `.get`), others lose the reason ("Unable to create record"). So a
//! destination can answer in its vendor's shape: the SDK raises its own error
//! type, the vendor's message field starts with `consentgate: <code>`, and the
//! contract fields move under a top-level `"consentgate"` object. Every shape
//! was checked against the SDK's own error parsing; docs/SDKS.md says which
//! SDK, which version, and what it shows.
//!
//! Pure: no I/O, no configuration. The pipeline and `explain` both call
//! [`render`], so what `explain` prints is what the app gets.

use serde_json::{json, Map, Value};

/// The error body shapes consentgate can answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// consentgate's own `{"error", "request_id", "reasons" | "detail"}`.
    Plain,
    /// Meta Graph API: `{"error": {"message", "type", "code", "fbtrace_id"}}`.
    MetaGraph,
    /// Twilio REST: `{"code", "message", "more_info", "status"}`.
    Twilio,
    /// SendGrid v3: `{"errors": [{"message", "field", "help"}]}`.
    SendGrid,
    /// Mailchimp Marketing: problem+json `{"type", "title", "status", "detail", "instance"}`.
    Mailchimp,
    /// Mailchimp Transactional (Mandrill): `{"status": "error", "code", "name", "message"}`.
    Mandrill,
    /// Klaviyo JSON:API: `{"errors": [{"id", "status", "code", "title", "detail", "source"}]}`.
    Klaviyo,
    /// Braze REST: `{"message", "errors": [...]}`.
    Braze,
    /// HubSpot v3: `{"status": "error", "message", "correlationId", "category"}`.
    HubSpot,
    /// TikTok Business API: `{"code", "message", "request_id", "data"}`.
    TikTok,
    /// Pinterest v5: `{"code", "message"}`.
    Pinterest,
    /// LinkedIn Rest.li: `{"status", "code", "message"}`.
    LinkedIn,
    /// Snap Marketing API: `{"request_status": "ERROR", "request_id", "debug_message", "display_message", "error_code"}`.
    Snap,
    /// Google APIs (JSON/REST transport): `{"error": {"code", "message", "status", "details"}}`.
    Google,
}

impl Shape {
    /// Every format (tests walk them all).
    #[cfg(test)]
    pub(crate) const ALL: [Shape; 14] = [
        Shape::Plain,
        Shape::MetaGraph,
        Shape::Twilio,
        Shape::SendGrid,
        Shape::Mailchimp,
        Shape::Mandrill,
        Shape::Klaviyo,
        Shape::Braze,
        Shape::HubSpot,
        Shape::TikTok,
        Shape::Pinterest,
        Shape::LinkedIn,
        Shape::Snap,
        Shape::Google,
    ];
}

/// Why the request was refused: the dropped events' reasons (all-dropped
/// 451) or one detail (every other refusal).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Explanation<'a> {
    Reasons(&'a [&'a str]),
    Detail(&'a str),
}

/// A refusal as the pipeline decided it. `error` is the contract code
/// (`blocked_by_consent_policy`, `unreadable_body`, …); nothing here may hold
/// PHI, and nothing does: codes, reasons and details are the product's own words.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Notice<'a> {
    pub(crate) status: u16,
    pub(crate) error: &'a str,
    pub(crate) request_id: &'a str,
    pub(crate) explanation: Explanation<'a>,
}

/// What to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rendered {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
}

const JSON: &str = "application/json";

/// Render `refusal` in `format`.
///
/// Every format keeps the product's status except TikTok's. TikTok's API
/// answers every error with HTTP 200 and a non-zero `code`, and both official
/// SDKs surface an error only on that path: Python raises its own
/// `TiktokSDKError("Error Code: …, message: …, request_id: …")`, Node rejects
/// with `Error("request_id:… message: … code: …")`. Given a 451, Python raises
/// the generic generated `ApiException` with the raw body, and Node
/// superagent's error whose message is only "Unavailable For Legal Reasons"
/// (our message stays inside `err.response.body`). So a TikTok refusal answers
/// 200 with the refusal code in the body; `x-consentgate-decision: blocked`
/// still says what happened, and the audit keeps the product's status.
/// Every other SDK checked raises its own error type on the product's status
/// (docs/SDKS.md).
pub(crate) fn render(format: Shape, r: &Notice<'_>) -> Rendered {
    let (content_type, body) = match format {
        Shape::Plain => (JSON, plain(r)),
        vendor => {
            let (ct, mut body) = vendor_body(vendor, r);
            if let Value::Object(m) = &mut body {
                m.insert("consentgate".into(), contract(r));
            }
            (ct, body)
        }
    };
    let status = match format {
        Shape::TikTok => 200,
        _ => r.status,
    };
    Rendered {
        status,
        content_type,
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// consentgate's own body, exactly as SPEC §7 names it.
fn plain(r: &Notice<'_>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), json!(r.error));
    m.insert("request_id".into(), json!(r.request_id));
    explain_into(&mut m, r);
    Value::Object(m)
}

/// The contract fields, moved under `"consentgate"` in a vendor shape.
fn contract(r: &Notice<'_>) -> Value {
    plain(r)
}

fn explain_into(m: &mut Map<String, Value>, r: &Notice<'_>) {
    match r.explanation {
        Explanation::Reasons(rs) => m.insert("reasons".into(), json!(rs)),
        Explanation::Detail(d) => m.insert("detail".into(), json!(d)),
    };
}

/// The vendor message: `consentgate: <code>`, then what explains it and the
/// request id, so the one line an SDK prints is enough to find the audit record.
pub(crate) fn message(r: &Notice<'_>) -> String {
    let why = match r.explanation {
        Explanation::Reasons([]) => String::new(),
        Explanation::Reasons(rs) => format!(" ({})", rs.join(", ")),
        Explanation::Detail("") => String::new(),
        Explanation::Detail(d) => format!(": {d}"),
    };
    format!(
        "consentgate: {}{why} [request_id {}]",
        r.error, r.request_id
    )
}

/// The short title some shapes carry beside the message.
fn title(r: &Notice<'_>) -> String {
    format!("consentgate: {}", r.error)
}

fn vendor_body(format: Shape, r: &Notice<'_>) -> (&'static str, Value) {
    let msg = message(r);
    let status = r.status;
    match format {
        Shape::Plain => (JSON, plain(r)),
        // facebook_business' FacebookRequestError reads error.message, .code,
        // .type, .error_subcode, .is_transient and (if present, as a dict or a
        // JSON string) error_data; the Node SDK reads error.message. `code`
        // is the HTTP status: no Graph code means "refused by a proxy", and
        // Graph codes an app acts on (190 token, 4/17/613 throttling) must not
        // be borrowed. `is_transient: false` keeps retry logic from resending.
        Shape::MetaGraph => (
            JSON,
            json!({"error": {
                "message": msg,
                "type": "ConsentgateRefusal",
                "code": status,
                "is_transient": false,
                "fbtrace_id": r.request_id,
            }}),
        ),
        // twilio-python turns `message` into "Unable to create record: <message>"
        // and `code` into TwilioRestException.code; twilio-node copies
        // message, code, more_info and details. No `type`/`title`: with
        // type+title+status+code both SDKs switch to the RFC 9457
        // TwilioServiceException. `code` is the HTTP status, as the SDKs
        // themselves default it when the body has none: a real Twilio code
        // (21610 "unsubscribed recipient") would tell the app something false.
        // `more_info` is null: no Twilio docs page describes our refusal.
        Shape::Twilio => (
            JSON,
            json!({"code": status, "message": msg, "more_info": null, "status": status}),
        ),
        // python_http_client keeps the raw body (HTTPError.body / .to_dict);
        // @sendgrid/client's ResponseError.toString prints each
        // errors[].message, field and help.
        Shape::SendGrid => (
            JSON,
            json!({"errors": [{"message": msg, "field": null, "help": null}]}),
        ),
        // Mailchimp Marketing answers application/problem+json; its SDKs hand
        // the app the text (Python ApiClientError.text) or the parsed body.
        Shape::Mailchimp => (
            "application/problem+json",
            json!({
                "type": "https://mailchimp.com/developer/marketing/docs/errors/",
                "title": title(r),
                "status": status,
                "detail": msg,
                "instance": r.request_id,
            }),
        ),
        // mailchimp_transactional (Python) raises ApiClientError(text=<parsed
        // body>) when the content type is JSON; `name` is Mandrill's error
        // class and `code` its number. Mandrill's own codes (-1 Invalid_Key,
        // -2 ValidationError, …) all mean something; the HTTP status does not.
        Shape::Mandrill => (
            JSON,
            json!({
                "status": "error",
                "code": status,
                "name": "ConsentgateRefusal",
                "message": msg,
            }),
        ),
        // klaviyo-api raises ApiException with the body text; Klaviyo's
        // errors carry a string `code`, an integer `status` and a JSON pointer.
        Shape::Klaviyo => (
            "application/vnd.api+json",
            json!({"errors": [{
                "id": r.request_id,
                "status": status,
                "code": r.error,
                "title": title(r),
                "detail": msg,
                "source": {"pointer": "/data"},
            }]}),
        ),
        // No official Braze server SDK; Braze's REST API answers
        // `{"message": ..., "errors": [...]}` and clients read `message`.
        Shape::Braze => (JSON, json!({"message": msg, "errors": [msg]})),
        // HubSpot's Error model: status "error", message, correlationId,
        // category (required; an upper-case word like VALIDATION_ERROR).
        Shape::HubSpot => (
            JSON,
            json!({
                "status": "error",
                "message": msg,
                "correlationId": r.request_id,
                "category": r.error.to_ascii_uppercase(),
            }),
        ),
        // TikTok's envelope (answered with HTTP 200, see `render`). `code`
        // must be non-zero (0 is success): the product's status times 100
        // (45100, 42200) is no code TikTok documents and none its clients
        // retry on (40100 throttling, 5xxxx system errors); 401 is never a
        // refusal status here. The product's status stays readable from it.
        Shape::TikTok => (
            JSON,
            json!({
                "code": u32::from(status) * 100,
                "message": msg,
                "request_id": r.request_id,
                "data": {},
            }),
        ),
        Shape::Pinterest => (JSON, json!({"code": status, "message": msg})),
        Shape::LinkedIn => (
            JSON,
            json!({"status": status, "code": r.error.to_ascii_uppercase(), "message": msg}),
        ),
        Shape::Snap => (
            JSON,
            json!({
                "request_status": "ERROR",
                "request_id": r.request_id,
                "debug_message": msg,
                "display_message": msg,
                "error_code": r.error,
            }),
        ),
        // google-api-core's format_http_response_error reads error.message,
        // error.errors and error.details (an ErrorInfo detail becomes the
        // exception's `reason` and `domain`); google-ads' REST transport goes
        // through it. `status` is the canonical code name for the HTTP status.
        Shape::Google => (
            JSON,
            json!({"error": {
                "code": status,
                "message": msg,
                "status": google_status(status),
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": r.error.to_ascii_uppercase(),
                    "domain": "consentgate",
                    "metadata": {"request_id": r.request_id},
                }],
            }}),
        ),
    }
}

/// google.rpc.Code name for an HTTP status, as Google's HTTP mapping pairs them.
fn google_status(status: u16) -> &'static str {
    match status {
        400 | 413 | 415 | 422 | 431 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 | 451 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        408 | 504 => "DEADLINE_EXCEEDED",
        409 => "ABORTED",
        412 => "FAILED_PRECONDITION",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RID: &str = "req-0123abcd";

    fn blocked() -> Notice<'static> {
        Notice {
            status: 451,
            error: "blocked_by_consent_policy",
            request_id: RID,
            explanation: Explanation::Reasons(&["consent_denied", "unknown_patient"]),
        }
    }

    fn unreadable() -> Notice<'static> {
        Notice {
            status: 422,
            error: "unreadable_body",
            request_id: RID,
            explanation: Explanation::Detail("`message.to[0].email` is an object"),
        }
    }

    fn body(format: Shape, r: &Notice<'_>) -> (Rendered, Value) {
        let out = render(format, r);
        let v: Value = serde_json::from_slice(&out.body).unwrap();
        (out, v)
    }

    /// The contract fields sit under "consentgate" in every vendor shape.
    fn assert_contract(v: &Value, r: &Notice<'_>) {
        let c = &v["consentgate"];
        assert_eq!(c["error"], r.error, "{v}");
        assert_eq!(c["request_id"], r.request_id, "{v}");
        match r.explanation {
            Explanation::Reasons(rs) => {
                assert_eq!(c["reasons"], json!(rs));
                assert!(c.get("detail").is_none());
            }
            Explanation::Detail(d) => {
                assert_eq!(c["detail"], d);
                assert!(c.get("reasons").is_none());
            }
        }
    }

    fn assert_msg(s: &Value, r: &Notice<'_>) {
        let s = s
            .as_str()
            .unwrap_or_else(|| panic!("message is a string: {s}"));
        assert!(s.starts_with(&format!("consentgate: {}", r.error)), "{s:?}");
        assert!(s.contains(r.request_id), "{s:?}");
    }

    #[test]
    fn plain_is_the_contract_body_unchanged() {
        let (out, v) = body(Shape::Plain, &blocked());
        assert_eq!(out.status, 451);
        assert_eq!(out.content_type, "application/json");
        assert_eq!(
            v,
            json!({"error": "blocked_by_consent_policy", "request_id": RID,
                   "reasons": ["consent_denied", "unknown_patient"]})
        );
        let (_, v) = body(Shape::Plain, &unreadable());
        assert_eq!(
            v,
            json!({"error": "unreadable_body", "request_id": RID,
                   "detail": "`message.to[0].email` is an object"})
        );
    }

    #[test]
    fn message_names_code_reasons_or_detail_and_request_id() {
        assert_eq!(
            message(&blocked()),
            "consentgate: blocked_by_consent_policy (consent_denied, unknown_patient) [request_id req-0123abcd]"
        );
        assert_eq!(
            message(&unreadable()),
            "consentgate: unreadable_body: `message.to[0].email` is an object [request_id req-0123abcd]"
        );
        let bare = Notice {
            explanation: Explanation::Reasons(&[]),
            ..blocked()
        };
        assert_eq!(
            message(&bare),
            "consentgate: blocked_by_consent_policy [request_id req-0123abcd]"
        );
    }

    #[test]
    fn every_vendor_shape_but_tiktok_keeps_status_and_all_carry_the_contract() {
        for f in Shape::ALL {
            for r in [blocked(), unreadable()] {
                let (out, v) = body(f, &r);
                let want = if f == Shape::TikTok { 200 } else { r.status };
                assert_eq!(out.status, want, "{f:?}");
                assert!(v.is_object(), "{f:?}: {v}");
                if f != Shape::Plain {
                    assert_contract(&v, &r);
                }
            }
        }
    }

    #[test]
    fn meta_graph_error_object() {
        let r = blocked();
        let (out, v) = body(Shape::MetaGraph, &r);
        assert_eq!(out.content_type, "application/json");
        let e = &v["error"];
        // The SDKs call .get / read .message on this: it must be an object.
        assert!(e.is_object());
        assert_msg(&e["message"], &r);
        assert_eq!(e["type"], "ConsentgateRefusal");
        assert_eq!(e["code"], 451);
        assert_eq!(e["is_transient"], false);
        assert_eq!(e["fbtrace_id"], RID);
        assert!(e.get("error_data").is_none());
    }

    #[test]
    fn twilio_legacy_shape_not_rfc9457() {
        let r = blocked();
        let (_, v) = body(Shape::Twilio, &r);
        assert_msg(&v["message"], &r);
        assert_eq!(v["code"], 451);
        assert_eq!(v["status"], 451);
        assert!(v.get("more_info").is_some());
        // type + title + status + code would make the SDKs raise
        // TwilioServiceException instead of TwilioRestException.
        assert!(v.get("type").is_none() && v.get("title").is_none());
    }

    #[test]
    fn sendgrid_errors_array() {
        let r = unreadable();
        let (_, v) = body(Shape::SendGrid, &r);
        let errs = v["errors"].as_array().unwrap();
        assert_eq!(errs.len(), 1);
        assert_msg(&errs[0]["message"], &r);
        assert!(errs[0].get("field").is_some() && errs[0].get("help").is_some());
    }

    #[test]
    fn mailchimp_problem_json() {
        let r = blocked();
        let (out, v) = body(Shape::Mailchimp, &r);
        assert_eq!(out.content_type, "application/problem+json");
        assert_eq!(v["title"], "consentgate: blocked_by_consent_policy");
        assert_msg(&v["detail"], &r);
        assert_eq!(v["status"], 451);
        assert_eq!(v["instance"], RID);
        assert!(v["type"].as_str().unwrap().starts_with("https://"));
    }

    #[test]
    fn mandrill_error_envelope() {
        let r = blocked();
        let (out, v) = body(Shape::Mandrill, &r);
        // mailchimp_transactional parses the body only for a JSON content type.
        assert_eq!(out.content_type, "application/json");
        assert_eq!(v["status"], "error");
        assert_eq!(v["code"], 451);
        assert_eq!(v["name"], "ConsentgateRefusal");
        assert_msg(&v["message"], &r);
    }

    #[test]
    fn klaviyo_json_api_errors() {
        let r = unreadable();
        let (out, v) = body(Shape::Klaviyo, &r);
        assert_eq!(out.content_type, "application/vnd.api+json");
        let e = &v["errors"][0];
        assert_eq!(e["id"], RID);
        assert_eq!(e["status"], 422);
        assert_eq!(e["code"], "unreadable_body");
        assert_eq!(e["title"], "consentgate: unreadable_body");
        assert_msg(&e["detail"], &r);
        assert_eq!(e["source"]["pointer"], "/data");
    }

    #[test]
    fn braze_message_and_errors() {
        let r = blocked();
        let (_, v) = body(Shape::Braze, &r);
        assert_msg(&v["message"], &r);
        assert_msg(&v["errors"][0], &r);
    }

    #[test]
    fn hubspot_error_model() {
        let r = blocked();
        let (_, v) = body(Shape::HubSpot, &r);
        assert_eq!(v["status"], "error");
        assert_msg(&v["message"], &r);
        assert_eq!(v["correlationId"], RID);
        assert_eq!(v["category"], "BLOCKED_BY_CONSENT_POLICY");
    }

    #[test]
    fn tiktok_answers_200_with_a_nonzero_code() {
        for r in [blocked(), unreadable()] {
            let (out, v) = body(Shape::TikTok, &r);
            // The only status on which TikTok's SDKs raise their own error.
            assert_eq!(out.status, 200);
            let code = v["code"].as_u64().unwrap();
            assert_ne!(code, 0, "0 is TikTok's success");
            assert_ne!(code, 40100, "TikTok's throttling code");
            assert_eq!(code, u64::from(r.status) * 100);
            assert_msg(&v["message"], &r);
            assert_eq!(v["request_id"], RID);
            assert_eq!(v["data"], json!({}));
        }
    }

    #[test]
    fn pinterest_linkedin_snap() {
        let r = blocked();
        let (_, p) = body(Shape::Pinterest, &r);
        assert_eq!(p["code"], 451);
        assert_msg(&p["message"], &r);
        let (_, l) = body(Shape::LinkedIn, &r);
        assert_eq!(l["status"], 451);
        assert_eq!(l["code"], "BLOCKED_BY_CONSENT_POLICY");
        assert_msg(&l["message"], &r);
        let (_, s) = body(Shape::Snap, &r);
        assert_eq!(s["request_status"], "ERROR");
        assert_eq!(s["request_id"], RID);
        assert_eq!(s["error_code"], "blocked_by_consent_policy");
        assert_msg(&s["debug_message"], &r);
        assert_msg(&s["display_message"], &r);
    }

    #[test]
    fn google_error_with_error_info() {
        let r = blocked();
        let (_, v) = body(Shape::Google, &r);
        let e = &v["error"];
        assert!(e.is_object(), "google-api-core calls .get on it");
        assert_eq!(e["code"], 451);
        assert_msg(&e["message"], &r);
        assert_eq!(e["status"], "PERMISSION_DENIED");
        let info = &e["details"][0];
        assert_eq!(info["@type"], "type.googleapis.com/google.rpc.ErrorInfo");
        assert_eq!(info["reason"], "BLOCKED_BY_CONSENT_POLICY");
        assert_eq!(info["domain"], "consentgate");
        assert_eq!(info["metadata"]["request_id"], RID);
        let (_, v) = body(Shape::Google, &unreadable());
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    }

    /// Details and ids with quotes or control characters stay valid JSON.
    #[test]
    fn hostile_strings_stay_json() {
        let r = Notice {
            status: 422,
            error: "unreadable_body",
            request_id: "id\"\n\\",
            explanation: Explanation::Detail("field `a\"b`\u{0}"),
        };
        for f in Shape::ALL {
            let (_, v) = body(f, &r);
            if f == Shape::Plain {
                assert_eq!(v["detail"], "field `a\"b`\u{0}");
            } else {
                assert_eq!(v["consentgate"]["request_id"], "id\"\n\\");
            }
        }
    }
}
