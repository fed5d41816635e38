//! The ReplicaSets of every Rollout, kept from one watch and grouped by Rollout.
//!
//! A reconcile used to LIST its Rollout's ReplicaSets: one request per Rollout per resync,
//! and the heaviest one (every ReplicaSet with its pod template and managedFields, encoded by
//! the apiserver and decoded here). Now one watch keeps them, with only what a reconcile
//! reads (labels, Sluice's annotations, owner, replicas, selector, status: no pod template,
//! no managedFields), so memory stays small per ReplicaSet. The declared-template annotation
//! is kept as its hash, which is all a comparison needs.
//!
//! The watch decodes each ReplicaSet straight into that form ([`Kept`]): the decoder passes
//! over the fields a type does not name without building them, so a pod template (8 KB of
//! JSON in production, several times that once decoded) is never built. It used to be
//! decoded whole and stripped after, a page at a time, and that burst stayed in the
//! process's memory. Nor is a ReplicaSet kept as k8s-openapi's `ReplicaSet`, which is 2,384
//! bytes before anything it points to, 1,872 of them room for a pod template that is never
//! there, with labels and annotations as B-trees of at least one 544-byte node each. With
//! six ReplicaSets per Rollout (a revision history of five), those were 28 of the 44 MB the
//! operator held at 1,000 Rollouts (a heap profile, heaptrack).
//! A reconcile gets back a `ReplicaSet` equal to what decoding it whole and stripping it
//! would give (a test decodes both ways).
//!
//! The cache keeps each one as the JSON of that `ReplicaSet` ([`Entry`]): one allocation of
//! about 750 bytes, where the decoded form took about 1,400 in two dozen allocations (its
//! strings, label pairs and owner reference each their own). A reconcile decodes the few
//! ReplicaSets of its Rollout when it reads them, some microseconds each.
//!
//! The watch can lag Sluice's own writes. That is safe: every ReplicaSet write is a desired
//! state (server-side apply of the whole object, or a patch of replicas and the scale-down
//! deadline), so planning on a ReplicaSet a moment old repeats a write, never undoes one;
//! and the watch event of the write wakes the Rollout again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetSpec, ReplicaSetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference, Time,
};
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use serde::Deserialize;
use tokio::sync::watch;

use crate::k8s::labels::{ROLLOUT_LABEL, TEMPLATE_ANNOTATION};
use crate::k8s::watch::News;

/// ReplicaSets by `namespace/rollout`, each group in order of name (a Rollout has a few: a
/// vector, where a B-tree would take a node of room for eleven).
type Groups = HashMap<Box<str>, Vec<Entry>>;

/// A ReplicaSet in the cache: its name and the JSON of what a reconcile gets back.
#[derive(Debug)]
struct Entry {
    name: Box<str>,
    json: Box<str>,
    /// Seen in the list under way; those not seen are dropped when it is complete.
    listed: bool,
}

impl Entry {
    fn of(kept: &Kept) -> Self {
        Self {
            name: kept.name_any().into(),
            // A ReplicaSet always encodes; were it not to, the entry is one the reconcile
            // skips (and says so) rather than one that stops the watch.
            json: serde_json::to_string(&kept.replica_set())
                .unwrap_or_default()
                .into(),
            listed: true,
        }
    }

    /// The ReplicaSet as the watch gave it, as far as the cache kept it (its owner and
    /// labels: enough to wake its Rollout).
    fn kept(&self) -> Option<Kept> {
        serde_json::from_str(&self.json).ok()
    }

    fn replica_set(&self) -> Option<ReplicaSet> {
        serde_json::from_str(&self.json)
            .inspect_err(|e| {
                tracing::warn!(name = %self.name, error = %e, "cached ReplicaSet unreadable; skipped");
            })
            .ok()
    }
}

/// Puts `kept` in its group, in place of the ReplicaSet of the same name, and marks it
/// listed. Whether it is news: not when the cache already holds it as it is (a relist shows
/// most so), and then it keeps its entry (the new one, made to compare, is dropped at once).
fn insert(groups: &mut Groups, kept: &Kept) -> bool {
    let Some(group) = group_of(kept) else {
        return true;
    };
    let entry = Entry::of(kept);
    let members = groups.entry(group).or_default();
    match members.binary_search_by(|m| m.name.cmp(&entry.name)) {
        Ok(at) if members[at].json == entry.json => {
            members[at].listed = true;
            false
        }
        Ok(at) => {
            members[at] = entry;
            true
        }
        Err(at) => {
            members.insert(at, entry);
            true
        }
    }
}

