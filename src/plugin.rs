//! The pure half of `kubectl sluice`: what to write for an intent, and how a Rollout reads
//! on a terminal.

use std::fmt::Write;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::api::common::Intent;
use crate::api::errorbudget::ErrorBudget;
use crate::api::pipeline::{Approval, Decision, Pipeline};
use crate::api::rollout::Rollout;
use crate::k8s::labels::{
    HASH_LABEL, ISTIO_CANONICAL_REVISION_LABEL, REVISION_ANNOTATION, TEMPLATE_ANNOTATION,
};
use crate::rollout::steps;

/// The field manager of every write the plugin makes (never the operator's).
pub const FIELD_MANAGER: &str = "kubectl-sluice";

/// The intents the plugin can record on a Rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutIntent {
    Abort,
    Promote,
    PromoteFull,
    Retry,
    Pause,
    Resume,
    OverrideFreeze,
}

impl RolloutIntent {
    /// The field manager that records this kind of request. One per kind: a server-side
    /// apply removes the fields its manager applied before and leaves out now, so with one
    /// manager for all kinds, `pause` right after `abort` would erase the abort before the
    /// operator acted on it.
    pub fn field_manager(self) -> String {
        format!("{FIELD_MANAGER}-{}", self.field())
    }

    fn field(self) -> &'static str {
        match self {
            Self::Abort => "abort",
            Self::Promote => "promote",
            Self::PromoteFull => "promoteFull",
            Self::Retry => "retry",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::OverrideFreeze => "overrideFreeze",
        }
    }
}

/// `NAMESPACE/NAME` or `NAME` (in `namespace`, else `default`), refusing what cannot name an
/// object: an empty part, or a second `/`.
pub fn object_reference(
    reference: &str,
    namespace: Option<&str>,
    default: &str,
) -> Result<(String, String), String> {
    let (ns, name) = match reference.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (namespace.unwrap_or(default), reference),
    };
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(format!(
            "{reference:?} does not name an object: use NAME or NAMESPACE/NAME"
        ));
    }
    Ok((ns.to_string(), name.to_string()))
}

/// As [`object_reference`], also accepting the kind in front (`pipeline/NAME`), as kubectl
/// does.
pub fn pipeline_reference(
    reference: &str,
    namespace: Option<&str>,
    default: &str,
) -> Result<(String, String), String> {
    let bare = ["pipeline/", "pipelines/", "spl/"]
        .iter()
        .find_map(|kind| reference.strip_prefix(kind))
        .unwrap_or(reference);
    object_reference(bare, namespace, default)
}

/// A kind of resource `kubectl sluice history` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrailKind {
    Rollout,
    Pipeline,
    ErrorBudget,
}

/// `[KIND/]NAMESPACE/NAME` or `[KIND/]NAME`: the kind when it is written (rollout, pipeline,
/// errorbudget, or their short names), and the object.
pub fn trail_reference(
    reference: &str,
    namespace: Option<&str>,
    default: &str,
) -> Result<(Option<TrailKind>, String, String), String> {
    let kinds = [
        ("rollout", TrailKind::Rollout),
        ("rollouts", TrailKind::Rollout),
        ("sro", TrailKind::Rollout),
        ("pipeline", TrailKind::Pipeline),
        ("pipelines", TrailKind::Pipeline),
        ("spl", TrailKind::Pipeline),
        ("errorbudget", TrailKind::ErrorBudget),
        ("errorbudgets", TrailKind::ErrorBudget),
        ("eb", TrailKind::ErrorBudget),
    ];
    let (kind, rest) = match reference.split_once('/') {
        Some((first, rest)) => match kinds.iter().find(|(k, _)| first.eq_ignore_ascii_case(k)) {
            Some((_, kind)) => (Some(*kind), rest),
            None => (None, reference),
        },
        None => (None, reference),
    };
    let (ns, name) = object_reference(rest, namespace, default)?;
    Ok((kind, ns, name))
}

/// One line of an audit trail.
#[derive(Clone, Debug, PartialEq)]
pub struct TrailEntry {
    pub time: Timestamp,
    /// The Event's reason, or the Pipeline history's action.
    pub action: String,
    /// Who decided: a person's name where it is recorded, `a person`, or `sluice`.
    pub by: String,
    /// What happened and why.
    pub what: String,
    /// How many times it was recorded (an Event's series).
    pub count: i32,
}

