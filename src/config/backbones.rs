//! The `[[backbones]]` sections: each resident model, where its weights come
//! from, the device and engine it computes on, its preprocessing and its
//! batching, with the defaults of each setting.

use std::{collections::HashSet, fmt, path::PathBuf, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize};

use super::{is_valid_name, LimitsConfig};

/// Model families tlserve can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT-family encoders (BERT, MiniLM, sentence-transformers models).
    Bert,
    /// EfficientNet-Lite0 in the layout of `efficientnet_lite_pytorch`.
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
    /// EfficientNet-B0 in the layout of `efficientnet_pytorch`.
    #[serde(rename = "efficientnet-b0")]
    EfficientNetB0,
    /// ResNet-50 in torchvision's (and timm's) layout.
    Resnet50,
    /// VGG16 in torchvision's layout.
    Vgg16,
    /// Llama-architecture decoders (Llama, SmolLM2, ...) in one GGUF file,
    /// tokenizer included.
    Llama,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::EfficientNetLite0 => "efficientnet-lite0",
            Architecture::EfficientNetB0 => "efficientnet-b0",
            Architecture::Resnet50 => "resnet50",
            Architecture::Vgg16 => "vgg16",
            Architecture::Llama => "llama",
        }
    }

    /// The kind of input the architecture takes.
    pub fn modality(self) -> Modality {
        match self {
            Architecture::Bert | Architecture::Llama => Modality::Text,
            Architecture::EfficientNetLite0
            | Architecture::EfficientNetB0
            | Architecture::Resnet50
            | Architecture::Vgg16 => Modality::Image,
        }
    }
}

/// The kind of input a backbone accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// Texts, tokenized by the backbone.
    Text,
    /// Encoded images (or preprocessed pixel tensors).
    Image,
}

/// Which implementation computes a backbone on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Native on CPU, candle elsewhere.
    #[default]
    Auto,
    /// Our forward passes written for the CPU (src/backbone/bert_native.rs,
    /// src/backbone/vision_native/).
    Native,
    /// Graphs of candle operations (src/backbone/bert_graph.rs and the
    /// architectures' own files): any device; for BERT f32, f16 or bf16.
    Candle,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Native => "native",
            Engine::Candle => "candle",
        }
    }
}

/// Number format of a BERT backbone's forward pass: of the dense layers on the
/// native (CPU) engine, of the whole graph on the candle engine (GPUs);
/// docs/PERFORMANCE.md has the speed and accuracy of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Native engine: bf16 where the CPU has AMX-BF16 (as accurate as f32 for
    /// retrieval and heads, and several times faster there:
    /// docs/PERFORMANCE.md), f32 elsewhere. Candle engine: f16 on a GPU, f32
    /// on the CPU.
    #[default]
    Auto,
    /// Single precision throughout.
    F32,
    /// Candle engine only (meant for GPUs): weights and activations in IEEE
    /// half precision; layer norms and softmax accumulate in f32.
    F16,
    /// Native engine: weights and inputs of the dense layers rounded to
    /// bfloat16, sums in f32: fast with AVX-512 BF16, emulated (slower than
    /// f32) without. Candle engine: weights and activations in bfloat16.
    Bf16,
    /// Weights quantized to int8 per output channel at load time, inputs per
    /// row before each product, exact integer sums (AVX-512 VNNI, AVX2).
    Int8,
    /// GGUF backbones: the weights kept in the file's quantized blocks and
    /// multiplied by candle's quantized kernels (the least memory).
    Quantized,
}

impl Precision {
    /// Anything but f32 or auto: settings only text backbones honour.
    pub fn is_reduced(self) -> bool {
        self != Precision::Auto && self != Precision::F32
    }

    /// Whether the native (CPU) engine computes in this format.
    pub fn native_engine_runs(self) -> bool {
        self != Precision::F16
    }

    /// Whether the candle engine computes in this format.
    pub fn candle_engine_runs(self) -> bool {
        self != Precision::Int8
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::Quantized => "quantized",
        }
    }
}

