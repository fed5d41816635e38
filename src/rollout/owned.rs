//! The ReplicaSets of every Rollout, kept from one watch and grouped by Rollout.
//!
//! A reconcile used to LIST its Rollout's ReplicaSets: one request per Rollout per resync,
//! and the heaviest one (every ReplicaSet with its pod template and managedFields, encoded by
//! the apiserver and decoded here). Now one watch keeps them, stripped to what a reconcile
//! reads (labels, Sluice's annotations, owner, replicas, selector, status: no pod template,
//! no managedFields), so memory stays small per ReplicaSet. The declared-template annotation
//! is kept as its hash, which is all a comparison needs.
//!
//! Each is kept in a form of its own ([`Kept`]), not as a `ReplicaSet`: k8s-openapi's
//! `ReplicaSet` is 2,384 bytes before anything it points to, 1,872 of them the room for a pod
//! template that is never there, and its labels and annotations are B-trees of at least one
//! 544-byte node each. With six ReplicaSets per Rollout (a revision history of five), those
//! (with the selector's) were 28 of the 44 MB the operator held at 1,000 Rollouts (a heap
//! profile, heaptrack).
//! A reconcile gets back a `ReplicaSet` equal to the one that was kept.
//!
//! The watch can lag Sluice's own writes. That is safe: every ReplicaSet write is a desired
//! state (server-side apply of the whole object, or a patch of replicas and the scale-down
//! deadline), so planning on a ReplicaSet a moment old repeats a write, never undoes one;
//! and the watch event of the write wakes the Rollout again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec, ReplicaSetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use tokio::sync::watch;

use crate::k8s::labels::{ROLLOUT_LABEL, TEMPLATE_ANNOTATION};

/// ReplicaSets by `namespace/rollout`, then by name.
/// Each kept boxed: a B-tree node has room for eleven of what it holds.
type Groups = HashMap<String, BTreeMap<String, Box<Kept>>>;

/// A stripped ReplicaSet as kept: all of it, in less memory (see the module's comment).
#[derive(Debug)]
struct Kept {
    /// Without its labels and annotations, which are kept as [`Pairs`].
    metadata: ObjectMeta,
    labels: Option<Pairs>,
    annotations: Option<Pairs>,
    /// The spec without its template (which a stripped ReplicaSet does not have).
    spec: Option<KeptSpec>,
    status: Option<ReplicaSetStatus>,
}

#[derive(Debug)]
struct KeptSpec {
    min_ready_seconds: Option<i32>,
    replicas: Option<i32>,
    match_labels: Option<Pairs>,
    match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// A map of a few strings, in a slice rather than a B-tree (in order, as the map was).
type Pairs = Box<[(String, String)]>;

fn pairs(map: Option<BTreeMap<String, String>>) -> Option<Pairs> {
    map.map(|m| m.into_iter().collect())
}

fn map(pairs: Option<&Pairs>) -> Option<BTreeMap<String, String>> {
    pairs.map(|p| p.iter().cloned().collect())
}

impl Kept {
    fn of(rs: &ReplicaSet) -> Self {
        debug_assert!(
            rs.spec.as_ref().is_none_or(|s| s.template.is_none()),
            "kept only once stripped"
        );
        // One copy of each part; its maps are then moved into slices, not copied again.
        let mut metadata = rs.metadata.clone();
        Self {
            labels: pairs(metadata.labels.take()),
            annotations: pairs(metadata.annotations.take()),
            metadata,
            spec: rs.spec.as_ref().map(|s| {
                let selector = s.selector.clone();
                KeptSpec {
                    min_ready_seconds: s.min_ready_seconds,
                    replicas: s.replicas,
                    match_labels: pairs(selector.match_labels),
                    match_expressions: selector.match_expressions,
                }
            }),
            status: rs.status.clone(),
        }
    }

    fn replica_set(&self) -> ReplicaSet {
        ReplicaSet {
            metadata: ObjectMeta {
                labels: map(self.labels.as_ref()),
                annotations: map(self.annotations.as_ref()),
                ..self.metadata.clone()
            },
            spec: self.spec.as_ref().map(|s| ReplicaSetSpec {
                min_ready_seconds: s.min_ready_seconds,
                replicas: s.replicas,
                selector: LabelSelector {
                    match_labels: map(s.match_labels.as_ref()),
                    match_expressions: s.match_expressions.clone(),
                },
                template: None,
            }),
            status: self.status.clone(),
        }
    }

    fn owned_by(&self, uid: &str) -> bool {
        self.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid)
    }
}

#[derive(Debug)]
pub struct OwnedReplicaSets {
    groups: Mutex<Groups>,
    /// Built during a (re)list, swapped in when it is complete.
    building: Mutex<Option<Groups>>,
    ready: watch::Sender<bool>,
}

impl Default for OwnedReplicaSets {
    fn default() -> Self {
        Self {
            groups: Mutex::default(),
            building: Mutex::default(),
            ready: watch::channel(false).0,
        }
    }
}

fn group_of(rs: &ReplicaSet) -> Option<String> {
    let rollout = rs.labels().get(ROLLOUT_LABEL)?;
    Some(format!("{}/{rollout}", rs.namespace().unwrap_or_default()))
}

/// What a reconcile reads of a ReplicaSet, and nothing else.
pub fn strip(rs: &mut ReplicaSet) {
    crate::k8s::watch::slim(rs);
    if let Some(annotations) = rs.metadata.annotations.as_mut()
        && let Some(declared) = annotations.get_mut(TEMPLATE_ANNOTATION)
    {
        *declared = fingerprint(declared);
    }
    if let Some(spec) = rs.spec.as_mut() {
        spec.template = None;
    }
}

