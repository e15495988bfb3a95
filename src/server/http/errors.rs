//! The one place where library errors become HTTP answers, in the error shape
//! of the OpenAI API (`{"error": {"message", "type", "param", "code"}}`), so
//! that its client libraries raise their usual exception types.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;

use crate::{server::grpc::status::INTERNAL_MESSAGE, Error};

/// An HTTP error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// OpenAI's `code`, where it has one (`model_not_found`, `invalid_api_key`).
    pub code: Option<&'static str>,
    /// The request field at fault.
    pub param: Option<&'static str>,
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: crate::server::grpc::status::bounded(message.into()),
        }
    }

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        use StatusCode as S;
        let message = err.to_string();
        match &err {
            Error::BackboneNotFound(_) => Self::not_found(message)
                .with_code("model_not_found")
                .with_param("model"),
            Error::HeadNotFound(_) | Error::NotFound { .. } => Self::not_found(message),
            Error::InvalidInput { .. } => Self::invalid("input", message),
            Error::InvalidArgument(_) | Error::FailedPrecondition(_) | Error::LimitExceeded(_) => {
                Self::new(S::BAD_REQUEST, "invalid_request_error", message)
            }
            Error::QueueFull(_) => Self::new(S::TOO_MANY_REQUESTS, "rate_limit_error", message),
            Error::DeadlineExceeded(_) => Self::new(S::GATEWAY_TIMEOUT, "timeout_error", message),
            Error::TimedOut(_) => Self::new(S::REQUEST_TIMEOUT, "timeout_error", message),
            Error::BackboneLoading(_) | Error::BackboneFailed { .. } | Error::ShuttingDown => {
                Self::new(S::SERVICE_UNAVAILABLE, "server_error", message)
            }
            Error::Unauthenticated(_) => {
                Self::new(S::UNAUTHORIZED, "invalid_request_error", message)
                    .with_code("invalid_api_key")
            }
            Error::PermissionDenied(_) => Self::new(S::FORBIDDEN, "permission_error", message),
            Error::Cancelled(_) => Self::new(S::SERVICE_UNAVAILABLE, "server_error", message),
            Error::Unimplemented(_) => {
                Self::new(S::NOT_IMPLEMENTED, "invalid_request_error", message)
            }
            Error::Inference(_) | Error::ModelLoad(_) | Error::Storage(_) | Error::Internal(_) => {
                // The details are for the operator, logged under the request id
                // (the observing middleware's span); the client reads none.
                tracing::error!(error = %message, "server fault");
                Self::new(S::INTERNAL_SERVER_ERROR, "server_error", INTERNAL_MESSAGE)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        let encoded = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (
            self.status,
            [(http::header::CONTENT_TYPE, "application/json")],
            encoded,
        )
            .into_response();
        // The observing middleware logs the message with the request id.
        response
            .extensions_mut()
            .insert(LoggedMessage(self.message));
        response
    }
}

/// A 200 answer with `value` as its JSON body.
pub fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(http::header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => {
            ApiError::from(Error::Internal(format!("cannot encode JSON: {err}"))).into_response()
        }
    }
}

/// An error answer's message, for the log line of the request.
#[derive(Clone)]
pub struct LoggedMessage(pub String);
