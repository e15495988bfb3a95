//! Image backbones: a convolutional network behind the `Backbone` trait.
//!
//! `prepare` decodes and preprocesses on the request path (so the worker thread
//! only computes); `embed` stacks a batch into one `[n, 3, side, side]` tensor
//! and returns the globally pooled features. A network that keeps its ImageNet
//! classifier offers it as a built-in head (see `Backbone::classifier`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub mod efficientnet;
pub mod image;
pub mod layers;
pub mod native;
pub mod resnet;
pub mod vgg;

use efficientnet::{EfficientNet, Variant};
use image::{ImageLimits, Preprocessing};
use layers::Linear;
use native::NativeNetwork;
use resnet::ResNet50;
use vgg::Vgg16;

use super::{
    candle_device,
    catalog::{self, Family},
    engine,
    weights::source::{self, ModelFiles},
    Backbone, BackboneDescriptor, BuiltinClassifier, EmbedItem, EmbedOptions, Input, Modality,
    Pooling, Prepared,
};
use crate::{
    config::{BackboneConfig, Engine, ImageConfig},
    Error, Result,
};

/// The ImageNet-1k class names, index order (see assets/README.md).
const IMAGENET_CLASSES: &str = include_str!("../../../assets/imagenet-classes.txt");

/// A convolutional network that maps preprocessed images to pooled features.
pub trait ImageNetwork: Send + Sync {
    /// Length of the feature vector.
    fn dimension(&self) -> usize;
    /// `[batch, 3, h, w]` normalized pixels to `[batch, dimension]` features.
    fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor>;
    /// The pretrained classifier on top of the features, when the weights have it.
    fn classifier(&self) -> Option<&Linear>;
    /// The same network for the native engine, from the same folded weights.
    fn to_native(&self) -> candle_core::Result<NativeNetwork>;
}

/// What computes the forward pass.
enum Network {
    /// candle's operations, channels first: any device.
    Candle(Box<dyn ImageNetwork>),
    /// Our channels-last kernels (`native`): CPU only.
    Native(Box<NativeNetwork>),
}

pub struct VisionBackbone {
    network: Network,
    preprocessing: Preprocessing,
    limits: ImageLimits,
    device: Device,
    descriptor: BackboneDescriptor,
    classifier: Option<Arc<BuiltinClassifier>>,
}

impl VisionBackbone {
    pub fn load(
        config: &BackboneConfig,
        kind: catalog::ImageNetwork,
        files: &ModelFiles,
        limits: ImageLimits,
    ) -> Result<Self> {
        let device = candle_device(config.device)?;
        // SAFETY: as for the text backbones, the weights file is memory-mapped and
        // must not change while the server runs (model folders are replaced whole).
        let vars =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, &device) }
                .map_err(|err| {
                    Error::ModelLoad(format!("cannot map {}: {err}", files.weights.display()))
                })?;
        let network = build(kind, vars).map_err(|err| {
            Error::ModelLoad(format!(
                "{} does not hold {} weights: {err}",
                files.weights.display(),
                config.architecture.as_str()
            ))
        })?;
        let classifier = match network.classifier() {
            Some(linear) => imagenet_classifier(config, linear)?,
            None => None,
        };
        let dimension = network.dimension();
        let (engine, precision) = engine::choose(config, Family::Vision(kind), &device)?;
        let network = match engine {
            Engine::Native => Network::Native(Box::new(network.to_native().map_err(|err| {
                Error::ModelLoad(format!("cannot build the native engine's layers: {err}"))
            })?)),
            Engine::Candle | Engine::Auto => Network::Candle(network),
        };
        tracing::info!(
            backbone = %config.name,
            engine = engine.as_str(),
            kernel = engine::kernel_name(engine, precision),
            "image engine"
        );
        let preprocessing = preprocessing(kind, &config.image);
        let descriptor = BackboneDescriptor {
            name: config.name.clone(),
            architecture: config.architecture,
            modality: Modality::Image,
            dimension,
            device: config.device.to_string(),
            dtype: precision.as_str().to_owned(),
            max_sequence_length: 0,
            image_size: preprocessing.crop as usize,
            encoder_layers: 0,
            default_options: EmbedOptions {
                pooling: Pooling::Mean,
                normalize: config.normalize,
            },
            default_truncate: false,
            fingerprint: source::fingerprint(&files.weights)?,
            source: files.origin.clone(),
        };
        Ok(Self {
            network,
            preprocessing,
            limits,
            device,
            descriptor,
            classifier,
        })
    }

    fn side(&self) -> usize {
        self.preprocessing.crop as usize
    }
}

