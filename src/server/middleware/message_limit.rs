//! Bounds on what request bodies may hold while they arrive.
//!
//! The request body is watched as it streams in: every gRPC message starts with a
//! 5-byte prefix (compression flag, big-endian u32 length), so an oversized message
//! is refused as soon as its prefix arrives, before any of it is buffered, with
//! RESOURCE_EXHAUSTED as the gRPC spec asks (tonic's own limit answers
//! OUT_OF_RANGE).
//!
//! The elements of a request's repeated field (Embed's and Predict's inputs,
//! TrainHead's and uploads' examples) are counted in the message's bytes as
//! they arrive, so a message of millions of empty elements is refused by
//! count (with the code the decoded check gives) before it is decoded.
//!
//! A message that has begun but not ended is buffered until its last byte
//! arrives, so a client that declares large messages and then stalls could pin
//! memory for as long as its connection lives. Its bytes therefore count
//! against a budget per connection and one for the whole server, and a message
//! must arrive whole within a timeout.
//!
//! A body that declares itself and sends nothing (an HTTP/1.1 Content-Length
//! with no bytes, a chunked body that never ends) holds its call and its
//! connection just as long, so the body itself is timed as well: a call of
//! one request message must receive the whole body, its end included, within
//! the timeout of its start; a client stream must bring its next message (or
//! its end) within the timeout of the last one.
//!
//! When the body is what fails (the client's bytes are malformed, cut short,
//! flagged compressed without an encoding, or too slow) the call is marked
//! [`ClientFault`], so that it is counted and logged as the client's mistake,
//! whatever code the gRPC specification gives it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;

use crate::{
    wire::{
        field_count::{counted_field, Elements, FieldCounter},
        framing::{FrameScanner, Refusal},
    },
    Error,
};

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
    /// Most inputs in one message (limits.max_inputs_per_request).
    pub max_inputs: usize,
    /// Most examples in one message (heads.max_examples_per_job).
    pub max_examples: usize,
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
            max_inputs: usize::MAX,
            max_examples: usize::MAX,
        }
    }

    /// Bounds the inputs and examples one message may hold.
    pub fn counting(mut self, max_inputs: usize, max_examples: usize) -> Self {
        self.max_inputs = max_inputs;
        self.max_examples = max_examples;
        self
    }

    /// The scanner of a call to `method`, counting what its messages hold.
    fn scanner(&self, method: &str) -> FrameScanner {
        let scanner = FrameScanner::new(self.max_message_bytes);
        match counted_field(method) {
            Some((Elements::Inputs, path)) => {
                scanner.counting(FieldCounter::new(path, self.max_inputs))
            }
            Some((Elements::Examples, path)) => {
                scanner.counting(FieldCounter::new(path, self.max_examples))
            }
            None => scanner,
        }
    }

    /// Why a message was refused, with the code the checks of the decoded
    /// request give.
    fn refusal(&self, method: &str, refusal: Refusal) -> Status {
        Status::from(match (refusal, counted_field(method)) {
            (Refusal::TooLarge(len), _) => Error::LimitExceeded(format!(
                "request message is {len} bytes; this server accepts at most {} \
                 (limits.max_message_bytes)",
                self.max_message_bytes
            )),
            (Refusal::TooMany(count), Some((Elements::Examples, _))) => {
                Error::LimitExceeded(format!(
                    "{count} examples or more in one message; a job takes at most {} \
                     (heads.max_examples_per_job)",
                    self.max_examples
                ))
            }
            (Refusal::TooMany(count), _) => Error::InvalidArgument(format!(
                "{count} inputs or more in one request; this server accepts at most {} \
                 (limits.max_inputs_per_request): split the request",
                self.max_inputs
            )),
        })
    }

    /// Bytes of unfinished messages now held, all connections together.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// A body's share of the budgets, on the connection whose counter is
    /// `connection`: for bodies read whole before they are used (the HTTP
    /// API's JSON), held until the share is dropped.
    pub fn hold(self: &Arc<Self>, connection: Option<Arc<AtomicUsize>>) -> Held {
        Held {
            limits: Arc::clone(self),
            connection,
            bytes: 0,
        }
    }
}

/// How a call's request messages arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// One message (unary and server-streaming calls).
    Single,
    /// A client stream of messages.
    Stream,
}

/// Set when a call failed because of what its client sent (or did not send).
#[derive(Debug, Default)]
pub struct ClientFault(AtomicBool);

