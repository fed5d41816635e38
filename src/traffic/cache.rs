//! The routing objects (VirtualServices, DestinationRules, HTTPRoutes, Services) as the
//! Rollout controller's watches last saw them, so a reconcile that changes nothing sends no
//! request: at 10,000 Rollouts the idle resync read about 75 of them a second, and during
//! releases those reads queued in front of the steps.
//!
//! The rule is the Rollouts' own (k8s/freshness.rs): a copy is planned on once the cache shows
//! the version Sluice's last write of it produced; until then, and whenever the cache has no
//! copy or has not finished its first list, the object is read from the apiserver. A copy that
//! someone else changed meanwhile is safe: a route write carries the copy's resourceVersion and
//! is refused as a conflict (retried on a fresh read), a Service selector write states the
//! whole desired key, and the other writer's change reaches the watch, which wakes the Rollout.
//!
//! Route objects are kept whole but for `managedFields` (a route write sends the object back,
//! and the apiserver keeps the managed fields a write leaves out), as JSON text: a third of
//! the memory of the decoded object, and decoding a copy when it is read costs microseconds.
//! Services are kept as their name, version and selector only: all Sluice reads of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, ObjectMeta};
use kube::runtime::watcher::Event;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::k8s::freshness::{Freshness, Read};

/// One object's copy.
#[derive(Debug)]
struct Copy {
    version: Option<String>,
    json: Box<str>,
}

impl Copy {
    fn of(object: &DynamicObject) -> Option<Arc<Copy>> {
        let json = serde_json::to_string(object).ok()?;
        Some(Arc::new(Copy {
            version: object.resource_version(),
            json: json.into_boxed_str(),
        }))
    }
}

/// One kind's copies, by `namespace/name`.
#[derive(Debug, Default)]
struct Kept {
    objects: HashMap<String, Arc<Copy>>,
    /// Built during a (re)list, swapped in when it is complete.
    building: Option<HashMap<String, Arc<Copy>>>,
    /// Whether a first list is complete (before it, every read is fresh).
    ready: bool,
}

/// The copies of every watched kind, and the versions Sluice's writes are awaited at.
#[derive(Debug, Default)]
pub struct RoutingCache {
    kinds: Mutex<HashMap<String, Kept>>,
    freshness: Freshness,
}

fn key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind} {namespace}/{name}")
}

fn object_key(object: &DynamicObject) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// What a route's copy keeps: all but `managedFields`.
pub fn strip_route(object: &mut DynamicObject) {
    object.metadata.managed_fields = None;
}

/// What a Service's copy keeps: its name, version and selector.
pub fn service_copy(service: &Service) -> DynamicObject {
    let selector = service.spec.as_ref().and_then(|s| s.selector.clone());
    DynamicObject {
        types: None,
        metadata: ObjectMeta {
            name: service.metadata.name.clone(),
            namespace: service.metadata.namespace.clone(),
            resource_version: service.metadata.resource_version.clone(),
            ..ObjectMeta::default()
        },
        data: json!({"spec": {"selector": selector}}),
    }
}

impl RoutingCache {
    fn kinds(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        // The map holds plain copies: one left by a panicking holder is still valid.
        self.kinds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in one watch event of `kind` (already stripped).
    pub fn apply(&self, kind: &str, event: &Event<DynamicObject>) {
        let mut kinds = self.kinds();
        let kept = kinds.entry(kind.to_string()).or_default();
        match event {
            Event::Init => kept.building = Some(HashMap::new()),
            Event::InitApply(object) => {
                if let (Some(building), Some(copy)) = (kept.building.as_mut(), Copy::of(object)) {
                    building.insert(object_key(object), copy);
                }
            }
            Event::InitDone => {
                if let Some(built) = kept.building.take() {
                    kept.objects = built;
                }
                kept.ready = true;
            }
            Event::Apply(object) => match Copy::of(object) {
                Some(copy) => {
                    kept.objects.insert(object_key(object), copy);
                }
                None => {
                    kept.objects.remove(&object_key(object));
                }
            },
            Event::Delete(object) => {
                kept.objects.remove(&object_key(object));
            }
        }
    }

    /// Takes in one watch event of a Service.
    pub fn apply_service(&self, event: &Event<Service>) {
        let copy = match event {
            Event::Init => Event::Init,
            Event::InitDone => Event::InitDone,
            Event::InitApply(s) => Event::InitApply(service_copy(s)),
            Event::Apply(s) => Event::Apply(service_copy(s)),
            Event::Delete(s) => Event::Delete(service_copy(s)),
        };
        self.apply("Service", &copy);
    }

    /// The copy to plan on: none before the kind's first list is complete, none when there is
    /// no copy, and none while a write of Sluice's is awaited.
    fn cached(&self, kind: &str, namespace: &str, name: &str) -> Option<DynamicObject> {
        let copy = {
            let kinds = self.kinds();
            let kept = kinds.get(kind).filter(|k| k.ready)?;
            kept.objects.get(&format!("{namespace}/{name}"))?.clone()
        };
        let read = self
            .freshness
            .read(&key(kind, namespace, name), copy.version.as_deref());
        (read == Read::Cache)
            .then(|| serde_json::from_str(&copy.json).ok())
            .flatten()
    }

    /// The cached copy's version, if any.
    fn cached_version(&self, kind: &str, namespace: &str, name: &str) -> Option<String> {
        let kinds = self.kinds();
        kinds
            .get(kind)?
            .objects
            .get(&format!("{namespace}/{name}"))?
            .version
            .clone()
    }

    /// The version Sluice's write of an object produced: its copy is awaited at it.
    pub fn wrote(&self, kind: &str, namespace: &str, name: &str, version: Option<String>) {
        if let Some(version) = version {
            self.freshness.wrote(&key(kind, namespace, name), &version);
        }
    }

    /// Someone else wrote the object since its copy was read: the copy is not planned on
    /// again until a fresh read (a version no object has is awaited, and the fresh read's
    /// version replaces it).
    pub fn distrust(&self, kind: &str, namespace: &str, name: &str) {
        self.freshness.wrote(&key(kind, namespace, name), "");
    }

    /// How many copies of `kind` are kept.
    #[cfg(test)]
    fn len(&self, kind: &str) -> usize {
        self.kinds().get(kind).map_or(0, |k| k.objects.len())
    }
}

/// How routing reaches the cluster: the cache for reads it can answer, the client for the rest
/// and for every write.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    cache: Arc<RoutingCache>,
}

