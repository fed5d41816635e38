//! Labels and annotations Sluice puts on objects, in one place for every module, and the
//! revision hash that [`HASH_LABEL`] carries.

use k8s_openapi::api::core::v1::PodTemplateSpec;

/// Label on ReplicaSets and pods (and in selectors) naming the revision.
pub const HASH_LABEL: &str = "sluice.dev/pod-template-hash";
/// Label on ReplicaSets naming their Rollout.
pub const ROLLOUT_LABEL: &str = "sluice.dev/rollout";
/// Annotation on ReplicaSets: the revision number (1, 2, ...), for `undo`.
pub const REVISION_ANNOTATION: &str = "sluice.dev/revision";
/// Annotation on ReplicaSets: when an old revision is to be scaled to zero (RFC 3339).
pub const SCALE_DOWN_AT_ANNOTATION: &str = "sluice.dev/scale-down-at";
/// Annotation on ReplicaSets: the pod template exactly as the Rollout declared it (compact
/// JSON), so `kubectl sluice undo` restores the revision itself (same hash, same ReplicaSet)
/// rather than a copy with the labels Sluice added.
pub const TEMPLATE_ANNOTATION: &str = "sluice.dev/template";
/// The pod label Istio reports as `destination_canonical_revision` (and
/// `source_canonical_revision`): Sluice sets it to the revision hash unless the template sets
/// it, so `{{canary.revision}}` matches what a real mesh reports.
pub const ISTIO_CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";

/// A short, stable hash of the pod template as the user wrote it.
///
/// FNV-1a (64 bits) over the canonical JSON, rendered in the alphabet Kubernetes uses for
/// generated names (no vowels, so hashes never spell words). Two different templates with the
/// same hash are not told apart: at 64 bits that is about one chance in 10^19 per pair.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    // serde_json output is deterministic: struct fields in declaration order, maps sorted.
    template_hash_of_json(&serde_json::to_vec(template).unwrap_or_default())
}

/// [`template_hash`] of a template already rendered as JSON (`serde_json::to_vec`), for a
/// caller that needs the JSON too and renders it once.
pub fn template_hash_of_json(json: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in json {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    safe_encode(hash)
}

fn safe_encode(mut value: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = Vec::with_capacity(10);
    for _ in 0..10 {
        out.push(ALPHABET[(value % ALPHABET.len() as u64) as usize]);
        value /= ALPHABET.len() as u64;
    }
    String::from_utf8(out).unwrap_or_default()
}
