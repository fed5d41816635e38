//! Small helpers over kube-rs that every controller uses: where an `Api` points, what an
//! error means, status written by server-side apply, Events, backoff and the labels Sluice
//! puts on objects.

/// Implements `kube::Resource` for `$cache`, a controller's own smaller form of the API's
/// namespaced `$api` kept in a cache: it is watched, listed and referred to as a `$api`, and
/// its `metadata` field is what kube reads of it.
macro_rules! resource_as {
    ($cache:ty, $api:ty) => {
        impl kube::Resource for $cache {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
                <$api as kube::Resource>::kind(dt)
            }
            fn group(dt: &()) -> std::borrow::Cow<'_, str> {
                <$api as kube::Resource>::group(dt)
            }
            fn version(dt: &()) -> std::borrow::Cow<'_, str> {
                <$api as kube::Resource>::version(dt)
            }
            fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
                <$api as kube::Resource>::plural(dt)
            }
            fn meta(&self) -> &kube::api::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use resource_as;

pub mod backoff;
pub mod events;
pub mod freshness;
pub mod labels;
pub mod lanes;
pub mod requests;
pub mod status;
pub mod touched;
pub mod watch;

use kube::api::{Api, ApiResource, DynamicObject};
use kube::{Client, Resource};

/// An `Api` over one namespace, or over the whole cluster when `namespace` is `None`.
pub fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// [`scoped`] for a dynamic resource.
pub fn scoped_dynamic(
    client: &Client,
    namespace: Option<&str>,
    resource: &ApiResource,
) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

/// Resolves once `stop` turns true (or its sender is gone): a controller's shutdown signal.
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What a controller loop does with each reconcile's result: the reconcile already logged and
/// counted its own failure, so the loop only notes it at debug level.
pub async fn log_loop_error<T, E: std::fmt::Display>(result: Result<T, E>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "reconcile loop");
    }
}

/// What a failed API call means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist (404).
    NotFound,
    /// Someone else wrote the object since we read it (409): read again and retry.
    Conflict,
    /// The request was refused as invalid (422) or forbidden (403): retrying will not help
    /// until a person changes something.
    Refused,
    /// Anything else: the network, the apiserver, a timeout. Retry with backoff.
    Transient,
}

/// Classifies a kube error.
pub fn classify(error: &kube::Error) -> ErrorKind {
    match error {
        kube::Error::Api(status) if status.is_not_found() => ErrorKind::NotFound,
        kube::Error::Api(status) if status.is_conflict() => ErrorKind::Conflict,
        kube::Error::Api(status) if matches!(status.code, 403 | 422) => ErrorKind::Refused,
        _ => ErrorKind::Transient,
    }
}

pub fn is_not_found(error: &kube::Error) -> bool {
    classify(error) == ErrorKind::NotFound
}

/// The namespace is being deleted and takes no new objects (the apiserver's NamespaceLifecycle
/// names this cause). Whatever asked for one goes with the namespace: retrying cannot help.
pub fn is_namespace_terminating(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status)
    if status.code == 403
        && status.details.as_ref().is_some_and(|details| {
            details.causes.iter().any(|cause| cause.reason == "NamespaceTerminating")
        }))
}

pub fn is_conflict(error: &kube::Error) -> bool {
    classify(error) == ErrorKind::Conflict
}

/// Errors as the apiserver sends them, for tests.
#[cfg(test)]
pub(crate) mod test_errors {
    /// A refusal with a reason and a code.
    pub fn api_error(reason: &str, code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("x", reason)
                .with_code(code)
                .boxed(),
        )
    }

    /// The answer to a create in a namespace being deleted (with `code`, to vary it).
    pub fn namespace_terminating(code: u16) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "replicasets.apps \"r-1\" is forbidden: unable to create new content in namespace x because it is being terminated",
            "reason": "Forbidden",
            "details": {
                "name": "r-1", "group": "apps", "kind": "replicasets",
                "causes": [{
                    "reason": "NamespaceTerminating",
                    "message": "namespace x is being terminated",
                    "field": "metadata.namespace"
                }]
            },
            "code": code
        }))
        .unwrap_or_default();
        kube::Error::Api(status.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::test_errors::*;
    use super::*;

    #[test]
    fn errors_are_classified_by_reason_and_code() {
        assert_eq!(classify(&api_error("NotFound", 404)), ErrorKind::NotFound);
        assert_eq!(classify(&api_error("Conflict", 409)), ErrorKind::Conflict);
        assert_eq!(classify(&api_error("Invalid", 422)), ErrorKind::Refused);
        assert_eq!(classify(&api_error("Forbidden", 403)), ErrorKind::Refused);
        assert_eq!(
            classify(&api_error("InternalError", 500)),
            ErrorKind::Transient
        );
    }

    #[test]
    fn a_terminating_namespace_is_told_apart_from_other_refusals() {
        assert!(is_namespace_terminating(&namespace_terminating(403)));
        assert!(!is_namespace_terminating(&namespace_terminating(500)));
        assert!(!is_namespace_terminating(&api_error("Forbidden", 403)));
        assert!(!is_namespace_terminating(&api_error("NotFound", 404)));
    }
}
