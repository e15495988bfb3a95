//! Around every HTTP request: a request id (the client's `x-request-id` when
//! sane, else a new one) in a span and on the response, one log line with the
//! outcome, and the request's metrics. gRPC-Web calls are left to the gRPC
//! request layer, which does the same for them.

use std::time::Instant;

use axum::{extract::MatchedPath, extract::Request, middleware::Next, response::Response};
use http::HeaderValue;
use tracing::Instrument;

use super::{errors::LoggedMessage, routes};
use crate::{
    metrics,
    server::middleware::request_id::{request_id, REQUEST_ID_HEADER},
};

pub async fn observe(request: Request, next: Next) -> Response {
    let Some(route) = route_label(&request) else {
        return next.run(request).await;
    };
    let started = Instant::now();
    let id = request_id(request.headers());
    let span = tracing::info_span!("http", request_id = %id, method = %request.method(), route,
        token = tracing::field::Empty);
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let status = response.status();
    let elapsed = started.elapsed();
    metrics::record_http(route, status.as_u16(), elapsed);
    let _entered = span.enter();
    let millis = elapsed.as_secs_f64() * 1e3;
    match response.extensions().get::<LoggedMessage>() {
        // What a client sent may come back in a message: escaped by Debug.
        Some(LoggedMessage(message)) if status.is_server_error() => {
            tracing::warn!(status = status.as_u16(), millis, message = ?message, "request failed")
        }
        Some(LoggedMessage(message)) => {
            tracing::info!(status = status.as_u16(), millis, message = ?message, "request refused")
        }
        None => tracing::info!(status = status.as_u16(), millis, "request done"),
    }
    response
}

/// A bounded label for the request's route (the table's, see
/// [`routes::labels`]); None for gRPC-Web calls.
fn route_label(request: &Request) -> Option<&'static str> {
    let matched = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|path| routes::find(path.as_str()));
    match matched {
        Some(route) => Some(route.label),
        None if is_grpc_web(request) => None,
        None => Some(routes::OTHER),
    }
}

pub fn is_grpc_web(request: &Request) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc-web"))
}
