//! Ad platforms as data. A conversions API is described by an [`AdSpec`]: its
//! hosts, its endpoints and, per endpoint, where the events are and a [`Fields`]
//! table (which fields identify the person, which are stripped on a sale/share
//! opt-out, which can reveal health information, which are hashed on the way
//! out, and how the platform says "limited data use"). [`AdPlatform`] applies
//! any spec with one generic walk; a platform file holds only its tables and
//! the small hooks a table cannot say. Meta keeps its own lazy parser (it is the
//! measured hot path) but reads its [`Fields`] from the same kind of table.
//! Adding an ad platform: docs/ADAPTERS.md.

use super::batch;
use super::common::{self, Hasher};
use super::shapes::Shapes;
use super::{Adapter, BodyError, Enforced, EventApplied, Judge, RequestView, SyntheticOk};
use crate::decide::{Keep, Ldu};
use crate::identify::Identifiers;
use crate::model::{Category, DestKind};
use crate::refusal::Shape;
use http::Method;
use serde_json::Value;

/// The platform's limited-data-use signal, set on a kept event when the
/// patient opted out of sale/share (or GPC applies): the event's JSON, the
/// geography (Meta's; `0/0` when the platform geolocates), and the record of
/// what was set.
pub(crate) type LduHook = fn(&mut Value, Ldu, &mut EventApplied);

/// What limit_sensitive removes besides reducing URLs.
pub(crate) enum Sensitive {
    /// These paths go.
    Remove(&'static [&'static str]),
    /// Every key of `object` but `keep` goes (arbitrary custom keys included).
    KeepOnly {
        object: &'static str,
        keep: &'static [&'static str],
    },
}

/// One endpoint's field tables (dotted paths inside one event; arrays on the
/// way are walked).
pub(crate) struct Fields {
    /// Looked up as emails, phones and external ids (in this order).
    pub(crate) email: &'static [&'static str],
    pub(crate) phone: &'static [&'static str],
    pub(crate) external: &'static [&'static str],
    /// Removed on a sale/share opt-out.
    pub(crate) identity: &'static [&'static str],
    /// An object (dotted path) emptied whole after `identity` on a sale/share
    /// opt-out (every key in it identifies the person, new platform ids included).
    pub(crate) identity_object: Option<&'static str>,
    /// Reduced to scheme://host/ under limit_sensitive.
    pub(crate) urls: &'static [&'static str],
    pub(crate) sensitive: Sensitive,
    /// Plaintext hashed the platform's way on every kept event.
    pub(crate) hashed: &'static [(&'static str, Hasher)],
    /// The platform's limited-data-use signal; `None` when it has none (the
    /// identity is stripped and nothing is invented).
    pub(crate) ldu: Option<LduHook>,
}

/// Where an endpoint's events are.
pub(crate) enum Events {
    /// The array at this key of the top-level object.
    Array(&'static str),
    /// The top-level object is one event.
    Single,
}

/// One inspected endpoint: a POST path, its events and its fields.
pub(crate) struct Endpoint {
    /// Path segments; `*` matches any one segment.
    pub(crate) path: &'static [&'static str],
    pub(crate) events: Events,
    pub(crate) fields: &'static Fields,
}

/// An ad platform's conversions API.
pub(crate) struct AdSpec {
    pub(crate) name: &'static str,
    pub(crate) display_name: &'static str,
    pub(crate) hosts: &'static [&'static str],
    pub(crate) endpoints: &'static [Endpoint],
    pub(crate) synthetic_ok: SyntheticOk,
    /// For README's destination table.
    pub(crate) identifier_fields: &'static str,
    pub(crate) ldu_signal: &'static str,
    /// The platform's error shape for refusals (docs/SDKS.md).
    pub(crate) refusal_shape: Shape,
    /// Query parameters it reads that carry no one's data ([`Adapter::query_params`]).
    pub(crate) query_params: &'static [&'static str],
}

impl AdSpec {
    fn endpoint(&self, method: &Method, path: &str) -> Option<&'static Endpoint> {
        self.endpoints.iter().find(|e| {
            common::post_path_matches(method, path, &|segs| {
                e.path.len() == segs.len()
                    && e.path.iter().zip(segs).all(|(p, s)| *p == "*" || p == s)
            })
        })
    }
}

