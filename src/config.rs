//! Configuration (SPEC §4). Parsed from YAML into a tree with line numbers, then
//! read key by key so that `check` can report every error at once, each naming
//! its key and line. Unknown keys are errors.

use crate::model::{Category, Channel, Grant, PgSslMode};
use marked_yaml::{Node, Span};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The shipped config, embedded so `consentgate run` works with no files at all.
pub(crate) const EMBEDDED_DEFAULT: &str = include_str!("../config/consentgate.yaml");
const DEFAULT_PATH: &str = "config/consentgate.yaml";

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Config {
    pub(crate) listen: Listen,
    pub(crate) unknown_destinations: UnknownDestinations,
    pub(crate) interception: Interception,
    pub(crate) upstream: Upstream,
    pub(crate) consent: ConsentCfg,
    pub(crate) admin: AdminCfg,
    pub(crate) audit: AuditCfg,
    pub(crate) max_body_bytes: u64,
    pub(crate) destinations: Vec<DestinationCfg>,
    pub(crate) categories: BTreeMap<Category, CategoryCfg>,
    pub(crate) log: LogCfg,
    pub(crate) shutdown_grace: Duration,
    pub(crate) limits: Limits,
    /// `webhooks:` (SPEC §13): vendor opt-out webhooks on `listen.webhooks`.
    pub(crate) webhooks: WebhooksCfg,
    /// `sync:` (SPEC §13): vendor suppression targets and the outbox.
    pub(crate) sync: SyncCfg,
    pub(crate) identify: IdentifyCfg,
    pub(crate) telemetry: TelemetryCfg,
}

/// `identify:` (SPEC §5): how identifiers are read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct IdentifyCfg {
    /// `identify.default_region`: two letters, upper-cased here; whether
    /// libphonenumber has numbering metadata for it is checked where the
    /// runtime is built (with this line).
    pub(crate) default_region: String,
    pub(crate) line: usize,
}

/// `telemetry:` traces exported over OTLP (off unless `otlp.endpoint` is set).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TelemetryCfg {
    pub(crate) otlp: Option<OtlpKeys>,
}

/// `telemetry.otlp`: the collector's OTLP/HTTP endpoint, the exported
/// `service.name`, and the bound on one export.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OtlpKeys {
    pub(crate) endpoint: String,
    pub(crate) service_name: String,
    pub(crate) timeout: Duration,
}

/// `limits:` (SPEC §4): what a slow or oversized client may hold, on every
/// listener. Sizes are bytes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Limits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    pub(crate) max_header_bytes: u64,
    pub(crate) inflight_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
            inflight_body_bytes: 256 << 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Listen {
    pub(crate) proxy: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) gateway: Option<SocketAddr>,
    /// `/metrics`, `/healthz` and `/readyz` on their own plain-HTTP port, apart
    /// from the consent write API; `None` keeps them on `admin`.
    pub(crate) metrics: Option<SocketAddr>,
    /// Vendor webhooks (`POST /v1/webhooks/{vendor}`); `None`: not served.
    pub(crate) webhooks: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnknownDestinations {
    Deny,
    Tunnel,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Interception {
    pub(crate) ca_cert: PathBuf,
    pub(crate) ca_key: PathBuf,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Upstream {
    pub(crate) extra_ca: Option<PathBuf>,
    pub(crate) resolve: HashMap<String, SocketAddr>,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) pool_idle_timeout: Duration,
    /// Offer h2 to upstreams by ALPN (default `false`: HTTP/1.1 keep-alive pool,
    /// measured ~15 % more passthrough throughput than one h2 connection).
    pub(crate) http2: bool,
    /// `upstream.proxy`: reach the vendors through a parent HTTP proxy (CONNECT).
    pub(crate) proxy: Option<ParentProxy>,
}

/// `upstream.proxy: {url, credentials_file, no_proxy}`: a parent HTTP proxy
/// every upstream connection is tunnelled through with CONNECT, except to the
/// hosts of `no_proxy`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParentProxy {
    /// The proxy's host (a name, or an IP address without brackets) and port.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `user:password` for `Proxy-Authorization: Basic` (read where the
    /// upstream client is built, so a reload picks up a rotated secret).
    pub(crate) credentials_file: Option<PathBuf>,
    /// Hosts connected to directly: `name` (exactly) or `*.suffix` (any name
    /// under it), lower-cased.
    pub(crate) no_proxy: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SourceKind {
    File,
    Postgres,
    /// A NATS JetStream key-value bucket (SPEC §14), read only.
    Nats,
}

/// `consent.replicate_to`: where an owning instance mirrors its changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplicateTo {
    Nats,
}

/// `consent.nats`: the bucket a fleet follows (SPEC §14).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NatsCfg {
    /// `nats://host:port` or `tls://host:port` (comma-separated for a cluster).
    pub(crate) url: String,
    pub(crate) bucket: String,
    /// A `.creds` file (JWT + NKey seed).
    pub(crate) credentials_file: Option<PathBuf>,
    /// PEM trust anchors for `tls://` (else the system's).
    pub(crate) ca_file: Option<PathBuf>,
    /// Where a watcher's refused admin writes should go (the owner's admin
    /// API), named in its 405 answer.
    pub(crate) owner_admin_url: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ConsentCfg {
    pub(crate) source: SourceKind,
    pub(crate) file: PathBuf,
    pub(crate) journal: PathBuf,
    /// AES-256-GCM key of the journal at rest (64 hex characters).
    pub(crate) journal_key_file: Option<PathBuf>,
    /// The key before the last rotation: read once, then the journal is
    /// rewritten under `journal_key_file`.
    pub(crate) journal_previous_key_file: Option<PathBuf>,
    pub(crate) max_staleness: Duration,
    pub(crate) postgres: PostgresCfg,
    pub(crate) nats: NatsCfg,
    pub(crate) replicate_to: Option<ReplicateTo>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PostgresCfg {
    pub(crate) url: String,
    pub(crate) password_file: Option<PathBuf>,
    /// `None`: the URL's `sslmode=`, else disable.
    pub(crate) sslmode: Option<PgSslMode>,
    /// PEM trust anchors for `verify-full`.
    pub(crate) ca_file: Option<PathBuf>,
    /// The line of `consent.postgres`'s URL, for errors found when the runtime is built.
    pub(crate) line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AdminCfg {
    pub(crate) tokens_file: PathBuf,
    pub(crate) ready_requires_fresh_consent: bool,
    /// `admin.tls`: serve the admin API over TLS (mutual TLS with `client_ca`).
    pub(crate) tls: Option<AdminTls>,
}

/// `admin.tls: {cert, key, client_ca}`: PEM files, checked to exist here and
/// parsed when the listener is built (errors name these keys).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AdminTls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AuditCfg {
    pub(crate) path: PathBuf,
    pub(crate) pseudonym_key_file: Option<PathBuf>,
    pub(crate) fsync: AuditFsync,
    pub(crate) max_file_bytes: u64,
    pub(crate) encryption_key_file: Option<PathBuf>,
    /// `audit.max_total_bytes`: cap on the audit directory (null: no cap).
    pub(crate) max_total_bytes: Option<u64>,
}

/// When the audit writer fsyncs (`audit.fsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuditFsync {
    Always,
    Interval,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Enforce,
    Shadow,
    Passthrough,
}

/// How a destination's refusals are worded (`refusal_format`): in the vendor's
/// own error shape (so its SDK raises its own error type) or consentgate's plain JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefusalFormat {
    Vendor,
    Plain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnBlocked {
    Error,
    SyntheticOk,
}

/// A `destinations:` entry: overrides a built-in by name, or (with `type:
/// generic`) defines a configurable JSON / form destination.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DestinationCfg {
    pub(crate) name: String,
    pub(crate) line: usize,
    pub(crate) enabled: bool,
    pub(crate) mode: Option<Mode>,
    pub(crate) on_blocked: Option<OnBlocked>,
    pub(crate) refusal_format: Option<RefusalFormat>,
    pub(crate) category: Option<Category>,
    /// Extra hosts routed to this destination (e.g. a vendor's regional host).
    pub(crate) hosts: Vec<String>,
    /// The whole entry as JSON, for `type: generic` destinations.
    pub(crate) generic: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CategoryCfg {
    pub(crate) default: Grant,
    pub(crate) fail_closed_when_stale: bool,
}

/// `webhooks:` (SPEC §13): where vendors send opt-out events (`listen.webhooks`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WebhooksCfg {
    /// `webhooks.tls`: the same shape as `admin.tls`.
    pub(crate) tls: Option<AdminTls>,
    /// The external base URL vendors call (`https://hooks.example.org`): Twilio,
    /// Mandrill and HubSpot sign the URL they called, which a proxy or ingress in
    /// front of consentgate changes.
    pub(crate) public_url: Option<String>,
    /// The replay cache's directory (one process; 0700).
    pub(crate) state_dir: PathBuf,
    /// How long an event id is remembered.
    pub(crate) replay_retention: Duration,
    /// Most event ids remembered (the oldest go first past it).
    pub(crate) replay_max_entries: usize,
    /// Largest webhook body read.
    pub(crate) max_body_bytes: u64,
    pub(crate) vendors: Vec<WebhookVendorCfg>,
}

/// The vendors that can send webhooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum WebhookVendor {
    Twilio,
    Sendgrid,
    Mailchimp,
    Mandrill,
    Klaviyo,
    Hubspot,
}

