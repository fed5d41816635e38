//! The pure part: given the world and the time since the last tick, how many requests (and
//! errors, and which latencies) to add per label set. Deterministic: every split carries its
//! fractional remainder to the next tick instead of using random numbers.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::metrics::{RequestLabels, Sample};
use crate::model::{
    ANN_ERROR_CODE, ANN_ERROR_RATE, ANN_LATENCY_MS, DEFAULT_ERROR_CODE, DEFAULT_LATENCY_MS,
    LABEL_APP, LABEL_REVISION, LABEL_REVISION_FALLBACK, Labels, Pod, Route, RouteKind, Target,
    World, resolve_host,
};

pub const SOURCE_WORKLOAD: &str = "sluice-traffic-sim";
/// `destination_version` when no pod answered.
pub const UNKNOWN_VERSION: &str = "unknown";
/// Code for requests to a destination without ready pods (Istio's "no healthy upstream").
pub const NO_UPSTREAM_CODE: u16 = 503;
/// Latency of a "no healthy upstream" answer: the proxy answers at once.
pub const NO_UPSTREAM_LATENCY_MS: f64 = 1.0;
/// Each revision's latency cycles through these factors, one request at a time.
pub const LATENCY_SPREAD: [f64; 5] = [0.8, 0.9, 1.0, 1.1, 1.2];
const CLUSTER_DOMAIN: &str = "cluster.local";
/// Guards `floor` against 2.9999999999 when the exact value is 3.
const EPS: f64 = 1e-9;

/// Splits `n` items over parts in proportion to `shares`, deterministically: each part gets the
/// floor of its exact share plus its carried remainder (`acc`), and the items left over go to the
/// parts with the largest remainders (ties: lowest index). `acc` is updated with what each part is
/// still owed (or has been given ahead), so the split is exact over many calls. Parts with a
/// share <= 0 get nothing and their remainder is reset.
pub fn apportion(n: u64, shares: &[f64], acc: &mut [f64]) -> Vec<u64> {
    assert_eq!(shares.len(), acc.len());
    let mut out = vec![0u64; shares.len()];
    let total: f64 = shares.iter().filter(|s| **s > 0.0).sum();
    for (a, s) in acc.iter_mut().zip(shares) {
        if *s <= 0.0 || !s.is_finite() {
            *a = 0.0;
        }
    }
    if n == 0 || total <= 0.0 || !total.is_finite() {
        return out;
    }
    let live: Vec<usize> = (0..shares.len()).filter(|&i| shares[i] > 0.0).collect();
    let mut exact = vec![0.0f64; shares.len()];
    let mut given: u64 = 0;
    for &i in &live {
        exact[i] = n as f64 * shares[i] / total + acc[i];
        out[i] = (exact[i] + EPS).floor().max(0.0) as u64;
        given += out[i];
    }
    let frac = |i: usize, out: &[u64], exact: &[f64]| exact[i] - out[i] as f64;
    // Too many (only possible when remainders were dropped): take back from the smallest remainders.
    while given > n {
        let i = *live
            .iter()
            .filter(|&&i| out[i] > 0)
            .min_by(|&&a, &&b| frac(a, &out, &exact).total_cmp(&frac(b, &out, &exact)))
            .expect("some part has items when given > 0");
        out[i] -= 1;
        given -= 1;
    }
    // Too few: hand out the rest to the largest remainders.
    while given < n {
        let i = *live
            .iter()
            .min_by(|&&a, &&b| frac(b, &out, &exact).total_cmp(&frac(a, &out, &exact)))
            .expect("live is not empty");
        out[i] += 1;
        given += 1;
    }
    for &i in &live {
        acc[i] = (exact[i] - out[i] as f64).clamp(-1.0, 1.0);
    }
    out
}

/// How `n` requests at `latency` spread over [`LATENCY_SPREAD`], continuing at `cursor`.
pub fn spread_latency(latency: f64, n: u64, cursor: &mut u64) -> Vec<(f64, u64)> {
    let k = LATENCY_SPREAD.len() as u64;
    let mut out = Vec::new();
    for (j, factor) in LATENCY_SPREAD.iter().enumerate() {
        // Requests cursor..cursor+n whose position mod k is j.
        let first = (j as u64 + k - *cursor % k) % k;
        let count = if n > first {
            (n - first).div_ceil(k)
        } else {
            0
        };
        if count > 0 {
            out.push((latency * factor, count));
        }
    }
    *cursor = (*cursor + n) % k;
    out
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
}

