//! Reads the world from the apiserver: a few cluster-wide LIST calls per tick.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod as KPod, Service as KService};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;

use crate::model::{
    DestinationRule, Labels, Meta, Pod, Route, Service, World, parse_destination_rule,
    parse_http_route, parse_virtual_service,
};

/// How one kind's last LIST went, for /state and for logging on change only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceStatus {
    Pending,
    Ok {
        items: usize,
    },
    /// The CRD is not installed (404): treated as no objects.
    Absent,
    /// The LIST failed; the last good list is used.
    Error {
        message: String,
    },
}

struct Source<T> {
    kind: &'static str,
    status: SourceStatus,
    last: Vec<T>,
}

impl<T: Clone> Source<T> {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            status: SourceStatus::Pending,
            last: Vec::new(),
        }
    }

    /// Records a LIST outcome and returns the items to use.
    fn update(&mut self, result: Result<Vec<T>, kube::Error>) -> Vec<T> {
        let status = match result {
            Ok(items) => {
                let status = SourceStatus::Ok { items: items.len() };
                self.last = items;
                status
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.last.clear();
                SourceStatus::Absent
            }
            Err(e) => SourceStatus::Error {
                message: e.to_string(),
            },
        };
        let changed = std::mem::discriminant(&status) != std::mem::discriminant(&self.status)
            || matches!((&status, &self.status), (SourceStatus::Error { message: a }, SourceStatus::Error { message: b }) if a != b);
        if changed {
            match &status {
                SourceStatus::Ok { items } => {
                    tracing::info!(kind = self.kind, items, "listing works")
                }
                SourceStatus::Absent => tracing::warn!(
                    kind = self.kind,
                    "resource type not installed (404); skipping it until it appears"
                ),
                SourceStatus::Error { message } => tracing::warn!(
                    kind = self.kind,
                    error = %message,
                    "list failed; using the last good list"
                ),
                SourceStatus::Pending => {}
            }
        }
        self.status = status;
        self.last.clone()
    }
}

pub struct Cluster {
    client: Client,
    default_rps: f64,
    vs_ar: ApiResource,
    dr_ar: ApiResource,
    hr_ar: ApiResource,
    virtual_services: Source<Route>,
    destination_rules: Source<DestinationRule>,
    http_routes: Source<Route>,
    services: Source<Service>,
    pods: Source<Pod>,
}

fn map(m: Option<&BTreeMap<String, String>>) -> Labels {
    m.cloned().unwrap_or_default()
}

impl Cluster {
    pub fn new(client: Client, default_rps: f64) -> Self {
        let ar = |g, v, k| ApiResource::from_gvk(&GroupVersionKind::gvk(g, v, k));
        Self {
            client,
            default_rps,
            vs_ar: ar("networking.istio.io", "v1", "VirtualService"),
            dr_ar: ar("networking.istio.io", "v1", "DestinationRule"),
            hr_ar: ar("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            virtual_services: Source::new("VirtualService"),
            destination_rules: Source::new("DestinationRule"),
            http_routes: Source::new("HTTPRoute"),
            services: Source::new("Service"),
            pods: Source::new("Pod"),
        }
    }

    pub fn statuses(&self) -> BTreeMap<&'static str, SourceStatus> {
        [
            (self.virtual_services.kind, &self.virtual_services.status),
            (self.destination_rules.kind, &self.destination_rules.status),
            (self.http_routes.kind, &self.http_routes.status),
            (self.services.kind, &self.services.status),
            (self.pods.kind, &self.pods.status),
        ]
        .into_iter()
        .map(|(k, s)| (k, s.clone()))
        .collect()
    }

    async fn list_dynamic(&self, ar: &ApiResource) -> Result<Vec<DynamicObject>, kube::Error> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), ar);
        Ok(api.list(&ListParams::default()).await?.items)
    }

    /// Lists everything once. Kinds that fail keep their last good list.
    pub async fn snapshot(&mut self) -> World {
        let lp = ListParams::default();
        let pods_api: Api<KPod> = Api::all(self.client.clone());
        let svc_api: Api<KService> = Api::all(self.client.clone());
        let (vs, dr, hr, svcs, pods) = futures::join!(
            self.list_dynamic(&self.vs_ar),
            self.list_dynamic(&self.dr_ar),
            self.list_dynamic(&self.hr_ar),
            svc_api.list(&lp),
            pods_api.list(&lp),
        );
        let rps = self.default_rps;
        let routes_of = |objs: Vec<DynamicObject>,
                         parse: fn(&Meta, &serde_json::Value, f64) -> Vec<Route>|
         -> Vec<Route> {
            objs.iter()
                .flat_map(|o| {
                    let ns = o.namespace().unwrap_or_default();
                    let annotations = map(o.metadata.annotations.as_ref());
                    let meta = Meta {
                        namespace: &ns,
                        name: &o.name_any(),
                        annotations: &annotations,
                    };
                    let spec = o.data.get("spec").cloned().unwrap_or_default();
                    parse(&meta, &spec, rps)
                })
                .collect()
        };
        let mut routes = self
            .virtual_services
            .update(vs.map(|v| routes_of(v, parse_virtual_service)));
        routes.extend(
            self.http_routes
                .update(hr.map(|v| routes_of(v, parse_http_route))),
        );
        let destination_rules = self.destination_rules.update(dr.map(|objs| {
            objs.iter()
                .filter_map(|o| {
                    let ns = o.namespace().unwrap_or_default();
                    let annotations = Labels::new();
                    let meta = Meta {
                        namespace: &ns,
                        name: &o.name_any(),
                        annotations: &annotations,
                    };
                    parse_destination_rule(&meta, o.data.get("spec")?)
                })
                .collect()
        }));
        let services = self.services.update(svcs.map(|l| {
            l.items
                .into_iter()
                .map(|s| Service {
                    namespace: s.namespace().unwrap_or_default(),
                    name: s.name_any(),
                    selector: map(s.spec.as_ref().and_then(|sp| sp.selector.as_ref())),
                })
                .collect()
        }));
        let pods = self.pods.update(pods.map(|l| {
            l.items
                .into_iter()
                .map(|p| {
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    Pod {
                        namespace: p.namespace().unwrap_or_default(),
                        name: p.name_any(),
                        labels: map(p.metadata.labels.as_ref()),
                        annotations: map(p.metadata.annotations.as_ref()),
                        ready,
                        deleting: p.metadata.deletion_timestamp.is_some(),
                    }
                })
                .collect()
        }));
        World {
            services,
            pods,
            destination_rules,
            routes,
        }
    }
}