impl WebhookVendor {
    pub(crate) const ALL: [WebhookVendor; 6] = [
        WebhookVendor::Twilio,
        WebhookVendor::Sendgrid,
        WebhookVendor::Mailchimp,
        WebhookVendor::Mandrill,
        WebhookVendor::Klaviyo,
        WebhookVendor::Hubspot,
    ];
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WebhookVendor::Twilio => "twilio",
            WebhookVendor::Sendgrid => "sendgrid",
            WebhookVendor::Mailchimp => "mailchimp",
            WebhookVendor::Mandrill => "mandrill",
            WebhookVendor::Klaviyo => "klaviyo",
            WebhookVendor::Hubspot => "hubspot",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<WebhookVendor> {
        WebhookVendor::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// `webhooks.<vendor>`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WebhookVendorCfg {
    pub(crate) vendor: WebhookVendor,
    pub(crate) line: usize,
    /// The shared secret (Twilio auth token, Mandrill webhook key, Klaviyo
    /// secret, HubSpot client secret, Mailchimp path token) or SendGrid's
    /// verification public key.
    pub(crate) secret_file: PathBuf,
    /// Timestamp window of the vendors that sign one (SendGrid, Klaviyo, HubSpot).
    pub(crate) max_age: Duration,
    /// Signal kind → consent change, over the vendor's defaults.
    pub(crate) mapping: Vec<(String, ConsentChangeCfg)>,
    /// A narrower scope (SendGrid ASM group id, Mailchimp audience id, Twilio
    /// Messaging Service SID) → consent change, over `mapping`.
    pub(crate) scopes: Vec<(String, ConsentChangeCfg)>,
    /// External-id prefix of the vendor's own person ids (Klaviyo, HubSpot).
    pub(crate) external_id_prefix: Option<String>,
}

/// A consent change by a vendor signal: `denied`, `granted` or null (back to
/// the default) per category and channel.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ConsentChangeCfg {
    pub(crate) line: usize,
    pub(crate) categories: BTreeMap<Category, Option<Grant>>,
    pub(crate) channels: BTreeMap<Channel, Option<Grant>>,
}

/// `sync:` (SPEC §13): vendor suppression targets and their durable outbox.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SyncCfg {
    /// The file outbox directory (`consent.source: file`; one process; 0700).
    pub(crate) outbox: PathBuf,
    /// AES-256-GCM key (64 hex) sealing what an entry carries; required with targets.
    pub(crate) key_file: Option<PathBuf>,
    /// Past this age an undelivered entry is parked (counted, alerted, retried slowly).
    pub(crate) max_age: Duration,
    pub(crate) retry_initial: Duration,
    pub(crate) retry_max: Duration,
    /// How often a parked entry is tried again.
    pub(crate) parked_retry: Duration,
    pub(crate) targets: Vec<SyncTargetCfg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyncKind {
    SendgridGlobal,
    SendgridGroup,
    Mailchimp,
    Klaviyo,
    Braze,
    Hubspot,
}

impl SyncKind {
    pub(crate) const ALL: [SyncKind; 6] = [
        SyncKind::SendgridGlobal,
        SyncKind::SendgridGroup,
        SyncKind::Mailchimp,
        SyncKind::Klaviyo,
        SyncKind::Braze,
        SyncKind::Hubspot,
    ];
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SyncKind::SendgridGlobal => "sendgrid_global",
            SyncKind::SendgridGroup => "sendgrid_group",
            SyncKind::Mailchimp => "mailchimp",
            SyncKind::Klaviyo => "klaviyo",
            SyncKind::Braze => "braze",
            SyncKind::Hubspot => "hubspot",
        }
    }
    /// The API host when the target names none (Mailchimp and Braze hosts are per account).
    fn default_host(self) -> Option<&'static str> {
        match self {
            SyncKind::SendgridGlobal | SyncKind::SendgridGroup => Some("api.sendgrid.com"),
            SyncKind::Klaviyo => Some("a.klaviyo.com"),
            SyncKind::Hubspot => Some("api.hubapi.com"),
            SyncKind::Mailchimp | SyncKind::Braze => None,
        }
    }
}

/// `sync.targets[i]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SyncTargetCfg {
    pub(crate) name: String,
    pub(crate) line: usize,
    pub(crate) kind: SyncKind,
    /// A denial of any of these categories or channels is pushed to the target.
    pub(crate) categories: Vec<Category>,
    pub(crate) channels: Vec<Channel>,
    pub(crate) credentials_file: PathBuf,
    /// Requests per second to this target (a token bucket, per instance).
    pub(crate) rate: f64,
    pub(crate) host: String,
    /// SendGrid suppression group, Braze subscription group, HubSpot subscription id.
    pub(crate) group_id: Option<String>,
    /// Mailchimp audience.
    pub(crate) list_id: Option<String>,
    /// SendGrid subuser (`on-behalf-of`).
    pub(crate) on_behalf_of: Option<String>,
    /// Braze: the external-id prefix naming Braze users (`braze:`).
    pub(crate) external_id_prefix: Option<String>,
    /// Klaviyo API revision header.
    pub(crate) revision: Option<String>,
    /// HubSpot `legalBasis`.
    pub(crate) legal_basis: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LogCfg {
    pub(crate) level: String,
}

/// A `consent.postgres.url` as written: a `postgres://` URL without a password
/// (secrets never in this file) and, if it names one, a supported `sslmode`.
/// Whether it agrees with `consent.postgres.sslmode` / `ca_file` is checked
/// where the runtime is built; the source parses it again when it connects.
fn check_postgres_url(v: &str) -> Result<(), String> {
    if !(v.starts_with("postgres://") || v.starts_with("postgresql://")) {
        return Err("expected a postgres:// URL".into());
    }
    let u = url::Url::parse(v).map_err(|e| format!("not a valid URL: {e}"))?;
    if u.password().is_some() {
        return Err(
            "the password must not be in the URL; use CONSENTGATE_PG_PASSWORD or \
                    consent.postgres.password_file"
                .into(),
        );
    }
    match u.query_pairs().find(|(k, _)| k == "sslmode") {
        None => Ok(()),
        Some((_, m)) => PgSslMode::parse(&m).map(|_| ()),
    }
}

/// `consent.nats.url`: one or more comma-separated `nats://` or `tls://`
/// server addresses, without a password (credentials go in
/// `consent.nats.credentials_file`).
fn check_nats_url(v: &str) -> Result<String, String> {
    for one in v.split(',') {
        let one = one.trim();
        if !(one.starts_with("nats://") || one.starts_with("tls://")) {
            return Err("expected nats://host:port or tls://host:port".into());
        }
        let u = url::Url::parse(one).map_err(|e| format!("not a valid URL: {e}"))?;
        if u.host_str().is_none_or(str::is_empty) {
            return Err("the URL names no host".into());
        }
        if u.password().is_some() || !u.username().is_empty() {
            return Err(
                "credentials must not be in the URL; use consent.nats.credentials_file".into(),
            );
        }
    }
    Ok(v.trim().to_string())
}

/// A JetStream bucket name: letters, digits, `-` and `_`.
fn check_bucket(v: &str) -> Result<String, String> {
    if v.is_empty()
        || v.len() > 64
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("expected 1 to 64 letters, digits, '-' or '_'".into());
    }
    Ok(v.to_string())
}

/// One configuration error: the file, the line, the dotted key and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConfigError {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) key: String,
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file, self.line, self.key, self.message
        )
    }
}

/// Where a config came from (for messages and reloads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ConfigSource {
    File(PathBuf),
    Embedded,
}

impl ConfigSource {
    pub(crate) fn label(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Embedded => format!("<embedded {DEFAULT_PATH}>"),
        }
    }
    /// `--config` given → that file; otherwise the default path if present,
    /// else the embedded copy.
    pub(crate) fn resolve(explicit: Option<&Path>) -> ConfigSource {
        match explicit {
            Some(p) => ConfigSource::File(p.to_path_buf()),
            None if Path::new(DEFAULT_PATH).exists() => ConfigSource::File(DEFAULT_PATH.into()),
            None => ConfigSource::Embedded,
        }
    }
    pub(crate) fn load(&self) -> Result<Config, Vec<ConfigError>> {
        match self.load_all() {
            (Some(cfg), errors) if errors.is_empty() => Ok(cfg),
            (_, errors) => Err(errors),
        }
    }
    /// Like [`ConfigSource::load`], but the config as read comes back with its errors
    /// ([`parse_all`]).
    pub(crate) fn load_all(&self) -> (Option<Config>, Vec<ConfigError>) {
        match self {
            ConfigSource::File(p) => match std::fs::read_to_string(p) {
                Ok(text) => parse_all(&text, &p.display().to_string()),
                Err(e) => (
                    None,
                    vec![ConfigError {
                        file: p.display().to_string(),
                        line: 0,
                        key: "(file)".into(),
                        message: format!("cannot read: {e}"),
                    }],
                ),
            },
            ConfigSource::Embedded => parse_all(EMBEDDED_DEFAULT, &self.label()),
        }
    }
}

/// Parse and validate a config text; every error found is returned.
#[cfg(test)]
pub(crate) fn parse(text: &str, file: &str) -> Result<Config, Vec<ConfigError>> {
    match parse_all(text, file) {
        (Some(cfg), errors) if errors.is_empty() => Ok(cfg),
        (_, errors) => Err(errors),
    }
}

/// Parse a config text and return every error with the config as read (bad
/// values replaced by their defaults), so `check` can go on to the files it
/// names. `None` only when the text is not YAML at all.
fn parse_all(text: &str, file: &str) -> (Option<Config>, Vec<ConfigError>) {
    let mut r = Reader {
        file: file.to_string(),
        errors: Vec::new(),
    };
    let root = match marked_yaml::parse_yaml(0, text) {
        Ok(n) => n,
        Err(e) => {
            let (line, msg) = load_error(&e);
            r.err_at(line, "(yaml)", msg);
            return (None, r.errors);
        }
    };
    let cfg = r.config(&root);
    r.errors.sort_by_key(|e| e.line);
    (Some(cfg), r.errors)
}

fn load_error(e: &marked_yaml::LoadError) -> (usize, String) {
    use marked_yaml::LoadError as L;
    match e {
        L::TopLevelMustBeMapping(m) => (m.line(), "the top level must be a mapping".into()),
        L::ScanError(m, s) => (m.line(), format!("YAML syntax error: {s}")),
        L::DuplicateKey(d) => (
            d.key.span().start().map(|m| m.line()).unwrap_or(0),
            format!("duplicate key `{}`", d.key.as_str()),
        ),
        L::UnexpectedAnchor(m) => (m.line(), "anchors are not supported".into()),
        L::UnexpectedTag(m) => (m.line(), "tags are not supported".into()),
        L::MappingKeyMustBeScalar(m) => (m.line(), "mapping keys must be scalars".into()),
        L::TopLevelMustBeSequence(m) => (m.line(), "unexpected top level".into()),
    }
}

