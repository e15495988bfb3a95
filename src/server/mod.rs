//! The transports and their life cycle: [`grpc`] (the tonic services, Health
//! and reflection, also as gRPC-Web), [`http`] (the OpenAI-compatible API, the
//! console and the metrics port), what both share ([`middleware`]), and
//! [`lifecycle`] (start, load, serve, drain, stop). [`run`] wires them.

pub mod grpc;
mod http;
mod lifecycle;
pub mod middleware;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

use crate::{
    app::{App, StartError},
    config::Config,
    head::store::HeadStore,
    metrics,
};

use grpc::{CallLimits, GrpcPort};
use lifecycle::{Background, Drain};
use middleware::{auth, browser, listener};

pub use lifecycle::{shutdown_signal, LIVENESS_SERVICE};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: metrics_exporter_prometheus::BuildError,
    },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("authentication: {0}")]
    Auth(#[from] auth::AuthSetupError),
    #[error(transparent)]
    HttpTls(#[from] http::HttpTlsError),
    #[error("TLS: cannot read {path}: {source}")]
    TlsFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Reads the tokens, and warns when a server reachable beyond loopback has
/// none.
fn authenticator(config: &Config) -> Result<Option<Arc<auth::Authenticator>>, ServeError> {
    let authenticator = auth::Authenticator::from_config(
        &config.auth,
        std::env::var(auth::TOKENS_ENV).ok().as_deref(),
    )?
    .map(Arc::new);
    let addr = config.server.listen;
    match &authenticator {
        Some(auth) => {
            for (name, roles) in auth.token_names() {
                tracing::info!(token = name, roles = ?roles, "token accepted");
            }
        }
        None if !addr.ip().is_loopback() => {
            tracing::warn!(address = %addr,
                "AUTHENTICATION IS OFF and the server listens beyond loopback: anyone who \
                 reaches this port can embed, train and delete heads. Set auth.enabled = true \
                 with tokens (SECURITY.md), or listen on 127.0.0.1");
        }
        None => {}
    }
    Ok(authenticator)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(address = %listener.local_addr().unwrap_or(addr), "{what} listening");
    Ok(listener)
}

/// The Host and Origin checks of the gRPC and HTTP ports, logged once.
fn browser_policy(config: &Config, auth_enabled: bool) -> Arc<browser::BrowserPolicy> {
    let policy = browser::BrowserPolicy::from_config(&config.server, auth_enabled);
    match policy.hosts() {
        Some(hosts) => tracing::info!(hosts = ?hosts,
            "requests must be addressed to one of these host names (server.allowed_hosts)"),
        None => tracing::info!("requests may be addressed to any host name (server.allowed_hosts)"),
    }
    Arc::new(policy)
}

/// Runs the server until `shutdown` completes, then drains: Health turns
/// NOT_SERVING, new calls are refused after `drain_delay_seconds`, and in-flight
/// calls get up to `shutdown_grace_seconds` to finish.
///
/// The port opens at once; backbones load in the background and Health reports
/// SERVING only when every one of them is loaded and warmed up.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    metrics::install_panic_hook();
    let auth = authenticator(&config)?;
    let tls = config
        .server
        .tls
        .as_ref()
        .map(grpc::tls_config)
        .transpose()?;
    let listener = bind(config.server.listen, "gRPC").await?;
    let limits = connection_limits(&config);
    let metrics_port = http::start_metrics_port(&config, limits).await?;
    let app = App::build(&config).await?;
    let refresher = HeadStore::refresh_periodically(&app.store);
    let (health, health_service) = lifecycle::health_reporter().await;
    let loader = lifecycle::start_loading(&app, &health);
    let call_limits = CallLimits::new(&config);
    let health_port =
        grpc::start_health_port(&config, health_service.clone(), limits, call_limits.clone())
            .await?;
    let routes = grpc::routes(health_service, &app, &call_limits)?;
    let drain = Drain::new(&config);
    let browser = browser_policy(&config, auth.is_some());
    let http_port = http::start_http_port(
        http::HttpPort {
            config: &config,
            limits,
            call_limits: call_limits.clone(),
            auth: auth.clone(),
            browser: Arc::clone(&browser),
            stop: drain.stopped.clone(),
            grace: drain.grace,
        },
        &app,
    )
    .await?;
    let port = GrpcPort {
        listener,
        tls,
        limits,
        call_limits,
        auth,
        browser,
    };
    let stop_calls = drain.signal(shutdown, health, Arc::clone(&app.jobs));
    grpc::serve(&config, port, routes, stop_calls, &drain).await?;
    let tasks = Background {
        http_port,
        health_port,
        metrics_port,
        loader,
        refresher,
    };
    lifecycle::stop(&app, &drain, tasks).await;
    Ok(())
}

/// The bounds of every port's connections: how many, and how long one may
/// wait for its first byte and stay idle.
fn connection_limits(config: &Config) -> listener::ConnectionLimits {
    listener::ConnectionLimits {
        max_connections: config.server.max_connections,
        first_byte_timeout: config.server.connection_first_byte_timeout(),
        idle_timeout: config.server.connection_idle_timeout(),
    }
}
