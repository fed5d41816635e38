//! Gateway API: `HTTPRoute` backend weights.
//!
//! The user owns the HTTPRoute. Sluice edits only the `weight` of the stable and canary
//! backendRefs of the rules it manages; matches, filters, other rules and parents stay as
//! they are.

use serde_json::Value;

use super::{
    Cluster, KeptReads, RouterError, Targets, TrafficRouter, TrafficState, agreed, http_route,
    point_service, read_pair, replace, service_selects, set_pair,
};
use crate::api::rollout::GatewayApiRouting;

fn backend_is(backend: &Value, service: &str, route_namespace: &str) -> bool {
    let name = backend.get("name").and_then(Value::as_str);
    let kind = backend
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("Service");
    let namespace = backend
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or(route_namespace);
    name == Some(service) && kind == "Service" && namespace == route_namespace
}

/// The rules Sluice manages: by name, or the only rule that sends to the stable Service.
fn managed_rules<'a>(
    spec: &'a mut Value,
    names: &[String],
    stable: &str,
    namespace: &str,
    route: &str,
) -> Result<Vec<&'a mut Value>, RouterError> {
    let rules = spec
        .get_mut("rules")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| RouterError::Misconfigured(format!("HTTPRoute {route} has no rules")))?;
    if names.is_empty() {
        let sending: Vec<&mut Value> = rules
            .iter_mut()
            .filter(|r| {
                r.get("backendRefs")
                    .and_then(Value::as_array)
                    .is_some_and(|b| b.iter().any(|b| backend_is(b, stable, namespace)))
            })
            .collect();
        return match sending.len() {
            1 => Ok(sending),
            0 => Err(RouterError::Misconfigured(format!(
                "HTTPRoute {route} has no rule sending to Service {stable}"
            ))),
            n => Err(RouterError::Misconfigured(format!(
                "HTTPRoute {route} has {n} rules sending to Service {stable}: list the ones Sluice manages in httpRoute.rules"
            ))),
        };
    }
    for name in names {
        if !rules
            .iter()
            .any(|r| r.get("name").and_then(Value::as_str) == Some(name))
        {
            return Err(RouterError::Misconfigured(format!(
                "HTTPRoute {route} has no rule named {name:?}"
            )));
        }
    }
    Ok(rules
        .iter_mut()
        .filter(|r| {
            r.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| names.iter().any(|want| want == n))
        })
        .collect())
}

/// Services a route's rules send to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backends<'a> {
    pub stable: &'a str,
    pub canary: &'a str,
    pub namespace: &'a str,
}

fn positions(
    refs: &[Value],
    b: &Backends,
    rule: usize,
    route: &str,
) -> Result<(usize, usize), RouterError> {
    let stable = refs
        .iter()
        .position(|r| backend_is(r, b.stable, b.namespace));
    let canary = refs
        .iter()
        .position(|r| backend_is(r, b.canary, b.namespace));
    match (stable, canary) {
        (Some(s), Some(c)) if refs.len() == 2 => Ok((s, c)),
        (Some(_), Some(_)) => Err(RouterError::Misconfigured(format!(
            "rule {rule} of HTTPRoute {route} has {} backendRefs; Sluice manages rules with exactly the stable and the canary Service",
            refs.len()
        ))),
        _ => Err(RouterError::Misconfigured(format!(
            "rule {rule} of HTTPRoute {route} needs backendRefs to Services {:?} and {:?}",
            b.stable, b.canary
        ))),
    }
}

/// Sets stable = 100 - canary and canary weights in every managed rule. Returns whether
/// anything changed.
pub fn set_weights(
    spec: &mut Value,
    names: &[String],
    b: &Backends,
    canary_weight: i32,
    route: &str,
) -> Result<bool, RouterError> {
    let mut changed = false;
    for (index, rule) in managed_rules(spec, names, b.stable, b.namespace, route)?
        .into_iter()
        .enumerate()
    {
        let refs = rule
            .get_mut("backendRefs")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| {
                RouterError::Misconfigured(format!(
                    "rule {index} of HTTPRoute {route} has no backendRefs"
                ))
            })?;
        let (stable, canary) = positions(refs, b, index, route)?;
        changed |= set_pair(refs, (stable, canary), canary_weight);
    }
    Ok(changed)
}

/// The canary weight of the managed rules, `None` when they disagree or do not add up to 100.
pub fn read_canary_weight(
    spec: &Value,
    names: &[String],
    b: &Backends,
    route: &str,
) -> Result<Option<i32>, RouterError> {
    let mut copy = spec.clone();
    let mut weights = Vec::new();
    for (index, rule) in managed_rules(&mut copy, names, b.stable, b.namespace, route)?
        .into_iter()
        .enumerate()
    {
        let refs = rule
            .get("backendRefs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let pair = positions(&refs, b, index, route)?;
        // Gateway API's default weight is 1.
        weights.push(read_pair(&refs, pair, 1));
    }
    Ok(agreed(&weights))
}

/// Gateway API HTTPRoute router (host-level: the two Services select the revisions).
pub struct GatewayApiRouter {
    cluster: Cluster,
    namespace: String,
    route: String,
    rules: Vec<String>,
    stable_service: String,
    canary_service: String,
    read: KeptReads,
}

impl GatewayApiRouter {
    pub fn new(
        cluster: Cluster,
        namespace: &str,
        gateway: &GatewayApiRouting,
        stable_service: String,
        canary_service: String,
    ) -> Self {
        Self {
            cluster,
            namespace: namespace.to_string(),
            route: gateway.http_route.name.clone(),
            rules: gateway.http_route.rules.clone(),
            stable_service,
            canary_service,
            read: KeptReads::default(),
        }
    }

    fn backends(&self) -> Backends<'_> {
        Backends {
            stable: &self.stable_service,
            canary: &self.canary_service,
            namespace: &self.namespace,
        }
    }

    fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.route)
    }
}