fn line_of(span: &Span) -> usize {
    span.start().map(|m| m.line()).unwrap_or(0)
}

fn is_null(n: &Node) -> bool {
    match n {
        Node::Scalar(s) => {
            s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
        }
        _ => false,
    }
}

struct Reader {
    file: String,
    errors: Vec<ConfigError>,
}

type Map = marked_yaml::types::MarkedMappingNode;

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Reader {
    fn err_at(&mut self, line: usize, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Reject keys not in `allowed`.
    fn known(&mut self, map: &Map, prefix: &str, allowed: &[&str]) {
        for (k, _) in map.iter() {
            if !allowed.contains(&k.as_str()) {
                let key = join(prefix, k.as_str());
                self.err_at(
                    line_of(k.span()),
                    &key,
                    format!("unknown key (expected one of: {})", allowed.join(", ")),
                );
            }
        }
    }

    fn mapping<'a>(&mut self, parent: &'a Map, prefix: &str, key: &str) -> Option<&'a Map> {
        let n = parent.get_node(key)?;
        if is_null(n) {
            return None;
        }
        match n.as_mapping() {
            Some(m) => Some(m),
            None => {
                self.err_at(line_of(n.span()), &join(prefix, key), "expected a mapping");
                None
            }
        }
    }

    /// A scalar value as text, with its line. `None` when absent or null.
    fn scalar(&mut self, map: &Map, prefix: &str, key: &str) -> Option<(String, usize)> {
        let n = map.get_node(key)?;
        if is_null(n) {
            return None;
        }
        match n.as_scalar() {
            Some(s) => Some((s.as_str().to_string(), line_of(s.span()))),
            None => {
                self.err_at(
                    line_of(n.span()),
                    &join(prefix, key),
                    "expected a single value",
                );
                None
            }
        }
    }

    fn parsed<T>(
        &mut self,
        map: &Map,
        prefix: &str,
        key: &str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> T {
        match self.scalar(map, prefix, key) {
            None => default,
            Some((v, line)) => match parse(&v) {
                Ok(x) => x,
                Err(e) => {
                    self.err_at(line, &join(prefix, key), e);
                    default
                }
            },
        }
    }

    fn opt_parsed<T>(
        &mut self,
        map: &Map,
        prefix: &str,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let (v, line) = self.scalar(map, prefix, key)?;
        match parse(&v) {
            Ok(x) => Some(x),
            Err(e) => {
                self.err_at(line, &join(prefix, key), e);
                None
            }
        }
    }

    /// A path to an input file that must exist.
    fn input_file(&mut self, map: &Map, prefix: &str, key: &str) -> Option<PathBuf> {
        let (v, line) = self.scalar(map, prefix, key)?;
        let p = PathBuf::from(&v);
        if !p.is_file() {
            self.err_at(line, &join(prefix, key), format!("file not found: {v}"));
        }
        Some(p)
    }

    fn config(&mut self, root: &Node) -> Config {
        let empty = Map::new_empty(Span::new_blank());
        let root = match root.as_mapping() {
            Some(m) => m,
            None => {
                self.err_at(line_of(root.span()), "(root)", "expected a mapping");
                &empty
            }
        };
        self.known(
            root,
            "",
            &[
                "listen",
                "unknown_destinations",
                "interception",
                "upstream",
                "consent",
                "admin",
                "audit",
                "max_body_bytes",
                "destinations",
                "categories",
                "log",
                "shutdown_grace",
                "limits",
                "webhooks",
                "sync",
                "identify",
                "telemetry",
            ],
        );
        let listen = {
            let m = self.mapping(root, "", "listen").unwrap_or(&empty);
            self.known(
                m,
                "listen",
                &["proxy", "admin", "gateway", "metrics", "webhooks"],
            );
            Listen {
                proxy: self.parsed(
                    m,
                    "listen",
                    "proxy",
                    ([127, 0, 0, 1], 15001).into(),
                    parse_addr,
                ),
                admin: self.parsed(
                    m,
                    "listen",
                    "admin",
                    ([127, 0, 0, 1], 15000).into(),
                    parse_addr,
                ),
                gateway: self.opt_parsed(m, "listen", "gateway", parse_addr),
                metrics: self.opt_parsed(m, "listen", "metrics", parse_addr),
                webhooks: self.opt_parsed(m, "listen", "webhooks", parse_addr),
            }
        };
        let unknown_destinations = self.parsed(
            root,
            "",
            "unknown_destinations",
            UnknownDestinations::Deny,
            |v| match v {
                "deny" => Ok(UnknownDestinations::Deny),
                "tunnel" => Ok(UnknownDestinations::Tunnel),
                _ => Err(format!("expected deny or tunnel, got {v:?}")),
            },
        );
        let interception = {
            let m = self.mapping(root, "", "interception").unwrap_or(&empty);
            self.known(m, "interception", &["ca_cert", "ca_key"]);
            Interception {
                ca_cert: self.parsed(m, "interception", "ca_cert", "certs/ca.pem".into(), path),
                ca_key: self.parsed(m, "interception", "ca_key", "certs/ca-key.pem".into(), path),
            }
        };
        let upstream = {
            let p = "upstream";
            let m = self.mapping(root, "", p).unwrap_or(&empty);
            self.known(
                m,
                p,
                &[
                    "extra_ca",
                    "resolve",
                    "connect_timeout",
                    "response_timeout",
                    "pool_idle_timeout",
                    "http2",
                    "proxy",
                ],
            );
            let mut resolve = HashMap::new();
            if let Some(rm) = self.mapping(m, p, "resolve") {
                for (k, v) in rm.iter() {
                    let key = format!("upstream.resolve.{}", k.as_str());
                    if parse_host_port(k.as_str()).is_err() {
                        self.err_at(line_of(k.span()), &key, "key must be \"host:port\"");
                        continue;
                    }
                    match v.as_scalar().map(|s| parse_addr(s.as_str())) {
                        Some(Ok(a)) => {
                            resolve.insert(k.as_str().to_ascii_lowercase(), a);
                        }
                        Some(Err(e)) => self.err_at(line_of(v.span()), &key, e),
                        None => self.err_at(line_of(v.span()), &key, "expected \"ip:port\""),
                    }
                }
            }
            Upstream {
                extra_ca: self.input_file(m, p, "extra_ca"),
                resolve,
                connect_timeout: self.parsed(
                    m,
                    p,
                    "connect_timeout",
                    Duration::from_secs(5),
                    positive_duration,
                ),
                response_timeout: self.parsed(
                    m,
                    p,
                    "response_timeout",
                    Duration::from_secs(30),
                    positive_duration,
                ),
                pool_idle_timeout: self.parsed(
                    m,
                    p,
                    "pool_idle_timeout",
                    Duration::from_secs(90),
                    positive_duration,
                ),
                http2: self.parsed(m, p, "http2", false, boolean),
                proxy: self.parent_proxy(m),
            }
        };
        let consent = {
            let p = "consent";
            let m = self.mapping(root, "", p).unwrap_or(&empty);
            self.known(
                m,
                p,
                &[
                    "source",
                    "file",
                    "journal",
                    "journal_key_file",
                    "journal_previous_key_file",
                    "max_staleness",
                    "postgres",
                    "nats",
                    "replicate_to",
                ],
            );
            let source = self.parsed(m, p, "source", SourceKind::File, |v| match v {
                "file" => Ok(SourceKind::File),
                "postgres" => Ok(SourceKind::Postgres),
                "nats" => Ok(SourceKind::Nats),
                _ => Err(format!("expected file, postgres or nats, got {v:?}")),
            });
            let replicate_to = self.opt_parsed(m, p, "replicate_to", |v| match v {
                "nats" => Ok(ReplicateTo::Nats),
                _ => Err(format!("expected nats, got {v:?}")),
            });
            if replicate_to.is_some() && source == SourceKind::Nats {
                let line = self.scalar(m, p, "replicate_to").map_or(0, |(_, l)| l);
                self.err_at(
                    line,
                    "consent.replicate_to",
                    "an instance whose source is nats follows the bucket; only a file or \
                     postgres source replicates into it",
                );
            }
            let nats_needed = source == SourceKind::Nats || replicate_to.is_some();
            let nm = self.mapping(m, p, "nats");
            if nm.is_none() && nats_needed {
                let line = self
                    .scalar(m, p, "source")
                    .or_else(|| self.scalar(m, p, "replicate_to"))
                    .map_or(0, |(_, l)| l);
                self.err_at(line, "consent.nats", "required: url and bucket");
            }
            let nm = nm.unwrap_or(&empty);
            let np = "consent.nats";
            self.known(
                nm,
                np,
                &[
                    "url",
                    "bucket",
                    "credentials_file",
                    "ca_file",
                    "owner_admin_url",
                ],
            );
            if nats_needed && !nm.is_empty() && self.scalar(nm, np, "bucket").is_none() {
                self.err_at(line_of(nm.span()), "consent.nats.bucket", "required");
            }
            let nats = NatsCfg {
                url: self.parsed(
                    nm,
                    np,
                    "url",
                    "nats://127.0.0.1:4222".into(),
                    check_nats_url,
                ),
                bucket: self.parsed(nm, np, "bucket", "consent".into(), check_bucket),
                credentials_file: self.input_file(nm, np, "credentials_file"),
                ca_file: self.input_file(nm, np, "ca_file"),
                owner_admin_url: self.opt_parsed(nm, np, "owner_admin_url", |v| {
                    match url::Url::parse(v) {
                        Ok(u)
                            if matches!(u.scheme(), "http" | "https") && u.password().is_none() =>
                        {
                            Ok(v.to_string())
                        }
                        _ => Err("expected an http:// or https:// URL without credentials".into()),
                    }
                }),
            };
            let file = if source == SourceKind::File {
                self.input_file(m, p, "file")
                    .unwrap_or_else(|| "config/consent.example.jsonl".into())
            } else {
                self.parsed(m, p, "file", "config/consent.example.jsonl".into(), path)
            };
            let pg = self.mapping(m, p, "postgres").unwrap_or(&empty);
            self.known(
                pg,
                "consent.postgres",
                &["url", "password_file", "sslmode", "ca_file"],
            );
            let url_line = self
                .scalar(pg, "consent.postgres", "url")
                .map_or_else(|| line_of(pg.span()), |(_, l)| l);
            let postgres = PostgresCfg {
                url: self.parsed(
                    pg,
                    "consent.postgres",
                    "url",
                    "postgres://consentgate@127.0.0.1:5432/consent".into(),
                    |v| check_postgres_url(v).map(|()| v.to_string()),
                ),
                password_file: self.input_file(pg, "consent.postgres", "password_file"),
                sslmode: self.opt_parsed(pg, "consent.postgres", "sslmode", PgSslMode::parse),
                ca_file: self.input_file(pg, "consent.postgres", "ca_file"),
                line: url_line,
            };
            ConsentCfg {
                source,
                file,
                journal: self.parsed(m, p, "journal", "var/consent-journal".into(), path),
                journal_key_file: self.input_file(m, p, "journal_key_file"),
                journal_previous_key_file: self.input_file(m, p, "journal_previous_key_file"),
                // At 0s consent would be stale between any two heartbeats of
                // the source: marketing would always fail closed.
                max_staleness: self.parsed(m, p, "max_staleness", Duration::from_secs(300), |v| {
                    at_least(v, Duration::from_secs(1))
                }),
                postgres,
                nats,
                replicate_to,
            }
        };
        let admin = {
            let m = self.mapping(root, "", "admin").unwrap_or(&empty);
            self.known(
                m,
                "admin",
                &["tokens_file", "ready_requires_fresh_consent", "tls"],
            );
            let tls = self.mapping(m, "admin", "tls").map(|t| {
                let p = "admin.tls";
                self.known(t, p, &["cert", "key", "client_ca"]);
                let line = line_of(t.span());
                let required = |r: &mut Reader, key: &str| {
                    r.input_file(t, p, key).unwrap_or_else(|| {
                        r.err_at(line, &join(p, key), "missing (a PEM file)");
                        PathBuf::new()
                    })
                };
                AdminTls {
                    cert: required(self, "cert"),
                    key: required(self, "key"),
                    client_ca: self.input_file(t, p, "client_ca"),
                }
            });
            AdminCfg {
                tls,
                tokens_file: self
                    .input_file(m, "admin", "tokens_file")
                    .unwrap_or_else(|| "config/admin-tokens.example".into()),
                ready_requires_fresh_consent: self.parsed(
                    m,
                    "admin",
                    "ready_requires_fresh_consent",
                    true,
                    boolean,
                ),
            }
        };
        let audit = {
            let m = self.mapping(root, "", "audit").unwrap_or(&empty);
            self.known(
                m,
                "audit",
                &[
                    "path",
                    "pseudonym_key_file",
                    "fsync",
                    "max_file_bytes",
                    "encryption_key_file",
                    "max_total_bytes",
                ],
            );
            AuditCfg {
                path: self.parsed(m, "audit", "path", "var/audit".into(), path),
                pseudonym_key_file: self.opt_parsed(m, "audit", "pseudonym_key_file", path),
                fsync: self.parsed(m, "audit", "fsync", AuditFsync::Interval, |v| match v {
                    "always" => Ok(AuditFsync::Always),
                    "interval" => Ok(AuditFsync::Interval),
                    "never" => Ok(AuditFsync::Never),
                    _ => Err(format!("expected always, interval or never, got {v:?}")),
                }),
                max_file_bytes: self.parsed(m, "audit", "max_file_bytes", 64 << 20, size),
                encryption_key_file: self.input_file(m, "audit", "encryption_key_file"),
                max_total_bytes: self.opt_parsed(m, "audit", "max_total_bytes", |v| {
                    let n = size(v)?;
                    // The audit writer's MIN_MAX_TOTAL_BYTES (config.rs depends on no subsystem).
                    let min = 64 << 10;
                    if n < min {
                        return Err(format!(
                            "must be at least 64KiB ({min} bytes): files rotate at 1/8 of it"
                        ));
                    }
                    Ok(n)
                }),
            }
        };
        let max_body_bytes = self.parsed(root, "", "max_body_bytes", 8 << 20, size);
        let destinations = self.destinations(root);
        let categories = self.categories(root);
        let log = {
            let m = self.mapping(root, "", "log").unwrap_or(&empty);
            self.known(m, "log", &["level"]);
            LogCfg {
                level: self.parsed(m, "log", "level", "info".into(), |v| match v {
                    "trace" | "debug" | "info" | "warn" | "error" => Ok(v.to_string()),
                    _ => Err(format!(
                        "expected trace, debug, info, warn or error, got {v:?}"
                    )),
                }),
            }
        };
        let shutdown_grace = self.parsed(
            root,
            "",
            "shutdown_grace",
            Duration::from_secs(30),
            duration,
        );
        let limits = self.limits(root, max_body_bytes);
        let webhooks = self.webhooks(root);
        let sync = self.sync(root);
        let identify = {
            let p = "identify";
            let m = self.mapping(root, "", p).unwrap_or(&empty);
            self.known(m, p, &["default_region"]);
            let line = self
                .scalar(m, p, "default_region")
                .map_or_else(|| line_of(m.span()), |(_, l)| l);
            IdentifyCfg {
                default_region: self.parsed(m, p, "default_region", "US".into(), region_code),
                line,
            }
        };
        let telemetry = self.telemetry(root);
        Config {
            telemetry,
            webhooks,
            sync,
            identify,
            limits,
            listen,
            unknown_destinations,
            interception,
            upstream,
            consent,
            admin,
            audit,
            max_body_bytes,
            destinations,
            categories,
            log,
            shutdown_grace,
        }
    }

    /// `upstream.proxy` (null or absent: connect directly).
    fn parent_proxy(&mut self, upstream: &Map) -> Option<ParentProxy> {
        let p = "upstream.proxy";
        let m = self.mapping(upstream, "upstream", "proxy")?;
        self.known(m, p, &["url", "credentials_file", "no_proxy"]);
        let Some((url, line)) = self.scalar(m, p, "url") else {
            self.err_at(
                line_of(m.span()),
                &join(p, "url"),
                "missing (http://host:port of the parent proxy)",
            );
            return None;
        };
        let credentials_file = self.input_file(m, p, "credentials_file");
        let mut no_proxy = Vec::new();
        if let Some(n) = m.get_node("no_proxy").filter(|n| !is_null(n)) {
            let key = join(p, "no_proxy");
            match n.as_sequence() {
                None => self.err_at(line_of(n.span()), &key, "expected a list of hosts"),
                Some(seq) => {
                    for (i, e) in seq.iter().enumerate() {
                        match e.as_scalar().map(|s| no_proxy_entry(s.as_str())) {
                            Some(Ok(h)) => no_proxy.push(h),
                            Some(Err(msg)) => {
                                self.err_at(line_of(e.span()), &format!("{key}[{i}]"), msg)
                            }
                            None => self.err_at(
                                line_of(e.span()),
                                &format!("{key}[{i}]"),
                                "expected a host name or *.suffix",
                            ),
                        }
                    }
                }
            }
        }
        match proxy_url(&url) {
            Ok((host, port)) => Some(ParentProxy {
                host,
                port,
                credentials_file,
                no_proxy,
            }),
            Err(e) => {
                self.err_at(line, &join(p, "url"), e);
                None
            }
        }
    }

    fn limits(&mut self, root: &Map, max_body_bytes: u64) -> Limits {
        let p = "limits";
        let d = Limits::default();
        let empty = Map::new_empty(Span::new_blank());
        let m = self.mapping(root, "", p).unwrap_or(&empty);
        self.known(
            m,
            p,
            &[
                "header_read_timeout",
                "body_read_timeout",
                "max_header_bytes",
                "inflight_body_bytes",
            ],
        );
        let timeout = positive_duration;
        let limits = Limits {
            header_read_timeout: self.parsed(
                m,
                p,
                "header_read_timeout",
                d.header_read_timeout,
                timeout,
            ),
            body_read_timeout: self.parsed(m, p, "body_read_timeout", d.body_read_timeout, timeout),
            // Below 1 KiB ordinary requests would not fit; above 16 MiB a head is
            // no longer a head, and each slow client could pin that much.
            max_header_bytes: self.parsed(m, p, "max_header_bytes", d.max_header_bytes, |v| {
                let n = size(v)?;
                if !(1 << 10..=16 << 20).contains(&n) {
                    Err(format!("expected 1KiB to 16MiB, got {v:?}"))
                } else {
                    Ok(n)
                }
            }),
            inflight_body_bytes: self.parsed(
                m,
                p,
                "inflight_body_bytes",
                d.inflight_body_bytes,
                size,
            ),
        };
        if limits.inflight_body_bytes < max_body_bytes {
            let line = m
                .get_node("inflight_body_bytes")
                .or_else(|| root.get_node("max_body_bytes"))
                .map(|n| line_of(n.span()))
                .unwrap_or(0);
            self.err_at(
                line,
                "limits.inflight_body_bytes",
                format!(
                    "must be at least max_body_bytes ({max_body_bytes}), or no body of the \
                     largest allowed size could ever be read"
                ),
            );
        }
        limits
    }

    fn telemetry(&mut self, root: &Map) -> TelemetryCfg {
        let empty = Map::new_empty(Span::new_blank());
        let m = self.mapping(root, "", "telemetry").unwrap_or(&empty);
        self.known(m, "telemetry", &["otlp"]);
        let Some(o) = self.mapping(m, "telemetry", "otlp") else {
            return TelemetryCfg::default();
        };
        let p = "telemetry.otlp";
        self.known(o, p, &["endpoint", "service_name", "timeout"]);
        let endpoint = self.opt_parsed(o, p, "endpoint", |v| {
            let u = url::Url::parse(v).map_err(|e| format!("not a URL: {e}"))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(format!(
                    "expected http(s)://host:port[/path] of an OTLP/HTTP collector, got {v:?}"
                ));
            }
            if !cfg!(feature = "otlp") {
                return Err("this build has no OTLP exporter (cargo feature `otlp`)".into());
            }
            Ok(v.to_string())
        });
        let service_name = self.parsed(o, p, "service_name", "consentgate".to_string(), |v| {
            if v.is_empty() || v.len() > 255 {
                Err("expected 1 to 255 characters".into())
            } else {
                Ok(v.to_string())
            }
        });
        let timeout = self.parsed(o, p, "timeout", Duration::from_secs(10), positive_duration);
        TelemetryCfg {
            otlp: endpoint.map(|endpoint| OtlpKeys {
                endpoint,
                service_name,
                timeout,
            }),
        }
    }

    fn destinations(&mut self, root: &Map) -> Vec<DestinationCfg> {
        let mut out = Vec::new();
        let Some(n) = root.get_node("destinations") else {
            return out;
        };
        if is_null(n) {
            return out;
        }
        let Some(seq) = n.as_sequence() else {
            self.err_at(line_of(n.span()), "destinations", "expected a list");
            return out;
        };
        for (i, item) in seq.iter().enumerate() {
            let p = format!("destinations[{i}]");
            let Some(m) = item.as_mapping() else {
                self.err_at(line_of(item.span()), &p, "expected a mapping");
                continue;
            };
            let line = line_of(m.span());
            let generic = matches!(self.scalar(m, &p, "type"), Some((t, _)) if t == "generic");
            if !generic {
                self.known(
                    m,
                    &p,
                    &[
                        "name",
                        "type",
                        "enabled",
                        "mode",
                        "on_blocked",
                        "refusal_format",
                        "category",
                        "hosts",
                    ],
                );
                if let Some((t, l)) = self.scalar(m, &p, "type") {
                    if t != "builtin" {
                        self.err_at(
                            l,
                            &format!("{p}.type"),
                            format!("expected builtin or generic, got {t:?}"),
                        );
                    }
                }
            }
            let Some((name, _)) = self.scalar(m, &p, "name") else {
                self.err_at(line, &format!("{p}.name"), "missing");
                continue;
            };
            let hosts = match m.get_sequence("hosts") {
                Some(s) => s
                    .iter()
                    .filter_map(|h| h.as_scalar().map(|x| x.as_str().to_ascii_lowercase()))
                    .collect(),
                None => Vec::new(),
            };
            out.push(DestinationCfg {
                enabled: self.parsed(m, &p, "enabled", true, boolean),
                mode: self.opt_parsed(m, &p, "mode", |v| match v {
                    "enforce" => Ok(Mode::Enforce),
                    "shadow" => Ok(Mode::Shadow),
                    "passthrough" => Ok(Mode::Passthrough),
                    _ => Err(format!(
                        "expected enforce, shadow or passthrough, got {v:?}"
                    )),
                }),
                on_blocked: self.opt_parsed(m, &p, "on_blocked", |v| match v {
                    "error" => Ok(OnBlocked::Error),
                    "synthetic_ok" => Ok(OnBlocked::SyntheticOk),
                    _ => Err(format!("expected error or synthetic_ok, got {v:?}")),
                }),
                refusal_format: self.opt_parsed(m, &p, "refusal_format", |v| match v {
                    "vendor" => Ok(RefusalFormat::Vendor),
                    "plain" => Ok(RefusalFormat::Plain),
                    _ => Err(format!("expected vendor or plain, got {v:?}")),
                }),
                category: self.opt_parsed(m, &p, "category", category),
                hosts,
                generic: generic.then(|| to_json(item)),
                name,
                line,
            });
        }
        out
    }

    fn categories(&mut self, root: &Map) -> BTreeMap<Category, CategoryCfg> {
        let mut out: BTreeMap<Category, CategoryCfg> = Category::ALL
            .iter()
            .map(|c| {
                (
                    *c,
                    CategoryCfg {
                        default: c.shipped_default(),
                        fail_closed_when_stale: c.shipped_fail_closed_when_stale(),
                    },
                )
            })
            .collect();
        let Some(m) = self.mapping(root, "", "categories") else {
            return out;
        };
        for (k, v) in m.iter() {
            let key = format!("categories.{}", k.as_str());
            let Some(c) = Category::parse(k.as_str()) else {
                self.err_at(line_of(k.span()), &key, "unknown category");
                continue;
            };
            let Some(cm) = v.as_mapping() else {
                self.err_at(line_of(v.span()), &key, "expected a mapping");
                continue;
            };
            self.known(cm, &key, &["default", "fail_closed_when_stale"]);
            let cur = out[&c];
            let default = self.parsed(cm, &key, "default", cur.default, |v| match v {
                "granted" => Ok(Grant::Granted),
                "denied" => Ok(Grant::Denied),
                _ => Err(format!("expected granted or denied, got {v:?}")),
            });
            let fcws = self.parsed(
                cm,
                &key,
                "fail_closed_when_stale",
                cur.fail_closed_when_stale,
                boolean,
            );
            out.insert(
                c,
                CategoryCfg {
                    default,
                    fail_closed_when_stale: fcws,
                },
            );
        }
        out
    }
}

