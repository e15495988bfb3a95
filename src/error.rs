//! The one error type of the library. The server maps each variant to a gRPC
//! status code in a single place (`server::grpc::status`).

use std::time::Duration;

/// Everything that can go wrong while serving a request or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named backbone is not configured on this server.
    #[error("backbone `{0}` is not configured on this server")]
    BackboneNotFound(String),

    /// The backbone is configured but its weights are still loading.
    #[error("backbone `{0}` is still loading; retry shortly")]
    BackboneLoading(String),

    /// The backbone could not be loaded at start-up.
    #[error("backbone `{name}` is unavailable: it failed to load ({reason})")]
    BackboneFailed { name: String, reason: String },

    /// One item of a request is unusable; `index` is its position in the request.
    #[error("input {index}: {reason}")]
    InvalidInput { index: usize, reason: String },

    /// The request as a whole is malformed.
    #[error("{0}")]
    InvalidArgument(String),

    /// The backbone's queue is full; the caller should back off and retry.
    #[error("backbone `{0}` is overloaded: its queue is full")]
    QueueFull(String),

    /// The request's deadline passed before its work was done.
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(Duration),

    /// The client took too long to send what the call needs.
    #[error("{0}")]
    TimedOut(String),

    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,

    /// A model failed while computing; a bug or a resource problem, not bad input.
    #[error("inference failed: {0}")]
    Inference(String),

    /// Loading or preparing a model failed.
    #[error("model loading failed: {0}")]
    ModelLoad(String),

    /// No head of that name (or no such version of it).
    #[error("head `{0}` does not exist")]
    HeadNotFound(String),

    /// No training job or uploaded dataset with that id.
    #[error("{kind} `{id}` does not exist")]
    NotFound { kind: &'static str, id: String },

    /// The request is valid but the system is not in a state to run it, e.g. a
    /// head whose backbone weights changed since it was trained.
    #[error("{0}")]
    FailedPrecondition(String),

    /// A configured limit would be exceeded (examples, jobs, heads).
    #[error("{0}")]
    LimitExceeded(String),

    /// Reading or writing the head store failed.
    #[error("head store: {0}")]
    Storage(String),

    /// The work was cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// A bug: a task died or an invariant broke. Never the client's fault.
    #[error("internal error: {0}")]
    Internal(String),

    /// The call carries no valid credentials.
    #[error("{0}")]
    Unauthenticated(String),

    /// The credentials do not allow the call.
    #[error("{0}")]
    PermissionDenied(String),

    /// The request asks for something this server does not do.
    #[error("{0}")]
    Unimplemented(String),
}

impl From<candle_core::Error> for Error {
    fn from(err: candle_core::Error) -> Self {
        Error::Inference(err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
