//! The `[heads]` section: the head store, uploaded datasets and training jobs,
//! with each namespace's share of the store-wide bounds.

use std::path::PathBuf;

use serde::Deserialize;

/// The head store and training jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadsConfig {
    /// The shared store's folder when `storage.backend` is `volume`:
    /// heads, uploaded datasets and job records; relative to the config
    /// file. Share it between replicas (a ReadWriteMany volume).
    pub store_dir: PathBuf,
    /// Most head versions in the store.
    pub max_heads: usize,
    /// Most head versions of one namespace (the heads named
    /// `<namespace>.<name>`; names without a namespace are held to
    /// `max_heads` only); unset: half of `max_heads`, rounded up.
    pub max_heads_per_namespace: Option<usize>,
    /// Training jobs running at once; more wait QUEUED.
    pub max_concurrent_jobs: usize,
    /// Jobs waiting beyond the running ones; more are refused.
    pub max_queued_jobs: usize,
    /// Most jobs of one namespace (of the heads they train) queued or running
    /// on a replica; unset: half of `max_concurrent_jobs + max_queued_jobs`,
    /// rounded up.
    pub max_queued_jobs_per_namespace: Option<usize>,
    /// Finished jobs remembered for WatchJob and ListJobs; a replica removes
    /// the oldest records beyond this many that it knows of.
    pub finished_jobs_kept: usize,
    /// Most examples in one job or uploaded dataset.
    pub max_examples_per_job: usize,
    /// Most distinct labels of a head.
    pub max_labels: usize,
    /// Longest label, in characters.
    pub max_label_chars: usize,
    /// Uploads in progress on a replica and datasets waiting for a job in
    /// the store, together.
    pub max_datasets: usize,
    /// Most of those of one namespace: the first namespace of the uploading
    /// token (uploads of tokens without namespaces: `max_datasets` only);
    /// unset: half of `max_datasets`, rounded up.
    pub max_datasets_per_namespace: Option<usize>,
    /// How long an uploaded dataset waits for a job before it is dropped.
    pub dataset_ttl_seconds: u64,
    /// Most bytes (encoded examples) of one upload.
    pub max_upload_bytes: usize,
    /// Most bytes held in memory by a replica's uploads in progress, all
    /// together.
    pub max_dataset_bytes: usize,
    /// An upload that sends nothing for this long is ended.
    pub upload_idle_timeout_seconds: f64,
    /// Fine-tuning: most bytes of the frozen bottom's hidden states kept for
    /// every epoch of one job; beyond it they are computed again per batch
    /// (slower, in constant memory). 0 always recomputes.
    pub fine_tune_cache_bytes: usize,
    /// Fine-tuned heads' adapters kept in memory at once; the least recently
    /// used is dropped and read again from the store when next asked for.
    pub max_resident_adapters: usize,
    /// Bytes of fine-tuned heads' adapters kept in memory at once, counting
    /// for heads with their own top layers the serving engine's copy too; the
    /// least recently used go first. One adapter larger than this still stays
    /// while it is the only one.
    pub max_resident_adapter_bytes: usize,
    /// How long a running job's record stays its replica's after the replica
    /// last renewed it (every sixth of this). Another replica treats a job
    /// whose lease ran out as one whose replica died; until then it leaves
    /// the job alone.
    pub job_lease_seconds: f64,
    /// Most runs of one job: a job whose replica stops (killed, or drained
    /// past its grace period) is run again from the start by another
    /// replica until it has run this many times, then recorded FAILED.
    pub job_attempts: u32,
}

impl HeadsConfig {
    /// Head versions one namespace may hold: as set, or half the store's.
    pub fn heads_per_namespace(&self) -> usize {
        self.max_heads_per_namespace
            .unwrap_or_else(|| half(self.max_heads))
    }

    /// Jobs of one namespace queued or running on a replica: as set, or half
    /// of what the replica takes.
    pub fn queued_jobs_per_namespace(&self) -> usize {
        self.max_queued_jobs_per_namespace.unwrap_or_else(|| {
            half(
                self.max_concurrent_jobs
                    .saturating_add(self.max_queued_jobs),
            )
        })
    }

    /// Datasets one namespace may hold: as set, or half the store's.
    pub fn datasets_per_namespace(&self) -> usize {
        self.max_datasets_per_namespace
            .unwrap_or_else(|| half(self.max_datasets))
    }

