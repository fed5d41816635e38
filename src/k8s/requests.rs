//! Counts the controllers' requests to the apiserver by verb and resource
//! (`sluice_kube_requests_total`): what an idle resync or a release costs the apiserver,
//! measured by the benchmark and visible on a dashboard.

use std::task::{Context, Poll};

use http::{Method, Request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// get, list, watch, create, apply, patch, update, delete.
    pub verb: String,
    /// The plural resource and its subresource, e.g. `rollouts/status` (no names: bounded).
    pub resource: String,
}

pub type RequestCounts = Family<RequestLabels, Counter>;

/// The client layer that counts every request it passes on.
#[derive(Clone, Debug)]
pub struct CountingLayer(pub RequestCounts);

impl<S> Layer<S> for CountingLayer {
    type Service = CountingService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountingService {
            inner,
            counts: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CountingService<S> {
    inner: S,
    counts: RequestCounts,
}

impl<S, B> Service<Request<B>> for CountingService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let labels = classify(
            request.method(),
            request.uri().path(),
            request.uri().query().unwrap_or_default(),
            content_type,
        );
        self.counts.get_or_create(&labels).inc();
        self.inner.call(request)
    }
}

/// The Kubernetes verb and resource of a request, from its method and path.
pub fn classify(
    method: &Method,
    path: &str,
    query: &str,
    content_type: Option<&str>,
) -> RequestLabels {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/group/version/...; anything else (discovery, /version) is "other".
    let rest: &[&str] = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [] => ("other".to_string(), true),
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
    };
    let watch = query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::DELETE => "delete",
        Method::PATCH if content_type == Some("application/apply-patch+yaml") => "apply",
        Method::PATCH => "patch",
        _ => "other",
    };
    RequestLabels {
        verb: verb.into(),
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Method, path, query, content type, then the verb and resource expected.
    type Case = (
        Method,
        &'static str,
        &'static str,
        Option<&'static str>,
        &'static str,
        &'static str,
    );

    #[test]
    fn requests_are_named_by_verb_and_resource() {
        let apply = Some("application/apply-patch+yaml");
        let cases: &[Case] = &[
            (
                Method::GET,
                "/apis/sluice.dev/v1alpha1/namespaces/a/rollouts/web",
                "",
                None,
                "get",
                "rollouts",
            ),
            (
                Method::GET,
                "/apis/apps/v1/namespaces/a/replicasets",
                "labelSelector=x",
                None,
                "list",
                "replicasets",
            ),
            (
                Method::GET,
                "/apis/sluice.dev/v1alpha1/rollouts",
                "watch=true&resourceVersion=5",
                None,
                "watch",
                "rollouts",
            ),
            (
                Method::PATCH,
                "/apis/sluice.dev/v1alpha1/namespaces/a/rollouts/web/status",
                "fieldManager=sluice",
                apply,
                "apply",
                "rollouts/status",
            ),
            (
                Method::PATCH,
                "/apis/networking.istio.io/v1/namespaces/a/virtualservices/web",
                "",
                Some("application/merge-patch+json"),
                "patch",
                "virtualservices",
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/a/events",
                "",
                None,
                "create",
                "events",
            ),
            (
                Method::GET,
                "/api/v1/namespaces",
                "",
                None,
                "list",
                "namespaces",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a",
                "",
                None,
                "get",
                "namespaces",
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/s/leases/l",
                "",
                None,
                "update",
                "leases",
            ),
            (Method::GET, "/version", "", None, "get", "other"),
        ];
        for (method, path, query, content_type, verb, resource) in cases {
            let got = classify(method, path, query, *content_type);
            assert_eq!(
                (got.verb.as_str(), got.resource.as_str()),
                (*verb, *resource),
                "{method} {path}?{query}"
            );
        }
    }
}
