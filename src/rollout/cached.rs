//! The Rollout cache keeps no pod template.
//!
//! A production pod template is about 8 KB of JSON and several times that once decoded into
//! k8s-openapi's structs: with 10,000 Rollouts the templates alone would take more memory than
//! the whole operator may use. A reconcile needs three things from it: its hash (which
//! revision is desired), its images (the release a Pipeline follows) and, only when the
//! desired ReplicaSet must be written whole, the template itself. So the cache keeps the first
//! two and a fingerprint of the template as written on a ReplicaSet, in annotations of the
//! copy in memory (the controller never writes a Rollout's metadata or spec back: it writes
//! only the status), and the template is read from the apiserver on the rare reconcile that
//! writes it.
//!
//! The cache keeps each Rollout so stripped as its JSON ([`CachedRollout`]), which a
//! reconcile decodes when it runs: about 2 KB in one allocation for a Rollout at rest, where
//! the decoded form took about 7 KB in some hundred allocations (every condition's strings,
//! a 544-byte B-tree node for each map of labels or annotations, room for every optional
//! field). With 10,000 Rollouts that is some 50 MB (docs/performance.md).

use std::sync::{Arc, LazyLock};

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use serde::Deserialize;

use crate::api::pipeline::Release;
use crate::api::rollout::Rollout;
use crate::k8s::labels::template_hash_of_json;

/// The template's hash, on a cached copy.
const HASH: &str = "cache.sluice.dev/template-hash";
/// The fingerprint of the template as declared on a ReplicaSet, on a cached copy.
const DECLARED: &str = "cache.sluice.dev/template-declared";
/// The template's images, one per line, on a cached copy.
const IMAGES: &str = "cache.sluice.dev/template-images";

/// What a reconcile knows of the template: from the template itself, or from a cached copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateFacts {
    pub hash: String,
    /// `owned::fingerprint` of the JSON written to a ReplicaSet's template annotation.
    pub declared: String,
    pub release: Release,
}

impl TemplateFacts {
    pub fn of(template: &PodTemplateSpec) -> Self {
        // Rendered once: the hash and the fingerprint are of the same JSON, and this runs on
        // every watch event of every Rollout.
        let json = declared_json(template);
        Self {
            hash: template_hash_of_json(json.as_bytes()),
            declared: super::owned::fingerprint(&json),
            release: crate::pipeline::plan::release_of(template),
        }
    }
}

/// The template as written to a ReplicaSet's template annotation.
pub fn declared_json(template: &PodTemplateSpec) -> String {
    serde_json::to_string(template).unwrap_or_default()
}

/// For the cache: the object made slim, and its template replaced by what reconciles need.
pub fn strip(rollout: &mut Rollout) {
    crate::k8s::watch::slim(rollout);
    let facts = TemplateFacts::of(&rollout.spec.template);
    let annotations = rollout
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(HASH.into(), facts.hash);
    annotations.insert(DECLARED.into(), facts.declared);
    annotations.insert(IMAGES.into(), facts.release.images.join("\n"));
    rollout.spec.template = EMPTY_TEMPLATE.clone();
}

/// A Rollout in the controller's cache: the metadata kube's controller reads (its name,
/// namespace, uid and resourceVersion) and the JSON of the rest of the Rollout, [`strip`]ped.
/// The JSON is shared by its clones: a relist hands kube's store a clone of the copy it holds
/// for each Rollout that did not change (`k8s::watch`), so the store's second copy while the
/// relist fills in is the metadata alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "Rollout")]
pub struct CachedRollout {
    metadata: ObjectMeta,
    json: Arc<str>,
    /// A person's abort waits to be carried out: known without decoding, so that its
    /// reconcile can be served first (`slots`). Only the abort: a promote may wait for hours
    /// on purpose (a blue-green preview not ready), and would jump the queue all along.
    abort_waiting: bool,
}

impl From<Rollout> for CachedRollout {
    fn from(mut rollout: Rollout) -> Self {
        if !is_stripped(&rollout) {
            strip(&mut rollout);
        }
        let abort_waiting = rollout
            .status
            .as_ref()
            .is_some_and(|status| super::release::unhandled(status).abort.is_some());
        Self {
            metadata: ObjectMeta {
                name: rollout.metadata.name.take(),
                namespace: rollout.metadata.namespace.take(),
                uid: rollout.metadata.uid.take(),
                resource_version: rollout.metadata.resource_version.take(),
                ..ObjectMeta::default()
            },
            json: serde_json::to_string(&rollout).unwrap_or_default().into(),
            abort_waiting,
        }
    }
}

