//! When the apiserver answered the operator's route writes, read from its audit log (the local
//! cluster logs every write of its admin user, which the operator runs as): a step's weight
//! *written*, beside the moment the bench's own watch saw it. The watch adds the apiserver's
//! delivery of the change to another client, which no step of the operator waits for.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// One write of a VirtualService by the operator.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RouteWrite {
    received: SystemTime,
    answered: SystemTime,
}

/// The operator's writes of VirtualServices in an audit log, by `namespace/name`.
fn route_writes(log: impl BufRead, writes: &mut HashMap<String, Vec<RouteWrite>>) {
    for line in log.lines().map_while(Result::ok) {
        // Most lines are other writes: skip them before decoding.
        if !line.contains("\"virtualservices\"") {
            continue;
        }
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let object = &entry["objectRef"];
        let by_operator = entry["userAgent"]
            .as_str()
            .is_some_and(|agent| agent.starts_with("sluice/"));
        let a_write = matches!(entry["verb"].as_str(), Some("update" | "patch"));
        // A write refused (a conflict, say) moved nothing.
        let done = entry["stage"] == "ResponseComplete"
            && entry["responseStatus"]["code"]
                .as_u64()
                .is_some_and(|code| (200..300).contains(&code));
        if !by_operator || !a_write || !done || object["resource"] != "virtualservices" {
            continue;
        }
        let time = |field: &str| -> Option<SystemTime> {
            let at: jiff::Timestamp = entry[field].as_str()?.parse().ok()?;
            Some(SystemTime::from(at))
        };
        let (Some(namespace), Some(name), Some(received), Some(answered)) = (
            object["namespace"].as_str(),
            object["name"].as_str(),
            time("requestReceivedTimestamp"),
            time("stageTimestamp"),
        ) else {
            continue;
        };
        writes
            .entry(format!("{namespace}/{name}"))
            .or_default()
            .push(RouteWrite { received, answered });
    }
}

/// A clock's worth of slack: the due is computed from the status's time, the request's
/// arrival from the apiserver's, both on this machine.
const SLACK: Duration = Duration::from_millis(50);

/// For each step (`namespace/name` of the Rollout and its VirtualService, due, seen by the
/// watch): from its due to the answer to the first route write the operator sent after it,
/// received before the watch saw the weight (the answer itself may reach the operator after
/// the watch's event reaches the bench). A step without one is left out.
fn steps_written(
    writes: &HashMap<String, Vec<RouteWrite>>,
    steps: &[(String, SystemTime, SystemTime)],
) -> Vec<Duration> {
    steps
        .iter()
        .filter_map(|(key, due, seen)| {
            let write = writes
                .get(key)?
                .iter()
                .filter(|w| w.received + SLACK >= *due && w.received <= *seen)
                .min_by_key(|w| w.received)?;
            Some(
                write
                    .answered
                    .duration_since(*due)
                    .unwrap_or(Duration::ZERO),
            )
        })
        .collect()
}

/// [`steps_written`] from every audit log in `dir` (the apiserver keeps the current one and
/// one rotated away); `None` (and why, on stderr) when there is none to read.
pub fn step_to_written(
    dir: &Path,
    steps: &[(String, SystemTime, SystemTime)],
) -> Option<Vec<Duration>> {
    let mut writes = HashMap::new();
    let mut read_any = false;
    let entries = std::fs::read_dir(dir)
        .inspect_err(|e| eprintln!("bench: no audit log read in {}: {e}", dir.display()))
        .ok()?;
    for entry in entries.map_while(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("audit") && name.ends_with(".log")) {
            continue;
        }
        if let Ok(file) = std::fs::File::open(entry.path()) {
            route_writes(std::io::BufReader::new(file), &mut writes);
            read_any = true;
        }
    }
    if !read_any {
        eprintln!("bench: no audit log in {}", dir.display());
    }
    read_any.then(|| steps_written(&writes, steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(seconds)
    }

    fn line(agent: &str, verb: &str, name: &str, received: &str, answered: &str) -> String {
        serde_json::json!({
            "stage": "ResponseComplete",
            "responseStatus": {"code": (if verb == "refused" { 409 } else { 200 })},
            "verb": (if verb == "refused" { "update" } else { verb }),
            "userAgent": agent,
            "objectRef": {"resource": "virtualservices", "namespace": "ns", "name": name},
            "requestReceivedTimestamp": received,
            "stageTimestamp": answered,
        })
        .to_string()
    }

    #[test]
    fn a_step_is_timed_to_the_answer_of_the_operators_first_route_write_after_its_due() {
        // Due at 100.0 s after the epoch (1970-01-01T00:01:40Z), seen at 100.9 s.
        let log = [
            // Before the due: the write of the step before.
            line(
                "sluice/0.1.0",
                "update",
                "r-1",
                "1970-01-01T00:01:37.000000Z",
                "1970-01-01T00:01:37.100000Z",
            ),
            // A write refused as a conflict, then the step's write.
            line(
                "sluice/0.1.0",
                "refused",
                "r-1",
                "1970-01-01T00:01:40.010000Z",
                "1970-01-01T00:01:40.015000Z",
            ),
            line(
                "sluice/0.1.0",
                "update",
                "r-1",
                "1970-01-01T00:01:40.020000Z",
                "1970-01-01T00:01:40.400000Z",
            ),
            // Someone else's write, and a later write of the operator.
            line(
                "kubectl/v1.35",
                "update",
                "r-1",
                "1970-01-01T00:01:40.010000Z",
                "1970-01-01T00:01:40.050000Z",
            ),
            line(
                "sluice/0.1.0",
                "update",
                "r-1",
                "1970-01-01T00:01:40.500000Z",
                "1970-01-01T00:01:40.600000Z",
            ),
            // Another Rollout's, and a line that is not JSON.
            line(
                "sluice/0.1.0",
                "update",
                "r-2",
                "1970-01-01T00:01:40.000000Z",
                "1970-01-01T00:01:40.001000Z",
            ),
            "not json \"virtualservices\"".to_string(),
        ]
        .join("\n");
        let mut writes = HashMap::new();
        route_writes(log.as_bytes(), &mut writes);
        let steps = [
            ("ns/r-1".to_string(), at(100.0), at(100.9)),
            ("ns/r-3".to_string(), at(100.0), at(100.9)),
        ];
        let timed = steps_written(&writes, &steps);
        assert_eq!(timed.len(), 1, "r-3 has no write: left out");
        assert!(
            timed[0].abs_diff(Duration::from_millis(400)) < Duration::from_millis(1),
            "{timed:?}"
        );
    }
}
