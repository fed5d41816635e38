//! Where a reconcile reads its Rollout from: the cache, the answer to Sluice's own last status
//! write, or the apiserver.
//!
//! The cache can lag Sluice's own last status write, and planning on a status older than the
//! last decision would undo it (k8s/freshness.rs). Until the cache showed that write, a
//! reconcile read the Rollout from the apiserver: some 170 to 220 GETs of a 16 KB object
//! while 100 releases ran at N = 200, each read from etcd and decoded, mostly for reconciles
//! that a route's own watch event started between the route write and the status write. The
//! write's answer is the Rollout just after the write, what a GET then would have returned,
//! and it is planned on instead (kept stripped, as the cache keeps Rollouts), but only while
//! the cache still shows the version it showed when the write was sent: then nothing has
//! reached the cache since, and the answer is the newest the operator can know. Once the cache
//! moves it shows either our write (read from the cache) or a version that may come after it:
//! resource versions can only be compared for equality, and the watch may deliver our write
//! before the apiserver's answer reaches us, so that is read from the apiserver, as before.
//! One refinement: a release writes its status several times faster than a busy watch shows
//! the writes, and the cache then moves through Sluice's own earlier writes. Each of those was
//! answered before the newer one was sent, so it comes before the newer answer: the answer
//! stays good while the cache shows any version known, as the write was sent, to come before
//! it (`Before`: the cache's version then, the write or fresh read still awaited, and what came
//! before the last answer). At N = 200, with Events posted after the reconcile, the cache
//! lagged by up to 4 s and 917 of 1,110 GETs of Rollouts during the releases were of that
//! kind; with the refinement none are left but the template reads of new ReplicaSets.
//!
//! A reconcile holds the copy the cache had when it began, and the watch may show our write
//! (and so end the wait for it) while it runs: a decision to read the cache is about the cache
//! as it is then, so the copy is taken from it again after the decision, never the one held.
//! The cache's first list (and any relist) is swapped in whole once complete, so a version it
//! lists ends no wait before that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;

use crate::api::rollout::Rollout;
use crate::k8s::freshness::{Before, Freshness, Read};
use crate::rollout::cached::CachedRollout;

/// At most this many answers are kept (a few KB each, as the cache keeps them); past it a
/// reconcile reads from the apiserver, as before. A first start writes every Rollout's status
/// faster than the watch shows them.
const ANSWERS_KEPT: usize = 1_000;

/// Where to read a Rollout from.
#[derive(Debug)]
pub enum Source {
    /// The cache's copy, taken after the decision.
    Cache(Arc<CachedRollout>),
    /// The answer to Sluice's own last status write, which the cache does not show yet.
    Answer(Arc<CachedRollout>),
    Apiserver,
}

/// The rule: the cache once it shows the version awaited (or none is awaited); else the
/// answer, while the cache shows a version known to come before it; else the apiserver.
fn decide(
    read: Read,
    awaited: Option<&str>,
    cached: Option<&str>,
    answer: Option<&Answer>,
) -> Decision {
    match (read, answer) {
        (Read::Cache, _) => Decision::Cache,
        (Read::Fresh, Some(a))
            if a.object.resource_version().as_deref() == awaited && a.comes_after(cached) =>
        {
            Decision::Answer(a.object.clone())
        }
        (Read::Fresh, _) => Decision::Apiserver,
    }
}

enum Decision {
    Cache,
    Answer(Arc<CachedRollout>),
    Apiserver,
}

struct Answer {
    before: Before,
    object: Arc<CachedRollout>,
}

impl Answer {
    /// Whether the answer comes after version `cached` of the cache.
    fn comes_after(&self, cached: Option<&str>) -> bool {
        self.before.has(cached)
    }
}

/// Sluice's own last status writes, by Rollout (`namespace/name`), until the cache shows them.
#[derive(Default)]
pub struct Written {
    freshness: Freshness,
    answers: Mutex<HashMap<String, Answer>>,
}

impl Written {
    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where to read the Rollout `key` from, `cache` holding it as `reference`.
    pub fn read(
        &self,
        cache: &Store<CachedRollout>,
        reference: &ObjectRef<CachedRollout>,
        key: &str,
    ) -> Source {
        let cached = cache.get(reference).and_then(|c| c.resource_version());
        let read = self.freshness.read(key, cached.as_deref());
        let awaited = self.freshness.awaited(key);
        let decision = {
            let mut answers = self.answers();
            let decision = decide(
                read,
                awaited.as_deref(),
                cached.as_deref(),
                answers.get(key),
            );
            if !matches!(decision, Decision::Answer(_)) {
                answers.remove(key);
            }
            decision
        };
        match decision {
            // Taken now: the watch may have shown the write awaited since `cached` was read,
            // and it updates the cache before it ends the wait.
            Decision::Cache => cache
                .get(reference)
                .map_or(Source::Apiserver, Source::Cache),
            Decision::Answer(answer) => Source::Answer(answer),
            Decision::Apiserver => Source::Apiserver,
        }
    }

