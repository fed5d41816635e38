//! A bound on the Rollout reconciles at work at once, that a measurement never holds.
//!
//! Without a bound, a start with 1,000 Rollouts ran 1,000 reconciles together, each holding
//! its copies and request bodies while it waited for its turn at the apiserver: a peak of
//! 356 MiB (docs/performance.md). kube's controller can bound its reconciles, but a reconcile
//! awaiting Prometheus (up to 15 s) would keep its place, and a person's abort of another
//! Rollout would queue behind every measurement; an intent must never wait for one. Here a
//! reconcile gives its slot back while it measures and takes one again when the answers are
//! in. Slots are handed out in the order they were asked for.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots of one controller.
#[derive(Clone)]
pub struct Slots(Arc<Semaphore>);

impl Slots {
    /// `bound` slots; `0`: no bound.
    pub fn new(bound: u16) -> Self {
        let permits = match bound {
            0 => Semaphore::MAX_PERMITS,
            n => usize::from(n),
        };
        Self(Arc::new(Semaphore::new(permits)))
    }

    /// Waits for a slot, in turn.
    pub async fn take(&self) -> Slot {
        Slot {
            slots: self.0.clone(),
            permit: Mutex::new(self.permit().await),
        }
    }

    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        // Err only once closed, and these slots are never closed.
        self.0.clone().acquire_owned().await.ok()
    }
}

/// A slot taken; given back when dropped.
pub struct Slot {
    slots: Arc<Semaphore>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Slot {
    /// Runs `wait` with the slot given back, then takes one again (in turn).
    pub async fn without<T>(&self, wait: impl Future<Output = T>) -> T {
        self.set(None);
        let out = wait.await;
        self.set(Slots(self.slots.clone()).permit().await);
        out
    }

    fn set(&self, permit: Option<OwnedSemaphorePermit>) {
        *self.permit.lock().unwrap_or_else(PoisonError::into_inner) = permit;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn is_waiting<T>(future: impl Future<Output = T>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), future)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_reconcile_beyond_the_bound_waits_until_one_ends() {
        let slots = Slots::new(2);
        let first = slots.take().await;
        let _second = slots.take().await;
        assert!(is_waiting(slots.take()).await);
        drop(first);
        assert!(!is_waiting(slots.take()).await);
    }

    #[tokio::test]
    async fn a_measuring_reconcile_holds_no_slot() {
        let slots = Slots::new(1);
        let measuring = slots.take().await;
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel::<()>();
        let measurement = tokio::spawn(async move {
            measuring.without(answer_rx).await.ok();
            measuring
        });
        // While the measurement waits, another Rollout's abort gets the slot at once.
        let abort = tokio::time::timeout(Duration::from_secs(5), slots.take())
            .await
            .expect("an abort never waits for a measurement");
        // The measured reconcile goes on only once it has a slot again.
        answer_tx.send(()).ok();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!measurement.is_finished());
        drop(abort);
        let measuring = tokio::time::timeout(Duration::from_secs(5), measurement)
            .await
            .expect("the measured reconcile takes the freed slot")
            .expect("no panic");
        assert!(
            is_waiting(slots.take()).await,
            "it holds the one slot again"
        );
        drop(measuring);
    }

    #[tokio::test]
    async fn zero_means_no_bound() {
        let slots = Slots::new(0);
        let mut held = Vec::new();
        for _ in 0..1_000 {
            held.push(slots.take().await);
        }
        assert!(!is_waiting(slots.take()).await);
    }
}
