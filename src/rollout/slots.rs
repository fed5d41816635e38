//! A bound on the Rollout reconciles at work at once, that a measurement never holds.
//!
//! Without a bound, a start with 1,000 Rollouts ran 1,000 reconciles together, each holding
//! its copies and request bodies while it waited for its turn at the apiserver: a peak of
//! 356 MiB (docs/performance.md). kube's controller can bound its reconciles, but a reconcile
//! awaiting Prometheus (up to 15 s) would keep its place, and a person's abort of another
//! Rollout would queue behind every measurement; an intent must never wait for one. Here a
//! reconcile gives its slot back while it measures and takes one again when the answers are
//! in.
//!
//! A reconcile back from measuring is served before one that has not begun. It holds what it
//! observed (its Rollout decoded, its ReplicaSets, its routes: some 30 KB), where one not
//! begun holds only a name. Served in the order asked, as before, a start with 10,000
//! Rollouts, each measuring its background analysis, had every reconcile observe, measure
//! (at once: one query answers them all) and then queue behind all those not begun yet: a
//! heap profile counted 10,946 of them holding their observations at once, a peak of 488 MB
//! of heap (about 150 MB after the start) and 550 MiB resident.
//!
//! A reconcile woken by a person's abort not yet carried out goes before both: when every
//! slot is taken, it waits for one to be given back and for the aborts that asked before
//! it, not for the reconciles back from measuring that come in while it waits. Within a
//! class, slots are handed out in the order asked.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// Which queue a reconcile waits in for a slot.
#[derive(Clone, Copy)]
enum Turn {
    /// A reconcile carrying a person's abort: served first.
    Abort,
    /// A reconcile about to begin.
    Begin,
    /// A reconcile back from measuring, holding what it observed: served before those about
    /// to begin.
    Resume,
}

/// The slots of one controller.
#[derive(Clone)]
pub struct Slots(Arc<Mutex<Queue>>);

/// The free slots, and who waits for one. A freed slot goes straight to a waiter, so while
/// anyone waits none is free.
struct Queue {
    free: usize,
    aborts: VecDeque<oneshot::Sender<Permit>>,
    resuming: VecDeque<oneshot::Sender<Permit>>,
    beginning: VecDeque<oneshot::Sender<Permit>>,
}

impl Slots {
    /// `bound` slots; `0`: no bound.
    pub fn new(bound: u16) -> Self {
        let free = match bound {
            0 => usize::MAX,
            n => usize::from(n),
        };
        Self(Arc::new(Mutex::new(Queue {
            free,
            aborts: VecDeque::new(),
            resuming: VecDeque::new(),
            beginning: VecDeque::new(),
        })))
    }

    /// Waits for a slot, in turn.
    pub async fn take(&self) -> Slot {
        self.slot(Turn::Begin).await
    }

    /// Waits for a slot, before every reconcile that carries no person's abort.
    pub async fn take_for_abort(&self) -> Slot {
        self.slot(Turn::Abort).await
    }

    async fn slot(&self, turn: Turn) -> Slot {
        Slot {
            slots: self.clone(),
            permit: Mutex::new(Some(self.permit(turn).await)),
        }
    }

    async fn permit(&self, turn: Turn) -> Permit {
        loop {
            let handed = {
                let mut queue = lock(&self.0);
                if queue.free > 0 {
                    queue.free -= 1;
                    return Permit(Some(self.0.clone()));
                }
                let (hand, handed) = oneshot::channel();
                match turn {
                    Turn::Abort => queue.aborts.push_back(hand),
                    Turn::Resume => queue.resuming.push_back(hand),
                    Turn::Begin => queue.beginning.push_back(hand),
                }
                handed
            };
            // A waiter is only ever dropped from the queue by handing it a slot; should it
            // be dropped otherwise, ask again rather than wait forever.
            if let Ok(permit) = handed.await {
                return permit;
            }
        }
    }
}

fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One slot, given back (to the next waiter, if any) when dropped. A waiter that gave up after
/// its slot was sent drops it unread, which gives it back too; one that gave up before is
/// passed over when the slot is handed on.
struct Permit(Option<Arc<Mutex<Queue>>>);

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(queue) = self.0.take() else { return };
        loop {
            // Handed over outside the lock: a permit that comes back unsent must not be
            // dropped under it (its drop would take the lock again).
            let next = {
                let mut waiting = lock(&queue);
                match waiting
                    .aborts
                    .pop_front()
                    .or_else(|| waiting.resuming.pop_front())
                    .or_else(|| waiting.beginning.pop_front())
                {
                    Some(next) => next,
                    None => {
                        waiting.free += 1;
                        return;
                    }
                }
            };
            match next.send(Permit(Some(queue.clone()))) {
                Ok(()) => return,
                // That waiter gave up: the slot goes to the next one.
                Err(mut unsent) => unsent.0 = None,
            }
        }
    }
}

/// A slot taken; given back when dropped.
pub struct Slot {
    slots: Slots,
    permit: Mutex<Option<Permit>>,
}

impl Slot {
    /// Runs `wait` with the slot given back, then takes one again, before the reconciles
    /// that have not begun.
    pub async fn without<T>(&self, wait: impl Future<Output = T>) -> T {
        self.set(None);
        let out = wait.await;
        self.set(Some(self.slots.permit(Turn::Resume).await));
        out
    }

    fn set(&self, permit: Option<Permit>) {
        let old = std::mem::replace(
            &mut *self.permit.lock().unwrap_or_else(PoisonError::into_inner),
            permit,
        );
        // Given back once the slot's own lock is released.
        drop(old);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;

    /// `future`'s output, or a failure saying `what` did not happen within 5 s.
    async fn soon<T>(future: impl Future<Output = T>, what: &str) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .unwrap_or_else(|_| panic!("not within 5 s: {what}"))
    }

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

