//! The configured backbones and their state: loading, ready (model + queue) or
//! failed. Request handlers look backbones up here; start-up loads them.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use rayon::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::{
    backbone::{
        self,
        bert::TrainableBert,
        image::{DecodeBudget, ImageLimits},
        Backbone, Input, Prepared, Want,
    },
    batching::{BackboneQueue, BatchLimits, Priority},
    config::BackboneConfig,
    metrics, Error, Result,
};

/// A backbone that is resident and serving.
pub struct LoadedBackbone {
    pub backbone: Arc<dyn Backbone>,
    pub queue: BackboneQueue,
    decode_budget: Arc<DecodeBudget>,
}

/// Vectors of a request's inputs with, per input, the tokens seen and whether
/// it was truncated.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub facts: Vec<(u32, bool)>,
}

impl LoadedBackbone {
    /// Prepares inputs off the async runtime (tokenizing a few hundred texts or
    /// decoding images takes milliseconds); errors name `first_index + i`.
    /// Each image is admitted against the process's decoding budget. The
    /// work stops between inputs once the caller is gone (this future was
    /// dropped: the client cancelled, or its deadline passed) or `deadline`
    /// has passed, so nobody pays for preparing what nobody will read.
    pub async fn prepare(
        &self,
        inputs: Vec<Input>,
        truncate: bool,
        first_index: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<Prepared>> {
        let backbone = Arc::clone(&self.backbone);
        let budget = Arc::clone(&self.decode_budget);
        let caller = CancellationToken::new();
        let _cancel_on_drop = caller.clone().drop_guard();
        crate::task::run_blocking("preparing inputs", move || {
            // Inputs in parallel, on the compute threads (decoding and
            // resizing a batch of photos one by one would take longer than
            // their forward pass).
            crate::backbone::on_thread_pool(|| {
                inputs
                    .into_par_iter()
                    .enumerate()
                    .map(|(i, input)| {
                        if caller.is_cancelled() {
                            return Err(Error::Cancelled("the caller went away".into()));
                        }
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            return Err(Error::DeadlineExceeded(Duration::ZERO));
                        }
                        let _permit = match &input {
                            Input::Image(bytes) => Some(budget.admit(first_index + i, bytes)?),
                            _ => None,
                        };
                        backbone.prepare(first_index + i, input, truncate)
                    })
                    .collect::<Result<Vec<_>>>()
            })
        })
        .await?
    }

    /// The one path from inputs to feature vectors, for Embed, Predict and
    /// training jobs alike: prepare, then the backbone's queue.
    pub async fn embed(
        &self,
        inputs: Vec<Input>,
        want: Want,
        truncate: bool,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<Embedded> {
        if (want.adapter.is_some() || want.capture.is_some()) && !self.backbone.takes_adapters() {
            return Err(Error::FailedPrecondition(format!(
                "backbone `{}` does not run fine-tuned adapters",
                self.backbone.descriptor().name
            )));
        }
        let prepared = self.prepare(inputs, truncate, 0, deadline).await?;
        let facts = prepared
            .iter()
            .map(|p| (p.tokens() as u32, p.truncated()))
            .collect();
        let vectors = self.queue.embed(prepared, want, priority, deadline).await?;
        Ok(Embedded { vectors, facts })
    }
}

#[derive(Clone)]
pub enum BackboneState {
    Loading,
    Ready(Arc<LoadedBackbone>),
    Failed(String),
}

/// A configured backbone and where it stands.
#[derive(Clone)]
pub struct BackboneStatus {
    pub config: BackboneConfig,
    pub state: BackboneState,
}

struct Slot {
    config: BackboneConfig,
    state: RwLock<BackboneState>,
}

pub struct BackboneRegistry {
    slots: BTreeMap<String, Slot>,
    cache_dir: Option<PathBuf>,
    image_limits: ImageLimits,
    /// Shared by every backbone: decoding memory is the process's.
    decode_budget: Arc<DecodeBudget>,
}

impl BackboneRegistry {
    /// Every configured backbone starts out loading.
    pub fn new(
        configs: &[BackboneConfig],
        cache_dir: Option<PathBuf>,
        image_limits: ImageLimits,
    ) -> Self {
        let slots = configs
            .iter()
            .map(|config| {
                (
                    config.name.clone(),
                    Slot {
                        config: config.clone(),
                        state: RwLock::new(BackboneState::Loading),
                    },
                )
            })
            .collect();
        Self {
            slots,
            cache_dir,
            decode_budget: Arc::new(DecodeBudget::new(image_limits.max_decoding_bytes)),
            image_limits,
        }
    }

