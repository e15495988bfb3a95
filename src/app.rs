//! The composition root: the parts of the application built once at
//! start-up from the configuration, and wired to one another (the shared
//! store, the head store, datasets, jobs, the backbone registry and the use
//! cases). The transports (`server`) receive the built [`App`] and know
//! nothing of how its parts are made.

use std::{path::Path, sync::Arc, time::Duration};

use crate::{
    backbone::image::ImageLimits,
    clock,
    config::Config,
    core,
    datasets::{DatasetLimits, DatasetStore},
    head::{self, adapters::ResidentAdapters, store::HeadStore},
    jobs::{self, journal::JobJournal, replica::ReplicaName, JobLimits, JobManager},
    registry::BackboneRegistry,
    storage::{Location, Storage},
    task,
};

/// The use cases and what they share, built once at start-up.
pub struct App {
    pub registry: Arc<BackboneRegistry>,
    pub store: Arc<HeadStore>,
    pub jobs: Arc<JobManager>,
    pub embedder: Arc<core::Embedder>,
    pub predictor: Arc<core::Predictor>,
    pub trainer: Arc<core::Trainer>,
    pub catalog: Arc<core::Catalog>,
    /// This process's hold on its replica name, given up at shutdown.
    pub replica: Arc<ReplicaName>,
}

/// Why the application could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the head store: {0}")]
    HeadStore(crate::Error),
    #[error("replica name: {0}")]
    ReplicaName(crate::Error),
}

/// This process's name among replicas: the configured one, else the
/// `HOSTNAME` variable (a pod's name), else the host name, made a valid name
/// (at most 64 letters, digits, `-`, `_`, `.`).
fn replica_name(configured: Option<&str>) -> String {
    if let Some(name) = configured {
        return name.to_owned();
    }
    let found = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let name: String = found
        .trim()
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                true => c,
                false => '-',
            },
        )
        .take(64)
        .collect();
    match name.trim_start_matches('.') {
        "" => "tlserve".to_owned(),
        name => name.to_owned(),
    }
}

/// Opens the configured shared store; on a volume, first moves heads and job
/// records of the layout before namespaces into it, then removes what
/// crashed writes left behind.
async fn open_storage(config: &Config) -> Result<Storage, StartError> {
    let location = Location::from_config(&config.storage, &config.heads.store_dir);
    let storage = Storage::open(&location).map_err(StartError::HeadStore)?;
    if let Some(root) = storage.volume_root().map(Path::to_owned) {
        task::run_blocking("moving the earlier layout", move || {
            head::store::migrate_volume(&root)?;
            jobs::journal::migrate_volume(&root)
        })
        .await
        .map_err(StartError::HeadStore)?
        .map_err(|err| {
            StartError::HeadStore(crate::Error::Storage(format!(
                "cannot move heads and job records of the earlier layout in {}: {err}",
                config.heads.store_dir.display()
            )))
        })?;
    }
    // Once per start, for every part of the store (heads, datasets, jobs).
    match storage.remove_leftovers().await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "removed writes that a crash cut short"),
        Err(err) => tracing::warn!(error = %err, "cannot remove leftovers of crashed writes"),
    }
    tracing::info!(store = %storage.describe(), "shared store opened");
    Ok(storage)
}

/// This replica's claim on its name among replicas, kept renewed; a live
/// process holding the name refuses this start.
async fn claim_replica_name(
    config: &Config,
    storage: &Storage,
) -> Result<(String, Arc<ReplicaName>), StartError> {
    let skew = clock::skew_seconds();
    if skew != 0.0 {
        tracing::warn!(
            seconds = skew,
            variable = clock::SKEW_ENV,
            "this process's wall clock is skewed for a test"
        );
    }
    let replica = replica_name(config.server.replica_id.as_deref());
    let lease = Duration::from_secs_f64(config.heads.job_lease_seconds);
    let name = ReplicaName::claim(storage.clone(), &replica, lease)
        .await
        .map_err(StartError::ReplicaName)?;
    name.spawn_renewal();
    Ok((replica, name))
}

