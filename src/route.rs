//! Route: where a request goes (its authority, parsed here) and which
//! destination it is for, with what settings (the built-in catalog plus the
//! config's `destinations:` overrides).

use crate::config::{Config, ConfigError, Mode, OnBlocked, RefusalFormat};
use crate::destinations::common::host_matches;
use crate::destinations::{self, Adapter};
use crate::model::Category;
use crate::refusal::Shape;
use http::request::Parts;
use http::{header, Method};
use std::sync::Arc;

/// One routable destination with its effective settings.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) adapter: Arc<dyn Adapter>,
    pub(crate) mode: Mode,
    pub(crate) on_blocked: OnBlocked,
    /// How its refusals are worded (the vendor's shape unless `refusal_format: plain`).
    pub(crate) refusal_shape: Shape,
    pub(crate) category: Category,
    extra_hosts: Vec<String>,
}

impl Route {
    pub(crate) fn name(&self) -> &str {
        self.adapter.name()
    }
    fn matches(&self, host: &str) -> bool {
        self.adapter.matches_host(host) || self.extra_hosts.iter().any(|h| host_matches(h, host))
    }
}

#[derive(Clone, Default)]
pub(crate) struct Registry {
    routes: Vec<Route>,
}

impl Registry {
    /// The built-ins with the config's overrides applied, plus generic entries.
    pub(crate) fn build(cfg: &Config, file: &str) -> Result<Registry, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut routes: Vec<Route> = destinations::builtins()
            .into_iter()
            .map(|a| Route {
                category: a.default_category(),
                refusal_shape: a.refusal_shape(),
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
            let idx = if let Some(entry) = &d.generic {
                if routes.iter().any(|r| r.name() == d.name) {
                    errors.push(err("a destination with this name already exists".into()));
                    continue;
                }
                match destinations::generic(entry) {
                    Ok(a) => {
                        routes.push(Route {
                            category: a.default_category(),
                            refusal_shape: a.refusal_shape(),
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
            if let Some(f) = d.refusal_format {
                r.refusal_shape = match f {
                    RefusalFormat::Vendor => r.adapter.refusal_shape(),
                    RefusalFormat::Plain => Shape::Plain,
                };
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
    pub(crate) fn route(&self, host: &str, method: &Method, path: &str) -> Option<&Route> {
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
    pub(crate) fn knows_host(&self, host: &str) -> bool {
        self.routes.iter().any(|r| r.matches(host))
    }

    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// Where a request goes upstream (always TLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// How the request reached the proxy.
#[derive(Clone, Debug)]
pub(crate) enum Via {
    /// Plain HTTP on the proxy port: absolute-form or Host header.
    Plain,
    /// Inside an intercepted CONNECT tunnel or on the gateway listener.
    Intercepted { host: String, port: u16 },
}

/// Where a plain request is going: the absolute-form URI's authority, else the
/// Host header (RFC 9112 §3.2.2: the absolute form wins). Always upstream over
/// TLS: to 443 unless an `https` absolute URI names another port.
pub(crate) fn plain_target(parts: &Parts) -> Result<Target, String> {
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str(),
        None => parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .ok_or("no destination host (absolute URI or Host header)")?,
    };
    let (host, port) = split_host_port(authority).ok_or("the destination host is not valid")?;
    let port = match parts.uri.scheme_str() {
        Some("https") => port.unwrap_or(443),
        _ => 443,
    };
    Ok(Target { host, port })
}

/// "Host:port" → ("host", Some(port)); IPv6 literals in brackets are kept.
pub(crate) fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let a = authority.trim();
    if a.is_empty() {
        return None;
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        (format!("[{h}]"), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (a.to_string(), None),
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
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

    #[test]
    fn authority_parsing() {
        assert_eq!(
            split_host_port("Graph.Facebook.com:443"),
            Some(("graph.facebook.com".into(), Some(443)))
        );
        assert_eq!(
            split_host_port("[::1]:8443"),
            Some(("[::1]".into(), Some(8443)))
        );
        assert_eq!(split_host_port("a b"), None);
        assert_eq!(split_host_port("host:notaport"), None);
    }
}
