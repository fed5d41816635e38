//! Fencing: a replica that may have lost the leader Lease writes nothing.
//!
//! Leader election alone is not enough. A leader frozen (SIGSTOP, a long GC-like stall, a
//! paused VM) for longer than the Lease wakes up with reconciles in flight and would write
//! before its election loop notices that another replica took over. So every mutating
//! request of the controllers' client passes through [`FenceLayer`], which refuses it unless
//! the Lease is known to be ours *now*: the election loop opens the fence until the moment
//! the last successful renewal could expire, measured on the monotonic clock (which keeps
//! running while the process is stopped). Reads (watches, gets, lists) are never refused.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Method, Request};
use prometheus_client::metrics::counter::Counter;
use tower::{BoxError, Layer, Service};

/// Raised instead of sending a write while the fence is closed.
#[derive(Debug, thiserror::Error)]
#[error("write refused: this replica does not hold the leader Lease (fenced)")]
pub struct Fenced;

/// Until when this replica may write. Shared by the election loop and the client.
#[derive(Debug)]
pub struct Fence {
    base: Instant,
    /// Nanoseconds after `base` until which writes pass; `u64::MAX`: always, 0: never.
    open_until: AtomicU64,
    /// Writes refused so far: `sluice_fenced_writes_total`.
    refused: Counter,
}

impl Fence {
    /// Without leader election the only replica always writes.
    pub fn always_open() -> Arc<Self> {
        Arc::new(Self::with(u64::MAX))
    }

    /// With leader election: closed until the Lease is first acquired.
    pub fn closed() -> Arc<Self> {
        Arc::new(Self::with(0))
    }

    fn with(open_until: u64) -> Self {
        Self {
            base: Instant::now(),
            open_until: AtomicU64::new(open_until),
            refused: Counter::default(),
        }
    }

    /// Lets writes pass until `deadline` (a renewal succeeded).
    pub fn open_until(&self, deadline: Instant) {
        let nanos = deadline.saturating_duration_since(self.base).as_nanos();
        self.open_until.store(
            u64::try_from(nanos).unwrap_or(u64::MAX - 1),
            Ordering::SeqCst,
        );
    }

    /// Refuses every write from now on (the Lease is lost or given up).
    pub fn close(&self) {
        self.open_until.store(0, Ordering::SeqCst);
    }

    /// Whether a request with `method` may be sent now.
    pub fn allows(&self, method: &Method) -> bool {
        let open_until = self.open_until.load(Ordering::SeqCst);
        let elapsed = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        allows(method, elapsed, open_until)
    }

    /// The count of writes refused, to register with the operator's metrics.
    pub fn refused_writes(&self) -> Counter {
        self.refused.clone()
    }
}

/// The rule: reads always pass; writes only before the deadline (`u64::MAX`: no deadline).
fn allows(method: &Method, elapsed_nanos: u64, open_until_nanos: u64) -> bool {
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    read || open_until_nanos == u64::MAX || elapsed_nanos < open_until_nanos
}

/// How long after the start of a successful renewal round this replica may keep writing:
/// the Lease duration less a margin for clock skew between replicas, as the standby measures
/// expiry from the renew time we wrote (taken after the round started, so later than ours).
pub fn write_window(lease_duration: Duration) -> Duration {
    let margin = Duration::from_secs(1).min(lease_duration / 4);
    lease_duration.saturating_sub(margin)
}

/// The client layer that applies a [`Fence`].
#[derive(Clone, Debug)]
pub struct FenceLayer(pub Arc<Fence>);

impl<S> Layer<S> for FenceLayer {
    type Service = FencedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FencedService {
            inner,
            fence: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FencedService<S> {
    inner: S,
    fence: Arc<Fence>,
}

impl<S, B> Service<Request<B>> for FencedService<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.fence.allows(request.method()) {
            self.fence.refused.inc();
            tracing::warn!(method = %request.method(), path = %request.uri().path(), "write refused: the leader Lease may have lapsed");
            return Box::pin(std::future::ready(Err(Box::new(Fenced) as BoxError)));
        }
        let call = self.inner.call(request);
        Box::pin(async move { call.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_always_pass_and_writes_only_before_the_deadline() {
        let s = 1_000_000_000;
        let cases = [
            (Method::GET, 5 * s, 0, true),
            (Method::HEAD, 5 * s, 0, true),
            (Method::PATCH, 5 * s, 0, false),
            (Method::PATCH, 5 * s, 6 * s, true),
            (Method::PATCH, 6 * s, 6 * s, false),
            (Method::POST, 7 * s, 6 * s, false),
            (Method::PUT, 7 * s, 6 * s, false),
            (Method::DELETE, 7 * s, 6 * s, false),
            (Method::DELETE, u64::MAX - 1, u64::MAX, true),
        ];
        for (method, elapsed, open_until, expected) in cases {
            assert_eq!(
                allows(&method, elapsed, open_until),
                expected,
                "{method} at {elapsed} with the fence open until {open_until}"
            );
        }
    }

    #[test]
    fn a_fence_opens_closes_and_lapses() {
        let fence = Fence::closed();
        assert!(!fence.allows(&Method::PATCH));
        fence.open_until(Instant::now() + Duration::from_secs(60));
        assert!(fence.allows(&Method::PATCH));
        fence.close();
        assert!(!fence.allows(&Method::PATCH));
        fence.open_until(Instant::now() - Duration::from_millis(1));
        assert!(!fence.allows(&Method::POST));
        assert!(Fence::always_open().allows(&Method::DELETE));
    }

    #[test]
    fn the_write_window_ends_before_a_standby_may_take_over() {
        assert_eq!(
            write_window(Duration::from_secs(15)),
            Duration::from_secs(14)
        );
        assert_eq!(
            write_window(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
    }
}
