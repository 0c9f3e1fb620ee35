//! Shared vocabulary: consent categories, channels, grants, destination kinds
//! and the request headers the app steers enforcement with.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The app names the patient when the payload does not (SPEC §6).
pub(crate) const H_PATIENT: &str = "x-patient-id";
/// The app names another category than the destination's default (SPEC §6).
pub(crate) const H_CATEGORY: &str = "x-consent-category";
/// Headers with this prefix are ours: never forwarded, in either direction.
pub(crate) const OWN_HEADER_PREFIX: &str = "x-consentgate-";

/// What a message or event is for. Names are part of the contract (SPEC §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Advertising,
    MarketingEmail,
    MarketingSms,
    PhoneOutreach,
    AppointmentReminders,
    PatientSurveys,
    CareFollowups,
}

impl Category {
    pub(crate) const ALL: [Category; 7] = [
        Category::Advertising,
        Category::MarketingEmail,
        Category::MarketingSms,
        Category::PhoneOutreach,
        Category::AppointmentReminders,
        Category::PatientSurveys,
        Category::CareFollowups,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Category::Advertising => "advertising",
            Category::MarketingEmail => "marketing_email",
            Category::MarketingSms => "marketing_sms",
            Category::PhoneOutreach => "phone_outreach",
            Category::AppointmentReminders => "appointment_reminders",
            Category::PatientSurveys => "patient_surveys",
            Category::CareFollowups => "care_followups",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The category a message of this category is when it reaches the patient
    /// over `channel`: marketing is `marketing_email` by email and
    /// `marketing_sms` by SMS; every other category is the same on any channel.
    pub fn on_channel(self, channel: Channel) -> Category {
        match (self, channel) {
            (Category::MarketingEmail | Category::MarketingSms, Channel::Email) => {
                Category::MarketingEmail
            }
            (Category::MarketingEmail | Category::MarketingSms, Channel::Sms) => {
                Category::MarketingSms
            }
            (c, _) => c,
        }
    }

    /// Shipped default grant when a record does not set the category.
    pub(crate) fn shipped_default(self) -> Grant {
        match self {
            Category::Advertising | Category::MarketingSms | Category::PhoneOutreach => {
                Grant::Denied
            }
            _ => Grant::Granted,
        }
    }

    /// Shipped default for failing closed when the consent source is stale.
    pub(crate) fn shipped_fail_closed_when_stale(self) -> bool {
        !matches!(
            self,
            Category::AppointmentReminders | Category::CareFollowups
        )
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message reaches the patient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Sms,
    Voice,
    Mail,
}

impl Channel {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Voice => "voice",
            Channel::Mail => "mail",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<Channel> {
        [Channel::Email, Channel::Sms, Channel::Voice, Channel::Mail]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    Granted,
    Denied,
}

/// What sort of destination an adapter speaks to; drives which policy steps apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestKind {
    /// Ad platforms: sale/share opt-out and GPC apply, limit_sensitive applies.
    AdPlatform,
    /// Analytics (GA4): treated like an ad platform for LDU and limit_sensitive.
    Analytics,
    Email,
    Sms,
    Voice,
    Crm,
}

impl DestKind {
    #[cfg(test)]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DestKind::AdPlatform => "ad_platform",
            DestKind::Analytics => "analytics",
            DestKind::Email => "email",
            DestKind::Sms => "sms",
            DestKind::Voice => "voice",
            DestKind::Crm => "crm",
        }
    }
    /// Whether sale/share opt-out, GPC and limit_sensitive steps apply.
    pub(crate) fn is_ads_or_analytics(self) -> bool {
        matches!(self, DestKind::AdPlatform | DestKind::Analytics)
    }
}

/// `consent.postgres.sslmode` (and a URL's `sslmode=`): how the consent
/// database connection uses TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum PgSslMode {
    #[default]
    Disable,
    Require,
    VerifyFull,
}

impl PgSslMode {
    pub(crate) fn parse(v: &str) -> Result<PgSslMode, String> {
        match v {
            "disable" => Ok(PgSslMode::Disable),
            "require" => Ok(PgSslMode::Require),
            "verify-full" => Ok(PgSslMode::VerifyFull),
            "prefer" | "allow" | "verify-ca" => Err(format!(
                "sslmode {v} is not supported: use disable, require or verify-full \
                 (prefer and allow fall back to plain text; verify-ca does not check the host)"
            )),
            _ => Err(format!(
                "expected disable, require or verify-full, got {v:?}"
            )),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PgSslMode::Disable => "disable",
            PgSslMode::Require => "require",
            PgSslMode::VerifyFull => "verify-full",
        }
    }
}