/// The trail of one object from its Events (`regarding` it) and, for a Pipeline, its durable
/// history. Events the history already records (admissions, stage results, decisions) are
/// left out so that nothing shows twice; newest first.
pub fn audit_trail(
    events: &[k8s_openapi::api::events::v1::Event],
    pipeline_history: &[crate::api::pipeline::HistoryEntry],
) -> Vec<TrailEntry> {
    let in_history = [
        "Admitted",
        "StageHealthy",
        "StageFailed",
        "Approved",
        "Rejected",
    ];
    let mut trail: Vec<TrailEntry> = events
        .iter()
        .filter(|e| {
            e.reporting_controller.as_deref() == Some(crate::k8s::events::REPORTING_CONTROLLER)
        })
        .filter(|e| {
            pipeline_history.is_empty()
                || !in_history.contains(&e.reason.as_deref().unwrap_or_default())
        })
        .filter_map(|e| {
            let reason = e.reason.clone()?;
            let time = e
                .series
                .as_ref()
                .map(|s| s.last_observed_time.0)
                .or_else(|| e.event_time.as_ref().map(|t| t.0))
                .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
            let by = match crate::k8s::events::actor(&reason) {
                "person" => "a person",
                other => other,
            };
            Some(TrailEntry {
                time,
                by: by.to_string(),
                what: e.note.clone().unwrap_or_default(),
                count: e.series.as_ref().map_or(1, |s| s.count),
                action: reason,
            })
        })
        .collect();
    trail.extend(pipeline_history.iter().map(|h| {
        let mut what = format!(
            "stage {}: {}",
            h.stage,
            crate::pipeline::plan::describe(&h.release)
        );
        if let Some(reason) = h.reason.as_deref().filter(|r| !r.is_empty()) {
            what.push_str(&format!(" ({reason})"));
        }
        TrailEntry {
            time: h.time.0,
            action: format!("{:?}", h.action),
            by: h.by.clone().unwrap_or_else(|| "sluice".into()),
            what,
            count: 1,
        }
    }));
    trail.sort_by_key(|e| std::cmp::Reverse(e.time));
    trail
}

/// The trail as a table, newest first.
pub fn render_trail(title: &str, trail: &[TrailEntry], now: Timestamp) -> String {
    let mut out = format!("{title}\n");
    if trail.is_empty() {
        out.push_str("  nothing recorded (Events are kept for an hour by default)\n");
        return out;
    }
    out.push_str(&format!(
        "  {:<8} {:<26} {:<28} WHAT\n",
        "AGE", "ACTION", "BY"
    ));
    for entry in trail {
        let repeated = if entry.count > 1 {
            format!(" (x{})", entry.count)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  {:<8} {:<26} {:<28} {}{repeated}\n",
            age(Some(&Time(entry.time)), now),
            entry.action,
            entry.by,
            entry.what
        ));
    }
    out
}

/// A fresh intent: its id is the request time, unique enough for one person's commands.
pub fn new_intent(now: Timestamp, requested_by: Option<String>, reason: Option<String>) -> Intent {
    Intent {
        id: now.to_string(),
        requested_at: Time(now),
        requested_by,
        reason,
    }
}

/// The server-side apply body that records `intent` in the status subresource.
pub fn intent_patch(kind: RolloutIntent, intent: &Intent) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "status": { kind.field(): intent },
    })
}