/// A ReplicaSet as the watch decodes and the cache keeps it: all a reconcile reads of it, in
/// little memory (see the module's comment).
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "Decoded")]
pub struct Kept {
    /// Without its labels and annotations, which are kept as [`Pairs`].
    metadata: ObjectMeta,
    labels: Option<Pairs>,
    annotations: Option<Pairs>,
    /// The spec without its template.
    spec: Option<KeptSpec>,
    status: Option<ReplicaSetStatus>,
}

#[derive(Clone, Debug)]
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

/// A ReplicaSet's JSON as far as the decoder builds it: the fields not named here (the pod
/// template, managedFields) are passed over.
#[derive(Deserialize)]
struct Decoded {
    metadata: DecodedMeta,
    spec: Option<DecodedSpec>,
    status: Option<ReplicaSetStatus>,
}

/// `ObjectMeta` less its managedFields.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecodedMeta {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    self_link: Option<String>,
    uid: Option<String>,
}

/// `ReplicaSetSpec` less its template.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecodedSpec {
    min_ready_seconds: Option<i32>,
    replicas: Option<i32>,
    #[serde(default)]
    selector: LabelSelector,
}

impl From<Decoded> for Kept {
    fn from(decoded: Decoded) -> Self {
        let meta = decoded.metadata;
        let annotations = meta.annotations.map(|mut annotations| {
            annotations.remove(crate::k8s::watch::LAST_APPLIED);
            if let Some(declared) = annotations.get_mut(TEMPLATE_ANNOTATION) {
                *declared = fingerprint(declared);
            }
            annotations
        });
        Self {
            metadata: ObjectMeta {
                annotations: None,
                creation_timestamp: meta.creation_timestamp,
                deletion_grace_period_seconds: meta.deletion_grace_period_seconds,
                deletion_timestamp: meta.deletion_timestamp,
                finalizers: meta.finalizers,
                generate_name: meta.generate_name,
                generation: meta.generation,
                labels: None,
                managed_fields: None,
                name: meta.name,
                namespace: meta.namespace,
                owner_references: meta.owner_references,
                resource_version: meta.resource_version,
                self_link: meta.self_link,
                uid: meta.uid,
            },
            labels: pairs(meta.labels),
            annotations: pairs(annotations),
            spec: decoded.spec.map(|s| KeptSpec {
                min_ready_seconds: s.min_ready_seconds,
                replicas: s.replicas,
                match_labels: pairs(s.selector.match_labels),
                match_expressions: s.selector.match_expressions,
            }),
            status: decoded.status,
        }
    }
}

// Watched as what it is, a ReplicaSet. Its metadata carries no labels or annotations: kube
// reads only names, versions and owners of it; `Kept::label` reads the labels.
crate::k8s::resource_as!(Kept, ReplicaSet);

impl Kept {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .flat_map(|pairs| pairs.iter())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
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
}

/// A (re)list is applied in place: each ReplicaSet it shows is put in (or, unchanged, only
/// marked), and those it did not show are dropped when it is complete. It used to build a
/// second grouping beside the first and swap at the end: at 10,000 Rollouts, two copies of
/// 60,000 ReplicaSets for as long as the list took. Meanwhile a reconcile reads each
/// ReplicaSet as listed or as before, and one deleted while the watch was away until the
/// list is complete: a mix no single moment of the cluster had, but each ReplicaSet in a
/// state it had, which is safe as a lagging watch is (a write repeats, a deletion of one
/// already gone is answered 404 and taken as done).
#[derive(Debug)]
pub struct OwnedReplicaSets {
    groups: Mutex<Groups>,
    ready: watch::Sender<bool>,
}

impl Default for OwnedReplicaSets {
    fn default() -> Self {
        Self {
            groups: Mutex::default(),
            ready: watch::channel(false).0,
        }
    }
}

