//! What the benchmark reads about the operator: its process (`/proc`) and its own metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The operator under test: a release build in `make bench`, the test build otherwise.
pub struct Operator {
    binary: PathBuf,
    prometheus: String,
    pub listen: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Operator {
    pub fn new(binary: PathBuf, prometheus: &str, log: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port for the operator's metrics");
        Self {
            binary,
            prometheus: prometheus.to_string(),
            listen: format!("127.0.0.1:{port}"),
            log: log.to_path_buf(),
            child: None,
        }
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the operator log");
        let child = Command::new(&self.binary)
            .args([
                "controller",
                "--listen",
                &self.listen,
                "--log-format",
                "json",
                "--log",
                "warn",
                "--leader-election",
                "false",
                "--prometheus-address",
                &self.prometheus,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("share the operator log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Resident memory now and at its peak, in MiB (`VmRSS`, `VmHWM`).
    pub fn memory_mib(&self) -> (f64, f64) {
        process_memory_mib(self.pid()).unwrap_or_default()
    }

    /// CPU seconds used so far (user + system).
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_ticks(self.pid()).unwrap_or(0.0) / clock_ticks_per_second()
    }

    /// The operator's metrics, series (name with labels) to value.
    pub async fn metrics(&self) -> Metrics {
        for _ in 0..50 {
            if let Ok(text) = http_get(&self.listen, "/metrics").await {
                return Metrics::parse(&text);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the operator's /metrics at {} did not answer", self.listen)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process's resident memory now and at its highest (`VmRSS`, `VmHWM`), in MiB; `None`
/// when it is gone.
fn process_memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    Some((field("VmRSS:"), field("VmHWM:")))
}

/// The processes the reports split the machine by: each of the local cluster's (from its pid
/// files in `pids`, named by component), the operator and the bench.
fn processes(pids: Option<&Path>, operator: &Operator) -> Vec<(String, u32)> {
    let pid_files = pids
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .flatten();
    let mut found: Vec<(String, u32)> = pid_files
        .filter_map(|file| {
            let path = file.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".pid")?
                .to_string();
            let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
            Some((name, pid))
        })
        .collect();
    found.push(("sluice".into(), operator.pid()));
    found.push(("bench".into(), std::process::id()));
    found
}

/// Resident memory by process now and at its highest, in MiB, most now first: the local
/// cluster's processes share the machine's memory with the operator, and one near its soft
/// limit (`GOMEMLIMIT`) spends its CPU collecting.
pub fn memory_by_process(pids: Option<&Path>, operator: &Operator) -> Vec<(String, u64, u64)> {
    let mut memory: Vec<(String, u64, u64)> = processes(pids, operator)
        .into_iter()
        .filter_map(|(name, pid)| {
            let (now, peak) = process_memory_mib(pid)?;
            Some((name, now.round() as u64, peak.round() as u64))
        })
        .collect();
    memory.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    memory
}

/// The machine's speed: the CPU time, in ms, one thread takes for a fixed piece of work. The
/// same objects took 880 CPU-seconds of the apiserver to create in one run at 10,000 and
/// 1,202 in another, and the bench 76 and 108 for the same requests: this machine runs the
/// same work a third slower in some hours, which moves every figure of a run. CPU time, not
/// wall time, so other processes running beside it do not count. The work writes at random
/// into 32 MiB, more than the caches hold, as the apiserver's decoding and collecting reach
/// all over its heap; a build's optimisation level moves it too (the bench is a test build).
pub async fn fixed_work_cpu_ms() -> Option<u64> {
    tokio::task::spawn_blocking(|| {
        let mut table = vec![0u64; 1 << 22];
        let before = thread_cpu_ticks()?;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..FIXED_WORK_ROUNDS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) & (table.len() - 1);
            table[i] = table[i].wrapping_add(x);
        }
        std::hint::black_box(&table);
        let used = thread_cpu_ticks()? - before;
        Some((used / clock_ticks_per_second() * 1000.0).round() as u64)
    })
    .await
    .ok()
    .flatten()
}

/// About two thirds of a second for the test build on this machine: long enough for the
/// clock ticks' 10 ms to be 1.5% of it.
const FIXED_WORK_ROUNDS: u64 = 10_000_000;

/// CPU this thread has used so far, in clock ticks.
fn thread_cpu_ticks() -> Option<f64> {
    stat_cpu_ticks(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)
}

/// CPU a process has used so far (user + system), in clock ticks; `None` when it is gone.
fn process_cpu_ticks(pid: u32) -> Option<f64> {
    stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// user + system ticks from a `/proc/.../stat` line.
fn stat_cpu_ticks(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may hold spaces: count fields after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(ticks(11)? + ticks(12)?)
}

/// Where the machine's CPU went: the seconds used so far by each process of the local
/// cluster (from its pid files, named by component), the operator and the bench, and the
/// machine's idle seconds (all cores). The operator's tail on a 2-core machine is the
/// apiserver's, and the apiserver shares the cores with the rest of the cluster: a window's
/// split says what else ran in it. A process gone (or new) by the second reading is left out
/// of the window rather than shown as a negative figure.
#[derive(Clone, Debug, Default)]
pub struct MachineCpu {
    seconds: BTreeMap<String, f64>,
}

impl MachineCpu {
    pub fn read(pids: Option<&Path>, operator: &Operator) -> Self {
        let mut ticks: BTreeMap<String, f64> = processes(pids, operator)
            .into_iter()
            .filter_map(|(name, pid)| Some((name, process_cpu_ticks(pid)?)))
            .collect();
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // The first line sums all cores: "cpu user nice system idle ...".
        if let Some(idle) = stat
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(4))
            .and_then(|t| t.parse::<f64>().ok())
        {
            ticks.insert("idle".into(), idle);
        }
        let per_second = clock_ticks_per_second();
        let seconds = ticks
            .into_iter()
            .map(|(k, t)| (k, t / per_second))
            .collect();
        Self { seconds }
    }

    /// Cores each used on average from `before` to this reading, `window` apart, most first.
    pub fn cores_since(&self, before: &Self, window: Duration) -> Vec<(String, f64)> {
        let window = window.as_secs_f64().max(f64::EPSILON);
        let mut cores: Vec<(String, f64)> = self
            .seconds
            .iter()
            .filter_map(|(name, now)| {
                let used = now - before.seconds.get(name)?;
                Some((name.clone(), (used / window * 100.0).round() / 100.0))
            })
            .collect();
        cores.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        cores
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A plain HTTP/1.0 GET of `path` at `address` (host:port); the body.
pub async fn http_get(address: &str, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// A scrape of the OpenMetrics text: `name{labels}` to value.
#[derive(Clone, Debug, Default)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The sum over series of `name` whose labels contain every `label="value"` given.
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every `sluice_kube_requests_total` series as (verb, resource) -> count.
    pub fn requests(&self) -> BTreeMap<(String, String), f64> {
        let label = |series: &str, key: &str| {
            let start = series.find(&format!("{key}=\""))? + key.len() + 2;
            let end = series[start..].find('"')? + start;
            Some(series[start..end].to_string())
        };
        self.0
            .iter()
            .filter(|(s, _)| s.starts_with("sluice_kube_requests_total{"))
            .filter_map(|(s, v)| Some(((label(s, "verb")?, label(s, "resource")?), *v)))
            .collect()
    }

    /// The requests made since `before`, as `verb resource` -> count (those with none left out).
    pub fn requests_since(&self, before: &Metrics) -> BTreeMap<String, f64> {
        let earlier = before.requests();
        self.requests()
            .into_iter()
            .filter_map(|(key, count)| {
                let delta = count - earlier.get(&key).copied().unwrap_or(0.0);
                (delta > 0.0).then(|| (format!("{} {}", key.0, key.1), delta))
            })
            .collect()
    }

    /// A quantile of a histogram since `before`, from its buckets (the upper bound of the
    /// bucket it falls in, as Prometheus' histogram_quantile would interpolate it no finer).
    pub fn quantile(&self, before: &Metrics, name: &str, labels: &[&str], q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter(|(s, _)| {
                s.split('{').next() == Some(bucket.as_str()) && labels.iter().all(|l| s.contains(l))
            })
            .filter_map(|(s, v)| {
                let le = s.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, v - before.0.get(s).copied().unwrap_or(0.0)))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        buckets
            .iter()
            .find(|(_, count)| *count >= q * total)
            .map(|(bound, _)| *bound)
    }
}

/// The `q` quantile of `values` (nearest rank), in the unit given.
pub fn percentile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    fn reading(pairs: &[(&str, f64)]) -> MachineCpu {
        MachineCpu {
            seconds: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn a_window_shows_cores_most_first_and_leaves_out_a_process_not_read_twice() {
        let before = reading(&[("etcd", 10.0), ("kube-apiserver", 100.0), ("gone", 5.0)]);
        let after = reading(&[("etcd", 11.0), ("kube-apiserver", 115.0), ("new", 1.0)]);
        assert_eq!(
            after.cores_since(&before, Duration::from_secs(10)),
            vec![
                ("kube-apiserver".to_string(), 1.5),
                ("etcd".to_string(), 0.1)
            ]
        );
    }

    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (kube (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(stat_cpu_ticks(stat), Some(300.0));
        assert_eq!(stat_cpu_ticks("4242 (short) S 1 2"), None);
    }

    #[test]
    fn histogram_quantiles_come_from_the_buckets_since_a_baseline() {
        let before = Metrics::parse(
            "h_bucket{c=\"r\",le=\"0.1\"} 10\nh_bucket{c=\"r\",le=\"1\"} 10\nh_bucket{c=\"r\",le=\"+Inf\"} 10\n",
        );
        let after = Metrics::parse(
            "h_bucket{c=\"r\",le=\"0.1\"} 100\nh_bucket{c=\"r\",le=\"1\"} 109\nh_bucket{c=\"r\",le=\"+Inf\"} 110\n",
        );
        assert_eq!(after.quantile(&before, "h", &["c=\"r\""], 0.5), Some(0.1));
        assert_eq!(after.quantile(&before, "h", &["c=\"r\""], 0.99), Some(1.0));
        assert_eq!(after.quantile(&after, "h", &["c=\"r\""], 0.5), None);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&ms, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
