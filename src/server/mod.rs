//! The gRPC front end: tonic services, health, reflection, the request layer and
//! the server's life cycle (start, load, serve, drain, stop).

pub mod grpc;
mod http;
pub mod middleware;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
    ServingStatus,
};
use tonic_reflection::server::{v1, v1alpha};

use crate::{
    app::{App, StartError},
    config::Config,
    head::store::HeadStore,
    jobs::JobManager,
    metrics,
    proto::{
        embedder_server::EmbedderServer, models_server::ModelsServer,
        predictor_server::PredictorServer, trainer_server::TrainerServer,
    },
};

use grpc::{
    embedder::EmbedderService,
    models::ModelsService,
    predictor::PredictorService,
    request_layer::{self, RequestLayer},
    response_budget::ResponseLimits,
    trainer::TrainerService,
};
use middleware::{auth, browser, connections, listener, message_limit::BodyLimits};

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

/// The server's certificate and key, and the client CA for mutual TLS.
fn tls_config(
    tls: &crate::config::TlsConfig,
) -> Result<tonic::transport::ServerTlsConfig, ServeError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServeError::TlsFile {
            path: path.to_owned(),
            source,
        })
    };
    let identity = Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    tracing::info!(
        mutual = tls.client_ca_file.is_some(),
        "TLS on the gRPC port"
    );
    Ok(config)
}

/// The Health service name that liveness probes check.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Health is reported for the whole server ("") and for each service.
fn health_names() -> [&'static str; 5] {
    [
        "",
        <EmbedderServer<EmbedderService> as NamedService>::NAME,
        <ModelsServer<ModelsService> as NamedService>::NAME,
        <TrainerServer<TrainerService> as NamedService>::NAME,
        <PredictorServer<PredictorService> as NamedService>::NAME,
    ]
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in health_names() {
        reporter.set_service_status(name, status).await;
    }
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

/// Loads every backbone in the background; Health turns SERVING when all are
/// ready.
fn start_loading(app: &App, health: &HealthReporter) -> tokio::task::JoinHandle<()> {
    let registry = Arc::clone(&app.registry);
    let catalog = Arc::clone(&app.catalog);
    let health = health.clone();
    tokio::spawn(async move {
        if registry.load_all().await {
            catalog.warn_about_stale_heads().await;
            set_health(&health, ServingStatus::Serving).await;
            tracing::info!("all backbones ready: serving");
        } else {
            tracing::error!("a backbone failed to load: Health stays NOT_SERVING");
        }
    })
}

/// How long an HTTP/2 keepalive ping may go unanswered before the connection
/// is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP/2 settings of the gRPC and Health ports: streams per connection,
/// and keepalive pings that close connections to peers that are gone.
fn grpc_builder(config: &Config) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(config.server.max_concurrent_streams_per_connection)
        .http2_keepalive_interval(Some(config.server.http2_keepalive_interval()))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
}

/// Health alone on a plaintext port, for probes when the main port has TLS.
async fn start_health_port(
    config: &Config,
    health_service: HealthServer<impl Health>,
    limits: listener::ConnectionLimits,
    call_limits: CallLimits,
) -> Result<Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>, ServeError> {
    let Some(addr) = config.server.health_listen else {
        return Ok(None);
    };
    let listener = bind(addr, "Health (plaintext)").await?;
    Ok(Some(tokio::spawn(
        grpc_builder(config)
            // Public by design (probes), bounded like the main port.
            .layer(connections::TrackCalls::default())
            .layer(call_limits.layer(None))
            .add_service(health_service)
            .serve_with_incoming(listener::incoming(listener, limits, "health")),
    )))
}

/// Installs the metrics recorder and serves it on `server.metrics_listen`
/// until the task is aborted.
async fn start_metrics_port(
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
    let port = http::Port {
        router: http::metrics_router(handle),
        limits,
        name: "metrics",
        tls: None,
    };
    Ok(Some(tokio::spawn(http::serve(
        listener,
        port,
        CancellationToken::new(),
        Duration::ZERO,
    ))))
}

/// What the HTTP API port needs besides the app.
struct HttpPort<'a> {
    config: &'a Config,
    limits: listener::ConnectionLimits,
    call_limits: CallLimits,
    auth: Option<Arc<auth::Authenticator>>,
    browser: Arc<browser::BrowserPolicy>,
    stop: CancellationToken,
    grace: Duration,
}

