//! Passing measurements not written yet (`runs::passes_may_wait`), per Rollout, until the next
//! status write carries them. Memory only: a restart loses them, and the runs as the cluster
//! has them are then due at once, so they are taken again. Bounded: one entry per Rollout
//! whose analysis is passing, each its runs twice (as recorded and with the passes).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::api::analysis::AnalysisRunStatus;

#[derive(Default)]
pub struct Unrecorded {
    /// By `namespace/name`.
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    /// The Rollout's uid: a Rollout deleted and made again starts afresh.
    uid: String,
    /// The runs as recorded when the passes were taken.
    recorded: Vec<AnalysisRunStatus>,
    /// The same runs with the passes.
    runs: Vec<AnalysisRunStatus>,
}

impl Unrecorded {
    /// Puts the passes kept for this Rollout into `runs` (as the cluster has them), and
    /// returns the runs as recorded; `None` (and the entry dropped) when there are none, or
    /// when the runs changed since (written by this operator with the passes, or restarted).
    pub fn merge(
        &self,
        key: &str,
        uid: &str,
        runs: &mut Vec<AnalysisRunStatus>,
    ) -> Option<Vec<AnalysisRunStatus>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.get(key)?;
        if entry.uid != uid || entry.recorded != *runs {
            entries.remove(key);
            return None;
        }
        Some(std::mem::replace(runs, entry.runs.clone()))
    }

    /// Keeps `runs`, the runs `recorded` with passes not written.
    pub fn keep(
        &self,
        key: &str,
        uid: &str,
        recorded: Vec<AnalysisRunStatus>,
        runs: Vec<AnalysisRunStatus>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let uid = uid.to_string();
        entries.insert(
            key.to_string(),
            Entry {
                uid,
                recorded,
                runs,
            },
        );
    }

    /// After a status write (it carried the passes) or the Rollout's deletion.
    pub fn forget(&self, key: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::analysis::AnalysisPhase;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn run(name: &str) -> AnalysisRunStatus {
        AnalysisRunStatus {
            name: name.into(),
            revision: "r1".into(),
            phase: AnalysisPhase::Running,
            started_at: Time(Timestamp::UNIX_EPOCH),
            finished_at: None,
            message: None,
            metrics: Vec::new(),
        }
    }

    #[test]
    fn passes_are_merged_while_the_recorded_runs_stay_as_they_were() {
        let kept = Unrecorded::default();
        let (recorded, with_passes) = (vec![run("background")], vec![run("with-passes")]);
        kept.keep("ns/web", "u1", recorded.clone(), with_passes.clone());

        let mut runs = recorded.clone();
        assert_eq!(
            kept.merge("ns/web", "u1", &mut runs),
            Some(recorded.clone())
        );
        assert_eq!(runs, with_passes, "the passes are planned on");

        // Another Rollout of the name (deleted and made again): nothing merged, entry gone.
        let mut runs = recorded.clone();
        assert_eq!(kept.merge("ns/web", "u2", &mut runs), None);
        assert_eq!((runs, kept.len()), (recorded.clone(), 0));

        // The runs changed since (written with the passes): the entry is spent.
        kept.keep("ns/web", "u1", recorded.clone(), with_passes.clone());
        let mut runs = with_passes.clone();
        assert_eq!(kept.merge("ns/web", "u1", &mut runs), None);
        assert_eq!((runs, kept.len()), (with_passes, 0));

        let mut runs = recorded.clone();
        assert_eq!(kept.merge("ns/other", "u1", &mut runs), None);
        kept.keep("ns/web", "u1", recorded.clone(), vec![]);
        kept.forget("ns/web");
        assert_eq!(kept.len(), 0);
    }
}