/// Which VGG16 layer gives the features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VggFeatures {
    /// The second dense layer, 4096 values; the ImageNet classifier applies to it.
    #[default]
    Fc7,
    /// The global average of the last convolutional block, 512 values.
    Pool5,
}

/// Resampling used when an image is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    /// Bilinear (a triangle filter), as torchvision.
    Bilinear,
    /// Bicubic (Catmull-Rom), as the EfficientNet evaluations.
    Bicubic,
}

/// Preprocessing of an image backbone; every unset value takes the default of
/// its architecture (what the pretrained weights were evaluated with; the
/// per-architecture values live in the backbone catalog).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The shorter side is resized to this first.
    pub resize_shorter: Option<u32>,
    /// Then the centered square of this side is the network's input.
    pub crop: Option<u32>,
    pub resample: Option<Resample>,
    /// Per channel (R, G, B), on pixels scaled to [0, 1].
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl ImageConfig {
    /// `resize_shorter` when unset: every architecture tlserve loads is
    /// evaluated on the central 87.5% of the image, 224 of 256.
    pub const DEFAULT_RESIZE_SHORTER: u32 = 256;
    /// `crop` when unset.
    pub const DEFAULT_CROP: u32 = 224;

    /// `resize_shorter`, or its default when unset.
    pub fn resize_shorter_or_default(&self) -> u32 {
        self.resize_shorter.unwrap_or(Self::DEFAULT_RESIZE_SHORTER)
    }

    /// `crop`, or its default when unset.
    pub fn crop_or_default(&self) -> u32 {
        self.crop.unwrap_or(Self::DEFAULT_CROP)
    }
}

/// How the token vectors of a text become one vector. Also stored with each
/// head (head.json), in the same lower-case names. `tlserve embed --pooling`
/// takes it in kebab-case (`last-token`) and lists the names alone: the
/// variants' documentation below is about the config, so each value's help
/// is reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "kebab-case")]
pub enum Pooling {
    /// Mean of the token vectors, padding excluded.
    #[default]
    #[value(help = None::<&str>)]
    Mean,
    /// The first ([CLS]) token's vector.
    #[value(help = None::<&str>)]
    Cls,
    /// The last token's vector: for decoders, the end-of-sequence token
    /// appended to every text, the one token that has seen all of it.
    #[value(help = None::<&str>)]
    LastToken,
    /// Mean weighted by position (1, 2, ..., n): under causal attention
    /// later tokens have seen more of the text (SGPT).
    #[value(help = None::<&str>)]
    WeightedMean,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::LastToken => "last_token",
            Pooling::WeightedMean => "weighted_mean",
        }
    }
}

/// The device a backbone computes on, as the config names it: `cpu`, or
/// `cuda:N` (`cuda` alone is `cuda:0`). Whether the device exists is known only
/// when a backbone loads onto it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal (a build with the `cuda` feature).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        name.strip_prefix("cuda:")
            .or_else(|| (name == "cuda").then_some("0"))
            .and_then(|n| n.parse::<usize>().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("unknown device `{name}` (use `cpu` or `cuda:N`)"))
    }
}

