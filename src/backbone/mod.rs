//! Backbones: pretrained models kept resident and used as feature extractors.
//!
//! A backbone prepares inputs on the request path (tokenizing, validating; cheap
//! and per item) and embeds whole batches of prepared items on a worker thread.
//!
//! A folder per family, the way candle-transformers gives a model a folder
//! once it has parts: `bert` (the encoder, its native CPU engine, its candle
//! graph and what fine-tuning adds to it), `llama` (decoders from GGUF files),
//! `vision` (image preparation, convolutional layers, one file per network,
//! the native engine). `text` (tokenizer, pooling) serves both text families,
//! `weights` finds and reads weight files, and `catalog` is the one place that
//! maps an architecture to its family.

pub mod bert;
pub mod catalog;
pub mod device_memory;
pub mod engine;
pub mod llama;
pub mod profile;
pub mod text;
pub mod vision;
pub mod weights;

use std::sync::Arc;

use candle_core::Device;

use crate::{
    config::{Architecture, BackboneConfig, DeviceSpec},
    nn::{self, Dense},
    Error, Result,
};

pub use crate::config::{Modality, Pooling};
pub use bert::adapter::Adapter;
pub use text::TokenizedText;
pub use vision::image;

/// Per-request choices applied after the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedOptions {
    pub pooling: Pooling,
    pub normalize: bool,
}

impl EmbedOptions {
    pub const fn new(pooling: Pooling, normalize: bool) -> Self {
        Self { pooling, normalize }
    }
}

/// A client's input, decoded from the wire but not yet checked against a backbone.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Image(Vec<u8>),
    Tensor {
        shape: Vec<usize>,
        values: Vec<f32>,
    },
    /// Ids of the backbone's own tokenizer, the whole sequence the model sees
    /// (special tokens included, as the tokenizer adds them to a text).
    TokenIds(Vec<u32>),
}

impl Input {
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Text(_) => "text",
            Input::Image(_) => "an image",
            Input::Tensor { .. } => "a tensor",
            Input::TokenIds(_) => "token ids",
        }
    }
}

/// An input in the form a backbone computes on.
#[derive(Debug, Clone)]
pub enum Prepared {
    Text(TokenizedText),
    /// Normalized pixels, `[3, side, side]` row-major; shared, not copied, when
    /// one request names the same image twice.
    Image(Arc<Vec<f32>>),
}

impl Prepared {
    /// Tokens the model will see (text), for responses and batch accounting.
    /// Images have none: they are all the same size, so a batch of them is
    /// bounded by its item count alone.
    pub fn tokens(&self) -> usize {
        match self {
            Prepared::Text(text) => text.ids.len(),
            Prepared::Image(_) => 0,
        }
    }

    pub fn truncated(&self) -> bool {
        match self {
            Prepared::Text(text) => text.truncated,
            Prepared::Image(_) => false,
        }
    }
}

/// A classifier that comes with a backbone's pretrained weights (the ImageNet
/// head of a vision backbone), served by Predict as `<backbone>/<name>`.
#[derive(Debug)]
pub struct BuiltinClassifier {
    pub name: String,
    pub labels: Vec<String>,
    /// One linear layer; its softmax gives the class probabilities.
    pub weights: Dense,
    /// The features it takes.
    pub options: EmbedOptions,
}

impl BuiltinClassifier {
    /// Length of the feature vectors it takes.
    pub fn input_dim(&self) -> usize {
        self.weights.inputs
    }

    /// Class probabilities (softmax) of one feature vector.
    pub fn probabilities(&self, features: &[f32]) -> Vec<f32> {
        nn::softmax(&self.weights.apply(features))
    }
}

