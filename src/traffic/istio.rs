//! Istio: VirtualService route weights and DestinationRule subsets.
//!
//! The user owns these objects (they live in git). Sluice edits only what it must: the
//! `weight` of the stable and canary destinations of the routes it manages, and the
//! pod-template-hash label of the two subsets. Everything else is left as it was.

use serde_json::Value;

use super::{
    Cluster, KeptReads, RouterError, Targets, TrafficRouter, TrafficState, agreed,
    destination_rule, locate, point_service, read_pair, replace, service_selects, set_pair,
    virtual_service,
};
use crate::api::rollout::IstioRouting;
use crate::k8s::labels::HASH_LABEL;

/// Where a route's destinations should go: Sluice recognises its two destinations by subset
/// (subset-level routing) or by host (host-level routing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationKey {
    Subset { stable: String, canary: String },
    Host { stable: String, canary: String },
}

/// The routes Sluice manages in a VirtualService spec: by name, or the only one.
fn managed_routes<'a>(
    spec: &'a mut Value,
    names: &[String],
    vs: &str,
) -> Result<Vec<&'a mut Value>, RouterError> {
    let routes = spec
        .get_mut("http")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            RouterError::Misconfigured(format!("VirtualService {vs} has no http routes"))
        })?;
    if names.is_empty() {
        return match routes.len() {
            1 => Ok(routes.iter_mut().collect()),
            n => Err(RouterError::Misconfigured(format!(
                "VirtualService {vs} has {n} http routes: list the ones Sluice manages in virtualService.routes"
            ))),
        };
    }
    for name in names {
        if !routes
            .iter()
            .any(|r| r.get("name").and_then(Value::as_str) == Some(name))
        {
            return Err(RouterError::Misconfigured(format!(
                "VirtualService {vs} has no http route named {name:?}"
            )));
        }
    }
    Ok(routes
        .iter_mut()
        .filter(|r| {
            r.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| names.iter().any(|want| want == n))
        })
        .collect())
}

fn host_matches(host: &str, service: &str) -> bool {
    host == service
        || host
            .strip_prefix(service)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn is_destination(destination: &Value, key: &DestinationKey, stable: bool) -> bool {
    let dest = destination.get("destination");
    match key {
        DestinationKey::Subset {
            stable: s,
            canary: c,
        } => {
            let want = if stable { s } else { c };
            dest.and_then(|d| d.get("subset")).and_then(Value::as_str) == Some(want.as_str())
        }
        DestinationKey::Host {
            stable: s,
            canary: c,
        } => {
            let want = if stable { s } else { c };
            dest.and_then(|d| d.get("host"))
                .and_then(Value::as_str)
                .is_some_and(|h| host_matches(h, want))
        }
    }
}

fn route_label(route: &Value, index: usize) -> String {
    route
        .get("name")
        .and_then(Value::as_str)
        .map_or_else(|| format!("#{index}"), |n| format!("{n:?}"))
}

/// Sets the weights (stable = 100 - canary) in every managed route. Returns whether anything
/// changed.
pub fn set_weights(
    spec: &mut Value,
    names: &[String],
    key: &DestinationKey,
    canary_weight: i32,
    vs: &str,
) -> Result<bool, RouterError> {
    let mut changed = false;
    for (index, route) in managed_routes(spec, names, vs)?.into_iter().enumerate() {
        let label = route_label(route, index);
        let destinations = route
            .get_mut("route")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| {
                RouterError::Misconfigured(format!(
                    "route {label} of VirtualService {vs} has no destinations"
                ))
            })?;
        let stable = destinations
            .iter()
            .position(|d| is_destination(d, key, true));
        let canary = destinations
            .iter()
            .position(|d| is_destination(d, key, false));
        let (Some(stable), Some(canary)) = (stable, canary) else {
            return Err(RouterError::Misconfigured(format!(
                "route {label} of VirtualService {vs} needs a stable and a canary destination ({})",
                describe(key)
            )));
        };
        if destinations.len() != 2 {
            return Err(RouterError::Misconfigured(format!(
                "route {label} of VirtualService {vs} has {} destinations; Sluice manages routes with exactly the stable and the canary one",
                destinations.len()
            )));
        }
        changed |= set_pair(destinations, (stable, canary), canary_weight);
    }
    Ok(changed)
}