/// A YAML node as JSON (scalars typed the way YAML would).
fn to_json(n: &Node) -> serde_json::Value {
    use serde_json::Value;
    match n {
        Node::Scalar(s) => {
            if is_null(n) {
                Value::Null
            } else if !s.may_coerce() {
                Value::String(s.as_str().to_string())
            } else if let Some(b) = s.as_bool() {
                Value::Bool(b)
            } else if let Ok(i) = s.as_str().parse::<i64>() {
                Value::from(i)
            } else {
                Value::String(s.as_str().to_string())
            }
        }
        Node::Sequence(seq) => Value::Array(seq.iter().map(to_json).collect()),
        Node::Mapping(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

fn path(v: &str) -> Result<PathBuf, String> {
    if v.is_empty() {
        Err("expected a path".into())
    } else {
        Ok(PathBuf::from(v))
    }
}

fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("expected true or false, got {v:?}")),
    }
}

/// An ISO 3166 alpha-2 code as written (either case).
fn region_code(v: &str) -> Result<String, String> {
    if v.len() == 2 && v.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(v.to_ascii_uppercase())
    } else {
        Err(format!(
            "expected an ISO 3166 alpha-2 region code such as US, GB or DE, got {v:?}"
        ))
    }
}

fn category(v: &str) -> Result<Category, String> {
    Category::parse(v).ok_or_else(|| format!("unknown category {v:?}"))
}

