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

use futures::{Stream, StreamExt, TryStreamExt, future};
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
/// own), and then, once the cache holds it, to `cached`.
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
    C::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let store = writer.as_reader();
    quiet(
        watcher(api, config)
            .default_backoff()
            .map_ok(move |event| {
                keep(&event);
                converted(event)
            })
            .reflect(writer)
            .map_ok(move |event| {
                cached(&event);
                event
            })
            .try_filter(move |event| future::ready(relisted_news(&store, event)))
            .touched_objects(),
    )
}

/// Whether an event, already reflected, is news to the controller: not an object a relist
/// shows at the version the store holds. kube's store fills a relist into a buffer of its
/// own and serves the old objects until the list is complete, so the store still shows
/// the version from before the watch went away. Such an object would wake its reconcile for
/// nothing: at 10,000 Rollouts, each relist woke all of them.
fn relisted_news<K>(store: &Store<K>, event: &Event<K>) -> bool
where
    K: Resource + Clone,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let Event::InitApply(object) = event else {
        return true;
    };
    let held = store.get(&ObjectRef::from_obj(object));
    held.is_none_or(|held| held.meta().resource_version != object.meta().resource_version)
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

/// As [`trigger`], with each object first changed by `modify` (to keep less of it), and each
/// event then handed to `keep` (a cache of the controller's own shape), which says whether it
/// was news: an object the cache already held as it is triggers nothing. After a relist (a
/// watch away too long, an apiserver restarted) most objects are so, and each would wake its
/// owner for nothing: at 10,000 Rollouts, a relist of their 60,000 ReplicaSets woke them all.
pub fn kept<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    modify: impl FnMut(&mut K) + Send + 'static,
    keep: impl Fn(&Event<K>) -> bool + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    quiet(
        watcher(api, config)
            .default_backoff()
            .modify(modify)
            .try_filter(move |event| future::ready(keep(event)))
            .touched_objects(),
    )
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
    use kube::api::ObjectMeta;
    use kube::runtime::reflector;

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

    /// Each event is reflected first, as in the stream, then asked whether it is news.
    fn reflected_news(
        writer: &mut Writer<ConfigMap>,
        store: &Store<ConfigMap>,
        event: Event<ConfigMap>,
    ) -> bool {
        writer.apply_watcher_event(&event);
        relisted_news(store, &event)
    }

    #[test]
    fn a_relist_tells_only_what_changed_while_the_watch_was_away() {
        let (store, mut writer) = reflector::store();
        let mut news = |event| reflected_news(&mut writer, &store, event);
        assert!(news(Event::Init));
        assert!(news(Event::InitApply(object("a", "1"))), "first list");
        assert!(news(Event::InitApply(object("b", "1"))));
        assert!(news(Event::InitDone));
        assert!(news(Event::Apply(object("b", "2"))), "a watch event");

        assert!(news(Event::Init));
        assert!(!news(Event::InitApply(object("a", "1"))), "unchanged");
        assert!(
            news(Event::InitApply(object("b", "3"))),
            "changed meanwhile"
        );
        assert!(news(Event::InitApply(object("c", "4"))), "made meanwhile");
        assert!(news(Event::InitDone));
        assert_eq!(store.len(), 3, "the relisted store holds them all");
    }
}