/// The canary weight the managed routes carry now. Routes that disagree (someone edited one)
/// read as `None`, which the planner treats as drift to correct.
pub fn read_canary_weight(
    spec: &Value,
    names: &[String],
    key: &DestinationKey,
    vs: &str,
) -> Result<Option<i32>, RouterError> {
    let mut copy = spec.clone();
    let mut weights = Vec::new();
    for route in managed_routes(&mut copy, names, vs)? {
        let destinations = route
            .get("route")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let stable = destinations
            .iter()
            .position(|d| is_destination(d, key, true));
        let canary = destinations
            .iter()
            .position(|d| is_destination(d, key, false));
        let (Some(stable), Some(canary)) = (stable, canary) else {
            return Ok(None);
        };
        weights.push(read_pair(&destinations, (stable, canary), 0));
    }
    Ok(agreed(&weights))
}

fn describe(key: &DestinationKey) -> String {
    match key {
        DestinationKey::Subset { stable, canary } => format!("subsets {stable:?} and {canary:?}"),
        DestinationKey::Host { stable, canary } => format!("hosts {stable:?} and {canary:?}"),
    }
}

/// Points the stable and canary subsets of a DestinationRule spec at their revisions.
/// Returns whether anything changed.
pub fn point_subsets(
    spec: &mut Value,
    stable_subset: &str,
    canary_subset: &str,
    targets: &Targets,
    dr: &str,
) -> Result<bool, RouterError> {
    let subsets = spec
        .get_mut("subsets")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            RouterError::Misconfigured(format!("DestinationRule {dr} has no subsets"))
        })?;
    let mut changed = false;
    for (name, hash) in [
        (stable_subset, &targets.stable),
        (canary_subset, &targets.canary),
    ] {
        let subset = subsets
            .iter_mut()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(name))
            .ok_or_else(|| {
                RouterError::Misconfigured(format!("DestinationRule {dr} has no subset {name:?}"))
            })?;
        let labels = subset
            .as_object_mut()
            .map(|o| {
                o.entry("labels")
                    .or_insert_with(|| Value::Object(Default::default()))
            })
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                RouterError::Misconfigured(format!(
                    "subset {name:?} of DestinationRule {dr} is malformed"
                ))
            })?;
        if labels.get(HASH_LABEL).and_then(Value::as_str) != Some(hash.as_str()) {
            labels.insert(HASH_LABEL.to_string(), Value::from(hash.as_str()));
            changed = true;
        }
    }
    Ok(changed)
}

/// Removes the revision label from every subset that has it. Returns whether anything changed.
pub fn unpin_subsets(spec: &mut Value) -> bool {
    let mut changed = false;
    for subset in spec
        .get_mut("subsets")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(labels) = subset.get_mut("labels").and_then(Value::as_object_mut) {
            changed |= labels.remove(HASH_LABEL).is_some();
        }
    }
    changed
}

/// Whether any subset carries the revision label.
pub fn subsets_pinned(spec: &Value) -> bool {
    spec.get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|s| {
            s.pointer(&format!("/labels/{}", HASH_LABEL.replace('/', "~1")))
                .is_some()
        })
}

/// The revisions the two subsets select now.
pub fn read_subsets(
    spec: &Value,
    stable_subset: &str,
    canary_subset: &str,
) -> (Option<String>, Option<String>) {
    let hash_of = |name: &str| {
        spec.get("subsets")?
            .as_array()?
            .iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(name))?
            .get("labels")?
            .get(HASH_LABEL)?
            .as_str()
            .map(str::to_string)
    };
    (hash_of(stable_subset), hash_of(canary_subset))
}

/// Istio VirtualService (and DestinationRule) router.
pub struct IstioRouter {
    cluster: Cluster,
    namespace: String,
    virtual_services: Vec<(String, String, Vec<String>)>,
    destination_rule: Option<(String, String, String)>,
    services: Option<(String, String)>,
    key: DestinationKey,
    read: KeptReads,
}

impl IstioRouter {
    pub fn new(
        cluster: Cluster,
        namespace: &str,
        istio: &IstioRouting,
        services: Option<(String, String)>,
    ) -> Self {
        let refs = istio.virtual_service.iter().chain(&istio.virtual_services);
        let virtual_services = refs
            .map(|r| {
                let (name, ns) = locate(&r.name, r.namespace.as_deref(), namespace);
                (name, ns, r.routes.clone())
            })
            .collect();
        let destination_rule = istio.destination_rule.as_ref().map(|d| {
            (
                d.name.clone(),
                d.stable_subset.clone(),
                d.canary_subset.clone(),
            )
        });
        let key = match &istio.destination_rule {
            Some(d) => DestinationKey::Subset {
                stable: d.stable_subset.clone(),
                canary: d.canary_subset.clone(),
            },
            None => {
                let (stable, canary) = services.clone().unwrap_or_default();
                DestinationKey::Host { stable, canary }
            }
        };
        Self {
            cluster,
            namespace: namespace.to_string(),
            virtual_services,
            destination_rule,
            services,
            key,
            read: KeptReads::default(),
        }
    }
}

