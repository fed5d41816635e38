//! Istio's standard metrics: `istio_requests_total` and
//! `istio_request_duration_milliseconds`, in the OpenMetrics text format.

use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Istio's histogram buckets for request durations (milliseconds).
pub const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label set of both metrics (a subset of Istio's standard labels).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    /// FQDN, e.g. `checkout.shop.svc.cluster.local`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_version: String,
    /// As Istio reports it: the pod label `service.istio.io/canonical-revision`, else
    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    pub destination_canonical_revision: String,
    pub request_protocol: String,
    pub response_code: String,
}

/// A classic histogram that can record `n` identical observations at once, so a tick of many
/// thousand requests costs a handful of operations.
#[derive(Debug)]
pub struct BulkHistogram {
    inner: Mutex<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    sum: f64,
    count: u64,
    /// (upper bound, non-cumulative count), last bound +Inf.
    buckets: Vec<(f64, u64)>,
}

impl Default for BulkHistogram {
    fn default() -> Self {
        let buckets = DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|b| (b, 0))
            .collect();
        Self {
            inner: Mutex::new(HistogramInner {
                sum: 0.0,
                count: 0,
                buckets,
            }),
        }
    }
}

impl BulkHistogram {
    /// Records `n` observations of `value`.
    pub fn observe_n(&self, value: f64, n: u64) {
        if n == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if value.is_finite() {
            inner.sum += value * n as f64;
        }
        inner.count += n;
        if let Some(bucket) = inner.buckets.iter_mut().find(|(le, _)| value <= *le) {
            bucket.1 += n;
        } else if let Some(last) = inner.buckets.last_mut() {
            // NaN lands in +Inf.
            last.1 += n;
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap().count
    }
}

impl TypedMetric for BulkHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for BulkHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        encoder.encode_histogram::<NoLabelSet>(inner.sum, inner.count, &inner.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// What a tick adds for one label set.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: RequestLabels,
    pub requests: u64,
    /// `(latency ms, how many requests)`; the counts add up to `requests`.
    pub latencies: Vec<(f64, u64)>,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, BulkHistogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let durations = Family::<RequestLabels, BulkHistogram>::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests handled, by destination (simulated by sluice-traffic-sim)",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request durations in milliseconds (simulated by sluice-traffic-sim)",
            durations.clone(),
        );
        Self {
            registry,
            requests,
            durations,
        }
    }

    pub fn record(&self, samples: &[Sample]) {
        for s in samples {
            if s.requests == 0 {
                continue;
            }
            self.requests.get_or_create(&s.labels).inc_by(s.requests);
            let hist = self.durations.get_or_create(&s.labels);
            for &(latency, n) in &s.latencies {
                hist.observe_n(latency, n);
            }
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(code: &str) -> RequestLabels {
        RequestLabels {
            reporter: "destination".into(),
            source_workload: "sluice-traffic-sim".into(),
            destination_workload: "demo".into(),
            destination_workload_namespace: "shop".into(),
            destination_service: "demo.shop.svc.cluster.local".into(),
            destination_service_name: "demo".into(),
            destination_service_namespace: "shop".into(),
            destination_version: "aaa".into(),
            destination_canonical_revision: "aaa".into(),
            request_protocol: "http".into(),
            response_code: code.into(),
        }
    }

    #[test]
    fn exposes_istio_names() {
        let m = Metrics::new();
        m.record(&[Sample {
            labels: labels("200"),
            requests: 10,
            latencies: vec![(40.0, 4), (60.0, 6)],
        }]);
        let text = m.encode().unwrap();
        assert!(text.contains("# TYPE istio_requests counter"), "{text}");
        assert!(text.contains("istio_requests_total{"), "{text}");
        assert!(!text.contains("istio_requests_total_total"), "{text}");
        assert!(
            text.contains("# TYPE istio_request_duration_milliseconds histogram"),
            "{text}"
        );
        for suffix in ["_bucket{", "_sum{", "_count{"] {
            assert!(
                text.contains(&format!("istio_request_duration_milliseconds{suffix}")),
                "{suffix}: {text}"
            );
        }
        assert!(text.contains("response_code=\"200\""), "{text}");
        let bucket = |le: &str| -> String {
            let prefix = format!("istio_request_duration_milliseconds_bucket{{le=\"{le}\",");
            let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap();
            line.rsplit(' ').next().unwrap().to_string()
        };
        assert_eq!(bucket("25.0"), "0");
        assert_eq!(bucket("50.0"), "4");
        assert_eq!(bucket("100.0"), "10");
        assert_eq!(bucket("+Inf"), "10");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap();
        assert!(line.ends_with(" 10"), "{line}");
    }

    #[test]
    fn bulk_histogram_counts() {
        let h = BulkHistogram::default();
        h.observe_n(3.0, 5);
        h.observe_n(20000.0, 2);
        h.observe_n(f64::NAN, 1);
        assert_eq!(h.count(), 8);
        let inner = h.inner.lock().unwrap();
        assert_eq!(inner.buckets[1], (5.0, 5));
        assert_eq!(inner.buckets.last().unwrap().1, 3);
    }
}
