//! The ErrorBudget controller and the policy the Rollout controller applies, run in-process
//! against the local cluster, Prometheus and the traffic simulator. `make test` runs these
//! with `--ignored`.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::json;
use sluice::api::errorbudget::{BudgetAction, BudgetPhase, ErrorBudget, ErrorBudgetStatus};
use sluice::api::rollout::{Rollout, RolloutPhase};
use support::*;

async fn budget_status(api: &Api<ErrorBudget>, name: &str) -> Option<ErrorBudgetStatus> {
    api.get(name).await.ok()?.status
}

async fn phase_is(
    api: &Api<ErrorBudget>,
    name: &str,
    phase: BudgetPhase,
    within: Duration,
) -> ErrorBudgetStatus {
    wait_for(&format!("{name} {phase:?}"), within, || async {
        let s = budget_status(api, name).await?;
        (s.phase == Some(phase)).then_some(s)
    })
    .await
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn the_budget_freezes_releases_an_override_lets_one_through_and_exhaustion_rolls_it_back() {
    let (ns, _controllers) = routed_namespace("budget").await;
    let steps = json!([{"setWeight": 20}, {"pause": {}}]);
    let (rollouts, stable) = healthy_rollout(&ns, steps).await;

    let (errors, total) = ratio_queries(&ns.name);
    create(&ns, &budget(&ns.name, "avail", &errors, &total, json!({})))
        .await
        .unwrap();
    let budgets: Api<ErrorBudget> = Api::namespaced(ns.client.clone(), &ns.name);
    // Healthy traffic: Healthy, with the figure Prometheus gives for the same ratio.
    let healthy_budget = phase_is(
        &budgets,
        "avail",
        BudgetPhase::Healthy,
        Duration::from_secs(60),
    )
    .await;
    let consumed = healthy_budget.consumed_percent.unwrap();
    assert!(consumed < 1.0, "no errors yet, {consumed}% consumed");
    assert!(healthy_budget.remaining_percent.unwrap() > 99.0);
    let queries = healthy_budget.queries.unwrap();
    println!("MEASURE Prometheus queries per evaluation: {queries}");
    // The namespace's traffic is seconds old: the window fills as it runs.
    let coverage = healthy_budget.window_coverage.expect("window coverage");
    assert!((0.0..=100.0).contains(&coverage), "{coverage}%");
    let filled = wait_for(
        "half the window covered",
        Duration::from_secs(60),
        || async {
            let c = budget_status(&budgets, "avail").await?.window_coverage?;
            (c >= 50.0).then_some(c)
        },
    )
    .await;
    println!("MEASURE window coverage: {coverage}% at the first evaluation, then {filled}%");

    // 8.7% errors against a 10% budget: 87% consumed once the window fills. Frozen.
    fail_pods(&ns, &stable, "0.087").await;
    let frozen = phase_is(
        &budgets,
        "avail",
        BudgetPhase::Frozen,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(frozen.active_action, Some(BudgetAction::FreezePromotions));
    let consumed = frozen.consumed_percent.unwrap();
    let measured = consumed_in_prometheus(&errors, &total).await.unwrap() * 100.0;
    assert!(
        (consumed - measured).abs() < 10.0,
        "status says {consumed}%, Prometheus {measured}%"
    );

    // A new template stays on stable while frozen.
    set_template(&rollouts, "web:2", json!({})).await;
    let held = wait_for("the release held", Duration::from_secs(30), || async {
        let s = status(&rollouts).await?;
        (s.phase == Some(RolloutPhase::Paused) && s.canary_revision.is_none()).then_some(s)
    })
    .await;
    let message = held.message.unwrap_or_default();
    assert!(message.contains(&format!("{}/avail", ns.name)), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status(&rollouts).await.unwrap().canary_revision, None);
    assert_canary_weight(&ns, 0).await;

    // A person releases it anyway, with a recorded reason.
    plugin(&[
        "promote",
        "--override-freeze",
        "--reason",
        "P0 fix",
        &format!("{}/web", ns.name),
    ]);
    let released = wait_for("the override", Duration::from_secs(30), || async {
        let s = status(&rollouts).await?;
        s.canary_revision.is_some().then_some(s)
    })
    .await;
    let record = released.freeze_override.expect("the override is recorded");
    assert_eq!(record.reason.as_deref(), Some("P0 fix"));
    wait_for("20% on the canary", Duration::from_secs(60), || async {
        (canary_weight(&ns).await? == 20).then_some(())
    })
    .await;

    // Errors climb past 95%: the release in flight is rolled back. Measured from the moment
    // Prometheus's own figure crosses 95% to the route at 100% stable.
    fail_pods(&ns, &stable, "0.5").await;
    let crossed = past_95_percent(&errors, &total).await;
    while canary_weight(&ns).await != Some(0) {
        assert!(
            crossed.elapsed() < Duration::from_secs(30),
            "not rolled back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "MEASURE 95% crossed in Prometheus -> canary at 0%: {:?}",
        crossed.elapsed()
    );
    let aborted = status(&rollouts).await.unwrap();
    assert!(aborted.aborted_at.is_some());
    assert_eq!(aborted.phase, Some(RolloutPhase::Degraded));
    assert!(aborted.message.unwrap_or_default().contains("avail"));
    expect_events(
        &ns,
        &[
            "FrozenByErrorBudget",
            "FreezeOverridden",
            "AbortedByErrorBudget",
            "PhaseChanged",
        ],
    )
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_budget_that_cannot_be_judged_is_never_healthy_and_keeps_its_figures() {
    let ns = TestNamespace::new("blind").await;
    let mut prometheus = Outage::start(0).await;
    let _controllers = start_controllers(&ns.name, prometheus.url()).await;
    routing(&ns).await;
    let steps = json!([{"setWeight": 20}, {"pause": {}}]);
    healthy_rollout(&ns, steps).await;
    let budgets: Api<ErrorBudget> = Api::namespaced(ns.client.clone(), &ns.name);
    let (errors, total) = ratio_queries(&ns.name);
    create(&ns, &budget(&ns.name, "avail", &errors, &total, json!({})))
        .await
        .unwrap();
    // No traffic at all in the namespace the queries select.
    let (quiet_errors, quiet_total) = ratio_queries("nowhere");
    create(
        &ns,
        &budget(&ns.name, "quiet", &quiet_errors, &quiet_total, json!({})),
    )
    .await
    .unwrap();
    // +Inf and NaN answers.
    create(
        &ns,
        &budget(
            &ns.name,
            "infinite",
            "vector(0)",
            "vector(1)/vector(0)",
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &ns,
        &budget(
            &ns.name,
            "nan",
            "vector(0)/vector(0)",
            "vector(1)",
            json!({}),
        ),
    )
    .await
    .unwrap();
    // A target that does not exist is named.
    create(
        &ns,
        &budget(
            &ns.name,
            "orphan",
            &errors,
            &total,
            json!({"targets": [{"rollout": "gone"}]}),
        ),
    )
    .await
    .unwrap();

    phase_is(
        &budgets,
        "avail",
        BudgetPhase::Healthy,
        Duration::from_secs(60),
    )
    .await;
    phase_is(
        &budgets,
        "quiet",
        BudgetPhase::InsufficientData,
        Duration::from_secs(30),
    )
    .await;
    let infinite = phase_is(
        &budgets,
        "infinite",
        BudgetPhase::Unknown,
        Duration::from_secs(30),
    )
    .await;
    assert!(infinite.message.unwrap_or_default().contains("non-finite"));
    let nan = phase_is(
        &budgets,
        "nan",
        BudgetPhase::Unknown,
        Duration::from_secs(30),
    )
    .await;
    assert!(nan.message.unwrap_or_default().contains("non-finite"));
    let orphan = wait_for(
        "the missing target named",
        Duration::from_secs(30),
        || async {
            let s = budget_status(&budgets, "orphan").await?;
            s.conditions
                .iter()
                .find(|c| c.type_ == "TargetsFound" && c.status == "False")
                .map(|c| c.message.clone())
        },
    )
    .await;
    assert!(orphan.contains("gone"), "{orphan}");

    // Prometheus goes away: Unknown, the last figures kept and marked stale.
    prometheus.stop();
    let blind = phase_is(
        &budgets,
        "avail",
        BudgetPhase::Unknown,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(blind.stale, Some(true));
    assert!(
        blind.consumed_percent.is_some(),
        "the last good figures stay"
    );
    assert!(blind.last_evaluation_time.is_some());
    assert!(blind.message.unwrap_or_default().contains("figures from"));
    assert_eq!(blind.active_action, None, "an outage starts nothing");
    // ...and comes back: Healthy again.
    let _prometheus = Outage::start(prometheus.port).await;
    phase_is(
        &budgets,
        "avail",
        BudgetPhase::Healthy,
        Duration::from_secs(60),
    )
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn the_canary_is_judged_by_its_own_burn_rate_not_the_diluted_service_wide_one() {
    let (ns, _controllers) = routed_namespace("burn").await;
    // A 99.9% objective: the canary at 5% errors burns 50 times too fast, but at 10% of the
    // traffic the service as a whole burns about 5, under the 14.4 page threshold.
    let (errors, total) = ratio_queries(&ns.name);
    let notify_only = json!({"objective": "99.9", "targets": [],
                             "policy": [{"whenConsumed": 100, "action": "Notify"}]});
    create(
        &ns,
        &budget(&ns.name, "avail", &errors, &total, notify_only),
    )
    .await
    .unwrap();
    let analysis = json!({"interval": "3s", "failureLimit": 0, "inconclusiveLimit": 30,
        "metrics": [{"name": "canary-burn",
                     "errorBudget": {"name": "avail", "maxBurnRate": 14.4, "window": "20s"}}]});
    let steps = json!([{"setWeight": 10}, {"pause": {}}]);
    create(
        &ns,
        &WebRollout::canary(&ns.name, steps)
            .analysis(analysis)
            .json(),
    )
    .await
    .unwrap();
    let rollouts: Api<Rollout> = Api::namespaced(ns.client.clone(), &ns.name);
    healthy(&rollouts).await;
    set_template(
        &rollouts,
        "web:2",
        json!({"sim.sluice.dev/error-rate": "0.05"}),
    )
    .await;
    wait_for("10% on the canary", Duration::from_secs(60), || async {
        (canary_weight(&ns).await? == 10).then_some(())
    })
    .await;
    let at_ten = Instant::now();
    let aborted = wait_for(
        "the canary failed on its burn rate",
        Duration::from_secs(90),
        || async {
            let s = status(&rollouts).await?;
            s.aborted_at.is_some().then_some(s)
        },
    )
    .await;
    println!(
        "MEASURE canary at 10% -> aborted on its own burn rate: {:?}",
        at_ten.elapsed()
    );
    let run = aborted
        .analysis_runs
        .iter()
        .find(|r| r.name == "background")
        .expect("the background run");
    let failed = run.metrics[0]
        .measurements
        .iter()
        .rev()
        .find(|m| m.phase == sluice::api::analysis::MeasurementPhase::Failed)
        .expect("a failed measurement");
    let value = failed.value.clone().unwrap_or_default();
    let burn: f64 = value
        .trim_start_matches('[')
        .split(',')
        .next()
        .and_then(|b| b.trim().parse().ok())
        .unwrap_or_else(|| panic!("a burn rate in {value}"));
    // About 50 once the window is full; early measurements over few requests vary.
    println!("MEASURE the canary's own burn rate when it failed: {burn}");
    assert!(
        burn > 14.4 && burn < 150.0,
        "the canary's own burn {burn} is over the threshold"
    );
    // The service-wide burn over the same short window stayed under the threshold.
    let budgets: Api<ErrorBudget> = Api::namespaced(ns.client.clone(), &ns.name);
    let service = budget_status(&budgets, "avail").await.unwrap();
    let service_burn = service.burn_rates.get("10s").copied().unwrap_or(f64::MAX);
    assert!(
        service_burn < 14.4,
        "service-wide burn {service_burn} diluted below 14.4"
    );
    assert_canary_weight(&ns, 0).await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn the_printed_rules_pass_promtool() {
    let ns = TestNamespace::new("rules").await;
    let (errors, total) = ratio_queries(&ns.name);
    let thirty_days = json!({"objective": "99.9", "window": "30d", "burnRateWindows": []});
    create(
        &ns,
        &budget(&ns.name, "avail", &errors, &total, thirty_days),
    )
    .await
    .unwrap();
    let rules = plugin(&["budget", "--rules", &format!("{}/avail", ns.name)]);
    let file = std::env::temp_dir().join(format!("sluice-rules-{}.yaml", ns.name));
    std::fs::write(&file, &rules).unwrap();
    // promtool ships in Debian's prometheus package, which the local cluster installs.
    let checked = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        checked.status.success(),
        "promtool refused the rules: {}\n{}\n{rules}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(said.contains("SUCCESS: 9 rules found"), "{said}");
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_completed_release_is_rolled_back_without_a_spec_change_and_stays_there() {
    let (ns, _controllers) = routed_namespace("rollback").await;
    let steps = json!([{"setWeight": 50}]);
    let (rollouts, first) = healthy_rollout(&ns, steps).await;
    set_template(&rollouts, "web:2", json!({})).await;
    let second = wait_for("web:2 released", Duration::from_secs(90), || async {
        let s = status(&rollouts).await?;
        (s.phase == Some(RolloutPhase::Healthy) && s.stable_revision.as_deref() != Some(&first))
            .then_some(s.stable_revision?)
    })
    .await;
    // The revision before it is scaled down (scaleDownDelay 2s), as it would be an hour on.
    wait_for("web:1 scaled down", Duration::from_secs(30), || async {
        let s = status(&rollouts).await?;
        (s.available_replicas == Some(4) && s.replicas == Some(4)).then_some(())
    })
    .await;
    let generation = rollouts.get("web").await.unwrap().metadata.generation;

    // The new revision burns the budget: past the Rollback threshold within the window.
    let (errors, total) = ratio_queries(&ns.name);
    let policy = json!({"policy": [
        {"whenConsumed": 80, "action": "FreezePromotions"},
        {"whenConsumed": 95, "action": "Rollback", "rollbackWindow": "10m"}
    ]});
    create(&ns, &budget(&ns.name, "avail", &errors, &total, policy))
        .await
        .unwrap();
    fail_pods(&ns, &second, "0.5").await;
    let crossed = past_95_percent(&errors, &total).await;
    wait_for("stable back on web:1", Duration::from_secs(60), || async {
        (stable_subset(&ns).await? == first).then_some(())
    })
    .await;
    println!(
        "MEASURE 95% crossed in Prometheus -> completed release rolled back (traffic on the previous revision): {:?}",
        crossed.elapsed()
    );
    let rolled_back = status(&rollouts).await.unwrap();
    assert_eq!(rolled_back.stable_revision.as_deref(), Some(first.as_str()));
    assert_eq!(rolled_back.phase, Some(RolloutPhase::Degraded));
    let record = rolled_back
        .budget_rollback
        .expect("the rollback is recorded");
    assert_eq!(
        (record.revision.as_str(), record.to.as_str()),
        (second.as_str(), first.as_str())
    );
    assert!(record.budget.ends_with("/avail"), "{}", record.budget);
    // GitOps owns the spec: it is untouched.
    let rollout = rollouts.get("web").await.unwrap();
    assert_eq!(rollout.metadata.generation, generation);
    assert_eq!(
        rollout.spec.template.spec.as_ref().unwrap().containers[0]
            .image
            .as_deref(),
        Some("web:2")
    );
    // Events on both objects (written just after the writes they report).
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        "RolledBackByErrorBudget on the Rollout and the ErrorBudget",
        Duration::from_secs(15),
        || async {
            let kinds: Vec<String> = events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("RolledBackByErrorBudget"))
                .filter_map(|e| e.regarding.and_then(|r| r.kind))
                .collect();
            ["Rollout", "ErrorBudget"]
                .iter()
                .all(|kind| kinds.iter().any(|k| k == kind))
                .then_some(())
        },
    )
    .await;

    let view = plugin(&["budget", &format!("{}/avail", ns.name)]);
    assert!(
        view.contains(&format!(
            "{}/web: rolled back from {second} to {first}",
            ns.name
        )),
        "{view}"
    );

    // No flapping: with the budget gone (which also lifts any freeze), web:2 is not released
    // again by itself.
    let budgets: Api<ErrorBudget> = Api::namespaced(ns.client.clone(), &ns.name);
    budgets.delete("avail", &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = status(&rollouts).await.unwrap();
    assert_eq!(after.stable_revision.as_deref(), Some(first.as_str()));
    assert_eq!(after.canary_revision, None);
    assert_eq!(stable_subset(&ns).await.as_deref(), Some(first.as_str()));

    // A person retries: web:2 is released again, from web:1.
    plugin(&["retry", &format!("{}/web", ns.name)]);
    wait_for("web:2 released again", Duration::from_secs(30), || async {
        let s = status(&rollouts).await?;
        // Releasing it, or (one step only) already done.
        let releasing = s.canary_revision.as_deref() == Some(second.as_str())
            || s.stable_revision.as_deref() == Some(second.as_str());
        (releasing && s.budget_rollback.is_none()).then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs the local cluster: make test"]
async fn a_freeze_survives_an_operator_restart_and_deleting_the_budget_lifts_it() {
    let (ns, controllers) = routed_namespace("thaw").await;
    let steps = json!([{"setWeight": 20}, {"pause": {}}]);
    let (rollouts, stable) = healthy_rollout(&ns, steps).await;
    let (errors, total) = ratio_queries(&ns.name);
    let policy = json!({"policy": [{"whenConsumed": 10, "action": "FreezePromotions"}]});
    create(&ns, &budget(&ns.name, "avail", &errors, &total, policy))
        .await
        .unwrap();
    fail_pods(&ns, &stable, "0.05").await;
    let budgets: Api<ErrorBudget> = Api::namespaced(ns.client.clone(), &ns.name);
    phase_is(
        &budgets,
        "avail",
        BudgetPhase::Frozen,
        Duration::from_secs(90),
    )
    .await;
    set_template(&rollouts, "web:2", json!({})).await;
    let held = wait_for("the release held", Duration::from_secs(30), || async {
        let s = status(&rollouts).await?;
        (s.phase == Some(RolloutPhase::Paused) && s.canary_revision.is_none()).then_some(s)
    })
    .await;
    let frozen_since = |s: &sluice::api::rollout::RolloutStatus| {
        s.pause_conditions
            .iter()
            .find(|c| c.reason == sluice::api::rollout::PauseReason::BudgetFreeze)
            .map(|c| c.start_time.clone())
    };
    let since = frozen_since(&held).expect("a BudgetFreeze pause");

    // The operator goes away and comes back: the hold and its start time are kept.
    controllers.send_replace(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _controllers = start_controllers(&ns.name, prometheus_url()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = status(&rollouts).await.unwrap();
    assert_eq!(after.canary_revision, None, "still held after a restart");
    assert_eq!(after.phase, Some(RolloutPhase::Paused));
    assert_eq!(
        frozen_since(&after),
        Some(since),
        "the freeze keeps its start"
    );
    assert_canary_weight(&ns, 0).await;

    // The budget is deleted while it freezes: the freeze goes with it.
    let deleted = Instant::now();
    budgets.delete("avail", &Default::default()).await.unwrap();
    wait_for("the release starts", Duration::from_secs(30), || async {
        let s = status(&rollouts).await?;
        s.canary_revision.is_some().then_some(())
    })
    .await;
    println!(
        "MEASURE budget deleted -> held release starts: {:?}",
        deleted.elapsed()
    );
    ns.delete().await;
}
