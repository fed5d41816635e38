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
//! and the apiserver keeps the managed fields a write leaves out), as JSON text rather than
//! decoded maps, and decoded when a reconcile reads one.
//! Services are kept as their name, version and selector only: all Sluice reads of them.
//! The watches see every object of these kinds in Sluice's scope, used by a Rollout or not, so
//! this memory follows the cluster's routing objects rather than the Rollouts.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, ObjectMeta};
use kube::runtime::watcher::Event;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::k8s::freshness::{Freshness, Read};

/// One object's copy.
#[derive(Debug)]
struct StoredCopy {
    version: Option<String>,
    json: Box<str>,
}

impl StoredCopy {
    fn of(object: &DynamicObject) -> Option<Arc<StoredCopy>> {
        let json = serde_json::to_string(object).ok()?;
        Some(Arc::new(StoredCopy {
            version: object.resource_version(),
            json: json.into_boxed_str(),
        }))
    }
}

/// One kind's copies, by `namespace/name`.
#[derive(Debug, Default)]
struct Kept {
    objects: HashMap<String, Arc<StoredCopy>>,
    /// The objects a (re)list has shown so far. Each is served as soon as it is listed (a
    /// Rollout the list wakes must see it); at the list's end, copies it did not show are gone.
    listed: Option<HashSet<String>>,
    /// Whether a first list is complete (before it, every read is fresh).
    ready: bool,
}

/// The copies of every watched kind, and the versions Sluice's writes are awaited at.
#[derive(Debug, Default)]
pub struct RoutingCache {
    kinds: Mutex<HashMap<String, Kept>>,
    freshness: Freshness,
}

/// An object's place in a kind's copies.
fn place(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// An object's key among every kind's (the routers' kept reads use it too).
pub fn key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind} {}", place(namespace, name))
}

fn place_of(object: &DynamicObject) -> String {
    place(&object.namespace().unwrap_or_default(), &object.name_any())
}

fn key_of(kind: &str, object: &DynamicObject) -> String {
    key(
        kind,
        &object.namespace().unwrap_or_default(),
        &object.name_any(),
    )
}

/// What a route's copy keeps: all but `managedFields`.
pub fn strip_route(object: &mut DynamicObject) {
    object.metadata.managed_fields = None;
}

