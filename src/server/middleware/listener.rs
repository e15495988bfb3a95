//! Accepting TCP connections for the gRPC, Health, HTTP and metrics ports.
//!
//! tonic sets `TCP_NODELAY` only on listeners it binds itself; ours are bound
//! here (the port opens before the backbones load), so every accepted socket
//! gets it here: without it a lone client's response waits ~40 ms for the
//! client's delayed ACK. The same place bounds what connections may cost: at
//! most `max_connections` open at once; a connection that sends nothing within
//! `first_byte_timeout`, or that has had no call in flight for `idle_timeout`,
//! is closed; and when the port is full the connection idle the longest makes
//! room for a newcomer (src/server/middleware/connections.rs). Only when every connection
//! has a call in flight is a newcomer closed at once, never queued.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{atomic::AtomicUsize, Arc},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Sleep,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use super::connections::{Activity, Admission, Entry, Registry, IDLE_GRACE};

/// What one port's connections may cost.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; beyond it the longest-idle one is closed,
    /// or, when all have calls in flight, the newcomer.
    pub max_connections: usize,
    /// A connection that has sent no byte this long after it was accepted is
    /// closed.
    pub first_byte_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// After an accept error (out of file descriptors, say) the loop pauses this
/// long instead of spinning on the same error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Refused and evicted connections are logged at most this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The accepted connections of `listener`, for `serve_with_incoming*`. `port`
/// names the port in logs. The accept loop ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    port: &'static str,
) -> ReceiverStream<io::Result<Connection>> {
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, limits, port, sender));
    ReceiverStream::new(receiver)
}

/// Logs an event of the accept loop at most once per REFUSAL_LOG_INTERVAL.
struct RateLimitedLog(Option<Instant>);

impl RateLimitedLog {
    fn due(&mut self) -> bool {
        let due = self.0.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL);
        if due {
            self.0 = Some(Instant::now());
        }
        due
    }
}

async fn accept_loop(
    listener: TcpListener,
    limits: ConnectionLimits,
    port: &'static str,
    sender: mpsc::Sender<io::Result<Connection>>,
) {
    let registry = Registry::new(limits.max_connections);
    let (mut refusals, mut evictions) = (RateLimitedLog(None), RateLimitedLog(None));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = sender.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(port, error = %err, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let entry = match registry.admit() {
            Admission::Admitted(entry) => entry,
            Admission::Evicted(entry) => {
                if evictions.due() {
                    tracing::info!(
                        port,
                        max_connections = limits.max_connections,
                        "the port is full: closed the connection idle the longest \
                         to admit a new one (server.max_connections)"
                    );
                }
                entry
            }
            Admission::Full => {
                // Dropping the socket closes it: the client learns at once.
                if refusals.due() {
                    tracing::warn!(
                        port,
                        max_connections = limits.max_connections,
                        "connection refused: every open connection has a call in \
                         flight (server.max_connections)"
                    );
                }
                continue;
            }
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(port, error = %err, "cannot set TCP_NODELAY");
        }
        let connection = Connection {
            stream,
            buffered: Arc::new(AtomicUsize::new(0)),
            unsent: Arc::new(AtomicUsize::new(0)),
            idle: IdleClock::new(limits.idle_timeout),
            entry,
            first_byte_deadline: Some(Box::pin(tokio::time::sleep(limits.first_byte_timeout))),
        };
        if sender.send(Ok(connection)).await.is_err() {
            return;
        }
    }
}

/// When a connection without calls is closed: after `timeout` without a call,
/// confirmed IDLE_GRACE later by an unchanged count of call starts and ends
/// (a request read just before the check reaches the services a moment later).
struct IdleClock {
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// The count of call changes seen when the timeout was first found passed.
    suspect: Option<u64>,
}

impl IdleClock {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            suspect: None,
        }
    }

    /// Whether the connection is to be closed as idle; otherwise the timer is
    /// armed to wake the task when that is next worth asking.
    fn expired(&mut self, activity: &Activity, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            let next = match (activity.idle_for(), self.suspect) {
                (None, _) => {
                    self.suspect = None;
                    self.timeout
                }
                (Some(idle), Some(seen)) if idle >= self.timeout && seen == activity.changes() => {
                    return true
                }
                (Some(idle), _) if idle >= self.timeout => {
                    self.suspect = Some(activity.changes());
                    IDLE_GRACE
                }
                (Some(idle), _) => {
                    self.suspect = None;
                    self.timeout - idle
                }
            };
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + next);
        }
        false
    }
}

/// An accepted connection; it holds its place among the port's open
/// connections until dropped.
pub struct Connection {
    stream: TcpStream,
    /// Bytes of unfinished request messages on this connection.
    buffered: Arc<AtomicUsize>,
    /// Bytes of answers on this connection not yet sent.
    unsent: Arc<AtomicUsize>,
    /// Its place among the port's connections, and whether a call is in flight.
    entry: Entry,
    idle: IdleClock,
    /// Until the first byte arrives.
    first_byte_deadline: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    /// The socket, for its options.
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Whether a call is in flight, for the services built per connection.
    pub fn activity(&self) -> &Arc<Activity> {
        self.entry.activity()
    }
}

