//! One controller's watch waking another controller: the objects it saw change, handed on by
//! name.
//!
//! Without the apiserver's watch cache (as `make bench` runs it) every watch of a resource is
//! an etcd watch of its own, and the apiserver decodes each written object once per watch. The
//! Pipeline controller kept a second watch of the Rollouts only to learn which changed; now
//! the Rollout controller's watch tells it. The names wait in a set, not a queue: a consumer
//! that falls behind loses no wake-up, and holds a name per object changed, not per change;
//! the watch never waits for it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use futures::Stream;
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;

/// An object by namespace and name.
pub type Name = (String, String);

/// The objects seen changed and not yet handed on.
#[derive(Clone, Default)]
pub struct Touched {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    names: Mutex<BTreeSet<Name>>,
    /// Holds a wake-up given while nobody waits, so one given between a consumer's empty
    /// look and its wait is not lost.
    added: Notify,
}

impl Touched {
    /// Notes the object of a watch event (applied, deleted, or listed again).
    pub fn note<K: Resource>(&self, event: &Event<K>) {
        match event {
            Event::Apply(object) | Event::Delete(object) | Event::InitApply(object) => {
                self.touch(object.namespace().unwrap_or_default(), object.name_any());
            }
            Event::Init | Event::InitDone => {}
        }
    }

    fn touch(&self, namespace: String, name: String) {
        self.lock().insert((namespace, name));
        self.shared.added.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Name>> {
        self.shared
            .names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every name noted, each once however often it was noted since it was last handed on,
    /// as they come. Meant for one consumer.
    pub fn names(self) -> impl Stream<Item = Name> + Send + 'static {
        futures::stream::unfold(
            (self, Vec::new().into_iter()),
            |(touched, mut batch)| async move {
                loop {
                    if let Some(name) = batch.next() {
                        return Some((name, (touched, batch)));
                    }
                    let taken = std::mem::take(&mut *touched.lock());
                    if taken.is_empty() {
                        touched.shared.added.notified().await;
                    } else {
                        batch = taken.into_iter().collect::<Vec<_>>().into_iter();
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn map(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn name(n: &str) -> Name {
        ("ns".to_string(), n.to_string())
    }

    async fn next(names: &mut (impl Stream<Item = Name> + Unpin)) -> Option<Name> {
        tokio::time::timeout(Duration::from_millis(100), names.next())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn each_name_noted_is_handed_on_once_until_noted_again() {
        let touched = Touched::default();
        let mut names = Box::pin(touched.clone().names());
        assert_eq!(next(&mut names).await, None, "nothing noted yet");
        touched.note(&Event::Apply(map("a")));
        touched.note(&Event::Apply(map("b")));
        touched.note(&Event::Apply(map("a")));
        touched.note(&Event::<ConfigMap>::InitDone);
        assert_eq!(next(&mut names).await, Some(name("a")));
        assert_eq!(next(&mut names).await, Some(name("b")));
        assert_eq!(next(&mut names).await, None, "a, noted twice, once");
        touched.note(&Event::Delete(map("a")));
        assert_eq!(
            next(&mut names).await,
            Some(name("a")),
            "a deletion wakes too"
        );
    }

    #[tokio::test]
    async fn a_name_noted_while_the_consumer_waits_wakes_it() {
        let touched = Touched::default();
        let mut names = Box::pin(touched.clone().names());
        let waiting = tokio::spawn(async move { names.next().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        touched.note(&Event::InitApply(map("c")));
        let got = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(
            matches!(&got, Ok(Ok(Some(n))) if *n == name("c")),
            "{got:?}"
        );
    }
}