fn parse_addr(v: &str) -> Result<SocketAddr, String> {
    v.parse::<SocketAddr>()
        .map_err(|_| format!("expected ip:port, got {v:?}"))
}

/// `http://host:port` of a parent proxy: host and port. The port is required
/// (proxies have no one conventional port), credentials are refused (they go in
/// `credentials_file`, never in this file), and so is TLS to the proxy itself.
fn proxy_url(v: &str) -> Result<(String, u16), String> {
    // A value with userinfo is never repeated: it may hold a password.
    let shown = if v.contains('@') {
        "a URL with credentials".to_string()
    } else {
        format!("{v:?}")
    };
    let u = url::Url::parse(v).map_err(|_| format!("expected http://host:port, got {shown}"))?;
    if u.scheme() != "http" {
        return Err(format!(
            "expected http://host:port (the tunnel to the vendor is TLS end to end; TLS to the proxy itself is not supported), got scheme {:?}",
            u.scheme()
        ));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "credentials do not belong in the URL: put user:password in upstream.proxy.credentials_file"
                .into(),
        );
    }
    if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
        return Err(format!(
            "expected http://host:port with nothing after it, got {shown}"
        ));
    }
    let host = match u.host() {
        Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        None => return Err(format!("expected http://host:port, got {shown}")),
    };
    // `Url` drops a port equal to the scheme's default: ask the text instead.
    let port = u.port().or_else(|| {
        let after_host = v.rsplit_once(']').map_or(v, |(_, r)| r);
        after_host
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
    });
    match port {
        Some(p) if p != 0 => Ok((host, p)),
        _ => Err(format!(
            "expected http://host:port with the port, got {shown}"
        )),
    }
}

/// A `no_proxy` entry: a host name or address, or `*.suffix`.
fn no_proxy_entry(v: &str) -> Result<String, String> {
    let h = v.trim().to_ascii_lowercase();
    let name = h.strip_prefix("*.").unwrap_or(&h);
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if ok {
        Ok(h)
    } else {
        Err(format!("expected a host name or *.suffix, got {v:?}"))
    }
}

fn parse_host_port(v: &str) -> Result<(), String> {
    match v.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(()),
        _ => Err("expected host:port".into()),
    }
}

/// "5m", "30s", "250ms".
pub(crate) fn duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|_| format!("expected a duration like 30s or 5m, got {v:?}"))
}

/// A duration that means nothing at zero (timeouts, intervals).
fn positive_duration(v: &str) -> Result<Duration, String> {
    at_least(v, Duration::from_millis(1))
}

/// A duration of at least `min`.
fn at_least(v: &str, min: Duration) -> Result<Duration, String> {
    let d = duration(v)?;
    if d < min {
        return Err(if min <= Duration::from_millis(1) {
            "must be more than 0s".to_string()
        } else {
            format!("must be at least {}", humantime::format_duration(min))
        });
    }
    Ok(d)
}

/// "8MiB", "512KiB", "1048576", "10MB".
pub(crate) fn size(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a size like 8MiB, got {v:?}"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit {u:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mul)
        .filter(|x| *x > 0)
        .ok_or_else(|| format!("size out of range: {v:?}"))
}