impl Totals {
    fn add(&mut self, requests: u64, errors: u64) {
        self.requests += requests;
        self.errors += errors;
    }
}

/// One route in `/state`.
#[derive(Clone, Debug, Serialize)]
pub struct RouteReport {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub index: usize,
    pub route_name: Option<String>,
    pub rps: f64,
    pub requests_last_tick: u64,
    pub totals: Totals,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub destinations: Vec<DestinationReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DestinationReport {
    pub target: String,
    pub weight: u64,
    /// `namespace/name` of the Service it resolved to.
    pub service: Option<String>,
    /// Service selector plus subset labels.
    pub selector: Labels,
    pub ready_pods: usize,
    pub requests_last_tick: u64,
    pub errors_last_tick: u64,
    pub totals: Totals,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub revisions: Vec<RevisionReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RevisionReport {
    pub revision: String,
    pub workload: String,
    pub pods: Vec<String>,
    pub error_rate: f64,
    pub error_code: u16,
    pub latency_ms: f64,
    pub requests_last_tick: u64,
    pub errors_last_tick: u64,
    pub totals: Totals,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

pub struct TickOutput {
    pub samples: Vec<Sample>,
    pub routes: Vec<RouteReport>,
}

/// How a revision answers, from its pods' annotations.
#[derive(Clone, Debug, PartialEq)]
pub struct Behaviour {
    pub error_rate: f64,
    pub error_code: u16,
    pub latency_ms: f64,
    pub notes: Vec<String>,
}

impl Behaviour {
    pub fn of(pod: &Pod) -> Self {
        let mut notes = Vec::new();
        let mut num = |key: &str, default: f64, ok: &dyn Fn(f64) -> bool| -> f64 {
            match pod.annotations.get(key) {
                None => default,
                Some(raw) => match raw.trim().parse::<f64>() {
                    Ok(v) if v.is_finite() && ok(v) => v,
                    _ => {
                        notes.push(format!("{key}={raw:?} is invalid; using {default}"));
                        default
                    }
                },
            }
        };
        let error_rate = num(ANN_ERROR_RATE, 0.0, &|v| (0.0..=1.0).contains(&v));
        let latency_ms = num(ANN_LATENCY_MS, DEFAULT_LATENCY_MS, &|v| v >= 0.0);
        let error_code = num(ANN_ERROR_CODE, f64::from(DEFAULT_ERROR_CODE), &|v| {
            (100.0..=599.0).contains(&v) && v.fract() == 0.0
        }) as u16;
        Self {
            error_rate,
            error_code,
            latency_ms,
            notes,
        }
    }
}

/// A pod's revision: `sluice.dev/pod-template-hash`, else `pod-template-hash`, else "unknown".
pub fn revision_of(pod: &Pod) -> &str {
    pod.labels
        .get(LABEL_REVISION)
        .or_else(|| pod.labels.get(LABEL_REVISION_FALLBACK))
        .map(String::as_str)
        .unwrap_or(UNKNOWN_VERSION)
}

/// A pod's canonical revision, the way Istio derives `destination_canonical_revision`.
pub fn canonical_revision_of(pod: &Pod) -> &str {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|label| pod.labels.get(*label))
    .map(String::as_str)
    .unwrap_or("latest")
}

fn matches(labels: &Labels, selector: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Where a destination leads.
#[derive(Debug)]
struct Resolved<'w> {
    service_namespace: String,
    service_name: String,
    service_fqdn: String,
    found: bool,
    selector: Labels,
    /// Ready, not deleting, matching pods, sorted by name.
    pods: Vec<&'w Pod>,
    note: Option<String>,
}

fn resolve<'w>(world: &'w World, route: &Route, target: &Target) -> Resolved<'w> {
    let (ns, name, subset) = match target {
        Target::Host { host, subset } => match resolve_host(host, &route.namespace) {
            Some((ns, name)) => (ns, name, subset.as_deref()),
            None => {
                return Resolved {
                    service_namespace: route.namespace.clone(),
                    service_name: host.clone(),
                    service_fqdn: host.clone(),
                    found: false,
                    selector: Labels::new(),
                    pods: Vec::new(),
                    note: Some(format!("host {host} is not a cluster Service")),
                };
            }
        },
        Target::Backend { namespace, name } => (namespace.clone(), name.clone(), None),
    };
    let mut resolved = Resolved {
        service_fqdn: format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
        service_namespace: ns,
        service_name: name,
        found: false,
        selector: Labels::new(),
        pods: Vec::new(),
        note: None,
    };
    let (ns, name) = (&resolved.service_namespace, &resolved.service_name);
    let Some(service) = world
        .services
        .iter()
        .find(|s| &s.namespace == ns && &s.name == name)
    else {
        resolved.note = Some(format!("Service {ns}/{name} not found"));
        return resolved;
    };
    resolved.found = true;
    if service.selector.is_empty() {
        resolved.note = Some(format!("Service {ns}/{name} has no selector"));
        return resolved;
    }
    let mut subset_labels = Labels::new();
    if let Some(subset) = subset {
        // Istio looks in the client's namespace, then the Service's.
        let mut rules: Vec<_> = world
            .destination_rules
            .iter()
            .filter(|dr| {
                resolve_host(&dr.host, &dr.namespace).as_ref() == Some(&(ns.clone(), name.clone()))
            })
            .filter_map(|dr| Some((dr, dr.subsets.iter().find(|s| s.name == subset)?)))
            .collect();
        rules.sort_by_key(|(dr, _)| {
            (
                dr.namespace != route.namespace,
                &dr.namespace != ns,
                dr.namespace.clone(),
                dr.name.clone(),
            )
        });
        match rules.first() {
            Some((_, s)) => subset_labels = s.labels.clone(),
            None => {
                resolved.note = Some(format!(
                    "subset {subset} of {ns}/{name} is not defined in any DestinationRule"
                ));
                resolved.selector = service.selector.clone();
                return resolved;
            }
        }
    }
    let mut not_ready = 0;
    let mut pods: Vec<&Pod> = world
        .pods
        .iter()
        .filter(|p| {
            &p.namespace == ns
                && matches(&p.labels, &service.selector)
                && matches(&p.labels, &subset_labels)
        })
        .filter(|p| {
            let ok = p.ready && !p.deleting;
            not_ready += usize::from(!ok);
            ok
        })
        .collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    if pods.is_empty() {
        resolved.note = Some(format!(
            "no ready pods ({not_ready} matching pods not ready or deleting)"
        ));
    } else if not_ready > 0 {
        resolved.note = Some(format!("{not_ready} matching pods not ready or deleting"));
    }
    let mut selector = service.selector.clone();
    selector.extend(subset_labels);
    resolved.selector = selector;
    resolved.pods = pods;
    resolved
}

