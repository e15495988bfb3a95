//! Starting and stopping: Health while the backbones load, the drain after a
//! shutdown signal, and the end of the ports and background tasks.

use std::{future::Future, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
    ServingStatus,
};

use super::grpc::{
    embedder::EmbedderService, models::ModelsService, predictor::PredictorService,
    trainer::TrainerService,
};
use crate::{
    app::App,
    config::Config,
    jobs::JobManager,
    proto::{
        embedder_server::EmbedderServer, models_server::ModelsServer,
        predictor_server::PredictorServer, trainer_server::TrainerServer,
    },
};

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

/// The Health service: NOT_SERVING until the backbones are ready, and
/// liveness SERVING from start to exit, so that a pod that is loading, busy
/// or draining is never restarted for it.
pub(super) async fn health_reporter() -> (HealthReporter, HealthServer<impl Health>) {
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    (health, health_service)
}

/// Loads every backbone in the background; Health turns SERVING when all are
/// ready.
pub(super) fn start_loading(app: &App, health: &HealthReporter) -> tokio::task::JoinHandle<()> {
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

/// What runs beside the gRPC port until the server stops.
pub(super) struct Background {
    pub(super) http_port: Option<tokio::task::JoinHandle<()>>,
    pub(super) health_port: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    pub(super) metrics_port: Option<tokio::task::JoinHandle<()>>,
    /// Loads the backbones ([`start_loading`]).
    pub(super) loader: tokio::task::JoinHandle<()>,
    /// Reads the head store's changes by other replicas.
    pub(super) refresher: tokio::task::JoinHandle<()>,
}

/// Ends the server once the gRPC port has stopped. Training jobs run apart
/// from any call: they may finish within what is left of the grace period,
/// and the others are released in the shared store, for another replica (or
/// this one after its restart) to run again. Then the replica's name is
/// given up and the other ports and background tasks end.
pub(super) async fn stop(app: &App, drain: &Drain, tasks: Background) {
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
pub(super) struct Drain {
    drain_delay: Duration,
    pub(super) grace: Duration,
    /// When the grace period ends, once it has begun.
    grace_ends: Arc<std::sync::OnceLock<std::time::Instant>>,
    stopping: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    stopping_tx: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Cancelled when new calls stop, for the ports that are not tonic's.
    pub(super) stopped: CancellationToken,
}

impl Drain {
    pub(super) fn new(config: &Config) -> Self {
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
    pub(super) fn signal(
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
    pub(super) async fn cutoff(&self) {
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
    pub(super) fn grace_end(&self) -> std::time::Instant {
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
