//! Bounds on what answers may hold until their client reads them.
//!
//! An answer's bytes stay in memory from when it is built until HTTP/2 has
//! written them to the socket, which flow control holds back for as long as
//! the client does not read. They count against a budget per connection and
//! one for the whole server: a use case that knows its answer's size reserves
//! it before the work (`core::AnswerBudget`), every answer's bytes are
//! counted as they leave the service until they are written or dropped, and
//! a call that arrives while its connection or the server is over budget is
//! refused at once with RESOURCE_EXHAUSTED.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

use bytes::Bytes;
use tonic::Status;

use crate::{core::AnswerBudget, Error, Result};

/// What unsent answers may hold, shared by every call.
#[derive(Debug)]
pub struct ResponseLimits {
    /// Bytes of unsent answers on one connection.
    pub max_per_connection: usize,
    /// Bytes of unsent answers on all connections.
    pub max_total: usize,
    /// Bytes of unsent answers now, all connections together.
    unsent: AtomicUsize,
}

impl ResponseLimits {
    pub fn new(max_per_connection: usize, max_total: usize) -> Self {
        Self {
            max_per_connection,
            max_total,
            unsent: AtomicUsize::new(0),
        }
    }

    /// Bytes of unsent answers now held, all connections together.
    pub fn unsent(&self) -> usize {
        self.unsent.load(Ordering::Acquire)
    }

    /// One call's share, on the connection whose counter is `connection`.
    pub fn call(self: &Arc<Self>, connection: Option<Arc<AtomicUsize>>) -> Arc<CallBudget> {
        Arc::new(CallBudget {
            limits: Arc::clone(self),
            connection,
            held: Mutex::new(Held::default()),
        })
    }
}

#[derive(Default)]
struct Held {
    /// Bytes reserved before the work.
    reserved: usize,
    /// Bytes of the answer that left the service and are not yet written.
    unsent: usize,
    /// Bytes taken from the budgets: the larger of the two.
    taken: usize,
}

/// One call's share of the budgets, given back when the call, its answer and
/// the last of the answer's bytes are gone (written to the socket, or
/// dropped with the stream).
pub struct CallBudget {
    limits: Arc<ResponseLimits>,
    connection: Option<Arc<AtomicUsize>>,
    held: Mutex<Held>,
}

impl CallBudget {
    fn connection_unsent(&self) -> usize {
        self.connection
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Refuses a call that arrives while its connection or the server holds
    /// its most unsent answers.
    pub fn admit(&self) -> std::result::Result<(), Status> {
        self.check(0).map_err(Status::from)
    }

    /// Ok when `more` bytes fit both budgets now.
    fn check(&self, more: usize) -> Result<()> {
        let limits = &self.limits;
        let connection = self.connection_unsent();
        if connection.saturating_add(more) > limits.max_per_connection
            || (more == 0 && connection >= limits.max_per_connection)
        {
            return Err(Error::LimitExceeded(format!(
                "this connection holds {connection} bytes of answers its client has not read \
                 and this call needs {more} more; limits.max_unsent_response_bytes_per_connection \
                 is {}: read the answers, or retry later",
                limits.max_per_connection
            )));
        }
        let total = limits.unsent();
        if total.saturating_add(more) > limits.max_total || (more == 0 && total >= limits.max_total)
        {
            return Err(Error::LimitExceeded(format!(
                "the server holds {total} bytes of answers not yet read and this call needs \
                 {more} more; limits.max_unsent_response_bytes is {}: retry later",
                limits.max_total
            )));
        }
        Ok(())
    }

    /// Moves what the call takes from both budgets to the larger of its
    /// reservation and its unsent bytes.
    fn settle(&self, held: &mut Held) {
        let taken = held.reserved.max(held.unsent);
        let counters = std::iter::once(&self.limits.unsent).chain(self.connection.as_deref());
        for counter in counters {
            if taken > held.taken {
                counter.fetch_add(taken - held.taken, Ordering::AcqRel);
            } else {
                counter.fetch_sub(held.taken - taken, Ordering::AcqRel);
            }
        }
        held.taken = taken;
    }

    /// Counts `data`, a piece of the answer, until it is written or dropped:
    /// the returned bytes give it back then.
    pub fn hold(self: &Arc<Self>, data: Bytes) -> Bytes {
        let mut held = crate::sync::lock(&self.held);
        held.unsent = held.unsent.saturating_add(data.len());
        self.settle(&mut held);
        drop(held);
        Bytes::from_owner(Unsent {
            data,
            budget: Arc::clone(self),
        })
    }
}

impl AnswerBudget for CallBudget {
    fn reserve(&self, bytes: usize) -> Result<()> {
        let mut held = crate::sync::lock(&self.held);
        self.check(bytes)?;
        held.reserved = held.reserved.saturating_add(bytes);
        self.settle(&mut held);
        Ok(())
    }
}

impl Drop for CallBudget {
    fn drop(&mut self) {
        let mut held = crate::sync::lock(&self.held);
        held.reserved = 0;
        held.unsent = 0;
        self.settle(&mut held);
    }
}

/// A piece of an answer on its way to the socket, counted until dropped.
struct Unsent {
    data: Bytes,
    budget: Arc<CallBudget>,
}

impl AsRef<[u8]> for Unsent {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        let mut held = crate::sync::lock(&self.budget.held);
        held.unsent = held.unsent.saturating_sub(self.data.len());
        self.budget.settle(&mut held);
    }
}

