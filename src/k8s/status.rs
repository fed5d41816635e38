//! Status written by server-side apply with Sluice's field manager, and only when it changed.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

/// Whether `desired` differs from `current` as the apiserver would store it.
pub fn changed<S: Serialize>(current: Option<&S>, desired: &S) -> bool {
    let as_json = |s: &S| serde_json::to_value(s).unwrap_or_default();
    current.map(as_json) != Some(as_json(desired))
}

/// Applies `desired` as the status of `object`, unless it equals `current` (an idle resync
/// then makes no write at all). Returns the object as written (the apiserver's answer), if a
/// write was made.
pub async fn apply<K, S>(
    api: &Api<K>,
    object: &K,
    current: Option<&S>,
    desired: &S,
) -> Result<Option<K>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    if !changed(current, desired) {
        return Ok(None);
    }
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct S {
        a: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        b: Option<i32>,
    }

    #[test]
    fn only_a_real_difference_is_a_change() {
        let s = |a, b| S { a, b };
        assert!(!changed(Some(&s(1, None)), &s(1, None)));
        assert!(changed(Some(&s(1, None)), &s(1, Some(2))));
        assert!(changed(None, &s(1, None)));
    }
}
