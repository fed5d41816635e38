//! The lanes of the operator's requests to the apiserver, and the bound on them.
//!
//! A busy apiserver shares its CPU among the requests it is serving, so each request in
//! flight slows every other: a route write that takes 4 ms alone took 250 to 500 ms beside
//! 30 to 55 Rollout status writes (docs/performance.md). The operator keeps few requests in
//! flight (`--kube-requests-in-flight`, the statuses and everything else together) and, when a
//! place frees, gives it to the lane a moving release waits on first. Route reads and writes
//! have as many places again of their own, which nothing else takes: each is cheap for the
//! apiserver, and a step or an abort waits on it. (At the apiserver a route write still
//! shares the CPU with the statuses in flight, so up to twice the bound is served at once.)
//! Each lane is a client of its own (kube's client sends one lane's requests in the order
//! they came), built over one [`Gate`].
//!
//! Without any bound, a first start with 1,000 Rollouts sent up to 1,000 requests at once, and
//! writes to one object refused each other more often. Two lanes with bounds of their own (32,
//! and 128 for what a release waits on) still let 30 to 55 status writes share the apiserver
//! with each route write; and a bound that is only lowered queues the status that starts a
//! step behind bookkeeping, past the end of the step's pause.
//!
//! A record of what the routes already show (a person's abort, written after its route) waits
//! until no route is moving: in a burst of 100 aborts at 10,000 Rollouts, 92 such records,
//! each a whole Rollout (the apiserver's dearest write, and an event for every watch of
//! Rollouts), were served among the aborts still to carry out.
//!
//! Route writes shared the urgent lane with the statuses written before a route moves, and
//! its places with the statuses of the other lanes: at 10,000 Rollouts the slowest steps'
//! route writes waited about half a second in the operator for a place, while the places
//! were held by writes taking 250 to 400 ms each at a busy apiserver.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::oneshot;
use tower::{Layer, Service};

/// Which requests go first when the places are taken. Each lane keeps its requests in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Route reads and writes: what a step or an abort waits on, and a small object, cheap
    /// for the apiserver (a VirtualService update takes it 4 ms where a Rollout status write
    /// takes 18.7). Up to the bound of places of its own, so a route write never waits for
    /// a status write to be answered.
    Route,
    /// What else a moving release waits on now: a Rollout read fresh, the status recorded
    /// just before a route moves or to carry out a person's request. Offered a place after
    /// `Progress`, and may take every place the other lanes leave.
    Urgent,
    /// A status that starts a timed pause: the pause counts from the moment recorded, so the
    /// record must land before the pause runs out, or the next step comes late. The one lane
    /// with a deadline: offered a free shared place first, and may take no more than a
    /// quarter of them, one record per timed pause. (Behind the urgent lane, with the other
    /// statuses that start a step, these records waited 1.6 to 2.7 s at the median in 100
    /// releases, and up to half of them landed after their pause had run out.)
    Progress,
    /// Everything else: reads, watches, ReplicaSets, Events, measurements, the other
    /// controllers. Goes third, and may take half the places (with `Record`). With
    /// `Progress` it never holds more than three quarters, so the urgent lane always has a
    /// quarter to itself, and a burst of bookkeeping never fills the apiserver with work a
    /// step then waits behind.
    Usual,
    /// A status that records what the cluster already shows: a person's abort after its
    /// route moved. Nothing waits on it, and while routes are still moving each such write
    /// (a whole Rollout, the dearest write there is) takes the apiserver's time from them and
    /// lengthens its watches' queues. It takes a place only while the route and urgent
    /// lanes have nothing waiting or in flight, or once it has waited [`RECORD_PATIENCE`]; it
    /// shares `Usual`'s half. A record that waits holds its reconcile (and so its Rollout's
    /// next one) and the reconcile's slot: were every slot held so, no route write could
    /// start, the route and urgent lanes would go quiet, and the records would go.
    Record,
}

const LANES: [Lane; 5] = [
    Lane::Urgent,
    Lane::Progress,
    Lane::Usual,
    Lane::Record,
    Lane::Route,
];

/// The order in which the lanes are offered a free place: routes (on places of their own),
/// then the deadline.
const ORDER: [Lane; 5] = [
    Lane::Route,
    Lane::Progress,
    Lane::Urgent,
    Lane::Usual,
    Lane::Record,
];

/// How long a record waits for the route and urgent lanes to go quiet before it takes a
/// place anyway (a burst of 100 aborts kept them busy for about 2.5 s at 10,000 Rollouts).
pub const RECORD_PATIENCE: Duration = Duration::from_secs(3);