/// Serves the OpenAI-compatible API, the console and gRPC-Web on
/// `server.http_listen` until `stop`, then for up to `grace`.
async fn start_http_port(
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
        .map(http::tls_acceptor)
        .transpose()?;
    if tls.is_some() {
        tracing::info!("TLS on the HTTP port, with the gRPC port's certificate");
    }
    let listener = bind(addr, "HTTP (OpenAI API /v1, console /console/)").await?;
    let state = http::ApiState {
        embedder: Arc::clone(&app.embedder),
        catalog: Arc::clone(&app.catalog),
        auth: port.auth.clone(),
        limits: port.config.limits.clone(),
        body_limits: Arc::clone(&port.call_limits.bodies),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let grpc_web = grpc_web_service(app, &port.call_limits, port.auth);
    let served = http::Port {
        router: http::api_router(state, grpc_web).layer(browser::BrowserGuard::new(port.browser)),
        limits: port.limits,
        name: "http",
        tls,
    };
    Ok(Some(tokio::spawn(http::serve(
        listener, served, port.stop, port.grace,
    ))))
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

/// CORS for gRPC-Web calls from the listed origins' pages: preflights are
/// answered here, before authentication (browsers send no token with them).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use ::http::header::{HeaderName, AUTHORIZATION, CONTENT_TYPE};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let named = |names: &[&'static str]| -> Vec<HeaderName> {
        names.iter().map(|n| HeaderName::from_static(n)).collect()
    };
    let mut allowed_headers = named(&["x-grpc-web", "x-user-agent", "grpc-timeout"]);
    allowed_headers.extend([
        CONTENT_TYPE,
        AUTHORIZATION,
        HeaderName::from_static(request_layer::REQUEST_ID_HEADER),
    ]);
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([::http::Method::POST])
            .allow_headers(allowed_headers)
            .expose_headers(named(&[
                "grpc-status",
                "grpc-message",
                "grpc-status-details-bin",
                request_layer::REQUEST_ID_HEADER,
            ]))
            .max_age(Duration::from_secs(24 * 3600)),
    )
}

/// The four tlserve services behind gRPC-Web and the request layer, for the
/// HTTP port.
fn grpc_web_service(
    app: &App,
    limits: &CallLimits,
    auth: Option<Arc<auth::Authenticator>>,
) -> http::GrpcWeb {
    let (embedder, models, trainer, predictor) = services(app, limits);
    let routes = tonic::service::Routes::new(embedder)
        .add_service(models)
        .add_service(trainer)
        .add_service(predictor);
    let stack = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(limits.layer(auth))
        .service(routes);
    tower::util::BoxCloneSyncService::new(stack)
}

/// What request bodies and unsent answers may hold; shared by every port.
#[derive(Clone)]
struct CallLimits {
    bodies: Arc<BodyLimits>,
    answers: Arc<ResponseLimits>,
    /// limits.max_response_bytes, for tonic's own check as a backstop.
    max_response_bytes: usize,
}

impl CallLimits {
    fn new(config: &Config) -> Self {
        let limits = &config.limits;
        Self {
            bodies: Arc::new(
                BodyLimits::new(
                    limits.max_message_bytes,
                    Duration::from_secs_f64(limits.message_timeout_seconds),
                    limits.buffered_bytes_per_connection(),
                    limits.buffered_request_bytes(),
                )
                .counting(
                    limits.max_inputs_per_request,
                    config.heads.max_examples_per_job,
                ),
            ),
            answers: Arc::new(ResponseLimits::new(
                limits.unsent_response_bytes_per_connection(),
                limits.unsent_response_bytes(),
            )),
            max_response_bytes: limits.max_response_bytes,
        }
    }

    /// The request layer of a port, with these limits and `auth`.
    fn layer(&self, auth: Option<Arc<auth::Authenticator>>) -> RequestLayer {
        RequestLayer::new(Arc::clone(&self.bodies), Arc::clone(&self.answers), auth)
    }
}

/// Server reflection, v1 and v1alpha: grpcurl before 1.8.8 and many other
/// tools still speak only v1alpha.
#[allow(clippy::type_complexity)]
fn reflection() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    ServeError,
> {
    let configure = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((configure().build_v1()?, configure().build_v1alpha()?))
}

