//! The HTTP/1.1 ports: the HTTP API port (OpenAI-compatible embeddings, the
//! web console and gRPC-Web for it) and the Prometheus `/metrics` port.
//!
//! Both accept through the same listener as the gRPC port (connection bound,
//! first-byte timeout, no Nagle), give every request's headers a deadline so a
//! slow or silent client cannot pin sockets, and on shutdown stop accepting and
//! let requests in flight finish within the grace period.
//!
//! `routes.rs` lists the API port's routes once (path, method, metric label,
//! role, handler); a route's token check is a layer derived from its role,
//! and a JSON route's body limits come with its [`body::JsonBody`] extractor.

mod body;
mod console;
mod embeddings_request;
mod errors;
mod observe;
mod openai;
mod routes;
mod tls;

use std::{sync::Arc, time::Duration};

use axum::{
    extract::Request,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tower::{Layer, ServiceExt};

use super::{
    bind,
    grpc::{self, CallLimits, GrpcWeb},
    middleware::{
        auth::Authenticator,
        browser,
        connections::{TrackCalls, Tracked},
        listener::{self, ConnectionLimits},
        message_limit::BodyLimits,
    },
    ServeError,
};
use crate::{
    app::App,
    config::{Config, LimitsConfig},
    core, metrics,
};

pub use errors::ApiError;
pub use tls::HttpTlsError;

/// A request's headers must arrive within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP API's handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub embedder: Arc<core::Embedder>,
    pub catalog: Arc<core::Catalog>,
    /// None: authentication off.
    pub auth: Option<Arc<Authenticator>>,
    pub limits: LimitsConfig,
    /// The budgets of unfinished request bytes, shared with gRPC.
    pub body_limits: Arc<BodyLimits>,
    /// When the server started, for `/v1/models`' `created`.
    pub started_unix: u64,
}

/// The HTTP API port's routes ([`routes::ROUTES`]), with gRPC-Web for any
/// other path, and their metrics registered at zero.
pub fn api_router(state: ApiState, grpc_web: GrpcWeb) -> Router {
    for label in routes::labels() {
        metrics::register_http_route(label);
    }
    routes::router(&state)
        .fallback(move |request: Request| grpc_web_or_not_found(request, grpc_web.clone()))
        .layer(axum::middleware::from_fn(observe::observe))
        .with_state(state)
}

/// gRPC-Web calls (by content type) go to the gRPC services; anything else
/// is a path this port does not serve.
async fn grpc_web_or_not_found(request: Request, grpc_web: GrpcWeb) -> Response {
    if !observe::is_grpc_web(&request) {
        return ApiError::not_found(format!(
            "{} {} is not served here: see /v1/embeddings, /v1/models and /console/",
            request.method(),
            request.uri().path()
        ))
        .into_response();
    }
    match grpc_web.oneshot(request).await {
        Ok(response) => response.into_response(),
        Err(never) => match never {},
    }
}

/// The `/metrics` port's routes.
pub fn metrics_router(handle: metrics_exporter_prometheus::PrometheusHandle) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = handle.render();
                async move {
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        text,
                    )
                }
            }),
        )
        .fallback(|| async {
            (
                http::StatusCode::NOT_FOUND,
                "only GET /metrics is served here\n",
            )
        })
}