    /// A read from the apiserver returned version `fresh`.
    pub fn read_fresh(&self, key: &str, fresh: Option<&str>, cached: Option<&str>) {
        self.answers().remove(key);
        self.freshness.read_fresh(key, fresh, cached);
    }

    /// What comes before a status write of `key` about to be sent, the cache showing version
    /// `cached`: that version, the write (or fresh read) still awaited, and what comes before
    /// the last answer kept. Taken as the write is sent: the watch may show the write awaited
    /// (and so end the wait for it) before this one is answered.
    pub fn sending(&self, key: &str, cached: Option<String>) -> Before {
        let mut before = Before::default();
        if let Some(last) = self.answers().get(key) {
            before.add_all(&last.before);
            before.add(last.object.resource_version());
        }
        before.add(self.freshness.awaited(key));
        before.add(cached);
        before
    }

    /// Sluice's status write of `key`, with `before` taken as it was sent, was answered with
    /// `answer`.
    pub fn wrote(&self, key: &str, before: Before, answer: Rollout) {
        let Some(version) = answer.resource_version() else {
            return;
        };
        self.freshness.wrote(key, &version);
        let mut answers = self.answers();
        // Past the bound no answer is kept for a Rollout that has none: it is read from the
        // apiserver, as before.
        if answers.len() < ANSWERS_KEPT || answers.contains_key(key) {
            let object = Arc::new(CachedRollout::from(answer));
            answers.insert(key.to_string(), Answer { before, object });
        }
    }

    /// The Rollout is gone.
    pub fn forget(&self, key: &str) {
        self.answers().remove(key);
        self.freshness.forget(key);
    }

