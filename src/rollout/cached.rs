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

use std::sync::{Arc, LazyLock};

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::ResourceExt;

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
    fn a_hand_written_annotation_on_a_full_copy_is_not_believed() {
        let mut full = rollout();
        full.annotations_mut()
            .insert(HASH.into(), "not-the-hash".into());
        assert_eq!(facts(&full).hash, template_hash(&full.spec.template));
    }
}
