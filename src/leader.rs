//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never act at once.
//!
//! The decision is a pure function of the Lease and the clock; the loop around it reads the
//! Lease, decides, and writes it back with optimistic concurrency (a `replace` carrying the
//! `resourceVersion` it read), so two candidates racing for an expired Lease cannot both win.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::fence::{self, Fence};

/// Settings of the elector.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's identity, unique among candidates (pod name plus a random suffix).
    pub identity: String,
    /// How long a Lease stays valid without renewal; a standby takes over after it lapses.
    pub lease_duration: Duration,
    /// How often the leader renews and a standby retries.
    pub retry_period: Duration,
}

/// What this replica should do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds a valid Lease: take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds a valid Lease.
    Standby { holder: String },
}

/// Decides from the Lease as read (`None`: no Lease yet) and the current time.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let expires = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| {
            t.0 + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)))
        });
    match expires {
        Some(expires) if expires > now => Decision::Standby {
            holder: holder.to_string(),
        },
        _ => Decision::Acquire,
    }
}

/// The Lease spec to write for a decision to acquire or renew.
pub fn next_spec(
    current: Option<&LeaseSpec>,
    decision: &Decision,
    settings: &LeaseSettings,
    now: Timestamp,
) -> LeaseSpec {
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    let duration_secs = i32::try_from(settings.lease_duration.as_secs()).unwrap_or(i32::MAX);
    match decision {
        Decision::Renew => LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(duration_secs),
            ..current.cloned().unwrap_or_default()
        },
        _ => LeaseSpec {
            holder_identity: Some(settings.identity.clone()),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if current.is_some() {
                transitions + 1
            } else {
                0
            }),
            ..LeaseSpec::default()
        },
    }
}

/// One round: read, decide, write. Returns whether this replica holds the Lease afterwards.
pub async fn try_lead(api: &Api<Lease>, settings: &LeaseSettings) -> kube::Result<bool> {
    let current = api.get_opt(&settings.name).await?;
    let now = Timestamp::now();
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let decision = decide(spec, &settings.identity, now);
    if let Decision::Standby { .. } = decision {
        return Ok(false);
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            namespace: Some(settings.namespace.clone()),
            resource_version: current
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(next_spec(spec, &decision, settings, now)),
    };
    let written = match current {
        None => api.create(&PostParams::default(), &lease).await,
        Some(_) => {
            api.replace(&settings.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(_) => Ok(true),
        // Another candidate wrote first: it wins this round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (on shutdown) so a standby takes over at once instead of waiting for
/// it to lapse.
pub async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> kube::Result<()> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(());
    };
    let held = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        == Some(&settings.identity);
    if !held {
        return Ok(());
    }
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
    }
    api.replace(&settings.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

/// Campaigns until `shutdown`; publishes leadership on `leading`. Once it has led, losing the
/// Lease ends the loop with an error: the process must stop acting at once (and restart).
pub async fn campaign(
    client: Client,
    settings: LeaseSettings,
    fence: Arc<Fence>,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut renewed = std::time::Instant::now();
    loop {
        let was_leading = *leading.borrow();
        let started = std::time::Instant::now();
        let round = try_lead(&api, &settings).await;
        if matches!(round, Ok(true)) {
            renewed = started;
            fence.open_until(started + fence::write_window(settings.lease_duration));
        } else if round.is_ok() {
            fence.close();
        }
        match round {
            Ok(true) if !was_leading => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "became leader");
                leading.send_replace(true);
            }
            Ok(true) => {}
            Ok(false) if was_leading => {
                leading.send_replace(false);
                anyhow::bail!(
                    "lost the leader Lease {}/{}",
                    settings.namespace,
                    settings.name
                );
            }
            Ok(false) => {
                tracing::debug!(lease = %settings.name, "standing by: another replica leads")
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
                // One failed round is not a lost Lease: give up only when it may have lapsed
                // (two thirds of its duration without a renewal), before a standby can take it.
                if was_leading && renewed.elapsed() >= settings.lease_duration * 2 / 3 {
                    fence.close();
                    leading.send_replace(false);
                    anyhow::bail!(
                        "could not renew the leader Lease for {:?}: {e}",
                        renewed.elapsed()
                    );
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.retry_period) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    if *leading.borrow() {
        // Nothing may be written once a standby can take over.
        fence.close();
        if let Err(e) = release(&api, &settings).await {
            tracing::warn!(error = %e, "could not release the leader Lease; it will lapse");
        }
        leading.send_replace(false);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LeaseSettings {
        LeaseSettings {
            name: "sluice".into(),
            namespace: "sluice-system".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }

    fn held_by(holder: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            acquire_time: Some(MicroTime(renewed)),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let fresh = now - SignedDuration::from_secs(5);
        let stale = now - SignedDuration::from_secs(16);
        let cases = [
            (None, Decision::Acquire),
            (Some(LeaseSpec::default()), Decision::Acquire),
            (Some(held_by("me", stale)), Decision::Renew),
            (
                Some(held_by("other", fresh)),
                Decision::Standby {
                    holder: "other".into(),
                },
            ),
            (Some(held_by("other", stale)), Decision::Acquire),
            (Some(held_by("", fresh)), Decision::Acquire),
        ];
        for (lease, expected) in cases {
            assert_eq!(decide(lease.as_ref(), "me", now), expected, "{lease:?}");
        }
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let old = held_by("other", now - SignedDuration::from_secs(60));
        let taken = next_spec(Some(&old), &Decision::Acquire, &settings(), now);
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.renew_time, Some(MicroTime(now)));

        let mine = held_by("me", now - SignedDuration::from_secs(2));
        let renewed = next_spec(Some(&mine), &Decision::Renew, &settings(), now);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, mine.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(now)));

        let first = next_spec(None, &Decision::Acquire, &settings(), now);
        assert_eq!(first.lease_transitions, Some(0));
    }
}
