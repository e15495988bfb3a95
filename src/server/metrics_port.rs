//! The Prometheus `/metrics` port, accepted through the same listener as the
//! gRPC port (connection bound, first-byte timeout, no Nagle) and served by a
//! small HTTP/1.1 server with a header timeout, so a slow or silent scraper
//! cannot pin sockets here either.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use super::listener::{self, ConnectionLimits};

/// A request's headers must arrive within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` from `handle` until the task is aborted.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, limits: ConnectionLimits) {
    let mut incoming = listener::incoming(listener, limits, "metrics");
    while let Some(accepted) = incoming.next().await {
        let Ok(connection) = accepted else { continue };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request, &handle);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(connection), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "metrics connection ended");
            }
        });
    }
}

fn respond(request: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method().as_str(), request.uri().path()) {
        ("GET", "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "only GET /metrics is served here\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}
