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
//! Until the cache shows a route write of Sluice's, the write's answer is planned on, as a
//! Rollout's status write's is (rollout/written.rs): the route's own watch event and the
//! Rollout's wake reconciles in that gap, and each read the route from the apiserver (78
//! VirtualServices and 53 DestinationRules while 100 releases ran at N = 200, each in the lane
//! a moving release waits on). A route write replaces the object at the version it read, so
//! its answer comes right after that version: it is served while the cache shows that version
//! or one known to come before it (Sluice's own earlier writes, each answered before the next
//! was sent). Once the cache shows anything else the object is read from the apiserver, as
//! before. Services are written by a merge patch, which names no version: no answer is kept.
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

use crate::k8s::freshness::{Before, Freshness, Read};
use crate::k8s::watch::News;

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

/// At most this many route write answers are kept (a few KB each); past it a reconcile reads
/// from the apiserver until the cache shows the write, as before.
const ANSWERS_KEPT: usize = 1_000;

/// The answer to Sluice's last write of a route, and the versions known to come before it.
#[derive(Debug)]
struct Answer {
    before: Before,
    copy: Arc<StoredCopy>,
}

/// The copies of every watched kind, the versions Sluice's writes are awaited at, and the
/// answers to its route writes the cache does not show yet.
#[derive(Debug, Default)]
pub struct RoutingCache {
    kinds: Mutex<HashMap<String, Kept>>,
    freshness: Freshness,
    answers: Mutex<HashMap<String, Answer>>,
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

    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the copies of `kind` (the freshness map is never locked meanwhile).
    fn with_kind<T>(&self, kind: &str, change: impl FnOnce(&mut Kept) -> T) -> T {
        change(self.kinds().entry(kind.to_string()).or_default())
    }

    /// A watch of `kind` is starting: from now on Sluice's writes of its objects are awaited
    /// (a write before its first list shows would otherwise be forgotten).
    pub fn watching(&self, kind: &str) {
        self.with_kind(kind, |_| {});
    }

    /// Takes in one watch event of `kind` (already stripped), and says what was news: not an
    /// object the cache already holds as it is (a relist shows most so, and the copy is
    /// kept), which then wakes no Rollout; and the objects a relist found gone, which wake
    /// theirs as a deletion would have.
    pub fn apply(&self, kind: &str, event: &Event<DynamicObject>) -> News<DynamicObject> {
        match event {
            Event::Init => {
                self.with_kind(kind, |kept| kept.listed = Some(HashSet::new()));
                News::Yes
            }
            Event::InitDone => {
                let gone = self.with_kind(kind, |kept| {
                    let mut gone = Vec::new();
                    if let Some(listed) = kept.listed.take() {
                        kept.objects.retain(|place, copy| {
                            let shown = listed.contains(place);
                            if !shown {
                                gone.extend(serde_json::from_str::<DynamicObject>(&copy.json).ok());
                            }
                            shown
                        });
                    }
                    kept.ready = true;
                    gone
                });
                for object in &gone {
                    self.forget(&key_of(kind, object));
                }
                News::Gone(gone)
            }
            Event::InitApply(object) | Event::Apply(object) => {
                let (place, copy) = (place_of(object), StoredCopy::of(object));
                let listing = matches!(event, Event::InitApply(_));
                let news = self.with_kind(kind, |kept| {
                    if let (true, Some(listed)) = (listing, kept.listed.as_mut()) {
                        listed.insert(place.clone());
                    }
                    let Some(copy) = copy else {
                        kept.objects.remove(&place);
                        return true;
                    };
                    if kept
                        .objects
                        .get(&place)
                        .is_some_and(|c| c.json == copy.json)
                    {
                        return false;
                    }
                    kept.objects.insert(place, copy);
                    true
                });
                let key = key_of(kind, object);
                let version = object.resource_version();
                if let Some(version) = &version {
                    self.freshness.seen(&key, version);
                }
                // An answer the cache moved past (to the write itself, or to what may come
                // after it) is of no more use.
                let mut answers = self.answers();
                if answers
                    .get(&key)
                    .is_some_and(|a| !a.before.has(version.as_deref()))
                {
                    answers.remove(&key);
                }
                News::changed(news)
            }
            Event::Delete(object) => {
                self.with_kind(kind, |kept| {
                    kept.objects.remove(&place_of(object));
                });
                self.forget(&key_of(kind, object));
                News::Yes
            }
        }
    }

