//! The simulator's view of the cluster, reduced to what traffic needs, and the parsing of
//! VirtualServices, DestinationRules and HTTPRoutes (as JSON) into it. Pure: no I/O.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// Requests per second for every route of a VirtualService / HTTPRoute (default `--default-rps`).
pub const ANN_RPS: &str = "sim.sluice.dev/rps";
/// Pod annotation: fraction of requests (0..1) answered with an error. Default 0.
pub const ANN_ERROR_RATE: &str = "sim.sluice.dev/error-rate";
/// Pod annotation: mean latency in milliseconds. Default 50.
pub const ANN_LATENCY_MS: &str = "sim.sluice.dev/latency-ms";
/// Pod annotation: the response code of the errors. Default 500.
pub const ANN_ERROR_CODE: &str = "sim.sluice.dev/error-code";
/// Pod label naming the revision (becomes `destination_version`).
pub const LABEL_REVISION: &str = "sluice.dev/pod-template-hash";
/// Fallback revision label (set by the Deployment controller).
pub const LABEL_REVISION_FALLBACK: &str = "pod-template-hash";
/// Pod label naming the workload (becomes `destination_workload`); else the Service name.
pub const LABEL_APP: &str = "app";

pub const DEFAULT_LATENCY_MS: f64 = 50.0;
pub const DEFAULT_ERROR_CODE: u16 = 500;

pub type Labels = BTreeMap<String, String>;

/// Everything one tick looks at.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
    pub destination_rules: Vec<DestinationRule>,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `spec.selector`; empty means "no selector", which selects no pods.
    pub selector: Labels,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// Condition `Ready=True`.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    pub host: String,
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum RouteKind {
    VirtualService,
    HTTPRoute,
}

/// One VirtualService `http[]` entry or one HTTPRoute `rules[]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// Position in `http[]` / `rules[]`.
    pub index: usize,
    /// `http[].name` / `rules[].name`.
    pub route_name: Option<String>,
    pub rps: f64,
    pub destinations: Vec<Destination>,
    /// Things worth knowing in /state (bad annotations, skipped backends, ...).
    pub notes: Vec<String>,
}

