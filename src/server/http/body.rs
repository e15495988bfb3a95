//! The body of a JSON request, as an extractor: `Content-Type:
//! application/json`, read whole within the request limits and counted
//! against the budgets of unfinished request bytes that gRPC messages share.
//! A handler that takes a [`JsonBody`] gets these checks by its signature.

use std::{sync::Arc, time::Duration};

use axum::extract::{FromRequest, Request};
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;

use super::{errors::ApiError, ApiState};
use crate::{
    server::middleware::{listener::ConnectionInfo, message_limit::Held},
    Error,
};

/// A JSON request's body and its share of the unfinished-bytes budgets,
/// which lasts until `held` is dropped: the handler drops it once the body
/// is parsed.
pub struct JsonBody {
    pub bytes: Bytes,
    pub held: Held,
}

impl FromRequest<ApiState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, ApiError> {
        require_json(request.headers())?;
        let (bytes, held) = read_body(state, request).await?;
        Ok(Self { bytes, held })
    }
}

/// `Content-Type: application/json`, as OpenAI's clients send: a page of
/// another site can make a browser POST `text/plain` (or a form) without
/// asking CORS first, but not JSON.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        "send the request as JSON with `Content-Type: application/json`",
    ))
}

/// The request body, within `limits.max_message_bytes` and
/// `limits.message_timeout_seconds`, and its share of the budgets of
/// unfinished request bytes (per connection and in all, as gRPC messages).
async fn read_body(state: &ApiState, request: Request) -> Result<(Bytes, Held), ApiError> {
    let connection = ConnectionInfo::of(request.extensions()).map(|c| Arc::clone(&c.buffered));
    let mut held = state.body_limits.hold(connection);
    let timeout = Duration::from_secs_f64(state.limits.message_timeout_seconds);
    let read = collect_counted(
        request.into_body(),
        state.limits.max_message_bytes,
        &mut held,
    );
    match tokio::time::timeout(timeout, read).await {
        Err(_elapsed) => Err(Error::TimedOut(format!(
            "the request body did not arrive within {timeout:?} (limits.message_timeout_seconds)"
        ))
        .into()),
        Ok(Err(err)) => Err(err),
        Ok(Ok(body)) => Ok((body, held)),
    }
}

/// Reads `body` whole, at most `max` bytes, counting what it holds in `held`.
async fn collect_counted(
    mut body: axum::body::Body,
    max: usize,
    held: &mut Held,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than {max} bytes (limits.max_message_bytes), \
                 or was cut off: split the input"
            ),
        )
    };
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_broken| too_large())?.into_data() else {
            continue;
        };
        let total = collected.len().saturating_add(data.len());
        if total > max {
            return Err(too_large());
        }
        // Over a budget: the server is busy with other bodies, not this one
        // too large; the client may retry.
        held.set(total).map_err(|err| {
            ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                err.to_string(),
            )
        })?;
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
}
