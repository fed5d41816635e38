//! The kube-apiserver's audit log (written by e2e/cluster.sh): who wrote what and when, as
//! the apiserver saw it. Each replica names itself in its User-Agent.

use serde_json::Value;

/// One write the apiserver accepted (printed whole when a test fails).
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub struct Write {
    pub user_agent: String,
    pub verb: String,
    pub resource: String,
    pub name: String,
    /// Microseconds since the epoch, when the apiserver received it.
    pub received_us: i64,
}

fn audit_log() -> std::path::PathBuf {
    let work = std::env::var("SLUICE_E2E_WORK_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/.work").to_string());
    std::path::Path::new(&work).join("logs/audit.log")
}

/// Successful writes in `namespace` by a User-Agent containing `agent` (`""`: every write).
pub fn writes(namespace: &str, agent: &str) -> Vec<Write> {
    let text = std::fs::read_to_string(audit_log()).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["objectRef"]["namespace"].as_str() == Some(namespace))
        // A client that sends no User-Agent (the tests' in-process controllers) matches "".
        .filter(|e| e["userAgent"].as_str().unwrap_or("").contains(agent))
        .filter(|e| {
            e["responseStatus"]["code"]
                .as_i64()
                .is_some_and(|c| (200..300).contains(&c))
        })
        .map(|e| Write {
            user_agent: e["userAgent"].as_str().unwrap_or_default().to_string(),
            verb: e["verb"].as_str().unwrap_or_default().to_string(),
            resource: e["objectRef"]["resource"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            name: e["objectRef"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            received_us: e["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map_or(0, |t| t.as_microsecond()),
        })
        .collect()
}

/// Whether the audit log exists (a cluster started before it was added has none).
pub fn enabled() -> bool {
    audit_log().exists()
}

pub fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}
