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

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use crate::api::rollout::Rollout;
use crate::rollout::cached::{CachedRollout, reference};

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
    }
    // Admission refuses both routers on one Rollout; one stored before that rule still wakes
    // on either.
    if let Some(gateway) = routing.and_then(|r| r.gateway_api.as_ref()) {
        routes.push(route(RouteKind::HttpRoute, own, &gateway.http_route.name));
    }
    routes.sort();
    routes.dedup();
    routes
}

type ByRollout = HashMap<ObjectRef<CachedRollout>, Vec<Route>>;

#[derive(Debug, Default)]
struct Index {
    by_rollout: ByRollout,
    /// Most routes have one Rollout: a Vec holds it in less memory than a set.
    by_route: HashMap<Route, Vec<ObjectRef<CachedRollout>>>,
    /// Built during a (re)list of the Rollouts, swapped in when it is complete (until then the
    /// index answers as before the relist).
    building: Option<ByRollout>,
}

impl Index {
    fn forget(&mut self, rollout: &ObjectRef<CachedRollout>) {
        for route in self.by_rollout.remove(rollout).unwrap_or_default() {
            if let Some(referrers) = self.by_route.get_mut(&route) {
                referrers.retain(|r| r != rollout);
                if referrers.is_empty() {
                    self.by_route.remove(&route);
                }
            }
        }
    }

