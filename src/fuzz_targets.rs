//! The code paths that parse untrusted bytes, as plain functions: the cargo-fuzz
//! targets in fuzz/ call them, and tests/integration/fuzz_smoke.rs runs them on the seed
//! corpus and its mutations in every test run. Each must return for any input,
//! never panic; errors are the expected outcome for most inputs.

use prost::Message;

use crate::{
    backbone::{
        image::{self, ImageLimits, Preprocessing, Resample},
        BackboneDescriptor,
    },
    config::{Architecture, Config, LimitsConfig},
    core,
    head::HeadRef,
    proto,
    wire::{self, convert},
};

/// An encoded image through the server's decoding and preprocessing, with
/// limits small enough that one input stays fast.
pub fn image_decode(data: &[u8]) {
    let limits = ImageLimits {
        max_encoded_bytes: 1 << 20,
        max_pixels: 1 << 22,
        max_aspect_ratio: 64,
        max_decoding_bytes: 1 << 24,
    };
    if let Ok(decoded) = image::decode(0, data, limits) {
        let spec = Preprocessing {
            resize_shorter: 40,
            crop: 32,
            resample: Resample::Bicubic,
            mean: [0.5; 3],
            std: [0.25; 3],
        };
        if let Ok(pixels) = image::preprocess(0, &decoded, &spec) {
            assert_eq!(pixels.len(), 3 * 32 * 32);
        }
    }
}

/// A request message as it arrives on the wire (the first byte picks which),
/// decoded and converted as the services do before any model work.
pub fn request_convert(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let limits = LimitsConfig {
        max_inputs_per_request: 16,
        max_text_chars: 4096,
        ..LimitsConfig::default()
    };
    let descriptors = [text_descriptor(), image_descriptor()];
    match kind % 4 {
        0 => {
            if let Ok(request) = proto::EmbedRequest::decode(body) {
                if let Ok(pooling) = convert::pooling_of(request.pooling) {
                    for descriptor in &descriptors {
                        let _ = core::embed_options(pooling, request.normalize, descriptor);
                    }
                }
                let _ = convert::priority_of(request.priority);
                checked_inputs(request.inputs, &limits);
            }
        }
        1 => {
            if let Ok(request) = proto::PredictRequest::decode(body) {
                let _ = HeadRef::parse(&request.head);
                let _ = convert::priority_of(request.priority);
                checked_inputs(request.inputs, &limits);
            }
        }
        2 => {
            if let Ok(request) = proto::TrainHeadRequest::decode(body) {
                let _ = HeadRef::parse(&request.head_name);
                let Ok(request) = convert::train_request(request) else {
                    return;
                };
                if let Ok(kind) = core::head_kind(request.head) {
                    let _ = core::training_params(&request.options, &kind);
                }
                if let Some(core::TrainingData::Examples(examples)) = request.data {
                    for (index, example) in examples.into_iter().enumerate() {
                        if let Ok(input) = example.input {
                            let _ = core::check_input(index, &input, limits.max_text_chars);
                        }
                    }
                }
            }
        }
        _ => {
            // A configuration file: operators' input, but parsed by the server.
            if let Ok(text) = std::str::from_utf8(body) {
                let _ = Config::from_toml(text, std::path::Path::new("/"), std::iter::empty());
            }
        }
    }
}

/// Wire inputs decoded, then checked against the request bounds.
fn checked_inputs(inputs: Vec<proto::Input>, limits: &LimitsConfig) {
    if let Ok(inputs) = convert::inputs(inputs) {
        let _ = core::check_request_inputs(&inputs, limits);
    }
}

fn text_descriptor() -> BackboneDescriptor {
    BackboneDescriptor {
        max_sequence_length: 16,
        encoder_layers: 2,
        ..BackboneDescriptor::new("text", Architecture::Bert, 4)
    }
}

fn image_descriptor() -> BackboneDescriptor {
    BackboneDescriptor {
        image_size: 32,
        ..BackboneDescriptor::new("image", Architecture::EfficientNetLite0, 4)
    }
}

/// A request body's bytes through the message-framing scanner, cut into
/// chunks of sizes the first byte picks: stalled and oversized streams, prefixes
/// split anywhere. The bytes of the message under way never exceed what its
/// prefix declared.
pub fn message_frames(data: &[u8]) {
    const LIMIT: usize = 1 << 16;
    let Some((&chunking, body)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunking % 64) + 1;
    // TrainHead's examples: the deepest field counted.
    let path: &'static [u32] = wire::field_count::counted_field("/tlserve.v1.Trainer/TrainHead")
        .map_or(&[5, 1], |(_, path)| path);
    let mut scanner = wire::framing::FrameScanner::new(LIMIT)
        .counting(wire::field_count::FieldCounter::new(path, 16));
    for piece in body.chunks(chunk) {
        if scanner.scan(piece).is_err() {
            return;
        }
        assert!(scanner.pending() <= LIMIT + 5);
    }
}
