//! What every controller's reconcile gets: the client, one event recorder, the metrics, a
//! pool of Prometheus clients, the settings, and per-object error backoff.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;

use crate::analysis::pool::PrometheusPool;
use crate::k8s::backoff::Backoff;
use crate::k8s::events::{Poster, Recorder};
use crate::k8s::lanes::Lane;
use crate::leader::LeaseSettings;
use crate::server::Health;
use crate::telemetry::Metrics;

/// Everything `sluice controller` is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `None` runs without leader election (a single replica, or local development).
    pub lease: Option<LeaseSettings>,
    /// Prometheus address used when a Rollout or ErrorBudget does not name one.
    pub prometheus_address: Option<String>,
    /// Watch only this namespace (`None`: the whole cluster).
    pub namespace: Option<String>,
    /// The operator's own namespace: a Notifier there may cover every namespace.
    pub operator_namespace: String,
    /// Requests to the apiserver awaiting their answer at once, a watch until its stream
    /// starts, in all lanes but the routes' together, and as many again for the routes (0: no
    /// bound). See `k8s::lanes`.
    pub kube_requests_in_flight: usize,
    /// Reconciles each controller runs at once (0: no bound); more wait in its queue. A
    /// Rollout reconcile awaiting Prometheus does not count.
    pub max_concurrent_reconciles: u16,
    /// How long a passing measurement may wait to be written to a Rollout's status (see
    /// `rollout::runs::passes_may_wait`; zero: each at once).
    pub record_passes_within: Duration,
}

/// The default of `--kube-requests-in-flight` (measured in docs/performance.md).
pub const DEFAULT_KUBE_REQUESTS_IN_FLIGHT: usize = 16;

/// The default of `--max-concurrent-reconciles` (measured in docs/performance.md).
pub const DEFAULT_MAX_CONCURRENT_RECONCILES: u16 = 100;

/// The default of `--record-passes-within-seconds`: `kubectl sluice status` shows a passing
/// analysis at most this far behind, and 100 canaries measured every 5 s write about 3 statuses
/// a second instead of 20 (docs/performance.md).
pub const DEFAULT_RECORD_PASSES_WITHIN: Duration = Duration::from_secs(30);

impl Settings {
    /// Settings for a controller run in-process (tests): no listener, no leader election.
    pub fn local(namespace: Option<String>, prometheus_address: Option<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            lease: None,
            prometheus_address,
            namespace,
            operator_namespace: "sluice-system".into(),
            kube_requests_in_flight: DEFAULT_KUBE_REQUESTS_IN_FLIGHT,
            max_concurrent_reconciles: DEFAULT_MAX_CONCURRENT_RECONCILES,
            record_passes_within: DEFAULT_RECORD_PASSES_WITHIN,
        }
    }

    /// What the ErrorBudget and Pipeline controllers run with: their bound on reconciles at
    /// once. The Rollout controller bounds its own (`rollout::slots`), so that a reconcile
    /// awaiting Prometheus holds no place a person's abort would wait for.
    pub fn controller_config(&self) -> kube::runtime::controller::Config {
        kube::runtime::controller::Config::default().concurrency(self.max_concurrent_reconciles)
    }
}

/// The clients of the lanes beside the usual one (k8s/lanes.rs).
pub struct Lanes {
    pub route: Client,
    pub urgent: Client,
    pub progress: Client,
    pub record: Client,
}

/// Shared by every controller's reconcile, as `Arc<Context>`.
pub struct Context {
    /// The controllers' requests: reads, ReplicaSets, Events, statuses that record what was
    /// observed or measured (`Lane::Usual`).
    pub client: Client,
    /// Route reads and writes, what a step or an abort waits on, on places of their own
    /// (`Lane::Route`: set up in `operator::run`; tests share one client).
    pub route: Client,
    /// What else a moving release waits on now: a Rollout read fresh after Sluice's own
    /// write, and the status recorded just before a route moves or to carry out a person's
    /// request (`Lane::Urgent`).
    pub urgent: Client,
    /// The status that starts a timed pause, which the pause counts from (`Lane::Progress`:
    /// offered a shared place first, at most a quarter).
    pub progress: Client,
    /// A status that records what the cluster already shows, after its route moved: it gives
    /// way to the routes still moving (`Lane::Record`).
    pub record: Client,
    pub health: Arc<Health>,
    pub settings: Settings,
    /// Writes the Events: one per decision, counted when the same decision is recorded again.
    pub recorder: Recorder,
    /// The same, posting a reconcile's Events after it, on a task of their own.
    pub events: Poster,
    /// Prometheus clients by connection settings, so queries reuse connections.
    pub prometheus: PrometheusPool,
    /// Consecutive failures per object, for the error policy.
    pub backoff: Backoff,
}

impl Context {
    pub fn new(client: Client, health: Arc<Health>, settings: Settings) -> Self {
        let instance = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "sluice".into());
        let recorder = Recorder::new(client.clone(), instance);
        Self {
            prometheus: PrometheusPool::new(client.clone()),
            route: client.clone(),
            urgent: client.clone(),
            progress: client.clone(),
            record: client.clone(),
            events: Poster::new(recorder.clone()),
            client,
            health,
            settings,
            recorder,
            backoff: Backoff::default(),
        }
    }

    /// The same, with the lanes beside `client` (k8s/lanes.rs).
    pub fn with_lanes(self, lanes: Lanes) -> Self {
        let Lanes {
            route,
            urgent,
            progress,
            record,
        } = lanes;
        Self {
            route,
            urgent,
            progress,
            record,
            ..self
        }
    }

    /// The client of a lane.
    pub fn lane(&self, lane: Lane) -> &Client {
        match lane {
            Lane::Urgent => &self.urgent,
            Lane::Progress => &self.progress,
            Lane::Usual => &self.client,
            Lane::Record => &self.record,
            Lane::Route => &self.route,
        }
    }

    /// A context with fresh metrics, for tests that run a controller in-process.
    pub fn for_tests(client: Client, settings: Settings) -> Self {
        Self::new(client, Arc::new(Health::new(Metrics::new())), settings)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.health.metrics
    }
}