/// `webhooks:` and `sync:` (SPEC §13).
impl Reader {
    fn webhooks(&mut self, root: &Map) -> WebhooksCfg {
        let p = "webhooks";
        let empty = Map::new_empty(Span::new_blank());
        let m = self.mapping(root, "", p).unwrap_or(&empty);
        let mut allowed = vec![
            "tls",
            "public_url",
            "state_dir",
            "replay_retention",
            "replay_max_entries",
            "max_body_bytes",
        ];
        allowed.extend(WebhookVendor::ALL.iter().map(|v| v.as_str()));
        self.known(m, p, &allowed);
        let tls = self.mapping(m, p, "tls").map(|t| {
            let p = "webhooks.tls";
            self.known(t, p, &["cert", "key", "client_ca"]);
            let line = line_of(t.span());
            let required = |r: &mut Reader, key: &str| {
                r.input_file(t, p, key).unwrap_or_else(|| {
                    r.err_at(line, &join(p, key), "missing (a PEM file)");
                    PathBuf::new()
                })
            };
            AdminTls {
                cert: required(self, "cert"),
                key: required(self, "key"),
                client_ca: self.input_file(t, p, "client_ca"),
            }
        });
        let public_url = self.opt_parsed(m, p, "public_url", |v| {
            let u = url::Url::parse(v).map_err(|e| format!("not a valid URL: {e}"))?;
            if !matches!(u.scheme(), "https" | "http") || u.host_str().is_none() {
                return Err("expected an https:// URL with a host".into());
            }
            if u.query().is_some() || u.fragment().is_some() {
                return Err("expected a base URL without query or fragment".into());
            }
            Ok(v.trim_end_matches('/').to_string())
        });
        let mut vendors = Vec::new();
        for v in WebhookVendor::ALL {
            let Some(vm) = self.mapping(m, p, v.as_str()) else {
                continue;
            };
            let vp = format!("webhooks.{}", v.as_str());
            let key = if v == WebhookVendor::Sendgrid {
                "public_key_file"
            } else {
                "secret_file"
            };
            self.known(
                vm,
                &vp,
                &[key, "max_age", "mapping", "scopes", "external_id_prefix"],
            );
            let line = line_of(vm.span());
            let secret_file = self.input_file(vm, &vp, key).unwrap_or_else(|| {
                self.err_at(line, &join(&vp, key), "missing (a file)");
                PathBuf::new()
            });
            let mapping = self.changes(vm, &vp, "mapping");
            let scopes = self.changes(vm, &vp, "scopes");
            vendors.push(WebhookVendorCfg {
                vendor: v,
                line,
                secret_file,
                max_age: self.parsed(vm, &vp, "max_age", Duration::from_secs(300), duration),
                mapping,
                scopes,
                external_id_prefix: self
                    .opt_parsed(vm, &vp, "external_id_prefix", |v| Ok(v.to_string())),
            });
        }
        let needs_url = vendors.iter().any(|v| {
            matches!(
                v.vendor,
                WebhookVendor::Twilio | WebhookVendor::Mandrill | WebhookVendor::Hubspot
            )
        });
        if needs_url && public_url.is_none() {
            self.err_at(
                line_of(m.span()),
                "webhooks.public_url",
                "required with twilio, mandrill or hubspot: they sign the URL they call",
            );
        }
        WebhooksCfg {
            tls,
            public_url,
            state_dir: self.parsed(m, p, "state_dir", "var/webhooks".into(), path),
            replay_retention: self.parsed(
                m,
                p,
                "replay_retention",
                Duration::from_secs(7 * 24 * 3600),
                duration,
            ),
            replay_max_entries: self.parsed(m, p, "replay_max_entries", 1_000_000, |v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| (1_000..=100_000_000).contains(n))
                    .ok_or_else(|| format!("expected 1000 to 100000000, got {v:?}"))
            }),
            max_body_bytes: self.parsed(m, p, "max_body_bytes", 1 << 20, size),
            vendors,
        }
    }

    /// `KEY: {kind: {categories: {...}, channels: {...}}}`.
    fn changes(&mut self, m: &Map, prefix: &str, key: &str) -> Vec<(String, ConsentChangeCfg)> {
        let mut out = Vec::new();
        let Some(cm) = self.mapping(m, prefix, key) else {
            return out;
        };
        for (k, v) in cm.iter() {
            let kp = format!("{prefix}.{key}.{}", k.as_str());
            let mut change = ConsentChangeCfg {
                line: line_of(k.span()),
                ..Default::default()
            };
            if is_null(v) {
                out.push((k.as_str().to_string(), change));
                continue;
            }
            let Some(vm) = v.as_mapping() else {
                self.err_at(line_of(v.span()), &kp, "expected a mapping");
                continue;
            };
            self.known(vm, &kp, &["categories", "channels"]);
            let grant = |v: &str| match v {
                "denied" => Ok(Some(Grant::Denied)),
                "granted" => Ok(Some(Grant::Granted)),
                "null" | "~" | "" => Ok(None),
                _ => Err(format!("expected denied, granted or null, got {v:?}")),
            };
            if let Some(c) = self.mapping(vm, &kp, "categories") {
                for (ck, cv) in c.iter() {
                    let ckp = format!("{kp}.categories.{}", ck.as_str());
                    let Some(cat) = Category::parse(ck.as_str()) else {
                        self.err_at(line_of(ck.span()), &ckp, "unknown category");
                        continue;
                    };
                    let text = if is_null(cv) {
                        ""
                    } else {
                        cv.as_scalar().map_or("?", |s| s.as_str())
                    };
                    match grant(text) {
                        Ok(g) => {
                            change.categories.insert(cat, g);
                        }
                        Err(e) => self.err_at(line_of(cv.span()), &ckp, e),
                    }
                }
            }
            if let Some(c) = self.mapping(vm, &kp, "channels") {
                for (ck, cv) in c.iter() {
                    let ckp = format!("{kp}.channels.{}", ck.as_str());
                    let Some(ch) = Channel::parse(ck.as_str()) else {
                        self.err_at(line_of(ck.span()), &ckp, "unknown channel");
                        continue;
                    };
                    let text = if is_null(cv) {
                        ""
                    } else {
                        cv.as_scalar().map_or("?", |s| s.as_str())
                    };
                    match grant(text) {
                        Ok(g) => {
                            change.channels.insert(ch, g);
                        }
                        Err(e) => self.err_at(line_of(cv.span()), &ckp, e),
                    }
                }
            }
            out.push((k.as_str().to_string(), change));
        }
        out
    }

    fn sync(&mut self, root: &Map) -> SyncCfg {
        let p = "sync";
        let empty = Map::new_empty(Span::new_blank());
        let m = self.mapping(root, "", p).unwrap_or(&empty);
        self.known(
            m,
            p,
            &[
                "outbox",
                "key_file",
                "max_age",
                "retry_initial",
                "retry_max",
                "parked_retry",
                "targets",
            ],
        );
        let positive = |v: &str| {
            let t = duration(v)?;
            if t.is_zero() {
                Err("must be more than 0s".to_string())
            } else {
                Ok(t)
            }
        };
        let mut targets = Vec::new();
        if let Some(n) = m.get_node("targets").filter(|n| !is_null(n)) {
            match n.as_sequence() {
                None => self.err_at(line_of(n.span()), "sync.targets", "expected a list"),
                Some(seq) => {
                    for (i, item) in seq.iter().enumerate() {
                        if let Some(t) = self.sync_target(i, item) {
                            if targets.iter().any(|x: &SyncTargetCfg| x.name == t.name) {
                                self.err_at(
                                    t.line,
                                    &format!("sync.targets[{i}].name"),
                                    "duplicate target name",
                                );
                            }
                            targets.push(t);
                        }
                    }
                }
            }
        }
        let key_file = self.input_file(m, p, "key_file");
        if !targets.is_empty() && key_file.is_none() {
            self.err_at(
                line_of(m.span()),
                "sync.key_file",
                "required with sync targets (64 hex characters: openssl rand -hex 32); \
                 outbox entries are sealed with it",
            );
        }
        SyncCfg {
            outbox: self.parsed(m, p, "outbox", "var/sync-outbox".into(), path),
            key_file,
            max_age: self.parsed(m, p, "max_age", Duration::from_secs(24 * 3600), positive),
            retry_initial: self.parsed(m, p, "retry_initial", Duration::from_secs(1), positive),
            retry_max: self.parsed(m, p, "retry_max", Duration::from_secs(600), positive),
            parked_retry: self.parsed(m, p, "parked_retry", Duration::from_secs(3600), positive),
            targets,
        }
    }

    fn sync_target(&mut self, i: usize, item: &Node) -> Option<SyncTargetCfg> {
        let p = format!("sync.targets[{i}]");
        let Some(m) = item.as_mapping() else {
            self.err_at(line_of(item.span()), &p, "expected a mapping");
            return None;
        };
        let line = line_of(m.span());
        self.known(
            m,
            &p,
            &[
                "name",
                "type",
                "categories",
                "channels",
                "credentials_file",
                "rate",
                "host",
                "group_id",
                "list_id",
                "on_behalf_of",
                "external_id_prefix",
                "revision",
                "legal_basis",
            ],
        );
        let name = match self.scalar(m, &p, "name") {
            Some((n, _)) if is_label(&n) => n,
            Some((_, l)) => {
                self.err_at(
                    l,
                    &format!("{p}.name"),
                    "letters, digits, '-' and '_' only (it is a metric label)",
                );
                return None;
            }
            None => {
                self.err_at(line, &format!("{p}.name"), "missing");
                return None;
            }
        };
        let kinds: Vec<&str> = SyncKind::ALL.iter().map(|k| k.as_str()).collect();
        let kind = match self.scalar(m, &p, "type") {
            Some((t, l)) => match SyncKind::ALL.into_iter().find(|k| k.as_str() == t) {
                Some(k) => k,
                None => {
                    self.err_at(
                        l,
                        &format!("{p}.type"),
                        format!("expected one of: {}", kinds.join(", ")),
                    );
                    return None;
                }
            },
            None => {
                self.err_at(line, &format!("{p}.type"), "missing");
                return None;
            }
        };
        let categories = self.list(m, &p, "categories", category);
        let channels = self.list(m, &p, "channels", |v| {
            Channel::parse(v).ok_or_else(|| format!("unknown channel {v:?}"))
        });
        if categories.is_empty() && channels.is_empty() {
            self.err_at(
                line,
                &format!("{p}.categories"),
                "a target carries at least one category or channel",
            );
        }
        let credentials_file = self
            .input_file(m, &p, "credentials_file")
            .unwrap_or_else(|| {
                self.err_at(line, &format!("{p}.credentials_file"), "missing (a file)");
                PathBuf::new()
            });
        let text = |r: &mut Reader, key: &str| r.opt_parsed(m, &p, key, |v| Ok(v.to_string()));
        let host = text(self, "host").or_else(|| kind.default_host().map(str::to_string));
        let host = match host {
            Some(h) if h.contains(['/', ' ', '@', '?', '#']) || h.is_empty() => {
                self.err_at(
                    line,
                    &format!("{p}.host"),
                    "expected a host name (no scheme, no path)",
                );
                h
            }
            Some(h) => h.to_ascii_lowercase(),
            None => {
                self.err_at(
                    line,
                    &format!("{p}.host"),
                    "missing (the account's API host, e.g. us21.api.mailchimp.com or \
                     rest.iad-01.braze.com)",
                );
                String::new()
            }
        };
        let group_id = text(self, "group_id");
        let list_id = text(self, "list_id");
        let need = |r: &mut Reader, ok: bool, key: &str| {
            if !ok {
                r.err_at(
                    line,
                    &format!("{p}.{key}"),
                    format!("required for type {}", kind.as_str()),
                );
            }
        };
        match kind {
            SyncKind::SendgridGroup | SyncKind::Hubspot => {
                need(self, group_id.is_some(), "group_id")
            }
            SyncKind::Mailchimp => need(self, list_id.is_some(), "list_id"),
            _ => {}
        }
        let rate = self.parsed(m, &p, "rate", 10.0, |v| {
            v.parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && *r <= 10_000.0)
                .ok_or_else(|| format!("expected requests per second (0 to 10000), got {v:?}"))
        });
        Some(SyncTargetCfg {
            name,
            line,
            kind,
            categories,
            channels,
            credentials_file,
            rate,
            host,
            group_id,
            list_id,
            on_behalf_of: text(self, "on_behalf_of"),
            external_id_prefix: text(self, "external_id_prefix"),
            revision: text(self, "revision"),
            legal_basis: text(self, "legal_basis"),
        })
    }

    /// A list of scalars, each parsed.
    fn list<T: PartialEq>(
        &mut self,
        m: &Map,
        prefix: &str,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        let Some(n) = m.get_node(key).filter(|n| !is_null(n)) else {
            return out;
        };
        let Some(seq) = n.as_sequence() else {
            self.err_at(line_of(n.span()), &join(prefix, key), "expected a list");
            return out;
        };
        for (i, item) in seq.iter().enumerate() {
            match item.as_scalar().map(|s| parse(s.as_str())) {
                Some(Ok(v)) => {
                    if !out.contains(&v) {
                        out.push(v);
                    }
                }
                Some(Err(e)) => {
                    self.err_at(line_of(item.span()), &format!("{prefix}.{key}[{i}]"), e)
                }
                None => self.err_at(
                    line_of(item.span()),
                    &format!("{prefix}.{key}[{i}]"),
                    "expected a single value",
                ),
            }
        }
        out
    }
}

