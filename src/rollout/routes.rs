//! Which Rollouts route through which object, kept from the Rollout watch.
//!
//! A watch event of a VirtualService, DestinationRule, HTTPRoute or Service wakes the Rollouts
//! that route through it, so a weight or selector changed by hand is put back at once. Finding
//! them used to scan every cached Rollout per event: a (re)list of the routing watches at
//! 10,000 Rollouts, with their 27,500 routing objects, was a few hundred million checks, and
//! it showed as idle CPU whenever a relist fell in the idle window (docs/performance.md). Now
//! each Rollout's routes are noted when its own watch event comes in, and a routing event is
//! one lookup.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use crate::api::rollout::Rollout;

/// The kinds of object a Rollout routes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    VirtualService,
    DestinationRule,
    HttpRoute,
    Service,
}

impl RouteKind {
    /// The kind named as the apiserver names it; `None` for a kind no Rollout routes through.
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "VirtualService" => Some(Self::VirtualService),
            "DestinationRule" => Some(Self::DestinationRule),
            "HTTPRoute" => Some(Self::HttpRoute),
            "Service" => Some(Self::Service),
            _ => None,
        }
    }
}

/// One object a Rollout routes through.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

/// Every object `rollout` routes through: its Services, and the VirtualServices (which may be
/// in another namespace), DestinationRule or HTTPRoute of its traffic routing.
pub fn routes_of(rollout: &Rollout) -> Vec<Route> {
    let own = rollout.metadata.namespace.as_deref().unwrap_or_default();
    let route = |kind, namespace: &str, name: &str| Route {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let strategy = &rollout.spec.strategy;
    let canary = strategy.canary.as_ref();
    let blue_green = strategy.blue_green.as_ref();
    let services = [
        canary.and_then(|c| c.stable_service.as_deref()),
        canary.and_then(|c| c.canary_service.as_deref()),
        blue_green.map(|b| b.active_service.as_str()),
        blue_green.and_then(|b| b.preview_service.as_deref()),
    ];
    let mut routes: Vec<Route> = services
        .into_iter()
        .flatten()
        .map(|name| route(RouteKind::Service, own, name))
        .collect();
    let routing = canary
        .and_then(|c| c.traffic_routing.as_ref())
        .or_else(|| blue_green.and_then(|b| b.traffic_routing.as_ref()));
    if let Some(istio) = routing.and_then(|r| r.istio.as_ref()) {
        for vs in istio.virtual_service.iter().chain(&istio.virtual_services) {
            let (name, namespace) = crate::traffic::locate(&vs.name, vs.namespace.as_deref(), own);
            routes.push(route(RouteKind::VirtualService, &namespace, &name));
        }
        if let Some(dr) = &istio.destination_rule {
            routes.push(route(RouteKind::DestinationRule, own, &dr.name));
        }
    } else if let Some(gateway) = routing.and_then(|r| r.gateway_api.as_ref()) {
        routes.push(route(RouteKind::HttpRoute, own, &gateway.http_route.name));
    }
    routes.sort();
    routes.dedup();
    routes
}

type ByRollout = HashMap<ObjectRef<Rollout>, Vec<Route>>;

/// The Rollout's reference, without the uid and resourceVersion `ObjectRef::from_obj` would
/// copy in (not needed to wake it, and memory for every Rollout).
fn reference(rollout: &Rollout) -> ObjectRef<Rollout> {
    ObjectRef::new(&rollout.name_any())
        .within(rollout.metadata.namespace.as_deref().unwrap_or_default())
}

#[derive(Debug, Default)]
struct Index {
    by_rollout: ByRollout,
    /// Most routes have one Rollout: a Vec holds it in less memory than a set.
    by_route: HashMap<Route, Vec<ObjectRef<Rollout>>>,
    /// Built during a (re)list of the Rollouts, swapped in when it is complete (until then the
    /// index answers as before the relist).
    building: Option<ByRollout>,
}

impl Index {
    fn forget(&mut self, rollout: &ObjectRef<Rollout>) {
        for route in self.by_rollout.remove(rollout).unwrap_or_default() {
            if let Some(referrers) = self.by_route.get_mut(&route) {
                referrers.retain(|r| r != rollout);
                if referrers.is_empty() {
                    self.by_route.remove(&route);
                }
            }
        }
    }

    fn note(&mut self, rollout: ObjectRef<Rollout>, routes: Vec<Route>) {
        self.forget(&rollout);
        for route in &routes {
            // Room for one: a first push would make room for four.
            let referrers = self
                .by_route
                .entry(route.clone())
                .or_insert_with(|| Vec::with_capacity(1));
            if !referrers.contains(&rollout) {
                referrers.push(rollout.clone());
            }
        }
        if !routes.is_empty() {
            self.by_rollout.insert(rollout, routes);
        }
    }
}

/// The Rollouts that route through each object.
#[derive(Debug, Default)]
pub struct Referrers {
    index: Mutex<Index>,
}

impl Referrers {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in one event of the Rollout watch.
    pub fn apply(&self, event: &Event<Rollout>) {
        let mut index = self.index();
        match event {
            Event::Init => index.building = Some(ByRollout::new()),
            Event::InitApply(rollout) => {
                if let Some(building) = index.building.as_mut() {
                    building.insert(reference(rollout), routes_of(rollout));
                }
            }
            Event::InitDone => {
                if let Some(built) = index.building.take() {
                    index.by_rollout.clear();
                    index.by_route.clear();
                    for (rollout, routes) in built {
                        index.note(rollout, routes);
                    }
                }
            }
            Event::Apply(rollout) => index.note(reference(rollout), routes_of(rollout)),
            Event::Delete(rollout) => index.forget(&reference(rollout)),
        }
    }

    /// The Rollouts that route through the `kind` object `namespace/name` (none for a kind no
    /// Rollout routes through).
    pub fn of(&self, kind: &str, namespace: Option<&str>, name: &str) -> Vec<ObjectRef<Rollout>> {
        let Some(kind) = RouteKind::from_kind(kind) else {
            return Vec::new();
        };
        let route = Route {
            kind,
            namespace: namespace.unwrap_or_default().to_string(),
            name: name.to_string(),
        };
        self.index()
            .by_route
            .get(&route)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn rollout(namespace: &str, name: &str, strategy: Value) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"spec": {"containers": [{"name": "app", "image": "app:1"}]}},
                     "strategy": strategy}
        }))
        .unwrap()
    }

    fn istio(namespace: &str, name: &str, vs: Value) -> Rollout {
        rollout(
            namespace,
            name,
            json!({"canary": {"stableService": format!("{name}-stable"),
                              "canaryService": format!("{name}-canary"),
                              "trafficRouting": {"istio": {"virtualServices": [vs]}},
                              "steps": []}}),
        )
    }

    fn names(mut refs: Vec<ObjectRef<Rollout>>) -> Vec<String> {
        refs.sort_by_key(ToString::to_string);
        refs.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn each_strategy_names_its_routes() {
        let route = |kind, namespace: &str, name: &str| Route {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        };
        use RouteKind::*;
        let cases = [
            (
                "Istio by subsets, a VirtualService elsewhere by field and one by short form",
                rollout(
                    "shop",
                    "web",
                    json!({"canary": {"trafficRouting": {"istio": {"virtualServices": [
                                          {"name": "mesh", "namespace": "edge"},
                                          {"name": "gw.ingress"}, {"name": "local"}],
                                          "destinationRule": {"name": "web", "canarySubset": "c",
                                                              "stableSubset": "s"}}},
                                      "steps": []}}),
                ),
                vec![
                    route(VirtualService, "edge", "mesh"),
                    route(VirtualService, "ingress", "gw"),
                    route(DestinationRule, "shop", "web"),
                    route(VirtualService, "shop", "local"),
                ],
            ),
            (
                "Gateway API",
                rollout(
                    "shop",
                    "api",
                    json!({"canary": {"stableService": "api", "canaryService": "api-canary",
                                      "trafficRouting": {"gatewayAPI": {"httpRoute": {"name": "api"}}},
                                      "steps": []}}),
                ),
                vec![
                    route(Service, "shop", "api"),
                    route(HttpRoute, "shop", "api"),
                    route(Service, "shop", "api-canary"),
                ],
            ),
            (
                "blue-green",
                rollout(
                    "shop",
                    "db",
                    json!({"blueGreen": {"activeService": "db", "previewService": "db-preview"}}),
                ),
                vec![
                    route(Service, "shop", "db"),
                    route(Service, "shop", "db-preview"),
                ],
            ),
            (
                "replica counts only",
                rollout("shop", "batch", json!({"canary": {"steps": []}})),
                vec![],
            ),
        ];
        for (what, rollout, mut want) in cases {
            want.sort();
            assert_eq!(routes_of(&rollout), want, "{what}");
        }
    }

    #[test]
    fn the_index_follows_the_watch_and_a_relist_replaces_it() {
        let referrers = Referrers::default();
        let web = istio("shop", "web", json!({"name": "web"}));
        let api = istio("shop", "api", json!({"name": "web"}));
        referrers.apply(&Event::Init);
        referrers.apply(&Event::InitApply(web.clone()));
        referrers.apply(&Event::InitApply(api.clone()));
        assert!(
            referrers
                .of("VirtualService", Some("shop"), "web")
                .is_empty(),
            "nothing is served before the list is complete"
        );
        referrers.apply(&Event::InitDone);
        assert_eq!(
            names(referrers.of("VirtualService", Some("shop"), "web")),
            [
                "Rollout.v1alpha1.sluice.dev/api.shop",
                "Rollout.v1alpha1.sluice.dev/web.shop"
            ]
        );
        assert_eq!(referrers.of("Service", Some("shop"), "web-stable").len(), 1);
        assert!(
            referrers
                .of("Service", Some("other"), "web-stable")
                .is_empty()
        );
        assert!(referrers.of("ConfigMap", Some("shop"), "web").is_empty());

        // The Rollout moves to another VirtualService: the old one no longer wakes it.
        referrers.apply(&Event::Apply(istio("shop", "web", json!({"name": "new"}))));
        assert_eq!(referrers.of("VirtualService", Some("shop"), "web").len(), 1);
        assert_eq!(referrers.of("VirtualService", Some("shop"), "new").len(), 1);
        referrers.apply(&Event::Delete(api.clone()));
        assert!(
            referrers
                .of("VirtualService", Some("shop"), "web")
                .is_empty()
        );

        // A relist: answers as before until it is complete, then only what it listed.
        referrers.apply(&Event::Init);
        referrers.apply(&Event::InitApply(api));
        assert_eq!(referrers.of("VirtualService", Some("shop"), "new").len(), 1);
        referrers.apply(&Event::InitDone);
        assert!(
            referrers
                .of("VirtualService", Some("shop"), "new")
                .is_empty()
        );
        assert_eq!(referrers.of("VirtualService", Some("shop"), "web").len(), 1);
    }

    /// A scan of the Rollouts, as the wake-up was done before the index: the index must
    /// answer the same.
    fn scan(
        rollouts: &HashMap<String, Rollout>,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Vec<String> {
        let mut found: Vec<ObjectRef<Rollout>> = rollouts
            .values()
            .filter(|r| {
                routes_of(r).iter().any(|route| {
                    Some(route.kind) == RouteKind::from_kind(kind)
                        && route.namespace == namespace
                        && route.name == name
                })
            })
            .map(ObjectRef::from_obj)
            .collect();
        found.sort_by_key(ToString::to_string);
        found.iter().map(ToString::to_string).collect()
    }

    /// One watch event: a Rollout (of few names, so they collide) applied, deleted, or a
    /// relist of what is there.
    #[derive(Clone, Debug)]
    enum Step {
        Apply {
            rollout: u8,
            vs: u8,
            elsewhere: bool,
        },
        Delete {
            rollout: u8,
        },
        Relist,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..6, 0u8..3, any::<bool>())
                .prop_map(|(rollout, vs, elsewhere)| Step::Apply { rollout, vs, elsewhere }),
            2 => (0u8..6).prop_map(|rollout| Step::Delete { rollout }),
            1 => Just(Step::Relist),
        ]
    }

    proptest! {
        #[test]
        fn the_index_answers_as_a_scan_would(steps in proptest::collection::vec(step(), 1..40)) {
            let referrers = Referrers::default();
            referrers.apply(&Event::Init);
            referrers.apply(&Event::InitDone);
            let mut rollouts: HashMap<String, Rollout> = HashMap::new();
            for step in steps {
                match step {
                    Step::Apply { rollout, vs, elsewhere } => {
                        let name = format!("r{rollout}");
                        let vs = if elsewhere {
                            json!({"name": format!("vs{vs}"), "namespace": "edge"})
                        } else {
                            json!({"name": format!("vs{vs}")})
                        };
                        let r = istio("shop", &name, vs);
                        referrers.apply(&Event::Apply(r.clone()));
                        rollouts.insert(name, r);
                    }
                    Step::Delete { rollout } => {
                        if let Some(r) = rollouts.remove(&format!("r{rollout}")) {
                            referrers.apply(&Event::Delete(r));
                        }
                    }
                    Step::Relist => {
                        referrers.apply(&Event::Init);
                        for r in rollouts.values() {
                            referrers.apply(&Event::InitApply(r.clone()));
                        }
                        referrers.apply(&Event::InitDone);
                    }
                }
                for namespace in ["shop", "edge"] {
                    for vs in 0..3 {
                        let name = format!("vs{vs}");
                        prop_assert_eq!(
                            names(referrers.of("VirtualService", Some(namespace), &name)),
                            scan(&rollouts, "VirtualService", namespace, &name)
                        );
                    }
                }
                for rollout in 0..6 {
                    let name = format!("r{rollout}-stable");
                    prop_assert_eq!(
                        names(referrers.of("Service", Some("shop"), &name)),
                        scan(&rollouts, "Service", "shop", &name)
                    );
                }
            }
        }
    }
}