/// The simulator's memory between ticks: carried remainders and totals.
#[derive(Default)]
pub struct Simulator {
    route_acc: HashMap<String, f64>,
    dest_acc: HashMap<String, f64>,
    rev_acc: HashMap<String, f64>,
    err_acc: HashMap<String, f64>,
    latency_cursor: HashMap<String, u64>,
    totals: HashMap<String, Totals>,
}

impl Simulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Advances the simulation by `dt` seconds.
    pub fn step(&mut self, world: &World, dt: f64) -> TickOutput {
        let dt = if dt.is_finite() { dt.max(0.0) } else { 0.0 };
        let mut seen: HashSet<String> = HashSet::new();
        let mut samples = Vec::new();
        let mut reports = Vec::new();
        for route in &world.routes {
            let rkey = route.key();
            seen.insert(rkey.clone());
            let acc = self.route_acc.entry(rkey.clone()).or_default();
            *acc += route.rps * dt;
            let mut n = (*acc + EPS).floor().max(0.0) as u64;
            *acc -= n as f64;
            if route.destinations.is_empty() {
                n = 0;
            }

            let dkeys: Vec<String> = route
                .destinations
                .iter()
                .enumerate()
                .map(|(i, d)| format!("{rkey}|{i}|{}", d.target))
                .collect();
            let shares: Vec<f64> = route.destinations.iter().map(|d| d.weight as f64).collect();
            let mut accs: Vec<f64> = dkeys
                .iter()
                .map(|k| self.dest_acc.get(k).copied().unwrap_or(0.0))
                .collect();
            let alloc = apportion(n, &shares, &mut accs);
            for (k, a) in dkeys.iter().zip(&accs) {
                self.dest_acc.insert(k.clone(), *a);
                seen.insert(k.clone());
            }

            let mut destinations = Vec::new();
            for ((dest, dkey), &dn) in route.destinations.iter().zip(&dkeys).zip(&alloc) {
                let resolved = resolve(world, route, &dest.target);
                let (report, mut dest_samples) =
                    self.destination(dkey, dest.weight, &dest.target, &resolved, dn, &mut seen);
                samples.append(&mut dest_samples);
                destinations.push(report);
            }
            let totals = self.totals.entry(rkey).or_default();
            totals.add(n, destinations.iter().map(|d| d.errors_last_tick).sum());
            reports.push(RouteReport {
                kind: route.kind,
                namespace: route.namespace.clone(),
                name: route.name.clone(),
                index: route.index,
                route_name: route.route_name.clone(),
                rps: route.rps,
                requests_last_tick: n,
                totals: *totals,
                notes: route.notes.clone(),
                destinations,
            });
        }
        self.route_acc.retain(|k, _| seen.contains(k));
        self.dest_acc.retain(|k, _| seen.contains(k));
        self.rev_acc.retain(|k, _| seen.contains(k));
        self.err_acc.retain(|k, _| seen.contains(k));
        self.latency_cursor.retain(|k, _| seen.contains(k));
        self.totals.retain(|k, _| seen.contains(k));
        TickOutput {
            samples,
            routes: reports,
        }
    }
}

