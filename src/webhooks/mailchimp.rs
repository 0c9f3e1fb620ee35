//! Mailchimp Marketing audience webhooks: form-encoded `type`, `fired_at` and
//! `data[...]` (`data[email]`, `data[list_id]`, `data[id]`, `data[action]`).
//!
//! - Mailchimp signs nothing: the webhook URL carries a secret token,
//!   `POST /v1/webhooks/mailchimp/<token>`, compared in constant time with
//!   `webhooks.mailchimp.secret_file`. Mailchimp checks a new webhook URL with a
//!   GET, which is answered 200 (with the right token only).
//! - Kinds: `unsubscribe` (`data[action]` `unsub` or `delete`) → by default
//!   `categories: {marketing_email: denied, patient_surveys: denied}` (an
//!   audience is a bulk list: every bulk email category is the most restrictive
//!   plausible reading; treatment mail does not go through audiences); `scopes`
//!   maps an audience (`data[list_id]`) to its own change. `subscribe`,
//!   `profile`, `cleaned`, `upemail`, `campaign` change nothing.
//! - The person: `data[email]`. Mailchimp sends no event id: the id is a digest
//!   of type, `fired_at`, audience, member id and email.

use super::{form_pairs, Inbound, Secret, Signal};
use crate::model::Category;
use crate::optout::ConsentChange;

pub(super) const KINDS: super::Kinds = &[
    ("unsubscribe", || {
        ConsentChange::deny_categories(&[Category::MarketingEmail, Category::PatientSurveys])
    }),
    ("subscribe", ConsentChange::default),
    ("profile", ConsentChange::default),
    ("cleaned", ConsentChange::default),
    ("upemail", ConsentChange::default),
    ("campaign", ConsentChange::default),
];

pub(super) fn verify(req: &Inbound<'_>, s: &Secret) -> Result<(), &'static str> {
    let token = req.token.ok_or("missing path token")?;
    if super::ct_eq(token.as_bytes(), &s.bytes) {
        Ok(())
    } else {
        Err("path token does not match")
    }
}

pub(super) fn parse(req: &Inbound<'_>, _: &Secret) -> Result<Vec<Signal>, String> {
    let pairs = form_pairs(req.body);
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let kind = get("type");
    if kind.is_empty() {
        return Err("type missing".into());
    }
    let email = get("data[email]");
    let list = get("data[list_id]");
    let id = crate::identify::sha256_hex(
        format!(
            "{kind}\0{}\0{list}\0{}\0{email}",
            get("fired_at"),
            get("data[id]")
        )
        .as_bytes(),
    );
    Ok(vec![Signal {
        id: Some(id),
        kind,
        scope: (!list.is_empty()).then_some(list),
        emails: vec![email],
        ..Default::default()
    }])
}