impl TrafficRouter for IstioRouter {
    async fn observe(&self, targets: &Targets) -> Result<TrafficState, RouterError> {
        // The reads are independent: sent together, a reconcile waits for the apiserver once,
        // not once per object (under load each wait is most of what an abort takes).
        let virtual_services = futures::future::try_join_all(self.virtual_services.iter().map(
            |(name, namespace, routes)| async move {
                let vs = self
                    .read
                    .fetch(&self.cluster, &virtual_service(), namespace, name)
                    .await?;
                let spec = vs.data.get("spec").cloned().unwrap_or_default();
                read_canary_weight(&spec, routes, &self.key, &format!("{namespace}/{name}"))
            },
        ));
        let targets_match = async {
            match (&self.destination_rule, &self.services) {
                (Some((name, stable, canary)), _) => {
                    let dr = self
                        .read
                        .fetch(&self.cluster, &destination_rule(), &self.namespace, name)
                        .await?;
                    let spec = dr.data.get("spec").cloned().unwrap_or_default();
                    Ok::<_, RouterError>(
                        read_subsets(&spec, stable, canary)
                            == (Some(targets.stable.clone()), Some(targets.canary.clone())),
                    )
                }
                (None, Some((stable, canary))) => {
                    let (stable, canary) = futures::future::try_join(
                        service_selects(&self.cluster, &self.namespace, stable, &targets.stable),
                        service_selects(&self.cluster, &self.namespace, canary, &targets.canary),
                    )
                    .await?;
                    Ok(stable && canary)
                }
                (None, None) => Ok(true),
            }
        };
        // Both awaited, then the VirtualServices' error first: with two objects missing, the
        // status names the same one every time, not whichever answer came back first.
        let (weights, targets_match) = futures::future::join(virtual_services, targets_match).await;
        let (weights, targets_match) = (weights?, targets_match?);
        let canary_weight = weights
            .first()
            .copied()
            .flatten()
            .filter(|w| weights.iter().all(|x| *x == Some(*w)));
        Ok(TrafficState {
            canary_weight,
            targets_match,
        })
    }

