//! `sluice`: the operator binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice::leader::LeaseSettings;
use sluice::telemetry::{self, LogFormat};

/// jemalloc, not the system's malloc: glibc's keeps each thread's arena at its busiest size
/// and frees only whole pages at its top, so the bursts of a start (pages of watch events,
/// thousands of writes) left holes that stayed resident: 431 MiB at 10,000 Rollouts for 258 MB
/// in use, even when trimmed every 10 s. jemalloc groups allocations by size in their own
/// pages and hands back the pages it has not used for a while (docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start: C's `const char *malloc_conf`, under the name its
/// prefixed build looks for. A background thread hands freed pages back on time even when
/// the operator is idle: without it jemalloc does so only when the program allocates.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_SETTINGS: CStringPointer = CStringPointer(c"background_thread:true".as_ptr());

/// A C string pointer, as C lays it out.
#[repr(transparent)]
pub struct CStringPointer(*const std::ffi::c_char);

// SAFETY: it points at a string literal, never written.
unsafe impl Sync for CStringPointer {}

/// Sluice: progressive delivery for Kubernetes. Canary and blue-green releases judged by
/// Prometheus, rolled back automatically, promoted through environments under gates.
#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator (controllers, leader election, /healthz, /readyz, /metrics).
    Controller(ControllerArgs),
    /// Write the CustomResourceDefinitions generated from the API types.
    Crdgen(CrdgenArgs),
    /// Print the version.
    Version,
    /// GET each URL and succeed only if every one answers 2xx (the Helm chart's `helm test`
    /// checks /readyz and /metrics with it: the image has no shell and no curl).
    Probe(ProbeArgs),
}

/// Every flag also reads an environment variable (shown in brackets), for container specs.
#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,

    /// Log format: json for log pipelines, text for terminals.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,

    /// Log filter in RUST_LOG syntax, e.g. `info` or `sluice=debug,kube=info`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    log: String,

    /// Elect a leader through a Lease so that only one replica acts. Turn off only when a
    /// single replica runs (e.g. `make run` against the local cluster).
    #[arg(long, env = "SLUICE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-controller")]
    lease_name: String,

    /// Namespace of the leader-election Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sluice-system")]
    lease_namespace: String,

    /// How long a Lease stays valid without renewal; a standby replica takes over after it.
    #[arg(long, env = "SLUICE_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// Identity in the Lease. Default: the pod (host) name with a random suffix.
    #[arg(long, env = "SLUICE_IDENTITY")]
    identity: Option<String>,

    /// Watch only this namespace instead of the whole cluster (then a Role is enough).
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,

    /// Prometheus address used when a Rollout or ErrorBudget does not name one,
    /// e.g. http://prometheus.monitoring:9090.
    #[arg(long, env = "SLUICE_PROMETHEUS_ADDRESS")]
    prometheus_address: Option<String>,

    /// Requests to the Kubernetes apiserver awaiting an answer at once, in all lanes but the
    /// routes' together (a watch counts until its stream starts); route reads and writes have
    /// as many places again of their own. When places are taken, the status that starts a timed pause
    /// goes first (at most a quarter of the places), what a moving release waits on (the
    /// status before a route moves, a person's request) next, everything else after (at most
    /// half), and last the record of an abort already carried out. 0: no bound.
    #[arg(long, env = "SLUICE_KUBE_REQUESTS_IN_FLIGHT", default_value_t = sluice::context::DEFAULT_KUBE_REQUESTS_IN_FLIGHT)]
    kube_requests_in_flight: usize,

    /// Reconciles each controller runs at once; more wait their turn (never two of one
    /// object). A Rollout reconcile awaiting Prometheus does not count. 0: no bound.
    #[arg(long, env = "SLUICE_MAX_CONCURRENT_RECONCILES", default_value_t = sluice::context::DEFAULT_MAX_CONCURRENT_RECONCILES)]
    max_concurrent_reconciles: u16,

    /// Seconds a passing measurement may wait before it is written to the Rollout's status:
    /// it goes with the next status write, or once the newest measurement written is this
    /// old. Only passes of a metric without a `count` wait (they decide nothing); failed,
    /// inconclusive and errored measurements, and any that changes a phase, are written at
    /// once. 0: every measurement at once.
    #[arg(long, env = "SLUICE_RECORD_PASSES_WITHIN_SECONDS", default_value_t = sluice::context::DEFAULT_RECORD_PASSES_WITHIN.as_secs())]
    record_passes_within_seconds: u64,
}

#[derive(clap::Args, Debug)]
struct CrdgenArgs {
    /// Directory to write the YAML files into.
    #[arg(long, default_value = "crds")]
    out: PathBuf,

    /// Do not write: exit non-zero if the files in --out differ from the generated ones.
    #[arg(long)]
    check: bool,
}

#[derive(clap::Args, Debug)]
struct ProbeArgs {
    /// The URLs, e.g. http://sluice-metrics.sluice-system:8080/readyz.
    #[arg(required = true)]
    urls: Vec<String>,

    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 10)]
    timeout_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    sluice::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Controller(args) => controller(args),
        Command::Crdgen(args) => crdgen(args),
        Command::Version => {
            println!("sluice {}", sluice::VERSION);
            Ok(())
        }
        Command::Probe(args) => probe(args),
    }
}

fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_seconds))
        .build()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for url in &args.urls {
            let response = client
                .get(url)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
            let status = response.status();
            anyhow::ensure!(status.is_success(), "{url}: answered {status}");
            println!("{url}: {status}");
        }
        Ok(())
    })
}

fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    telemetry::init_logging(args.log_format, &args.log)?;
    let lease = args.leader_election.then(|| LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity: args.identity.clone().unwrap_or_else(default_identity),
        lease_duration: Duration::from_secs(args.lease_duration_seconds.max(2)),
        retry_period: Duration::from_secs((args.lease_duration_seconds / 5).clamp(1, 5)),
    });
    let settings = sluice::operator::Settings {
        listen: args.listen,
        lease,
        prometheus_address: args.prometheus_address,
        namespace: args.watch_namespace,
        operator_namespace: args.lease_namespace.clone(),
        kube_requests_in_flight: args.kube_requests_in_flight,
        max_concurrent_reconciles: args.max_concurrent_reconciles,
        record_passes_within: Duration::from_secs(args.record_passes_within_seconds),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(sluice::operator::run(settings))
}

/// `<hostname>-<random>`: the pod name says which pod leads; the suffix keeps a restarted
/// container from mistaking its predecessor's Lease for its own.
fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .or_else(|_| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|_| "sluice".to_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{host}-{:08x}", nanos ^ std::process::id())
}

fn crdgen(args: CrdgenArgs) -> anyhow::Result<()> {
    if args.check {
        let drifted = sluice::crdgen::drift(&args.out)?;
        if drifted.is_empty() {
            println!("CRDs in {} are up to date", args.out.display());
            return Ok(());
        }
        for path in &drifted {
            eprintln!("out of date: {}", path.display());
        }
        anyhow::bail!("CRDs drifted from src/api: run `make crds` and commit the result");
    }
    for path in sluice::crdgen::write_all(&args.out)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
