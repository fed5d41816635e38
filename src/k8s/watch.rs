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
    C::DynamicType: Eq + std::hash::Hash + Clone,
{
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
            .touched_objects(),
    )
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
/// event then handed to `keep` (a cache of the controller's own shape).
pub fn kept<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    modify: impl FnMut(&mut K) + Send + 'static,
    keep: impl Fn(&Event<K>) + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    quiet(
        watcher(api, config)
            .default_backoff()
            .modify(modify)
            .map_ok(move |event| {
                keep(&event);
                event
            })
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