/// One item of a forward pass with the options of the request it came from.
#[derive(Debug, Clone, Copy)]
pub struct EmbedItem<'a> {
    pub input: &'a Prepared,
    pub options: EmbedOptions,
    /// The fine-tuned adapter whose features the request asks for; None: the
    /// frozen backbone's. Only backbones that can be fine-tuned take one.
    pub adapter: Option<&'a bert::adapter::Adapter>,
    /// Some(k): instead of a pooled vector, the token vectors after the first
    /// `k` encoder layers (0: the embeddings), `[tokens, hidden]` row after
    /// row: a fine-tuning job's frozen bottom. Only backbones that can be
    /// fine-tuned compute them.
    pub capture: Option<usize>,
}

impl<'a> EmbedItem<'a> {
    /// The frozen backbone's pooled features of `input`.
    pub fn frozen(input: &'a Prepared, options: EmbedOptions) -> Self {
        Self {
            input,
            options,
            adapter: None,
            capture: None,
        }
    }
}

/// What a request wants of each of its inputs: features with these options
/// (through a fine-tuned adapter, or the frozen backbone), or hidden states.
#[derive(Debug, Clone)]
pub struct Want {
    pub options: EmbedOptions,
    pub adapter: Option<Arc<bert::adapter::Adapter>>,
    /// See [`EmbedItem::capture`].
    pub capture: Option<usize>,
}

impl Want {
    /// The frozen backbone's features.
    pub fn features(options: EmbedOptions) -> Self {
        Self {
            options,
            adapter: None,
            capture: None,
        }
    }

    /// The features through `adapter` (None: the frozen backbone's).
    pub fn adapted(options: EmbedOptions, adapter: Option<Arc<bert::adapter::Adapter>>) -> Self {
        Self {
            adapter,
            ..Self::features(options)
        }
    }

    /// The token vectors after the first `layers` encoder layers.
    pub fn hidden_states(options: EmbedOptions, layers: usize) -> Self {
        Self {
            capture: Some(layers),
            ..Self::features(options)
        }
    }
}

/// What a loaded backbone is, for listings, metrics and defaults.
#[derive(Debug, Clone)]
pub struct BackboneDescriptor {
    pub name: String,
    pub architecture: Architecture,
    pub modality: Modality,
    pub dimension: usize,
    pub device: String,
    pub dtype: String,
    /// Text backbones: most tokens per input, special tokens included; 0 for images.
    pub max_sequence_length: usize,
    /// Image backbones: the side of the square input the network takes; 0 for text.
    pub image_size: usize,
    /// Encoder layers that fine-tuning can adapt; 0 for a backbone that cannot
    /// be fine-tuned.
    pub encoder_layers: usize,
    pub default_options: EmbedOptions,
    pub default_truncate: bool,
    /// sha256 of the weights file, hex.
    pub fingerprint: String,
    /// Where the weights came from: a local path or a hub repository id.
    pub source: String,
}

impl BackboneDescriptor {
    /// A backbone `name` of `architecture` giving `dimension` features, on
    /// the CPU in f32 with mean pooling, normalization and truncation by
    /// default, not fine-tunable, with no size limits, fingerprint or
    /// source: a base for descriptors built field by field
    /// (`..BackboneDescriptor::new(..)`), so that a field added here reaches
    /// only the loaders that know its value.
    pub fn new(name: impl Into<String>, architecture: Architecture, dimension: usize) -> Self {
        Self {
            name: name.into(),
            architecture,
            modality: architecture.modality(),
            dimension,
            device: "cpu".to_owned(),
            dtype: "f32".to_owned(),
            max_sequence_length: 0,
            image_size: 0,
            encoder_layers: 0,
            default_options: EmbedOptions::new(Pooling::Mean, true),
            default_truncate: true,
            fingerprint: String::new(),
            source: String::new(),
        }
    }
}

/// A resident pretrained model.
pub trait Backbone: Send + Sync {
    fn descriptor(&self) -> &BackboneDescriptor;

    /// Checks one input and converts it for the model; `index` is the input's
    /// position in its request, for error messages.
    fn prepare(&self, index: usize, input: Input, truncate: bool) -> Result<Prepared>;