/// What a Service's copy keeps: its name, version and selector. Never written back: Sluice
/// writes a Service's selector by a merge patch of its one key.
fn service_copy(service: &Service) -> DynamicObject {
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

    /// Changes the copies of `kind` (the freshness map is never locked meanwhile).
    fn with_kind(&self, kind: &str, change: impl FnOnce(&mut Kept)) {
        change(self.kinds().entry(kind.to_string()).or_default());
    }

    /// A watch of `kind` is starting: from now on Sluice's writes of its objects are awaited
    /// (a write before its first list shows would otherwise be forgotten).
    pub fn watching(&self, kind: &str) {
        self.with_kind(kind, |_| {});
    }

    /// Takes in one watch event of `kind` (already stripped).
    pub fn apply(&self, kind: &str, event: &Event<DynamicObject>) {
        match event {
            Event::Init => self.with_kind(kind, |kept| kept.listed = Some(HashSet::new())),
            Event::InitDone => self.with_kind(kind, |kept| {
                if let Some(listed) = kept.listed.take() {
                    kept.objects.retain(|place, _| listed.contains(place));
                }
                kept.ready = true;
            }),
            Event::InitApply(object) | Event::Apply(object) => {
                let (place, copy) = (place_of(object), StoredCopy::of(object));
                let listing = matches!(event, Event::InitApply(_));
                self.with_kind(kind, |kept| {
                    if let (true, Some(listed)) = (listing, kept.listed.as_mut()) {
                        listed.insert(place.clone());
                    }
                    match copy {
                        Some(copy) => kept.objects.insert(place, copy),
                        None => kept.objects.remove(&place),
                    };
                });
                if let Some(version) = object.resource_version() {
                    self.freshness.seen(&key_of(kind, object), &version);
                }
            }
            Event::Delete(object) => {
                self.with_kind(kind, |kept| {
                    kept.objects.remove(&place_of(object));
                });
                self.freshness.forget(&key_of(kind, object));
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
        let copy = || {
            let kinds = self.kinds();
            let kept = kinds.get(kind).filter(|k| k.ready)?;
            kept.objects.get(&place(namespace, name)).cloned()
        };
        let version = copy()?.version.clone();
        let read = self
            .freshness
            .read(&key(kind, namespace, name), version.as_deref());
        // The copy is taken again after the decision: the watch may have shown the version
        // awaited (and so ended the wait) since `version` was read, and it keeps the copy
        // before it ends the wait.
        (read == Read::Cache)
            .then(|| serde_json::from_str(&copy()?.json).ok())
            .flatten()
    }

    /// The cached copy's version, if there is a copy.
    fn cached_version(&self, kind: &str, namespace: &str, name: &str) -> Option<Option<String>> {
        let kinds = self.kinds();
        let copy = kinds.get(kind)?.objects.get(&place(namespace, name))?;
        Some(copy.version.clone())
    }

    /// Whether `kind` is watched (its copies can show a version Sluice awaits).
    fn watches(&self, kind: &str) -> bool {
        self.kinds().contains_key(kind)
    }

    /// A read from the apiserver returned `fresh` (`None`: the object does not exist).
    fn read_fresh(&self, kind: &str, namespace: &str, name: &str, fresh: Option<&DynamicObject>) {
        let key = key(kind, namespace, name);
        let Some(fresh) = fresh else {
            self.freshness.forget(&key);
            return;
        };
        // Without a copy there is nothing to compare: the next read is fresh anyway, and
        // nothing is left behind for an object the watches never show.
        if let Some(cached) = self.cached_version(kind, namespace, name) {
            self.freshness
                .read_fresh(&key, fresh.resource_version().as_deref(), cached.as_deref());
        }
    }

    /// Sluice's write of an object produced `version`: its copy is not planned on until it
    /// shows that version.
    pub fn wrote(&self, kind: &str, namespace: &str, name: &str, version: Option<String>) {
        if let Some(version) = version.filter(|_| self.watches(kind)) {
            self.freshness.wrote(&key(kind, namespace, name), &version);
        }
    }

    /// Sluice's write of an object was refused as a conflict (someone else wrote it since the
    /// copy): its next read is fresh.
    pub fn distrust(&self, kind: &str, namespace: &str, name: &str) {
        if self.watches(kind) {
            self.freshness.distrust(&key(kind, namespace, name));
        }
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

    /// Reads an object (a cached copy when the rule allows, else from the apiserver); `None`
    /// when it does not exist.
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
        self.cache.read_fresh(kind, namespace, name, fresh.as_ref());
        Ok(fresh)
    }

    /// Sluice wrote an object of `kind`, producing `version`.
    pub fn wrote(&self, kind: &str, namespace: &str, name: &str, version: Option<String>) {
        self.cache.wrote(kind, namespace, name, version);
    }

    /// Sluice's write of an object was refused as a conflict: it is read fresh next time.
    pub fn distrust(&self, kind: &str, namespace: &str, name: &str) {
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

        // A relist serves what it lists at once (it wakes the Rollouts that route through
        // each object, and a change made while the watch was away must be seen), and drops
        // what it did not list when it is complete.
        cache.apply(kind, &Event::Apply(vs("old", "7")));
        cache.apply(kind, &Event::Apply(vs("kept", "7")));
        cache.apply(kind, &Event::Init);
        cache.apply(kind, &Event::InitApply(vs("kept", "9")));
        cache.apply(kind, &Event::InitApply(vs("new", "8")));
        assert_eq!(cache.len(kind), 3);
        let relisted = cache.cached(kind, "shop", "kept").unwrap();
        assert_eq!(relisted.resource_version().as_deref(), Some("9"));
        assert!(cache.cached(kind, "shop", "old").is_some());
        cache.apply(kind, &Event::InitDone);
        assert!(cache.cached(kind, "shop", "old").is_none());
        assert!(cache.cached(kind, "shop", "new").is_some());
        assert_eq!(cache.len(kind), 2);
    }

    #[test]
    fn nothing_is_left_awaited_for_objects_nobody_reads_again() {
        let cache = RoutingCache::default();
        let kind = "DestinationRule";
        // A kind nobody watches awaits nothing: no copy could ever show the version.
        cache.wrote(kind, "shop", "web", Some("4".into()));
        cache.distrust(kind, "shop", "web");
        assert!(cache.freshness.is_empty());
        cache.watching(kind);
        cache.apply(kind, &Event::Init);
        cache.apply(kind, &Event::InitDone);
        // Written, then shown by the watch: forgotten without a read.
        cache.wrote(kind, "shop", "web", Some("5".into()));
        cache.apply(kind, &Event::Apply(vs("web", "5")));
        assert!(cache.freshness.is_empty());
        // Written, then deleted.
        cache.wrote(kind, "shop", "web", Some("6".into()));
        cache.apply(kind, &Event::Delete(vs("web", "6")));
        assert!(cache.freshness.is_empty());
        // A fresh read of an object without a copy, or of one that does not exist.
        cache.read_fresh(kind, "shop", "elsewhere", Some(&vs("elsewhere", "3")));
        cache.wrote(kind, "shop", "gone", Some("7".into()));
        cache.read_fresh(kind, "shop", "gone", None);
        assert!(cache.freshness.is_empty());
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
