//! `kubectl sluice`: the kubectl plugin for Sluice.
//!
//! Installed on PATH as `kubectl-sluice`, kubectl runs it for `kubectl sluice ...`.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sluice::api::errorbudget::ErrorBudget;
use sluice::api::pipeline::{Decision, Pipeline};
use sluice::api::rollout::Rollout;
use sluice::plugin::{self, RolloutIntent};
use sluice::rollout::revision::{REVISION_ANNOTATION, ROLLOUT_LABEL};

/// Watch and steer Sluice rollouts.
///
/// Commands that change something (promote, abort, retry, pause, resume) record a request in
/// the Rollout's status, never in its spec, so GitOps tools such as ArgoCD never revert them.
/// Rollouts are named NAMESPACE/NAME, or NAME with -n.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl sluice",
    bin_name = "kubectl sluice",
    version,
    max_term_width = 100
)]
struct Cli {
    /// Namespace of the Rollout when it is not written as NAMESPACE/NAME.
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Steps, weights, revisions with their pods, and analysis measurements.
    Status {
        rollout: String,
        /// Redraw every second until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
    /// Every Rollout in the namespace (or all namespaces with -A).
    List {
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Go past the current pause (or an inconclusive analysis); --full skips every remaining step.
    Promote {
        rollout: String,
        #[arg(long)]
        full: bool,
        /// Release the new revision although an ErrorBudget freezes promotions (for P0 and
        /// security fixes). Needs --reason; recorded in status and an Event.
        #[arg(long, requires = "reason")]
        override_freeze: bool,
        /// Why (recorded with --override-freeze).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Put all traffic back on stable now.
    Abort {
        rollout: String,
        /// Why (recorded in Events).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Start an aborted release again from its first step.
    Retry { rollout: String },
    /// Hold the release where it is.
    Pause { rollout: String },
    /// Lift a `kubectl sluice pause`.
    Resume { rollout: String },
    /// Roll the pod template back to an earlier revision. This edits the spec: with GitOps,
    /// revert the commit instead.
    Undo {
        rollout: String,
        /// The revision to return to (see `status`); default: the one before the current.
        #[arg(long)]
        to_revision: Option<i64>,
    },
    /// An ErrorBudget: objective, consumption, burn rates, phase, policy and targets.
    Budget {
        budget: String,
        /// Redraw every two seconds until interrupted.
        #[arg(short, long)]
        watch: bool,
        /// Print Prometheus recording and multiwindow alerting rules for this SLO instead.
        #[arg(long, conflicts_with = "watch")]
        rules: bool,
    },
    /// The audit trail of a Rollout, Pipeline or ErrorBudget, newest first: every decision by
    /// Sluice or a person, with who and why (from its Events, and a Pipeline's history).
    History {
        /// [rollout/|pipeline/|errorbudget/]NAMESPACE/NAME, or NAME with -n; without a kind,
        /// the Rollout, Pipeline or ErrorBudget of that name.
        target: String,
    },
    /// Approve the release waiting at a Pipeline stage. The apiserver records who you are
    /// and refuses you unless you may approve that stage.
    Approve {
        /// pipeline/NAME, NAMESPACE/NAME or NAME.
        pipeline: String,
        #[arg(long)]
        stage: String,
        /// Why (kept in the Pipeline's history).
        #[arg(long)]
        reason: Option<String>,
        /// An emergency: let the release in although the stage's windows keep it out now.
        /// Needs --reason; recorded.
        #[arg(long, requires = "reason")]
        override_windows: bool,
    },
    /// Reject the release waiting at a Pipeline stage: it does not enter the stage.
    Reject {
        /// pipeline/NAME, NAMESPACE/NAME or NAME.
        pipeline: String,
        #[arg(long)]
        stage: String,
        /// Why (kept in the Pipeline's history).
        #[arg(long)]
        reason: Option<String>,
    },
    /// A Pipeline: its stages left to right, with their release, phase and gates.
    Pipeline {
        /// pipeline/NAME, NAMESPACE/NAME or NAME.
        pipeline: String,
        /// Redraw every two seconds until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
    /// Print the plugin version.
    Version,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    sluice::install_crypto_provider();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Version = cli.command {
        println!("kubectl-sluice {}", sluice::VERSION);
        return Ok(());
    }
    let config = kube::Config::infer()
        .await
        .context("no usable kubeconfig (set KUBECONFIG)")?;
    let default_ns = config.default_namespace.clone();
    let client = Client::try_from(config)?;
    // Who asks, as the apiserver knows them (informational in a Rollout's intents and Events).
    let user = if cli.command.records_an_intent() {
        whoami(&client)
            .await
            .ok()
            .or_else(|| std::env::var("USER").ok())
    } else {
        None
    };
    let target = |r: &str| {
        sluice::plugin::object_reference(r, cli.namespace.as_deref(), &default_ns)
            .map_err(anyhow::Error::msg)
    };
    // `pipeline/NAME` names the kind, not a namespace.
    let pipeline_target = |r: &str| {
        sluice::plugin::pipeline_reference(r, cli.namespace.as_deref(), &default_ns)
            .map_err(anyhow::Error::msg)
    };
    match cli.command {
        Command::Status { rollout, watch } => {
            let (ns, name) = target(&rollout)?;
            loop {
                let text = status_text(&client, &ns, &name).await?;
                if watch {
                    print!("\x1b[2J\x1b[H{text}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    print!("{text}");
                    return Ok(());
                }
            }
        }
        Command::History { target } => {
            let (kind, ns, name) =
                plugin::trail_reference(&target, cli.namespace.as_deref(), &default_ns)
                    .map_err(anyhow::Error::msg)?;
            print!("{}", history(&client, kind, &ns, &name).await?);
            Ok(())
        }
        Command::List { all_namespaces } => {
            let api: Api<Rollout> = if all_namespaces {
                Api::all(client)
            } else {
                Api::namespaced(client, cli.namespace.as_deref().unwrap_or(&default_ns))
            };
            println!(
                "{:<16} {:<24} {:<12} {:<6} {:<7} {:<12} CANARY",
                "NAMESPACE", "NAME", "PHASE", "STEP", "WEIGHT", "STABLE"
            );
            for rollout in api.list(&ListParams::default()).await? {
                println!("{}", plugin::render_row(&rollout));
            }
            Ok(())
        }
        Command::Promote {
            rollout,
            full,
            override_freeze,
            reason,
        } => {
            let kind = match (override_freeze, full) {
                (true, _) => RolloutIntent::OverrideFreeze,
                (false, true) => RolloutIntent::PromoteFull,
                (false, false) => RolloutIntent::Promote,
            };
            record(&client, target(&rollout)?, kind, user, reason).await
        }
        Command::Budget {
            budget,
            watch,
            rules,
        } => {
            let (ns, name) = target(&budget)?;
            let api: Api<ErrorBudget> = Api::namespaced(client.clone(), &ns);
            loop {
                let budget = api.get_opt(&name).await?.with_context(|| {
                    format!("ErrorBudget {ns}/{name} not found (kubectl get errorbudgets -A)")
                })?;
                if rules {
                    print!(
                        "{}",
                        plugin::render_rules(&budget).map_err(anyhow::Error::msg)?
                    );
                    return Ok(());
                }
                let own = budget.namespace().unwrap_or_default();
                let mut targets = Vec::new();
                for target in &budget.spec.targets {
                    let target_ns = target.namespace.clone().unwrap_or_else(|| own.clone());
                    let rollouts: Api<Rollout> = Api::namespaced(client.clone(), &target_ns);
                    let rollout = rollouts.get_opt(&target.rollout).await?;
                    targets.push((format!("{target_ns}/{}", target.rollout), rollout));
                }
                let text = plugin::render_budget(&budget, &targets);
                if !watch {
                    print!("{text}");
                    return Ok(());
                }
                print!("\x1b[2J\x1b[H{text}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        Command::Abort { rollout, reason } => {
            record(
                &client,
                target(&rollout)?,
                RolloutIntent::Abort,
                user,
                reason,
            )
            .await
        }
        Command::Retry { rollout } => {
            record(&client, target(&rollout)?, RolloutIntent::Retry, user, None).await
        }
        Command::Pause { rollout } => {
            record(&client, target(&rollout)?, RolloutIntent::Pause, user, None).await
        }
        Command::Resume { rollout } => {
            record(
                &client,
                target(&rollout)?,
                RolloutIntent::Resume,
                user,
                None,
            )
            .await
        }
        Command::Undo {
            rollout,
            to_revision,
        } => undo(&client, target(&rollout)?, to_revision).await,
        Command::Approve {
            pipeline,
            stage,
            reason,
            override_windows,
        } => {
            decide(
                &client,
                pipeline_target(&pipeline)?,
                &stage,
                (Decision::Approved, override_windows),
                reason,
            )
            .await
        }
        Command::Reject {
            pipeline,
            stage,
            reason,
        } => {
            decide(
                &client,
                pipeline_target(&pipeline)?,
                &stage,
                (Decision::Rejected, false),
                reason,
            )
            .await
        }
        Command::Pipeline { pipeline, watch } => {
            let (ns, name) = pipeline_target(&pipeline)?;
            let api: Api<Pipeline> = Api::namespaced(client.clone(), &ns);
            loop {
                let found = api.get_opt(&name).await?.with_context(|| {
                    format!("Pipeline {ns}/{name} not found (kubectl get pipelines -A)")
                })?;
                let text = plugin::render_pipeline(&found, Timestamp::now());
                if !watch {
                    print!("{text}");
                    return Ok(());
                }
                print!("\x1b[2J\x1b[H{text}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        Command::Version => Ok(()),
    }
}

/// Who the apiserver says we are: what an approval records (and what the admission policy
/// compares it with), never a name the client picks.
impl Command {
    /// Whether the command records a request in a Rollout's status.
    fn records_an_intent(&self) -> bool {
        matches!(
            self,
            Command::Promote { .. }
                | Command::Abort { .. }
                | Command::Retry { .. }
                | Command::Pause { .. }
                | Command::Resume { .. }
        )
    }
}

/// The audit trail of `ns/name`, of `kind` or of whichever kind has that name.
async fn history(
    client: &Client,
    kind: Option<plugin::TrailKind>,
    ns: &str,
    name: &str,
) -> anyhow::Result<String> {
    use plugin::TrailKind;
    let found = |k: TrailKind| kind.is_none_or(|want| want == k);
    let (kind_name, uid, pipeline_history) = if found(TrailKind::Rollout)
        && let Some(r) = Api::<Rollout>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
    {
        ("Rollout", r.uid(), Vec::new())
    } else if found(TrailKind::Pipeline)
        && let Some(p) = Api::<Pipeline>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
    {
        let history = p.status.clone().unwrap_or_default().history;
        ("Pipeline", p.uid(), history)
    } else if found(TrailKind::ErrorBudget)
        && let Some(b) = Api::<ErrorBudget>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
    {
        ("ErrorBudget", b.uid(), Vec::new())
    } else {
        bail!("no Rollout, Pipeline or ErrorBudget {ns}/{name}");
    };
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let about: Vec<_> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some(kind_name)
                    && r.name.as_deref() == Some(name)
                    && (uid.is_none() || r.uid == uid)
            })
        })
        .collect();
    let trail = plugin::audit_trail(&about, &pipeline_history);
    Ok(plugin::render_trail(
        &format!("{kind_name} {ns}/{name}"),
        &trail,
        Timestamp::now(),
    ))
}

async fn whoami(client: &Client) -> anyhow::Result<String> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("could not ask the apiserver who you are (SelfSubjectReview)")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .context("the apiserver did not say who you are")
}

/// Records an approval or a rejection of the release waiting at `stage`.
async fn decide(
    client: &Client,
    (ns, name): (String, String),
    stage: &str,
    (decision, override_windows): (Decision, bool),
    reason: Option<String>,
) -> anyhow::Result<()> {
    let api: Api<Pipeline> = Api::namespaced(client.clone(), &ns);
    let pipeline = api
        .get_opt(&name)
        .await?
        .with_context(|| format!("Pipeline {ns}/{name} not found (kubectl get pipelines -A)"))?;
    let user = whoami(client).await?;
    let intent = plugin::new_intent(Timestamp::now(), Some(user.clone()), reason);
    let approvals = plugin::approvals_with(&pipeline, stage, (decision, override_windows), intent)
        .map_err(anyhow::Error::msg)?;
    let patch = serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Pipeline",
        "status": {"approvals": approvals},
    });
    api.patch_status(
        &name,
        &PatchParams::apply(plugin::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| match e {
        // The admission policy's message says who may approve.
        kube::Error::Api(status) => anyhow::anyhow!("{}", status.message),
        other => anyhow::Error::new(other),
    })
    .with_context(|| format!("could not record the decision on Pipeline {ns}/{name}"))?;
    let release = approvals
        .last()
        .map(|a| sluice::pipeline::plan::describe(&a.release))
        .unwrap_or_default();
    println!("{decision:?} {release} for stage {stage} of Pipeline {ns}/{name} as {user}");
    Ok(())
}

async fn get(api: &Api<Rollout>, ns: &str, name: &str) -> anyhow::Result<Rollout> {
    api.get_opt(name).await?.with_context(|| {
        format!("Rollout {ns}/{name} not found (kubectl sluice list -A shows them all)")
    })
}

async fn status_text(client: &Client, ns: &str, name: &str) -> anyhow::Result<String> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), ns);
    let rollout = get(&api, ns, name).await?;
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let owned = sets
        .list(&ListParams::default().labels(&format!("{ROLLOUT_LABEL}={name}")))
        .await?
        .items;
    Ok(plugin::render_status(&rollout, &owned, Timestamp::now()))
}

async fn record(
    client: &Client,
    (ns, name): (String, String),
    kind: RolloutIntent,
    user: Option<String>,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), &ns);
    get(&api, &ns, &name).await?;
    let intent = plugin::new_intent(Timestamp::now(), user, reason);
    let patch = plugin::intent_patch(kind, &intent);
    api.patch_status(
        &name,
        &PatchParams::apply(&kind.field_manager()).force(),
        &Patch::Apply(&patch),
    )
    .await
    .with_context(|| format!("could not record {kind:?} on Rollout {ns}/{name}"))?;
    println!(
        "{kind:?} requested for Rollout {ns}/{name}; `kubectl sluice status {ns}/{name}` shows the effect"
    );
    Ok(())
}

