//! What an answer may cost until its client has read it.
//!
//! An answer is held in memory from when it is built until the client reads
//! it, so a client that asks for large answers and never reads them could
//! pin memory without bound. Use cases that know an answer's size before the
//! work (Predict: inputs x labels returned x their length) reserve it against
//! the transport's budget first, and are refused at once when it is spent.

use crate::Result;

/// Where a transport keeps the bytes its unsent answers hold.
pub trait AnswerBudget: Send + Sync {
    /// Reserves `bytes` for the answer of the current call, or refuses them
    /// (RESOURCE_EXHAUSTED) when the budget would be exceeded; the
    /// reservation lasts until the answer has been sent or abandoned.
    fn reserve(&self, bytes: usize) -> Result<()>;
}

/// For callers whose answers are bounded elsewhere: every reservation passes.
pub struct Unbudgeted;

impl AnswerBudget for Unbudgeted {
    fn reserve(&self, _bytes: usize) -> Result<()> {
        Ok(())
    }
}
