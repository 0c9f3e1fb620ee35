//! The process state shared by the listeners: the reloadable runtime (config,
//! routes, policy, upstream client), the consent store and the metrics.

use crate::config::{Config, ConfigError, ConfigSource};
use crate::consent::ConsentStore;
use crate::decide::Policy;
use crate::forward::UpstreamClient;
use crate::metrics::Metrics;
use crate::route::Registry;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Everything a hot reload replaces at once.
pub(crate) struct Runtime {
    pub(crate) config: Config,
    pub(crate) registry: Registry,
    pub(crate) policy: Policy,
    pub(crate) upstream: UpstreamClient,
}

impl Runtime {
    pub(crate) fn build(config: Config, file: &str) -> Result<Runtime, Vec<ConfigError>> {
        let pg = &config.consent.postgres;
        if config.consent.source == crate::config::SourceKind::Postgres {
            if let Err(message) =
                crate::consent::postgres::resolve_tls(&pg.url, pg.sslmode, pg.ca_file.as_deref())
            {
                return Err(vec![ConfigError {
                    file: file.to_string(),
                    line: pg.line,
                    key: "consent.postgres".into(),
                    message,
                }]);
            }
        }
        let id = &config.identify;
        let region = crate::identify::Region::parse(&id.default_region).map_err(|message| {
            vec![ConfigError {
                file: file.to_string(),
                line: id.line,
                key: "identify.default_region".into(),
                message,
            }]
        })?;
        if let Err(current) = crate::identify::install_default_region(region) {
            tracing::warn!(%current, configured = %region,
                "identify.default_region changed; it takes effect on restart only (stored records are hashed in the current one)");
        }
        let registry = Registry::build(&config, file)?;
        let upstream = UpstreamClient::new(&config.upstream).map_err(|e| {
            vec![ConfigError {
                file: file.to_string(),
                line: 0,
                key: "upstream".into(),
                message: e,
            }]
        })?;
        let policy = Policy {
            defaults: config
                .categories
                .iter()
                .map(|(c, v)| (*c, v.default))
                .collect(),
            fail_closed_when_stale: config
                .categories
                .iter()
                .map(|(c, v)| (*c, v.fail_closed_when_stale))
                .collect(),
        };
        Ok(Runtime {
            config,
            registry,
            policy,
            upstream,
        })
    }

    /// Load and build from a source (used at start, by `check` and by reload).
    pub(crate) fn load(source: &ConfigSource) -> Result<Runtime, Vec<ConfigError>> {
        let cfg = source.load()?;
        Runtime::build(cfg, &source.label())
    }
}

pub(crate) struct App {
    pub(crate) runtime: ArcSwap<Runtime>,
    pub(crate) consent: Arc<ConsentStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) source: ConfigSource,
    /// Set once the proxy listener is bound and serving.
    pub(crate) serving: AtomicBool,
    /// Mints and caches the interception certificates (CONNECT and gateway).
    pub(crate) minter: Arc<crate::tls::CertMinter>,
    /// The hash-chained audit trail; every request is recorded before it leaves.
    pub(crate) audit: Arc<crate::audit::AuditWriter>,
    /// Patient pseudonyms for the audit trail and `explain`.
    pub(crate) pseudonyms: Arc<crate::audit::PseudonymKey>,
    /// Request-body bytes held in memory by every listener (`limits.inflight_body_bytes`).
    pub(crate) body_budget: Arc<crate::body::Budget>,
    /// Opt-outs learned from vendor answers (SPEC §13); set by `run` once the
    /// consent writer exists.
    pub(crate) learner: std::sync::OnceLock<Arc<crate::learn::Learner>>,
}

impl App {
    pub(crate) fn new(
        runtime: Runtime,
        consent: Arc<ConsentStore>,
        metrics: Arc<Metrics>,
        source: ConfigSource,
        minter: Arc<crate::tls::CertMinter>,
        audit: Arc<crate::audit::AuditWriter>,
        pseudonyms: Arc<crate::audit::PseudonymKey>,
    ) -> App {
        let m = metrics.clone();
        minter.set_observer(Arc::new(move |d| {
            m.tls_minted_total.inc();
            m.tls_mint_duration.observe(d.as_secs_f64());
        }));
        App {
            minter,
            audit,
            pseudonyms,
            runtime: ArcSwap::from_pointee(runtime),
            consent,
            metrics,
            source,
            serving: AtomicBool::new(false),
            body_budget: crate::body::Budget::new(),
            learner: std::sync::OnceLock::new(),
        }
    }

    /// Re-read the config and swap it in for new requests; on any error the
    /// old runtime keeps serving. Counted in consentgate_config_reloads_total.
    pub(crate) fn reload(&self) -> Result<(), Vec<ConfigError>> {
        match Runtime::load(&self.source) {
            Ok(rt) => {
                let old = self.runtime.load();
                if old.config.listen != rt.config.listen {
                    tracing::warn!("listen addresses changed; they take effect on restart only");
                }
                self.runtime.store(Arc::new(rt));
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["success"])
                    .inc();
                tracing::info!(config = %self.source.label(), "configuration reloaded");
                Ok(())
            }
            Err(errs) => {
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["failure"])
                    .inc();
                for e in &errs {
                    tracing::error!(error = %e, "configuration reload refused");
                }
                Err(errs)
            }
        }
    }

    /// Ready: serving, and (unless configured otherwise) consent is fresh.
    pub(crate) fn ready(&self) -> (bool, &'static str) {
        if !self.serving.load(Ordering::Relaxed) {
            return (false, "not serving yet");
        }
        let rt = self.runtime.load();
        if rt.config.admin.ready_requires_fresh_consent
            && self.consent.is_stale(rt.config.consent.max_staleness)
        {
            return (false, "consent source stale");
        }
        (true, "ready")
    }

    /// Refresh the gauges that are read rather than counted.
    pub(crate) fn refresh_gauges(&self) {
        let m = &self.metrics;
        m.consent_records.set(self.consent.len() as i64);
        m.tls_cert_cache_size.set(self.minter.cache_size() as i64);
        m.consent_source_up.set(i64::from(self.consent.source_up()));
        m.consent_staleness.set(
            self.consent
                .staleness()
                .map(|d| d.as_secs_f64())
                .unwrap_or(f64::INFINITY),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_without_numbering_metadata_refuses_the_runtime_naming_the_line() {
        let cfg = crate::config::parse("identify:\n  default_region: ZZ\n", "t.yaml").unwrap();
        let Err(errs) = Runtime::build(cfg, "t.yaml") else {
            panic!("ZZ must refuse the runtime");
        };
        let shown = errs[0].to_string();
        assert!(
            shown.starts_with("t.yaml:2: identify.default_region:") && shown.contains("ZZ"),
            "{shown}"
        );
    }

    #[test]
    fn a_database_url_and_sslmode_that_disagree_refuse_the_runtime_naming_the_line() {
        let text = "consent:\n  source: postgres\n  postgres:\n    url: postgres://u@db/c?sslmode=require\n    sslmode: verify-full\n";
        let cfg = crate::config::parse(text, "t.yaml").unwrap();
        let Err(errs) = Runtime::build(cfg, "t.yaml") else {
            panic!("a disagreeing sslmode must refuse the runtime");
        };
        let shown = errs[0].to_string();
        assert!(
            shown.starts_with("t.yaml:4: consent.postgres:") && shown.contains("keep one"),
            "{shown}"
        );
    }
}
