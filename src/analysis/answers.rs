//! Identical Prometheus queries share one answer. When many Rollouts measure the same
//! rendered query (a template with no per-release variable, such as a service-wide error
//! rate), Prometheus is asked once: the others wait for that answer while it is in flight,
//! and take it afterwards while it is younger than their own interval, the freshness an
//! analysis already works at (it measures once per interval).
//!
//! A failed answer is shared only while in flight: the next measurement asks again, so an
//! outage is not remembered for longer than it lasts.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::condition::MeasuredValue;
use super::run::ProviderFailure;

pub type Answer = Result<MeasuredValue, ProviderFailure>;

/// Queries remembered at most. Past it, the expired ones go, and if that is not enough the
/// table starts again: most queries name one release and are asked by one Rollout only.
const LIMIT: usize = 10_000;

/// How a query was answered, for the operator's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// Sent to Prometheus.
    Asked,
    /// Taken from an identical query, in flight or recent.
    Shared,
}

struct Entry {
    answer: Shared<BoxFuture<'static, Answer>>,
    asked: Instant,
    /// The window of the measurement that asked: how long the entry is worth keeping.
    window: Duration,
}

/// Whether an earlier asking of the same query answers a new one: always while in flight
/// (asking twice gains nothing), then only a success younger than the asker's window.
fn reusable(outcome: Option<bool>, age: Duration, window: Duration) -> bool {
    match outcome {
        None => true,
        Some(succeeded) => succeeded && age < window,
    }
}

#[derive(Default)]
pub struct SharedAnswers {
    entries: Mutex<HashMap<String, Entry>>,
}

impl SharedAnswers {
    /// The answer to the query `key` (everything that shapes it: Prometheus, credentials,
    /// timeout and text): an identical query's in flight or younger than `window`, else the
    /// one `ask` gives.
    pub async fn answer(
        &self,
        key: String,
        window: Duration,
        ask: impl Future<Output = Answer> + Send + 'static,
    ) -> (Answer, Answered) {
        let (answer, how) = {
            let mut entries = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            match entries.get(&key) {
                Some(e)
                    if reusable(
                        e.answer.peek().map(Result::is_ok),
                        now.saturating_duration_since(e.asked),
                        window,
                    ) =>
                {
                    (e.answer.clone(), Answered::Shared)
                }
                _ => {
                    if entries.len() >= LIMIT {
                        entries.retain(|_, e| {
                            reusable(
                                e.answer.peek().map(Result::is_ok),
                                now.saturating_duration_since(e.asked),
                                e.window,
                            )
                        });
                        if entries.len() >= LIMIT {
                            entries.clear();
                        }
                    }
                    let answer = ask.boxed().shared();
                    entries.insert(
                        key,
                        Entry {
                            answer: answer.clone(),
                            asked: now,
                            window,
                        },
                    );
                    (answer, Answered::Asked)
                }
            }
        };
        (answer.await, how)
    }

    /// Queries remembered now (for tests and the benchmark).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn what_an_earlier_asking_is_worth() {
        // (outcome: None in flight, Some(true) succeeded, Some(false) failed), age, window
        let table = [
            (None, 0, 0, true),
            (None, 30, 10, true),
            (Some(true), 0, 10, true),
            (Some(true), 9, 10, true),
            (Some(true), 10, 10, false),
            (Some(true), 0, 0, false),
            (Some(false), 0, 10, false),
        ];
        for (outcome, age, window, expected) in table {
            assert_eq!(
                reusable(outcome, SECOND * age, SECOND * window),
                expected,
                "{outcome:?} age {age}s window {window}s"
            );
        }
    }

    /// An `ask` that counts how often it runs and answers `value` after `delay`.
    fn asking(
        asked: &Arc<AtomicUsize>,
        value: Answer,
        delay: Duration,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let asked = asked.clone();
        async move {
            asked.fetch_add(1, Ordering::SeqCst);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            value
        }
    }

    #[tokio::test]
    async fn a_thousand_identical_queries_at_once_ask_once() {
        let answers = Arc::new(SharedAnswers::default());
        let asked = Arc::new(AtomicUsize::new(0));
        let waiting = (0..1000).map(|_| {
            let answers = answers.clone();
            let ask = asking(&asked, Ok(MeasuredValue::Number(0.5)), SECOND / 10);
            async move { answers.answer("q".into(), Duration::ZERO, ask).await }
        });
        let results = futures::future::join_all(waiting).await;
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert!(
            results
                .iter()
                .all(|(a, _)| a == &Ok(MeasuredValue::Number(0.5)))
        );
        let shared = results
            .iter()
            .filter(|(_, how)| *how == Answered::Shared)
            .count();
        assert_eq!(shared, 999);
    }

    #[tokio::test]
    async fn a_success_is_shared_for_the_askers_window_and_a_failure_not_at_all() {
        let answers = SharedAnswers::default();
        let asked = Arc::new(AtomicUsize::new(0));
        let ok = || Ok(MeasuredValue::Number(1.0));
        let window = 60 * SECOND;
        let quick = Duration::ZERO;
        let _ = answers
            .answer("q".into(), window, asking(&asked, ok(), quick))
            .await;
        let (_, how) = answers
            .answer("q".into(), window, asking(&asked, ok(), quick))
            .await;
        assert_eq!((how, asked.load(Ordering::SeqCst)), (Answered::Shared, 1));
        // An asker that wants a fresher answer than the one kept asks again.
        let (_, how) = answers
            .answer("q".into(), Duration::ZERO, asking(&asked, ok(), quick))
            .await;
        assert_eq!((how, asked.load(Ordering::SeqCst)), (Answered::Asked, 2));
        // Another query is never answered by this one.
        let (_, how) = answers
            .answer("other".into(), window, asking(&asked, ok(), quick))
            .await;
        assert_eq!((how, asked.load(Ordering::SeqCst)), (Answered::Asked, 3));
        // A failure is not kept.
        let down = || Err(ProviderFailure::Error("cannot connect".into()));
        let _ = answers
            .answer("down".into(), window, asking(&asked, down(), quick))
            .await;
        let (answer, how) = answers
            .answer("down".into(), window, asking(&asked, ok(), quick))
            .await;
        assert_eq!((how, answer), (Answered::Asked, ok()));
    }

    #[tokio::test]
    async fn an_answer_older_than_the_window_is_asked_again_and_the_table_stays_bounded() {
        let answers = SharedAnswers::default();
        let asked = Arc::new(AtomicUsize::new(0));
        let window = Duration::from_millis(50);
        let one = || asking(&asked, Ok(MeasuredValue::Number(1.0)), Duration::ZERO);
        let _ = answers.answer("q".into(), window, one()).await;
        tokio::time::sleep(2 * window).await;
        let (_, how) = answers.answer("q".into(), window, one()).await;
        assert_eq!(how, Answered::Asked);
        // The first half is asked with a short window and expires; the second is kept.
        for i in 0..LIMIT + 10 {
            let window = if i <= LIMIT / 2 {
                window
            } else {
                3600 * SECOND
            };
            let _ = answers.answer(format!("q{i}"), window, one()).await;
            if i == LIMIT / 2 {
                tokio::time::sleep(2 * window).await;
            }
        }
        assert!(answers.len() <= LIMIT, "{}", answers.len());
        assert!(answers.len() >= LIMIT / 2, "{}", answers.len());
    }
}
