//! The Pipeline planner: which release each stage may run, and why the others wait. Pure.
//!
//! A stage's Rollouts declare a release (their templates' images, as git set them). The stage
//! admits it once every gate passes, judged from what the reconciler read just now: the
//! previous stage Healthy on it for the soak, the error budgets, a person's approval. An
//! admitted release is the stage's until its Rollouts declare another one.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::errorbudget::{BudgetAction, BudgetPhase, ErrorBudgetStatus};
use crate::api::pipeline::{
    Decision, GateResult, HistoryAction, HistoryEntry, PipelineSpec, PipelineStatus, Release,
    Stage, StagePhase, StageStatus,
};
use crate::conditions;

use super::windows;

/// History entries kept (the newest).
pub const HISTORY_LIMIT: usize = 50;
/// How often a stage waiting on something without a clock (a budget, an approval) is looked
/// at again; watches bring most changes sooner.
const RECHECK: Duration = Duration::from_secs(30);

/// The release a pod template declares: its container images, sorted, without repeats.
pub fn release_of(template: &PodTemplateSpec) -> Release {
    let mut images: Vec<String> = template
        .spec
        .iter()
        .flat_map(|spec| {
            spec.init_containers
                .iter()
                .flatten()
                .chain(&spec.containers)
        })
        .filter_map(|c| c.image.clone())
        .collect();
    images.sort();
    images.dedup();
    Release { images }
}

/// "api:1.4, web:2.0"
pub fn describe(release: &Release) -> String {
    release.images.join(", ")
}

/// How a Rollout of a stage is doing with the release its template declares.
#[derive(Clone, Debug, PartialEq)]
pub enum RolloutState {
    /// Not found.
    Missing,
    /// Listed by another Pipeline or another stage too (named).
    Claimed(String),
    /// Runs the declared release as stable, Healthy.
    Healthy,
    /// Aborted or Degraded on the declared release (why).
    Failed(String),
    /// Anything else: releasing, held, waiting for pods.
    Busy,
}

/// A Rollout of a stage, as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedRollout {
    /// `namespace/name`.
    pub key: String,
    /// What its template declares (`None` when it is missing).
    pub declared: Option<Release>,
    pub state: RolloutState,
}

/// The world as the reconciler saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub generation: Option<i64>,
    /// The Pipeline's own namespace (the default for budget references).
    pub namespace: String,
    pub spec: PipelineSpec,
    pub status: PipelineStatus,
    /// The Rollouts of each stage, in spec order.
    pub rollouts: Vec<Vec<ObservedRollout>>,
    /// ErrorBudget statuses by `namespace/name` (`None`: the budget does not exist).
    pub budgets: BTreeMap<String, Option<ErrorBudgetStatus>>,
    /// ArgoCD Applications of the stages' gates, by `namespace/name`.
    pub applications: BTreeMap<String, Application>,
    pub now: Timestamp,
}

/// An Event to record.
pub use crate::k8s::events::PlannedEvent;

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: PipelineStatus,
    pub events: Vec<PlannedEvent>,
    pub requeue_after: Duration,
    /// Durations this plan completed, for the metrics.
    pub timings: Vec<Timing>,
}

/// A duration to record in a metric.
#[derive(Clone, Debug, PartialEq)]
pub enum Timing {
    /// A release admitted to `stage`, this long after its admission to the first stage.
    ToStage { stage: String, seconds: f64 },
    /// A release approved for `stage` after waiting this long at its approval gate.
    ApprovalWait { stage: String, seconds: f64 },
}

/// The `namespace/name` of a budget gate.
pub fn budget_key(namespace: &Option<String>, name: &str, own: &str) -> String {
    format!("{}/{name}", namespace.as_deref().unwrap_or(own))
}

/// `t` rounded up to a whole second. A stage's `since` is a `metav1.Time`, which keeps whole
/// seconds only: stored as it is, a stage Healthy at 55.98 s reads back as 55 s, and the next
/// stage's soak ended up to a second early (the chaos test caught a 4 s soak over in 3.3 s).
/// Rounded up, a soak is never shorter than asked, at most a second longer.
fn ceil_second(t: Timestamp) -> Timestamp {
    if t.subsec_nanosecond() == 0 {
        t
    } else {
        Timestamp::from_second(t.as_second().saturating_add(1)).unwrap_or(t)
    }
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

fn since(from: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(from)).unwrap_or(Duration::ZERO)
}

fn text(d: Duration) -> String {
    crate::api::Duration::from_secs(d.as_secs()).to_string()
}

/// Why a gate holds a release, and what that makes the stage.
struct Held {
    phase: StagePhase,
    message: String,
}

struct Verdicts {
    results: Vec<GateResult>,
    /// The first gate that holds (in the order soak, budgets, approval).
    held: Option<Held>,
    /// When a clock-bound gate (the soak) passes by itself.
    wake_at: Option<Timestamp>,
}

impl Verdicts {
    fn wake(&mut self, at: Timestamp) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    fn add(&mut self, gate: String, passed: bool, message: String, phase: StagePhase) {
        if !passed && self.held.is_none() {
            self.held = Some(Held {
                phase,
                message: format!("{gate}: {message}"),
            });
        }
        self.results.push(GateResult {
            gate,
            passed,
            message: Some(message),
        });
    }
}