    /// A reconcile that took a slot and measures until its answer is sent; it ends holding a
    /// slot again.
    async fn measuring(slots: &Slots) -> (JoinHandle<Slot>, oneshot::Sender<()>) {
        let measuring = slots.take().await;
        let (answer_tx, answer_rx) = oneshot::channel::<()>();
        let measurement = tokio::spawn(async move {
            measuring.without(answer_rx).await.ok();
            measuring
        });
        (measurement, answer_tx)
    }

    #[tokio::test]
    async fn a_measuring_reconcile_holds_no_slot() {
        let slots = Slots::new(1);
        let (measurement, answer_tx) = measuring(&slots).await;
        // While the measurement waits, another Rollout's abort gets the slot at once.
        let abort = soon(slots.take(), "an abort never waits for a measurement").await;
        // The measured reconcile goes on only once it has a slot again.
        answer_tx.send(()).ok();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!measurement.is_finished());
        drop(abort);
        let measuring = soon(measurement, "the measured reconcile takes the freed slot")
            .await
            .expect("no panic");
        assert!(
            is_waiting(slots.take()).await,
            "it holds the one slot again"
        );
        drop(measuring);
    }

    /// One slot, held (returned); waiting for it, a reconcile that has not begun and, having
    /// asked after it, one back from measuring.
    async fn both_waiting(slots: &Slots) -> (Slot, JoinHandle<Slot>, JoinHandle<Slot>) {
        let (measurement, answer_tx) = measuring(slots).await;
        let held = soon(slots.take(), "the slot given back while measuring").await;
        let not_begun = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        answer_tx.send(()).ok();
        tokio::time::sleep(Duration::from_millis(50)).await;
        (held, measurement, not_begun)
    }

    #[tokio::test]
    async fn a_reconcile_back_from_measuring_goes_before_one_not_begun() {
        let slots = Slots::new(1);
        let (held, measurement, not_begun) = both_waiting(&slots).await;
        drop(held);
        let measuring = soon(
            measurement,
            "the measured reconcile takes the freed slot first",
        )
        .await
        .expect("no panic");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!not_begun.is_finished(), "the one not begun waits");
        drop(measuring);
        soon(not_begun, "and then takes it")
            .await
            .expect("no panic");
    }

    #[tokio::test]
    async fn a_persons_abort_goes_before_every_other_waiter() {
        let slots = Slots::new(1);
        let (held, measurement, not_begun) = both_waiting(&slots).await;
        // Asks last of the three.
        let abort = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take_for_abort().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        let abort = soon(abort, "the abort takes the freed slot first")
            .await
            .expect("no panic");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!measurement.is_finished(), "the measured reconcile waits");
        assert!(!not_begun.is_finished(), "the one not begun waits");
        drop(abort);
        let measuring = soon(measurement, "then the measured reconcile")
            .await
            .expect("no panic");
        drop(measuring);
        soon(not_begun, "and then the one not begun")
            .await
            .expect("no panic");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let slots = Slots::new(1);
        let held = slots.take().await;
        assert!(is_waiting(slots.take()).await, "gives up after 50 ms");
        drop(held);
        let again = soon(slots.take(), "the slot came back").await;
        assert!(is_waiting(slots.take()).await, "and only once");
        drop(again);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_with_its_slot_sent_gives_it_back() {
        let slots = Slots::new(1);
        let held = slots.take().await;
        let mut waiter = Box::pin(slots.take());
        assert!(futures::poll!(&mut waiter).is_pending(), "queued");
        drop(held);
        // The slot is sent to the waiter, which gives up before it reads it.
        drop(waiter);
        let again = soon(slots.take(), "the slot came back").await;
        assert!(is_waiting(slots.take()).await, "and only once");
        drop(again);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn never_more_at_work_than_the_bound() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const BOUND: usize = 3;
        let slots = Slots::new(BOUND as u16);
        let (at_work, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let reconciles: Vec<_> = (0..200u64)
            .map(|i| {
                let (slots, at_work, most) = (slots.clone(), at_work.clone(), most.clone());
                // Counted at work from taking a slot to giving it back.
                let work = move || {
                    let (at_work, most) = (at_work.clone(), most.clone());
                    async move {
                        most.fetch_max(
                            at_work.fetch_add(1, Ordering::SeqCst) + 1,
                            Ordering::SeqCst,
                        );
                        tokio::task::yield_now().await;
                        at_work.fetch_sub(1, Ordering::SeqCst);
                    }
                };
                tokio::spawn(async move {
                    // A third are aborts, and some of those give up waiting for a slot.
                    let slot = if i % 3 == 0 {
                        let Ok(slot) = tokio::time::timeout(
                            Duration::from_millis(i % 4),
                            slots.take_for_abort(),
                        )
                        .await
                        else {
                            return;
                        };
                        slot
                    } else {
                        slots.take().await
                    };
                    work().await;
                    if i % 2 == 0 {
                        // Some measure, and some of those give up waiting to resume.
                        let resumed = tokio::time::timeout(
                            Duration::from_millis(i % 7),
                            slot.without(tokio::time::sleep(Duration::from_millis(i % 5))),
                        )
                        .await;
                        if resumed.is_ok() {
                            work().await;
                        }
                    }
                })
            })
            .collect();
        for reconcile in reconciles {
            reconcile.await.expect("no panic");
        }
        assert!(most.load(Ordering::SeqCst) <= BOUND);
        // Every slot came back, whoever gave up on the way.
        let all = soon(
            futures::future::join_all((0..BOUND).map(|_| slots.take())),
            "every slot came back",
        )
        .await;
        assert!(is_waiting(slots.take()).await);
        drop(all);
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