impl Fields {
    /// The shape rule (SPEC §6) over every identity path of these tables.
    pub(crate) fn shapes(&self) -> Shapes<'static> {
        let paths = [self.email, self.phone, self.external, self.identity];
        let mut all: Vec<&'static str> = Vec::new();
        for p in paths.iter().flat_map(|p| p.iter()) {
            if !all.contains(p) {
                all.push(p);
            }
        }
        Shapes::new(all)
    }

    pub(crate) fn identify(&self, ev: &Value) -> Identifiers {
        let mut ids = Identifiers::new();
        common::collect(ev, self.email, &mut ids, Identifiers::add_email);
        common::collect(ev, self.phone, &mut ids, Identifiers::add_phone);
        common::collect(ev, self.external, &mut ids, Identifiers::add_external);
        ids
    }

    /// SPEC §6 steps 3-5 on one kept event.
    pub(crate) fn apply(&self, ev: &mut Value, keep: &Keep, a: &mut EventApplied) {
        if keep.strip_identity {
            a.strip_with(|s| common::remove_all(ev, self.identity, s));
            if let Some(obj) = self.identity_object {
                let at = obj.split('.').try_fold(&mut *ev, |v, k| v.get_mut(k));
                if let Some(Value::Object(m)) = at {
                    if !m.is_empty() {
                        m.clear();
                        a.ch().fields_stripped.push(format!("{obj}.*"));
                    }
                }
            }
        }
        let ldu = keep.ldu.or(keep.strip_identity.then_some(Ldu {
            country: 0,
            state: 0,
        }));
        if let (Some(l), Some(set)) = (ldu, self.ldu) {
            set(ev, l, a);
        }
        if keep.limit_sensitive {
            a.strip_with(|s| common::reduce_urls(ev, self.urls, s));
            match &self.sensitive {
                Sensitive::Remove(paths) => a.strip_with(|s| common::remove_all(ev, paths, s)),
                Sensitive::KeepOnly { object, keep } => {
                    if let Some(Value::Object(m)) = ev.get_mut(*object) {
                        let before = m.len();
                        m.retain(|k, _| keep.contains(&k.as_str()));
                        if m.len() != before {
                            a.ch().fields_stripped.push(format!("{object}.*"));
                        }
                    }
                }
            }
        }
        a.hash_with(|h| common::hash_all(ev, self.hashed, h));
    }
}

/// Any ad platform described by an [`AdSpec`].
pub(crate) struct AdPlatform(pub &'static AdSpec);

impl Adapter for AdPlatform {
    fn name(&self) -> &str {
        self.0.name
    }
    fn display_name(&self) -> &str {
        self.0.display_name
    }
    fn kind(&self) -> DestKind {
        DestKind::AdPlatform
    }
    fn default_category(&self) -> Category {
        Category::Advertising
    }
    fn matches_host(&self, host: &str) -> bool {
        self.0.hosts.contains(&host)
    }
    fn inspects(&self, method: &Method, path: &str) -> bool {
        self.0.endpoint(method, path).is_some()
    }
    fn enforce(
        &self,
        req: &RequestView<'_>,
        body: &[u8],
        judge: &mut dyn Judge,
    ) -> Result<Enforced, BodyError> {
        let Some(e) = self.0.endpoint(req.method, req.path) else {
            return Err(BodyError::Unreadable("not an inspected endpoint".into()));
        };
        let f = e.fields;
        let shapes = f.shapes();
        let check = |ev: &Value| shapes.check(ev);
        let identify = |ev: &Value| f.identify(ev);
        let apply = |ev: &mut Value, k: &Keep, a: &mut EventApplied| f.apply(ev, k, a);
        match e.events {
            Events::Array(key) => {
                batch::enforce_json_batch_checked(body, key, judge, &check, &identify, &apply)
            }
            Events::Single => {
                let root = common::parse_json(body)?;
                check(&root)?;
                common::enforce_single_value(root, judge, &identify, &apply)
            }
        }
    }
    fn synthetic_ok(&self) -> SyntheticOk {
        self.0.synthetic_ok
    }
    fn identifier_fields(&self) -> &str {
        self.0.identifier_fields
    }
    fn ldu_signal(&self) -> &str {
        self.0.ldu_signal
    }
    fn refusal_shape(&self) -> Shape {
        self.0.refusal_shape
    }
    fn query_params(&self) -> &'static [&'static str] {
        self.0.query_params
    }
}