/// The call's share, in the request's extensions for the services.
#[derive(Clone)]
pub struct CallAnswers(pub Arc<CallBudget>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_reserved_counted_and_given_back_with_the_last_byte() {
        let limits = Arc::new(ResponseLimits::new(100, 150));
        let connection = Arc::new(AtomicUsize::new(0));
        let first = limits.call(Some(Arc::clone(&connection)));
        first.admit().unwrap();
        first.reserve(60).unwrap();
        assert!(first.reserve(41).is_err(), "over the connection's 100");
        // An answer larger than its reservation counts in full.
        let piece = first.hold(Bytes::from(vec![7u8; 80]));
        assert_eq!(
            (limits.unsent(), connection.load(Ordering::Acquire)),
            (80, 80)
        );
        let other = limits.call(None);
        other.reserve(60).unwrap();
        let third = limits.call(None);
        assert!(third.admit().is_ok(), "140 of 150");
        assert!(third.reserve(11).is_err(), "over the server's 150");
        third.reserve(10).unwrap();
        assert!(limits.call(None).admit().is_err(), "the server's 150 spent");
        drop((first, other, third));
        // The answer's last piece still waits for the socket.
        assert_eq!(limits.unsent(), 80);
        assert_eq!(piece.len(), 80);
        drop(piece);
        assert_eq!(
            (limits.unsent(), connection.load(Ordering::Acquire)),
            (0, 0)
        );
    }

    #[test]
    fn a_stream_counts_what_is_unsent_not_all_it_sent() {
        let limits = Arc::new(ResponseLimits::new(100, 100));
        let stream = limits.call(None);
        for _ in 0..10 {
            let event = stream.hold(Bytes::from(vec![1u8; 60]));
            assert_eq!(limits.unsent(), 60);
            drop(event);
            assert_eq!(limits.unsent(), 0);
        }
        stream.reserve(30).unwrap();
        let event = stream.hold(Bytes::from(vec![1u8; 10]));
        assert_eq!(limits.unsent(), 30, "within the reservation");
        drop((event, stream));
        assert_eq!(limits.unsent(), 0);
    }

    #[test]
    fn a_full_connection_refuses_new_calls() {
        let limits = Arc::new(ResponseLimits::new(100, 1000));
        let connection = Arc::new(AtomicUsize::new(0));
        let first = limits.call(Some(Arc::clone(&connection)));
        first.reserve(100).unwrap();
        let second = limits.call(Some(Arc::clone(&connection)));
        assert!(second.admit().is_err());
        assert!(limits.call(None).admit().is_ok(), "other connections go on");
    }
}
