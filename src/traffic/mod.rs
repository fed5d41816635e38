//! Traffic routers: how a Rollout's canary weight reaches the mesh or gateway.
//!
//! One trait, one file per router. A router points the stable and canary destinations at
//! their revisions, sets the canary weight, and reads both back so the planner can verify
//! what it wrote and notice when someone else changed it (drift).

pub mod cache;
pub mod gateway_api;
pub mod istio;

pub use cache::{Cluster, RoutingCache};
pub use gateway_api::GatewayApiRouter;
pub use istio::IstioRouter;

use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::api::rollout::{CanaryStrategy, RolloutStrategy, TrafficRouting};
use crate::k8s::labels::HASH_LABEL;

/// The revisions the stable and canary destinations must select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    pub stable: String,
    pub canary: String,
}

/// What a router found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficState {
    /// The canary weight, or `None` when the managed routes disagree or are not 100 in total.
    pub canary_weight: Option<i32>,
    /// Whether the destinations select the target revisions.
    pub targets_match: bool,
}

/// Why routing failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The user's routing objects are missing or do not have the expected shape.
    #[error("{0}")]
    Misconfigured(String),
    /// Someone else wrote the object between our read and our write; retried next reconcile.
    #[error("{0} changed while Sluice was updating it; retrying")]
    Conflict(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// A traffic router.
pub trait TrafficRouter {
    /// Reads the current weight and where the destinations point.
    fn observe(
        &self,
        targets: &Targets,
    ) -> impl Future<Output = Result<TrafficState, RouterError>> + Send;
    /// Points the destinations at `targets` first, then sets the canary weight, so traffic
    /// never reaches a revision it should not.
    fn apply(
        &self,
        targets: &Targets,
        canary_weight: i32,
    ) -> impl Future<Output = Result<(), RouterError>> + Send;
}

/// The router a Rollout asks for.
pub enum Router {
    Istio(IstioRouter),
    GatewayApi(GatewayApiRouter),
}

impl Router {
    /// The router a Rollout's strategy configures, if any: for blue-green the active and
    /// preview Services play the stable and canary parts.
    pub fn for_strategy(
        cluster: &Cluster,
        namespace: &str,
        strategy: &RolloutStrategy,
    ) -> Option<Self> {
        match (&strategy.canary, &strategy.blue_green) {
            (Some(canary), _) => Self::for_canary(cluster, namespace, canary),
            (None, Some(bg)) => {
                let services = bg
                    .preview_service
                    .clone()
                    .map(|preview| (bg.active_service.clone(), preview));
                Self::new(cluster, namespace, bg.traffic_routing.as_ref()?, services)
            }
            (None, None) => None,
        }
    }

    /// The router configured in a canary strategy, if any.
    pub fn for_canary(cluster: &Cluster, namespace: &str, canary: &CanaryStrategy) -> Option<Self> {
        let services = canary
            .stable_service
            .clone()
            .zip(canary.canary_service.clone());
        Self::new(
            cluster,
            namespace,
            canary.traffic_routing.as_ref()?,
            services,
        )
    }

    /// A router over `routing`, with the two Services (stable/canary, or active/preview) that
    /// host-level routing points at the revisions.
    pub fn new(
        cluster: &Cluster,
        namespace: &str,
        routing: &TrafficRouting,
        services: Option<(String, String)>,
    ) -> Option<Self> {
        if let Some(istio) = &routing.istio {
            return Some(Router::Istio(IstioRouter::new(
                cluster.clone(),
                namespace,
                istio,
                services,
            )));
        }
        let gateway = routing.gateway_api.as_ref()?;
        let (stable, canary) = services?;
        Some(Router::GatewayApi(GatewayApiRouter::new(
            cluster.clone(),
            namespace,
            gateway,
            stable,
            canary,
        )))
    }

    pub async fn observe(&self, targets: &Targets) -> Result<TrafficState, RouterError> {
        match self {
            Router::Istio(r) => r.observe(targets).await,
            Router::GatewayApi(r) => r.observe(targets).await,
        }
    }

    pub async fn apply(&self, targets: &Targets, canary_weight: i32) -> Result<(), RouterError> {
        match self {
            Router::Istio(r) => r.apply(targets, canary_weight).await,
            Router::GatewayApi(r) => r.apply(targets, canary_weight).await,
        }
    }
}

fn gvk(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

/// The kinds Sluice routes through: VirtualServices,
pub fn virtual_service() -> ApiResource {
    gvk("networking.istio.io", "v1", "VirtualService")
}

/// DestinationRules,
pub fn destination_rule() -> ApiResource {
    gvk("networking.istio.io", "v1", "DestinationRule")
}

/// HTTPRoutes,
pub fn http_route() -> ApiResource {
    gvk("gateway.networking.k8s.io", "v1", "HTTPRoute")
}

/// and Services.
fn service_resource() -> ApiResource {
    ApiResource::erase::<Service>(&())
}

/// Where a VirtualService reference points: `(name, namespace)`. An explicit namespace wins;
/// otherwise a name with exactly one dot is the short form `name.namespace`; any other name
/// (none, or several dots) is a name in the Rollout's own namespace.
pub fn locate(name: &str, namespace: Option<&str>, own: &str) -> (String, String) {
    if let Some(namespace) = namespace {
        return (name.to_string(), namespace.to_string());
    }
    match name.split_once('.') {
        Some((short, namespace)) if !namespace.contains('.') => {
            (short.to_string(), namespace.to_string())
        }
        _ => (name.to_string(), own.to_string()),
    }
}

/// Reads a routing object, or says which one is missing.
async fn fetch(
    cluster: &Cluster,
    resource: &ApiResource,
    namespace: &str,
    name: &str,
) -> Result<DynamicObject, RouterError> {
    cluster
        .read(resource, namespace, name)
        .await?
        .ok_or_else(|| {
            RouterError::Misconfigured(format!("{} {namespace}/{name} not found", resource.kind))
        })
}

/// The routing objects a router read while observing, handed to its writes in the same
/// reconcile instead of being read again (a fresh read is a round trip through the
/// apiserver's queue). A copy that went stale in between is safe: the write carries its
/// `resourceVersion`, the apiserver refuses it as a conflict, and the retry reads afresh.
#[derive(Default)]
struct KeptReads(std::sync::Mutex<std::collections::HashMap<String, DynamicObject>>);

impl KeptReads {
    /// Reads a routing object and keeps a copy for [`KeptReads::take_or_fetch`].
    async fn fetch(
        &self,
        cluster: &Cluster,
        resource: &ApiResource,
        namespace: &str,
        name: &str,
    ) -> Result<DynamicObject, RouterError> {
        let object = fetch(cluster, resource, namespace, name).await?;
        self.copies()
            .insert(cache::key(&resource.kind, namespace, name), object.clone());
        Ok(object)
    }

    /// The copy read while observing, once (a second write reads again), else a fresh read.
    async fn take_or_fetch(
        &self,
        cluster: &Cluster,
        resource: &ApiResource,
        namespace: &str,
        name: &str,
    ) -> Result<DynamicObject, RouterError> {
        let kept = self
            .copies()
            .remove(&cache::key(&resource.kind, namespace, name));
        match kept {
            Some(object) => Ok(object),
            None => fetch(cluster, resource, namespace, name).await,
        }
    }

    fn copies(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, DynamicObject>> {
        // The map holds plain copies: one left by a panicking holder is still a valid copy.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes a routing object back with Sluice's field manager; a conflict (someone wrote it
/// since our read) is retried by the next reconcile.
async fn replace(
    cluster: &Cluster,
    resource: &ApiResource,
    object: &DynamicObject,
) -> Result<(), RouterError> {
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let api = Api::<DynamicObject>::namespaced_with(cluster.client.clone(), &namespace, resource);
    let params = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.replace(&name, &params, object).await {
        Ok(written) => {
            cluster.wrote_route(&resource.kind, object.resource_version(), &written);
            Ok(())
        }
        Err(e) if crate::k8s::is_conflict(&e) => {
            cluster.distrust(&resource.kind, &namespace, &name);
            Err(RouterError::Conflict(format!(
                "{} {namespace}/{name}",
                resource.kind
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets the weights of the stable and the canary entry of one route (stable = 100 - canary).
/// Returns whether anything changed. Both routers share it: a route is two weights.
fn set_pair(entries: &mut [Value], (stable, canary): (usize, usize), canary_weight: i32) -> bool {
    let mut changed = false;
    for (i, weight) in [(stable, 100 - canary_weight), (canary, canary_weight)] {
        if entries[i].get("weight").and_then(Value::as_i64) != Some(i64::from(weight)) {
            entries[i]["weight"] = Value::from(weight);
            changed = true;
        }
    }
    changed
}

/// The canary weight of one route's two entries, `None` unless they add up to 100.
/// `default` is the weight of an entry that states none (it differs between APIs).
fn read_pair(entries: &[Value], (stable, canary): (usize, usize), default: i64) -> Option<i32> {
    let weight = |i: usize| {
        entries[i]
            .get("weight")
            .and_then(Value::as_i64)
            .unwrap_or(default)
    };
    let (s, c) = (weight(stable), weight(canary));
    (s + c == 100).then(|| i32::try_from(c).ok()).flatten()
}

/// One weight for all managed routes, `None` when they disagree (someone edited one).
fn agreed(weights: &[Option<i32>]) -> Option<i32> {
    let first = weights.first().copied().flatten()?;
    weights.iter().all(|w| *w == Some(first)).then_some(first)
}

/// Whether a DestinationRule still carries the revision label (`None`: it does not exist).
pub async fn destination_rule_pinned(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
) -> Result<Option<bool>, RouterError> {
    Ok(cluster
        .read(&destination_rule(), namespace, name)
        .await?
        .map(|dr| istio::subsets_pinned(dr.data.get("spec").unwrap_or(&Value::Null))))
}

/// Takes the revision label back from an object the Rollout no longer routes through: the
/// DestinationRule's subsets, or the Service's selector key. A missing object is fine.
pub async fn release(
    cluster: &Cluster,
    namespace: &str,
    kind: &str,
    name: &str,
) -> Result<(), RouterError> {
    match kind {
        "DestinationRule" => {
            let resource = destination_rule();
            let Some(mut dr) = cluster.read(&resource, namespace, name).await? else {
                return Ok(());
            };
            if let Some(spec) = dr.data.get_mut("spec")
                && istio::unpin_subsets(spec)
            {
                replace(cluster, &resource, &dr).await?;
            }
            Ok(())
        }
        _ => match patch_selector(cluster, namespace, name, None).await {
            Ok(()) | Err(RouterError::Misconfigured(_)) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// Sets (or, with `None`, removes) the revision key of a Service's selector. `spec.selector`
/// is an atomic map, so a server-side apply would take the whole selector from its owner: a
/// merge patch changes the one key and leaves the user's keys alone. `Misconfigured` when the
/// Service does not exist (one call: a missing Service answers 404 rather than needing a read).
async fn patch_selector(
    cluster: &Cluster,
    namespace: &str,
    service: &str,
    hash: Option<&str>,
) -> Result<(), RouterError> {
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), namespace);
    let patch = json!({"spec": {"selector": {HASH_LABEL: hash}}});
    let params = PatchParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match api.patch(service, &params, &Patch::Merge(&patch)).await {
        Ok(written) => {
            cluster.wrote("Service", namespace, service, written.resource_version());
            Ok(())
        }
        Err(e) if crate::k8s::is_not_found(&e) => Err(RouterError::Misconfigured(format!(
            "Service {namespace}/{service} not found"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The revision a Service's selector names (`Ok(None)`: none), or `Misconfigured` when the
/// Service does not exist.
pub async fn selected_revision(
    cluster: &Cluster,
    namespace: &str,
    service: &str,
) -> Result<Option<String>, RouterError> {
    let svc = fetch(cluster, &service_resource(), namespace, service).await?;
    Ok(svc
        .data
        .pointer("/spec/selector")
        .and_then(|s| s.get(HASH_LABEL))
        .and_then(Value::as_str)
        .map(str::to_string))
}

/// Whether a Service's selector names `hash`.
pub async fn service_selects(
    cluster: &Cluster,
    namespace: &str,
    service: &str,
    hash: &str,
) -> Result<bool, RouterError> {
    Ok(selected_revision(cluster, namespace, service)
        .await?
        .as_deref()
        == Some(hash))
}

/// Adds the revision to a Service's selector.
pub async fn point_service(
    cluster: &Cluster,
    namespace: &str,
    service: &str,
    hash: &str,
) -> Result<(), RouterError> {
    patch_selector(cluster, namespace, service, Some(hash)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_located_without_guessing_at_dotted_names() {
        let table = [
            ("web", None, ("web", "shop")),
            ("web.mesh", None, ("web", "mesh")),
            ("web.v2.internal", None, ("web.v2.internal", "shop")),
            ("web.v2", Some("shop"), ("web.v2", "shop")),
            ("web", Some("mesh"), ("web", "mesh")),
        ];
        for (name, namespace, (want_name, want_ns)) in table {
            assert_eq!(
                locate(name, namespace, "shop"),
                (want_name.to_string(), want_ns.to_string()),
                "{name} {namespace:?}"
            );
        }
    }

    #[test]
    fn a_route_is_two_weights() {
        let mut entries = vec![json!({"weight": 100}), json!({})];
        assert!(set_pair(&mut entries, (0, 1), 30));
        assert_eq!(entries, vec![json!({"weight": 70}), json!({"weight": 30})]);
        assert!(!set_pair(&mut entries, (0, 1), 30));
        assert_eq!(read_pair(&entries, (0, 1), 0), Some(30));
        assert_eq!(read_pair(&[json!({}), json!({})], (0, 1), 1), None);
        assert_eq!(agreed(&[Some(30), Some(30)]), Some(30));
        assert_eq!(agreed(&[Some(30), Some(20)]), None);
        assert_eq!(agreed(&[None]), None);
    }
}
