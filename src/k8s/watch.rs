//! Watches that recover on their own.
//!
//! kube's `Controller` merges all its trigger watches into one stream behind one shared
//! backoff. After a kube-apiserver restart every watch reports its resource version expired
//! (410) once; each report paused *all* triggers for up to 30 s, so a Rollout edited after
//! the restart was not reconciled for minutes (measured by the chaos test: no reaction after
//! 3 minutes). Here each watch backs off on its own (kube's default, client-go's policy) and
//! keeps its errors to itself (logged), so the merged stream never pauses, and a watch that
//! fails never delays the events of the others.

use std::fmt::Debug;

use futures::{Stream, StreamExt, TryStreamExt, future, stream};
use kube::Resource;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;

/// The objects a watch touches (applied or deleted), for a controller's trigger.
pub fn trigger<K>(
    api: kube::Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    quiet(watcher(api, config).default_backoff().touched_objects())
}

/// kubectl's copy of the whole object, in an annotation.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What a cache never needs and kubectl or the apiserver may make large: `managedFields`
/// (often bigger than the object) and kubectl's copy of the whole object.
pub fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// As [`trigger`], also keeping a cache (the controller's store) up to date, of objects
/// made [`slim`].
pub fn reflected<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    quiet(
        watcher(api, config)
            .default_backoff()
            .modify(slim)
            .reflect(writer)
            .touched_objects(),
    )
}

/// As [`reflected`], the cache keeping each object in a smaller form of the controller's own
/// (`C`, made from the object by `From`), which the controller's trigger then gets too. Each
/// event is first handed, as the watch decoded it, to `keep` (an index of the controller's
/// own), and then, once the cache holds it, to `cached`. A relist's objects trigger only once
/// the whole list is in the cache, and only those that changed while the watch was away (see
/// [`Relist`]).
pub fn reflected_into<K, C>(
    api: kube::Api<K>,
    config: watcher::Config,
    writer: Writer<C>,
    keep: impl Fn(&Event<K>) + Send + 'static,
    cached: impl Fn(&Event<C>) + Send + 'static,
) -> impl Stream<Item = Result<C, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    C: From<K> + Resource + Clone + Debug + Send + Sync + 'static,
    C::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let events = watcher(api, config).default_backoff().map_ok(move |event| {
        keep(&event);
        converted(event)
    });
    quiet(reflected_from(events, writer, cached))
}

/// [`reflected_into`]'s work on the watch's events (in a function of its own to be tested on
/// events of a test's making).
fn reflected_from<C>(
    events: impl Stream<Item = Result<Event<C>, watcher::Error>> + Send + 'static,
    writer: Writer<C>,
    cached: impl Fn(&Event<C>) + Send + 'static,
) -> impl Stream<Item = Result<C, watcher::Error>> + Send + 'static
where
    C: Resource + Clone + Debug + Send + Sync + 'static,
    C::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let mut relist = Relist::new(writer.as_reader());
    let store = writer.as_reader();
    events
        .map_ok(move |event| held_copy(&store, event))
        .reflect(writer)
        .flat_map(move |item| {
            let events: Box<dyn Iterator<Item = _> + Send> = match item {
                Ok(event) => Box::new(relist.pass(event).map(Ok)),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
            stream::iter(events)
        })
        .map_ok(move |event| {
            cached(&event);
            event
        })
        .touched_objects()
}

/// What a relist tells the controller, given after the store took each event in. kube's store
/// fills a relist into a buffer of its own and serves the objects from before it until the
/// list is complete, so a reconcile the list woke on the way planned on the old copy (or
/// found none) and nothing woke it again. Now the objects a relist shows changed (another
/// version than the store held, or new) are held, as references, and applied once the store
/// serves the list; an object shown at the version the store holds wakes nothing (at 10,000
/// Rollouts, each relist woke all of them for nothing).
struct Relist<C: Resource + 'static>
where
    C::DynamicType: Eq + std::hash::Hash,
{
    store: Store<C>,
    /// The changed objects of the list under way.
    held: Option<Vec<ObjectRef<C>>>,
}

impl<C> Relist<C>
where
    C: Resource + Clone + Send + Sync + 'static,
    C::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    fn new(store: Store<C>) -> Self {
        Self { store, held: None }
    }

    /// The events to pass on for one the store has taken in.
    fn pass(&mut self, event: Event<C>) -> Box<dyn Iterator<Item = Event<C>> + Send> {
        match (event, self.held.as_mut()) {
            (Event::Init, _) => {
                self.held = Some(Vec::new());
                Box::new(std::iter::once(Event::Init))
            }
            (Event::InitApply(object), Some(held)) => {
                let reference = ObjectRef::from_obj(&object);
                let before = self.store.get(&reference);
                if before
                    .is_none_or(|b| b.meta().resource_version != object.meta().resource_version)
                {
                    held.push(reference);
                }
                Box::new(std::iter::empty())
            }
            (Event::InitDone, _) => {
                let store = self.store.clone();
                let changed = self.held.take().unwrap_or_default();
                // One at a time, from the store: a first list holds every object.
                let applied = changed
                    .into_iter()
                    .filter_map(move |reference| store.get(&reference))
                    .map(|object| Event::Apply(C::clone(&object)));
                Box::new(std::iter::once(Event::InitDone).chain(applied))
            }
            (other, _) => Box::new(std::iter::once(other)),
        }
    }
}

