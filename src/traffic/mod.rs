//! Traffic routers: how a Rollout's canary weight reaches the mesh or gateway.
//!
//! One trait, one file per router. A router points the stable and canary destinations at
//! their revisions, sets the canary weight, and reads both back so the planner can verify
//! what it wrote and notice when someone else changed it (drift).

pub mod gateway_api;
pub mod istio;

use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::api::rollout::{
    CanaryStrategy, GatewayApiRouting, IstioRouting, RolloutStrategy, TrafficRouting,
};
use crate::k8s::labels::HASH_LABEL;
use istio::DestinationKey;

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
        client: &Client,
        namespace: &str,
        strategy: &RolloutStrategy,
    ) -> Option<Self> {
        match (&strategy.canary, &strategy.blue_green) {
            (Some(canary), _) => Self::for_canary(client, namespace, canary),
            (None, Some(bg)) => {
                let services = bg
                    .preview_service
                    .clone()
                    .map(|preview| (bg.active_service.clone(), preview));
                Self::new(client, namespace, bg.traffic_routing.as_ref()?, services)
            }
            (None, None) => None,
        }
    }

    /// The router configured in a canary strategy, if any.
    pub fn for_canary(client: &Client, namespace: &str, canary: &CanaryStrategy) -> Option<Self> {
        let services = canary
            .stable_service
            .clone()
            .zip(canary.canary_service.clone());
        Self::new(
            client,
            namespace,
            canary.traffic_routing.as_ref()?,
            services,
        )
    }

    /// A router over `routing`, with the two Services (stable/canary, or active/preview) that
    /// host-level routing points at the revisions.
    pub fn new(
        client: &Client,
        namespace: &str,
        routing: &TrafficRouting,
        services: Option<(String, String)>,
    ) -> Option<Self> {
        if let Some(istio) = &routing.istio {
            return Some(Router::Istio(IstioRouter::new(
                client.clone(),
                namespace,
                istio,
                services,
            )));
        }
        let gateway = routing.gateway_api.as_ref()?;
        let (stable, canary) = services?;
        Some(Router::GatewayApi(GatewayApiRouter::new(
            client.clone(),
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

/// Istio VirtualService (and DestinationRule) router.
pub struct IstioRouter {
    client: Client,
    namespace: String,
    virtual_services: Vec<(String, String, Vec<String>)>,
    destination_rule: Option<(String, String, String)>,
    services: Option<(String, String)>,
    key: DestinationKey,
}

fn gvk(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

/// `name` or `name.namespace`.
pub fn split_name(reference: &str, default_namespace: &str) -> (String, String) {
    match reference.split_once('.') {
        Some((name, namespace)) => (name.to_string(), namespace.to_string()),
        None => (reference.to_string(), default_namespace.to_string()),
    }
}

impl IstioRouter {
    pub fn new(
        client: Client,
        namespace: &str,
        istio: &IstioRouting,
        services: Option<(String, String)>,
    ) -> Self {
        let refs = istio.virtual_service.iter().chain(&istio.virtual_services);
        let virtual_services = refs
            .map(|r| {
                let (name, ns) = split_name(&r.name, namespace);
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
            client: client.clone(),
            namespace: namespace.to_string(),
            virtual_services,
            destination_rule,
            services,
            key,
        }
    }

    fn virtual_service_api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &gvk("networking.istio.io", "v1", "VirtualService"),
        )
    }

    fn destination_rule_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &gvk("networking.istio.io", "v1", "DestinationRule"),
        )
    }

    async fn get(
        api: &Api<DynamicObject>,
        name: &str,
        what: &str,
        namespace: &str,
    ) -> Result<DynamicObject, RouterError> {
        api.get_opt(name).await?.ok_or_else(|| {
            RouterError::Misconfigured(format!("{what} {namespace}/{name} not found"))
        })
    }

    async fn replace(
        api: &Api<DynamicObject>,
        object: &DynamicObject,
        what: &str,
    ) -> Result<(), RouterError> {
        let name = object.metadata.name.clone().unwrap_or_default();
        match api
            .replace(
                &name,
                &PostParams {
                    field_manager: Some(crate::FIELD_MANAGER.into()),
                    ..PostParams::default()
                },
                object,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if crate::k8s::is_conflict(&e) => {
                Err(RouterError::Conflict(format!("{what} {name}")))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl TrafficRouter for IstioRouter {
    async fn observe(&self, targets: &Targets) -> Result<TrafficState, RouterError> {
        let mut weights = Vec::new();
        for (name, namespace, routes) in &self.virtual_services {
            let vs = Self::get(
                &self.virtual_service_api(namespace),
                name,
                "VirtualService",
                namespace,
            )
            .await?;
            let spec = vs.data.get("spec").cloned().unwrap_or_default();
            weights.push(istio::read_canary_weight(
                &spec,
                routes,
                &self.key,
                &format!("{namespace}/{name}"),
            )?);
        }
        let canary_weight = weights
            .first()
            .copied()
            .flatten()
            .filter(|w| weights.iter().all(|x| *x == Some(*w)));
        let targets_match = match (&self.destination_rule, &self.services) {
            (Some((name, stable, canary)), _) => {
                let dr = Self::get(
                    &self.destination_rule_api(),
                    name,
                    "DestinationRule",
                    &self.namespace,
                )
                .await?;
                let spec = dr.data.get("spec").cloned().unwrap_or_default();
                istio::read_subsets(&spec, stable, canary)
                    == (Some(targets.stable.clone()), Some(targets.canary.clone()))
            }
            (None, Some((stable, canary))) => {
                service_selects(&self.client, &self.namespace, stable, &targets.stable).await?
                    && service_selects(&self.client, &self.namespace, canary, &targets.canary)
                        .await?
            }
            (None, None) => true,
        };
        Ok(TrafficState {
            canary_weight,
            targets_match,
        })
    }

    async fn apply(&self, targets: &Targets, canary_weight: i32) -> Result<(), RouterError> {
        if let Some((name, stable, canary)) = &self.destination_rule {
            let api = self.destination_rule_api();
            let mut dr = Self::get(&api, name, "DestinationRule", &self.namespace).await?;
            if let Some(spec) = dr.data.get_mut("spec")
                && istio::point_subsets(
                    spec,
                    stable,
                    canary,
                    targets,
                    &format!("{}/{name}", self.namespace),
                )?
            {
                Self::replace(&api, &dr, "DestinationRule").await?;
            }
        }
        if let Some((stable, canary)) = &self.services {
            point_service(&self.client, &self.namespace, stable, &targets.stable).await?;
            point_service(&self.client, &self.namespace, canary, &targets.canary).await?;
        }
        for (name, namespace, routes) in &self.virtual_services {
            let api = self.virtual_service_api(namespace);
            let mut vs = Self::get(&api, name, "VirtualService", namespace).await?;
            let label = format!("{namespace}/{name}");
            let spec = vs.data.get_mut("spec").ok_or_else(|| {
                RouterError::Misconfigured(format!("VirtualService {label} has no spec"))
            })?;
            if istio::set_weights(spec, routes, &self.key, canary_weight, &label)? {
                Self::replace(&api, &vs, "VirtualService").await?;
            }
        }
        Ok(())
    }
}

/// Gateway API HTTPRoute router (host-level: the two Services select the revisions).
pub struct GatewayApiRouter {
    client: Client,
    namespace: String,
    route: String,
    rules: Vec<String>,
    stable_service: String,
    canary_service: String,
}

impl GatewayApiRouter {
    pub fn new(
        client: Client,
        namespace: &str,
        gateway: &GatewayApiRouting,
        stable_service: String,
        canary_service: String,
    ) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            route: gateway.http_route.name.clone(),
            rules: gateway.http_route.rules.clone(),
            stable_service,
            canary_service,
        }
    }

    fn api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        )
    }

    fn backends(&self) -> gateway_api::Backends<'_> {
        gateway_api::Backends {
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
        let route =
            IstioRouter::get(&self.api(), &self.route, "HTTPRoute", &self.namespace).await?;
        let spec = route.data.get("spec").cloned().unwrap_or_default();
        let canary_weight =
            gateway_api::read_canary_weight(&spec, &self.rules, &self.backends(), &self.label())?;
        let targets_match = service_selects(
            &self.client,
            &self.namespace,
            &self.stable_service,
            &targets.stable,
        )
        .await?
            && service_selects(
                &self.client,
                &self.namespace,
                &self.canary_service,
                &targets.canary,
            )
            .await?;
        Ok(TrafficState {
            canary_weight,
            targets_match,
        })
    }

    async fn apply(&self, targets: &Targets, canary_weight: i32) -> Result<(), RouterError> {
        point_service(
            &self.client,
            &self.namespace,
            &self.stable_service,
            &targets.stable,
        )
        .await?;
        point_service(
            &self.client,
            &self.namespace,
            &self.canary_service,
            &targets.canary,
        )
        .await?;
        let api = self.api();
        let mut route = IstioRouter::get(&api, &self.route, "HTTPRoute", &self.namespace).await?;
        let spec = route.data.get_mut("spec").ok_or_else(|| {
            RouterError::Misconfigured(format!("HTTPRoute {} has no spec", self.label()))
        })?;
        if gateway_api::set_weights(
            spec,
            &self.rules,
            &self.backends(),
            canary_weight,
            &self.label(),
        )? {
            IstioRouter::replace(&api, &route, "HTTPRoute").await?;
        }
        Ok(())
    }
}

/// The revision a Service's selector names (`Ok(None)`: none), or `Misconfigured` when the
/// Service does not exist.
pub async fn selected_revision(
    client: &Client,
    namespace: &str,
    service: &str,
) -> Result<Option<String>, RouterError> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let svc = api.get_opt(service).await?.ok_or_else(|| {
        RouterError::Misconfigured(format!("Service {namespace}/{service} not found"))
    })?;
    Ok(svc
        .spec
        .and_then(|s| s.selector)
        .and_then(|s| s.get(HASH_LABEL).cloned()))
}

/// Whether a Service's selector names `hash`.
pub async fn service_selects(
    client: &Client,
    namespace: &str,
    service: &str,
    hash: &str,
) -> Result<bool, RouterError> {
    Ok(selected_revision(client, namespace, service)
        .await?
        .as_deref()
        == Some(hash))
}

/// Adds the revision to a Service's selector. `spec.selector` is an atomic map, so a
/// server-side apply would take the whole selector from its owner: a merge patch adds the one
/// key and leaves the user's keys alone.
pub async fn point_service(
    client: &Client,
    namespace: &str,
    service: &str,
    hash: &str,
) -> Result<(), RouterError> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"spec": {"selector": {HASH_LABEL: hash}}});
    let params = PatchParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    // One call: a missing Service answers 404 rather than needing a read first.
    match api.patch(service, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(e) if crate::k8s::is_not_found(&e) => Err(RouterError::Misconfigured(format!(
            "Service {namespace}/{service} not found"
        ))),
        Err(e) => Err(e.into()),
    }
}