impl Cluster {
    pub fn new(client: Client, cache: Arc<RoutingCache>) -> Self {
        Self { client, cache }
    }

    /// Reads an object of `kind` (a cached copy when the rule allows, else from the
    /// apiserver); `None` when it does not exist.
    pub async fn read(
        &self,
        resource: &ApiResource,
        namespace: &str,
        name: &str,
    ) -> Result<Option<DynamicObject>, kube::Error> {
        let kind = resource.kind.as_str();
        if let Some(copy) = self.cache.cached(kind, namespace, name) {
            return Ok(Some(copy));
        }
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, resource);
        let fresh = api.get_opt(name).await?;
        if let Some(fresh) = &fresh {
            let cached = self.cache.cached_version(kind, namespace, name);
            self.cache.freshness.read_fresh(
                &key(kind, namespace, name),
                fresh.resource_version().as_deref(),
                cached.as_deref(),
            );
        }
        Ok(fresh)
    }

    /// Sluice wrote an object of `kind`: its copy is not planned on until it shows `version`.
    pub fn wrote(&self, kind: &str, namespace: &str, name: &str, version: Option<String>) {
        self.cache.wrote(kind, namespace, name, version);
    }

    /// A write was refused as a conflict: the object is read fresh next time.
    pub fn conflicted(&self, kind: &str, namespace: &str, name: &str) {
        self.cache.distrust(kind, namespace, name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(name: &str, version: &str) -> DynamicObject {
        let mut object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": version,
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"http": [{"route": []}]}
        }))
        .unwrap();
        strip_route(&mut object);
        object
    }

    #[test]
    fn copies_are_served_after_the_first_list_until_a_write_is_awaited() {
        let cache = RoutingCache::default();
        let kind = "VirtualService";
        assert!(cache.cached(kind, "shop", "web").is_none(), "no watch yet");
        cache.apply(kind, &Event::Init);
        cache.apply(kind, &Event::InitApply(vs("web", "5")));
        assert!(
            cache.cached(kind, "shop", "web").is_none(),
            "list incomplete"
        );
        cache.apply(kind, &Event::InitDone);
        let copy = cache.cached(kind, "shop", "web").unwrap();
        assert_eq!(copy.resource_version().as_deref(), Some("5"));
        assert!(copy.metadata.managed_fields.is_none());

        // Sluice wrote version 6: the copy at 5 is not planned on, the one at 6 is.
        cache.wrote(kind, "shop", "web", Some("6".into()));
        assert!(cache.cached(kind, "shop", "web").is_none());
        cache.apply(kind, &Event::Apply(vs("web", "6")));
        assert!(cache.cached(kind, "shop", "web").is_some());

        // A write refused as a conflict: read fresh until the fresh read's version shows.
        cache.distrust(kind, "shop", "web");
        assert!(cache.cached(kind, "shop", "web").is_none());
        cache
            .freshness
            .read_fresh(&key(kind, "shop", "web"), Some("6"), Some("6"));
        assert!(cache.cached(kind, "shop", "web").is_some());

        cache.apply(kind, &Event::Delete(vs("web", "6")));
        assert!(
            cache.cached(kind, "shop", "web").is_none(),
            "gone: read fresh"
        );
        assert!(cache.cached("DestinationRule", "shop", "web").is_none());

        // A relist replaces everything once complete.
        cache.apply(kind, &Event::Apply(vs("old", "7")));
        cache.apply(kind, &Event::Init);
        cache.apply(kind, &Event::InitApply(vs("new", "8")));
        assert_eq!(
            cache.len(kind),
            1,
            "served as before until the relist is complete"
        );
        assert!(cache.cached(kind, "shop", "old").is_some());
        cache.apply(kind, &Event::InitDone);
        assert!(cache.cached(kind, "shop", "old").is_none());
        assert!(cache.cached(kind, "shop", "new").is_some());
    }

    #[test]
    fn a_service_is_kept_as_its_selector() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "3",
                         "labels": {"team": "a"}, "annotations": {"big": "x"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], "type": "ClusterIP"}
        }))
        .unwrap();
        let cache = RoutingCache::default();
        cache.apply_service(&Event::Init);
        cache.apply_service(&Event::InitApply(service));
        cache.apply_service(&Event::InitDone);
        let copy = cache.cached("Service", "shop", "web").unwrap();
        assert_eq!(copy.data, json!({"spec": {"selector": {"app": "web"}}}));
        assert!(copy.metadata.labels.is_none() && copy.metadata.annotations.is_none());
        assert_eq!(copy.resource_version().as_deref(), Some("3"));
    }
}
