//! Route: which destination a request is for, and with what settings (the
//! built-in catalog plus the config's `destinations:` overrides).

use crate::config::{Config, ConfigError, DestinationCfg, Mode, OnBlocked};
use crate::destinations::common::host_matches;
use crate::destinations::{self, Adapter};
use crate::model::Category;
use http::Method;
use std::sync::Arc;

/// One routable destination with its effective settings.
#[derive(Clone)]
pub struct Route {
    pub adapter: Arc<dyn Adapter>,
    pub mode: Mode,
    pub on_blocked: OnBlocked,
    pub category: Category,
    pub extra_hosts: Vec<String>,
}

impl Route {
    pub fn name(&self) -> &str {
        self.adapter.name()
    }
    fn matches(&self, host: &str) -> bool {
        self.adapter.matches_host(host) || self.extra_hosts.iter().any(|h| host_matches(h, host))
    }
}

#[derive(Clone, Default)]
pub struct Registry {
    routes: Vec<Route>,
}

/// Builds a configured destination (`type: generic`) from its config entry.
pub type GenericBuilder = fn(&DestinationCfg) -> Result<Arc<dyn Adapter>, String>;

impl Registry {
    /// The built-ins with the config's overrides applied, plus generic entries.
    pub fn build(cfg: &Config, file: &str) -> Result<Registry, Vec<ConfigError>> {
        Self::build_with(
            cfg,
            file,
            destinations::builtins(),
            destinations::generic_builder(),
        )
    }

    pub fn build_with(
        cfg: &Config,
        file: &str,
        builtins: Vec<Arc<dyn Adapter>>,
        generic: Option<GenericBuilder>,
    ) -> Result<Registry, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut routes: Vec<Route> = builtins
            .into_iter()
            .map(|a| Route {
                category: a.default_category(),
                adapter: a,
                mode: Mode::Enforce,
                on_blocked: OnBlocked::Error,
                extra_hosts: Vec::new(),
            })
            .collect();
        for d in &cfg.destinations {
            let err = |message: String| ConfigError {
                file: file.to_string(),
                line: d.line,
                key: format!("destinations.{}", d.name),
                message,
            };
            let idx = if d.generic.is_some() {
                if routes.iter().any(|r| r.name() == d.name) {
                    errors.push(err("a destination with this name already exists".into()));
                    continue;
                }
                let Some(build) = generic else {
                    errors.push(err(
                        "generic destinations are not available in this build".into()
                    ));
                    continue;
                };
                match build(d) {
                    Ok(a) => {
                        routes.push(Route {
                            category: a.default_category(),
                            adapter: a,
                            mode: Mode::Enforce,
                            on_blocked: OnBlocked::Error,
                            extra_hosts: Vec::new(),
                        });
                        routes.len() - 1
                    }
                    Err(e) => {
                        errors.push(err(e));
                        continue;
                    }
                }
            } else {
                match routes.iter().position(|r| r.name() == d.name) {
                    Some(i) => i,
                    None => {
                        let known: Vec<&str> = routes.iter().map(|r| r.name()).collect();
                        errors.push(err(format!(
                            "no built-in destination of this name (known: {})",
                            known.join(", ")
                        )));
                        continue;
                    }
                }
            };
            if !d.enabled {
                routes.remove(idx);
                continue;
            }
            let r = &mut routes[idx];
            if let Some(m) = d.mode {
                r.mode = m;
            }
            if let Some(o) = d.on_blocked {
                r.on_blocked = o;
            }
            if let Some(c) = d.category {
                r.category = c;
            }
            r.extra_hosts.extend(d.hosts.iter().cloned());
        }
        if errors.is_empty() {
            Ok(Registry { routes })
        } else {
            Err(errors)
        }
    }

    /// The destination for a request: among those serving the host (lower-case,
    /// no port), the first that inspects this method and path, else the first.
    pub fn route(&self, host: &str, method: &Method, path: &str) -> Option<&Route> {
        let mut first = None;
        for r in self.routes.iter().filter(|r| r.matches(host)) {
            if r.mode != Mode::Passthrough && r.adapter.inspects(method, path) {
                return Some(r);
            }
            first.get_or_insert(r);
        }
        first
    }

    /// Whether any destination serves this host (CONNECT, SNI).
    pub fn knows_host(&self, host: &str) -> bool {
        self.routes.iter().any(|r| r.matches(host))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_host_routes_by_path() {
        let cfg = crate::config::parse(crate::config::EMBEDDED_DEFAULT, "t").unwrap();
        let reg = Registry::build(&cfg, "t").unwrap();
        let sms = reg.route(
            "api.twilio.com",
            &Method::POST,
            "/2010-04-01/Accounts/AC1/Messages.json",
        );
        let voice = reg.route(
            "api.twilio.com",
            &Method::POST,
            "/2010-04-01/Accounts/AC1/Calls.json",
        );
        assert_eq!(sms.map(|r| r.name()), Some("twilio_sms"));
        assert_eq!(voice.map(|r| r.name()), Some("twilio_voice"));
        assert!(reg.route("nowhere.example", &Method::GET, "/").is_none());
        assert!(reg.knows_host("us21.api.mailchimp.com"));
    }
}