fn group_of(kept: &Kept) -> Option<Box<str>> {
    let rollout = kept.label(ROLLOUT_LABEL)?;
    let namespace = kept.metadata.namespace.as_deref().unwrap_or_default();
    Some(format!("{namespace}/{rollout}").into())
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

    /// Takes in one watch event, and says what was news: a ReplicaSet listed again as it is
    /// kept wakes no Rollout (its periodic resync still comes); one a relist found gone
    /// wakes its Rollout as a deletion would have.
    pub fn apply(&self, event: &Event<Kept>) -> News<Kept> {
        let mut groups = Self::lock(&self.groups);
        match event {
            Event::Init => {
                for entry in groups.values_mut().flatten() {
                    entry.listed = false;
                }
                News::Yes
            }
            Event::InitApply(rs) | Event::Apply(rs) => News::changed(insert(&mut groups, rs)),
            Event::InitDone => {
                let mut gone = Vec::new();
                groups.retain(|_, members| {
                    members.retain(|m| {
                        if !m.listed {
                            gone.extend(m.kept());
                        }
                        m.listed
                    });
                    !members.is_empty()
                });
                self.ready.send_replace(true);
                News::Gone(gone)
            }
            Event::Delete(rs) => {
                if let Some(group) = group_of(rs)
                    && let Some(members) = groups.get_mut(&group)
                {
                    let name = rs.name_any();
                    members.retain(|m| *m.name != *name);
                    if members.is_empty() {
                        groups.remove(&group);
                    }
                }
                News::Yes
            }
        }
    }

    /// A receiver of whether the first list is in (it ends when the cache does).
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// The ReplicaSets labelled as `rollout`'s in `namespace` and owned by `uid`.
    pub fn of(&self, namespace: &str, rollout: &str, uid: &str) -> Vec<ReplicaSet> {
        let groups = Self::lock(&self.groups);
        let Some(members) = groups.get(format!("{namespace}/{rollout}").as_str()) else {
            return Vec::new();
        };
        members
            .iter()
            .filter_map(Entry::replica_set)
            .filter(|rs| {
                rs.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == uid)
            })
            .collect()
    }

    /// Waits until the first list is in.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.readiness();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// How many ReplicaSets are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        Self::lock(&self.groups).values().map(Vec::len).sum()
    }
}

