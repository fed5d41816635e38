//! Labels and annotations Sluice puts on objects, in one place for every module.

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