/// Every gate of `stage` for `release`, judged now.
fn judge(
    o: &Observed,
    stage: &Stage,
    release: &Release,
    previous: Option<(&str, &StageStatus)>,
) -> Verdicts {
    let mut v = Verdicts {
        results: Vec::new(),
        held: None,
        wake_at: None,
    };
    let gates = stage.gates.clone().unwrap_or_default();
    // The previous stage runs this release, Healthy, for the soak (no soak: Healthy at all).
    if let Some((name, prev)) = previous {
        let soak = gates.soak.as_ref().map_or(Duration::ZERO, |d| d.as_std());
        let healthy_since = (prev.phase == StagePhase::Healthy
            && prev.release.as_ref() == Some(release))
        .then(|| prev.since.as_ref().map_or(o.now, |t| t.0));
        let (passed, message) = match healthy_since {
            None => (
                false,
                format!(
                    "{name} is not Healthy on this release yet ({:?})",
                    prev.phase
                ),
            ),
            Some(from) => {
                let soaked = since(from, o.now);
                if soaked < soak {
                    v.wake(add(from, soak));
                }
                (
                    soaked >= soak,
                    format!("soaked {} of {}", text(soaked.min(soak)), text(soak)),
                )
            }
        };
        v.add("soak".into(), passed, message, StagePhase::Soaking);
    }
    if !gates.windows.is_empty() {
        let overridden = o.status.approvals.iter().find(|a| {
            a.stage == stage.name
                && &a.release == release
                && a.override_windows == Some(true)
                && a.decision.unwrap_or(Decision::Approved) == Decision::Approved
        });
        let (passed, message) = match (windows::judge(&gates.windows, o.now), overridden) {
            (Err(why), _) => (false, format!("{why}; no release enters until it is fixed")),
            (Ok(verdict), _) if verdict.open => (true, verdict.message),
            (Ok(verdict), Some(by)) => (
                true,
                format!(
                    "{}, overridden by {}: {}",
                    verdict.message,
                    by.intent.requested_by.as_deref().unwrap_or("someone"),
                    by.intent.reason.as_deref().unwrap_or("no reason given")
                ),
            ),
            (Ok(verdict), None) => {
                if let Some(at) = verdict.changes_at {
                    v.wake(at);
                }
                (false, verdict.message)
            }
        };
        v.add(
            "windows".into(),
            passed,
            message,
            StagePhase::WaitingForGates,
        );
    }
    for gate in &gates.error_budgets {
        let key = budget_key(&gate.namespace, &gate.name, &o.namespace);
        let needed = f64::from(gate.min_remaining_percent.unwrap_or(0));
        let (passed, message, phase) = match o.budgets.get(&key).cloned().flatten() {
            None => (
                false,
                format!("ErrorBudget {key} not found"),
                StagePhase::WaitingForGates,
            ),
            Some(status) => {
                budget_verdict(&status, needed, gate.allow_insufficient_data == Some(true))
            }
        };
        v.add(format!("errorBudget/{key}"), passed, message, phase);
    }
    if gates.approval.as_ref().is_some_and(|a| a.required) {
        let approval = o
            .status
            .approvals
            .iter()
            .find(|a| a.stage == stage.name && &a.release == release);
        let (passed, message) = match approval {
            None => (
                false,
                format!(
                    "waiting for approval of {} (`kubectl sluice approve pipeline/NAME --stage {}`)",
                    describe(release),
                    stage.name
                ),
            ),
            Some(a) => {
                let by = a.intent.requested_by.as_deref().unwrap_or("someone");
                let why = a
                    .intent
                    .reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(": {r}"));
                match a.decision.unwrap_or(Decision::Approved) {
                    Decision::Approved => (true, format!("approved by {by}{why}")),
                    Decision::Rejected => (false, format!("rejected by {by}{why}")),
                }
            }
        };
        v.add(
            "approval".into(),
            passed,
            message,
            StagePhase::WaitingForApproval,
        );
    }
    if let Some(argo) = &gates.argo_cd {
        let key = application_key(argo);
        let (passed, message) = match o.applications.get(&key) {
            None | Some(Application::Missing) => (false, format!("Application {key} not found")),
            Some(Application::NotServed) => (
                false,
                "the ArgoCD Application CRD (argoproj.io/v1alpha1) is not installed".to_string(),
            ),
            Some(Application::Seen {
                sync,
                health,
                images,
                rollouts,
            }) => {
                let synced = sync.as_deref() == Some("Synced");
                let healthy = health.as_deref() == Some("Healthy");
                let state = format!(
                    "{} and {}",
                    sync.as_deref().unwrap_or("sync unknown"),
                    health.as_deref().unwrap_or("health unknown")
                );
                // Delivered: git declares this release. When the Application manages the
                // stage's Rollouts, their being Synced says so (their live templates are what
                // made the release pending). ArgoCD lists images only of the Pods and
                // ReplicaSets that run, and the held revision has none yet, so images can only
                // tell for an Application that does not manage the Rollouts.
                let managed: Vec<(String, &String)> = stage
                    .rollouts
                    .iter()
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .filter_map(|k| rollouts.get(&k).map(|s| (k, s)))
                    .collect();
                let missing: Vec<&str> = release
                    .images
                    .iter()
                    .filter(|i| !images.contains(i))
                    .map(String::as_str)
                    .collect();
                let unsynced: Vec<&str> = managed
                    .iter()
                    .filter(|(_, s)| s.as_str() != "Synced")
                    .map(|(k, _)| k.as_str())
                    .collect();
                let delivered = if managed.is_empty() {
                    missing.is_empty()
                } else {
                    unsynced.is_empty()
                };
                if synced && healthy && delivered {
                    (true, format!("{key} is {state} with {}", describe(release)))
                } else if !unsynced.is_empty() {
                    (
                        false,
                        format!(
                            "{key} is {state}, Rollout {} not Synced",
                            unsynced.join(", ")
                        ),
                    )
                } else if delivered {
                    (false, format!("{key} is {state}"))
                } else {
                    (
                        false,
                        format!("{key} is {state}, without {}", missing.join(", ")),
                    )
                }
            }
        };
        v.add(
            format!("argoCD/{key}"),
            passed,
            message,
            StagePhase::WaitingForGates,
        );
    }
    v
}

/// `namespace/name` of an ArgoCD gate's Application.
pub fn application_key(gate: &crate::api::pipeline::ArgoCdGate) -> String {
    format!(
        "{}/{}",
        gate.namespace.as_deref().unwrap_or("argocd"),
        gate.application
    )
}

/// An ArgoCD Application as the gate sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Application {
    /// The CRD is not served by this cluster.
    NotServed,
    Missing,
    /// `status.sync.status`, `status.health.status`, `status.summary.images`, and the sync
    /// status of each Sluice Rollout it manages (`status.resources`), by `namespace/name`.
    Seen {
        sync: Option<String>,
        health: Option<String>,
        images: Vec<String>,
        rollouts: BTreeMap<String, String>,
    },
}

