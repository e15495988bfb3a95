//! The one place where library errors become gRPC statuses.

use tonic::{Code, Status};

use crate::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::BackboneNotFound(_) | Error::HeadNotFound(_) | Error::NotFound { .. } => {
                Code::NotFound
            }
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::LimitExceeded(_) => Code::ResourceExhausted,
            Error::Cancelled(_) => Code::Cancelled,
            Error::Storage(_) => Code::Internal,
            Error::InvalidInput { .. } | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::QueueFull(_) => Code::ResourceExhausted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::BackboneLoading(_) | Error::BackboneFailed { .. } | Error::ShuttingDown => {
                Code::Unavailable
            }
            Error::Inference(_) | Error::ModelLoad(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %err, "request failed");
        } else {
            tracing::info!(error = %err, code = code_name(code), "request refused");
        }
        Status::new(code, err.to_string())
    }
}

/// The canonical upper-case name of a code, as in the gRPC spec and our metrics.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_precise_codes() {
        let cases = [
            (Error::BackboneNotFound("x".into()), Code::NotFound),
            (
                Error::InvalidInput {
                    index: 3,
                    reason: "text is empty".into(),
                },
                Code::InvalidArgument,
            ),
            (Error::QueueFull("x".into()), Code::ResourceExhausted),
            (
                Error::DeadlineExceeded(std::time::Duration::ZERO),
                Code::DeadlineExceeded,
            ),
            (Error::BackboneLoading("x".into()), Code::Unavailable),
            (Error::ShuttingDown, Code::Unavailable),
            (Error::Inference("boom".into()), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
        let status = Status::from(Error::InvalidInput {
            index: 3,
            reason: "text is empty".into(),
        });
        assert_eq!(status.message(), "input 3: text is empty");
    }

    #[test]
    fn code_names_round_trip_through_numbers() {
        for n in 0..=16 {
            let code = Code::from_i32(n);
            assert_eq!(code as i32, n);
            assert!(code_name(code)
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_'));
        }
    }
}