/// A name that can be a metric label value and a file-safe word.
fn is_label(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(c.listen.proxy.port(), 15001);
        assert_eq!(c.max_body_bytes, 8 << 20);
        assert_eq!(c.consent.max_staleness, Duration::from_secs(300));
        assert!(!c.upstream.http2);
        assert_eq!(c.identify.default_region, "US");
    }

    #[test]
    fn identify_default_region_is_two_letters() {
        let c = parse("identify:\n  default_region: gb\n", "t.yaml").unwrap();
        assert_eq!(c.identify.default_region, "GB");
        assert_eq!(c.identify.line, 2);
        assert_eq!(parse("{}", "t.yaml").unwrap().identify.default_region, "US");
        for bad in ["USA", "1", "U1", "U.S."] {
            let errs =
                parse(&format!("identify:\n  default_region: {bad}\n"), "t.yaml").expect_err(bad);
            assert!(
                errs[0]
                    .to_string()
                    .starts_with("t.yaml:2: identify.default_region:"),
                "{}",
                errs[0]
            );
        }
        let errs = parse("identify:\n  region: US\n", "t.yaml").unwrap_err();
        assert!(errs[0].to_string().contains("identify.region: unknown key"));
    }

    #[test]
    fn upstream_http2_is_a_boolean() {
        let c = parse("upstream:\n  http2: true\n", "t.yaml").unwrap();
        assert!(c.upstream.http2);
        let errs = parse("upstream:\n  http2: sometimes\n", "t.yaml").unwrap_err();
        assert!(
            errs[0].to_string().starts_with("t.yaml:2: upstream.http2:"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn upstream_proxy_url_credentials_and_exceptions() {
        assert_eq!(parse("{}", "t.yaml").unwrap().upstream.proxy, None);
        let c = parse(
            "upstream:\n  proxy:\n    url: http://Proxy.Corp:3128\n    no_proxy: [API.Internal, '*.svc.cluster.local']\n",
            "t.yaml",
        )
        .unwrap();
        let p = c.upstream.proxy.unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.no_proxy, ["api.internal", "*.svc.cluster.local"]);
        assert_eq!(p.credentials_file, None);
        for (url, port) in [("http://10.0.0.1:80", 80), ("http://[::1]:8080/", 8080)] {
            let c = parse(
                &format!("upstream:\n  proxy: {{url: \"{url}\"}}\n"),
                "t.yaml",
            )
            .unwrap();
            assert_eq!(c.upstream.proxy.unwrap().port, port, "{url}");
        }
        for (yaml, want) in [
            ("url: https://proxy:3128", "TLS to the proxy itself"),
            ("url: http://user:secret@proxy:3128", "credentials_file"),
            (
                "url: 'http://user:secret@[bad:3128'",
                "a URL with credentials",
            ),
            ("url: http://proxy", "with the port"),
            ("url: http://proxy:3128/path", "nothing after it"),
            ("url: proxy:3128", "http://host:port"),
            ("no_proxy: [x]", "upstream.proxy.url: missing"),
            (
                "url: http://p:1\n    no_proxy: ['a b']",
                "upstream.proxy.no_proxy[0]",
            ),
            ("url: http://p:1\n    no_proxy: x", "expected a list"),
            (
                "url: http://p:1\n    credentials_file: /nonexistent/creds",
                "file not found",
            ),
            (
                "url: http://p:1\n    colour: red",
                "upstream.proxy.colour: unknown key",
            ),
        ] {
            let errs =
                parse(&format!("upstream:\n  proxy:\n    {yaml}\n"), "t.yaml").expect_err(yaml);
            let shown = errs[0].to_string();
            assert!(shown.contains(want), "{yaml}: {shown}");
            assert!(!shown.contains("secret"), "{shown}");
        }
    }

    #[test]
    fn every_error_is_reported_with_key_and_line() {
        let text = "listen:\n  proxy: nope\nunknown_destinations: maybe\nmax_body_bytes: 8 furlongs\ncolour: blue\n";
        let errs = parse(text, "t.yaml").unwrap_err();
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 4, "{shown:#?}");
        assert!(
            shown[0].starts_with("t.yaml:2: listen.proxy:"),
            "{shown:#?}"
        );
        assert!(shown[1].starts_with("t.yaml:3: unknown_destinations:"));
        assert!(shown[2].starts_with("t.yaml:4: max_body_bytes:"));
        assert!(shown[3].starts_with("t.yaml:5: colour: unknown key"));
    }

    #[test]
    fn nats_source_and_replicate_to() {
        let text = "consent:\n  source: nats\n  nats:\n    url: tls://nats.internal:4222\n    bucket: consent_v1\n";
        let c = parse(text, "t.yaml").unwrap();
        assert_eq!(c.consent.source, SourceKind::Nats);
        assert_eq!(c.consent.nats.url, "tls://nats.internal:4222");
        assert_eq!(c.consent.nats.bucket, "consent_v1");
        assert_eq!(c.consent.replicate_to, None);
        let text = "consent:\n  source: file\n  replicate_to: nats\n  nats:\n    url: nats://a:4222, nats://b:4222\n    bucket: c\n";
        let c = parse(text, "t.yaml").unwrap();
        assert_eq!(c.consent.replicate_to, Some(ReplicateTo::Nats));
        for (text, want) in [
            (
                "consent:\n  source: nats\n",
                "t.yaml:2: consent.nats: required",
            ),
            (
                "consent:\n  source: nats\n  nats:\n    url: nats://n:4222\n",
                "t.yaml:4: consent.nats.bucket: required",
            ),
            (
                "consent:\n  source: nats\n  nats:\n    url: http://n:4222\n    bucket: b\n",
                "t.yaml:4: consent.nats.url: expected nats://",
            ),
            (
                "consent:\n  source: nats\n  nats:\n    url: nats://u:pw@n:4222\n    bucket: b\n",
                "t.yaml:4: consent.nats.url: credentials must not be in the URL",
            ),
            (
                "consent:\n  source: nats\n  nats:\n    url: nats://n:4222\n    bucket: a.b\n",
                "t.yaml:5: consent.nats.bucket: expected 1 to 64",
            ),
            (
                "consent:\n  source: nats\n  replicate_to: nats\n  nats:\n    bucket: b\n",
                "t.yaml:3: consent.replicate_to: an instance whose source is nats",
            ),
            (
                "consent:\n  replicate_to: kafka\n",
                "t.yaml:2: consent.replicate_to: expected nats",
            ),
            (
                "consent:\n  source: nats\n  nats:\n    bucket: b\n    credentials_file: /nonexistent/x.creds\n",
                "t.yaml:5: consent.nats.credentials_file: file not found",
            ),
            (
                "consent:\n  source: nats\n  nats:\n    bucket: b\n    owner_admin_url: gateway:15000\n",
                "t.yaml:5: consent.nats.owner_admin_url: expected an http",
            ),
            (
                "consent:\n  source: nats\n  nats:\n    bucket: b\n    tls: true\n",
                "t.yaml:5: consent.nats.tls: unknown key",
            ),
        ] {
            let errs = parse(text, "t.yaml").unwrap_err();
            let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            assert!(shown.iter().any(|e| e.starts_with(want)), "{text}: {shown:?}");
        }
    }

    #[test]
    fn postgres_url_tls_modes_and_inline_password() {
        let text = "consent:\n  source: postgres\n  postgres:\n    url: postgres://u@db/c?sslmode=require\n";
        let c = parse(text, "t.yaml").unwrap();
        assert_eq!(
            c.consent.postgres.sslmode, None,
            "the URL's mode is read at connect"
        );
        let text = "consent:\n  source: postgres\n  postgres:\n    url: postgres://u@db/c?sslmode=prefer\n";
        let shown = parse(text, "t.yaml").unwrap_err()[0].to_string();
        assert!(
            shown.starts_with("t.yaml:4: consent.postgres.url:") && shown.contains("plain text"),
            "{shown}"
        );
        let text = "consent:\n  source: postgres\n  postgres:\n    url: postgres://u@db/c\n    sslmode: sometimes\n";
        let shown = parse(text, "t.yaml").unwrap_err()[0].to_string();
        assert!(
            shown.starts_with("t.yaml:5: consent.postgres.sslmode:"),
            "{shown}"
        );
        let text =
            "consent:\n  source: postgres\n  postgres:\n    url: postgres://u:hunter2@db/c\n";
        let shown = parse(text, "t.yaml").unwrap_err()[0].to_string();
        assert!(
            shown.contains("CONSENTGATE_PG_PASSWORD") && !shown.contains("hunter2"),
            "{shown}"
        );
        let text = "consent:\n  source: postgres\n  postgres:\n    url: postgres://u@db/c?sslmode=disable\n";
        assert_eq!(
            parse(text, "t.yaml").unwrap().consent.source,
            SourceKind::Postgres
        );
    }

    #[test]
    fn audit_max_total_bytes_is_optional_with_a_minimum() {
        let c = parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(c.audit.max_total_bytes, None);
        let c = parse("audit:\n  max_total_bytes: 1GiB\n", "t.yaml").unwrap();
        assert_eq!(c.audit.max_total_bytes, Some(1 << 30));
        let c = parse("audit:\n  max_total_bytes: null\n", "t.yaml").unwrap();
        assert_eq!(c.audit.max_total_bytes, None);
        let errs = parse("audit:\n  max_total_bytes: 1KiB\n", "t.yaml").unwrap_err();
        let text = format!("{errs:?}");
        assert!(
            text.contains("audit.max_total_bytes") && text.contains("64KiB"),
            "{text}"
        );
    }

    #[test]
    fn limits_admin_tls_and_metrics_port() {
        let c = parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.listen.metrics, None);
        assert_eq!(c.admin.tls, None);
        let text = "listen:\n  metrics: 127.0.0.1:9090\nlimits:\n  header_read_timeout: 2s\n  \
                    max_header_bytes: 16KiB\n  inflight_body_bytes: 1GiB\n";
        let c = parse(text, "t.yaml").unwrap();
        assert_eq!(c.listen.metrics, Some(([127, 0, 0, 1], 9090).into()));
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.body_read_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.max_header_bytes, 16 << 10);
        assert_eq!(c.limits.inflight_body_bytes, 1 << 30);
        let text = "max_body_bytes: 8MiB\nlimits:\n  header_read_timeout: 0s\n  \
                    max_header_bytes: 100\n  inflight_body_bytes: 1MiB\n  colour: blue\n";
        let shown: Vec<String> = parse(text, "t.yaml")
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(shown.len(), 4, "{shown:#?}");
        assert!(
            shown[0].starts_with("t.yaml:3: limits.header_read_timeout:"),
            "{shown:#?}"
        );
        assert!(
            shown[1].starts_with("t.yaml:4: limits.max_header_bytes:"),
            "{shown:#?}"
        );
        assert!(
            shown[2].starts_with("t.yaml:5: limits.inflight_body_bytes:")
                && shown[2].contains("max_body_bytes"),
            "{shown:#?}"
        );
        assert!(
            shown[3].starts_with("t.yaml:6: limits.colour: unknown key"),
            "{shown:#?}"
        );
        let text = "admin:\n  tls:\n    key: /nonexistent/key.pem\n    cafile: x\n";
        let shown: Vec<String> = parse(text, "t.yaml")
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            shown.iter().any(|e| e.contains("admin.tls.cert: missing")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|e| e.contains("admin.tls.key: file not found")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|e| e.contains("admin.tls.cafile: unknown key")),
            "{shown:#?}"
        );
    }

    #[test]
    fn webhooks_and_sync_keys_name_key_and_line() {
        let c = parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(c.listen.webhooks, None);
        assert!(c.sync.targets.is_empty() && c.webhooks.vendors.is_empty());
        assert_eq!(
            c.webhooks.replay_retention,
            Duration::from_secs(7 * 24 * 3600)
        );
        let text = "listen:\n  webhooks: 127.0.0.1:8444\nwebhooks:\n  twilio:\n    secret_file: /nonexistent\n    \
                    mapping:\n      stop: {channels: {sms: maybe}}\nsync:\n  targets:\n    - name: bad name\n      \
                    type: sendgrid_global\n      credentials_file: /nonexistent\n    - name: mc\n      type: mailchimp\n      \
                    channels: [email]\n      credentials_file: Cargo.toml\n";
        let shown: Vec<String> = parse(text, "t.yaml")
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        let has = |s: &str| shown.iter().any(|e| e.contains(s));
        assert!(
            has("t.yaml:5: webhooks.twilio.secret_file: file not found"),
            "{shown:#?}"
        );
        assert!(
            has("webhooks.twilio.mapping.stop.channels.sms: expected denied"),
            "{shown:#?}"
        );
        assert!(
            has("webhooks.public_url: required with twilio"),
            "{shown:#?}"
        );
        assert!(
            has("t.yaml:10: sync.targets[0].name: letters"),
            "{shown:#?}"
        );
        assert!(has("sync.targets[1].host: missing"), "{shown:#?}");
        assert!(
            has("sync.targets[1].list_id: required for type mailchimp"),
            "{shown:#?}"
        );
        assert!(
            has("sync.key_file: required with sync targets"),
            "{shown:#?}"
        );
        let text = "sync:\n  key_file: Cargo.toml\n  targets:\n    - {name: sg, type: sendgrid_group, group_id: \"12\", \
                    categories: [marketing_email], credentials_file: Cargo.toml, rate: 2.5}\n";
        let c = parse(text, "t.yaml").unwrap();
        let t = &c.sync.targets[0];
        assert_eq!(
            (t.kind, t.host.as_str(), t.rate),
            (SyncKind::SendgridGroup, "api.sendgrid.com", 2.5)
        );
        assert_eq!(t.categories, [Category::MarketingEmail]);
    }

    #[test]
    fn durations_that_mean_nothing_at_zero_are_refused_all_at_once() {
        let text = "consent:\n  max_staleness: 0s\nupstream:\n  connect_timeout: 0s\n  \
                    response_timeout: 0ms\n  pool_idle_timeout: 0s\nlimits:\n  \
                    body_read_timeout: 0s\ntelemetry:\n  otlp:\n    endpoint: http://127.0.0.1:4318\n    \
                    timeout: 0s\n";
        let shown: Vec<String> = parse(text, "t.yaml")
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        for key in [
            "t.yaml:2: consent.max_staleness: must be at least 1s",
            "t.yaml:4: upstream.connect_timeout: must be more than 0s",
            "t.yaml:5: upstream.response_timeout: must be more than 0s",
            "t.yaml:6: upstream.pool_idle_timeout: must be more than 0s",
            "t.yaml:8: limits.body_read_timeout: must be more than 0s",
            "t.yaml:12: telemetry.otlp.timeout: must be more than 0s",
        ] {
            assert!(
                shown.iter().any(|s| s.starts_with(key)),
                "{key} not in {shown:#?}"
            );
        }
        assert_eq!(shown.len(), 6, "{shown:#?}");
        let c = parse("consent:\n  max_staleness: 1s\n", "t.yaml").unwrap();
        assert_eq!(c.consent.max_staleness, Duration::from_secs(1));
    }

    #[test]
    fn telemetry_otlp_is_off_unless_an_endpoint_is_set() {
        let c = parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(c.telemetry.otlp, None);
        let errs = parse(
            "telemetry:\n  otlp:\n    endpoint: otel:4318\n    colour: x\n",
            "t.yaml",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        if cfg!(feature = "otlp") {
            let c = parse(
                "telemetry:\n  otlp:\n    endpoint: http://otel:4318\n    service_name: egress-gw\n",
                "t.yaml",
            )
            .unwrap();
            let o = c.telemetry.otlp.unwrap();
            assert_eq!(o.endpoint, "http://otel:4318");
            assert_eq!(o.service_name, "egress-gw");
            assert_eq!(o.timeout, Duration::from_secs(10));
        }
    }

    #[test]
    fn parse_all_keeps_the_config_as_read_with_every_error() {
        let (cfg, errs) = parse_all("listen:\n  proxy: nope\nmax_body_bytes: 1MiB\n", "t.yaml");
        assert_eq!(errs.len(), 1);
        assert_eq!(cfg.unwrap().max_body_bytes, 1 << 20);
        let (cfg, errs) = parse_all("a: [\n", "t.yaml");
        assert!(cfg.is_none() && errs.len() == 1);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(size("8MiB").unwrap(), 8 << 20);
        assert_eq!(size("100").unwrap(), 100);
        assert!(size("0").is_err());
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
    }
}