fn request_labels(
    r: &Resolved,
    workload: &str,
    (version, canonical): (&str, &str),
    code: u16,
) -> RequestLabels {
    RequestLabels {
        reporter: "destination".into(),
        source_workload: SOURCE_WORKLOAD.into(),
        destination_workload: workload.into(),
        destination_workload_namespace: r.service_namespace.clone(),
        destination_service: r.service_fqdn.clone(),
        destination_service_name: r.service_name.clone(),
        destination_service_namespace: r.service_namespace.clone(),
        destination_version: version.into(),
        destination_canonical_revision: canonical.into(),
        request_protocol: "http".into(),
        response_code: code.to_string(),
    }
}

impl Simulator {
    fn destination(
        &mut self,
        dkey: &str,
        weight: u64,
        target: &Target,
        resolved: &Resolved,
        n: u64,
        seen: &mut HashSet<String>,
    ) -> (DestinationReport, Vec<Sample>) {
        let mut samples = Vec::new();
        let mut revisions = Vec::new();
        let mut errors = 0;
        if resolved.pods.is_empty() {
            // Istio's "no healthy upstream".
            errors = n;
            if n > 0 {
                samples.push(Sample {
                    labels: request_labels(
                        resolved,
                        &resolved.service_name,
                        (UNKNOWN_VERSION, UNKNOWN_VERSION),
                        NO_UPSTREAM_CODE,
                    ),
                    requests: n,
                    latencies: vec![(NO_UPSTREAM_LATENCY_MS, n)],
                });
            }
        } else {
            let mut by_revision: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
            for p in &resolved.pods {
                by_revision.entry(revision_of(p)).or_default().push(p);
            }
            let rkeys: Vec<String> = by_revision.keys().map(|r| format!("{dkey}|{r}")).collect();
            let shares: Vec<f64> = by_revision.values().map(|p| p.len() as f64).collect();
            let mut accs: Vec<f64> = rkeys
                .iter()
                .map(|k| self.rev_acc.get(k).copied().unwrap_or(0.0))
                .collect();
            let alloc = apportion(n, &shares, &mut accs);
            for (((revision, pods), rkey), (&rn, acc)) in
                by_revision.iter().zip(&rkeys).zip(alloc.iter().zip(&accs))
            {
                seen.insert(rkey.clone());
                self.rev_acc.insert(rkey.clone(), *acc);
                let behaviour = Behaviour::of(pods[0]);
                let workload = pods[0]
                    .labels
                    .get(LABEL_APP)
                    .cloned()
                    .unwrap_or_else(|| resolved.service_name.clone());

                let err_acc = self.err_acc.entry(rkey.clone()).or_default();
                *err_acc += rn as f64 * behaviour.error_rate;
                let rev_errors = ((*err_acc + EPS).floor().max(0.0) as u64).min(rn);
                *err_acc -= rev_errors as f64;
                let ok = rn - rev_errors;
                errors += rev_errors;

                let cursor = self.latency_cursor.entry(rkey.clone()).or_default();
                for (count, code) in [(ok, 200), (rev_errors, behaviour.error_code)] {
                    if count > 0 {
                        samples.push(Sample {
                            labels: request_labels(
                                resolved,
                                &workload,
                                (revision, canonical_revision_of(pods[0])),
                                code,
                            ),
                            requests: count,
                            latencies: spread_latency(behaviour.latency_ms, count, cursor),
                        });
                    }
                }
                let totals = self.totals.entry(rkey.clone()).or_default();
                totals.add(rn, rev_errors);
                revisions.push(RevisionReport {
                    revision: revision.to_string(),
                    workload,
                    pods: pods.iter().map(|p| p.name.clone()).collect(),
                    error_rate: behaviour.error_rate,
                    error_code: behaviour.error_code,
                    latency_ms: behaviour.latency_ms,
                    requests_last_tick: rn,
                    errors_last_tick: rev_errors,
                    totals: *totals,
                    notes: behaviour.notes,
                });
            }
        }
        let totals = self.totals.entry(dkey.to_string()).or_default();
        totals.add(n, errors);
        let report = DestinationReport {
            target: target.to_string(),
            weight,
            service: resolved
                .found
                .then(|| format!("{}/{}", resolved.service_namespace, resolved.service_name)),
            selector: resolved.selector.clone(),
            ready_pods: resolved.pods.len(),
            requests_last_tick: n,
            errors_last_tick: errors,
            totals: *totals,
            note: resolved.note.clone(),
            revisions,
        };
        (report, samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Destination, DestinationRule, Service, Subset};

    const NS: &str = "shop";

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(name: &str, hash: &str, annotations: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: NS.into(),
            name: name.into(),
            labels: labels(&[("app", "demo"), (LABEL_REVISION, hash)]),
            annotations: labels(annotations),
            ready: true,
            deleting: false,
        }
    }