    /// One forward pass over a batch; returns one vector per item, in order.
    fn embed(&self, items: &[EmbedItem<'_>]) -> Result<Vec<Vec<f32>>>;

    /// Whether items may carry a fine-tuned adapter or ask for hidden states
    /// (see [`EmbedItem`]).
    fn takes_adapters(&self) -> bool {
        false
    }

    /// Whether a forward pass computes every item at the length of the longest
    /// (padding), so that the batcher should split batches by length.
    fn pads_batches(&self) -> bool {
        false
    }

    /// The built-in classifier of that name, if the weights came with one.
    fn classifier(&self, _name: &str) -> Option<Arc<BuiltinClassifier>> {
        None
    }

    /// Every built-in classifier, for listings.
    fn classifiers(&self) -> Vec<Arc<BuiltinClassifier>> {
        Vec::new()
    }
}

/// Runs CPU work of our own kernels on the current rayon pool when called from
/// inside one (a batching worker's own pool, see `threads_per_worker`), else on
/// candle's shared pool, so that it never competes with a second set of threads.
pub(crate) fn on_thread_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        work()
    } else {
        candle_core::utils::with_threadpool(work)
    }
}

/// The candle device a configured device names; fails when it is not there
/// (CUDA in a build without the `cuda` feature, or no such GPU).
pub fn candle_device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|err| {
            Error::ModelLoad(format!(
                "device `{spec}` is not available ({err}); CUDA needs a build with the `cuda` feature"
            ))
        }),
    }
}

/// Fetches weights if needed, loads the model onto its device and warms it up.
/// Blocking: call it from a blocking thread.
pub fn load(
    config: &BackboneConfig,
    cache_dir: Option<&std::path::Path>,
    image_limits: vision::image::ImageLimits,
) -> Result<Arc<dyn Backbone>> {
    load_measured(config, cache_dir, image_limits).map(|loaded| loaded.backbone)
}

/// A loaded backbone and the accelerator memory its load took.
pub struct Loaded {
    pub backbone: Arc<dyn Backbone>,
    /// Bytes of GPU memory (see [`device_memory`]); `None` on the CPU.
    pub device_memory_bytes: Option<u64>,
}

/// [`load`], measuring the accelerator memory the backbone holds afterwards.
pub fn load_measured(
    config: &BackboneConfig,
    cache_dir: Option<&std::path::Path>,
    image_limits: vision::image::ImageLimits,
) -> Result<Loaded> {
    let probe = device_memory::DeviceMemoryProbe::start(config.device);
    let backbone = load_and_warm_up(config, cache_dir, image_limits)?;
    Ok(Loaded {
        backbone,
        device_memory_bytes: probe.and_then(device_memory::DeviceMemoryProbe::finish),
    })
}

fn load_and_warm_up(
    config: &BackboneConfig,
    cache_dir: Option<&std::path::Path>,
    image_limits: vision::image::ImageLimits,
) -> Result<Arc<dyn Backbone>> {
    let layout = catalog::family(config).weight_layout();
    let files = weights::source::resolve(&config.source, cache_dir, layout)?;
    let backbone = catalog::load(config, &files, image_limits)?;
    warm_up(backbone.as_ref())?;
    Ok(backbone)
}

/// Runs one small forward pass so that the first client request does not pay for
/// lazy allocations and thread-pool start-up.
fn warm_up(backbone: &dyn Backbone) -> Result<()> {
    let descriptor = backbone.descriptor();
    let sample = match descriptor.modality {
        Modality::Text => Input::Text("tlserve warm-up".to_owned()),
        Modality::Image => {
            // A mid-gray image (zero after normalization) at the input size.
            let side = descriptor.image_size;
            Input::Tensor {
                shape: vec![3, side, side],
                values: vec![0.0; 3 * side * side],
            }
        }
    };
    let prepared = backbone.prepare(0, sample, true)?;
    backbone.embed(&[EmbedItem::frozen(&prepared, descriptor.default_options)])?;
    Ok(())
}