/// A ReplicaSet as a reconcile gets it from the cache: for tests elsewhere.
#[cfg(test)]
pub fn as_cached(rs: &ReplicaSet) -> ReplicaSet {
    serde_json::to_value(rs)
        .and_then(serde_json::from_value::<Kept>)
        .ok()
        .and_then(|kept| Entry::of(&kept).replica_set())
        .unwrap_or_else(|| panic!("a ReplicaSet decodes as kept: {rs:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// What the cache did before it decoded into [`Kept`]: decode whole, then drop what a
    /// reconcile does not read. The oracle the decoder is checked against.
    fn stripped(json: &Value) -> ReplicaSet {
        let mut rs: ReplicaSet = serde_json::from_value(json.clone()).unwrap();
        crate::k8s::watch::slim(&mut rs);
        if let Some(annotations) = rs.metadata.annotations.as_mut()
            && let Some(declared) = annotations.get_mut(TEMPLATE_ANNOTATION)
        {
            *declared = fingerprint(declared);
        }
        if let Some(spec) = rs.spec.as_mut() {
            spec.template = None;
        }
        rs
    }

    fn kept(json: &Value) -> Kept {
        serde_json::from_value(json.clone()).unwrap()
    }

    fn rs(ns: &str, name: &str, rollout: &str, uid: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {ROLLOUT_LABEL: rollout},
                         "annotations": {TEMPLATE_ANNOTATION: "{\"spec\":{}}", "other": "kept"},
                         "ownerReferences": [{"apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
                                              "name": rollout, "uid": uid}],
                         "managedFields": [{"manager": "sluice", "operation": "Apply",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "web:1"}]}}}
        })
    }

    #[test]
    fn replica_sets_are_kept_stripped_and_grouped_by_rollout() {
        let owned = OwnedReplicaSets::default();
        let a1 = rs("shop", "web-a1", "web", "u1");
        let given_back = kept(&a1).replica_set();
        assert!(given_back.metadata.managed_fields.is_none());
        assert!(given_back.spec.as_ref().unwrap().template.is_none());
        assert_eq!(
            given_back.annotations().get(TEMPLATE_ANNOTATION),
            Some(&fingerprint("{\"spec\":{}}"))
        );
        assert_eq!(
            given_back.annotations().get("other").map(String::as_str),
            Some("kept")
        );

        owned.apply(&Event::Init);
        owned.apply(&Event::InitApply(kept(&a1)));
        owned.apply(&Event::InitApply(kept(&rs("shop", "api-b1", "api", "u2"))));
        assert!(
            !*owned.ready.borrow(),
            "not ready (a reconcile waits) before the first list is complete"
        );
        owned.apply(&Event::InitDone);
        assert!(*owned.ready.borrow());
        assert_eq!(
            owned.of("shop", "web", "u1"),
            [stripped(&a1)],
            "given back as kept"
        );
        assert_eq!(
            owned.of("shop", "web", "another-uid").len(),
            0,
            "owner checked"
        );
        assert_eq!(owned.of("other", "web", "u1").len(), 0, "namespace checked");

        owned.apply(&Event::Apply(kept(&rs("shop", "web-a2", "web", "u1"))));
        owned.apply(&Event::Apply(kept(&rs("shop", "web-a0", "web", "u1"))));
        let mut a2_scaled = rs("shop", "web-a2", "web", "u1");
        a2_scaled["spec"]["replicas"] = json!(0);
        owned.apply(&Event::Apply(kept(&a2_scaled)));
        assert_eq!(
            owned.of("shop", "web", "u1"),
            [
                stripped(&rs("shop", "web-a0", "web", "u1")),
                stripped(&a1),
                stripped(&a2_scaled)
            ],
            "in order of name, a ReplicaSet applied again replaced"
        );
        owned.apply(&Event::Delete(kept(&rs("shop", "web-a0", "web", "u1"))));
        assert_eq!(owned.of("shop", "web", "u1").len(), 2);
        owned.apply(&Event::Delete(kept(&a1)));
        assert_eq!(owned.of("shop", "web", "u1").len(), 1);

        // A relist replaces everything: what was deleted meanwhile is gone.
        owned.apply(&Event::Init);
        owned.apply(&Event::InitApply(kept(&rs("shop", "api-b1", "api", "u2"))));
        assert_eq!(
            owned.len(),
            2,
            "what it has not shown yet is served as before"
        );
        owned.apply(&Event::InitDone);
        assert_eq!(owned.len(), 1);
        assert!(owned.of("shop", "web", "u1").is_empty());
    }

    /// The address of each kept ReplicaSet's JSON, by name.
    fn addresses(owned: &OwnedReplicaSets) -> BTreeMap<String, usize> {
        OwnedReplicaSets::lock(&owned.groups)
            .values()
            .flatten()
            .map(|e| (e.name.to_string(), e.json.as_ptr() as usize))
            .collect()
    }

    fn is_news(news: &News<Kept>) -> bool {
        matches!(news, News::Yes)
    }

    /// The names of what a completed list found gone, with the owner each wakes.
    fn gone(news: News<Kept>) -> Vec<(String, String)> {
        let News::Gone(gone) = news else {
            panic!("a completed list says what it found gone");
        };
        gone.iter()
            .map(|k| {
                let owner = k.owner_references().first().map(|o| o.uid.clone());
                (k.name_any(), owner.unwrap_or_default())
            })
            .collect()
    }

    /// A relist is applied in place: what it shows unchanged keeps its entry (no second copy
    /// of it is kept) and is no news, so it wakes no Rollout; what changed or came while the
    /// watch was away is news, and what went is dropped when the list is complete and named,
    /// with its owner, to wake its Rollout.
    #[test]
    fn a_relist_keeps_what_is_unchanged_and_tells_only_what_is_new() {
        let owned = OwnedReplicaSets::default();
        let (a1, a2, b1) = (
            rs("shop", "web-a1", "web", "u1"),
            rs("shop", "web-a2", "web", "u1"),
            rs("shop", "api-b1", "api", "u2"),
        );
        owned.apply(&Event::Init);
        for listed in [&a1, &a2, &b1] {
            assert!(
                is_news(&owned.apply(&Event::InitApply(kept(listed)))),
                "first list"
            );
        }
        assert!(gone(owned.apply(&Event::InitDone)).is_empty());
        let before = addresses(&owned);

        let mut a2_scaled = a2.clone();
        a2_scaled["spec"]["replicas"] = json!(0);
        let c1 = rs("shop", "cart-c1", "cart", "u3");
        owned.apply(&Event::Init);
        assert!(
            matches!(owned.apply(&Event::InitApply(kept(&a1))), News::No),
            "unchanged: no news"
        );
        assert!(
            is_news(&owned.apply(&Event::InitApply(kept(&a2_scaled)))),
            "changed"
        );
        assert!(is_news(&owned.apply(&Event::InitApply(kept(&c1)))), "new");
        assert_eq!(
            owned.of("shop", "api", "u2"),
            [stripped(&b1)],
            "not shown yet: served as before"
        );
        assert_eq!(
            owned.of("shop", "web", "u1"),
            [stripped(&a1), stripped(&a2_scaled)],
            "shown: served as listed"
        );
        assert_eq!(
            gone(owned.apply(&Event::InitDone)),
            [("api-b1".to_string(), "u2".to_string())],
            "deleted while the watch was away: wakes its owner"
        );

        let after = addresses(&owned);
        assert_eq!(
            after["web-a1"], before["web-a1"],
            "unchanged: the same entry"
        );
        assert!(owned.of("shop", "api", "u2").is_empty(), "not listed: gone");
        assert!(
            !OwnedReplicaSets::lock(&owned.groups).contains_key("shop/api"),
            "and its group with it"
        );
        assert_eq!(owned.of("shop", "cart", "u3"), [stripped(&c1)]);
        assert_eq!(owned.len(), 3);

        // A list cut short and begun again: what the second shows is kept, the rest goes.
        owned.apply(&Event::Init);
        owned.apply(&Event::InitApply(kept(&a1)));
        owned.apply(&Event::Init);
        owned.apply(&Event::InitApply(kept(&c1)));
        assert_eq!(
            gone(owned.apply(&Event::InitDone)).len(),
            2,
            "web-a1, web-a2"
        );
        assert_eq!(owned.len(), 1);

        // Between lists, every event is news but one that repeats what is kept.
        assert!(is_news(&owned.apply(&Event::Apply(kept(&a2)))));
        assert!(!is_news(&owned.apply(&Event::Apply(kept(&a2)))));
        assert!(is_news(&owned.apply(&Event::Delete(kept(&a2)))));
    }

    /// Decoded straight into the kept form, a ReplicaSet comes back as decoding it whole and
    /// stripping it gives, whatever it has or lacks.
    #[test]
    fn a_replica_set_decoded_as_kept_is_the_stripped_replica_set() {
        let full = rs("shop", "web-a1", "web", "u1");
        let mut bare = full.clone();
        bare["metadata"].as_object_mut().unwrap().remove("labels");
        bare["metadata"]["annotations"] = json!({});
        bare.as_object_mut().unwrap().remove("spec");
        let mut nulls = full.clone();
        nulls["metadata"]["labels"] = Value::Null;
        nulls["spec"]["minReadySeconds"] = Value::Null;
        nulls["status"] = Value::Null;
        let mut with_status = full.clone();
        with_status["status"] = json!(
            {"replicas": 2, "readyReplicas": 1, "availableReplicas": 1, "observedGeneration": 3,
             "conditions": [{"type": "ReplicaFailure", "status": "False"}]}
        );
        with_status["metadata"]["generation"] = json!(3);
        with_status["metadata"]["resourceVersion"] = json!("42");
        with_status["metadata"]["creationTimestamp"] = json!("2026-12-05T07:00:00Z");
        with_status["spec"]["minReadySeconds"] = json!(5);
        let mut with_expressions = full.clone();
        with_expressions["spec"]["selector"] = json!(
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}
        );
        let mut deleting = full.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-12-05T07:00:00Z");
        deleting["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        deleting["metadata"]["finalizers"] = json!(["example.com/hold"]);
        deleting["metadata"]["uid"] = json!("rs-uid");
        deleting["metadata"]["generateName"] = json!("web-");
        deleting["metadata"]["annotations"][crate::k8s::watch::LAST_APPLIED] =
            json!("{\"a\":\"large copy\"}");
        for json in [full, bare, nulls, with_status, with_expressions, deleting] {
            assert_eq!(kept(&json).replica_set(), stripped(&json), "{json}");
            assert_eq!(
                Entry::of(&kept(&json)).replica_set(),
                Some(stripped(&json)),
                "through the cache's JSON: {json}"
            );
        }
    }
}