    fn service(name: &str, selector: &[(&str, &str)]) -> Service {
        Service {
            namespace: NS.into(),
            name: name.into(),
            selector: labels(selector),
        }
    }

    fn vs_route(rps: f64, dests: &[(&str, Option<&str>, u64)]) -> Route {
        Route {
            kind: RouteKind::VirtualService,
            namespace: NS.into(),
            name: "demo".into(),
            index: 0,
            route_name: None,
            rps,
            destinations: dests
                .iter()
                .map(|(host, subset, weight)| Destination {
                    target: Target::Host {
                        host: host.to_string(),
                        subset: subset.map(str::to_string),
                    },
                    weight: *weight,
                })
                .collect(),
            notes: Vec::new(),
        }
    }

    fn demo_world(routes: Vec<Route>) -> World {
        World {
            services: vec![service("demo", &[("app", "demo")])],
            pods: vec![
                pod("demo-a1", "aaa", &[]),
                pod("demo-a2", "aaa", &[]),
                pod("demo-b1", "bbb", &[(ANN_ERROR_RATE, "0.3")]),
            ],
            destination_rules: vec![DestinationRule {
                namespace: NS.into(),
                name: "demo".into(),
                host: "demo.shop.svc.cluster.local".into(),
                subsets: vec![
                    Subset {
                        name: "stable".into(),
                        labels: labels(&[(LABEL_REVISION, "aaa")]),
                    },
                    Subset {
                        name: "canary".into(),
                        labels: labels(&[(LABEL_REVISION, "bbb")]),
                    },
                ],
            }],
            routes,
        }
    }