impl TrafficRouter for GatewayApiRouter {
    async fn observe(&self, targets: &Targets) -> Result<TrafficState, RouterError> {
        // Independent reads, sent together: one wait for the apiserver instead of three.
        let (route, stable, canary) = futures::future::try_join3(
            self.read
                .fetch(&self.cluster, &http_route(), &self.namespace, &self.route),
            service_selects(
                &self.cluster,
                &self.namespace,
                &self.stable_service,
                &targets.stable,
            ),
            service_selects(
                &self.cluster,
                &self.namespace,
                &self.canary_service,
                &targets.canary,
            ),
        )
        .await?;
        let spec = route.data.get("spec").cloned().unwrap_or_default();
        let canary_weight =
            read_canary_weight(&spec, &self.rules, &self.backends(), &self.label())?;
        Ok(TrafficState {
            canary_weight,
            targets_match: stable && canary,
        })
    }

    async fn apply(&self, targets: &Targets, canary_weight: i32) -> Result<(), RouterError> {
        point_service(
            &self.cluster,
            &self.namespace,
            &self.stable_service,
            &targets.stable,
        )
        .await?;
        point_service(
            &self.cluster,
            &self.namespace,
            &self.canary_service,
            &targets.canary,
        )
        .await?;
        let resource = http_route();
        let mut route = self
            .read
            .take_or_fetch(&self.cluster, &resource, &self.namespace, &self.route)
            .await?;
        let spec = route.data.get_mut("spec").ok_or_else(|| {
            RouterError::Misconfigured(format!("HTTPRoute {} has no spec", self.label()))
        })?;
        if set_weights(
            spec,
            &self.rules,
            &self.backends(),
            canary_weight,
            &self.label(),
        )? {
            replace(&self.cluster, &resource, &route).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const B: Backends = Backends {
        stable: "web-stable",
        canary: "web-canary",
        namespace: "shop",
    };

    fn route() -> Value {
        json!({
            "parentRefs": [{"name": "gw"}],
            "hostnames": ["web.example.com"],
            "rules": [
                {"name": "admin", "matches": [{"path": {"type": "PathPrefix", "value": "/admin"}}],
                 "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-admin", "value": "1"}]}}],
                 "backendRefs": [{"name": "admin", "port": 80}]},
                {"name": "main",
                 "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-served-by", "value": "web"}]}}],
                 "backendRefs": [{"name": "web-stable", "port": 80, "weight": 100}, {"name": "web-canary", "port": 80, "weight": 0}]}
            ]
        })
    }

    #[test]
    fn sets_only_the_two_backend_weights() {
        let mut spec = route();
        let before = spec.clone();
        assert!(set_weights(&mut spec, &[], &B, 30, "shop/web").unwrap());
        assert_eq!(spec["rules"][1]["backendRefs"][0]["weight"], 70);
        assert_eq!(spec["rules"][1]["backendRefs"][1]["weight"], 30);
        assert_eq!(spec["rules"][1]["filters"], before["rules"][1]["filters"]);
        assert_eq!(spec["rules"][0], before["rules"][0]);
        assert_eq!(spec["parentRefs"], before["parentRefs"]);
        assert_eq!(
            read_canary_weight(&spec, &["main".into()], &B, "r").unwrap(),
            Some(30)
        );
        assert!(!set_weights(&mut spec, &["main".into()], &B, 30, "r").unwrap());
    }

    #[test]
    fn missing_rules_and_backends_are_named() {
        let err = set_weights(&mut route(), &["nope".into()], &B, 10, "shop/web").unwrap_err();
        assert!(err.to_string().contains("no rule named \"nope\""), "{err}");
        let other = Backends {
            canary: "web-preview",
            ..B
        };
        let err = set_weights(&mut route(), &[], &other, 10, "shop/web").unwrap_err();
        assert!(
            err.to_string().contains("needs backendRefs to Services"),
            "{err}"
        );
        let lonely = Backends {
            stable: "nobody",
            ..B
        };
        let err = set_weights(&mut route(), &[], &lonely, 10, "shop/web").unwrap_err();
        assert!(
            err.to_string()
                .contains("no rule sending to Service nobody"),
            "{err}"
        );
    }

    #[test]
    fn default_weights_do_not_read_as_a_split() {
        let spec =
            json!({"rules": [{"backendRefs": [{"name": "web-stable"}, {"name": "web-canary"}]}]});
        assert_eq!(read_canary_weight(&spec, &[], &B, "r").unwrap(), None);
    }
}