async fn undo(
    client: &Client,
    (ns, name): (String, String),
    to_revision: Option<i64>,
) -> anyhow::Result<()> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), &ns);
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let mut owned: Vec<(i64, ReplicaSet)> = sets
        .list(&ListParams::default().labels(&format!("{ROLLOUT_LABEL}={name}")))
        .await?
        .items
        .into_iter()
        .filter_map(|rs| {
            rs.annotations()
                .get(REVISION_ANNOTATION)
                .and_then(|r| r.parse().ok())
                .map(|r| (r, rs))
        })
        .collect();
    owned.sort_by_key(|(r, _)| *r);
    let target = match to_revision {
        Some(r) => owned.iter().find(|(rev, _)| *rev == r),
        None => owned.iter().rev().nth(1),
    };
    let Some((revision, rs)) = target else {
        bail!(
            "Rollout {ns}/{name} has no such earlier revision; `kubectl sluice status {ns}/{name}` lists them"
        );
    };
    let template = plugin::template_for_undo(rs).context("that ReplicaSet has no template")?;
    // The whole template is replaced (a merge patch would keep labels added since), with the
    // resourceVersion just read: a concurrent change makes this fail rather than be lost.
    let mut rollout = get(&api, &ns, &name).await?;
    rollout.spec.template = std::sync::Arc::new(template);
    api.replace(
        &name,
        &PostParams {
            field_manager: Some(plugin::FIELD_MANAGER.into()),
            ..PostParams::default()
        },
        &rollout,
    )
    .await
    .context("the Rollout changed meanwhile; run undo again")?;
    println!(
        "Rollout {ns}/{name} template set back to revision {revision}; a release of it starts now"
    );
    Ok(())
}