fn build(
    network: catalog::ImageNetwork,
    vars: VarBuilder<'static>,
) -> candle_core::Result<Box<dyn ImageNetwork>> {
    use catalog::ImageNetwork as Kind;
    Ok(match network {
        Kind::EfficientNetLite0 => Box::new(EfficientNet::load(vars, Variant::Lite0)?),
        Kind::EfficientNetB0 => Box::new(EfficientNet::load(vars, Variant::B0)?),
        Kind::Resnet50 => Box::new(ResNet50::load(vars)?),
        Kind::Vgg16(features) => Box::new(Vgg16::load(vars, features)?),
    })
}

/// torchvision's ImageNet normalization.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// torchvision's ImageNet normalization.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The preprocessing of an image backbone: the configured values, and where
/// unset those its network's pretrained weights were evaluated with (see
/// [`catalog::ImageNetwork::image_defaults`]).
pub fn preprocessing(network: catalog::ImageNetwork, image: &ImageConfig) -> Preprocessing {
    let defaults = network.image_defaults();
    Preprocessing {
        resize_shorter: image.resize_shorter_or_default(),
        crop: image.crop_or_default(),
        resample: image.resample.unwrap_or(defaults.resample),
        mean: image.mean.unwrap_or(defaults.mean),
        std: image.std.unwrap_or(defaults.std),
    }
}

/// The pretrained 1000-class classifier as the built-in head `<backbone>/imagenet`;
/// a classifier with another number of classes has no names to go with it.
fn imagenet_classifier(
    config: &BackboneConfig,
    linear: &Linear,
) -> Result<Option<Arc<BuiltinClassifier>>> {
    let dense = linear.to_dense()?;
    let labels: Vec<String> = IMAGENET_CLASSES.lines().map(str::to_owned).collect();
    if dense.outputs != labels.len() {
        tracing::warn!(backbone = %config.name, classes = dense.outputs,
            "the classifier is not ImageNet-1k's; it is not offered as a built-in head");
        return Ok(None);
    }
    Ok(Some(Arc::new(BuiltinClassifier {
        name: "imagenet".to_owned(),
        labels,
        weights: dense,
        options: EmbedOptions {
            pooling: Pooling::Mean,
            normalize: false,
        },
    })))
}

impl Backbone for VisionBackbone {
    fn descriptor(&self) -> &BackboneDescriptor {
        &self.descriptor
    }

    fn prepare(&self, index: usize, input: Input, _truncate: bool) -> Result<Prepared> {
        let side = self.side();
        match input {
            Input::Image(bytes) => {
                let decoded = image::decode(index, &bytes, self.limits)?;
                Ok(Prepared::Image(Arc::new(image::preprocess(
                    index,
                    &decoded,
                    &self.preprocessing,
                )?)))
            }
            Input::Tensor { shape, values } => {
                if shape != [3, side, side] {
                    return Err(Error::InvalidInput {
                        index,
                        reason: format!(
                            "backbone `{}` takes tensors of shape [3, {side}, {side}] \
                             (preprocessed as it was trained), not {shape:?}",
                            self.descriptor.name
                        ),
                    });
                }
                Ok(Prepared::Image(Arc::new(values)))
            }
            Input::Text(_) | Input::TokenIds(_) => Err(Error::InvalidInput {
                index,
                reason: format!(
                    "backbone `{}` takes images (or preprocessed tensors), not text",
                    self.descriptor.name
                ),
            }),
        }
    }