impl Route {
    /// Stable identity for accumulators.
    pub fn key(&self) -> String {
        format!(
            "{:?}/{}/{}#{}",
            self.kind, self.namespace, self.name, self.index
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    pub target: Target,
    pub weight: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Istio `destination`: a host (short, `name.ns`, or FQDN) and optional subset.
    Host {
        host: String,
        subset: Option<String>,
    },
    /// Gateway API `backendRef` to a Service.
    Backend { namespace: String, name: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Host { host, subset: None } => write!(f, "{host}"),
            Target::Host {
                host,
                subset: Some(s),
            } => write!(f, "{host}/{s}"),
            Target::Backend { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

/// The metadata the parsers need.
pub struct Meta<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub annotations: &'a Labels,
}

/// Requests per second from the `sim.sluice.dev/rps` annotation, else `default_rps`.
fn route_rps(meta: &Meta, default_rps: f64, notes: &mut Vec<String>) -> f64 {
    match meta.annotations.get(ANN_RPS) {
        None => default_rps,
        Some(raw) => match raw.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => v,
            _ => {
                notes.push(format!(
                    "annotation {ANN_RPS}={raw:?} is not a number >= 0; using {default_rps}"
                ));
                default_rps
            }
        },
    }
}

fn weight_of(v: &Value) -> Option<u64> {
    let w = v.get("weight")?;
    if let Some(u) = w.as_u64() {
        Some(u)
    } else if let Some(i) = w.as_i64() {
        Some(i.max(0) as u64)
    } else {
        w.as_f64().map(|f| f.max(0.0) as u64)
    }
}

fn str_field<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// `http[]` of a VirtualService spec. A single destination without a weight gets 100; with
/// several, a missing weight is 0 (Istio requires them to be set).
pub fn parse_virtual_service(meta: &Meta, spec: &Value, default_rps: f64) -> Vec<Route> {
    let mut base_notes = Vec::new();
    let rps = route_rps(meta, default_rps, &mut base_notes);
    let Some(http) = spec.get("http").and_then(Value::as_array) else {
        return Vec::new();
    };
    http.iter()
        .enumerate()
        .map(|(index, h)| {
            let mut notes = base_notes.clone();
            let dests = h.get("route").and_then(Value::as_array);
            let dests: &[Value] = dests.map(Vec::as_slice).unwrap_or(&[]);
            let single = dests.len() == 1;
            let destinations = dests
                .iter()
                .filter_map(|d| {
                    let dest = d.get("destination")?;
                    let Some(host) = str_field(dest, "host") else {
                        notes.push("a destination without host was skipped".into());
                        return None;
                    };
                    let weight = weight_of(d).unwrap_or(if single { 100 } else { 0 });
                    Some(Destination {
                        target: Target::Host {
                            host: host.to_string(),
                            subset: str_field(dest, "subset").map(str::to_string),
                        },
                        weight,
                    })
                })
                .collect::<Vec<_>>();
            if destinations.is_empty() {
                notes.push("no route destinations (redirect / directResponse?): no traffic".into());
            }
            Route {
                kind: RouteKind::VirtualService,
                namespace: meta.namespace.to_string(),
                name: meta.name.to_string(),
                index,
                route_name: str_field(h, "name").map(str::to_string),
                rps,
                destinations,
                notes,
            }
        })
        .collect()
}

/// `rules[]` of an HTTPRoute spec. `backendRefs[].weight` defaults to 1; only Service
/// backends (core group, kind Service) are simulated.
pub fn parse_http_route(meta: &Meta, spec: &Value, default_rps: f64) -> Vec<Route> {
    let mut base_notes = Vec::new();
    let rps = route_rps(meta, default_rps, &mut base_notes);
    let Some(rules) = spec.get("rules").and_then(Value::as_array) else {
        return Vec::new();
    };
    rules
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            let mut notes = base_notes.clone();
            let refs = rule.get("backendRefs").and_then(Value::as_array);
            let refs: &[Value] = refs.map(Vec::as_slice).unwrap_or(&[]);
            let destinations = refs
                .iter()
                .filter_map(|b| {
                    let group = str_field(b, "group").unwrap_or("");
                    let kind = str_field(b, "kind").unwrap_or("Service");
                    let name = str_field(b, "name")?;
                    if !group.is_empty() || kind != "Service" {
                        notes.push(format!(
                            "backendRef {group}/{kind} {name} is not a Service: skipped"
                        ));
                        return None;
                    }
                    Some(Destination {
                        target: Target::Backend {
                            namespace: str_field(b, "namespace")
                                .unwrap_or(meta.namespace)
                                .to_string(),
                            name: name.to_string(),
                        },
                        weight: weight_of(b).unwrap_or(1),
                    })
                })
                .collect::<Vec<_>>();
            if destinations.is_empty() {
                notes.push("no Service backendRefs: no traffic".into());
            }
            Route {
                kind: RouteKind::HTTPRoute,
                namespace: meta.namespace.to_string(),
                name: meta.name.to_string(),
                index,
                route_name: str_field(rule, "name").map(str::to_string),
                rps,
                destinations,
                notes,
            }
        })
        .collect()
}

fn labels_of(v: Option<&Value>) -> Labels {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A DestinationRule spec: `host` and `subsets[].{name,labels}`.
pub fn parse_destination_rule(meta: &Meta, spec: &Value) -> Option<DestinationRule> {
    let host = str_field(spec, "host")?;
    let subsets = spec
        .get("subsets")
        .and_then(Value::as_array)
        .map(|subsets| {
            subsets
                .iter()
                .filter_map(|s| {
                    Some(Subset {
                        name: str_field(s, "name")?.to_string(),
                        labels: labels_of(s.get("labels")),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(DestinationRule {
        namespace: meta.namespace.to_string(),
        name: meta.name.to_string(),
        host: host.to_string(),
        subsets,
    })
}

/// The Service `(namespace, name)` an Istio host names: `name`, `name.ns`, `name.ns.svc`, or
/// `name.ns.svc.<cluster domain>`. `None` for hosts outside the cluster and wildcards.
pub fn resolve_host(host: &str, default_namespace: &str) -> Option<(String, String)> {
    if host.is_empty() || host.contains('*') {
        return None;
    }
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [name] => Some((default_namespace.to_string(), name.to_string())),
        [name, ns] => Some((ns.to_string(), name.to_string())),
        [name, ns, "svc", ..] => Some((ns.to_string(), name.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta<'a>(annotations: &'a Labels) -> Meta<'a> {
        Meta {
            namespace: "shop",
            name: "checkout",
            annotations,
        }
    }

    #[test]
    fn hosts_resolve_to_services() {
        let r = |h| resolve_host(h, "shop");
        let want = Some(("shop".to_string(), "checkout".to_string()));
        assert_eq!(r("checkout"), want);
        assert_eq!(r("checkout.shop"), want);
        assert_eq!(r("checkout.shop.svc"), want);
        assert_eq!(r("checkout.shop.svc.cluster.local"), want);
        assert_eq!(
            resolve_host("checkout.other.svc.cluster.local", "shop"),
            Some(("other".to_string(), "checkout".to_string()))
        );
        assert_eq!(r("www.example.com"), None);
        assert_eq!(r("*.shop.svc.cluster.local"), None);
    }

    #[test]
    fn virtual_service_weights_and_defaults() {
        let ann = Labels::from([(ANN_RPS.to_string(), "7.5".to_string())]);
        let spec = json!({"http": [
            {"name": "primary", "route": [
                {"destination": {"host": "checkout", "subset": "stable"}, "weight": 90},
                {"destination": {"host": "checkout", "subset": "canary"}, "weight": 10},
            ]},
            {"route": [{"destination": {"host": "checkout.shop.svc.cluster.local"}}]},
            {"redirect": {"uri": "/x"}},
        ]});
        let routes = parse_virtual_service(&meta(&ann), &spec, 50.0);
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0].rps, 7.5);
        assert_eq!(routes[0].route_name.as_deref(), Some("primary"));
        assert_eq!(
            routes[0]
                .destinations
                .iter()
                .map(|d| d.weight)
                .collect::<Vec<_>>(),
            vec![90, 10]
        );
        assert_eq!(
            routes[0].destinations[1].target,
            Target::Host {
                host: "checkout".into(),
                subset: Some("canary".into())
            }
        );
        assert_eq!(routes[1].destinations[0].weight, 100);
        assert!(routes[2].destinations.is_empty());
        assert_ne!(routes[0].key(), routes[1].key());
    }

    #[test]
    fn bad_rps_annotation_falls_back_with_a_note() {
        let ann = Labels::from([(ANN_RPS.to_string(), "lots".to_string())]);
        let spec = json!({"http": [{"route": [{"destination": {"host": "a"}}]}]});
        let routes = parse_virtual_service(&meta(&ann), &spec, 50.0);
        assert_eq!(routes[0].rps, 50.0);
        assert_eq!(routes[0].notes.len(), 1);
    }

    #[test]
    fn http_route_backend_refs() {
        let ann = Labels::new();
        let spec = json!({"rules": [{"name": "main", "backendRefs": [
            {"name": "checkout-stable", "port": 80},
            {"name": "checkout-canary", "namespace": "other", "weight": 3},
            {"name": "ext", "group": "example.com", "kind": "Thing"},
        ]}]});
        let routes = parse_http_route(&meta(&ann), &spec, 50.0);
        assert_eq!(routes.len(), 1);
        let d = &routes[0].destinations;
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0],
            Destination {
                target: Target::Backend {
                    namespace: "shop".into(),
                    name: "checkout-stable".into()
                },
                weight: 1
            }
        );
        assert_eq!(
            d[1].target,
            Target::Backend {
                namespace: "other".into(),
                name: "checkout-canary".into()
            }
        );
        assert_eq!(d[1].weight, 3);
        assert_eq!(routes[0].notes.len(), 1);
    }

    #[test]
    fn destination_rule_subsets() {
        let ann = Labels::new();
        let spec = json!({"host": "checkout", "subsets": [
            {"name": "stable", "labels": {"sluice.dev/pod-template-hash": "aaa"}},
            {"name": "canary", "labels": {"sluice.dev/pod-template-hash": "bbb"}},
        ]});
        let dr = parse_destination_rule(&meta(&ann), &spec).unwrap();
        assert_eq!(dr.host, "checkout");
        assert_eq!(dr.subsets.len(), 2);
        assert_eq!(dr.subsets[1].labels[LABEL_REVISION], "bbb");
    }
}