/// The four tlserve services over the app. The request layer enforces
/// limits.max_message_bytes with the status the gRPC spec asks for; tonic's
/// own (OUT_OF_RANGE) limit is lifted so it never fires first. Answers are
/// bounded before the work (core) and tonic's encoding limit stops any that
/// would still pass limits.max_response_bytes.
fn services(
    app: &App,
    limits: &CallLimits,
) -> (
    EmbedderServer<EmbedderService>,
    ModelsServer<ModelsService>,
    TrainerServer<TrainerService>,
    PredictorServer<PredictorService>,
) {
    let unlimited = usize::MAX;
    let answers = limits.max_response_bytes;
    (
        EmbedderServer::new(EmbedderService::new(Arc::clone(&app.embedder)))
            .max_decoding_message_size(unlimited)
            .max_encoding_message_size(answers),
        ModelsServer::new(ModelsService::new(Arc::clone(&app.catalog)))
            .max_decoding_message_size(unlimited)
            .max_encoding_message_size(answers),
        TrainerServer::new(TrainerService::new(Arc::clone(&app.trainer)))
            .max_decoding_message_size(unlimited)
            .max_encoding_message_size(answers),
        PredictorServer::new(PredictorService::new(Arc::clone(&app.predictor)))
            .max_decoding_message_size(unlimited)
            .max_encoding_message_size(answers),
    )
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
    let tls = config.server.tls.as_ref().map(tls_config).transpose()?;
    let listener = bind(config.server.listen, "gRPC").await?;
    let limits = connection_limits(&config);
    let metrics_port = start_metrics_port(&config, limits).await?;
    let app = App::build(&config).await?;
    let refresher = HeadStore::refresh_periodically(&app.store);
    let (health, health_service) = health_reporter().await;
    let loader = start_loading(&app, &health);
    let call_limits = CallLimits::new(&config);
    let health_port =
        start_health_port(&config, health_service.clone(), limits, call_limits.clone()).await?;
    let routes = grpc_routes(health_service, &app, &call_limits)?;
    let drain = Drain::new(&config);
    let browser = browser_policy(&config, auth.is_some());
    let http_port = start_http_port(
        HttpPort {
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
    serve_grpc(&config, port, routes, stop_calls, &drain).await?;
    let tasks = Background {
        http_port,
        health_port,
        metrics_port,
        loader,
        refresher,
    };
    stop(&app, &drain, tasks).await;
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

/// The Health service: NOT_SERVING until the backbones are ready, and
/// liveness SERVING from start to exit, so that a pod that is loading, busy
/// or draining is never restarted for it.
async fn health_reporter() -> (HealthReporter, HealthServer<impl Health>) {
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    (health, health_service)
}

/// Every service of the gRPC port: Health, reflection and the four tlserve
/// services.
fn grpc_routes(
    health: HealthServer<impl Health>,
    app: &App,
    limits: &CallLimits,
) -> Result<tonic::service::Routes, ServeError> {
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let (embedder, models, trainer, predictor) = services(app, limits);
    Ok(tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(embedder)
        .add_service(models)
        .add_service(trainer)
        .add_service(predictor))
}

/// The main gRPC port: its socket and what guards its calls.
struct GrpcPort {
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    limits: listener::ConnectionLimits,
    call_limits: CallLimits,
    auth: Option<Arc<auth::Authenticator>>,
    browser: Arc<browser::BrowserPolicy>,
}

/// Serves `routes` on the gRPC port, over HTTP/1.1 as well as HTTP/2 (for
/// gRPC-Web clients: browsers), until `stop_calls` completes and the calls in
/// flight end, or the drain's grace period cuts them off.
async fn serve_grpc(
    config: &Config,
    port: GrpcPort,
    routes: tonic::service::Routes,
    stop_calls: impl Future<Output = ()>,
    drain: &Drain,
) -> Result<(), ServeError> {
    let mut builder = grpc_builder(config).accept_http1(true);
    if let Some(tls) = port.tls {
        builder = builder.tls_config(tls)?;
    }
    let serve = builder
        .layer(browser::BrowserGuard::new(port.browser))
        .layer(tower::util::option_layer(cors(
            &config.server.cors_allowed_origins,
        )))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(connections::TrackCalls::default())
        .layer(port.call_limits.layer(port.auth))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            listener::incoming(port.listener, port.limits, "grpc"),
            stop_calls,
        );
    tokio::select! {
        result = serve => result?,
        () = drain.cutoff() => tracing::warn!(
            grace_seconds = drain.grace.as_secs_f64(),
            "calls still running after the grace period were cut off"
        ),
    }
    Ok(())
}

/// What runs beside the gRPC port until the server stops.
struct Background {
    http_port: Option<tokio::task::JoinHandle<()>>,
    health_port: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    metrics_port: Option<tokio::task::JoinHandle<()>>,
    /// Loads the backbones ([`start_loading`]).
    loader: tokio::task::JoinHandle<()>,
    /// Reads the head store's changes by other replicas.
    refresher: tokio::task::JoinHandle<()>,
}

/// Ends the server once the gRPC port has stopped. Training jobs run apart
/// from any call: they may finish within what is left of the grace period,
/// and the others are released in the shared store, for another replica (or
/// this one after its restart) to run again. Then the replica's name is
/// given up and the other ports and background tasks end.
async fn stop(app: &App, drain: &Drain, tasks: Background) {
    app.jobs.finish_or_release_by(drain.grace_end()).await;
    app.replica.release().await;
    if let Some(task) = tasks.http_port {
        // Its own drain (stop accepting, finish within the grace) has run
        // alongside the gRPC port's; this only waits for it to end.
        let _ = tokio::time::timeout_at(drain.grace_end().into(), task).await;
    }
    if let Some(task) = tasks.health_port {
        task.abort();
    }
    if let Some(task) = tasks.metrics_port {
        task.abort();
    }
    tasks.loader.abort();
    tasks.refresher.abort();
    tracing::info!("server stopped");
}

/// The drain after a shutdown signal: Health turns NOT_SERVING, new calls stop
/// after the drain delay, and in-flight calls and training jobs share the
/// grace period that follows.
struct Drain {
    drain_delay: Duration,
    grace: Duration,
    /// When the grace period ends, once it has begun.
    grace_ends: Arc<std::sync::OnceLock<std::time::Instant>>,
    stopping: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    stopping_tx: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Cancelled when new calls stop, for the ports that are not tonic's.
    stopped: CancellationToken,
}

impl Drain {
    fn new(config: &Config) -> Self {
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        Self {
            drain_delay: Duration::from_secs_f64(config.server.drain_delay_seconds),
            grace: Duration::from_secs_f64(config.server.shutdown_grace_seconds),
            grace_ends: Arc::new(std::sync::OnceLock::new()),
            stopping: tokio::sync::Mutex::new(Some(stopping_rx)),
            stopping_tx: std::sync::Mutex::new(Some(stopping_tx)),
            stopped: CancellationToken::new(),
        }
    }

    /// Completes when the server should stop accepting calls: the drain delay
    /// after `shutdown`.
    fn signal(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        health: HealthReporter,
        jobs: Arc<JobManager>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (drain_delay, grace) = (self.drain_delay, self.grace);
        let grace_ends = Arc::clone(&self.grace_ends);
        let stopping_tx = crate::sync::lock(&self.stopping_tx).take();
        let stopped = self.stopped.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown requested: reporting NOT_SERVING and draining");
            // New jobs go to other replicas from now on.
            jobs.close();
            set_health(&health, ServingStatus::NotServing).await;
            tokio::time::sleep(drain_delay).await;
            let _ = grace_ends.set(std::time::Instant::now() + grace);
            stopped.cancel();
            if let Some(tx) = stopping_tx {
                let _ = tx.send(());
            }
        }
    }

    /// Completes when the grace period after the stop is over.
    async fn cutoff(&self) {
        let receiver = self.stopping.lock().await.take();
        let stopped = match receiver {
            Some(receiver) => receiver.await.is_ok(),
            None => false,
        };
        if stopped {
            tokio::time::sleep(self.grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    }

    /// When the grace period ends (now, if it never began).
    fn grace_end(&self) -> std::time::Instant {
        self.grace_ends
            .get()
            .copied()
            .unwrap_or_else(std::time::Instant::now)
    }
}

/// Completes on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
