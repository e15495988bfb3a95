//! ResNet-50 (He et al., 2015) in torchvision's layout (`conv1`, `bn1`,
//! `layer1.0.conv1`, ..., `layer4.2.bn3`, `fc`), which timm's `resnet50` exports
//! share. The network is candle-transformers' (stride on the 3x3 convolution, as
//! torchvision's "v1.5"); the classifier `fc` is loaded on its own so that the
//! pooled features and the ImageNet head are both available.

use candle_core::Tensor;
use candle_nn::{Func, Module, VarBuilder};

use super::layers::Linear;

const FEATURES: usize = 2048;

pub struct ResNet50 {
    body: Func<'static>,
    classifier: Option<Linear>,
}

impl ResNet50 {
    pub fn load(vb: VarBuilder<'static>) -> candle_core::Result<Self> {
        let classifier = Linear::load_optional(vb.pp("fc"), FEATURES)?;
        let body = candle_transformers::models::resnet::resnet50_no_final_layer(vb)?;
        Ok(Self { body, classifier })
    }
}

impl super::vision::ImageNetwork for ResNet50 {
    fn dimension(&self) -> usize {
        FEATURES
    }

    fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        self.body.forward(pixels)
    }

    fn classifier(&self) -> Option<&Linear> {
        self.classifier.as_ref()
    }
}