impl fmt::Display for DeviceSpec {
    /// The canonical name: `cpu` or `cuda:N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A device equals every name that names it: `cuda` and `cuda:0` alike.
impl PartialEq<str> for DeviceSpec {
    fn eq(&self, name: &str) -> bool {
        name.parse::<DeviceSpec>().is_ok_and(|spec| spec == *self)
    }
}

/// As `PartialEq<str>`.
impl PartialEq<&str> for DeviceSpec {
    fn eq(&self, name: &&str) -> bool {
        *self == **name
    }
}

/// Where a backbone's weights come from: exactly one of `path` and `hub`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A local folder in Hugging Face layout (config.json, model.safetensors,
    /// tokenizer.json). Relative paths are relative to the config file.
    pub path: Option<PathBuf>,
    /// A Hugging Face hub repository id, e.g. `sentence-transformers/all-MiniLM-L6-v2`,
    /// fetched once at start-up into the model cache.
    pub hub: Option<String>,
    /// Hub revision (branch, tag or commit); default `main`.
    pub revision: Option<String>,
    /// The weights file in `path` or the hub repository, for GGUF
    /// (`llama`) backbones, whose repositories hold one file per
    /// quantization. Unset with `path`: the folder's only `.gguf` file.
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// The name clients use; letters, digits, `-`, `_` and `.`.
    pub name: String,
    pub architecture: Architecture,
    pub source: SourceConfig,
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Most tokens per text input, special tokens included. Unset means the
    /// model's own setting (sentence_bert_config.json), else its position limit.
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// Pooling for requests that leave it unspecified; unset: the
    /// architecture's (the backbone catalog's `default_pooling`).
    #[serde(default)]
    pub pooling: Option<Pooling>,
    /// L2 normalization for requests that leave it unset.
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Whether over-long texts are truncated for requests that leave it unset.
    #[serde(default = "default_true")]
    pub truncate: bool,
    /// Most inputs in one batch.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// Most padded tokens in one batch: inputs times the longest input's tokens.
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Longest time the oldest waiting input is held back for a batch to fill.
    #[serde(default = "default_max_queue_delay_ms")]
    pub max_queue_delay_ms: f64,
    /// Most inputs waiting for this backbone; a request that does not fit gets
    /// RESOURCE_EXHAUSTED at once.
    #[serde(default = "default_max_queue_items")]
    pub max_queue_items: usize,
    /// Most distinct fine-tuned adapters in one batch: each adds its low-rank
    /// updates to its own rows, so many small groups cost more per input
    /// than few large ones. Inputs of further adapters wait for the next batch.
    #[serde(default = "default_max_adapters_per_batch")]
    pub max_adapters_per_batch: usize,
    /// Image backbones: preprocessing, defaulting to the architecture's.
    #[serde(default)]
    pub image: ImageConfig,
    /// VGG16: which layer gives the features.
    #[serde(default)]
    pub vgg_features: VggFeatures,
    /// Which implementation computes it: `auto` is native on the CPU, candle
    /// on a GPU.
    #[serde(default)]
    pub engine: Engine,
    /// BERT: the number format of the forward pass (f32, f16 and bf16 on the
    /// candle engine, f32, bf16 and int8 on the native one).
    #[serde(default)]
    pub precision: Precision,
    /// Worker threads computing passes side by side (docs/PERFORMANCE.md): 1
    /// gives each pass every core (lowest latency); one per core gives the
    /// most throughput under load.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Threads inside each pass; unset: all cores with one worker, else the
    /// cores divided among the workers.
    #[serde(default)]
    pub threads_per_worker: Option<usize>,
}

impl BackboneConfig {
    /// The engine a backbone runs on: `auto` is native on the CPU and candle
    /// elsewhere.
    pub fn resolved_engine(&self) -> Engine {
        match (self.engine, self.device) {
            (Engine::Auto, DeviceSpec::Cpu) => Engine::Native,
            (Engine::Auto, _) => Engine::Candle,
            (chosen, _) => chosen,
        }
    }

    /// Everything about one backbone that can be checked without the others;
    /// `limits` are the request limits its queue must accommodate.
    fn validate(&self, limits: &LimitsConfig) -> Result<(), String> {
        self.validate_source()?;
        if matches!(self.max_sequence_length, Some(n) if n < 3) {
            return Err("max_sequence_length must be at least 3".into());
        }
        self.validate_modality()?;
        self.validate_batching(limits)
    }

