//! Bounds on what request bodies may hold while they arrive.
//!
//! The request body is watched as it streams in: every gRPC message starts with a
//! 5-byte prefix (compression flag, big-endian u32 length), so an oversized message
//! is refused as soon as its prefix arrives, before any of it is buffered, with
//! RESOURCE_EXHAUSTED as the gRPC spec asks (tonic's own limit answers
//! OUT_OF_RANGE).
//!
//! A message that has begun but not ended is buffered until its last byte
//! arrives, so a client that declares large messages and then stalls could pin
//! memory for as long as its connection lives. Its bytes therefore count
//! against a budget per connection and one for the whole server, and a message
//! must arrive whole within a timeout.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;

use crate::{wire::framing::FrameScanner, Error};

/// What request bodies may hold, shared by every call.
#[derive(Debug)]
pub struct BodyLimits {
    pub max_message_bytes: usize,
    /// How long a message may take from its first byte to its last.
    pub message_timeout: Duration,
    /// Bytes of unfinished messages on one connection.
    pub max_buffered_per_connection: usize,
    /// Bytes of unfinished messages on all connections.
    pub max_buffered_total: usize,
    /// Bytes of unfinished messages now, all connections together.
    buffered: AtomicUsize,
}

impl BodyLimits {
    pub fn new(
        max_message_bytes: usize,
        message_timeout: Duration,
        max_buffered_per_connection: usize,
        max_buffered_total: usize,
    ) -> Self {
        Self {
            max_message_bytes,
            message_timeout,
            max_buffered_per_connection,
            max_buffered_total,
            buffered: AtomicUsize::new(0),
        }
    }

    /// Bytes of unfinished messages now held, all connections together.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }
}

/// The bytes one body holds against the server's and its connection's
/// budgets; given back when the message completes or the body is dropped.
struct Held {
    limits: Arc<BodyLimits>,
    connection: Option<Arc<AtomicUsize>>,
    bytes: usize,
}

impl Held {
    /// Moves the held amount to `bytes`, or refuses when a budget would be
    /// exceeded (nothing changes then).
    fn set(&mut self, bytes: usize) -> Result<(), Status> {
        if bytes <= self.bytes {
            self.release(self.bytes - bytes);
            return Ok(());
        }
        let more = bytes - self.bytes;
        let total = self.limits.buffered.fetch_add(more, Ordering::AcqRel) + more;
        let connection = self
            .connection
            .as_ref()
            .map_or(0, |c| c.fetch_add(more, Ordering::AcqRel) + more);
        self.bytes = bytes;
        if total > self.limits.max_buffered_total {
            return Err(Status::from(Error::LimitExceeded(format!(
                "the server holds {total} bytes of unfinished request messages, more than \
                 limits.max_buffered_request_bytes ({}); retry later",
                self.limits.max_buffered_total
            ))));
        }
        if connection > self.limits.max_buffered_per_connection {
            return Err(Status::from(Error::LimitExceeded(format!(
                "this connection holds {connection} bytes of unfinished request messages, \
                 more than limits.max_buffered_bytes_per_connection ({})",
                self.limits.max_buffered_per_connection
            ))));
        }
        Ok(())
    }

    fn release(&mut self, bytes: usize) {
        self.limits.buffered.fetch_sub(bytes, Ordering::AcqRel);
        if let Some(connection) = &self.connection {
            connection.fetch_sub(bytes, Ordering::AcqRel);
        }
        self.bytes -= bytes;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release(self.bytes);
    }
}

pin_project_lite::pin_project! {
    /// A request body bounded as the module says: message size, unfinished
    /// bytes per connection and in all, time from a message's first byte to
    /// its last.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        scanner: FrameScanner,
        held: Held,
        // Running while a message is under way.
        message_deadline: Option<Pin<Box<Sleep>>>,
        failed: bool,
    }
}

impl<B> LimitedBody<B> {
    /// `connection` counts the unfinished bytes of the call's connection.
    pub fn new(inner: B, limits: Arc<BodyLimits>, connection: Option<Arc<AtomicUsize>>) -> Self {
        Self {
            inner,
            scanner: FrameScanner::new(limits.max_message_bytes),
            held: Held {
                limits,
                connection,
                bytes: 0,
            },
            message_deadline: None,
            failed: false,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Pending => {
                let expired = this
                    .message_deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                *this.failed = true;
                let timeout = this.held.limits.message_timeout;
                return Poll::Ready(Some(Err(Status::from(Error::TimedOut(format!(
                    "a request message did not arrive whole within {} s \
                     (limits.message_timeout_seconds)",
                    timeout.as_secs_f64()
                ))))));
            }
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let outcome = match this.scanner.scan(data) {
                Err(len) => Err(Status::from(Error::LimitExceeded(format!(
                    "request message is {len} bytes; this server accepts at most {} \
                     (limits.max_message_bytes)",
                    this.scanner.limit
                )))),
                Ok(()) => this.held.set(this.scanner.pending()),
            };
            if let Err(status) = outcome {
                *this.failed = true;
                return Poll::Ready(Some(Err(status)));
            }
            match (this.scanner.pending(), this.message_deadline.is_some()) {
                (0, _) => *this.message_deadline = None,
                (_, false) => {
                    *this.message_deadline = Some(Box::pin(tokio::time::sleep(
                        this.held.limits.message_timeout,
                    )))
                }
                _ => {}
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_respect_both_budgets_and_come_back_on_drop() {
        let limits = Arc::new(BodyLimits::new(100, Duration::from_secs(1), 50, 80));
        let connection = Arc::new(AtomicUsize::new(0));
        let mut a = Held {
            limits: Arc::clone(&limits),
            connection: Some(Arc::clone(&connection)),
            bytes: 0,
        };
        a.set(40).unwrap();
        assert!(a.set(60).is_err(), "over the connection's 50");
        let mut b = Held {
            limits: Arc::clone(&limits),
            connection: None,
            bytes: 0,
        };
        assert!(b.set(30).is_err(), "over the server's 80");
        drop(a);
        drop(b);
        assert_eq!(limits.buffered(), 0);
        assert_eq!(connection.load(Ordering::Acquire), 0);
    }
}
