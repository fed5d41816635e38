//! The operator as a real process (the `sluice` binary built with the tests), and the fault
//! injector that kills it. Every random choice comes from one seeded generator, so a run is
//! reproduced by its seed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// splitmix64: tiny, seedable, and good enough to pick kill moments.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration uniformly in `low..high`.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis().max(1) as u64;
        low + Duration::from_millis(self.next_u64() % span)
    }
}

/// The seed of this run: `SLUICE_CHAOS_SEED`, else the clock (printed, so it can be replayed).
pub fn seed() -> u64 {
    std::env::var("SLUICE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// A number from the environment, else a default (the short run in `make test`).
pub fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Where the test replicas keep their Leases: not in the namespace they watch, which the
/// test deletes while they still run (a Lease there could not be renewed, as in production,
/// where it lives in the operator's own namespace).
pub const LEASE_NAMESPACE: &str = "sluice-chaos";

/// One replica of `sluice controller`, watching one namespace (or all of them), electing a
/// leader through a Lease named after that namespace, logging JSON to a file of its own.
pub struct Operator {
    pub identity: String,
    namespace: String,
    /// Watches every namespace (a Pipeline's stages live in several), not only `namespace`.
    cluster_wide: bool,
    prometheus: String,
    lease_seconds: u64,
    /// Address of /metrics and /healthz (`127.0.0.1:0`: any free port).
    pub listen: String,
    pub log: PathBuf,
    child: Option<Child>,
    pub starts: u32,
}

impl Operator {
    pub fn new(namespace: &str, identity: &str, prometheus: &str, lease_seconds: u64) -> Self {
        let dir = std::env::var("SLUICE_CHAOS_LOGS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir().join("sluice-chaos"));
        let _ = std::fs::create_dir_all(&dir);
        Self {
            identity: identity.to_string(),
            namespace: namespace.to_string(),
            cluster_wide: false,
            prometheus: prometheus.to_string(),
            lease_seconds,
            listen: "127.0.0.1:0".into(),
            log: dir.join(format!("{namespace}-{identity}.log")),
            child: None,
            starts: 0,
        }
    }

    /// The same replica, watching every namespace.
    pub fn cluster_wide(mut self) -> Self {
        self.cluster_wide = true;
        self
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the operator log");
        let lease_name = format!("sluice-{}", self.namespace);
        let lease_seconds = self.lease_seconds.to_string();
        let mut args = vec![
            "controller",
            "--listen",
            &self.listen,
            "--log-format",
            "json",
            "--log",
            "info,sluice=debug",
            "--leader-election",
            "true",
            "--lease-name",
            &lease_name,
            "--lease-namespace",
            LEASE_NAMESPACE,
            "--lease-duration-seconds",
            &lease_seconds,
            "--identity",
            &self.identity,
            "--prometheus-address",
            &self.prometheus,
        ];
        if !self.cluster_wide {
            args.extend(["--watch-namespace", &self.namespace]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("share the operator log"))
            .stderr(log)
            .spawn()
            .expect("start the sluice binary");
        self.child = Some(child);
        self.starts += 1;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap it: no goodbye, no Lease release.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP or SIGCONT: the process freezes (or thaws) with everything in flight.
    /// Whether the signal was delivered.
    pub fn signal(&self, signal: &str) -> bool {
        self.pid().is_some_and(|pid| {
            Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// Whether it is still running (it exits by itself when it loses the Lease).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Lines of its log that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}

/// Kills the operator at random moments until `kills` were made or `done` is set, starting it
/// again after each kill (at once, or after a short random delay). Returns the kills made.
pub async fn kill_randomly(
    operator: &mut Operator,
    rng: &mut Rng,
    kills: u32,
    done: &tokio::sync::watch::Receiver<bool>,
) -> u32 {
    let mut made = 0;
    while made < kills && !*done.borrow() {
        tokio::time::sleep(rng.between(Duration::from_millis(300), Duration::from_millis(2500)))
            .await;
        if *done.borrow() {
            break;
        }
        operator.kill();
        made += 1;
        tokio::time::sleep(rng.between(Duration::ZERO, Duration::from_millis(400))).await;
        operator.start();
    }
    made
}
