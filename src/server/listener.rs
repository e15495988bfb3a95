//! Accepting TCP connections for the gRPC and Health ports.
//!
//! tonic sets `TCP_NODELAY` only on listeners it binds itself; ours are bound
//! here (the port opens before the backbones load), so every accepted socket
//! gets it here: without it a lone client's response waits ~40 ms for the
//! client's delayed ACK. The same place bounds what connections may cost: at
//! most `max_connections` open at once (more are closed at once, never queued)
//! and a connection that sends nothing within `first_byte_timeout` is closed,
//! so silent sockets cannot exhaust file descriptors.

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
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// What one port's connections may cost.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; further ones are closed as they arrive.
    pub max_connections: usize,
    /// A connection that has sent no byte this long after it was accepted is
    /// closed.
    pub first_byte_timeout: Duration,
}

/// After an accept error (out of file descriptors, say) the loop pauses this
/// long instead of spinning on the same error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Refused connections are logged at most this often.
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

async fn accept_loop(
    listener: TcpListener,
    limits: ConnectionLimits,
    port: &'static str,
    sender: mpsc::Sender<io::Result<Connection>>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut last_refusal_log: Option<Instant> = None;
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
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            // Dropping the socket closes it: the client learns at once.
            if last_refusal_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                last_refusal_log = Some(Instant::now());
                tracing::warn!(
                    port,
                    max_connections = limits.max_connections,
                    "connection refused: the port has its most open connections \
                     (server.max_connections)"
                );
            }
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(port, error = %err, "cannot set TCP_NODELAY");
        }
        let connection = Connection {
            stream,
            buffered: Arc::new(AtomicUsize::new(0)),
            _permit: permit,
            first_byte_deadline: Some(Box::pin(tokio::time::sleep(limits.first_byte_timeout))),
        };
        if sender.send(Ok(connection)).await.is_err() {
            return;
        }
    }
}

/// An accepted connection; it holds its place among the port's open
/// connections until dropped.
pub struct Connection {
    stream: TcpStream,
    /// Bytes of unfinished request messages on this connection.
    buffered: Arc<AtomicUsize>,
    _permit: OwnedSemaphorePermit,
    /// Until the first byte arrives.
    first_byte_deadline: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    /// The socket, for its options.
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }
}

/// What each call learns of its connection (in the request's extensions).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    /// Bytes of unfinished request messages on the connection, for
    /// limits.max_buffered_bytes_per_connection.
    pub buffered: Arc<AtomicUsize>,
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
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_byte_deadline = None,
            Poll::Pending => {
                if let Some(deadline) = self.first_byte_deadline.as_mut() {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client sent nothing after connecting",
                        )));
                    }
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
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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

    #[tokio::test]
    async fn a_connection_that_speaks_is_not_timed_out() {
        let (addr, mut accepted) = port(ConnectionLimits {
            first_byte_timeout: Duration::from_millis(100),
            ..GENEROUS
        })
        .await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"PRI").await.unwrap();
        let mut connection = accepted.next().await.unwrap().unwrap();
        let mut buf = [0u8; 3];
        connection.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"PRI");
        // Past the first-byte timeout, a quiet but established connection
        // still reads what comes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        connection.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
    }
}