    fn embed(&self, items: &[EmbedItem<'_>]) -> Result<Vec<Vec<f32>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if items
            .iter()
            .any(|item| item.adapter.is_some() || item.capture.is_some())
        {
            return Err(Error::Inference(
                "image backbones take no adapters and give no hidden states".into(),
            ));
        }
        let side = self.side();
        let mut pixels = Vec::with_capacity(items.len() * 3 * side * side);
        for item in items {
            match item.input {
                Prepared::Image(values) => pixels.extend_from_slice(values),
                Prepared::Text(_) => {
                    return Err(Error::Inference("text item in an image batch".into()))
                }
            }
        }
        let features = match &self.network {
            Network::Candle(network) => {
                let batch = Tensor::from_vec(pixels, (items.len(), 3, side, side), &self.device)?;
                network.features(&batch)?.to_vec2::<f32>()?
            }
            Network::Native(network) => {
                let flat = super::on_thread_pool(|| network.features(&pixels, items.len(), side))?;
                flat.chunks_exact(self.descriptor.dimension)
                    .map(<[f32]>::to_vec)
                    .collect()
            }
        };
        Ok(features
            .into_iter()
            .zip(items)
            .map(|(vector, item)| {
                if item.options.normalize {
                    crate::nn::l2_normalize(vector)
                } else {
                    vector
                }
            })
            .collect())
    }

    fn classifier(&self, name: &str) -> Option<Arc<BuiltinClassifier>> {
        self.classifier
            .as_ref()
            .filter(|classifier| classifier.name == name)
            .cloned()
    }

    fn classifiers(&self) -> Vec<Arc<BuiltinClassifier>> {
        self.classifier.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    //! The architectures without fetchable weights, on generated ones: names
    //! and shapes load, the feature length is right, and an image gives the same
    //! vector alone as inside a batch.

    use candle_nn::VarMap;

    use super::image::Resample;
    use super::*;
    use crate::config::{Architecture, BackboneConfig, VggFeatures};

    /// Pseudo-random weights for every tensor the network asks for, scaled so
    /// that activations neither vanish nor explode through the layers.
    fn generated_weights(
        architecture: Architecture,
        vgg_features: VggFeatures,
        classifier: Option<(&str, usize, usize)>,
    ) -> tempfile::TempDir {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let config = BackboneConfig {
            vgg_features,
            ..backbone_config(architecture, "unused")
        };
        // Without a classifier, which the network loads only when present.
        let catalog::Family::Vision(kind) = catalog::family(&config) else {
            panic!("{architecture:?} is not an image network");
        };
        build(kind, vb).expect("the network asks for its weights");
        if let Some((prefix, inputs, classes)) = classifier {
            let mut data = varmap.data().lock().unwrap();
            for (name, shape) in [("weight", vec![classes, inputs]), ("bias", vec![classes])] {
                let zeros = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
                let var = candle_core::Var::from_tensor(&zeros).unwrap();
                data.insert(format!("{prefix}.{name}"), var);
            }
        }

        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for (name, var) in varmap.data().lock().unwrap().iter() {
            let dims = var.dims().to_vec();
            let count: usize = dims.iter().product();
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    let u = uniform();
                    if name.ends_with("running_var") {
                        0.5 + u
                    } else if name.ends_with("running_mean") || name.ends_with("bias") {
                        0.2 * (u - 0.5)
                    } else if dims.len() == 1 {
                        0.8 + 0.4 * u // batch-norm scale
                    } else {
                        // Variance 2 / fan_in: He initialisation for ReLU nets.
                        (u - 0.5) * (24.0 / fan_in as f32).sqrt()
                    }
                })
                .collect();
            var.set(&Tensor::from_vec(values, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        varmap.save(dir.path().join("model.safetensors")).unwrap();
        dir
    }

    fn backbone_config(architecture: Architecture, path: &str) -> BackboneConfig {
        toml::from_str(&format!(
            "name = \"test\"\narchitecture = \"{}\"\nsource = {{ path = \"{path}\" }}\n",
            architecture.as_str()
        ))
        .unwrap()
    }

    fn load(config: &BackboneConfig, dir: &std::path::Path) -> VisionBackbone {
        let files = source::resolve(&config.source, None, source::Layout::Image).unwrap();
        assert_eq!(files.weights, dir.join("model.safetensors"));
        let catalog::Family::Vision(kind) = catalog::family(config) else {
            panic!("{:?} is not an image network", config.architecture);
        };
        VisionBackbone::load(
            config,
            kind,
            &files,
            ImageLimits {
                max_encoded_bytes: 1 << 20,
                max_pixels: 1 << 20,
                max_aspect_ratio: 32,
                max_decoding_bytes: 1 << 24,
            },
        )
        .expect("load generated weights")
    }

    /// A smooth random-ish image, different per seed.
    fn image_tensor(side: usize, seed: usize) -> Input {
        let values = (0..3 * side * side)
            .map(|i| ((i * (seed + 3)) as f32 * 0.013).sin())
            .collect();
        Input::Tensor {
            shape: vec![3, side, side],
            values,
        }
    }

    fn check(architecture: Architecture, vgg_features: VggFeatures, crop: u32, dimension: usize) {
        let classifier = match architecture {
            Architecture::Resnet50 => Some(("fc", 2048, 10)),
            Architecture::EfficientNetB0 => Some(("_fc", 1280, 10)),
            Architecture::Vgg16 if vgg_features == VggFeatures::Fc7 => {
                Some(("classifier.6", 4096, 10))
            }
            _ => None,
        };
        let dir = generated_weights(architecture, vgg_features, classifier);
        let mut config = backbone_config(architecture, dir.path().to_str().unwrap());
        config.vgg_features = vgg_features;
        config.image.crop = Some(crop);
        config.image.resize_shorter = Some(crop);
        let backbone = load(&config, dir.path());
        assert!(
            matches!(backbone.network, Network::Native(_)),
            "auto is native on CPU"
        );
        assert_eq!(backbone.descriptor().dimension, dimension);
        assert_eq!(backbone.descriptor().image_size, crop as usize);
        // A classifier of 10 classes has no ImageNet names: no built-in head.
        assert!(backbone.classifiers().is_empty());
        config.engine = Engine::Candle;
        let candle = load(&config, dir.path());
        match &candle.network {
            Network::Candle(network) => {
                assert_eq!(network.classifier().is_some(), classifier.is_some())
            }
            Network::Native(_) => panic!("engine = \"candle\" was not honoured"),
        }

        let options = EmbedOptions {
            pooling: Pooling::Mean,
            normalize: false,
        };
        let prepared: Vec<Prepared> = (0..3)
            .map(|seed| {
                backbone
                    .prepare(seed, image_tensor(crop as usize, seed), true)
                    .unwrap()
            })
            .collect();
        let items: Vec<EmbedItem> = prepared
            .iter()
            .map(|input| EmbedItem::frozen(input, options))
            .collect();
        let batch = backbone.embed(&items).unwrap();
        assert_eq!(batch.len(), 3);
        // The two engines agree: the same sums in other orders, so to 1e-4
        // of the largest feature (f32 through 16 to 50 layers).
        let plain = candle.embed(&items).unwrap();
        for (i, (native, plain)) in batch.iter().zip(&plain).enumerate() {
            let scale = plain.iter().map(|v| v.abs()).fold(0f32, f32::max);
            let diff = native
                .iter()
                .zip(plain)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-4 * scale,
                "{architecture:?} item {i}: engines differ by {diff} (scale {scale})"
            );
        }
        for (i, item) in items.iter().enumerate() {
            let alone = backbone
                .embed(std::slice::from_ref(item))
                .unwrap()
                .remove(0);
            assert_eq!(alone.len(), dimension);
            assert!(alone.iter().all(|v| v.is_finite()));
            let scale = alone.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(scale > 0.0, "{architecture:?}: all-zero features");
            let diff = alone
                .iter()
                .zip(&batch[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-4 * scale,
                "{architecture:?} item {i}: alone and batched differ by {diff} (scale {scale})"
            );
        }
        // Different images give different features.
        assert_ne!(batch[0], batch[1]);
    }

    /// The config checks only the values it is given: every architecture's
    /// defaults must pass the same checks.
    #[test]
    fn architecture_defaults_are_sound() {
        use catalog::ImageNetwork as Kind;
        for architecture in [
            Kind::EfficientNetLite0,
            Kind::EfficientNetB0,
            Kind::Resnet50,
            Kind::Vgg16(VggFeatures::Fc7),
        ] {
            let p = preprocessing(architecture, &ImageConfig::default());
            assert_eq!((p.resize_shorter, p.crop), (256, 224), "{architecture:?}");
            assert!(p.mean.iter().all(|m| m.is_finite()), "{architecture:?}");
            assert!(
                p.std.iter().all(|s| s.is_finite() && *s > 0.0),
                "{architecture:?}"
            );
        }
        let lite0 = preprocessing(Kind::EfficientNetLite0, &ImageConfig::default());
        assert_eq!(lite0.resample, Resample::Bicubic);
        assert_eq!(lite0.mean, [127.0 / 255.0; 3]);
        let configured = ImageConfig {
            resample: Some(Resample::Bicubic),
            crop: Some(200),
            ..ImageConfig::default()
        };
        let resnet = preprocessing(Kind::Resnet50, &configured);
        assert_eq!((resnet.resample, resnet.crop), (Resample::Bicubic, 200));
        assert_eq!(resnet.std, IMAGENET_STD);
    }

    #[test]
    fn resnet50_on_generated_weights() {
        check(Architecture::Resnet50, VggFeatures::Fc7, 64, 2048);
    }

    #[test]
    fn efficientnet_b0_on_generated_weights() {
        check(Architecture::EfficientNetB0, VggFeatures::Fc7, 64, 1280);
    }

    #[test]
    fn vgg16_pool5_on_generated_weights() {
        check(Architecture::Vgg16, VggFeatures::Pool5, 64, 512);
    }

    #[test]
    fn vgg16_fc7_on_generated_weights() {
        check(Architecture::Vgg16, VggFeatures::Fc7, 224, 4096);
    }
}