impl CachedRollout {
    /// Whether a person's abort waits to be carried out.
    pub fn abort_waiting(&self) -> bool {
        self.abort_waiting
    }

    /// The Rollout, decoded from the cache (without its pod template: see [`facts`]). Its name,
    /// namespace, uid and resourceVersion are kept apart, not in the JSON: put back.
    pub fn rollout(&self) -> Result<Rollout, serde_json::Error> {
        let mut rollout: Rollout = serde_json::from_str(&self.json)?;
        rollout.metadata.name.clone_from(&self.metadata.name);
        rollout
            .metadata
            .namespace
            .clone_from(&self.metadata.namespace);
        rollout.metadata.uid.clone_from(&self.metadata.uid);
        rollout
            .metadata
            .resource_version
            .clone_from(&self.metadata.resource_version);
        Ok(rollout)
    }
}

/// The reference that wakes `rollout`'s reconcile, without the uid and resourceVersion
/// `ObjectRef::from_obj` would copy in (not needed to find it, and memory where it is kept).
pub fn reference(rollout: &Rollout) -> ObjectRef<CachedRollout> {
    ObjectRef::new(&rollout.name_any())
        .within(rollout.metadata.namespace.as_deref().unwrap_or_default())
}

// Kept and watched as what it is, a Rollout.
crate::k8s::resource_as!(CachedRollout, Rollout);

/// The one empty template every cached copy points at.
static EMPTY_TEMPLATE: LazyLock<Arc<PodTemplateSpec>> = LazyLock::new(Arc::default);

/// Whether this copy is a cached one, without its template. A copy read from the apiserver
/// has a template (the schema requires one), so an annotation someone wrote by hand under
/// the same name is never mistaken for the cache's.
pub fn is_stripped(rollout: &Rollout) -> bool {
    *rollout.spec.template == PodTemplateSpec::default() && rollout.annotations().contains_key(HASH)
}