/// An error-budget gate: enough left, not frozen, and judged at all.
fn budget_verdict(
    status: &ErrorBudgetStatus,
    needed: f64,
    allow_insufficient: bool,
) -> (bool, String, StagePhase) {
    let remaining = status.remaining_percent;
    let left = remaining.map_or("an unknown share".to_string(), |r| format!("{r:.0}%"));
    match status.phase {
        Some(BudgetPhase::Frozen | BudgetPhase::Exhausted) => (
            false,
            format!(
                "is {:?} with {left} left",
                status.phase.unwrap_or(BudgetPhase::Frozen)
            ),
            StagePhase::Frozen,
        ),
        _ if matches!(
            status.active_action,
            Some(BudgetAction::FreezePromotions | BudgetAction::Rollback)
        ) =>
        {
            (false, "freezes promotions".into(), StagePhase::Frozen)
        }
        Some(BudgetPhase::InsufficientData) if allow_insufficient => (
            true,
            "too few events to judge; the gate lets it through".into(),
            StagePhase::WaitingForGates,
        ),
        Some(BudgetPhase::InsufficientData) => (
            false,
            "too few events to judge (allowInsufficientData lets it through)".into(),
            StagePhase::WaitingForGates,
        ),
        None | Some(BudgetPhase::Unknown) => (
            false,
            "cannot be judged now (Unknown)".into(),
            StagePhase::WaitingForGates,
        ),
        _ => match remaining {
            Some(r) if r + 1e-9 >= needed => (
                true,
                format!("{left} left, needs {needed:.0}%"),
                StagePhase::WaitingForGates,
            ),
            _ => (
                false,
                format!("has {left} left, needs {needed:.0}%"),
                StagePhase::WaitingForGates,
            ),
        },
    }
}

/// The release a stage's Rollouts agree on, or why there is none.
fn declared(rollouts: &[ObservedRollout]) -> Result<Release, String> {
    for r in rollouts {
        match &r.state {
            RolloutState::Missing => return Err(format!("Rollout {} not found", r.key)),
            RolloutState::Claimed(by) => {
                return Err(format!(
                    "Rollout {} is also in {by}; a Rollout belongs to one stage",
                    r.key
                ));
            }
            _ => {}
        }
    }
    let mut releases: Vec<&Release> = rollouts
        .iter()
        .filter_map(|r| r.declared.as_ref())
        .collect();
    releases.dedup();
    match releases.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err("no Rollouts".into()),
        _ => Err(format!(
            "the stage's Rollouts declare different releases ({})",
            releases
                .iter()
                .map(|r| describe(r))
                .collect::<Vec<_>>()
                .join(" / ")
        )),
    }
}

fn record(history: &mut Vec<HistoryEntry>, entry: HistoryEntry) {
    history.push(entry);
    let excess = history.len().saturating_sub(HISTORY_LIMIT);
    history.drain(..excess);
}