    /// The cache holds the object of this watch event: an answer it moved past is of no more
    /// use, and a write it shows is no longer awaited.
    pub fn seen(&self, event: &Event<CachedRollout>) {
        let object = match event {
            Event::Apply(object) => object,
            Event::Delete(object) => {
                self.forget(&key_of(object));
                return;
            }
            // A listed copy is in the cache only once the whole list is: the next read
            // compares it then.
            Event::Init | Event::InitApply(_) | Event::InitDone => return,
        };
        let key = key_of(object);
        let version = object.resource_version();
        if let Some(version) = &version {
            self.freshness.seen(&key, version);
        }
        let mut answers = self.answers();
        if answers
            .get(&key)
            .is_some_and(|a| !a.comes_after(version.as_deref()))
        {
            answers.remove(&key);
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

    /// The version of the cache's copy read, if the cache is read.
    fn from_cache(source: &Source) -> Option<String> {
        match source {
            Source::Cache(c) => c.resource_version(),
            _ => None,
        }
    }

    fn reference() -> ObjectRef<CachedRollout> {
        ObjectRef::new("r").within("ns")
    }

    /// Reads through a cache that shows `version`.
    fn read(w: &Written, version: &str) -> Source {
        read_key(w, version, "ns/r")
    }

    /// Reads the Rollout of `key` through a cache that shows `version` (of `ns/r`).
    fn read_key(w: &Written, version: &str, key: &str) -> Source {
        let (cache, mut writer) = kube::runtime::reflector::store();
        writer.apply_watcher_event(&Event::Apply(cached(version)));
        w.read(&cache, &reference(), key)
    }

    fn is_cache(source: &Source) -> bool {
        matches!(source, Source::Cache(_))
    }

    fn is_apiserver(source: &Source) -> bool {
        matches!(source, Source::Apiserver)
    }

    /// Sends a status write of `key` with the cache at `cached`; it is answered with `version`.
    fn wrote(w: &Written, key: &str, cached: &str, version: &str) {
        let before = w.sending(key, Some(cached.into()));
        w.wrote(key, before, rollout(version));
    }

    #[test]
    fn the_answer_is_read_while_the_cache_shows_what_it_showed_at_the_write() {
        let w = Written::default();
        assert!(is_cache(&read(&w, "5")));
        wrote(&w, "ns/r", "5", "6");
        assert_eq!(answered(&read(&w, "5")), Some("6".into()));
        assert_eq!(answered(&read(&w, "5")), Some("6".into()));
        // The cache shows our write: good from now on, whatever comes after it.
        w.seen(&Event::Apply(cached("6")));
        assert!(w.is_empty());
        w.seen(&Event::Apply(cached("8")));
        assert!(is_cache(&read(&w, "8")));
    }

    #[test]
    fn a_cache_moved_past_the_write_reads_from_the_apiserver() {
        // The watch brings our write and then a person's request before the apiserver's
        // answer to our write is taken in: the cache may be newer than the answer.
        let w = Written::default();
        w.seen(&Event::Apply(cached("6")));
        w.seen(&Event::Apply(cached("7")));
        wrote(&w, "ns/r", "5", "6");
        assert!(is_apiserver(&read(&w, "7")));
        w.read_fresh("ns/r", Some("7"), Some("7"));
        assert!(is_cache(&read(&w, "7")));
        assert!(w.is_empty());
        // Someone else's write lands between the base and ours: not the answer either.
        wrote(&w, "ns/r", "7", "9");
        w.seen(&Event::Apply(cached("8")));
        assert!(is_apiserver(&read(&w, "8")));
    }

    #[test]
    fn a_relist_that_skips_our_version_reads_from_the_apiserver() {
        let w = Written::default();
        wrote(&w, "ns/r", "5", "6");
        w.seen(&Event::Init);
        w.seen(&Event::InitApply(cached("9")));
        w.seen(&Event::InitDone);
        assert!(is_apiserver(&read(&w, "9")));
        w.read_fresh("ns/r", Some("9"), Some("9"));
        assert!(is_cache(&read(&w, "9")));
        assert!(w.is_empty());
    }

    #[test]
    fn a_read_from_the_cache_or_a_deletion_forgets_the_answer() {
        let w = Written::default();
        wrote(&w, "ns/r", "5", "6");
        assert!(is_cache(&read(&w, "6")));
        assert!(w.is_empty());
        wrote(&w, "ns/r", "6", "7");
        w.seen(&Event::Delete(cached("7")));
        assert!(w.is_empty());
    }

    #[test]
    fn the_cache_is_read_as_it_is_after_the_decision_not_as_the_reconcile_found_it() {
        // A reconcile holds the copy at 5, writes 6, and the next one begins with that copy
        // still held while the watch brings 6 (and ends the wait for it) before it reads:
        // planning on 5 would decide again what 6 records (a person's abort, twice).
        let w = Written::default();
        let (cache, mut writer) = kube::runtime::reflector::store();
        writer.apply_watcher_event(&Event::Apply(cached("5")));
        let held = cache.get(&reference()).unwrap();
        wrote(&w, "ns/r", "5", "6");
        let shown = Event::Apply(cached("6"));
        writer.apply_watcher_event(&shown);
        w.seen(&shown);
        let source = w.read(&cache, &reference(), "ns/r");
        assert_eq!(held.resource_version().as_deref(), Some("5"));
        assert_eq!(from_cache(&source).as_deref(), Some("6"));
        // Gone from the cache meanwhile: read from the apiserver (which says whether it is).
        writer.apply_watcher_event(&Event::Delete(cached("6")));
        assert!(is_apiserver(&w.read(&cache, &reference(), "ns/r")));
    }

    #[test]
    fn a_relisted_copy_ends_no_wait_before_the_list_is_in_the_cache() {
        let w = Written::default();
        let (cache, mut writer) = kube::runtime::reflector::store();
        writer.apply_watcher_event(&Event::Apply(cached("5")));
        wrote(&w, "ns/r", "5", "6");
        // The relist lists our write; the cache still shows 5 until the list is complete.
        for event in [Event::Init, Event::InitApply(cached("6"))] {
            writer.apply_watcher_event(&event);
            w.seen(&event);
        }
        let during = w.read(&cache, &reference(), "ns/r");
        assert_eq!(answered(&during).as_deref(), Some("6"), "{during:?}");
        writer.apply_watcher_event(&Event::InitDone);
        w.seen(&Event::InitDone);
        assert_eq!(
            from_cache(&w.read(&cache, &reference(), "ns/r")).as_deref(),
            Some("6")
        );
    }

    #[test]
    fn the_answer_stays_good_while_the_cache_shows_earlier_writes_of_ours() {
        // Three writes in a row, the cache at 5 all along; then it shows them one by one.
        let w = Written::default();
        wrote(&w, "ns/r", "5", "6");
        wrote(&w, "ns/r", "5", "7");
        wrote(&w, "ns/r", "5", "8");
        for shown in ["5", "6", "7"] {
            w.seen(&Event::Apply(cached(shown)));
            assert_eq!(
                answered(&read(&w, shown)).as_deref(),
                Some("8"),
                "at {shown}"
            );
        }
        w.seen(&Event::Apply(cached("8")));
        assert!(is_cache(&read(&w, "8")));
        assert!(w.is_empty());
        // The next write is sent before the cache shows the last one, and answered after.
        wrote(&w, "ns/r", "8", "9");
        let sent = w.sending("ns/r", Some("8".into()));
        w.seen(&Event::Apply(cached("9")));
        w.wrote("ns/r", sent, rollout("10"));
        assert_eq!(answered(&read(&w, "9")).as_deref(), Some("10"));
        w.seen(&Event::Apply(cached("10")));
        assert!(w.is_empty());
        // A version not known to come before the answer may come after it.
        wrote(&w, "ns/r", "10", "12");
        wrote(&w, "ns/r", "10", "13");
        w.seen(&Event::Apply(cached("11")));
        assert!(is_apiserver(&read(&w, "11")));
    }

    #[test]
    fn answers_are_bounded() {
        let w = Written::default();
        for i in 0..=ANSWERS_KEPT {
            wrote(&w, &format!("ns/r{i}"), "5", "6");
        }
        assert_eq!(w.answers().len(), ANSWERS_KEPT);
        let last = format!("ns/r{ANSWERS_KEPT}");
        assert!(is_apiserver(&read_key(&w, "5", &last)));
        // One already kept is replaced by its next answer.
        wrote(&w, "ns/r0", "5", "7");
        assert_eq!(answered(&read_key(&w, "5", "ns/r0")), Some("7".into()));
    }
}