fn age(since: Option<&Time>, now: Timestamp) -> String {
    let Some(since) = since else {
        return "-".into();
    };
    let secs = now.duration_since(since.0).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The `kubectl sluice status` view.
pub fn render_status(rollout: &Rollout, replica_sets: &[ReplicaSet], now: Timestamp) -> String {
    let mut out = String::new();
    let status = rollout.status.clone().unwrap_or_default();
    let ns = rollout.namespace().unwrap_or_default();
    let phase = status
        .phase
        .map_or("Unknown".to_string(), |p| format!("{p:?}"));
    let _ = writeln!(out, "Rollout     {ns}/{}", rollout.name_any());
    let _ = writeln!(out, "Phase       {phase}");
    if let Some(message) = &status.message {
        let _ = writeln!(out, "Message     {message}");
    }
    let strategy = if rollout.spec.strategy.canary.is_some() {
        "Canary"
    } else {
        "BlueGreen"
    };
    let _ = writeln!(out, "Strategy    {strategy}");
    if let Some(w) = &status.weights {
        let verified = match w.verified {
            Some(true) => " (verified)",
            Some(false) => " (not yet verified)",
            None => " (by replica counts)",
        };
        let _ = writeln!(
            out,
            "Weights     stable {}%  canary {}%{verified}",
            w.stable, w.canary
        );
    }
    let _ = writeln!(
        out,
        "Stable      {}",
        status.stable_revision.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "Canary      {}",
        status.canary_revision.as_deref().unwrap_or("-")
    );

    if let Some(canary) = &rollout.spec.strategy.canary {
        let steps = steps::effective(&canary.steps);
        let current = status.current_step_index.map(|i| i.max(0) as usize);
        let _ = writeln!(out, "\nSteps");
        for (i, step) in steps.iter().enumerate() {
            let marker = match current {
                Some(c) if status.canary_revision.is_some() && i < c => "done",
                Some(c) if status.canary_revision.is_some() && i == c => "  =>",
                _ => "    ",
            };
            let _ = writeln!(out, "  {marker} {:>2}. {step}", i + 1);
        }
        let last = if matches!(current, Some(c) if c >= steps.len() && status.canary_revision.is_some())
        {
            "  =>"
        } else {
            "    "
        };
        let _ = writeln!(out, "  {last}     promote (100%)");
    }

    let _ = writeln!(out, "\nRevisions");
    let _ = writeln!(out, "  REV  HASH         ROLE     DESIRED   READY     AGE");
    let mut sets: Vec<&ReplicaSet> = replica_sets.iter().collect();
    sets.sort_by_key(|rs| {
        std::cmp::Reverse(
            rs.annotations()
                .get(REVISION_ANNOTATION)
                .and_then(|r| r.parse::<i64>().ok())
                .unwrap_or(0),
        )
    });
    for rs in sets {
        let hash = rs.labels().get(HASH_LABEL).cloned().unwrap_or_default();
        let role = if Some(&hash) == status.stable_revision.as_ref() {
            "stable"
        } else if Some(&hash) == status.canary_revision.as_ref() {
            "canary"
        } else {
            "old"
        };
        let desired = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let ready = rs
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let revision = rs
            .annotations()
            .get(REVISION_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<4} {:<12} {:<8} {:<9} {:<9} {}",
            revision,
            hash,
            role,
            desired,
            ready,
            age(rs.metadata.creation_timestamp.as_ref(), now)
        );
    }

    if !status.analysis_runs.is_empty() {
        let _ = writeln!(out, "\nAnalysis");
        for run in &status.analysis_runs {
            let message = run
                .message
                .as_deref()
                .map(|m| format!(" - {m}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} ({}) {:?}{message}",
                run.name, run.revision, run.phase
            );
            for metric in &run.metrics {
                let recent: Vec<String> = metric
                    .measurements
                    .iter()
                    .rev()
                    .take(5)
                    .map(|m| format!("{}:{:?}", m.value.as_deref().unwrap_or("-"), m.phase))
                    .collect();
                let _ = writeln!(
                    out,
                    "    {:<16} {:?}  ok {} failed {} inconclusive {} error {}  latest {}",
                    metric.name,
                    metric.phase,
                    metric.successful,
                    metric.failed,
                    metric.inconclusive,
                    metric.error,
                    recent.join(" ")
                );
            }
        }
    }
    out
}

/// One line of `kubectl sluice list`.
pub fn render_row(rollout: &Rollout) -> String {
    let status = rollout.status.clone().unwrap_or_default();
    format!(
        "{:<16} {:<24} {:<12} {:<6} {:<7} {:<12} {}",
        rollout.namespace().unwrap_or_default(),
        rollout.name_any(),
        status.phase.map_or("Unknown".into(), |p| format!("{p:?}")),
        status.step_progress.as_deref().unwrap_or("-"),
        status
            .weights
            .as_ref()
            .map_or("-".into(), |w| format!("{}%", w.canary)),
        status.stable_revision.as_deref().unwrap_or("-"),
        status.canary_revision.as_deref().unwrap_or("-"),
    )
}

/// `kubectl sluice budget`: the objective, a consumption bar, burn rates against the
/// multiwindow factors, the phase, the policy with the threshold in force marked, and each
/// target with what the policy did to it (`targets`: the Rollouts as read, `None` when absent).
pub fn render_budget(budget: &ErrorBudget, targets: &[(String, Option<Rollout>)]) -> String {
    let spec = &budget.spec;
    let status = budget.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ErrorBudget {}/{}: {}% good events over {}",
        budget.namespace().unwrap_or_default(),
        budget.name_any(),
        spec.objective,
        spec.window
    );
    let phase = status
        .phase
        .map_or("not evaluated".into(), |p| format!("{p:?}"));
    let stale = if status.stale == Some(true) {
        " (stale figures)"
    } else {
        ""
    };
    let _ = writeln!(out, "Phase:     {phase}{stale}");
    if let Some(message) = &status.message {
        let _ = writeln!(out, "           {message}");
    }
    if let (Some(consumed), Some(remaining)) = (status.consumed_percent, status.remaining_percent) {
        const WIDTH: usize = 40;
        let used = ((consumed.clamp(0.0, 100.0) / 100.0) * WIDTH as f64).round() as usize;
        let _ = writeln!(
            out,
            "Consumed:  [{}{}] {consumed:.1}% used, {remaining:.1}% left",
            "#".repeat(used),
            ".".repeat(WIDTH - used)
        );
    }
    if let Some(coverage) = status.window_coverage {
        let _ = writeln!(out, "Coverage:  {coverage:.0}% of the window has data");
    }
    if let Some(left) = &status.time_to_exhaustion {
        let _ = writeln!(out, "Exhausted in {left} at the current burn");
    }
    if !status.burn_rates.is_empty() {
        let rates: Vec<String> = status
            .burn_rates
            .iter()
            .map(|(w, r)| format!("{w} {r:.2}"))
            .collect();
        let _ = writeln!(out, "Burn rates: {}", rates.join("  "));
    }
    let alerts: Vec<String> = crate::errorbudget::slo::burn_alerts(spec.window.as_std())
        .iter()
        .map(|a| {
            let firing = status
                .conditions
                .iter()
                .any(|c| c.type_ == a.name && c.status == "True");
            format!(
                "{} ({}/{} > {:.1}){}",
                a.name,
                crate::api::Duration::from_std(a.long),
                crate::api::Duration::from_std(a.short),
                a.factor,
                if firing { " FIRING" } else { "" }
            )
        })
        .collect();
    let _ = writeln!(out, "Alerts:    {}", alerts.join(", "));
    let policy = if spec.policy.is_empty() {
        crate::errorbudget::policy::default_policy()
    } else {
        spec.policy.clone()
    };
    let _ = writeln!(out, "Policy:");
    for rule in &policy {
        let in_force = status.threshold_in_force == Some(rule.when_consumed)
            && status.active_action == Some(rule.action);
        let window = match (rule.action, &rule.rollback_window) {
            (crate::api::errorbudget::BudgetAction::Rollback, Some(w)) => {
                format!(" (releases completed within {w})")
            }
            (crate::api::errorbudget::BudgetAction::Rollback, None) => {
                " (releases completed within 1h)".to_string()
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {} at {:>3}% {:?}{window}",
            if in_force { "=>" } else { "  " },
            rule.when_consumed,
            rule.action
        );
    }
    let action = status
        .active_action
        .map_or("nothing".to_string(), |a| format!("{a:?}"));
    let _ = writeln!(out, "Targets:   (policy in force: {action})");
    if targets.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (name, rollout) in targets {
        let _ = writeln!(out, "  {name}: {}", policy_effect(rollout.as_ref()));
    }
    out
}

/// What an ErrorBudget's policy is doing to a target Rollout, in a few words.
fn policy_effect(rollout: Option<&Rollout>) -> String {
    let Some(rollout) = rollout else {
        return "not found".to_string();
    };
    let status = rollout.status.clone().unwrap_or_default();
    let stable = status.stable_revision.as_deref().unwrap_or("-");
    if let Some(rolled_back) = &status.budget_rollback {
        return format!(
            "rolled back from {} to {} at {} (retry or a new template releases again)",
            rolled_back.revision, rolled_back.to, rolled_back.at.0
        );
    }
    let aborted_by_budget = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Aborted" && c.status == "True" && c.reason == "AbortedByErrorBudget");
    if aborted_by_budget {
        return format!(
            "release of {} aborted, stable {stable}",
            status.canary_revision.as_deref().unwrap_or("-")
        );
    }
    if let Some(pause) = status
        .pause_conditions
        .iter()
        .find(|c| c.reason == crate::api::rollout::PauseReason::BudgetFreeze)
    {
        return format!("held since {} (stable {stable})", pause.start_time.0);
    }
    if let Some(by) = &status.freeze_override {
        return format!(
            "released {} despite the budget ({}: {})",
            by.revision,
            by.requested_by.as_deref().unwrap_or("a user"),
            by.reason.as_deref().unwrap_or("no reason")
        );
    }
    format!(
        "untouched ({}, stable {stable})",
        status
            .phase
            .map_or("not reconciled".to_string(), |p| format!("{p:?}"))
    )
}

/// The approvals to write for a decision on `stage`: the Pipeline's approvals with that
/// stage's entry replaced (the plugin applies the whole list, so other stages keep theirs).
/// Refused when the stage does not exist or has no release waiting for a decision.
pub fn approvals_with(
    pipeline: &Pipeline,
    stage: &str,
    (decision, override_windows): (Decision, bool),
    intent: Intent,
) -> Result<Vec<Approval>, String> {
    let name = pipeline.name_any();
    if !pipeline.spec.stages.iter().any(|s| s.name == stage) {
        let stages: Vec<&str> = pipeline
            .spec
            .stages
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        return Err(format!(
            "Pipeline {name} has no stage {stage} (stages: {})",
            stages.join(", ")
        ));
    }
    let status = pipeline.status.clone().unwrap_or_default();
    let release = status
        .stages
        .iter()
        .find(|s| s.name == stage)
        .and_then(|s| s.pending.clone())
        .ok_or_else(|| {
            format!("stage {stage} of Pipeline {name} has no release waiting for a decision")
        })?;
    let mut approvals: Vec<Approval> = status
        .approvals
        .into_iter()
        .filter(|a| a.stage != stage)
        .collect();
    approvals.push(Approval {
        stage: stage.to_string(),
        release,
        decision: Some(decision),
        override_windows: override_windows.then_some(true),
        intent,
    });
    Ok(approvals)
}

/// `kubectl sluice pipeline`: the stages left to right, each with its phase, release, what it
/// waits for and its gates.
pub fn render_pipeline(pipeline: &Pipeline, now: Timestamp) -> String {
    const WIDTH: usize = 34;
    let status = pipeline.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Pipeline {}/{}: {}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any(),
        status.message.as_deref().unwrap_or("not evaluated yet")
    );
    let columns: Vec<Vec<String>> = pipeline
        .spec
        .stages
        .iter()
        .map(|stage| {
            let st = status.stages.iter().find(|s| s.name == stage.name);
            let mut lines = vec![stage.name.clone()];
            let phase = st.map_or("Pending".to_string(), |s| format!("{:?}", s.phase));
            let since = st.map_or(String::new(), |s| {
                format!(" {}", age(s.since.as_ref(), now))
            });
            lines.push(format!("{phase}{since}"));
            let runs = st
                .and_then(|s| s.release.as_ref())
                .map_or("-".to_string(), crate::pipeline::plan::describe);
            lines.push(format!("runs {runs}"));
            if let Some(pending) = st.and_then(|s| s.pending.as_ref()) {
                lines.push(format!("next {}", crate::pipeline::plan::describe(pending)));
            }
            for gate in st.map(|s| s.gates.as_slice()).unwrap_or_default() {
                let mark = if gate.passed { "ok " } else { "..." };
                lines.push(format!(
                    "{mark} {}: {}",
                    gate.gate,
                    gate.message.as_deref().unwrap_or("")
                ));
            }
            lines
        })
        .collect();
    let rows = columns.iter().map(Vec::len).max().unwrap_or(0);
    for row in 0..rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| {
                let cell: String = c.get(row).cloned().unwrap_or_default();
                let cut: String = cell.chars().take(WIDTH).collect();
                format!("{cut:<WIDTH$}")
            })
            .collect();
        let joint = if row == 0 { " -> " } else { "    " };
        let _ = writeln!(out, "{}", cells.join(joint).trim_end());
    }
    let recent: Vec<String> = status
        .history
        .iter()
        .rev()
        .take(5)
        .map(|h| {
            format!(
                "  {} {} {:?} {}{}{}",
                h.time.0,
                h.stage,
                h.action,
                crate::pipeline::plan::describe(&h.release),
                h.by.as_deref()
                    .map_or(String::new(), |b| format!(" by {b}")),
                h.reason
                    .as_deref()
                    .filter(|r| !r.is_empty())
                    .map_or(String::new(), |r| format!(" ({r})"))
            )
        })
        .collect();
    if !recent.is_empty() {
        let _ = writeln!(out, "History (newest first):");
        for line in recent {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// `kubectl sluice budget --rules`: Prometheus recording rules for the error ratio over every
/// window Sluice evaluates, and the three multiwindow burn-rate alerts (the Sloth and Pyrra
/// shape), so the SLO pages people even where Sluice is not running.
pub fn render_rules(budget: &ErrorBudget) -> Result<String, String> {
    use crate::analysis::template::{TemplateVars, render};
    use crate::errorbudget::{plan, slo};
    let spec = &budget.spec;
    let name = budget.name_any();
    let namespace = budget.namespace().unwrap_or_default();
    let error_budget = crate::api::errorbudget::Objective::parse(&spec.objective)?.budget();
    let ratio = &spec.indicator.ratio;
    let record = |window: &str| format!("sluice:errorbudget_error_ratio:rate{window}");
    let labels = json!({"sluice_errorbudget": name, "sluice_namespace": namespace});
    let selector = format!(r#"{{sluice_errorbudget="{name}",sluice_namespace="{namespace}"}}"#);
    let mut rules = Vec::new();
    for window in plan::windows(spec) {
        let text = plan::window_text(window);
        let vars = TemplateVars {
            window: Some(text.clone()),
            ..TemplateVars::default()
        };
        let total = render(&ratio.total, &vars).map_err(|e| e.to_string())?;
        let expr = match (&ratio.errors, &ratio.good) {
            (Some(errors), _) => {
                let errors = render(errors, &vars).map_err(|e| e.to_string())?;
                format!("({errors})\n/\n({total})")
            }
            (None, Some(good)) => {
                let good = render(good, &vars).map_err(|e| e.to_string())?;
                format!("1 - (({good})\n/\n({total}))")
            }
            (None, None) => return Err("the ratio names neither errors nor good".into()),
        };
        rules.push(json!({"record": record(&text), "expr": expr, "labels": labels}));
    }
    for alert in slo::burn_alerts(spec.window.as_std()) {
        let long = plan::window_text(alert.long);
        let short = plan::window_text(alert.short);
        let threshold = alert.factor * error_budget;
        let severity = if alert.name == "SlowBurn" {
            "ticket"
        } else {
            "page"
        };
        rules.push(json!({
            "alert": format!("ErrorBudget{}", alert.name),
            "expr": format!(
                "{}{selector} > {threshold}\nand\n{}{selector} > {threshold}",
                record(&long),
                record(&short)
            ),
            "labels": {"severity": severity, "sluice_errorbudget": name, "sluice_namespace": namespace},
            "annotations": {
                "summary": format!(
                    "ErrorBudget {namespace}/{name} burns over {:.1}x ({long} and {short})",
                    alert.factor
                ),
                "description": format!(
                    "{}% objective over {}: at this rate the budget is spent early. `kubectl sluice budget {namespace}/{name}` shows it.",
                    spec.objective, spec.window
                ),
            },
        }));
    }
    let document = json!({"groups": [{"name": format!("sluice-errorbudget-{namespace}-{name}"), "rules": rules}]});
    serde_yaml::to_string(&document).map_err(|e| e.to_string())
}

/// The template a revision was declared with, for `undo`: the copy Sluice keeps in the
/// ReplicaSet's annotation (exact, so the revision hashes the same and its ReplicaSet is
/// reused), else (ReplicaSets made before that annotation) the ReplicaSet's template with the
/// labels Sluice added removed.
pub fn template_for_undo(rs: &ReplicaSet) -> Option<PodTemplateSpec> {
    if let Some(declared) = rs.annotations().get(TEMPLATE_ANNOTATION)
        && let Ok(template) = serde_json::from_str(declared)
    {
        return Some(template);
    }
    let mut template = rs.spec.as_ref()?.template.clone()?;
    let hash = rs.labels().get(HASH_LABEL).cloned();
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
        if labels.get(ISTIO_CANONICAL_REVISION_LABEL) == hash.as_ref() {
            labels.remove(ISTIO_CANONICAL_REVISION_LABEL);
        }
    }
    Some(template)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_request_has_its_own_field_manager() {
        use RolloutIntent::*;
        let kinds = [
            Abort,
            Promote,
            PromoteFull,
            Retry,
            Pause,
            Resume,
            OverrideFreeze,
        ];
        let managers: std::collections::BTreeSet<String> =
            kinds.iter().map(|k| k.field_manager()).collect();
        assert_eq!(managers.len(), kinds.len());
        assert_eq!(Abort.field_manager(), "kubectl-sluice-abort");
    }

    #[test]
    fn intent_patch_touches_only_its_own_field() {
        let intent = new_intent(
            Timestamp::from_second(1_700_000_000).unwrap(),
            Some("alice".into()),
            None,
        );
        let patch = intent_patch(RolloutIntent::PromoteFull, &intent);
        assert_eq!(patch["status"].as_object().unwrap().len(), 1);
        assert_eq!(patch["status"]["promoteFull"]["requestedBy"], "alice");
        assert!(patch.get("spec").is_none(), "never the spec that git owns");
    }

    #[test]
    fn undo_restores_the_declared_template_exactly() {
        let declared: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "web:1"}]}
        }))
        .unwrap();
        let hash = crate::rollout::revision::template_hash(&declared);
        let mut running = declared.clone();
        let labels = running.metadata.as_mut().unwrap().labels.as_mut().unwrap();
        labels.insert(HASH_LABEL.into(), hash.clone());
        labels.insert(ISTIO_CANONICAL_REVISION_LABEL.into(), hash.clone());
        // What the apiserver defaults inside a ReplicaSet's template.
        running.spec.as_mut().unwrap().restart_policy = Some("Always".into());
        let mut rs = ReplicaSet {
            metadata: kube::api::ObjectMeta {
                labels: Some([(HASH_LABEL.to_string(), hash.clone())].into()),
                annotations: Some(
                    [(
                        TEMPLATE_ANNOTATION.to_string(),
                        serde_json::to_string(&declared).unwrap(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                template: Some(running),
                ..Default::default()
            }),
            status: None,
        };
        let restored = template_for_undo(&rs).unwrap();
        assert_eq!(crate::rollout::revision::template_hash(&restored), hash);
        // Without the annotation: Sluice's labels come off, the defaults stay.
        rs.metadata.annotations = None;
        let fallback = template_for_undo(&rs).unwrap();
        let labels = fallback.metadata.unwrap().labels.unwrap();
        assert!(!labels.contains_key(HASH_LABEL));
        assert!(!labels.contains_key(ISTIO_CANONICAL_REVISION_LABEL));
    }

    #[test]
    fn budget_view_marks_the_threshold_in_force() {
        let budget: ErrorBudget = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "ErrorBudget",
            "metadata": {"name": "avail", "namespace": "shop"},
            "spec": {"objective": "99.9", "window": "30d",
                     "indicator": {"ratio": {"errors": "e", "total": "t"}},
                     "targets": [{"rollout": "checkout"}]},
            "status": {"phase": "Frozen", "consumedPercent": 85.0, "remainingPercent": 15.0,
                       "activeAction": "FreezePromotions", "thresholdInForce": 80,
                       "burnRates": {"5m": 2.5}}
        }))
        .unwrap();
        let held: Rollout = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "checkout", "namespace": "shop"},
            "spec": {"selector": {}, "template": {}, "strategy": {"canary": {}}},
            "status": {"stableRevision": "abc", "phase": "Paused",
                       "pauseConditions": [{"reason": "BudgetFreeze", "startTime": "2026-12-01T10:00:00Z"}]}
        }))
        .unwrap();
        let targets = [
            ("shop/checkout".to_string(), Some(held)),
            ("shop/gone".to_string(), None),
        ];
        let text = render_budget(&budget, &targets);
        assert!(text.contains("=> at  80% FreezePromotions"), "{text}");
        assert!(
            text.contains("at  95% Rollback (releases completed within 1h)"),
            "{text}"
        );
        assert!(text.contains("85.0% used, 15.0% left"), "{text}");
        assert!(text.contains("FastBurn (1h/5m > 14.4)"), "{text}");
        assert!(
            text.contains("(policy in force: FreezePromotions)"),
            "{text}"
        );
        assert!(
            text.contains("shop/checkout: held since 2026-12-01T10:00:00Z (stable abc)"),
            "{text}"
        );
        assert!(text.contains("shop/gone: not found"), "{text}");
    }

    #[test]
    fn rules_record_every_window_and_alert_on_both_windows() {
        let budget: ErrorBudget = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "ErrorBudget",
            "metadata": {"name": "avail", "namespace": "shop"},
            "spec": {"objective": "99.9", "window": "30d",
                     "indicator": {"ratio": {"errors": "sum(rate(e[{{window}}]))", "total": "sum(rate(t[{{window}}]))"}}}
        }))
        .unwrap();
        let text = render_rules(&budget).unwrap();
        let rules: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let rules = rules["groups"][0]["rules"].as_array().unwrap();
        let records: Vec<&str> = rules.iter().filter_map(|r| r["record"].as_str()).collect();
        assert_eq!(records.len(), 6, "{records:?}");
        assert!(records.contains(&"sluice:errorbudget_error_ratio:rate5m"));
        let fast = rules
            .iter()
            .find(|r| r["alert"] == "ErrorBudgetFastBurn")
            .unwrap();
        let expr = fast["expr"].as_str().unwrap();
        assert!(
            expr.contains("rate1h") && expr.contains("rate5m") && expr.contains("and"),
            "{expr}"
        );
        assert!(expr.contains("> 0.0144"), "{expr}");
    }

    #[test]
    fn status_marks_the_current_step() {
        let mut rollout: Rollout = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {}, "template": {}, "strategy": {"canary": {"steps": [{"setWeight": 20}, {"pause": {}}]}}}
        })).unwrap();
        rollout.status = serde_json::from_value(json!({
            "phase": "Paused", "currentStepIndex": 1, "stableRevision": "aaa", "canaryRevision": "bbb",
            "weights": {"stable": 80, "canary": 20, "verified": true}
        })).unwrap();
        let text = render_status(&rollout, &[], Timestamp::now());
        assert!(text.contains("done  1. setWeight 20"), "{text}");
        assert!(text.contains("  =>  2. pause until promoted"), "{text}");
        assert!(text.contains("stable 80%  canary 20% (verified)"), "{text}");
    }
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    #[test]
    fn references_name_one_object_or_are_refused() {
        let ok = |ns: &str, name: &str| Ok((ns.to_string(), name.to_string()));
        assert_eq!(
            object_reference("shop/web", None, "default"),
            ok("shop", "web")
        );
        assert_eq!(
            object_reference("web", Some("shop"), "default"),
            ok("shop", "web")
        );
        assert_eq!(
            object_reference("web", None, "default"),
            ok("default", "web")
        );
        for bad in ["", "/web", "shop/", "a/b/c", "/"] {
            assert!(object_reference(bad, None, "default").is_err(), "{bad:?}");
        }
        assert_eq!(
            pipeline_reference("pipeline/shop", Some("ops"), "default"),
            ok("ops", "shop")
        );
        assert_eq!(
            pipeline_reference("ops/shop", None, "default"),
            ok("ops", "shop")
        );
    }

    #[test]
    fn the_audit_trail_is_newest_first_with_who_and_nothing_twice() {
        use crate::api::pipeline::{HistoryAction, HistoryEntry, Release};
        use k8s_openapi::api::core::v1::ObjectReference;
        use k8s_openapi::api::events::v1::Event;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let at = |s: i64| Timestamp::from_second(1_700_000_000 + s).unwrap();
        let event = |reason: &str, note: &str, s: i64| Event {
            reason: Some(reason.into()),
            note: Some(note.into()),
            event_time: Some(MicroTime(at(s))),
            reporting_controller: Some(crate::k8s::events::REPORTING_CONTROLLER.into()),
            regarding: Some(ObjectReference::default()),
            ..Event::default()
        };
        let events = [
            event("ReleaseStarted", "releasing b", 0),
            event("AbortedByUser", "release of b aborted by alice", 60),
            event("Approved", "alice approved web:2 for stage prod", 30),
        ];
        let rollout = audit_trail(&events, &[]);
        assert_eq!(
            rollout
                .iter()
                .map(|e| (e.action.as_str(), e.by.as_str()))
                .collect::<Vec<_>>(),
            [
                ("AbortedByUser", "a person"),
                ("Approved", "a person"),
                ("ReleaseStarted", "sluice")
            ]
        );
        // A Pipeline: the approval comes from its history (with the name), not twice.
        let history = [HistoryEntry {
            stage: "prod".into(),
            release: Release {
                images: vec!["web:2".into()],
            },
            action: HistoryAction::Approved,
            time: Time(at(30)),
            by: Some("alice".into()),
            reason: Some("looked fine".into()),
            request: None,
        }];
        let pipeline = audit_trail(&events, &history);
        let approvals: Vec<&TrailEntry> =
            pipeline.iter().filter(|e| e.action == "Approved").collect();
        assert_eq!(approvals.len(), 1);
        assert_eq!(approvals[0].by, "alice");
        assert_eq!(approvals[0].what, "stage prod: web:2 (looked fine)");
        let text = render_trail("Pipeline shop/web", &pipeline, at(120));
        assert!(
            text.lines().nth(2).unwrap().contains("AbortedByUser"),
            "{text}"
        );
        assert!(render_trail("x", &[], at(0)).contains("nothing recorded"));
    }

    #[test]
    fn a_trail_names_its_kind_or_not() {
        assert_eq!(
            trail_reference("pipeline/shop/web", None, "default"),
            Ok((Some(TrailKind::Pipeline), "shop".into(), "web".into()))
        );
        assert_eq!(
            trail_reference("shop/web", None, "default"),
            Ok((None, "shop".into(), "web".into()))
        );
        assert_eq!(
            trail_reference("eb/avail", Some("prod"), "default"),
            Ok((Some(TrailKind::ErrorBudget), "prod".into(), "avail".into()))
        );
        assert!(trail_reference("rollout/a/b/c", None, "default").is_err());
    }
}