    /// Exactly one of `path` and `hub`, and a revision only for the hub.
    fn validate_source(&self) -> Result<(), String> {
        match (&self.source.path, &self.source.hub) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err("source needs exactly one of `path` and `hub`".into()),
        }
        if self.source.revision.is_some() && self.source.hub.is_none() {
            return Err("source.revision only applies to `hub`".into());
        }
        if self.source.file.is_some() && self.architecture != Architecture::Llama {
            return Err("source.file applies to GGUF (llama) backbones only".into());
        }
        if let Some(file) = &self.source.file {
            if file.is_empty() || file.contains("..") || file.starts_with('/') {
                return Err(format!(
                    "source.file `{file}` must be a file name inside the source"
                ));
            }
        }
        Ok(())
    }

    /// Settings that only one kind of backbone understands must not be given to
    /// the other, where they would silently do nothing.
    fn validate_modality(&self) -> Result<(), String> {
        match self.architecture.modality() {
            Modality::Text => self.validate_text_settings()?,
            Modality::Image => self.validate_image_settings()?,
        }
        if self.architecture != Architecture::Vgg16 && self.vgg_features != VggFeatures::default() {
            return Err("vgg_features applies to the vgg16 architecture only".into());
        }
        Ok(())
    }

    /// A text backbone has no `image` settings.
    fn validate_text_settings(&self) -> Result<(), String> {
        let image = &self.image;
        if image.resize_shorter.is_some()
            || image.crop.is_some()
            || image.resample.is_some()
            || image.mean.is_some()
            || image.std.is_some()
        {
            return Err("`image` settings apply to image backbones only".into());
        }
        if self.precision == Precision::Quantized && self.architecture != Architecture::Llama {
            return Err("precision = \"quantized\" applies to GGUF (llama) backbones only".into());
        }
        let candle = self.resolved_engine() == Engine::Candle;
        if candle && !self.precision.candle_engine_runs() {
            return Err(format!(
                "precision = \"{}\" runs on the native engine (CPU); the candle engine \
                 computes in f32, f16 or bf16",
                self.precision.as_str()
            ));
        }
        if !candle && !self.precision.native_engine_runs() {
            return Err(format!(
                "precision = \"{}\" runs on the candle engine (GPUs); the native engine \
                 computes in f32, bf16 or int8",
                self.precision.as_str()
            ));
        }
        Ok(())
    }

    /// An image backbone has no text settings, and its preprocessing is sound.
    fn validate_image_settings(&self) -> Result<(), String> {
        if self.precision.is_reduced() {
            return Err("`precision` applies to text backbones only".into());
        }
        if self.max_sequence_length.is_some() {
            return Err("max_sequence_length applies to text backbones only".into());
        }
        if let Some(pooling) = self.pooling.filter(|&p| p != Pooling::Mean) {
            return Err(format!(
                "image backbones pool globally (mean); `pooling = \"{}\"` is for text",
                pooling.as_str()
            ));
        }
        let crop = self.image.crop_or_default();
        let resize_shorter = self.image.resize_shorter_or_default();
        if !(16..=1024).contains(&crop) || resize_shorter < crop {
            return Err(format!(
                "image.crop must be in [16, 1024] and image.resize_shorter at least crop \
                 (got crop {crop}, resize_shorter {resize_shorter})"
            ));
        }
        // Unset values take the architecture's defaults, which are sound.
        let bad_std = |std: &[f32; 3]| std.iter().any(|s| !(s.is_finite() && *s > 0.0));
        let bad_mean = |mean: &[f32; 3]| mean.iter().any(|m| !m.is_finite());
        if self.image.std.as_ref().is_some_and(bad_std)
            || self.image.mean.as_ref().is_some_and(bad_mean)
        {
            return Err("image.mean must be finite and image.std positive".into());
        }
        if self.architecture == Architecture::Vgg16
            && self.vgg_features == VggFeatures::Fc7
            && crop != 224
        {
            return Err("VGG16 fc7 features need image.crop = 224".into());
        }
        Ok(())
    }

    /// Worker, batch and queue bounds; the queue must hold a full-size request.
    fn validate_batching(&self, limits: &LimitsConfig) -> Result<(), String> {
        if !(1..=256).contains(&self.workers)
            || matches!(self.threads_per_worker, Some(t) if !(1..=1024).contains(&t))
        {
            return Err("workers must be in [1, 256] and threads_per_worker in [1, 1024]".into());
        }
        if self.max_batch_size == 0
            || self.max_batch_tokens == 0
            || self.max_adapters_per_batch == 0
        {
            return Err(
                "max_batch_size, max_batch_tokens and max_adapters_per_batch must be at least 1"
                    .into(),
            );
        }
        if !(self.max_queue_delay_ms.is_finite()
            && (0.0..=10_000.0).contains(&self.max_queue_delay_ms))
        {
            return Err("max_queue_delay_ms must be in [0, 10000]".into());
        }
        if self.max_queue_items < limits.max_inputs_per_request {
            return Err(format!(
                "max_queue_items ({}) must be at least limits.max_inputs_per_request ({}), \
                 or a full-size request could never be queued",
                self.max_queue_items, limits.max_inputs_per_request
            ));
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}

// Batching defaults; docs/BENCHMARKS.md has the measurements behind them.
fn default_workers() -> usize {
    1
}

fn default_max_batch_size() -> usize {
    32
}

fn default_max_batch_tokens() -> usize {
    8192
}

/// 0: a free worker takes whatever is queued at once. A lone request no longer
/// waits for company that is not coming, and under load batches still form
/// while the previous pass runs (docs/BENCHMARKS.md, "One client's latency").
fn default_max_queue_delay_ms() -> f64 {
    0.0
}

fn default_max_queue_items() -> usize {
    2048
}

fn default_max_adapters_per_batch() -> usize {
    8
}

/// Each backbone on its own, and names unique among them; `limits` are the
/// request limits every backbone's queue must accommodate.
pub(super) fn validate_backbones(
    backbones: &[BackboneConfig],
    limits: &LimitsConfig,
) -> Result<(), String> {
    let mut names = HashSet::new();
    for (i, backbone) in backbones.iter().enumerate() {
        let at = format!("backbones[{i}] ({})", backbone.name);
        if !is_valid_name(&backbone.name) {
            return Err(format!(
                "{at}: name must be 1-64 characters of letters, digits, '-', '_' and '.'"
            ));
        }
        if !names.insert(backbone.name.as_str()) {
            return Err(format!("{at}: the name is used twice"));
        }
        backbone
            .validate(limits)
            .map_err(|reason| format!("{at}: {reason}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{
        tests::{env, MINIMAL},
        Config, ConfigError,
    };

    /// Decoder settings: the poolings by name, the GGUF file of a source,
    /// and neither where it cannot apply.
    #[test]
    fn decoder_settings_are_read_and_refused_where_they_do_not_apply() {
        let with = |pairs: &[(&str, &str)]| Config::from_toml(MINIMAL, Path::new("."), env(pairs));
        let architecture = ("TLSERVE__BACKBONES__0__ARCHITECTURE", "llama");
        let file = ("TLSERVE__BACKBONES__0__SOURCE__FILE", "model.Q4_1.gguf");
        let config = with(&[
            architecture,
            file,
            ("TLSERVE__BACKBONES__0__POOLING", "last_token"),
            ("TLSERVE__BACKBONES__0__PRECISION", "quantized"),
        ])
        .unwrap();
        let backbone = &config.backbones[0];
        assert_eq!(backbone.pooling, Some(Pooling::LastToken));
        assert_eq!(backbone.source.file.as_deref(), Some("model.Q4_1.gguf"));
        assert_eq!(backbone.architecture.modality(), Modality::Text);
        let pooling = with(&[("TLSERVE__BACKBONES__0__POOLING", "weighted_mean")]).unwrap();
        assert_eq!(pooling.backbones[0].pooling, Some(Pooling::WeightedMean));
        for (pairs, message) in [
            (&[file][..], "GGUF (llama) backbones only"),
            (
                &[
                    architecture,
                    ("TLSERVE__BACKBONES__0__SOURCE__FILE", "../x.gguf"),
                ],
                "file name",
            ),
            (
                &[
                    ("TLSERVE__BACKBONES__0__ARCHITECTURE", "resnet50"),
                    ("TLSERVE__BACKBONES__0__POOLING", "last_token"),
                ],
                "pool globally",
            ),
        ] {
            let err = with(pairs).unwrap_err();
            assert!(err.to_string().contains(message), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn precision_is_read_and_refused_where_it_does_not_apply() {
        let config = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__0__PRECISION", "int8")]),
        )
        .unwrap();
        assert_eq!(config.backbones[0].precision, Precision::Int8);
        assert_eq!(
            Config::from_toml(MINIMAL, Path::new("."), env(&[]))
                .unwrap()
                .backbones[0]
                .precision,
            Precision::Auto
        );
        // Each engine takes the formats it computes in; `auto` is candle on a GPU.
        let with = |pairs: &[(&str, &str)]| Config::from_toml(MINIMAL, Path::new("."), env(pairs));
        let precision = "TLSERVE__BACKBONES__0__PRECISION";
        let engine = "TLSERVE__BACKBONES__0__ENGINE";
        let device = "TLSERVE__BACKBONES__0__DEVICE";
        for accepted in [
            &[(precision, "bf16"), (engine, "candle")][..],
            &[(precision, "f16"), (engine, "candle")],
            &[(precision, "f16"), (device, "cuda:0")],
            &[(precision, "bf16"), (device, "cuda")],
            &[(precision, "bf16")],
        ] {
            assert!(with(accepted).is_ok(), "{accepted:?}");
        }
        let refused = [
            (
                &[(precision, "int8"), (engine, "candle")][..],
                "runs on the native engine",
            ),
            (
                &[(precision, "int8"), (device, "cuda:0")],
                "runs on the native engine",
            ),
            (&[(precision, "f16")], "runs on the candle engine"),
            (
                &[(precision, "f16"), (engine, "native")],
                "runs on the candle engine",
            ),
            (
                &[
                    (precision, "bf16"),
                    ("TLSERVE__BACKBONES__0__ARCHITECTURE", "resnet50"),
                ],
                "text backbones",
            ),
            (&[(precision, "quantized")], "GGUF (llama) backbones only"),
        ];
        for (pairs, message) in refused {
            let err = with(pairs).unwrap_err();
            assert!(err.to_string().contains(message), "{pairs:?}: {err}");
        }
        let err = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__0__PRECISION", "fp8")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("`auto`, `f32`, `f16`, `bf16`, `int8`"),
            "{err}"
        );
    }

    #[test]
    fn validation_rejects_unsafe_names_and_ambiguous_sources() {
        let bad_name = MINIMAL.replace("\"minilm\"", "\"../etc\"");
        assert!(Config::from_toml(&bad_name, Path::new("."), env(&[])).is_err());

        let two_sources = MINIMAL.replace(
            "{ path = \"models/minilm\" }",
            "{ path = \"a\", hub = \"org/model\" }",
        );
        let err = Config::from_toml(&two_sources, Path::new("."), env(&[])).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");

        let unknown_field = format!("{MINIMAL}\nunknown = 1\n");
        assert!(Config::from_toml(&unknown_field, Path::new("."), env(&[])).is_err());
    }

    #[test]
    fn devices_are_parsed_with_the_config() {
        let config = Config::from_toml(
            MINIMAL,
            Path::new("."),
            env(&[("TLSERVE__BACKBONES__0__DEVICE", "cuda:1")]),
        )
        .unwrap();
        assert_eq!(config.backbones[0].device, DeviceSpec::Cuda(1));
        let gpu = MINIMAL.replace("source =", "device = \"cuda\"\nsource =");
        let config = Config::from_toml(&gpu, Path::new("."), env(&[])).unwrap();
        assert_eq!(config.backbones[0].device, DeviceSpec::Cuda(0));
        assert_eq!(config.backbones[0].device.to_string(), "cuda:0");
        assert_eq!(config.backbones[0].device, "cuda");

        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "metal"] {
            let err = Config::from_toml(
                MINIMAL,
                Path::new("."),
                env(&[("TLSERVE__BACKBONES__0__DEVICE", bad)]),
            )
            .unwrap_err();
            assert!(matches!(err, ConfigError::Invalid(_)), "{bad}: {err}");
            assert!(
                err.to_string().contains(&format!("unknown device `{bad}`")),
                "{bad}: {err}"
            );
        }
    }
}