    /// Takes in one watch event of a Service.
    pub fn apply_service(&self, event: &Event<Service>) -> News<Service> {
        let copy = match event {
            Event::Init => Event::Init,
            Event::InitDone => Event::InitDone,
            Event::InitApply(s) => Event::InitApply(service_copy(s)),
            Event::Apply(s) => Event::Apply(service_copy(s)),
            Event::Delete(s) => Event::Delete(service_copy(s)),
        };
        match self.apply("Service", &copy) {
            News::Yes => News::Yes,
            News::No => News::No,
            // Its name is all a Service's wake needs.
            News::Gone(gone) => News::Gone(
                gone.into_iter()
                    .map(|copy| Service {
                        metadata: copy.metadata,
                        ..Service::default()
                    })
                    .collect(),
            ),
        }
    }

    /// The copy to plan on: none before the kind's first list is complete, and none when
    /// there is no copy; while a write of Sluice's is awaited, the write's answer if the cache
    /// still shows a version known to come before it, else none.
    fn cached(&self, kind: &str, namespace: &str, name: &str) -> Option<DynamicObject> {
        let copy = || {
            let kinds = self.kinds();
            let kept = kinds.get(kind).filter(|k| k.ready)?;
            kept.objects.get(&place(namespace, name)).cloned()
        };
        let key = key(kind, namespace, name);
        let version = copy()?.version.clone();
        let chosen = match self.freshness.read(&key, version.as_deref()) {
            // The copy is taken again after the decision: the watch may have shown the
            // version awaited (and so ended the wait) since `version` was read, and it keeps
            // the copy before it ends the wait.
            Read::Cache => {
                self.answers().remove(&key);
                copy()?
            }
            Read::Fresh => {
                let awaited = self.freshness.awaited(&key);
                let answers = self.answers();
                let answer = answers
                    .get(&key)
                    .filter(|a| a.copy.version == awaited && a.before.has(version.as_deref()))?;
                answer.copy.clone()
            }
        };
        serde_json::from_str(&chosen.json).ok()
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
        self.answers().remove(&key);
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

    /// Sluice replaced a route that was at version `sent`, and the apiserver answered with
    /// `answer`: until the cache shows it, the answer is planned on (see the module's doc).
    pub fn wrote_route(&self, kind: &str, sent: Option<String>, answer: &DynamicObject) {
        let (namespace, name) = (answer.namespace().unwrap_or_default(), answer.name_any());
        self.wrote(kind, &namespace, &name, answer.resource_version());
        if !self.watches(kind) {
            return;
        }
        let mut stripped = answer.clone();
        strip_route(&mut stripped);
        let Some(copy) = StoredCopy::of(&stripped) else {
            return;
        };
        let key = key(kind, &namespace, &name);
        let mut answers = self.answers();
        // Each earlier answer, and what came before it, was answered before this write was
        // sent: it all comes before this answer.
        let mut before = Before::default();
        if let Some(last) = answers.remove(&key) {
            before.add_all(&last.before);
            before.add(last.copy.version.clone());
        }
        before.add(sent);
        if answers.len() < ANSWERS_KEPT {
            answers.insert(key, Answer { before, copy });
        }
    }

    /// Sluice's write of an object was refused as a conflict (someone else wrote it since the
    /// copy): its next read is fresh.
    pub fn distrust(&self, kind: &str, namespace: &str, name: &str) {
        if self.watches(kind) {
            let key = key(kind, namespace, name);
            self.answers().remove(&key);
            self.freshness.distrust(&key);
        }
    }

    /// The object is gone.
    fn forget(&self, key: &str) {
        self.answers().remove(key);
        self.freshness.forget(key);
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

    /// Sluice replaced a route that was at version `sent`, and the apiserver answered with
    /// `answer`.
    pub fn wrote_route(&self, kind: &str, sent: Option<String>, answer: &DynamicObject) {
        self.cache.wrote_route(kind, sent, answer);
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

        // A relist serves what it lists at once (a change made while the watch was away
        // must be seen, and wakes the Rollouts that route through the object), and drops
        // what it did not list when it is complete. An object it lists as the cache holds
        // it is no news (it wakes no Rollout).
        cache.apply(kind, &Event::Apply(vs("old", "7")));
        cache.apply(kind, &Event::Apply(vs("kept", "7")));
        cache.apply(kind, &Event::Apply(vs("same", "7")));
        cache.apply(kind, &Event::Init);
        let news = |event| matches!(cache.apply(kind, &event), News::Yes);
        assert!(news(Event::InitApply(vs("kept", "9"))));
        assert!(news(Event::InitApply(vs("new", "8"))));
        assert!(!news(Event::InitApply(vs("same", "7"))), "unchanged");
        assert_eq!(cache.len(kind), 4);
        let relisted = cache.cached(kind, "shop", "kept").unwrap();
        assert_eq!(relisted.resource_version().as_deref(), Some("9"));
        assert!(cache.cached(kind, "shop", "old").is_some());
        let News::Gone(gone) = cache.apply(kind, &Event::InitDone) else {
            panic!("a completed list says what it found gone");
        };
        assert_eq!(
            gone.iter().map(ResourceExt::name_any).collect::<Vec<_>>(),
            ["old"],
            "gone while the watch was away: wakes what routes through it"
        );
        assert!(cache.cached(kind, "shop", "old").is_none());
        assert!(cache.cached(kind, "shop", "new").is_some());
        assert!(
            cache.cached(kind, "shop", "same").is_some(),
            "kept as it was"
        );
        assert_eq!(cache.len(kind), 3);
        assert!(matches!(
            cache.apply(kind, &Event::Delete(vs("same", "7"))),
            News::Yes
        ));
    }

    #[test]
    fn a_route_write_is_planned_on_from_its_answer_until_the_cache_moves() {
        let cache = RoutingCache::default();
        let kind = "VirtualService";
        let version = |cache: &RoutingCache| {
            cache
                .cached(kind, "shop", "web")
                .and_then(|c| c.resource_version())
        };
        // A kind nobody watches keeps no answer.
        cache.wrote_route(kind, Some("4".into()), &vs("web", "5"));
        assert!(cache.answers().is_empty() && cache.freshness.is_empty());
        cache.apply(kind, &Event::Init);
        cache.apply(kind, &Event::InitApply(vs("web", "5")));
        cache.apply(kind, &Event::InitDone);

        // Sluice replaced version 5; the answer (6) comes with the managed fields.
        let mut answer = vs("web", "6");
        answer.metadata.managed_fields = Some(vec![Default::default()]);
        answer.data["spec"]["http"][0]["route"] = json!([{"weight": 50}]);
        cache.wrote_route(kind, Some("5".into()), &answer);
        let planned = cache.cached(kind, "shop", "web").unwrap();
        assert_eq!(planned.resource_version().as_deref(), Some("6"));
        assert_eq!(planned.data, answer.data);
        assert!(planned.metadata.managed_fields.is_none());

        // A second write, from that answer, before the watch shows either.
        cache.wrote_route(kind, Some("6".into()), &vs("web", "7"));
        assert_eq!(version(&cache).as_deref(), Some("7"));
        // The watch shows the first write: it comes before the second's answer.
        cache.apply(kind, &Event::Apply(vs("web", "6")));
        assert_eq!(version(&cache).as_deref(), Some("7"));
        // The watch shows the second: the cache, and nothing is left kept.
        cache.apply(kind, &Event::Apply(vs("web", "7")));
        assert_eq!(version(&cache).as_deref(), Some("7"));
        assert!(cache.answers().is_empty() && cache.freshness.is_empty());

        // The cache shows a version not known to come before the answer (someone else's
        // write): read from the apiserver.
        cache.wrote_route(kind, Some("7".into()), &vs("web", "8"));
        cache.apply(kind, &Event::Apply(vs("web", "9")));
        assert_eq!(version(&cache), None);
        assert!(cache.answers().is_empty());

        // A fresh read, a conflict and a deletion each forget the answer.
        cache.read_fresh(kind, "shop", "web", Some(&vs("web", "9")));
        assert_eq!(version(&cache).as_deref(), Some("9"));
        cache.wrote_route(kind, Some("9".into()), &vs("web", "10"));
        cache.read_fresh(kind, "shop", "web", Some(&vs("web", "10")));
        assert!(cache.answers().is_empty());
        cache.wrote_route(kind, Some("10".into()), &vs("web", "11"));
        cache.distrust(kind, "shop", "web");
        assert_eq!(version(&cache), None);
        assert!(cache.answers().is_empty());
        cache.wrote_route(kind, Some("9".into()), &vs("web", "12"));
        cache.apply(kind, &Event::Delete(vs("web", "9")));
        assert_eq!(version(&cache), None);
        assert!(cache.answers().is_empty() && cache.freshness.is_empty());
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
