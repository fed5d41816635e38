//! Where a reconcile reads its Rollout from: the cache, the answer to Sluice's own last status
//! write, or the apiserver.
//!
//! The cache can lag Sluice's own last status write, and planning on a status older than the
//! last decision would undo it (k8s/freshness.rs). Until the cache showed that write, a
//! reconcile read the Rollout from the apiserver: some 170 to 220 GETs of a 16 KB object
//! while 100 releases ran at N = 200, each read from etcd and decoded, mostly for reconciles
//! that a route's own watch event started between the route write and the status write. The
//! write's answer is the Rollout just after the write, what a GET then would have returned:
//! it is kept, stripped as the cache keeps Rollouts, and planned on until the cache shows the
//! write. A write by someone else after ours reaches the cache after ours (a watch delivers
//! in order) and wakes a reconcile of its own. The watch tells when the cache holds each
//! version (`seen`); a relist may skip ours, so a Rollout listed again drops its answer and
//! its next read goes to the apiserver, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::api::rollout::Rollout;
use crate::k8s::freshness::{Freshness, Read};
use crate::rollout::cached::CachedRollout;

/// At most this many answers are kept (a few KB each, as the cache keeps them); past it a
/// reconcile reads from the apiserver, as before. A first start writes every Rollout's status
/// faster than the watch shows them.
const ANSWERS_KEPT: usize = 1_000;

/// Where to read a Rollout from.
#[derive(Debug)]
pub enum Source {
    Cache,
    /// The answer to Sluice's own last status write, which the cache does not show yet.
    Answer(Arc<CachedRollout>),
    Apiserver,
}

/// Sluice's own last status writes, by Rollout (`namespace/name`), until the cache shows them.
#[derive(Default)]
pub struct Written {
    freshness: Freshness,
    answers: Mutex<HashMap<String, Arc<CachedRollout>>>,
}

impl Written {
    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CachedRollout>>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where to read `key` from, given the cached copy's resource version.
    pub fn read(&self, key: &str, cached: Option<&str>) -> Source {
        if self.freshness.read(key, cached) == Read::Cache {
            self.answers().remove(key);
            return Source::Cache;
        }
        let awaited = self.freshness.awaited(key);
        match self.answers().get(key) {
            Some(answer) if answer.resource_version() == awaited => Source::Answer(answer.clone()),
            _ => Source::Apiserver,
        }
    }

    /// A read from the apiserver returned version `fresh`.
    pub fn read_fresh(&self, key: &str, fresh: Option<&str>, cached: Option<&str>) {
        self.answers().remove(key);
        self.freshness.read_fresh(key, fresh, cached);
    }

    /// Sluice wrote the status of `key`, and the apiserver answered with `answer`.
    pub fn wrote(&self, key: &str, answer: Rollout) {
        let Some(version) = answer.resource_version() else {
            return;
        };
        self.freshness.wrote(key, &version);
        let mut answers = self.answers();
        if answers.len() < ANSWERS_KEPT || answers.contains_key(key) {
            answers.insert(key.to_string(), Arc::new(CachedRollout::from(answer)));
        } else {
            answers.remove(key);
        }
    }

    /// The Rollout is gone.
    pub fn forget(&self, key: &str) {
        self.answers().remove(key);
        self.freshness.forget(key);
    }

    /// The cache holds the object of this watch event.
    pub fn seen(&self, event: &Event<CachedRollout>) {
        let (object, listed) = match event {
            Event::Apply(object) => (object, false),
            Event::InitApply(object) => (object, true),
            Event::Delete(object) => {
                self.forget(&key_of(object));
                return;
            }
            Event::Init | Event::InitDone => return,
        };
        let key = key_of(object);
        if let Some(version) = object.resource_version() {
            self.freshness.seen(&key, &version);
        }
        if listed || self.freshness.awaited(&key).is_none() {
            self.answers().remove(&key);
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.answers().is_empty() && self.freshness.awaited("ns/r").is_none()
    }
}

fn key_of(rollout: &CachedRollout) -> String {
    format!(
        "{}/{}",
        rollout.namespace().unwrap_or_default(),
        rollout.name_any()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(version: &str) -> Rollout {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "r", "namespace": "ns", "resourceVersion": version},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}},
                     "strategy": {"canary": {}}}
        }))
        .unwrap()
    }

    fn cached(version: &str) -> CachedRollout {
        CachedRollout::from(rollout(version))
    }

    fn answered(source: &Source) -> Option<String> {
        match source {
            Source::Answer(a) => a.resource_version(),
            _ => None,
        }
    }

    #[test]
    fn the_answer_is_read_until_the_cache_shows_the_write() {
        let w = Written::default();
        assert!(matches!(w.read("ns/r", Some("5")), Source::Cache));
        w.wrote("ns/r", rollout("6"));
        assert_eq!(answered(&w.read("ns/r", Some("5"))), Some("6".into()));
        // The watch delivers an older version first: still behind.
        w.seen(&Event::Apply(cached("5")));
        assert_eq!(answered(&w.read("ns/r", Some("5"))), Some("6".into()));
        // Then ours: the cache is good from now on, whatever comes after it.
        w.seen(&Event::Apply(cached("6")));
        assert!(w.is_empty());
        w.seen(&Event::Apply(cached("8")));
        assert!(matches!(w.read("ns/r", Some("8")), Source::Cache));
    }

    #[test]
    fn a_relist_that_skips_our_version_reads_from_the_apiserver() {
        let w = Written::default();
        w.wrote("ns/r", rollout("6"));
        w.seen(&Event::Init);
        w.seen(&Event::InitApply(cached("9")));
        assert!(matches!(w.read("ns/r", Some("9")), Source::Apiserver));
        w.read_fresh("ns/r", Some("9"), Some("9"));
        assert!(matches!(w.read("ns/r", Some("9")), Source::Cache));
        assert!(w.is_empty());
    }

    #[test]
    fn a_read_from_the_cache_or_a_deletion_forgets_the_answer() {
        let w = Written::default();
        w.wrote("ns/r", rollout("6"));
        assert!(matches!(w.read("ns/r", Some("6")), Source::Cache));
        assert!(w.is_empty());
        w.wrote("ns/r", rollout("7"));
        w.seen(&Event::Delete(cached("7")));
        assert!(w.is_empty());
    }

    #[test]
    fn answers_are_bounded() {
        let w = Written::default();
        for i in 0..=ANSWERS_KEPT {
            w.wrote(&format!("ns/r{i}"), rollout("6"));
        }
        assert_eq!(w.answers().len(), ANSWERS_KEPT);
        let last = format!("ns/r{ANSWERS_KEPT}");
        assert!(matches!(w.read(&last, Some("5")), Source::Apiserver));
        // One already kept is replaced by its next answer.
        w.wrote("ns/r0", rollout("7"));
        assert_eq!(answered(&w.read("ns/r0", Some("6"))), Some("7".into()));
    }
}
