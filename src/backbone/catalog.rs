//! The one map from a configured architecture to what serves it: its family
//! (and so its loader), the layout of its weight files, the pooling requests
//! get when they name none, and for image networks the preprocessing their
//! pretrained weights were evaluated with.
//!
//! Every `match` here names each architecture, with no catch-all: a new one
//! does not compile until this file says where it belongs. Outside this file
//! the families see their own variants (`ImageNetwork`), never the list of
//! architectures, so they hold no match that a new architecture could fall
//! through.

use std::sync::Arc;

use super::{
    bert::BertBackbone,
    llama::LlamaBackbone,
    vision::{
        image::{ImageLimits, Resample},
        VisionBackbone, IMAGENET_MEAN, IMAGENET_STD,
    },
    weights::source::{Layout, ModelFiles},
    Backbone, Pooling,
};
use crate::{
    config::{Architecture, BackboneConfig, VggFeatures},
    Result,
};

/// The family an architecture belongs to: one loader and one engine pair each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT-family encoders: safetensors, config.json and tokenizer.json.
    Bert,
    /// Llama-architecture decoders: one GGUF file.
    Llama,
    /// Convolutional image networks: safetensors.
    Vision(ImageNetwork),
}

/// The convolutional networks the vision family builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageNetwork {
    EfficientNetLite0,
    EfficientNetB0,
    Resnet50,
    Vgg16(VggFeatures),
}

/// The family of `architecture`.
pub fn family(config: &BackboneConfig) -> Family {
    match config.architecture {
        Architecture::Bert => Family::Bert,
        Architecture::Llama => Family::Llama,
        Architecture::EfficientNetLite0 => Family::Vision(ImageNetwork::EfficientNetLite0),
        Architecture::EfficientNetB0 => Family::Vision(ImageNetwork::EfficientNetB0),
        Architecture::Resnet50 => Family::Vision(ImageNetwork::Resnet50),
        Architecture::Vgg16 => Family::Vision(ImageNetwork::Vgg16(config.vgg_features)),
    }
}

impl Family {
    /// Which files make up the weights of a backbone of this family.
    pub fn weight_layout(self) -> Layout {
        match self {
            Family::Bert => Layout::Text,
            Family::Llama => Layout::Gguf,
            Family::Vision(_) => Layout::Image,
        }
    }

    /// The pooling of requests that leave it unspecified, where the
    /// configuration sets none. Decoders: the position-weighted mean, whose
    /// heads were the best or within a point of it on both sets of
    /// docs/BENCHMARKS.md ("Decoder features"), where the last token won one
    /// set and lost the other by 7 points. Everything else: the mean.
    pub fn default_pooling(self) -> Pooling {
        match self {
            Family::Llama => Pooling::WeightedMean,
            Family::Bert | Family::Vision(_) => Pooling::Mean,
        }
    }
}

/// The pooling of `config`'s backbone for requests that name none: the
/// configured one, else its family's.
pub fn default_pooling(config: &BackboneConfig) -> Pooling {
    config
        .pooling
        .unwrap_or_else(|| family(config).default_pooling())
}

/// How an image network's pretrained weights expect their input resized and
/// normalized, where the configuration leaves it unset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageDefaults {
    pub resample: Resample,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageNetwork {
    /// EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128 over
    /// 0..255; EfficientNet and the torchvision models on ImageNet
    /// statistics. All evaluate on the central 87.5% (224 of 256,
    /// `ImageConfig`'s defaults); the EfficientNets resize bicubically,
    /// torchvision bilinearly.
    pub fn image_defaults(self) -> ImageDefaults {
        let imagenet = |resample| ImageDefaults {
            resample,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        };
        match self {
            ImageNetwork::EfficientNetLite0 => ImageDefaults {
                resample: Resample::Bicubic,
                mean: [127.0 / 255.0; 3],
                std: [128.0 / 255.0; 3],
            },
            ImageNetwork::EfficientNetB0 => imagenet(Resample::Bicubic),
            ImageNetwork::Resnet50 | ImageNetwork::Vgg16(_) => imagenet(Resample::Bilinear),
        }
    }
}

/// Loads `config`'s backbone from its resolved `files` with its family's
/// loader.
pub fn load(
    config: &BackboneConfig,
    files: &ModelFiles,
    image_limits: ImageLimits,
) -> Result<Arc<dyn Backbone>> {
    Ok(match family(config) {
        Family::Bert => Arc::new(BertBackbone::load(config, files)?),
        Family::Llama => Arc::new(LlamaBackbone::load(config, files)?),
        Family::Vision(network) => {
            Arc::new(VisionBackbone::load(config, network, files, image_limits)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(architecture: &str, pooling: Option<&str>) -> BackboneConfig {
        let pooling = pooling.map_or(String::new(), |p| format!("pooling = \"{p}\"\n"));
        toml::from_str(&format!(
            "name = \"t\"\narchitecture = \"{architecture}\"\nsource = {{ path = \"m\" }}\n{pooling}"
        ))
        .expect("config")
    }

    #[test]
    fn the_configured_pooling_wins_over_the_familys() {
        assert_eq!(default_pooling(&config("bert", None)), Pooling::Mean);
        assert_eq!(
            default_pooling(&config("llama", None)),
            Pooling::WeightedMean
        );
        assert_eq!(default_pooling(&config("resnet50", None)), Pooling::Mean);
        assert_eq!(
            default_pooling(&config("llama", Some("last_token"))),
            Pooling::LastToken
        );
    }

    #[test]
    fn each_architecture_has_a_family_and_its_weight_files() {
        let layout = |architecture| family(&config(architecture, None)).weight_layout();
        assert_eq!(layout("bert"), Layout::Text);
        assert_eq!(layout("llama"), Layout::Gguf);
        for architecture in ["efficientnet-lite0", "efficientnet-b0", "resnet50", "vgg16"] {
            assert_eq!(layout(architecture), Layout::Image, "{architecture}");
        }
    }
}