    async fn apply(&self, targets: &Targets, canary_weight: i32) -> Result<(), RouterError> {
        if let Some((name, stable, canary)) = &self.destination_rule {
            let resource = destination_rule();
            let mut dr = self
                .read
                .take_or_fetch(&self.cluster, &resource, &self.namespace, name)
                .await?;
            if let Some(spec) = dr.data.get_mut("spec")
                && point_subsets(
                    spec,
                    stable,
                    canary,
                    targets,
                    &format!("{}/{name}", self.namespace),
                )?
            {
                replace(&self.cluster, &resource, &dr).await?;
            }
        }
        if let Some((stable, canary)) = &self.services {
            point_service(&self.cluster, &self.namespace, stable, &targets.stable).await?;
            point_service(&self.cluster, &self.namespace, canary, &targets.canary).await?;
        }
        for (name, namespace, routes) in &self.virtual_services {
            let resource = virtual_service();
            let mut vs = self
                .read
                .take_or_fetch(&self.cluster, &resource, namespace, name)
                .await?;
            let label = format!("{namespace}/{name}");
            let spec = vs.data.get_mut("spec").ok_or_else(|| {
                RouterError::Misconfigured(format!("VirtualService {label} has no spec"))
            })?;
            if set_weights(spec, routes, &self.key, canary_weight, &label)? {
                replace(&self.cluster, &resource, &vs).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn subset_key() -> DestinationKey {
        DestinationKey::Subset {
            stable: "stable".into(),
            canary: "canary".into(),
        }
    }

    fn vs() -> Value {
        json!({
            "hosts": ["checkout"],
            "http": [
                {"name": "header-route", "match": [{"headers": {"x-canary": {"exact": "1"}}}],
                 "route": [{"destination": {"host": "checkout", "subset": "canary"}}]},
                {"name": "other-host", "route": [{"destination": {"host": "reviews"}, "weight": 100}],
                 "retries": {"attempts": 3}, "timeout": "2s"},
                {"name": "primary", "route": [
                    {"destination": {"host": "checkout", "subset": "stable"}, "weight": 100},
                    {"destination": {"host": "checkout", "subset": "canary"}, "weight": 0}]}
            ]
        })
    }

    #[test]
    fn sets_only_the_two_weights_of_the_named_route() {
        let mut spec = vs();
        let before = spec.clone();
        assert!(
            set_weights(
                &mut spec,
                &["primary".into()],
                &subset_key(),
                25,
                "shop/checkout"
            )
            .unwrap()
        );
        assert_eq!(spec["http"][2]["route"][0]["weight"], 75);
        assert_eq!(spec["http"][2]["route"][1]["weight"], 25);
        // Every other route is exactly as it was.
        assert_eq!(spec["http"][0], before["http"][0]);
        assert_eq!(spec["http"][1], before["http"][1]);
        assert_eq!(spec["hosts"], before["hosts"]);
        assert_eq!(
            read_canary_weight(&spec, &["primary".into()], &subset_key(), "vs").unwrap(),
            Some(25)
        );
        // Idempotent.
        assert!(!set_weights(&mut spec, &["primary".into()], &subset_key(), 25, "vs").unwrap());
    }

    #[test]
    fn a_single_route_needs_no_name_several_do() {
        let mut single = json!({"http": [{"route": [
            {"destination": {"host": "payments-stable.shop.svc.cluster.local"}, "weight": 100},
            {"destination": {"host": "payments-canary"}, "weight": 0}]}]});
        let key = DestinationKey::Host {
            stable: "payments-stable".into(),
            canary: "payments-canary".into(),
        };
        assert!(set_weights(&mut single, &[], &key, 10, "vs").unwrap());
        assert_eq!(single["http"][0]["route"][0]["weight"], 90);
        let err = set_weights(&mut vs(), &[], &subset_key(), 10, "shop/checkout").unwrap_err();
        assert!(err.to_string().contains("has 3 http routes"), "{err}");
    }

    #[test]
    fn missing_pieces_are_named() {
        let err = set_weights(
            &mut vs(),
            &["nope".into()],
            &subset_key(),
            10,
            "shop/checkout",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("no http route named \"nope\""),
            "{err}"
        );
        let key = DestinationKey::Subset {
            stable: "stable".into(),
            canary: "preview".into(),
        };
        let err =
            set_weights(&mut vs(), &["primary".into()], &key, 10, "shop/checkout").unwrap_err();
        assert!(
            err.to_string()
                .contains("needs a stable and a canary destination"),
            "{err}"
        );
    }

    #[test]
    fn hosts_match_short_and_qualified_names_only() {
        assert!(host_matches("checkout", "checkout"));
        assert!(host_matches("checkout.shop.svc.cluster.local", "checkout"));
        assert!(!host_matches("checkout-canary", "checkout"));
    }

    #[test]
    fn routes_that_disagree_read_as_drift() {
        let mut spec = json!({"http": [
            {"name": "a", "route": [{"destination": {"host": "h", "subset": "stable"}, "weight": 90},
                                    {"destination": {"host": "h", "subset": "canary"}, "weight": 10}]},
            {"name": "b", "route": [{"destination": {"host": "h", "subset": "stable"}, "weight": 80},
                                    {"destination": {"host": "h", "subset": "canary"}, "weight": 20}]}]});
        let names = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            read_canary_weight(&spec, &names, &subset_key(), "vs").unwrap(),
            None
        );
        set_weights(&mut spec, &names, &subset_key(), 20, "vs").unwrap();
        assert_eq!(
            read_canary_weight(&spec, &names, &subset_key(), "vs").unwrap(),
            Some(20)
        );
    }

    #[test]
    fn subsets_get_the_revision_label_and_keep_theirs() {
        let mut dr = json!({"host": "checkout", "subsets": [
            {"name": "stable", "labels": {"app": "checkout"}},
            {"name": "canary", "labels": {"app": "checkout"}, "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}]});
        let targets = Targets {
            stable: "aaa".into(),
            canary: "bbb".into(),
        };
        assert!(point_subsets(&mut dr, "stable", "canary", &targets, "dr").unwrap());
        assert_eq!(
            dr["subsets"][0]["labels"],
            json!({"app": "checkout", HASH_LABEL: "aaa"})
        );
        assert_eq!(dr["subsets"][1]["labels"][HASH_LABEL], "bbb");
        assert_eq!(
            dr["subsets"][1]["trafficPolicy"]["tls"]["mode"],
            "ISTIO_MUTUAL"
        );
        assert_eq!(
            read_subsets(&dr, "stable", "canary"),
            (Some("aaa".into()), Some("bbb".into()))
        );
        assert!(!point_subsets(&mut dr, "stable", "canary", &targets, "dr").unwrap());
        assert!(point_subsets(&mut dr, "stable", "missing", &targets, "dr").is_err());
    }
}