/// A relisted object the store holds at the same version, as the store's copy: kube's store
/// fills a relist into a buffer of its own and swaps it in at the end, so until then it holds
/// each object twice. A clone of the store's copy shares what `C` shares (the cached Rollout's
/// JSON, `rollout::cached`), so an unchanged object, most of a relist, is not held twice.
/// The same resourceVersion is taken as the same object, as [`Relist`] takes it: what the
/// apiserver alone changes as it reads (a CRD's new defaults) shows at the object's next
/// write or the operator's next start, not at a relist.
fn held_copy<C>(store: &Store<C>, event: Event<C>) -> Event<C>
where
    C: Resource + Clone + 'static,
    C::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    match event {
        Event::InitApply(object) => match store.get(&ObjectRef::from_obj(&object)) {
            Some(held) if held.meta().resource_version == object.meta().resource_version => {
                Event::InitApply(C::clone(&held))
            }
            _ => Event::InitApply(object),
        },
        other => other,
    }
}

/// The same event, its object in another form.
fn converted<K, C: From<K>>(event: Event<K>) -> Event<C> {
    match event {
        Event::Apply(object) => Event::Apply(object.into()),
        Event::Delete(object) => Event::Delete(object.into()),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(object.into()),
        Event::InitDone => Event::InitDone,
    }
}

/// What a cache of a controller's own shape made of a watch event (see [`kept`]).
#[derive(Debug, PartialEq)]
pub enum News<K> {
    /// Something changed: the event's object, if it has one, triggers.
    Yes,
    /// The cache already held the object as it is: nothing triggers.
    No,
    /// A list is complete, and these objects, which it did not show, are gone from the cache
    /// (deleted while the watch was away): each triggers as a deletion.
    Gone(Vec<K>),
}

impl<K> News<K> {
    /// `Yes` if the cache changed, else `No`.
    pub fn changed(changed: bool) -> Self {
        if changed { News::Yes } else { News::No }
    }
}

/// As [`trigger`], with each object first changed by `modify` (to keep less of it), and each
/// event then handed to `keep` (a cache of the controller's own shape), which says what was
/// news: an object the cache already held as it is triggers nothing, and an object a relist
/// found gone triggers as deleted. After a relist (a watch away too long, an apiserver
/// restarted) most objects are unchanged, and each would wake its owner for nothing: at
/// 10,000 Rollouts, a relist of their 60,000 ReplicaSets woke them all.
pub fn kept<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    modify: impl FnMut(&mut K) + Send + 'static,
    keep: impl Fn(&Event<K>) -> News<K> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let events = watcher(api, config).default_backoff().modify(modify);
    quiet(kept_from(events, keep))
}

/// [`kept`]'s work on the watch's events.
fn kept_from<K>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    keep: impl Fn(&Event<K>) -> News<K> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + Debug + Send + 'static,
{
    events
        .flat_map(move |item| {
            let events = match item {
                Ok(event) => match keep(&event) {
                    News::Yes => vec![Ok(event)],
                    News::No => Vec::new(),
                    News::Gone(gone) => std::iter::once(event)
                        .chain(gone.into_iter().map(Event::Delete))
                        .map(Ok)
                        .collect(),
                },
                Err(e) => vec![Err(e)],
            };
            stream::iter(events)
        })
        .touched_objects()
}