/// How long requests waited for their place, by lane (`operator::run` registers it as
/// `sluice_kube_request_wait_seconds`): the lanes' queues sit in kube's client buffers, where
/// nothing else shows them.
pub type LaneWaits = Family<LaneLabel, Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    /// route, urgent, progress, usual or record.
    pub lane: String,
}

impl Lane {
    fn name(self) -> &'static str {
        match self {
            Lane::Urgent => "urgent",
            Lane::Progress => "progress",
            Lane::Usual => "usual",
            Lane::Record => "record",
            Lane::Route => "route",
        }
    }

    fn index(self) -> usize {
        match self {
            Lane::Urgent => 0,
            Lane::Progress => 1,
            Lane::Usual => 2,
            Lane::Record => 3,
            Lane::Route => 4,
        }
    }

    /// Whether this lane may take one more place (0: no bound), given what every lane
    /// holds: `Route` `total` of its own; the others `total` between them, `Progress` a
    /// quarter, `Usual` and `Record` half between them.
    fn has_room(self, in_flight: [usize; 5], total: usize) -> bool {
        let quarter = (total / 4).max(1);
        let half = (total / 2).max(1);
        let shared: usize = in_flight[..4].iter().sum();
        total == 0
            || match self {
                Lane::Route => in_flight[4] < total,
                Lane::Urgent => shared < total,
                Lane::Progress => shared < total && in_flight[1] < quarter,
                Lane::Usual | Lane::Record => shared < total && in_flight[2] + in_flight[3] < half,
            }
    }
}

/// Which lanes have a request waiting, and whether the oldest record waiting has waited out
/// its patience.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Waiting {
    lanes: [bool; 5],
    record_overdue: bool,
}

/// The lane to give the next free place to: the first, in [`ORDER`], with a request
/// waiting and room under both its own share and the total; a record only while the route
/// and urgent lanes are quiet or once it is overdue.
fn next(waiting: Waiting, in_flight: [usize; 5], total: usize) -> Option<Lane> {
    let quiet = |lane: Lane| in_flight[lane.index()] == 0 && !waiting.lanes[lane.index()];
    let routes_quiet = quiet(Lane::Route) && quiet(Lane::Urgent);
    ORDER.into_iter().find(|lane| {
        waiting.lanes[lane.index()]
            && lane.has_room(in_flight, total)
            && (*lane != Lane::Record || total == 0 || routes_quiet || waiting.record_overdue)
    })
}

/// The bound on the lanes' requests awaiting their answer at once (a watch until its stream
/// starts): `total` for the routes, `total` shared by the others; and who goes next.
#[derive(Clone)]
pub struct Gate(Arc<Mutex<Places>>);

struct Places {
    total: usize,
    patience: Duration,
    /// Every lane's series of `waits`, by index, to observe without a lookup.
    waited: [Histogram; 5],
    waits: LaneWaits,
    in_flight: [usize; 5],
    /// Each request waiting, with the moment it began to.
    waiting: [VecDeque<(oneshot::Sender<Place>, Instant)>; 5],
}

/// A place held by one request until its answer's headers arrive; dropped, it goes to the
/// next request [`next`] picks.
pub struct Place {
    gate: Gate,
    lane: Lane,
}

impl Gate {
    /// `total` places for the routes and `total` shared by the other lanes; 0: no bound.
    pub fn new(total: usize) -> Self {
        Self::with_patience(total, RECORD_PATIENCE)
    }