    fn note(&mut self, rollout: ObjectRef<CachedRollout>, routes: Vec<Route>) {
        self.forget(&rollout);
        for route in &routes {
            // Room for one: a first push would make room for four. Never there already: it
            // was forgotten above, and `routes_of` names each route once.
            self.by_route
                .entry(route.clone())
                .or_insert_with(|| Vec::with_capacity(1))
                .push(rollout.clone());
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
    pub fn of(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Vec<ObjectRef<CachedRollout>> {
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
    use kube::ResourceExt;
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

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

    fn names(mut refs: Vec<ObjectRef<CachedRollout>>) -> Vec<String> {
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

    /// The wake-up as it was before the index (a2a5a68's `refers_to`, kept as the oracle):
    /// whether `rollout` routes through the `kind` object `namespace/name`.
    fn refers_to(rollout: &Rollout, kind: &str, name: &str, namespace: &str) -> bool {
        let own_namespace = rollout.namespace().unwrap_or_default();
        let strategy = &rollout.spec.strategy;
        if kind == "Service" {
            let canary = strategy.canary.as_ref();
            let blue_green = strategy.blue_green.as_ref();
            let named = [
                canary.and_then(|c| c.stable_service.as_deref()),
                canary.and_then(|c| c.canary_service.as_deref()),
                blue_green.map(|b| b.active_service.as_str()),
                blue_green.and_then(|b| b.preview_service.as_deref()),
            ];
            return own_namespace == namespace && named.into_iter().flatten().any(|n| n == name);
        }
        let routing = strategy
            .canary
            .as_ref()
            .and_then(|c| c.traffic_routing.as_ref())
            .or_else(|| {
                strategy
                    .blue_green
                    .as_ref()
                    .and_then(|b| b.traffic_routing.as_ref())
            });
        let Some(routing) = routing else { return false };
        match (kind, &routing.istio, &routing.gateway_api) {
            ("VirtualService", Some(istio), _) => istio
                .virtual_service
                .iter()
                .chain(&istio.virtual_services)
                .any(|vs| {
                    let (n, ns) =
                        crate::traffic::locate(&vs.name, vs.namespace.as_deref(), &own_namespace);
                    n == name && ns == namespace
                }),
            ("DestinationRule", Some(istio), _) => istio
                .destination_rule
                .as_ref()
                .is_some_and(|dr| dr.name == name && own_namespace == namespace),
            ("HTTPRoute", _, Some(gateway)) => {
                gateway.http_route.name == name && own_namespace == namespace
            }
            _ => false,
        }
    }

    const NAMESPACES: [&str; 2] = ["shop", "edge"];
    /// Names that collide across kinds, and the forms `locate` reads apart.
    const NAMES: [&str; 7] = ["a", "b", "a.edge", "a.b.c", "s0", "s1", "s2"];
    const KINDS: [&str; 5] = [
        "VirtualService",
        "DestinationRule",
        "HTTPRoute",
        "Service",
        "ConfigMap",
    ];

    /// A VirtualService reference: a name from `NAMES`, with or without a namespace.
    fn vs_ref() -> impl Strategy<Value = Value> {
        (0..NAMES.len(), proptest::option::of(0..NAMESPACES.len())).prop_map(|(n, ns)| match ns {
            Some(ns) => json!({"name": NAMES[n], "namespace": NAMESPACES[ns]}),
            None => json!({"name": NAMES[n]}),
        })
    }

    /// A Rollout's strategy, of every shape a Rollout can route by (and both routers at once,
    /// which admission refuses but an object stored before that rule may have).
    fn strategy() -> impl Strategy<Value = Value> {
        let name = || (0..NAMES.len()).prop_map(|n| NAMES[n]);
        let istio = (
            proptest::collection::vec(vs_ref(), 0..3),
            any::<bool>(),
            proptest::option::of(name()),
        )
            .prop_map(|(vss, singular, dr)| {
                let mut istio = json!({});
                match (singular, vss.split_first()) {
                    (true, Some((first, rest))) => {
                        istio["virtualService"] = first.clone();
                        istio["virtualServices"] = json!(rest);
                    }
                    _ => istio["virtualServices"] = json!(vss),
                }
                if let Some(dr) = dr {
                    istio["destinationRule"] =
                        json!({"name": dr, "stableSubset": "s", "canarySubset": "c"});
                }
                istio
            });
        let routing = (proptest::option::of(istio), proptest::option::of(name())).prop_map(
            |(istio, http_route)| {
                let mut routing = json!({});
                if let Some(istio) = istio {
                    routing["istio"] = istio;
                }
                if let Some(route) = http_route {
                    routing["gatewayAPI"] = json!({"httpRoute": {"name": route}});
                }
                routing
            },
        );
        (
            any::<bool>(),
            proptest::option::of((name(), name())),
            proptest::option::of(routing),
        )
            .prop_map(|(canary, services, routing)| {
                let mut strategy = if canary {
                    let mut c = json!({"steps": []});
                    if let Some((stable, preview)) = services {
                        c["stableService"] = json!(stable);
                        c["canaryService"] = json!(preview);
                    }
                    json!({"canary": c})
                } else {
                    let (active, preview) = services.unwrap_or(("s0", "s1"));
                    json!({"blueGreen": {"activeService": active, "previewService": preview}})
                };
                if let Some(routing) = routing {
                    let key = if canary { "canary" } else { "blueGreen" };
                    strategy[key]["trafficRouting"] = routing;
                }
                strategy
            })
    }

    /// One turn of the Rollout watch.
    #[derive(Clone, Debug)]
    enum Step {
        /// A Rollout (of few names, so they collide) created or changed.
        Apply {
            namespace: usize,
            name: u8,
            strategy: Value,
        },
        Delete {
            namespace: usize,
            name: u8,
        },
        /// The watch lost its place: a Rollout may vanish meanwhile with no Delete seen, a
        /// relist may be cut short by another, and then one completes.
        Relist {
            vanish: Option<(usize, u8)>,
            cut_short: bool,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        let at = || (0..NAMESPACES.len(), 0u8..4);
        prop_oneof![
            4 => (at(), strategy()).prop_map(|((namespace, name), strategy)| Step::Apply { namespace, name, strategy }),
            2 => at().prop_map(|(namespace, name)| Step::Delete { namespace, name }),
            1 => (proptest::option::of(at()), any::<bool>())
                .prop_map(|(vanish, cut_short)| Step::Relist { vanish, cut_short }),
        ]
    }

    proptest! {
        #[test]
        fn the_index_answers_as_the_scan_did(steps in proptest::collection::vec(step(), 1..40)) {
            let referrers = Referrers::default();
            referrers.apply(&Event::Init);
            referrers.apply(&Event::InitDone);
            let mut rollouts: BTreeMap<(usize, u8), Rollout> = BTreeMap::new();
            for step in steps {
                match step {
                    Step::Apply { namespace, name, strategy } => {
                        let r = rollout(NAMESPACES[namespace], &format!("r{name}"), strategy);
                        referrers.apply(&Event::Apply(r.clone()));
                        rollouts.insert((namespace, name), r);
                    }
                    Step::Delete { namespace, name } => {
                        if let Some(r) = rollouts.remove(&(namespace, name)) {
                            referrers.apply(&Event::Delete(r));
                        }
                    }
                    Step::Relist { vanish, cut_short } => {
                        if let Some(at) = vanish {
                            rollouts.remove(&at);
                        }
                        if cut_short {
                            referrers.apply(&Event::Init);
                            for r in rollouts.values().take(1) {
                                referrers.apply(&Event::InitApply(r.clone()));
                            }
                        }
                        referrers.apply(&Event::Init);
                        for r in rollouts.values() {
                            referrers.apply(&Event::InitApply(r.clone()));
                        }
                        referrers.apply(&Event::InitDone);
                    }
                }
                for kind in KINDS {
                    for namespace in NAMESPACES {
                        for name in NAMES {
                            let mut scanned: Vec<ObjectRef<CachedRollout>> = rollouts
                                .values()
                                .filter(|r| refers_to(r, kind, name, namespace))
                                .map(reference)
                                .collect();
                            scanned.sort_by_key(ToString::to_string);
                            prop_assert_eq!(
                                names(referrers.of(kind, Some(namespace), name)),
                                names(scanned),
                                "{} {}/{}", kind, namespace, name
                            );
                        }
                    }
                }
            }
        }
    }
}