/// The declared-template annotation's stand-in in the cache: a hash of it.
pub fn fingerprint(declared: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in declared.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fnv1a64:{hash:016x}")
}

impl OwnedReplicaSets {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in one watch event (already stripped).
    pub fn apply(&self, event: &Event<ReplicaSet>) {
        let insert = |groups: &mut Groups, rs: &ReplicaSet| {
            if let Some(group) = group_of(rs) {
                groups
                    .entry(group)
                    .or_default()
                    .insert(rs.name_any(), Box::new(Kept::of(rs)));
            }
        };
        match event {
            Event::Init => *Self::lock(&self.building) = Some(Groups::new()),
            Event::InitApply(rs) => {
                if let Some(building) = Self::lock(&self.building).as_mut() {
                    insert(building, rs);
                }
            }
            Event::InitDone => {
                if let Some(built) = Self::lock(&self.building).take() {
                    *Self::lock(&self.groups) = built;
                }
                self.ready.send_replace(true);
            }
            Event::Apply(rs) => insert(&mut Self::lock(&self.groups), rs),
            Event::Delete(rs) => {
                let mut groups = Self::lock(&self.groups);
                if let Some(group) = group_of(rs)
                    && let Some(members) = groups.get_mut(&group)
                {
                    members.remove(&rs.name_any());
                    if members.is_empty() {
                        groups.remove(&group);
                    }
                }
            }
        }
    }

    /// The ReplicaSets labelled as `rollout`'s in `namespace` and owned by `uid`.
    pub fn of(&self, namespace: &str, rollout: &str, uid: &str) -> Vec<ReplicaSet> {
        Self::lock(&self.groups)
            .get(&format!("{namespace}/{rollout}"))
            .map(|members| {
                members
                    .values()
                    .filter(|kept| kept.owned_by(uid))
                    .map(|kept| kept.replica_set())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the first list is in.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// How many ReplicaSets are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        Self::lock(&self.groups).values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rs(ns: &str, name: &str, rollout: &str, uid: &str) -> ReplicaSet {
        let mut rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": {ROLLOUT_LABEL: rollout},
                         "annotations": {TEMPLATE_ANNOTATION: "{\"spec\":{}}", "other": "kept"},
                         "ownerReferences": [{"apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
                                              "name": rollout, "uid": uid}],
                         "managedFields": [{"manager": "sluice", "operation": "Apply"}]},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}}}
        }))
        .unwrap();
        strip(&mut rs);
        rs
    }

    #[test]
    fn replica_sets_are_kept_stripped_and_grouped_by_rollout() {
        let owned = OwnedReplicaSets::default();
        let a1 = rs("shop", "web-a1", "web", "u1");
        assert!(a1.metadata.managed_fields.is_none());
        assert!(a1.spec.as_ref().unwrap().template.is_none());
        assert_eq!(
            a1.annotations().get(TEMPLATE_ANNOTATION),
            Some(&fingerprint("{\"spec\":{}}"))
        );
        assert_eq!(
            a1.annotations().get("other").map(String::as_str),
            Some("kept")
        );

        owned.apply(&Event::Init);
        owned.apply(&Event::InitApply(a1.clone()));
        owned.apply(&Event::InitApply(rs("shop", "api-b1", "api", "u2")));
        assert_eq!(
            owned.len(),
            0,
            "nothing is served before the list is complete"
        );
        owned.apply(&Event::InitDone);
        assert_eq!(
            owned.of("shop", "web", "u1"),
            std::slice::from_ref(&a1),
            "given back as kept"
        );
        assert_eq!(
            owned.of("shop", "web", "another-uid").len(),
            0,
            "owner checked"
        );
        assert_eq!(owned.of("other", "web", "u1").len(), 0, "namespace checked");

        owned.apply(&Event::Apply(rs("shop", "web-a2", "web", "u1")));
        assert_eq!(owned.of("shop", "web", "u1").len(), 2);
        owned.apply(&Event::Delete(a1));
        assert_eq!(owned.of("shop", "web", "u1").len(), 1);

        // A relist replaces everything: what was deleted meanwhile is gone.
        owned.apply(&Event::Init);
        owned.apply(&Event::InitApply(rs("shop", "api-b1", "api", "u2")));
        assert_eq!(
            owned.len(),
            2,
            "served as before until the relist is complete"
        );
        owned.apply(&Event::InitDone);
        assert_eq!(owned.len(), 1);
        assert!(owned.of("shop", "web", "u1").is_empty());
    }

    /// The kept form gives back the ReplicaSet it was made from, whatever it has or lacks.
    #[test]
    fn a_kept_replica_set_is_given_back_whole() {
        let full = rs("shop", "web-a1", "web", "u1");
        let mut bare = full.clone();
        bare.metadata.labels = None;
        bare.metadata.annotations = Some(BTreeMap::new());
        bare.spec = None;
        let mut with_status = full.clone();
        with_status.status = Some(
            serde_json::from_value(json!(
                {"replicas": 2, "readyReplicas": 1, "availableReplicas": 1, "observedGeneration": 3}
            ))
            .unwrap(),
        );
        with_status.metadata.generation = Some(3);
        with_status.metadata.resource_version = Some("42".into());
        let mut with_expressions = full.clone();
        with_expressions.spec.as_mut().unwrap().selector = serde_json::from_value(json!(
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}
        ))
        .unwrap();
        for rs in [full, bare, with_status, with_expressions] {
            assert_eq!(Kept::of(&rs).replica_set(), rs);
        }
    }
}