/// One HTTP port: what it serves and how.
pub struct Port {
    pub router: Router,
    pub limits: ConnectionLimits,
    /// Names the port in logs.
    pub name: &'static str,
    /// TLS with the gRPC port's certificate; None: plaintext.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves `port` on `listener` until `stop` is cancelled, then lets the
/// requests in flight finish for up to `grace`.
pub async fn serve(listener: TcpListener, port: Port, stop: CancellationToken, grace: Duration) {
    let name = port.name;
    let mut incoming = listener::incoming(listener, port.limits, name);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = incoming.next() => accepted,
            () = stop.cancelled() => break,
        };
        let Some(accepted) = accepted else { break };
        let Ok(connection) = accepted else { continue };
        // Calls learn their connection, for its budgets (as on the gRPC port).
        let router = port
            .router
            .clone()
            .layer(axum::Extension(connection.connect_info()));
        let tracked = TrackCalls::for_connection(Arc::clone(connection.activity())).layer(router);
        let service = TowerToHyperService::new(tracked);
        let watcher = graceful.watcher();
        let tls = port.tls.clone();
        tokio::spawn(async move {
            let served = match tls {
                None => watcher.watch(http1_connection(connection, service)).await,
                Some(acceptor) => {
                    // The handshake, like the headers, must not take forever.
                    let handshake =
                        tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(connection));
                    match handshake.await {
                        Ok(Ok(secured)) => watcher.watch(http1_connection(secured, service)).await,
                        Ok(Err(err)) => {
                            tracing::debug!(port = name, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_elapsed) => return,
                    }
                }
            };
            if let Err(err) = served {
                tracing::debug!(port = name, error = %err, "HTTP connection ended");
            }
        });
    }
    drop(incoming);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            port = name,
            "HTTP requests still running after the grace period were cut off"
        );
    }
}

/// An HTTP/1.1 connection over `io` whose request headers must arrive within
/// HEADER_TIMEOUT.
fn http1_connection<I>(
    io: I,
    service: TowerToHyperService<Tracked<Router>>,
) -> http1::Connection<TokioIo<I>, TowerToHyperService<Tracked<Router>>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
}

/// Installs the metrics recorder and serves it on `server.metrics_listen`
/// until the task is aborted.
pub(super) async fn start_metrics_port(
    config: &Config,
    limits: listener::ConnectionLimits,
) -> Result<Option<tokio::task::JoinHandle<()>>, ServeError> {
    let Some(addr) = config.server.metrics_listen else {
        return Ok(None);
    };
    let handle =
        metrics::install_recorder().map_err(|source| ServeError::Metrics { addr, source })?;
    metrics::spawn_process_sampler(Duration::from_secs(5));
    let listener = bind(addr, "metrics (/metrics)").await?;
    let port = Port {
        router: metrics_router(handle),
        limits,
        name: "metrics",
        tls: None,
    };
    Ok(Some(tokio::spawn(serve(
        listener,
        port,
        CancellationToken::new(),
        Duration::ZERO,
    ))))
}

/// What the HTTP API port needs besides the app.
pub(super) struct HttpPort<'a> {
    pub(super) config: &'a Config,
    pub(super) limits: listener::ConnectionLimits,
    pub(super) call_limits: CallLimits,
    pub(super) auth: Option<Arc<Authenticator>>,
    pub(super) browser: Arc<browser::BrowserPolicy>,
    pub(super) stop: CancellationToken,
    pub(super) grace: Duration,
}

/// Serves the OpenAI-compatible API, the console and gRPC-Web on
/// `server.http_listen` until `stop`, then for up to `grace`.
pub(super) async fn start_http_port(
    port: HttpPort<'_>,
    app: &App,
) -> Result<Option<tokio::task::JoinHandle<()>>, ServeError> {
    let Some(addr) = port.config.server.http_listen else {
        return Ok(None);
    };
    let tls = port
        .config
        .server
        .tls
        .as_ref()
        .map(tls::acceptor)
        .transpose()?;
    if tls.is_some() {
        tracing::info!("TLS on the HTTP port, with the gRPC port's certificate");
    }
    let listener = bind(addr, "HTTP (OpenAI API /v1, console /console/)").await?;
    let state = ApiState {
        embedder: Arc::clone(&app.embedder),
        catalog: Arc::clone(&app.catalog),
        auth: port.auth.clone(),
        limits: port.config.limits.clone(),
        body_limits: Arc::clone(&port.call_limits.bodies),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let grpc_web = grpc::web_service(app, &port.call_limits, port.auth);
    let served = Port {
        router: api_router(state, grpc_web).layer(browser::BrowserGuard::new(port.browser)),
        limits: port.limits,
        name: "http",
        tls,
    };
    Ok(Some(tokio::spawn(serve(
        listener, served, port.stop, port.grace,
    ))))
}
