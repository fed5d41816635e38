//! Small types shared by the three resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key in a Secret in the same namespace as the object that refers to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A request made by a person (through `kubectl sluice`) rather than by git.
///
/// Intents live in the status subresource so that GitOps tools, which own the spec, never revert
/// them. The operator acts on an intent once: it records the intent's `id` among the intents it
/// has handled (a field it owns), so the person's field and the operator's field each have one
/// writer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    /// Unique id of this request (the plugin uses the request time in RFC 3339 with nanoseconds).
    #[schemars(length(min = 1, max = 64))]
    pub id: String,
    /// When the request was made.
    pub requested_at: Time,
    /// Who made the request, as reported by the client (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Why, in the requester's words (shown in Events and history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}