    fn with_patience(total: usize, patience: Duration) -> Self {
        // 1 ms to about 16 s.
        let waits =
            LaneWaits::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 15)));
        let waited = LANES.map(|lane| {
            waits
                .get_or_create(&LaneLabel {
                    lane: lane.name().to_string(),
                })
                .clone()
        });
        Self(Arc::new(Mutex::new(Places {
            total,
            patience,
            waited,
            waits,
            in_flight: [0; 5],
            waiting: Default::default(),
        })))
    }

    /// How long requests waited for their place, by lane: to register with the metrics.
    pub fn waits(&self) -> LaneWaits {
        self.lock().waits.clone()
    }

    /// The layer that puts a client's requests in `lane`.
    pub fn lane(&self, lane: Lane) -> LaneLayer {
        LaneLayer {
            gate: self.clone(),
            lane,
        }
    }

    /// Waits for a place in `lane`, behind the requests of that lane already waiting.
    pub async fn enter(&self, lane: Lane) -> Place {
        let (sender, receiver) = oneshot::channel();
        let given = {
            let mut places = self.lock();
            places.waiting[lane.index()].push_back((sender, Instant::now()));
            places.give(self)
        };
        hand_over(given);
        match receiver.await {
            Ok(place) => place,
            // Not reached: a waiting sender is only taken out to be given a place. Counted
            // all the same, so that its drop keeps the tally right.
            Err(_) => {
                self.lock().in_flight[lane.index()] += 1;
                Place {
                    gate: self.clone(),
                    lane,
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Places> {
        // The tallies stay consistent under a panic elsewhere: each change is one statement.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Places {
    /// What waits now. Whether a record is overdue is asked whenever a request arrives or a
    /// place frees; while the route or urgent lane is busy, its places keep freeing.
    fn waiting(&self) -> Waiting {
        let record = &self.waiting[Lane::Record.index()];
        Waiting {
            lanes: LANES.map(|lane| !self.waiting[lane.index()].is_empty()),
            record_overdue: record
                .front()
                .is_some_and(|(_, since)| since.elapsed() >= self.patience),
        }
    }

    /// The places free now, given to the requests [`next`] picks (handed over once the lock
    /// is released: a place refused by a request that stopped waiting frees itself again).
    fn give(&mut self, gate: &Gate) -> Vec<(oneshot::Sender<Place>, Place)> {
        let mut given = Vec::new();
        while let Some(lane) = next(self.waiting(), self.in_flight, self.total) {
            let Some((sender, since)) = self.waiting[lane.index()].pop_front() else {
                break;
            };
            if sender.is_closed() {
                continue;
            }
            self.waited[lane.index()].observe(since.elapsed().as_secs_f64());
            self.in_flight[lane.index()] += 1;
            let place = Place {
                gate: gate.clone(),
                lane,
            };
            given.push((sender, place));
        }
        given
    }
}

fn hand_over(given: Vec<(oneshot::Sender<Place>, Place)>) {
    for (sender, place) in given {
        // A request that stopped waiting refuses it; the place is dropped and freed here.
        let _ = sender.send(place);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let given = {
            let mut places = self.gate.lock();
            let held = &mut places.in_flight[self.lane.index()];
            *held = held.saturating_sub(1);
            places.give(&self.gate)
        };
        hand_over(given);
    }
}

/// Puts a client's requests in one lane of a [`Gate`].
#[derive(Clone)]
pub struct LaneLayer {
    gate: Gate,
    lane: Lane,
}

impl<S> Layer<S> for LaneLayer {
    type Service = LaneService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LaneService {
            inner,
            gate: self.gate.clone(),
            lane: self.lane,
            entering: None,
            place: None,
        }
    }
}

type Entering = Pin<Box<dyn Future<Output = Place> + Send>>;

/// Takes a place before it is ready for a request, and holds it until the answer's headers.
pub struct LaneService<S> {
    inner: S,
    gate: Gate,
    lane: Lane,
    entering: Option<Entering>,
    place: Option<Place>,
}

impl<S, B> Service<http::Request<B>> for LaneService<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.place.is_none() {
            let (gate, lane) = (self.gate.clone(), self.lane);
            let entering = self
                .entering
                .get_or_insert_with(|| Box::pin(async move { gate.enter(lane).await }));
            let place = ready!(entering.as_mut().poll(cx));
            self.entering = None;
            self.place = Some(place);
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let place = self.place.take();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            drop(place);
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_next_place_goes_to_the_first_lane_with_room() {
        use Lane::*;
        // Lanes waiting (urgent, progress, usual, record), whether the oldest record is
        // overdue, the places each holds, the total, who gets the next place.
        type Case = ([bool; 4], bool, [usize; 4], usize, Option<Lane>);
        let cases: &[Case] = &[
            // Nobody waits.
            ([false; 4], false, [0; 4], 8, None),
            // The lanes' order: Progress (a deadline) first while it has room, then Urgent.
            ([true; 4], false, [0; 4], 8, Some(Progress)),
            ([true, false, true, true], false, [0; 4], 8, Some(Urgent)),
            (
                [true, true, true, true],
                false,
                [0, 2, 0, 0],
                8,
                Some(Urgent),
            ),
            ([false, true, true, true], false, [0; 4], 8, Some(Progress)),
            ([false, false, true, true], false, [0; 4], 8, Some(Usual)),
            ([false, false, false, true], false, [0; 4], 8, Some(Record)),
            // Every place taken: nobody, whoever waits.
            ([true; 4], true, [2, 3, 3, 0], 8, None),
            // Progress holds at most a quarter, Usual and Record half between them; Urgent
            // may take the rest.
            (
                [false, true, true, false],
                false,
                [0, 2, 3, 0],
                8,
                Some(Usual),
            ),
            ([false, true, true, false], false, [0, 2, 4, 0], 8, None),
            ([false, false, true, true], false, [0, 0, 2, 2], 8, None),
            (
                [true, false, false, false],
                false,
                [0, 2, 4, 0],
                8,
                Some(Urgent),
            ),
            (
                [true, false, false, false],
                false,
                [7, 0, 0, 0],
                8,
                Some(Urgent),
            ),
            // A record waits while an urgent request is in flight or waiting...
            ([false, false, false, true], false, [1, 0, 0, 0], 8, None),
            (
                [true, false, false, true],
                false,
                [7, 0, 0, 0],
                8,
                Some(Urgent),
            ),
            // ... unless it has waited out its patience.
            (
                [false, false, false, true],
                true,
                [1, 0, 0, 0],
                8,
                Some(Record),
            ),
            ([false, false, false, true], true, [1, 0, 4, 0], 8, None),
            // A bound of 1 still lets each lane have one.
            ([false, false, true, false], false, [0; 4], 1, Some(Usual)),
            ([false, false, false, true], false, [0; 4], 1, Some(Record)),
            // No bound: nothing waits.
            (
                [false, false, true, false],
                false,
                [0, 0, 1000, 0],
                0,
                Some(Usual),
            ),
            (
                [false, false, false, true],
                false,
                [5, 0, 0, 0],
                0,
                Some(Record),
            ),
        ];
        // The same, with nothing in the route lane.
        let cases = cases
            .iter()
            .map(|(lanes, overdue, in_flight, total, want)| {
                let [a, b, c, d] = *lanes;
                let [e, f, g, h] = *in_flight;
                (
                    [a, b, c, d, false],
                    *overdue,
                    [e, f, g, h, 0],
                    *total,
                    *want,
                )
            });
        // Lanes waiting (urgent, progress, usual, record, route) and the places each holds.
        type RouteCase = ([bool; 5], bool, [usize; 5], usize, Option<Lane>);
        let route_cases: &[RouteCase] = &[
            // Routes first, on places of their own: the others' places all taken...
            ([true; 5], false, [2, 2, 4, 0, 0], 8, Some(Route)),
            // ... or theirs all taken, the others still go.
            ([true; 5], false, [0, 0, 0, 0, 8], 8, Some(Progress)),
            (
                [false, false, false, false, true],
                false,
                [0, 0, 0, 0, 8],
                8,
                None,
            ),
            (
                [false, false, false, false, true],
                false,
                [0, 0, 0, 0, 7],
                8,
                Some(Route),
            ),
            // A record waits while a route read or write is in flight or waiting...
            (
                [false, false, false, true, false],
                false,
                [0, 0, 0, 0, 1],
                8,
                None,
            ),
            (
                [false, false, false, true, true],
                false,
                [0, 0, 0, 0, 8],
                8,
                None,
            ),
            // ... unless it has waited out its patience.
            (
                [false, false, false, true, false],
                true,
                [0, 0, 0, 0, 1],
                8,
                Some(Record),
            ),
            // No bound: nothing waits.
            (
                [false, false, false, false, true],
                false,
                [0, 0, 0, 0, 1000],
                0,
                Some(Route),
            ),
        ];
        for (lanes, record_overdue, in_flight, total, want) in
            cases.chain(route_cases.iter().copied())
        {
            let waiting = Waiting {
                lanes,
                record_overdue,
            };
            assert_eq!(
                next(waiting, in_flight, total),
                want,
                "{waiting:?} {in_flight:?} of {total}"
            );
        }
    }

    /// A request waiting in `lane`, on a task of its own.
    fn waiter(gate: &Gate, lane: Lane) -> tokio::task::JoinHandle<Place> {
        let gate = gate.clone();
        tokio::spawn(async move { gate.enter(lane).await })
    }

    /// `(count, sum)` of one lane's waits, as the metrics endpoint shows them.
    fn waited(gate: &Gate, lane: &str) -> (f64, f64) {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("wait", "", gate.waits());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap_or_default();
        let value = |series: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{series}{{lane=\"{lane}\"}}")))
                .and_then(|l| l.split_whitespace().last()?.parse().ok())
                .unwrap_or(f64::NAN)
        };
        (value("wait_count"), value("wait_sum"))
    }

    #[tokio::test]
    async fn each_lane_s_wait_for_a_place_is_measured() {
        let gate = Gate::new(1);
        let usual = gate.enter(Lane::Usual).await;
        let urgent = waiter(&gate, Lane::Urgent);
        tokio::time::sleep(Duration::from_millis(40)).await;
        drop(usual);
        let _urgent = urgent.await.expect("served once the place is free");
        let (count, sum) = waited(&gate, "usual");
        assert!(count == 1.0 && sum < 0.04, "no wait: {count} {sum}");
        let (count, sum) = waited(&gate, "urgent");
        assert!(
            count == 1.0 && sum >= 0.04,
            "waited for the place: {count} {sum}"
        );
        assert_eq!(waited(&gate, "record"), (0.0, 0.0), "nothing asked");
    }

    #[tokio::test]
    async fn a_record_waits_for_the_urgent_lane_to_go_quiet_or_its_patience() {
        let gate = Gate::with_patience(8, Duration::from_millis(50));
        let urgent = gate.enter(Lane::Urgent).await;
        let record = waiter(&gate, Lane::Record);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!record.is_finished(), "a route is moving");
        // A usual request is not held back; the record still is.
        let _usual = gate.enter(Lane::Usual).await;
        drop(urgent);
        let _record = record.await.expect("served once the urgent lane is quiet");
        assert_eq!(gate.lock().in_flight, [0, 0, 1, 1, 0]);

        // Under a stream of urgent requests, a record waits out its patience, then goes.
        let held = gate.enter(Lane::Urgent).await;
        let record = waiter(&gate, Lane::Record);
        tokio::time::sleep(Duration::from_millis(70)).await;
        assert!(!record.is_finished(), "nothing freed a place since it came");
        let _another = gate.enter(Lane::Urgent).await;
        drop(held);
        let _overdue = tokio::time::timeout(Duration::from_secs(5), record)
            .await
            .expect("given a place once overdue")
            .expect("served");
        assert_eq!(gate.lock().in_flight, [1, 0, 1, 2, 0]);
    }

    /// Whatever the order of arrivals and releases, the lanes never hold more than their
    /// caps and the total, and every request is served.
    #[tokio::test]
    async fn the_bound_holds_and_the_urgent_lane_overtakes() {
        let gate = Gate::new(4);
        let mut usual = Vec::new();
        for _ in 0..2 {
            usual.push(gate.enter(Lane::Usual).await);
        }
        // Usual holds its half: a third waits, and an urgent request behind it does not.
        let third = waiter(&gate, Lane::Usual);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "Usual may hold only half the places");
        let urgent = [
            gate.enter(Lane::Urgent).await,
            gate.enter(Lane::Urgent).await,
        ];
        assert_eq!(gate.lock().in_flight, [2, 0, 2, 0, 0]);
        // All four taken: an urgent request waits, and the next free place is its.
        let waiting_urgent = waiter(&gate, Lane::Urgent);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(urgent);
        let _next_urgent = waiting_urgent.await.expect("served");
        assert_eq!(gate.lock().in_flight, [1, 0, 2, 0, 0]);
        // Routes have places of their own: all four, whatever the others hold.
        let mut routes = Vec::new();
        for _ in 0..4 {
            let route = tokio::time::timeout(Duration::from_secs(5), gate.enter(Lane::Route));
            routes.push(
                route
                    .await
                    .expect("a route's place, not shared with the others"),
            );
        }
        let fifth = waiter(&gate, Lane::Route);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!fifth.is_finished(), "the route lane holds its four");
        routes.pop();
        let _fifth = fifth.await.expect("served");
        assert_eq!(gate.lock().in_flight, [1, 0, 2, 0, 4]);
        drop(usual);
        let _third = third.await.expect("served");
        assert_eq!(gate.lock().in_flight, [1, 0, 1, 0, 4]);
    }

    proptest::proptest! {
        /// Whatever arrives and leaves, in any order: no lane holds more than its share,
        /// neither the routes nor the others together pass the total, a record never goes while a route moves, no
        /// request waits while a place it may take is free, and each lane is served in the
        /// order its requests came.
        #[test]
        fn the_gate_keeps_its_bounds_and_serves_each_lane_in_order(
            total in 0usize..7,
            turns in proptest::collection::vec(
                (0usize..5, proptest::bool::weighted(0.6), proptest::sample::select((0..64).collect::<Vec<usize>>())),
                1..120,
            ),
        ) {
            let gate = Gate::new(total);
            let mut waiting: Vec<(Lane, usize, oneshot::Receiver<Place>)> = Vec::new();
            let mut held: Vec<(Lane, Place)> = Vec::new();
            let mut served: [Vec<usize>; 5] = Default::default();
            for (turn, (lane, arrives, pick)) in turns.into_iter().enumerate() {
                if arrives || held.is_empty() {
                    let lane = LANES[lane];
                    let (sender, receiver) = oneshot::channel();
                    let given = {
                        let mut places = gate.lock();
                        places.waiting[lane.index()].push_back((sender, Instant::now()));
                        places.give(&gate)
                    };
                    hand_over(given);
                    waiting.push((lane, turn, receiver));
                } else {
                    drop(held.swap_remove(pick % held.len()));
                }
                let mut still = Vec::new();
                let mut records_served = false;
                for (lane, arrived, mut receiver) in waiting.drain(..) {
                    match receiver.try_recv() {
                        Ok(place) => {
                            records_served |= lane == Lane::Record;
                            served[lane.index()].push(arrived);
                            held.push((lane, place));
                        }
                        Err(_) => still.push((lane, arrived, receiver)),
                    }
                }
                waiting = still;
                let places = gate.lock();
                let holding = LANES.map(|lane| held.iter().filter(|(l, _)| *l == lane).count());
                proptest::prop_assert_eq!(places.in_flight, holding);
                if total != 0 {
                    proptest::prop_assert!(holding[..4].iter().sum::<usize>() <= total);
                    proptest::prop_assert!(holding[4] <= total);
                    proptest::prop_assert!(holding[1] <= (total / 4).max(1));
                    proptest::prop_assert!(holding[2] + holding[3] <= (total / 2).max(1));
                    // Never overdue here (the patience is seconds): a record is given a
                    // place only while no route or urgent request is in flight or waiting.
                    let routes_quiet = holding[0] == 0
                        && holding[4] == 0
                        && places.waiting[0].is_empty()
                        && places.waiting[4].is_empty();
                    proptest::prop_assert!(
                        !records_served || routes_quiet,
                        "a record went while a route was moving"
                    );
                }
                proptest::prop_assert_eq!(
                    next(places.waiting(), places.in_flight, total),
                    None,
                    "a request waits while a place it may take is free"
                );
            }
            for order in served {
                proptest::prop_assert!(order.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }

    /// The most requests a lane had in flight at once when 20 were sent together, each
    /// through a client of its own over one gate of `total` places.
    async fn most_in_flight(lane: Lane, total: usize) -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::ServiceExt;
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let counters = (now, most.clone());
        let inner = tower::service_fn(move |_: http::Request<()>| {
            let (now, most) = (counters.0.clone(), counters.1.clone());
            async move {
                let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(current, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        });
        let gate = Gate::new(total);
        let calls = (0..20).map(|_| {
            gate.lane(lane)
                .layer(inner.clone())
                .oneshot(http::Request::new(()))
        });
        for answer in futures::future::join_all(calls).await {
            assert!(answer.is_ok());
        }
        most.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn requests_beyond_the_lanes_share_wait_their_turn() {
        assert_eq!(most_in_flight(Lane::Urgent, 3).await, 3);
        assert_eq!(most_in_flight(Lane::Usual, 6).await, 3);
        assert_eq!(most_in_flight(Lane::Progress, 8).await, 2);
        assert_eq!(most_in_flight(Lane::Usual, 1).await, 1);
        assert_eq!(most_in_flight(Lane::Record, 6).await, 3);
        assert_eq!(most_in_flight(Lane::Route, 3).await, 3);
    }

    #[tokio::test]
    async fn zero_means_no_bound() {
        assert_eq!(most_in_flight(Lane::Usual, 0).await, 20);
    }

    #[tokio::test]
    async fn a_request_that_stops_waiting_gives_its_place_on() {
        let gate = Gate::new(1);
        let held = gate.enter(Lane::Usual).await;
        let gone = waiter(&gate, Lane::Usual);
        tokio::time::sleep(Duration::from_millis(20)).await;
        gone.abort();
        let _ = gone.await;
        let next = waiter(&gate, Lane::Usual);
        drop(held);
        let _next = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the place was given on")
            .expect("served");
        assert_eq!(gate.lock().in_flight, [0, 0, 1, 0, 0]);
    }
}