/// Plans one reconcile.
pub fn plan(o: &Observed) -> Plan {
    let mut status = o.status.clone();
    let mut events = Vec::new();
    let mut stages: Vec<StageStatus> = Vec::new();
    let mut problems = Vec::new();
    let mut wakeups: Vec<Timestamp> = Vec::new();
    let mut waiting = false;
    let mut timings = Vec::new();
    let first_stage = o.spec.stages.first().map(|s| s.name.clone());
    let entry =
        |stage: &str, release: &Release, action, by: Option<String>, reason: Option<String>| {
            HistoryEntry {
                stage: stage.to_string(),
                release: release.clone(),
                action,
                time: Time(o.now),
                by,
                reason,
                request: None,
            }
        };

    // Decisions people made since the last look.
    for approval in &o.status.approvals {
        let seen = o
            .status
            .history
            .iter()
            .any(|h| h.request.as_deref() == Some(approval.intent.id.as_str()));
        if !seen {
            let action = match approval.decision.unwrap_or(Decision::Approved) {
                Decision::Approved => HistoryAction::Approved,
                Decision::Rejected => HistoryAction::Rejected,
            };
            let by = approval.intent.requested_by.clone();
            if let Some(waited_since) = o
                .status
                .stages
                .iter()
                .find(|s| {
                    s.name == approval.stage
                        && s.phase == StagePhase::WaitingForApproval
                        && s.pending.as_ref() == Some(&approval.release)
                })
                .and_then(|s| s.since.as_ref())
            {
                timings.push(Timing::ApprovalWait {
                    stage: approval.stage.clone(),
                    seconds: since(waited_since.0, o.now).as_secs_f64(),
                });
            }
            events.push(PlannedEvent {
                warning: action == HistoryAction::Rejected,
                reason: if action == HistoryAction::Approved {
                    "Approved"
                } else {
                    "Rejected"
                },
                message: format!(
                    "{} {} {} for stage {}{}",
                    by.as_deref().unwrap_or("someone"),
                    if action == HistoryAction::Approved {
                        "approved"
                    } else {
                        "rejected"
                    },
                    describe(&approval.release),
                    approval.stage,
                    approval
                        .intent
                        .reason
                        .as_deref()
                        .map_or(String::new(), |r| format!(": {r}"))
                ),
            });
            record(
                &mut status.history,
                HistoryEntry {
                    request: Some(approval.intent.id.clone()),
                    ..entry(
                        &approval.stage,
                        &approval.release,
                        action,
                        by,
                        approval.intent.reason.clone(),
                    )
                },
            );
        }
    }

    for (index, stage) in o.spec.stages.iter().enumerate() {
        let before = o
            .status
            .stages
            .iter()
            .find(|s| s.name == stage.name)
            .cloned()
            .unwrap_or(StageStatus {
                name: stage.name.clone(),
                release: None,
                pending: None,
                message: None,
                next_check: None,
                phase: StagePhase::Pending,
                since: None,
                gates: Vec::new(),
            });
        let mut st = before.clone();
        st.next_check = None;
        let previous = index
            .checked_sub(1)
            .and_then(|i| Some((o.spec.stages.get(i)?.name.as_str(), stages.get(i)?)));
        let rollouts = o.rollouts.get(index).map(Vec::as_slice).unwrap_or_default();
        let set_phase = |st: &mut StageStatus, phase: StagePhase| {
            if st.phase != phase {
                st.phase = phase;
                st.since = Some(Time(ceil_second(o.now)));
            }
        };
        if let Some(gates) = &stage.gates {
            if let Err(why) = windows::validate(&gates.windows) {
                problems.push(format!("stage {}: {why}", stage.name));
            }
            if let Some(argo) = &gates.argo_cd
                && o.applications.get(&application_key(argo)) == Some(&Application::NotServed)
            {
                problems.push(format!(
                    "stage {}: the ArgoCD Application CRD (argoproj.io/v1alpha1) is not installed",
                    stage.name
                ));
            }
        }
        match declared(rollouts) {
            Err(why) => {
                problems.push(format!("stage {}: {why}", stage.name));
                st.message = Some(why);
                st.gates.clear();
            }
            Ok(release) if st.release.as_ref() == Some(&release) => {
                // Admitted: the stage's Rollouts release it; the stage follows them.
                st.pending = None;
                st.gates.clear();
                let failed: Vec<String> = rollouts
                    .iter()
                    .filter_map(|r| match &r.state {
                        RolloutState::Failed(why) => Some(format!("{}: {why}", r.key)),
                        _ => None,
                    })
                    .collect();
                if !failed.is_empty() {
                    if st.phase != StagePhase::Failed {
                        events.push(PlannedEvent {
                            warning: true,
                            reason: "StageFailed",
                            message: format!(
                                "stage {} failed on {}: {}",
                                stage.name,
                                describe(&release),
                                failed.join("; ")
                            ),
                        });
                        record(
                            &mut status.history,
                            entry(
                                &stage.name,
                                &release,
                                HistoryAction::Failed,
                                None,
                                Some(failed.join("; ")),
                            ),
                        );
                    }
                    set_phase(&mut st, StagePhase::Failed);
                    st.message = Some(format!(
                        "{} failed; later stages will not receive it, a newer release can proceed",
                        describe(&release)
                    ));
                } else if rollouts.iter().all(|r| r.state == RolloutState::Healthy) {
                    if st.phase != StagePhase::Healthy {
                        events.push(PlannedEvent {
                            warning: false,
                            reason: "StageHealthy",
                            message: format!(
                                "stage {} runs {}, Healthy",
                                stage.name,
                                describe(&release)
                            ),
                        });
                        record(
                            &mut status.history,
                            entry(&stage.name, &release, HistoryAction::Healthy, None, None),
                        );
                    }
                    set_phase(&mut st, StagePhase::Healthy);
                    st.message = Some(format!("runs {}", describe(&release)));
                } else {
                    set_phase(&mut st, StagePhase::Progressing);
                    st.message = Some(format!("releasing {}", describe(&release)));
                }
            }
            Ok(release)
                if !rollouts.is_empty()
                    && rollouts.iter().all(|r| r.state == RolloutState::Healthy) =>
            {
                // Already running it everywhere (a new Pipeline over running Rollouts, or a
                // first revision, which no one can hold): nothing to admit, it is the stage's.
                record(
                    &mut status.history,
                    entry(
                        &stage.name,
                        &release,
                        HistoryAction::Healthy,
                        None,
                        Some("already running".into()),
                    ),
                );
                st.release = Some(release.clone());
                st.pending = None;
                st.gates.clear();
                // Healthy on a new release from now: the soak of the stage after this one
                // counts from here, never from when the previous release turned Healthy (the
                // phase alone does not change when a release lands while no one looked).
                st.phase = StagePhase::Healthy;
                st.since = Some(Time(ceil_second(o.now)));
                st.message = Some(format!("runs {}", describe(&release)));
            }
            Ok(release) => {
                // Declared, not admitted: every gate, from fresh reads.
                let verdicts = judge(o, stage, &release, previous);
                st.gates = verdicts.results;
                match verdicts.held {
                    None => {
                        let reasons: Vec<String> = st
                            .gates
                            .iter()
                            .filter_map(|g| g.message.clone().map(|m| format!("{}: {m}", g.gate)))
                            .collect();
                        events.push(PlannedEvent {
                            warning: false,
                            reason: "Admitted",
                            message: format!(
                                "{} admitted to stage {}{}",
                                describe(&release),
                                stage.name,
                                if reasons.is_empty() {
                                    String::new()
                                } else {
                                    format!(" ({})", reasons.join("; "))
                                }
                            ),
                        });
                        let approver = st
                            .gates
                            .iter()
                            .any(|g| g.gate == "approval")
                            .then(|| {
                                o.status
                                    .approvals
                                    .iter()
                                    .find(|a| a.stage == stage.name && a.release == release)
                                    .and_then(|a| a.intent.requested_by.clone())
                            })
                            .flatten();
                        record(
                            &mut status.history,
                            entry(
                                &stage.name,
                                &release,
                                HistoryAction::Promoted,
                                approver,
                                Some(reasons.join("; ")),
                            ),
                        );
                        let entered_first = status.history.iter().find(|h| {
                            Some(&h.stage) == first_stage.as_ref()
                                && h.release == release
                                && h.action == HistoryAction::Promoted
                        });
                        if let Some(entered) = entered_first.filter(|_| index > 0) {
                            timings.push(Timing::ToStage {
                                stage: stage.name.clone(),
                                seconds: since(entered.time.0, o.now).as_secs_f64(),
                            });
                        }
                        st.release = Some(release.clone());
                        st.pending = None;
                        set_phase(&mut st, StagePhase::Progressing);
                        st.message = Some(format!("releasing {}", describe(&release)));
                    }
                    Some(held) => {
                        waiting = true;
                        if held.phase == StagePhase::Frozen && st.phase != StagePhase::Frozen {
                            record(
                                &mut status.history,
                                entry(
                                    &stage.name,
                                    &release,
                                    HistoryAction::Frozen,
                                    None,
                                    Some(held.message.clone()),
                                ),
                            );
                        }
                        // A person is needed, or a budget holds it: said once, on entry.
                        let told = match held.phase {
                            StagePhase::WaitingForApproval => Some(("WaitingForApproval", false)),
                            StagePhase::Frozen => Some(("StageFrozen", true)),
                            _ => None,
                        };
                        if let Some((reason, warning)) = told.filter(|_| st.phase != held.phase) {
                            events.push(PlannedEvent {
                                warning,
                                reason,
                                message: format!(
                                    "{} waits at stage {}: {}",
                                    describe(&release),
                                    stage.name,
                                    held.message
                                ),
                            });
                        }
                        st.pending = Some(release.clone());
                        set_phase(&mut st, held.phase);
                        st.message =
                            Some(format!("{} waits: {}", describe(&release), held.message));
                        if let Some(at) = verdicts.wake_at {
                            wakeups.push(at);
                        }
                        let next = verdicts.wake_at.unwrap_or_else(|| add(o.now, RECHECK));
                        st.next_check = Some(Time(next.min(add(o.now, RECHECK))));
                    }
                }
            }
        }
        stages.push(st);
    }

    status.observed_generation = o.generation;
    status.summary = Some(
        stages
            .iter()
            .map(|s| format!("{}:{:?}", s.name, s.phase))
            .collect::<Vec<_>>()
            .join(" "),
    );
    status.message = Some(if problems.is_empty() {
        stages
            .iter()
            .find(|s| s.pending.is_some() || s.phase == StagePhase::Failed)
            .and_then(|s| s.message.clone().map(|m| format!("{}: {m}", s.name)))
            .unwrap_or_else(|| "every stage runs its admitted release".into())
    } else {
        problems.join("; ")
    });
    let ready = problems.is_empty();
    conditions::set(
        &mut status.conditions,
        "Ready",
        ready,
        if ready {
            "StagesResolved"
        } else {
            "InvalidStage"
        },
        problems.join("; "),
        o.generation,
        o.now,
    );
    status.stages = stages;
    let requeue_after = wakeups
        .iter()
        .map(|at| since(o.now, *at))
        .chain(waiting.then_some(RECHECK))
        .min()
        .unwrap_or(Duration::from_secs(300))
        .max(Duration::from_millis(200));
    Plan {
        status,
        events,
        requeue_after,
        timings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::Intent;
    use crate::api::pipeline::Approval;
    use proptest::prelude::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn spec() -> PipelineSpec {
        serde_json::from_value(serde_json::json!({"stages": [
            {"name": "dev", "rollouts": [{"namespace": "dev", "name": "web"}]},
            {"name": "staging", "rollouts": [{"namespace": "staging", "name": "web"}],
             "gates": {"soak": "10m"}},
            {"name": "prod", "rollouts": [{"namespace": "prod", "name": "web"}],
             "gates": {"soak": "10m", "approval": {"required": true},
                       "errorBudgets": [{"namespace": "prod", "name": "avail", "minRemainingPercent": 20}]}}
        ]}))
        .unwrap()
    }

    fn release(tag: &str) -> Release {
        Release {
            images: vec![format!("web:{tag}")],
        }
    }

    fn rollout(stage: &str, tag: &str, state: RolloutState) -> Vec<ObservedRollout> {
        vec![ObservedRollout {
            key: format!("{stage}/web"),
            declared: Some(release(tag)),
            state,
        }]
    }

    fn budget(phase: BudgetPhase, remaining: f64) -> Option<ErrorBudgetStatus> {
        Some(ErrorBudgetStatus {
            phase: Some(phase),
            remaining_percent: Some(remaining),
            ..ErrorBudgetStatus::default()
        })
    }

    /// Every stage declares `tag`, in the states given; the prod budget healthy.
    fn world(tag: &str, states: [RolloutState; 3], status: PipelineStatus, now: i64) -> Observed {
        let [dev, staging, prod] = states;
        Observed {
            generation: Some(1),
            namespace: "sluice-system".into(),
            spec: spec(),
            status,
            rollouts: vec![
                rollout("dev", tag, dev),
                rollout("staging", tag, staging),
                rollout("prod", tag, prod),
            ],
            budgets: BTreeMap::from([(
                "prod/avail".to_string(),
                budget(BudgetPhase::Healthy, 80.0),
            )]),
            applications: BTreeMap::new(),
            now: t(now),
        }
    }

    fn last_promoted(plan: &Plan) -> &HistoryEntry {
        plan.status
            .history
            .iter()
            .rev()
            .find(|h| h.action == HistoryAction::Promoted)
            .unwrap()
    }

    fn stage_of<'a>(status: &'a PipelineStatus, name: &str) -> &'a StageStatus {
        status.stages.iter().find(|s| s.name == name).unwrap()
    }

    fn stage<'a>(plan: &'a Plan, name: &str) -> &'a StageStatus {
        plan.status.stages.iter().find(|s| s.name == name).unwrap()
    }

    use RolloutState::{Busy, Healthy};

    /// All three stages adopt v1, which they already run.
    fn running_v1() -> PipelineStatus {
        plan(&world(
            "1",
            [Healthy, Healthy, Healthy],
            PipelineStatus::default(),
            0,
        ))
        .status
    }

    #[test]
    fn what_already_runs_is_adopted_without_gates() {
        let status = running_v1();
        for s in &status.stages {
            assert_eq!(
                (s.phase, s.release.clone()),
                (StagePhase::Healthy, Some(release("1")))
            );
        }
        assert_eq!(
            status.summary.as_deref(),
            Some("dev:Healthy staging:Healthy prod:Healthy")
        );
    }

    #[test]
    fn a_soak_never_ends_early_though_since_keeps_whole_seconds() {
        // dev turns Healthy on v2 at 0.9 s; staging soaks 10 minutes after that.
        let at = |millis: i64| {
            t(0).checked_add(jiff::SignedDuration::from_millis(millis))
                .unwrap()
        };
        let mut o = world("2", [Healthy, Busy, Busy], running_v1(), 0);
        for s in o.status.stages.iter_mut().filter(|s| s.name == "dev") {
            s.release = Some(release("2"));
            s.phase = StagePhase::Progressing;
        }
        o.now = at(900);
        let healthy = plan(&o);
        let since = stage(&healthy, "dev").since.clone().unwrap().0;
        assert!(
            since >= at(900),
            "since {since} is before the stage turned Healthy"
        );
        assert_eq!(since, t(1), "rounded up to the second");
        // Read back (as the apiserver stores it: whole seconds), 599.5 s after it turned
        // Healthy: still soaking.
        let mut later = o.clone();
        later.status =
            serde_json::from_value(serde_json::to_value(&healthy.status).unwrap()).unwrap();
        assert_eq!(stage_of(&later.status, "dev").since, Some(Time(t(1))));
        later.now = at(900 + 599_500);
        assert_eq!(
            stage(&plan(&later), "staging").release,
            Some(release("1")),
            "admitted before its soak"
        );
        later.now = at(601_000);
        assert_eq!(stage(&plan(&later), "staging").release, Some(release("2")));
    }

    #[test]
    fn a_release_that_lands_unseen_soaks_from_when_it_was_seen() {
        // dev was Healthy on v1 for an hour; v2 landed there while the operator was down
        // (the first stage is never held), so the Pipeline first sees it already Healthy.
        let mut running = running_v1();
        for s in &mut running.stages {
            s.since = Some(Time(t(-3600)));
        }
        let seen = plan(&world("2", [Healthy, Busy, Busy], running, 0));
        let dev = stage(&seen, "dev");
        assert_eq!(
            (dev.phase, dev.release.clone(), dev.since.clone()),
            (StagePhase::Healthy, Some(release("2")), Some(Time(t(0))))
        );
        let staging = stage(&seen, "staging");
        assert_eq!(staging.release, Some(release("1")), "staging is held");
        assert_eq!(staging.phase, StagePhase::Soaking);
        // The next look, a minute on, still soaks from when v2 was seen.
        let mut next = world("2", [Healthy, Busy, Busy], seen.status.clone(), 60);
        next.now = t(60);
        let staging = plan(&next);
        let staging = stage(&staging, "staging");
        assert_eq!(staging.phase, StagePhase::Soaking);
        assert_eq!(
            staging.gates[0].message.as_deref(),
            Some("soaked 1m of 10m")
        );
    }

    #[test]
    fn a_release_moves_through_the_stages_behind_soak_approval_and_budget() {
        // Git declares v2 everywhere at once: dev admits it, the others wait.
        let p1 = plan(&world("2", [Busy, Busy, Busy], running_v1(), 100));
        assert_eq!(stage(&p1, "dev").release, Some(release("2")));
        assert_eq!(stage(&p1, "dev").phase, StagePhase::Progressing);
        assert_eq!(stage(&p1, "staging").release, Some(release("1")));
        assert_eq!(stage(&p1, "staging").phase, StagePhase::Soaking);
        assert_eq!(stage(&p1, "staging").pending, Some(release("2")));
        assert!(p1.events.iter().any(|e| e.reason == "Admitted"));

        // Dev Healthy at 200; at 440 staging has soaked 4m of 10m.
        let p2 = plan(&world("2", [Healthy, Busy, Busy], p1.status, 200));
        let p3 = plan(&world("2", [Healthy, Busy, Busy], p2.status, 440));
        let staging = stage(&p3, "staging");
        assert_eq!(staging.phase, StagePhase::Soaking);
        let soak = &staging.gates[0];
        assert_eq!(
            (soak.passed, soak.message.as_deref()),
            (false, Some("soaked 4m of 10m"))
        );
        assert_eq!(
            staging.next_check,
            Some(Time(t(470))),
            "rechecked within 30s"
        );
        assert_eq!(p3.requeue_after, Duration::from_secs(30));

        // Soaked at 800: staging admits v2.
        let p4 = plan(&world("2", [Healthy, Busy, Busy], p3.status, 800));
        assert_eq!(stage(&p4, "staging").release, Some(release("2")));
        // Staging Healthy at 900, soaked at 1500: prod still waits for a person.
        let p5 = plan(&world("2", [Healthy, Healthy, Busy], p4.status, 900));
        let p6 = plan(&world("2", [Healthy, Healthy, Busy], p5.status, 1500));
        let prod = stage(&p6, "prod");
        assert_eq!(prod.phase, StagePhase::WaitingForApproval);
        assert_eq!(prod.release, Some(release("1")));

        // An approval of another release admits nothing; one of this release does.
        let approve = |status: &PipelineStatus, tag: &str, id: &str| {
            let mut status = status.clone();
            status.approvals = vec![Approval {
                stage: "prod".into(),
                release: release(tag),
                decision: None,
                override_windows: None,
                intent: Intent {
                    id: id.into(),
                    requested_at: Time(t(1500)),
                    requested_by: Some("alice".into()),
                    reason: Some("looks good".into()),
                },
            }];
            status
        };
        let p7 = plan(&world(
            "2",
            [Healthy, Healthy, Busy],
            approve(&p6.status, "1", "a"),
            1510,
        ));
        assert_eq!(stage(&p7, "prod").release, Some(release("1")));
        let p8 = plan(&world(
            "2",
            [Healthy, Healthy, Busy],
            approve(&p7.status, "2", "b"),
            1520,
        ));
        assert_eq!(stage(&p8, "prod").release, Some(release("2")));
        let promoted = last_promoted(&p8);
        assert_eq!(
            (promoted.stage.as_str(), promoted.by.as_deref()),
            ("prod", Some("alice"))
        );
        assert!(
            p8.status
                .history
                .iter()
                .any(|h| h.action == HistoryAction::Approved && h.request.as_deref() == Some("b"))
        );
        // Measured: prod waited for the approval from 1500 to 1520; v2 entered dev at 100.
        assert!(p8.timings.contains(&Timing::ApprovalWait {
            stage: "prod".into(),
            seconds: 20.0
        }));
        assert!(p8.timings.contains(&Timing::ToStage {
            stage: "prod".into(),
            seconds: 1420.0
        }));
        // The approval is recorded once.
        let p9 = plan(&world(
            "2",
            [Healthy, Healthy, Busy],
            p8.status.clone(),
            1530,
        ));
        assert_eq!(p9.status.history.len(), p8.status.history.len());
    }

    #[test]
    fn a_frozen_or_short_budget_holds_prod() {
        let soaked = {
            let p1 = plan(&world("2", [Healthy, Healthy, Busy], running_v1(), 0));
            // Pretend dev and staging have been Healthy on v2 for an hour.
            let mut status = p1.status;
            for s in status.stages.iter_mut().filter(|s| s.name != "prod") {
                s.release = Some(release("2"));
                s.phase = StagePhase::Healthy;
                s.since = Some(Time(t(0)));
            }
            status.approvals = vec![Approval {
                stage: "prod".into(),
                release: release("2"),
                decision: None,
                override_windows: None,
                intent: Intent {
                    id: "a".into(),
                    requested_at: Time(t(0)),
                    requested_by: Some("alice".into()),
                    reason: None,
                },
            }];
            status
        };
        let table = [
            (budget(BudgetPhase::Frozen, 15.0), StagePhase::Frozen, false),
            (
                budget(BudgetPhase::Healthy, 12.0),
                StagePhase::WaitingForGates,
                false,
            ),
            (
                budget(BudgetPhase::Unknown, 90.0),
                StagePhase::WaitingForGates,
                false,
            ),
            (
                budget(BudgetPhase::InsufficientData, 100.0),
                StagePhase::WaitingForGates,
                false,
            ),
            (None, StagePhase::WaitingForGates, false),
            (
                budget(BudgetPhase::Healthy, 25.0),
                StagePhase::Progressing,
                true,
            ),
        ];
        for (status, phase, admitted) in table {
            let mut o = world("2", [Healthy, Healthy, Busy], soaked.clone(), 3600);
            o.budgets.insert("prod/avail".into(), status.clone());
            let p = plan(&o);
            let prod = stage(&p, "prod");
            assert_eq!(prod.phase, phase, "{status:?}: {:?}", prod.message);
            assert_eq!(prod.release == Some(release("2")), admitted, "{status:?}");
        }
        let frozen = {
            let mut o = world("2", [Healthy, Healthy, Busy], soaked.clone(), 3600);
            o.budgets
                .insert("prod/avail".into(), budget(BudgetPhase::Healthy, 12.0));
            plan(&o)
        };
        assert!(
            stage(&frozen, "prod")
                .message
                .clone()
                .unwrap_or_default()
                .contains("has 12% left, needs 20%"),
            "{:?}",
            stage(&frozen, "prod").message
        );
    }

    #[test]
    fn a_failed_stage_never_passes_its_release_on_and_a_newer_one_proceeds() {
        let p1 = plan(&world("2", [Busy, Busy, Busy], running_v1(), 0));
        let p2 = plan(&world(
            "2",
            [RolloutState::Failed("aborted".into()), Busy, Busy],
            p1.status,
            10,
        ));
        assert_eq!(stage(&p2, "dev").phase, StagePhase::Failed);
        assert!(p2.events.iter().any(|e| e.reason == "StageFailed"));
        let p3 = plan(&world(
            "2",
            [RolloutState::Failed("aborted".into()), Busy, Busy],
            p2.status,
            100_000,
        ));
        assert_eq!(
            stage(&p3, "staging").release,
            Some(release("1")),
            "never receives it"
        );
        // v3 is declared: dev admits it.
        let p4 = plan(&world("3", [Busy, Busy, Busy], p3.status, 100_010));
        assert_eq!(stage(&p4, "dev").release, Some(release("3")));
    }

    #[test]
    fn bad_stages_are_named_and_the_others_keep_working() {
        let mut o = world("2", [Busy, Busy, Busy], running_v1(), 0);
        o.rollouts[2][0].state = RolloutState::Missing;
        o.rollouts[1][0].state = RolloutState::Claimed("Pipeline other/checkout".into());
        let p = plan(&o);
        assert_eq!(stage(&p, "dev").release, Some(release("2")));
        let message = p.status.message.clone().unwrap_or_default();
        assert!(message.contains("Rollout prod/web not found"), "{message}");
        assert!(
            message.contains("also in Pipeline other/checkout"),
            "{message}"
        );
        assert_eq!(
            conditions::message(&p.status.conditions, "Ready"),
            Some(message.as_str())
        );
    }

    #[test]
    fn a_deny_window_holds_a_release_until_it_ends_or_a_person_overrides_it() {
        let mut o = world("2", [Healthy, Busy, Busy], running_v1(), 0);
        // dev Healthy on v2 for an hour already.
        for s in o.status.stages.iter_mut().filter(|s| s.name == "dev") {
            s.release = Some(release("2"));
            s.since = Some(Time(t(-3600)));
        }
        // now = t(0) = 2023-11-14T22:13:20Z; a deny window from 22:00 UTC for 1h.
        o.spec.stages[1].gates.as_mut().unwrap().windows =
            vec![crate::api::pipeline::DeployWindow {
                kind: crate::api::pipeline::WindowKind::Deny,
                schedule: "0 22 * * *".into(),
                duration: crate::api::Duration::from_secs(3600),
                time_zone: None,
            }];
        let held = plan(&o);
        let staging = stage(&held, "staging");
        assert_eq!(staging.phase, StagePhase::WaitingForGates);
        assert!(
            staging
                .message
                .clone()
                .unwrap_or_default()
                .contains("inside a deny window until 23:00 UTC"),
            "{:?}",
            staging.message
        );
        // It ends at 23:00: the gate is looked at again then (or sooner).
        assert!(held.requeue_after <= Duration::from_secs(30));
        // After it ends, the release enters.
        let mut later = o.clone();
        later.status = held.status.clone();
        later.now = t(47 * 60);
        assert_eq!(stage(&plan(&later), "staging").release, Some(release("2")));
        // Or a person overrides it, on the record.
        let mut urgent = o.clone();
        urgent.status = held.status.clone();
        urgent.status.approvals = vec![Approval {
            stage: "staging".into(),
            release: release("2"),
            decision: None,
            override_windows: Some(true),
            intent: Intent {
                id: "o".into(),
                requested_at: Time(t(0)),
                requested_by: Some("alice".into()),
                reason: Some("P0".into()),
            },
        }];
        let through = plan(&urgent);
        assert_eq!(stage(&through, "staging").release, Some(release("2")));
        let admitted = last_promoted(&through);
        assert!(
            admitted
                .reason
                .clone()
                .unwrap_or_default()
                .contains("overridden by alice: P0"),
            "{:?}",
            admitted.reason
        );
        // A schedule that does not parse is named, and holds the stage (fail closed).
        let mut bad = o.clone();
        bad.spec.stages[1].gates.as_mut().unwrap().windows[0].schedule = "0 99 * * *".into();
        let refused = plan(&bad);
        assert_eq!(stage(&refused, "staging").release, Some(release("1")));
        assert!(
            refused
                .status
                .message
                .clone()
                .unwrap_or_default()
                .contains("stage staging: window 1: schedule")
        );
    }

    #[test]
    fn the_argocd_gate_wants_synced_healthy_and_the_release_delivered() {
        let mut o = world("2", [Healthy, Healthy, Busy], running_v1(), 3600);
        for s in o.status.stages.iter_mut().filter(|s| s.name != "prod") {
            s.release = Some(release("2"));
            s.since = Some(Time(t(0)));
        }
        let prod = o.spec.stages[2].gates.as_mut().unwrap();
        prod.approval = None;
        prod.argo_cd = Some(crate::api::pipeline::ArgoCdGate {
            application: "web-prod".into(),
            namespace: None,
        });
        let prod_rollout = format!(
            "{}/{}",
            o.spec.stages[2].rollouts[0].namespace, o.spec.stages[2].rollouts[0].name
        );
        let seen =
            |sync: &str, health: &str, images: &[&str], rollout: Option<&str>| Application::Seen {
                sync: Some(sync.into()),
                health: Some(health.into()),
                images: images.iter().map(|i| i.to_string()).collect(),
                rollouts: rollout
                    .map(|s| (prod_rollout.clone(), s.to_string()))
                    .into_iter()
                    .collect(),
            };
        let table = [
            (
                seen("OutOfSync", "Healthy", &["web:1"], None),
                false,
                "is OutOfSync and Healthy, without web:2".to_string(),
            ),
            (
                seen("Synced", "Progressing", &["web:2"], None),
                false,
                "is Synced and Progressing".to_string(),
            ),
            (
                Application::Missing,
                false,
                "Application argocd/web-prod not found".to_string(),
            ),
            (
                Application::NotServed,
                false,
                "CRD (argoproj.io/v1alpha1) is not installed".to_string(),
            ),
            // An Application that does not manage the Rollout: its images must show the release.
            (
                seen("Synced", "Healthy", &["web:2", "sidecar:1"], None),
                true,
                "is Synced and Healthy with web:2".to_string(),
            ),
            // One that manages it (what a real ArgoCD reports while the Pipeline holds the
            // new revision): the Rollout Synced is the proof, whatever the images say.
            (
                seen("Synced", "Healthy", &["web:1"], Some("Synced")),
                true,
                "is Synced and Healthy with web:2".to_string(),
            ),
            (
                seen("OutOfSync", "Healthy", &["web:1"], Some("OutOfSync")),
                false,
                format!("is OutOfSync and Healthy, Rollout {prod_rollout} not Synced"),
            ),
        ];
        for (app, admitted, says) in table {
            o.applications = BTreeMap::from([("argocd/web-prod".to_string(), app.clone())]);
            let p = plan(&o);
            let prod = stage(&p, "prod");
            assert_eq!(prod.release == Some(release("2")), admitted, "{app:?}");
            let gate = prod
                .gates
                .iter()
                .find(|g| g.gate == "argoCD/argocd/web-prod")
                .unwrap();
            assert!(
                gate.message.clone().unwrap_or_default().contains(&says),
                "{app:?}: {:?}",
                gate.message
            );
        }
    }

    fn arb_state() -> impl Strategy<Value = RolloutState> {
        prop_oneof![
            Just(RolloutState::Healthy),
            Just(RolloutState::Busy),
            Just(RolloutState::Failed("x".into())),
        ]
    }

    proptest! {
        /// Over any sequence of Rollout states, releases, approvals and times: a release
        /// enters a stage only if the stage before was Healthy on it for the soak, and never
        /// enters prod without an approval of that very release.
        #[test]
        fn no_stage_is_skipped_and_no_unapproved_release_reaches_prod(
            steps in proptest::collection::vec(
                ((1..4u8), proptest::array::uniform3(arb_state()), 0..400i64, proptest::option::of(1..4u8)),
                1..40,
            )
        ) {
            let mut status = running_v1();
            let mut now = 0;
            for (tag, states, wait, approved) in steps {
                now += wait;
                let before = status.clone();
                let mut o = world(&tag.to_string(), states, status, now);
                if let Some(a) = approved {
                    o.status.approvals = vec![Approval {
                        stage: "prod".into(),
                        release: release(&a.to_string()),
                        decision: None,
                override_windows: None,
                        intent: Intent { id: format!("{now}"), requested_at: Time(t(now)), requested_by: Some("alice".into()), reason: None },
                    }];
                }
                let approvals = o.status.approvals.clone();
                let adopt = o.rollouts.iter().map(|r| r[0].state == RolloutState::Healthy).collect::<Vec<_>>();
                let p = plan(&o);
                for (i, s) in p.status.stages.iter().enumerate().skip(1) {
                    let old = before.stages.iter().find(|b| b.name == s.name).and_then(|b| b.release.clone());
                    if s.release == old || adopt[i] {
                        continue;
                    }
                    let prev = &p.status.stages[i - 1];
                    prop_assert_eq!(prev.phase, StagePhase::Healthy);
                    prop_assert_eq!(&prev.release, &s.release);
                    let since = prev.since.as_ref().unwrap().0;
                    prop_assert!(since.duration_since(t(now)).as_secs() <= -600, "soaked 10m");
                    if s.name == "prod" {
                        prop_assert!(approvals.iter().any(|a| Some(&a.release) == s.release.as_ref()));
                    }
                }
                status = p.status;
            }
        }
    }
}