/// Drops (and logs) the errors a watch retries by itself.
fn quiet<K: Send + 'static>(
    stream: impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
    stream.filter(|item| {
        if let Err(e) = item {
            tracing::debug!(error = %e, "watch error; it retries with its own backoff");
        }
        future::ready(item.is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector;
    use std::sync::{Arc, Mutex};

    fn object(name: &str, version: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    fn name_version(object: &ConfigMap) -> String {
        format!(
            "{}@{}",
            object.name_any(),
            object.resource_version().unwrap_or_default()
        )
    }

    /// What a stream gives for `events`, as `name@version`.
    async fn triggered(
        stream: impl Stream<Item = Result<ConfigMap, watcher::Error>>,
    ) -> Vec<String> {
        stream
            .map(|item| item.map(|o| name_version(&o)).unwrap_or_default())
            .collect()
            .await
    }

    fn ok(
        events: Vec<Event<ConfigMap>>,
    ) -> impl Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Send + 'static {
        stream::iter(events.into_iter().map(Ok))
    }

    /// The first list and a relist as the stream of [`reflected_into`] takes them: what a
    /// relist shows changed or new triggers once the store serves it (and the store serves
    /// the new copy by then), what it shows unchanged triggers nothing, and the cache's hook
    /// sees each event the store took in.
    #[tokio::test]
    async fn a_relist_triggers_what_changed_once_the_store_serves_it() {
        let (store, writer) = reflector::store();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let (seen, store) = (seen.clone(), store.clone());
            move |event: &Event<ConfigMap>| {
                let served = |o: &ConfigMap| {
                    store
                        .get(&ObjectRef::from_obj(o))
                        .map(|s| name_version(&s))
                        .unwrap_or_default()
                };
                let note = match event {
                    Event::Init => "init".to_string(),
                    Event::InitDone => "done".to_string(),
                    Event::InitApply(o) => format!("listed {}", name_version(o)),
                    Event::Apply(o) => format!("apply {} served {}", name_version(o), served(o)),
                    Event::Delete(o) => format!("delete {}", name_version(o)),
                };
                seen.lock().unwrap().push(note);
            }
        };
        let events = ok(vec![
            Event::Init,
            Event::InitApply(object("a", "1")),
            Event::InitApply(object("b", "1")),
            Event::InitApply(object("gone", "1")),
            Event::InitDone,
            Event::Apply(object("b", "2")),
            // The watch was away: b changed, c came, gone went. (a is listed at the version
            // the store holds; the store keeps its own copy, told apart by its data.)
            Event::Init,
            Event::InitApply(ConfigMap {
                data: Some([("listed".to_string(), "again".to_string())].into()),
                ..object("a", "1")
            }),
            Event::InitApply(object("b", "3")),
            Event::InitApply(object("c", "4")),
            Event::InitDone,
            Event::Delete(object("c", "4")),
        ]);
        assert_eq!(
            triggered(reflected_from(events, writer, hook)).await,
            ["a@1", "b@1", "gone@1", "b@2", "b@3", "c@4", "c@4"],
            "the first list once it is in; then b's watch event; then only what changed"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "init",
                "done",
                "apply a@1 served a@1",
                "apply b@1 served b@1",
                "apply gone@1 served gone@1",
                "apply b@2 served b@2",
                "init",
                "done",
                "apply b@3 served b@3",
                "apply c@4 served c@4",
                "delete c@4",
            ]
        );
        assert_eq!(
            store.len(),
            2,
            "a and b: gone went with the relist, c deleted"
        );
        let a = store.get(&ObjectRef::from_obj(&object("a", "1")));
        assert_eq!(
            a.and_then(|a| a.data.clone()),
            None,
            "the store kept its copy of a, not the relist's"
        );
    }

    /// A relisted object the store holds at the same version is handed on as the store's
    /// copy (whose clone shares what the type shares); any other event as it came.
    #[test]
    fn a_relist_hands_the_store_its_own_copy_of_what_did_not_change() {
        let (store, mut writer) = reflector::store();
        let with = |name: &str, version: &str, note: &str| ConfigMap {
            data: Some([("note".to_string(), note.to_string())].into()),
            ..object(name, version)
        };
        for event in [
            Event::Init,
            Event::InitApply(with("a", "1", "held")),
            Event::InitApply(with("b", "1", "held")),
            Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
        }
        let note = |event: Event<ConfigMap>| match event {
            Event::InitApply(o) | Event::Apply(o) => {
                format!(
                    "{}@{} {}",
                    o.name_any(),
                    o.resource_version().unwrap_or_default(),
                    o.data.unwrap_or_default()["note"]
                )
            }
            _ => "no object".into(),
        };
        let passed = |event| note(held_copy(&store, event));
        assert_eq!(
            passed(Event::InitApply(with("a", "1", "listed"))),
            "a@1 held"
        );
        assert_eq!(
            passed(Event::InitApply(with("b", "2", "listed"))),
            "b@2 listed"
        );
        assert_eq!(
            passed(Event::InitApply(with("c", "1", "listed"))),
            "c@1 listed"
        );
        assert_eq!(
            passed(Event::Apply(with("a", "1", "listed"))),
            "a@1 listed",
            "a watch event is not a relist's"
        );
    }

    /// [`kept`]'s stream: the cache's word decides what triggers.
    #[tokio::test]
    async fn a_kept_watch_triggers_what_the_cache_calls_news() {
        let events = ok(vec![
            Event::Init,
            Event::InitApply(object("a", "1")),
            Event::InitApply(object("b", "1")),
            Event::InitDone,
            Event::Apply(object("b", "2")),
            Event::Delete(object("a", "1")),
        ]);
        let keep = |event: &Event<ConfigMap>| match event {
            Event::InitApply(o) if o.name_any() == "a" => News::No,
            Event::InitDone => News::Gone(vec![object("away", "0")]),
            _ => News::Yes,
        };
        assert_eq!(
            triggered(kept_from(events, keep)).await,
            ["b@1", "away@0", "b@2", "a@1"]
        );
    }
}
