//! The gRPC transport: the tonic services, the one mapping of errors to
//! status codes and the request layer around every call; here they are put
//! together into the gRPC port (with Health, reflection and gRPC-Web), the
//! plaintext Health port, and the gRPC-Web service the HTTP port serves.

pub mod deadline;
pub mod embedder;
pub mod models;
pub mod predictor;
pub mod request_layer;
pub mod response_budget;
pub mod status;
pub mod trainer;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_reflection::server::{v1, v1alpha};

use super::{bind, lifecycle::Drain, ServeError};
use crate::{
    app::App,
    config::Config,
    proto::{
        embedder_server::EmbedderServer, models_server::ModelsServer,
        predictor_server::PredictorServer, trainer_server::TrainerServer,
    },
    server::middleware::{
        auth::Authenticator,
        browser, connections,
        listener::{self, ConnectionLimits},
        message_limit::BodyLimits,
        request_id::REQUEST_ID_HEADER,
    },
};

use embedder::EmbedderService;
use models::ModelsService;
use predictor::PredictorService;
use request_layer::RequestLayer;
use response_budget::ResponseLimits;
use trainer::TrainerService;

/// The server's certificate and key, and the client CA for mutual TLS.
pub(super) fn tls_config(
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
pub(super) async fn start_health_port(
    config: &Config,
    health_service: HealthServer<impl Health>,
    limits: ConnectionLimits,
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
        HeaderName::from_static(REQUEST_ID_HEADER),
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
                REQUEST_ID_HEADER,
            ]))
            .max_age(Duration::from_secs(24 * 3600)),
    )
}

/// The gRPC services as one tower service that also speaks gRPC-Web (the
/// request layer inside it: same tokens, limits, metrics as the gRPC port).
pub type GrpcWeb = tower::util::BoxCloneSyncService<
    http::Request<axum::body::Body>,
    http::Response<tonic::body::Body>,
    std::convert::Infallible,
>;

/// The four tlserve services behind gRPC-Web and the request layer, for the
/// HTTP port.
pub(super) fn web_service(
    app: &App,
    limits: &CallLimits,
    auth: Option<Arc<Authenticator>>,
) -> GrpcWeb {
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
pub(super) struct CallLimits {
    pub(super) bodies: Arc<BodyLimits>,
    pub(super) answers: Arc<ResponseLimits>,
    /// limits.max_response_bytes, for tonic's own check as a backstop.
    pub(super) max_response_bytes: usize,
}

impl CallLimits {
    pub(super) fn new(config: &Config) -> Self {
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
    fn layer(&self, auth: Option<Arc<Authenticator>>) -> RequestLayer {
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

/// Every service of the gRPC port: Health, reflection and the four tlserve
/// services.
pub(super) fn routes(
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
pub(super) struct GrpcPort {
    pub(super) listener: TcpListener,
    pub(super) tls: Option<tonic::transport::ServerTlsConfig>,
    pub(super) limits: ConnectionLimits,
    pub(super) call_limits: CallLimits,
    pub(super) auth: Option<Arc<Authenticator>>,
    pub(super) browser: Arc<browser::BrowserPolicy>,
}

/// Serves `routes` on the gRPC port, over HTTP/1.1 as well as HTTP/2 (for
/// gRPC-Web clients: browsers), until `stop_calls` completes and the calls in
/// flight end, or the drain's grace period cuts them off.
pub(super) async fn serve(
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