fn closed_by_the_port() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed to make room for a new connection",
    )
}

/// What each call learns of its connection (in the request's extensions).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    /// Bytes of unfinished request messages on the connection, for
    /// limits.max_buffered_bytes_per_connection.
    pub buffered: Arc<AtomicUsize>,
    /// Bytes of answers on the connection not yet sent, for
    /// limits.max_unsent_response_bytes_per_connection.
    pub unsent: Arc<AtomicUsize>,
    /// Whether a call is in flight on the connection.
    pub activity: Arc<Activity>,
}

impl ConnectionInfo {
    /// The connection's info from a request's extensions, over TLS or not.
    pub fn of(extensions: &http::Extensions) -> Option<&ConnectionInfo> {
        extensions.get::<ConnectionInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            buffered: Arc::clone(&self.buffered),
            unsent: Arc::clone(&self.unsent),
            activity: Arc::clone(self.entry.activity()),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Registered before the check, so that a close after it wakes us.
        this.entry.activity().register(cx);
        if this.entry.activity().is_closing() {
            return Poll::Ready(Err(closed_by_the_port()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_byte_deadline = None,
            Poll::Pending => {
                if let Some(deadline) = this.first_byte_deadline.as_mut() {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client sent nothing after connecting",
                        )));
                    }
                }
                if this.idle.expired(this.entry.activity(), cx) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no call on the connection within server.connection_idle_timeout_seconds",
                    )));
                }
            }
            _ => {}
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.entry.activity().is_closing() {
            return Poll::Ready(Err(closed_by_the_port()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.entry.activity().is_closing() {
            return Poll::Ready(Err(closed_by_the_port()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    async fn port(
        limits: ConnectionLimits,
    ) -> (std::net::SocketAddr, ReceiverStream<io::Result<Connection>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, incoming(listener, limits, "test"))
    }

    const GENEROUS: ConnectionLimits = ConnectionLimits {
        max_connections: 8,
        first_byte_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(600),
    };

    #[tokio::test]
    async fn accepted_sockets_have_nagle_off() {
        let (addr, mut accepted) = port(GENEROUS).await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let connection = accepted.next().await.unwrap().unwrap();
        assert!(connection.socket().nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_is_closed_at_once() {
        let (addr, mut accepted) = port(ConnectionLimits {
            max_connections: 1,
            ..GENEROUS
        })
        .await;
        let _first = TcpStream::connect(addr).await.unwrap();
        let held = accepted.next().await.unwrap().unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        // Closed by the server: end of stream (or a reset), never a hang.
        let read = tokio::time::timeout(Duration::from_secs(10), second.read(&mut byte))
            .await
            .expect("the refused connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // Once the first closes, a new one is accepted.
        drop(held);
        let _third = TcpStream::connect(addr).await.unwrap();
        accepted.next().await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_reads_after_the_timeout() {
        let (addr, mut accepted) = port(ConnectionLimits {
            first_byte_timeout: Duration::from_millis(100),
            ..GENEROUS
        })
        .await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut connection = accepted.next().await.unwrap().unwrap();
        let mut buf = [0u8; 4];
        let err = connection.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// A client that has sent its first bytes, and its accepted connection
    /// that has read them.
    async fn spoken(limits: ConnectionLimits) -> (TcpStream, Connection) {
        let (addr, mut accepted) = port(limits).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"PRI").await.unwrap();
        let mut connection = accepted.next().await.unwrap().unwrap();
        let mut buf = [0u8; 3];
        connection.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"PRI");
        (client, connection)
    }

    #[tokio::test]
    async fn a_connection_that_speaks_is_not_timed_out() {
        let (mut client, mut connection) = spoken(ConnectionLimits {
            first_byte_timeout: Duration::from_millis(100),
            ..GENEROUS
        })
        .await;
        // Past the first-byte timeout, a quiet but established connection
        // still reads what comes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        connection.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
    }

    #[tokio::test]
    async fn a_connection_without_calls_is_closed_after_the_idle_timeout() {
        let (_client, mut connection) = spoken(ConnectionLimits {
            idle_timeout: Duration::from_millis(200),
            ..GENEROUS
        })
        .await;
        let mut buf = [0u8; 3];
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(10), connection.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // The timeout, then the grace that confirms no call began meanwhile.
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_full_port_closes_the_longest_idle_connection_for_a_newcomer() {
        let (addr, mut accepted) = port(ConnectionLimits {
            max_connections: 1,
            ..GENEROUS
        })
        .await;
        let _first = TcpStream::connect(addr).await.unwrap();
        let mut held = accepted.next().await.unwrap().unwrap();
        tokio::time::sleep(IDLE_GRACE).await;
        let _second = TcpStream::connect(addr).await.unwrap();
        accepted.next().await.unwrap().unwrap();
        let mut buf = [0u8; 1];
        let err = held.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