impl ClientFault {
    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the request body failed on the client's side.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What a [`LimitedBody`] knows of its call.
pub struct CallShape {
    pub arrival: Arrival,
    /// Whether the request names a `grpc-encoding`: without one, a message
    /// flagged compressed is malformed.
    pub encoded: bool,
    pub fault: Arc<ClientFault>,
}

/// The bytes one body holds against the server's and its connection's
/// budgets; given back when the message completes or the body is dropped.
pub struct Held {
    limits: Arc<BodyLimits>,
    connection: Option<Arc<AtomicUsize>>,
    bytes: usize,
}

impl Held {
    /// Moves the held amount to `bytes`, or refuses when a budget would be
    /// exceeded (the amount is held until dropped all the same).
    pub fn set(&mut self, bytes: usize) -> crate::Result<()> {
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
            return Err(Error::LimitExceeded(format!(
                "the server holds {total} bytes of unfinished request messages, more than \
                 limits.max_buffered_request_bytes ({}); retry later",
                self.limits.max_buffered_total
            )));
        }
        if connection > self.limits.max_buffered_per_connection {
            return Err(Error::LimitExceeded(format!(
                "this connection holds {connection} bytes of unfinished request messages, \
                 more than limits.max_buffered_bytes_per_connection ({})",
                self.limits.max_buffered_per_connection
            )));
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
    /// its last, and time for the body and its end.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        scanner: FrameScanner,
        // The method's path, for messages about refusals.
        method: String,
        held: Held,
        // Running while a message is under way.
        message_deadline: Option<Pin<Box<Sleep>>>,
        // Running until the body ends: from the call's start for a single
        // message, from the last message for a stream.
        body_deadline: Option<Pin<Box<Sleep>>>,
        shape: CallShape,
        failed: bool,
    }
}

impl<B> LimitedBody<B> {
    /// A body of a call to `method`; `connection` counts the unfinished
    /// bytes of the call's connection.
    pub fn new(
        inner: B,
        method: &str,
        limits: Arc<BodyLimits>,
        connection: Option<Arc<AtomicUsize>>,
        shape: CallShape,
    ) -> Self {
        Self {
            inner,
            scanner: limits.scanner(method),
            method: method.to_owned(),
            body_deadline: Some(Box::pin(tokio::time::sleep(limits.message_timeout))),
            held: limits.hold(connection),
            message_deadline: None,
            shape,
            failed: false,
        }
    }
}

/// Whether `deadline` is set and has passed (registering the waker if not).
fn passed(deadline: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    deadline
        .as_mut()
        .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready())
}

/// The error of a body that did not arrive in time.
fn too_slow(what: &str, timeout: Duration) -> Status {
    Status::from(Error::TimedOut(format!(
        "{what} did not arrive within {} s (limits.message_timeout_seconds)",
        timeout.as_secs_f64()
    )))
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
        let mut this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Pending => {
                let timeout = this.held.limits.message_timeout;
                let late = if passed(this.message_deadline, cx) {
                    "a request message"
                } else if passed(this.body_deadline, cx) {
                    match this.shape.arrival {
                        Arrival::Single => "the whole request, with its end,",
                        Arrival::Stream => "the next request message (or the end of the stream)",
                    }
                } else {
                    return Poll::Pending;
                };
                *this.failed = true;
                this.shape.fault.set();
                return Poll::Ready(Some(Err(too_slow(late, timeout))));
            }
            Poll::Ready(Some(Err(status))) => {
                // Malformed framing below us (gRPC-Web's base64), or a body
                // the client broke off.
                this.shape.fault.set();
                return Poll::Ready(Some(Err(status)));
            }
            Poll::Ready(None) => {
                if this.scanner.pending() > 0 {
                    // Cut off inside a message: the decoder answers INTERNAL.
                    this.shape.fault.set();
                }
                *this.body_deadline = None;
                *this.message_deadline = None;
                return Poll::Ready(None);
            }
        };
        if let Some(data) = frame.data_ref() {
            let before = (this.scanner.pending(), this.scanner.completed());
            let outcome = match this.scanner.scan(data) {
                Err(refusal) => Err(this.held.limits.refusal(this.method, refusal)),
                Ok(()) => this.held.set(this.scanner.pending()).map_err(Status::from),
            };
            if let Err(status) = outcome {
                *this.failed = true;
                return Poll::Ready(Some(Err(status)));
            }
            if this.scanner.saw_compressed() && !this.shape.encoded {
                this.shape.fault.set();
            }
            let timeout = this.held.limits.message_timeout;
            match (this.scanner.pending(), this.message_deadline.is_some()) {
                (0, _) => *this.message_deadline = None,
                (_, false) => *this.message_deadline = Some(Box::pin(tokio::time::sleep(timeout))),
                _ => {}
            }
            let progressed = this.scanner.completed() != before.1
                || (before.0 == 0 && this.scanner.pending() > 0);
            if this.shape.arrival == Arrival::Stream && progressed {
                *this.body_deadline = Some(Box::pin(tokio::time::sleep(timeout)));
            }
        }
        if this.inner.is_end_stream() {
            *this.body_deadline = None;
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