/// The facts of the Rollout's template, whichever copy it is.
pub fn facts(rollout: &Rollout) -> TemplateFacts {
    if !is_stripped(rollout) {
        return TemplateFacts::of(&rollout.spec.template);
    }
    let get = |key: &str| rollout.annotations().get(key).cloned().unwrap_or_default();
    TemplateFacts {
        hash: get(HASH),
        declared: get(DECLARED),
        release: Release {
            images: get(IMAGES)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::labels::template_hash;
    use serde_json::json;

    fn rollout() -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop",
                         "annotations": {"team": "payments"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [
                                      {"name": "web", "image": "web:2"},
                                      {"name": "proxy", "image": "proxy:1.4"}]}},
                     "strategy": {"canary": {}}}
        }))
        .unwrap()
    }

    #[test]
    fn a_stripped_copy_knows_what_the_template_said() {
        let full = rollout();
        let mut cached = full.clone();
        strip(&mut cached);
        assert!(is_stripped(&cached) && !is_stripped(&full));
        assert_eq!(*cached.spec.template, PodTemplateSpec::default());
        assert_eq!(facts(&cached), facts(&full));
        assert_eq!(facts(&full).release.images, vec!["proxy:1.4", "web:2"]);
        assert_eq!(
            cached.annotations().get("team").map(String::as_str),
            Some("payments")
        );
    }

    #[test]
    fn a_cached_copy_knows_whether_a_persons_abort_waits() {
        let with = |status: serde_json::Value| {
            let mut rollout = rollout();
            rollout.status = serde_json::from_value(status).unwrap();
            CachedRollout::from(rollout).abort_waiting()
        };
        let request = json!({"id": "a-2", "requestedAt": "2026-12-07T09:49:40Z"});
        assert!(!CachedRollout::from(rollout()).abort_waiting(), "no status");
        assert!(with(json!({"abort": request})), "an abort not carried out");
        assert!(
            with(json!({"abort": request, "handledIntents": {"abort": "a-1"}})),
            "a newer abort than the one carried out"
        );
        assert!(
            !with(json!({"abort": request, "handledIntents": {"abort": "a-2"}})),
            "carried out"
        );
        for other in ["promote", "promoteFull", "retry", "overrideFreeze"] {
            let mut status = serde_json::Map::new();
            status.insert(other.into(), request.clone());
            assert!(!with(status.into()), "{other} is served in turn");
        }
    }

    /// A Rollout of every sample's shape, and one with a status such as a release leaves.
    fn rollouts() -> Vec<Rollout> {
        let mut all: Vec<Rollout> = [
            include_str!("../../config/samples/rollout-bluegreen.yaml"),
            include_str!("../../config/samples/rollout-canary-gateway-api.yaml"),
            include_str!("../../config/samples/rollout-canary-host-level.yaml"),
            include_str!("../../config/samples/rollout-canary-istio-subset.yaml"),
        ]
        .into_iter()
        .flat_map(serde_yaml::Deserializer::from_str)
        .filter_map(|document| serde_yaml::Value::deserialize(document).ok())
        .filter(|value| value["kind"] == "Rollout")
        .map(|value| serde_yaml::from_value(value).unwrap())
        .collect();
        assert_eq!(all.len(), 4, "one Rollout per sample");
        let mut released = rollout();
        released.metadata.uid = Some("u-1".into());
        released.metadata.resource_version = Some("42".into());
        released.metadata.generation = Some(3);
        released.metadata.finalizers = Some(vec!["sluice.dev/traffic".into()]);
        let measurements = json!([
            {"phase": "Successful", "takenAt": "2026-12-05T09:49:54Z", "value": "0.01",
             "message": "holds"},
            {"phase": "Failed", "takenAt": "2026-12-05T09:49:59Z", "value": "NaN"}
        ]);
        let run = json!({
            "name": "step-1", "revision": "l6b26qmh46", "phase": "Failed",
            "startedAt": "2026-12-05T09:49:50Z", "finishedAt": "2026-12-05T09:50:29Z",
            "message": "failed",
            "metrics": [{"name": "errors", "phase": "Failed", "count": 2, "successful": 1,
                         "failed": 1, "inconclusive": 0, "error": 0, "consecutiveErrors": 0,
                         "measurements": measurements}]
        });
        released.status = serde_json::from_value(json!({
            "phase": "Degraded", "message": "metric deadline failed 1 times (limit 0)",
            "observedGeneration": 3, "currentStepIndex": 1,
            "currentStepStartedAt": "2026-12-05T09:49:40.749114Z",
            "stableRevision": "9s5rqdh4x6", "canaryRevision": "l6b26qmh46",
            "replicas": 2, "readyReplicas": 2, "availableReplicas": 2, "updatedReplicas": 1,
            "selector": "app=web", "weights": {"canary": 0, "stable": 100},
            "abort": {"id": "a-1", "requestedAt": "2026-12-05T09:49:40Z", "requestedBy": "ana"},
            "handledIntents": {"abort": "a-1"},
            "routedObjects": [{"kind": "Service", "name": "web"}],
            "analysisRuns": [run],
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                            "message": "2/2", "lastTransitionTime": "2026-12-05T09:47:48Z",
                            "observedGeneration": 3}]
        }))
        .unwrap();
        assert!(
            released
                .status
                .as_ref()
                .is_some_and(|s| !s.analysis_runs.is_empty() && s.abort.is_some()),
            "the status is read as written"
        );
        all.push(released);
        all
    }

    #[test]
    fn a_cached_rollout_decodes_to_the_stripped_rollout() {
        for full in rollouts() {
            let mut stripped = full.clone();
            strip(&mut stripped);
            let cached = CachedRollout::from(full.clone());
            assert_eq!(cached.rollout().unwrap(), stripped, "{}", full.name_any());
            assert_eq!(cached.name_any(), full.name_any());
            assert_eq!(cached.namespace(), full.namespace());
            assert_eq!(cached.resource_version(), full.resource_version());
            assert_eq!(cached.uid(), full.uid());
            assert_eq!(reference(&full), ObjectRef::from_obj(&cached));
            // Kept from a copy already stripped, the facts are not taken from its empty
            // template again.
            let again = CachedRollout::from(cached.rollout().unwrap());
            assert_eq!(facts(&again.rollout().unwrap()), facts(&full));
        }
    }

    #[test]
    fn a_clone_shares_the_json() {
        let cached = CachedRollout::from(rollout());
        assert!(Arc::ptr_eq(&cached.json, &cached.clone().json));
    }

    #[test]
    fn a_hand_written_annotation_on_a_full_copy_is_not_believed() {
        let mut full = rollout();
        full.annotations_mut()
            .insert(HASH.into(), "not-the-hash".into());
        assert_eq!(facts(&full).hash, template_hash(&full.spec.template));
    }
}
