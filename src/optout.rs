//! Consent changes made by vendor signals (SPEC §13): an opt-out learned on
//! the egress path or received by webhook is written like an admin-API PATCH,
//! through the same [`ConsentWriter::modify`] (durable, serialised per patient,
//! enforced by the next request), with `source: "vendor:<name>"`, audited as
//! `kind: consent_change` with `actor: "vendor:<name>"`, and counted in
//! `consentgate_optouts_learned_total{vendor,kind}`.

use crate::audit::{AuditRecord, AuditWriter, PseudonymKey};
use crate::config::ConsentChangeCfg;
use crate::consent::source::{Change, Merge, Precondition, WriteError};
use crate::consent::{ConsentRecord, ConsentStore, ConsentWriter, PlaintextCarrier};
use crate::metrics::Metrics;
use crate::model::{Category, Channel, Grant};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a vendor signal changes: per category and channel, `denied`, `granted`
/// or `None` (back to the default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConsentChange {
    pub(crate) categories: BTreeMap<Category, Option<Grant>>,
    pub(crate) channels: BTreeMap<Channel, Option<Grant>>,
}

impl ConsentChange {
    pub(crate) fn deny_channel(c: Channel) -> ConsentChange {
        let mut x = ConsentChange::default();
        x.channels.insert(c, Some(Grant::Denied));
        x
    }

    pub(crate) fn deny_categories(cs: &[Category]) -> ConsentChange {
        let mut x = ConsentChange::default();
        for c in cs {
            x.categories.insert(*c, Some(Grant::Denied));
        }
        x
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.categories.is_empty() && self.channels.is_empty()
    }

    /// Whether `rec` already says all of it.
    pub(crate) fn holds(&self, rec: &ConsentRecord) -> bool {
        self.categories
            .iter()
            .all(|(c, g)| rec.categories.get(c).copied() == *g)
            && self
                .channels
                .iter()
                .all(|(c, g)| rec.channels.get(c).copied() == *g)
    }

    fn apply_to(&self, rec: &mut ConsentRecord) {
        for (c, g) in &self.categories {
            match g {
                Some(g) => rec.categories.insert(*c, *g),
                None => rec.categories.remove(c),
            };
        }
        for (c, g) in &self.channels {
            match g {
                Some(g) => rec.channels.insert(*c, *g),
                None => rec.channels.remove(c),
            };
        }
    }
}

impl From<&ConsentChangeCfg> for ConsentChange {
    fn from(c: &ConsentChangeCfg) -> ConsentChange {
        ConsentChange {
            categories: c.categories.clone(),
            channels: c.channels.clone(),
        }
    }
}

/// What applying a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    Changed,
    /// The record already said so: nothing written.
    Unchanged,
}

/// Writes vendor opt-outs.
pub(crate) struct OptOuts {
    pub(crate) writer: Arc<dyn ConsentWriter>,
    pub(crate) store: Arc<ConsentStore>,
    pub(crate) audit: Arc<AuditWriter>,
    pub(crate) pseudonyms: Arc<PseudonymKey>,
    pub(crate) metrics: Arc<Metrics>,
    /// The sync outbox's plaintext carrier (the address a webhook named).
    pub(crate) carrier: Option<Arc<dyn PlaintextCarrier>>,
}

impl OptOuts {
    /// Apply `change` to `patient_id`'s record. `kind` is the signal
    /// (`21610`, `stop`, `unsubscribe`...), `request_id` the proxied request it
    /// was learned from, `emails`/`phones` what the vendor named (for sync only).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn apply(
        &self,
        vendor: &str,
        kind: &str,
        patient_id: &str,
        change: &ConsentChange,
        emails: &[String],
        phones: &[String],
        request_id: Option<&str>,
    ) -> Result<Applied, WriteError> {
        match self.store.get(patient_id) {
            None => return Err(WriteError::NotFound),
            Some(cur) if change.holds(&cur) => return Ok(Applied::Unchanged),
            Some(_) => {}
        }
        let actor = format!("vendor:{vendor}");
        let source: Arc<str> = Arc::from(actor.as_str());
        let ch = change.clone();
        let merge: Merge = Box::new(move |cur: Option<&ConsentRecord>| {
            let cur = cur.ok_or(WriteError::NotFound)?;
            let mut rec = cur.clone();
            ch.apply_to(&mut rec);
            rec.source = Some(source);
            // Newer than the record it changes, whatever the clocks say: a
            // vendor opt-out is the latest word.
            let now = chrono::Utc::now();
            let after = cur.updated_at + chrono::Duration::milliseconds(1);
            rec.updated_at = if now > after { now } else { after };
            Ok(Change::Put(Box::new(rec)))
        });
        let held = match &self.carrier {
            Some(c) if !emails.is_empty() || !phones.is_empty() => {
                Some(c.hold(patient_id, emails.to_vec(), phones.to_vec()))
            }
            _ => None,
        };
        let written = self
            .writer
            .modify(patient_id, Precondition::Exists, merge, &actor)
            .await;
        drop(held);
        written?;
        if let Some(c) = &self.carrier {
            c.flush().await;
        }
        let mut rec =
            AuditRecord::consent_change(&actor, self.pseudonyms.pseudonym(patient_id), "patch");
        rec.request_id = request_id.map(str::to_string);
        rec.reason = Some(kind.to_string());
        if self.audit.submit(vec![rec]).is_err() {
            tracing::error!("vendor opt-out could not be audited");
        }
        self.metrics
            .optouts_learned_total
            .with_label_values(&[vendor, kind])
            .inc();
        tracing::info!(actor = %actor, kind, "consent record changed by a vendor opt-out");
        Ok(Applied::Changed)
    }
}