    /// The upload idle timeout as a Duration (validated to be finite and positive).
    pub fn upload_idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.upload_idle_timeout_seconds)
    }
}

/// Half of `bound`, rounded up: a namespace's share unless configured, so
/// that one namespace alone never fills a bound of two or more.
fn half(bound: usize) -> usize {
    bound.div_ceil(2)
}

impl Default for HeadsConfig {
    fn default() -> Self {
        Self {
            store_dir: PathBuf::from("heads"),
            max_heads: 1000,
            max_heads_per_namespace: None,
            max_concurrent_jobs: 1,
            max_queued_jobs: 16,
            max_queued_jobs_per_namespace: None,
            finished_jobs_kept: 100,
            max_examples_per_job: 100_000,
            max_labels: 1000,
            max_label_chars: 128,
            max_datasets: 8,
            max_datasets_per_namespace: None,
            dataset_ttl_seconds: 3600,
            max_upload_bytes: 256 * 1024 * 1024,
            max_dataset_bytes: 1024 * 1024 * 1024,
            upload_idle_timeout_seconds: 30.0,
            fine_tune_cache_bytes: 2 * 1024 * 1024 * 1024,
            max_resident_adapters: 128,
            max_resident_adapter_bytes: 1 << 30,
            job_lease_seconds: 30.0,
            job_attempts: 3,
        }
    }
}

/// The head store and jobs can hold at least one head trained on two examples
/// of two labels.
pub(super) fn validate_heads(heads: &HeadsConfig) -> Result<(), String> {
    if heads.max_upload_bytes == 0 || heads.max_dataset_bytes < heads.max_upload_bytes {
        return Err(
            "heads.max_upload_bytes must be at least 1 and at most heads.max_dataset_bytes".into(),
        );
    }
    let idle = heads.upload_idle_timeout_seconds;
    if !(idle.is_finite() && idle > 0.0 && idle <= 3600.0) {
        return Err("heads.upload_idle_timeout_seconds must be in (0, 3600]".into());
    }
    let lease = heads.job_lease_seconds;
    if !(lease.is_finite() && (1.0..=3600.0).contains(&lease)) {
        return Err("heads.job_lease_seconds must be in [1, 3600]".into());
    }
    let shares = [
        heads.max_heads_per_namespace,
        heads.max_queued_jobs_per_namespace,
        heads.max_datasets_per_namespace,
    ];
    if shares.contains(&Some(0)) {
        return Err(
            "heads: max_heads_per_namespace, max_queued_jobs_per_namespace and \
             max_datasets_per_namespace must be at least 1 when set"
                .into(),
        );
    }
    if !(1..=100).contains(&heads.job_attempts) {
        return Err("heads.job_attempts must be in [1, 100]".into());
    }
    if heads.max_concurrent_jobs == 0
        || heads.max_resident_adapters == 0
        || heads.max_resident_adapter_bytes == 0
        || heads.max_examples_per_job < 2
        || heads.max_labels < 2
        || heads.max_label_chars == 0
        || heads.max_heads == 0
    {
        return Err(
            "heads: max_concurrent_jobs, max_heads, max_label_chars, max_resident_adapters and \
             max_resident_adapter_bytes must be at least 1, \
             max_examples_per_job and max_labels at least 2"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{
        tests::{env, MINIMAL},
        Config,
    };

    /// Each namespace gets half of a store-wide bound unless configured; a
    /// share of 0 would refuse everyone and is refused at start-up.
    #[test]
    fn namespace_shares_default_to_half_a_bound() {
        let with = |pairs: &[(&str, &str)]| Config::from_toml(MINIMAL, Path::new("."), env(pairs));
        let heads = with(&[]).unwrap().heads;
        assert_eq!(
            (
                heads.heads_per_namespace(),
                heads.queued_jobs_per_namespace(),
                heads.datasets_per_namespace()
            ),
            (500, 9, 4)
        );
        let set = with(&[
            ("TLSERVE__HEADS__MAX_DATASETS", "1"),
            ("TLSERVE__HEADS__MAX_HEADS_PER_NAMESPACE", "7"),
        ])
        .unwrap()
        .heads;
        assert_eq!(
            (set.datasets_per_namespace(), set.heads_per_namespace()),
            (1, 7)
        );
        let err = with(&[("TLSERVE__HEADS__MAX_DATASETS_PER_NAMESPACE", "0")]).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }
}
