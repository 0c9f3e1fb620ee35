//! Every figure an SRE needs, under the SPEC §9 names. Label values are
//! destination names, decisions, reasons, status codes and error kinds: never
//! patient data. The standard `process_*` family is read from /proc at scrape
//! time ([`process`]), so it costs nothing between scrapes.

mod process;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `consentgate_tls_handshake_failures_total{side}`: `client` is an app's handshake
/// with the proxy (CONNECT interception and the gateway), `upstream` the proxy's
/// with the vendor.
const HANDSHAKE_SIDES: [&str; 2] = ["client", "upstream"];
/// `consentgate_tls_handshake_failures_total{reason}`: a fixed set, so the series
/// exist from start and a typo can never mint a new one. `unknown_ca`: the peer
/// does not trust the issuer (on the client side: the app lacks the interception
/// CA; OpenSSL, Python, Node, curl and rustls say so). `bad_certificate`: the
/// peer rejected the certificate for another reason, or without saying why (Go
/// and Java clients that lack the CA land here). `protocol_version`: no common
/// TLS version or cipher. `no_sni` / `invalid_sni`: the ClientHello names no
/// usable host. `eof`: the peer closed mid-handshake. `timeout`: the handshake
/// did not finish in time. `mint_failed`: no certificate could be minted for the
/// host (see `consentgate_tls_mint_failures_total`). `other`: anything else.
pub(crate) const HANDSHAKE_REASONS: [&str; 9] = [
    "unknown_ca",
    "bad_certificate",
    "protocol_version",
    "no_sni",
    "invalid_sni",
    "eof",
    "timeout",
    "mint_failed",
    "other",
];

pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) requests_total: IntCounterVec,
    pub(crate) events_total: IntCounterVec,
    pub(crate) request_duration: HistogramVec,
    pub(crate) upstream_duration: HistogramVec,
    pub(crate) upstream_errors_total: IntCounterVec,
    pub(crate) consent_records: IntGauge,
    pub(crate) consent_source_up: IntGauge,
    pub(crate) consent_staleness: Gauge,
    pub(crate) consent_propagation: Histogram,
    pub(crate) config_reloads_total: IntCounterVec,
    pub(crate) audit_records_total: IntCounter,
    pub(crate) audit_write_failures_total: IntCounter,
    pub(crate) tls_minted_total: IntCounter,
    pub(crate) tls_mint_duration: Histogram,
    pub(crate) tls_cert_cache_size: IntGauge,
    pub(crate) tunnels_total: IntCounter,
    pub(crate) guard_interventions_total: IntCounterVec,
    pub(crate) connections_open: IntGauge,
    /// SPEC §13: opt-outs learned from vendors (egress answers and webhooks).
    pub(crate) optouts_learned_total: IntCounterVec,
    /// Webhook requests by vendor and result (`ok`, `bad_signature`, ...).
    pub(crate) webhook_requests_total: IntCounterVec,
    /// Webhook events by vendor, signal kind and result (`applied`, `duplicate`, ...).
    pub(crate) webhook_events_total: IntCounterVec,
    pub(crate) sync_deliveries_total: IntCounterVec,
    pub(crate) sync_pending: IntGaugeVec,
    pub(crate) sync_parked: IntGaugeVec,
    pub(crate) sync_lag_seconds: GaugeVec,
    pub(crate) responses_total: IntCounterVec,
    tls_handshake_failures_total: IntCounterVec,
    pub(crate) tls_mint_failures_total: IntCounter,
    build_info: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                // Registration only fails on duplicate names, which this fixed set has not.
                let _ = registry.register(Box::new(m.clone()));
                m
            }};
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let hist_vec = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let hist = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let int_gauge = |name: &str, help: &str| {
            IntGauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let m = Metrics {
            requests_total: reg!(counter_vec(
                "consentgate_requests_total",
                "Requests by destination and decision (allowed, modified, blocked).",
                &["destination", "decision"]
            )),
            events_total: reg!(counter_vec(
                "consentgate_events_total",
                "Events and recipients by destination, decision and reason.",
                &["destination", "decision", "reason"]
            )),
            request_duration: reg!(hist_vec(
                "consentgate_request_duration_seconds",
                "Time spent inside the proxy per request, excluding upstream.",
                &["destination"]
            )),
            upstream_duration: reg!(hist_vec(
                "consentgate_upstream_duration_seconds",
                "Time from sending upstream to response headers.",
                &["destination"]
            )),
            upstream_errors_total: reg!(counter_vec(
                "consentgate_upstream_errors_total",
                "Upstream failures by destination and kind (connect, tls, timeout, reset, protocol).",
                &["destination", "kind"]
            )),
            consent_records: reg!(int_gauge("consentgate_consent_records", "Consent records in the cache.")),
            consent_source_up: reg!(int_gauge(
                "consentgate_consent_source_up",
                "1 when the consent source is connected and healthy."
            )),
            consent_staleness: reg!(Gauge::new(
                "consentgate_consent_staleness_seconds",
                "Seconds since the consent source was last known good."
            )
            .unwrap_or_else(|e| panic!("staleness: {e}"))),
            consent_propagation: reg!(hist(
                "consentgate_consent_propagation_seconds",
                "From a consent change at the source to its enforcement in the cache."
            )),
            config_reloads_total: reg!(counter_vec(
                "consentgate_config_reloads_total",
                "Config loads and reloads by result (success, failure).",
                &["result"]
            )),
            audit_records_total: reg!(counter(
                "consentgate_audit_records_total",
                "Audit records written."
            )),
            audit_write_failures_total: reg!(counter(
                "consentgate_audit_write_failures_total",
                "Audit records that could not be written (requests fail closed)."
            )),
            tls_minted_total: reg!(counter(
                "consentgate_tls_certificates_minted_total",
                "Interception certificates minted."
            )),
            tls_mint_duration: reg!(hist(
                "consentgate_tls_mint_duration_seconds",
                "Time to mint one interception certificate."
            )),
            tls_cert_cache_size: reg!(int_gauge(
                "consentgate_tls_certificate_cache_size",
                "Minted certificates held in the cache."
            )),
            guard_interventions_total: reg!(counter_vec(
                "consentgate_guard_interventions_total",
                "What the egress guard did, by destination and reason (foreign_identifier: an \
                 event dropped; foreign_identifier_outside_events: a request refused; \
                 unknown_contact_removed: a field removed).",
                &["destination", "reason"]
            )),
            tunnels_total: reg!(counter(
                "consentgate_tunnels_total",
                "CONNECT tunnels passed through blind to unknown destinations."
            )),
            connections_open: reg!(int_gauge(
                "consentgate_connections_open",
                "Client connections currently open on the proxy listeners."
            )),
            optouts_learned_total: reg!(counter_vec(
                "consentgate_optouts_learned_total",
                "Opt-outs learned from vendors (egress answers such as Twilio 21610, and webhooks), by vendor and kind.",
                &["vendor", "kind"]
            )),
            webhook_requests_total: reg!(counter_vec(
                "consentgate_webhook_requests_total",
                "Webhook requests by vendor and result (ok, bad_signature, bad_request, not_found, error).",
                &["vendor", "result"]
            )),
            webhook_events_total: reg!(counter_vec(
                "consentgate_webhook_events_total",
                "Webhook events by vendor, signal kind and result (applied, unchanged, duplicate, unknown_person, ignored).",
                &["vendor", "kind", "result"]
            )),
            sync_deliveries_total: reg!(counter_vec(
                "consentgate_sync_deliveries_total",
                "Sync outbox delivery attempts by target and result (delivered, retry, rejected, parked, no_address, superseded).",
                &["target", "result"]
            )),
            sync_pending: reg!(IntGaugeVec::new(
                Opts::new(
                    "consentgate_sync_pending",
                    "Entries in the sync outbox not yet delivered (parked ones included), by target."
                ),
                &["target"]
            )
            .unwrap_or_else(|e| panic!("sync_pending: {e}"))),
            sync_parked: reg!(IntGaugeVec::new(
                Opts::new(
                    "consentgate_sync_parked",
                    "Sync outbox entries past sync.max_age (parked: retried every sync.parked_retry), by target."
                ),
                &["target"]
            )
            .unwrap_or_else(|e| panic!("sync_parked: {e}"))),
            sync_lag_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "consentgate_sync_lag_seconds",
                    "Age of the oldest undelivered entry in the sync outbox, by target (0: none)."
                ),
                &["target"]
            )
            .unwrap_or_else(|e| panic!("sync_lag: {e}"))),
            responses_total: reg!(counter_vec(
                "consentgate_responses_total",
                "Answers the apps received, by destination, HTTP status code and error \
                 (the refusal or upstream error code; empty when the upstream answered).",
                &["destination", "code", "error"]
            )),
            tls_handshake_failures_total: reg!(counter_vec(
                "consentgate_tls_handshake_failures_total",
                "Failed TLS handshakes by side (client: app to proxy; upstream: proxy to \
                 vendor) and reason.",
                &["side", "reason"]
            )),
            tls_mint_failures_total: reg!(counter(
                "consentgate_tls_mint_failures_total",
                "Interception certificates that could not be minted."
            )),
            build_info: reg!(IntGaugeVec::new(
                Opts::new(
                    "consentgate_build_info",
                    "Always 1; the version label says which build is running."
                ),
                &["version"]
            )
            .unwrap_or_else(|e| panic!("build_info: {e}"))),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every handshake-failure series from start: a rate over a series that
        // appears with its first failure misses that failure.
        for side in HANDSHAKE_SIDES {
            for reason in HANDSHAKE_REASONS {
                m.tls_handshake_failures_total
                    .with_label_values(&[side, reason])
                    .inc_by(0);
            }
        }
        let _ = m
            .registry
            .register(Box::new(process::ProcessCollector::new()));
        m
    }

    /// Create the per-destination series that count failures and
    /// interventions, so each has a value (0) before the first one happens:
    /// `upstream_errors_total` for every destination and kind,
    /// `guard_interventions_total` for every destination and reason. Called at
    /// start and after a reload (a new destination); existing values are kept.
    pub(crate) fn init_destinations<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for dest in names {
            for kind in upstream_error_kinds() {
                self.upstream_errors_total
                    .with_label_values(&[dest, kind.as_str()])
                    .inc_by(0);
            }
            for reason in crate::guard::Reason::ALL {
                self.guard_interventions_total
                    .with_label_values(&[dest, reason.as_str()])
                    .inc_by(0);
            }
        }
    }

    /// Count one failed TLS handshake (`side` and `reason` from the fixed sets above).
    pub(crate) fn handshake_failed(&self, side: &str, reason: &str) {
        self.tls_handshake_failures_total
            .with_label_values(&[side, reason])
            .inc();
    }

    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Every `consentgate_upstream_errors_total{kind}`.
fn upstream_error_kinds() -> [crate::forward::UpstreamErrorKind; 5] {
    use crate::forward::UpstreamErrorKind as K;
    // Exhaustive on purpose: a new kind does not compile until it is listed here.
    let _listed = |k: K| match k {
        K::Connect | K::Tls | K::Timeout | K::Reset | K::Protocol => (),
    };
    [K::Connect, K::Tls, K::Timeout, K::Reset, K::Protocol]
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
