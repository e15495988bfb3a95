//! What each port knows of its open connections: whether a call is in flight
//! on one, and since when it has had none.
//!
//! A connection that sent its first bytes (an HTTP/2 preface, one HTTP/1.1
//! request) and then nothing would otherwise hold its place for as long as
//! the client likes, and `max_connections` of them lock the port, probes
//! included. With this record the listener closes a connection that has had
//! no call in flight for `server.connection_idle_timeout_seconds`, and when
//! the port is full it closes the one idle the longest to admit a newcomer,
//! instead of refusing the newcomer. Connections with a call in flight are
//! never chosen: their calls are bounded by the message timeout and deadlines.
//!
//! A call is "in flight" from the moment its request reaches the services
//! until its response body has ended or been dropped ([`TrackCalls`]).

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::listener::ConnectionInfo;

/// A connection must have been without a call this long before it may be
/// closed as idle: between the moment the server reads a request's headers
/// and the moment the request reaches the services (another task) the
/// connection looks idle, and that moment must not cost the call.
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// One connection's state, shared by its socket, its calls and the port.
#[derive(Debug)]
pub struct Activity {
    /// Calls whose response has not ended.
    in_flight: AtomicUsize,
    /// When a call last started or ended (or the connection opened), in
    /// milliseconds since the port's epoch.
    last_change_ms: AtomicU64,
    /// Counts every call start and end: a changed value proves activity that
    /// a clock reading alone could miss.
    changes: AtomicU64,
    /// Set when the port closes the connection; its socket fails from then on.
    closing: AtomicBool,
    /// The socket's task, woken to notice `closing`.
    waker: AtomicWaker,
    epoch: Instant,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(millis_since(epoch)),
            changes: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            epoch,
        }
    }

    /// How long the connection has had no call in flight; None while it has one.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.last_change_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(
            millis_since(self.epoch).saturating_sub(since),
        ))
    }

    /// The number of call starts and ends so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Whether the port has closed the connection.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Asks the socket's task to fail its reads and writes, which ends the
    /// connection.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Registers the socket's task to be woken by [`Activity::close`].
    pub fn register(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
    }

    fn touch(&self) {
        self.last_change_ms
            .store(millis_since(self.epoch), Ordering::Release);
        self.changes.fetch_add(1, Ordering::AcqRel);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The open connections of one port.
#[derive(Debug)]
pub struct Registry {
    max: usize,
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

/// How a newcomer was admitted.
pub enum Admission {
    /// There was room.
    Admitted(Entry),
    /// The longest-idle connection was closed to make room.
    Evicted(Entry),
    /// Every connection has a call in flight (or has just had one).
    Full,
}

impl Registry {
    /// A port of at most `max` connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a new connection: into a free place, else into the place of the
    /// connection idle the longest (closed now), else not at all.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let mut open = crate::sync::lock(&self.open);
        let evicted = if open.len() < self.max {
            false
        } else {
            let Some(victim) = longest_idle(&open) else {
                return Admission::Full;
            };
            if let Some(activity) = open.remove(&victim) {
                activity.close();
            }
            true
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.epoch));
        open.insert(id, Arc::clone(&activity));
        let entry = Entry {
            registry: Arc::clone(self),
            id,
            activity,
        };
        match evicted {
            true => Admission::Evicted(entry),
            false => Admission::Admitted(entry),
        }
    }

    /// Connections holding a place now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.open).len()
    }

    /// Whether no connection holds a place.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The connection without a call in flight that has been idle the longest,
/// if any has been idle at least [`IDLE_GRACE`].
fn longest_idle(open: &HashMap<u64, Arc<Activity>>) -> Option<u64> {
    open.iter()
        .filter_map(|(id, activity)| Some((*id, activity.idle_for()?)))
        .filter(|(_, idle)| *idle >= IDLE_GRACE)
        .max_by_key(|(_, idle)| *idle)
        .map(|(id, _)| id)
}

/// A connection's place in its port; given back when dropped.
#[derive(Debug)]
pub struct Entry {
    registry: Arc<Registry>,
    id: u64,
    activity: Arc<Activity>,
}

impl Entry {
    /// The connection's shared state.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        crate::sync::lock(&self.registry.open).remove(&self.id);
    }
}

/// One call in flight on a connection, from its request to the end of its
/// response body.
struct ActiveCall(Arc<Activity>);

impl ActiveCall {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Self(activity)
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        // Touch first: the connection is never seen idle with an old stamp.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks every call in flight on its connection (see the module).
#[derive(Debug, Clone, Default)]
pub struct TrackCalls {
    /// The connection, when the service is built per connection; else each
    /// request's [`ConnectionInfo`] names it.
    connection: Option<Arc<Activity>>,
}

impl TrackCalls {
    /// For services built per connection.
    pub fn for_connection(activity: Arc<Activity>) -> Self {
        Self {
            connection: Some(activity),
        }
    }
}

impl<S> Layer<S> for TrackCalls {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tracked {
            inner,
            connection: self.connection.clone(),
        }
    }
}

/// A service whose calls count as in flight on their connection.
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    connection: Option<Arc<Activity>>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Tracked<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    ReqBody: 'static,
    ResBody: 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let activity = self
            .connection
            .clone()
            .or_else(|| ConnectionInfo::of(request.extensions()).map(|c| Arc::clone(&c.activity)));
        let call = activity.map(ActiveCall::start);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody { inner, _call: call }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call in flight until it is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        _call: Option<ActiveCall>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(admission: Admission) -> Entry {
        match admission {
            Admission::Admitted(entry) | Admission::Evicted(entry) => entry,
            Admission::Full => panic!("refused"),
        }
    }

    #[test]
    fn a_full_port_closes_its_longest_idle_connection_for_a_newcomer() {
        let registry = Registry::new(2);
        let busy = entry(registry.admit());
        let idle = entry(registry.admit());
        let _call = ActiveCall::start(Arc::clone(busy.activity()));
        // Nobody has been idle long enough yet: a request may be on its way.
        assert!(matches!(registry.admit(), Admission::Full));
        std::thread::sleep(IDLE_GRACE + Duration::from_millis(50));
        let newcomer = registry.admit();
        assert!(matches!(newcomer, Admission::Evicted(_)));
        assert!(idle.activity().is_closing());
        assert!(!busy.activity().is_closing(), "a call in flight is kept");
        assert_eq!(registry.len(), 2);
        drop(idle);
        assert_eq!(registry.len(), 2, "the evicted place was already taken");
    }

    #[test]
    fn a_call_counts_from_its_request_to_the_end_of_its_response() {
        let registry = Registry::new(1);
        let entry = entry(registry.admit());
        let activity = Arc::clone(entry.activity());
        let before = activity.changes();
        let call = ActiveCall::start(Arc::clone(&activity));
        assert_eq!(activity.idle_for(), None);
        drop(call);
        assert!(activity.idle_for().is_some_and(|d| d < IDLE_GRACE));
        assert_eq!(activity.changes(), before + 2);
        drop(entry);
        assert!(registry.is_empty());
    }
}