    /// Sums samples by (version, code).
    fn by_version_code(samples: &[Sample]) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for s in samples {
            *out.entry((
                s.labels.destination_version.clone(),
                s.labels.response_code.clone(),
            ))
            .or_default() += s.requests;
        }
        out
    }

    fn key(v: &str, c: &str) -> (String, String) {
        (v.to_string(), c.to_string())
    }

    #[test]
    fn apportion_is_exact_for_round_numbers() {
        let mut acc = [0.0, 0.0];
        assert_eq!(apportion(1000, &[90.0, 10.0], &mut acc), vec![900, 100]);
        assert_eq!(acc, [0.0, 0.0]);
    }

    #[test]
    fn apportion_carries_remainders() {
        let mut acc = [0.0; 3];
        let mut sum = [0u64; 3];
        for _ in 0..300 {
            let got = apportion(1, &[1.0, 1.0, 1.0], &mut acc);
            assert_eq!(got.iter().sum::<u64>(), 1);
            for i in 0..3 {
                sum[i] += got[i];
            }
        }
        assert_eq!(sum, [100, 100, 100]);
        // A zero share gets nothing, even with a carried remainder.
        let mut acc = [0.9, 0.0];
        assert_eq!(apportion(5, &[0.0, 1.0], &mut acc), vec![0, 5]);
        assert_eq!(acc[0], 0.0);
        // 2/3 vs 1/3 over 10 ticks of 1 request.
        let mut acc = [0.0; 2];
        let mut sum = [0u64; 2];
        for _ in 0..9 {
            let got = apportion(1, &[2.0, 1.0], &mut acc);
            sum[0] += got[0];
            sum[1] += got[1];
        }
        assert_eq!(sum, [6, 3]);
    }

    #[test]
    fn latency_spread_cycles() {
        let mut cursor = 0;
        let got = spread_latency(100.0, 7, &mut cursor);
        let total: u64 = got.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 7);
        assert_eq!(cursor, 2);
        // 0.8 and 0.9 twice, the rest once.
        assert_eq!(got[0], (80.0, 2));
        assert_eq!(got[1], (90.0, 2));
        assert_eq!(got[2], (100.0, 1));
        // Continues at 1.0.
        let got = spread_latency(100.0, 1, &mut cursor);
        assert_eq!(got, vec![(100.0, 1)]);
        // Mean over whole cycles is the configured latency.
        let mut cursor = 0;
        let got = spread_latency(50.0, 1000, &mut cursor);
        let sum: f64 = got.iter().map(|(v, n)| v * *n as f64).sum();
        assert!((sum / 1000.0 - 50.0).abs() < 1e-9);
    }

    #[test]
    fn weights_90_10_over_1000_requests() {
        let world = demo_world(vec![vs_route(
            1000.0,
            &[("demo", Some("stable"), 90), ("demo", Some("canary"), 10)],
        )]);
        let mut sim = Simulator::new();
        let out = sim.step(&world, 1.0);
        let got = by_version_code(&out.samples);
        assert_eq!(got[&key("aaa", "200")], 900);
        assert_eq!(got[&key("bbb", "200")] + got[&key("bbb", "500")], 100);
        let r = &out.routes[0];
        assert_eq!(r.requests_last_tick, 1000);
        assert_eq!(r.destinations[0].requests_last_tick, 900);
        assert_eq!(r.destinations[1].requests_last_tick, 100);
    }

    #[test]
    fn subsets_select_by_destination_rule_labels() {
        let world = demo_world(vec![vs_route(
            100.0,
            &[("demo.shop.svc.cluster.local", Some("canary"), 100)],
        )]);
        let mut sim = Simulator::new();
        let out = sim.step(&world, 1.0);
        let d = &out.routes[0].destinations[0];
        assert_eq!(d.ready_pods, 1);
        assert_eq!(d.revisions.len(), 1);
        assert_eq!(d.revisions[0].revision, "bbb");
        assert_eq!(d.revisions[0].pods, vec!["demo-b1".to_string()]);
        assert_eq!(d.selector[LABEL_REVISION], "bbb");
        assert_eq!(d.service.as_deref(), Some("shop/demo"));
        // The short name and name.namespace forms resolve to the same Service.
        for host in ["demo", "demo.shop"] {
            let world = demo_world(vec![vs_route(10.0, &[(host, Some("stable"), 100)])]);
            let out = Simulator::new().step(&world, 1.0);
            let d = &out.routes[0].destinations[0];
            assert_eq!(d.ready_pods, 2, "{host}");
            assert_eq!(d.revisions[0].revision, "aaa", "{host}");
        }
    }

    #[test]
    fn unknown_subset_is_no_healthy_upstream() {
        let world = demo_world(vec![vs_route(10.0, &[("demo", Some("nope"), 100)])]);
        let out = Simulator::new().step(&world, 1.0);
        let got = by_version_code(&out.samples);
        assert_eq!(got[&key(UNKNOWN_VERSION, "503")], 10);
        assert!(out.routes[0].destinations[0].note.is_some());
    }

    #[test]
    fn zero_ready_pods_gives_503() {
        let mut world = demo_world(vec![vs_route(
            100.0,
            &[("demo", Some("stable"), 80), ("demo", Some("canary"), 20)],
        )]);
        world.pods[2].ready = false;
        let mut sim = Simulator::new();
        let out = sim.step(&world, 1.0);
        let got = by_version_code(&out.samples);
        assert_eq!(got[&key("aaa", "200")], 80);
        assert_eq!(got[&key(UNKNOWN_VERSION, "503")], 20);
        let s503 = out
            .samples
            .iter()
            .find(|s| s.labels.response_code == "503")
            .unwrap();
        assert_eq!(s503.labels.destination_workload, "demo");
        assert_eq!(s503.labels.destination_service_name, "demo");
        assert_eq!(s503.labels.destination_service_namespace, NS);
        assert_eq!(out.routes[0].destinations[1].errors_last_tick, 20);
        // A deleting pod does not count either; neither does a missing Service.
        world.pods[2].ready = true;
        world.pods[2].deleting = true;
        world.services.clear();
        let out = sim.step(&world, 1.0);
        let got = by_version_code(&out.samples);
        assert_eq!(got[&key(UNKNOWN_VERSION, "503")], 100);
    }

    #[test]
    fn zero_weight_destination_without_pods_is_silent() {
        let mut world = demo_world(vec![vs_route(
            100.0,
            &[("demo", Some("stable"), 100), ("demo", Some("canary"), 0)],
        )]);
        world.pods.retain(|p| revision_of(p) == "aaa");
        let out = Simulator::new().step(&world, 1.0);
        let got = by_version_code(&out.samples);
        assert_eq!(got.len(), 1);
        assert_eq!(got[&key("aaa", "200")], 100);
    }

    #[test]
    fn error_rate_0_3_gives_30_percent() {
        let world = demo_world(vec![vs_route(50.0, &[("demo", Some("canary"), 100)])]);
        let mut sim = Simulator::new();
        let mut totals = BTreeMap::new();
        for _ in 0..20 {
            for (k, v) in by_version_code(&sim.step(&world, 0.1).samples) {
                *totals.entry(k).or_insert(0) += v;
            }
        }
        // 50 rps for 2 s = 100 requests, 30 of them errors.
        assert_eq!(totals[&key("bbb", "500")], 30);
        assert_eq!(totals[&key("bbb", "200")], 70);
    }

    #[test]
    fn error_code_annotation() {
        let mut world = demo_world(vec![vs_route(10.0, &[("demo", Some("canary"), 100)])]);
        world.pods[2]
            .annotations
            .insert(ANN_ERROR_CODE.into(), "502".into());
        world.pods[2]
            .annotations
            .insert(ANN_ERROR_RATE.into(), "1".into());
        let got = by_version_code(&Simulator::new().step(&world, 1.0).samples);
        assert_eq!(got[&key("bbb", "502")], 10);
    }

    #[test]
    fn revisions_split_by_ready_pod_count() {
        // No subset: the Service selects 2 aaa pods and 1 bbb pod.
        let world = demo_world(vec![vs_route(300.0, &[("demo", None, 100)])]);
        let out = Simulator::new().step(&world, 1.0);
        let d = &out.routes[0].destinations[0];
        assert_eq!(d.revisions.len(), 2);
        assert_eq!(d.revisions[0].requests_last_tick, 200);
        assert_eq!(d.revisions[1].requests_last_tick, 100);
        assert_eq!(d.revisions[1].errors_last_tick, 30);
    }

    #[test]
    fn fractions_carry_across_ticks() {
        let world = demo_world(vec![vs_route(5.0, &[("demo", Some("stable"), 100)])]);
        let mut sim = Simulator::new();
        let mut per_second = Vec::new();
        let mut count = 0;
        for tick in 1..=30 {
            count += sim.step(&world, 0.1).routes[0].requests_last_tick;
            if tick % 10 == 0 {
                per_second.push(count);
                count = 0;
            }
        }
        assert_eq!(per_second, vec![5, 5, 5]);
        // 0.3 rps at 1 s ticks: 3 requests in 10 s.
        let world = demo_world(vec![vs_route(0.3, &[("demo", Some("stable"), 100)])]);
        let mut sim = Simulator::new();
        let total: u64 = (0..10)
            .map(|_| sim.step(&world, 1.0).routes[0].requests_last_tick)
            .sum();
        assert_eq!(total, 3);
    }

    #[test]
    fn weights_80_20_at_50_rps_per_tick() {
        let world = demo_world(vec![vs_route(
            50.0,
            &[("demo", Some("stable"), 80), ("demo", Some("canary"), 20)],
        )]);
        let mut sim = Simulator::new();
        for _ in 0..5 {
            let out = sim.step(&world, 1.0);
            let d = &out.routes[0].destinations;
            assert_eq!(d[0].requests_last_tick, 40);
            assert_eq!(d[1].requests_last_tick, 10);
        }
        let out = sim.step(&world, 1.0);
        assert_eq!(out.routes[0].totals.requests, 300);
        assert_eq!(out.routes[0].destinations[1].totals.requests, 60);
        assert_eq!(out.routes[0].destinations[1].totals.errors, 18);
    }

    #[test]
    fn http_route_backends_and_workload_labels() {
        let mut world = demo_world(Vec::new());
        world.services = vec![
            service("demo-stable", &[("app", "demo"), (LABEL_REVISION, "aaa")]),
            service("demo-canary", &[(LABEL_REVISION, "bbb")]),
        ];
        world.pods[2].labels.remove("app");
        world.routes = vec![Route {
            kind: RouteKind::HTTPRoute,
            namespace: NS.into(),
            name: "demo".into(),
            index: 0,
            route_name: None,
            rps: 100.0,
            destinations: vec![
                Destination {
                    target: Target::Backend {
                        namespace: NS.into(),
                        name: "demo-stable".into(),
                    },
                    weight: 3,
                },
                Destination {
                    target: Target::Backend {
                        namespace: NS.into(),
                        name: "demo-canary".into(),
                    },
                    weight: 1,
                },
            ],
            notes: Vec::new(),
        }];
        let out = Simulator::new().step(&world, 1.0);
        let total = |svc: &str| -> u64 {
            out.samples
                .iter()
                .filter(|s| s.labels.destination_service_name == svc)
                .map(|s| s.requests)
                .sum()
        };
        assert_eq!(total("demo-stable"), 75);
        assert_eq!(total("demo-canary"), 25);
        // No `app` label: the workload is the Service name.
        assert!(
            out.samples
                .iter()
                .filter(|s| s.labels.destination_version == "bbb")
                .all(|s| s.labels.destination_workload == "demo-canary")
        );
        assert!(
            out.samples
                .iter()
                .all(|s| s.labels.source_workload == SOURCE_WORKLOAD
                    && s.labels.reporter == "destination")
        );
    }

    #[test]
    fn revision_label_fallbacks() {
        let mut p = pod("x", "aaa", &[]);
        assert_eq!(revision_of(&p), "aaa");
        p.labels.remove(LABEL_REVISION);
        p.labels
            .insert(LABEL_REVISION_FALLBACK.into(), "ccc".into());
        assert_eq!(revision_of(&p), "ccc");
        p.labels.clear();
        assert_eq!(revision_of(&p), UNKNOWN_VERSION);
        assert_eq!(canonical_revision_of(&p), "latest");
        p.labels.insert("version".into(), "v2".into());
        assert_eq!(canonical_revision_of(&p), "v2");
        p.labels
            .insert("service.istio.io/canonical-revision".into(), "bbb".into());
        assert_eq!(canonical_revision_of(&p), "bbb");
    }

    #[test]
    fn behaviour_from_annotations() {
        let b = Behaviour::of(&pod("x", "aaa", &[]));
        assert_eq!((b.error_rate, b.error_code, b.latency_ms), (0.0, 500, 50.0));
        let b = Behaviour::of(&pod(
            "x",
            "aaa",
            &[(ANN_ERROR_RATE, "2"), (ANN_LATENCY_MS, "300")],
        ));
        assert_eq!((b.error_rate, b.latency_ms), (0.0, 300.0));
        assert_eq!(b.notes.len(), 1);
    }

    #[test]
    fn accumulators_are_dropped_with_their_routes() {
        let world = demo_world(vec![vs_route(1.5, &[("demo", Some("stable"), 100)])]);
        let mut sim = Simulator::new();
        sim.step(&world, 1.0);
        assert!(!sim.route_acc.is_empty());
        sim.step(&demo_world(Vec::new()), 1.0);
        assert!(sim.route_acc.is_empty() && sim.dest_acc.is_empty() && sim.totals.is_empty());
    }
}