    /// The serving backbone of that name, or why there is none.
    pub fn get(&self, name: &str) -> Result<Arc<LoadedBackbone>> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| Error::BackboneNotFound(name.to_owned()))?;
        match &*crate::sync::read(&slot.state) {
            BackboneState::Ready(loaded) => Ok(loaded.clone()),
            BackboneState::Loading => Err(Error::BackboneLoading(name.to_owned())),
            BackboneState::Failed(reason) => Err(Error::BackboneFailed {
                name: name.to_owned(),
                reason: reason.clone(),
            }),
        }
    }

    /// The weights of serving backbone `name` as a trainable graph with its
    /// tokenizer, read again from its files: what fine-tuning starts from.
    /// Blocking (it maps and hashes the weights): call it off the runtime.
    pub fn trainable(&self, name: &str) -> Result<TrainableBert> {
        let serving = self.get(name)?;
        let config = &self.slots[name].config;
        if !serving.backbone.takes_adapters() {
            return Err(Error::FailedPrecondition(format!(
                "backbone `{name}` cannot be fine-tuned (only BERT text backbones can); \
                 train a head on its frozen features instead"
            )));
        }
        let model = TrainableBert::load(config, self.cache_dir.as_deref())?;
        let fingerprint = &serving.backbone.descriptor().fingerprint;
        if &model.fingerprint != fingerprint {
            return Err(Error::FailedPrecondition(format!(
                "the weights of backbone `{name}` changed on disk since it was loaded \
                 (fingerprint {fingerprint}, the files now have {}); restart the server",
                model.fingerprint
            )));
        }
        Ok(model)
    }

    /// All configured backbones in name order.
    pub fn list(&self) -> Vec<BackboneStatus> {
        self.slots
            .values()
            .map(|slot| BackboneStatus {
                config: slot.config.clone(),
                state: crate::sync::read(&slot.state).clone(),
            })
            .collect()
    }

    /// Loads every backbone, one after the other (they compete for the same cores
    /// and memory bandwidth), each on a blocking thread. Returns whether all loaded.
    pub async fn load_all(self: &Arc<Self>) -> bool {
        let mut all_ready = true;
        for name in self.slots.keys() {
            let registry = Arc::clone(self);
            let slot_name = name.clone();
            let outcome = crate::task::run_blocking("loading a backbone", move || {
                registry.load_one(&slot_name)
            })
            .await
            .and_then(|loaded| loaded);
            let state = match outcome {
                Ok(loaded) => BackboneState::Ready(loaded),
                Err(err) => BackboneState::Failed(err.to_string()),
            };
            if let BackboneState::Failed(reason) = &state {
                tracing::error!(backbone = %name, error = %reason, "backbone failed to load");
                all_ready = false;
            }
            *crate::sync::write(&self.slots[name].state) = state;
        }
        all_ready
    }

    fn load_one(&self, name: &str) -> Result<Arc<LoadedBackbone>> {
        let config = &self.slots[name].config;
        tracing::info!(backbone = %name, architecture = config.architecture.as_str(),
            device = %config.device, "loading backbone");
        let started = Instant::now();
        let backbone::Loaded {
            backbone,
            device_memory_bytes,
        } = backbone::load_measured(config, self.cache_dir.as_deref(), self.image_limits)?;
        let elapsed = started.elapsed();
        let queue =
            BackboneQueue::start(Arc::clone(&backbone), BatchLimits::from_config(config))
                .map_err(|err| Error::ModelLoad(format!("cannot start worker thread: {err}")))?;
        let descriptor = backbone.descriptor();
        metrics::record_backbone_loaded(
            metrics::BackboneLabels {
                name: &descriptor.name,
                architecture: descriptor.architecture.as_str(),
                device: &descriptor.device,
                dtype: &descriptor.dtype,
                dimension: descriptor.dimension,
            },
            elapsed,
        );
        if let Some(bytes) = device_memory_bytes {
            metrics::record_backbone_device_memory(&descriptor.name, &descriptor.device, bytes);
            tracing::info!(backbone = %name, device = %descriptor.device,
                mebibytes = bytes / (1 << 20), "device memory held");
        }
        tracing::info!(backbone = %name, seconds = elapsed.as_secs_f64(),
            dimension = descriptor.dimension, source = %descriptor.source,
            fingerprint = %descriptor.fingerprint, "backbone ready");
        Ok(Arc::new(LoadedBackbone {
            backbone,
            queue,
            decode_budget: Arc::clone(&self.decode_budget),
        }))
    }
}