/// The datasets on the shared store, with their expiry in the background.
fn build_datasets(config: &Config, storage: &Storage) -> Arc<DatasetStore> {
    let heads = &config.heads;
    let datasets = Arc::new(DatasetStore::new(
        DatasetLimits {
            ttl: Duration::from_secs(heads.dataset_ttl_seconds),
            max_datasets: heads.max_datasets,
            max_per_namespace: heads.datasets_per_namespace(),
            max_upload_bytes: heads.max_upload_bytes,
            max_total_bytes: heads.max_dataset_bytes,
        },
        storage.clone(),
    ));
    datasets.spawn_sweeper();
    datasets
}

/// The datasets and the jobs on the shared store, with their background
/// tasks: record sync and lease renewal, dataset expiry. The replica's name
/// is claimed first: a live process holding it refuses this start.
async fn build_jobs(
    config: &Config,
    registry: &Arc<BackboneRegistry>,
    store: &Arc<HeadStore>,
    storage: Storage,
) -> Result<(Arc<JobManager>, Arc<DatasetStore>, Arc<ReplicaName>), StartError> {
    let (replica, name) = claim_replica_name(config, &storage).await?;
    let datasets = build_datasets(config, &storage);
    let heads = &config.heads;
    let lease = Duration::from_secs_f64(heads.job_lease_seconds);
    let jobs = JobManager::new(
        Arc::clone(registry),
        Arc::clone(store),
        Arc::clone(&datasets),
        JobLimits {
            max_concurrent_jobs: heads.max_concurrent_jobs,
            max_queued_jobs: heads.max_queued_jobs,
            max_queued_jobs_per_namespace: heads.queued_jobs_per_namespace(),
            finished_jobs_kept: heads.finished_jobs_kept,
            fine_tune_cache_bytes: heads.fine_tune_cache_bytes,
            job_attempts: heads.job_attempts,
        },
        JobJournal::new(storage, &replica, lease),
    )
    .await
    .map_err(StartError::HeadStore)?;
    let jobs = Arc::new(jobs);
    jobs.spawn_sync();
    tracing::info!(replica = %replica, "job records are this replica's under its name");
    Ok((jobs, datasets, name))
}

/// The head store on the shared store, with its bounds: heads in all and
/// per namespace, fine-tuned adapters kept resident.
async fn open_head_store(config: &Config, storage: &Storage) -> Result<HeadStore, StartError> {
    let heads = &config.heads;
    let store = HeadStore::open(
        storage.clone(),
        heads.max_heads,
        ResidentAdapters {
            count: heads.max_resident_adapters,
            bytes: heads.max_resident_adapter_bytes,
        },
    )
    .await
    .map_err(StartError::HeadStore)?;
    Ok(store.with_namespace_share(heads.heads_per_namespace()))
}

impl App {
    /// Builds every part from `config`: the registry (backbones load later,
    /// [`BackboneRegistry::load_all`]), the shared store, the head store, the
    /// datasets and jobs with their background tasks, and the use cases.
    pub async fn build(config: &Config) -> Result<Self, StartError> {
        let registry = Arc::new(BackboneRegistry::new(
            &config.backbones,
            config.server.model_cache_dir.clone(),
            ImageLimits::from_config(&config.limits),
        ));
        let storage = open_storage(config).await?;
        let store = Arc::new(open_head_store(config, &storage).await?);
        let (jobs, datasets, replica) = build_jobs(config, &registry, &store, storage).await?;
        let heads = &config.heads;
        let limits = config.limits.clone();
        Ok(Self {
            embedder: Arc::new(core::Embedder::new(
                Arc::clone(&registry),
                Arc::clone(&store),
                limits.clone(),
            )),
            predictor: Arc::new(core::Predictor::new(
                Arc::clone(&registry),
                Arc::clone(&store),
                limits.clone(),
            )),
            trainer: Arc::new(core::Trainer::new(
                Arc::clone(&jobs),
                Arc::clone(&registry),
                datasets,
                heads.clone(),
                limits.max_text_chars,
            )),
            catalog: Arc::new(core::Catalog::new(
                Arc::clone(&registry),
                Arc::clone(&store),
            )),
            registry,
            store,
            jobs,
            replica,
        })
    }
}
