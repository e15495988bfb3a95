//! Image backbones on the real EfficientNet-Lite0 ImageNet weights: numerics
//! against the independent numpy reference (tests/reference/
//! efficientnet_lite_reference.py), preprocessing against Pillow, the built-in
//! ImageNet head on real photos, and image requests through the real server.

use crate::common;

use common::*;
use tlserve::{
    backbone::{vision::image::ImageLimits, EmbedItem, EmbedOptions, Input, Pooling, Prepared},
    config::{Config, Engine},
    proto::{self, predictor_client::PredictorClient},
};
use tonic::Code;

/// The photos and the ImageNet classes any of which must be in their top 5.
const PHOTOS: [(&str, &[u32]); 3] = [
    ("chelsea.png", &[281, 282, 283, 284, 285]), // a tabby cat
    ("coffee.png", &[967, 968, 504]),            // espresso, cup, coffee mug
    ("grace_hopper.jpg", &[652]),                // military uniform
];

fn lite0_config() -> Config {
    Config::from_toml(&lite0_backbone_toml(), &repo_root(), std::iter::empty())
        .expect("valid config")
}

fn cosine64(a: &[f32], b: &[f64]) -> f64 {
    cosine(a, b)
}

fn as_f64s(value: &serde_json::Value) -> Vec<Vec<f64>> {
    serde_json::from_value(value.clone()).expect("array of arrays of numbers")
}

/// The native engine (the default on a CPU) against the reference.
#[test]
fn lite0_matches_the_numpy_reference_on_real_photos() {
    check_lite0_against_the_reference(Engine::Auto);
}

/// The plain path, candle's operations, against the same reference.
#[test]
fn lite0_on_the_candle_engine_matches_the_numpy_reference() {
    check_lite0_against_the_reference(Engine::Candle);
}

/// The network on the reference's own pixels (isolating the forward pass), then
/// the whole path from encoded bytes (adding our decoding and resizing).
fn check_lite0_against_the_reference(engine: Engine) {
    let mut config = lite0_config();
    config.backbones[0].engine = engine;
    let backbone = tlserve::backbone::load(
        &config.backbones[0],
        None,
        ImageLimits::from_config(&config.limits),
    )
    .expect("load EfficientNet-Lite0");
    let paths: Vec<_> = PHOTOS.iter().map(|(name, _)| test_image(name)).collect();
    let reference = run_reference(
        "efficientnet_lite_reference.py",
        &serde_json::json!({
            "weights": lite0_dir().join("model.safetensors"),
            "images": paths,
            "return_pixels": true,
        }),
    );
    let pixels = as_f64s(&reference["pixels"]);
    let features = as_f64s(&reference["features"]);
    let options = EmbedOptions::new(Pooling::Mean, false);
    let embed = |inputs: Vec<Input>| -> Vec<Vec<f32>> {
        let prepared: Vec<Prepared> = inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| backbone.prepare(i, input, true).expect("prepare"))
            .collect();
        let items: Vec<EmbedItem> = prepared
            .iter()
            .map(|input| EmbedItem::frozen(input, options))
            .collect();
        backbone.embed(&items).expect("embed")
    };

    // 1. Forward pass alone: f32 against float64 on identical inputs.
    let tensors = pixels
        .iter()
        .map(|p| Input::Tensor {
            shape: vec![3, 224, 224],
            values: p.iter().map(|&v| v as f32).collect(),
        })
        .collect();
    for (i, ours) in embed(tensors).iter().enumerate() {
        let cos = cosine64(ours, &features[i]);
        let max_abs = ours
            .iter()
            .zip(&features[i])
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        println!(
            "{}: forward cosine 1 - {:.2e}, max |diff| {max_abs:.2e}",
            PHOTOS[i].0,
            1.0 - cos
        );
        assert!(cos >= 0.9999, "{}: cosine {cos}", PHOTOS[i].0);
    }

    // 2. Our preprocessing against Pillow's. Both resize with the same filter
    // (bicubic, a = -0.5) but round differently (Pillow works in 8-bit fixed
    // point between its two passes), and JPEG decoders differ in their inverse
    // DCT and chroma upsampling, so single pixels may differ by several levels
    // of 255 (7 measured on the JPEG, 6 on a PNG); on average they agree to
    // well under one level (0.22-0.32 measured).
    let ours_pixels: Vec<Vec<f32>> = paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let bytes = std::fs::read(path).expect("read photo");
            match backbone
                .prepare(i, Input::Image(bytes), true)
                .expect("prepare")
            {
                Prepared::Image(values) => values.as_ref().clone(),
                Prepared::Text(_) => unreachable!("an image backbone prepares images"),
            }
        })
        .collect();
    // One level of 255 after normalization by std 128/255.
    let level = 1.0 / 128.0;
    for (i, ours) in ours_pixels.iter().enumerate() {
        let diffs: Vec<f64> = ours
            .iter()
            .zip(&pixels[i])
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().copied().fold(0.0, f64::max);
        println!(
            "{}: pixels vs Pillow mean |diff| {:.3} levels, max {:.1} levels",
            PHOTOS[i].0,
            mean / level,
            max / level
        );
        assert!(
            mean <= 0.5 * level,
            "{}: mean {} levels",
            PHOTOS[i].0,
            mean / level
        );
        assert!(
            max <= 12.0 * level,
            "{}: max {} levels",
            PHOTOS[i].0,
            max / level
        );
    }

    // 3. End to end from the encoded file.
    let images = paths
        .iter()
        .map(|path| Input::Image(std::fs::read(path).expect("read photo")))
        .collect();
    for (i, ours) in embed(images).iter().enumerate() {
        let cos = cosine64(ours, &features[i]);
        println!("{}: end-to-end cosine 1 - {:.2e}", PHOTOS[i].0, 1.0 - cos);
        assert!(cos >= 0.999, "{}: cosine {cos}", PHOTOS[i].0);
    }
}

async fn start_vision_server() -> TestServer {
    TestServer::start(&format!(
        "{}{}",
        TestServer::minilm_config("", ""),
        lite0_backbone_toml()
    ))
    .await
}

fn photo_inputs() -> Vec<proto::Input> {
    PHOTOS
        .iter()
        .map(|(name, _)| image_input(std::fs::read(test_image(name)).expect("read photo")))
        .collect()
}

/// The pretrained classifier, served as the built-in head
/// `efficientnet-lite0/imagenet`, names what is in each photo.
#[tokio::test]
async fn builtin_imagenet_head_names_real_photos() {
    let server = start_vision_server().await;
    let mut predictor = PredictorClient::new(server.channel().await);
    let response = predictor
        .predict(proto::PredictRequest {
            head: format!("{LITE0}/imagenet"),
            inputs: photo_inputs(),
            top_k: 5,
            ..Default::default()
        })
        .await
        .expect("predict")
        .into_inner();
    assert_eq!(response.head, format!("{LITE0}/imagenet"));
    assert_eq!(response.version, 0);
    for ((name, expected), prediction) in PHOTOS.iter().zip(&response.predictions) {
        let top: Vec<(u32, &str, f32)> = prediction
            .labels
            .iter()
            .map(|l| (l.index, l.label.as_str(), l.probability))
            .collect();
        println!("{name}: {top:?}");
        assert_eq!(top.len(), 5);
        assert!(
            top.iter().any(|(index, _, _)| expected.contains(index)),
            "{name}: none of {expected:?} in the top 5 {top:?}"
        );
    }

    // The class names are ImageNet's, in index order.
    let cat = &response.predictions[0].labels[0];
    assert!(
        [
            "tabby",
            "tiger cat",
            "Persian cat",
            "Siamese cat",
            "Egyptian cat"
        ]
        .contains(&cat.label.as_str()),
        "{cat:?}"
    );

    // Unknown built-ins and built-ins of backbones that have none are NOT_FOUND.
    for head in [format!("{LITE0}/cifar10"), format!("{MINILM}/imagenet")] {
        let err = predictor
            .predict(proto::PredictRequest {
                head: head.clone(),
                inputs: photo_inputs(),
                ..Default::default()
            })
            .await
            .expect_err("no such classifier");
        assert_eq!(err.code(), Code::NotFound, "{head}: {err:?}");
    }
}

#[tokio::test]
async fn image_requests_through_the_server() {
    let server = start_vision_server().await;
    let mut embedder = server.embedder().await;

    // Listing: an image backbone with its input size and built-in head.
    let backbones = server
        .models()
        .await
        .list_backbones(proto::ListBackbonesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .backbones;
    let lite0 = backbones.iter().find(|b| b.name == LITE0).expect("listed");
    assert_eq!(lite0.modality(), proto::Modality::Image);
    assert_eq!(lite0.dimension, 1280);
    assert_eq!(lite0.image_size, 224);
    assert_eq!(lite0.builtin_heads, vec![format!("{LITE0}/imagenet")]);

    // Pooled features, L2-normalized by default.
    let response = embedder
        .embed(proto::EmbedRequest {
            backbone: LITE0.into(),
            inputs: photo_inputs(),
            ..Default::default()
        })
        .await
        .expect("embed")
        .into_inner();
    assert_eq!(response.embeddings.len(), 3);
    for embedding in &response.embeddings {
        assert_eq!(embedding.values.len(), 1280);
        assert!((norm(&embedding.values) - 1.0).abs() < 1e-5);
    }

    let bomb = {
        // A valid PNG header claiming 100000 x 100000 pixels.
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(1, 1)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        png
    };
    let photo = || photo_inputs().remove(0);
    let cases: Vec<(&str, &str, Vec<proto::Input>, i32, &str)> = vec![
        (
            "text to an image backbone",
            LITE0,
            vec![photo(), text_input("a cat")],
            0,
            "input 1",
        ),
        (
            "an image to a text backbone",
            MINILM,
            vec![text_input("a cat"), photo()],
            0,
            "input 1",
        ),
        (
            "CLS pooling of images",
            LITE0,
            vec![photo()],
            proto::Pooling::Cls as i32,
            "POOLING_CLS",
        ),
        (
            "a decompression bomb",
            LITE0,
            vec![photo(), image_input(bomb)],
            0,
            "input 1",
        ),
        (
            "a truncated image",
            LITE0,
            vec![image_input(
                std::fs::read(test_image("coffee.png")).unwrap()[..4000].to_vec(),
            )],
            0,
            "input 0",
        ),
        (
            "not an image",
            LITE0,
            vec![image_input(b"GIF89a....".to_vec())],
            0,
            "input 0",
        ),
        (
            "a tensor of the wrong shape",
            LITE0,
            vec![proto::Input {
                kind: Some(proto::input::Kind::Tensor(proto::Tensor {
                    shape: vec![3, 32, 32],
                    values: vec![0.0; 3 * 32 * 32],
                })),
            }],
            0,
            "[3, 224, 224]",
        ),
    ];
    for (what, backbone, inputs, pooling, needle) in cases {
        let err = embedder
            .embed(proto::EmbedRequest {
                backbone: backbone.into(),
                inputs,
                pooling,
                ..Default::default()
            })
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
    }

    // After all that, still serving.
    let again = embedder
        .embed(proto::EmbedRequest {
            backbone: LITE0.into(),
            inputs: vec![photo()],
            ..Default::default()
        })
        .await
        .expect("embed after bad inputs")
        .into_inner();
    assert_eq!(again.embeddings[0].values, response.embeddings[0].values);
}

/// A photo re-encoded as PNG after `edit`: new bytes, same subject.
fn edited_photo(name: &str, edit: impl Fn(image::DynamicImage) -> image::DynamicImage) -> Vec<u8> {
    let photo = image::open(test_image(name)).expect("decode photo");
    let mut bytes = Vec::new();
    edit(photo)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("encode");
    bytes
}

/// Transfer learning on images: a linear head trained on frozen EfficientNet-Lite0
/// features of the photos and their mirror images names unseen crops of them.
#[tokio::test]
async fn a_head_trains_on_image_features() {
    use proto::{trainer_client::TrainerClient, JobState};
    let server = start_vision_server().await;
    let labels = ["cat", "coffee", "person"];
    let mut examples = Vec::new();
    for ((name, _), label) in PHOTOS.iter().zip(labels) {
        for bytes in [
            std::fs::read(test_image(name)).expect("read photo"),
            edited_photo(name, |p| p.fliph()),
        ] {
            examples.push(proto::Example {
                input: Some(image_input(bytes)),
                label: label.to_owned(),
            });
        }
    }
    let mut stream = TrainerClient::new(server.channel().await)
        .train_head(proto::TrainHeadRequest {
            backbone: LITE0.into(),
            head_name: "photo-kind".into(),
            training: Some(proto::TrainingConfig {
                epochs: 50,
                learning_rate: 0.05,
                no_validation: true,
                ..Default::default()
            }),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet { examples },
            )),
            ..Default::default()
        })
        .await
        .expect("train")
        .into_inner();
    let mut last = None;
    while let Some(event) = stream.message().await.expect("event") {
        last = Some(event);
    }
    let last = last.expect("events");
    assert_eq!(last.state(), JobState::Succeeded, "{last:?}");

    // Unseen views: the central 60% of each photo, enlarged by the preprocessing.
    let crops: Vec<proto::Input> = PHOTOS
        .iter()
        .map(|(name, _)| {
            image_input(edited_photo(name, |p| {
                let (w, h) = (p.width(), p.height());
                p.crop_imm(w / 5, h / 5, w * 3 / 5, h * 3 / 5)
            }))
        })
        .collect();
    let response = PredictorClient::new(server.channel().await)
        .predict(proto::PredictRequest {
            head: "photo-kind".into(),
            inputs: crops,
            top_k: 1,
            ..Default::default()
        })
        .await
        .expect("predict")
        .into_inner();
    let predicted: Vec<&str> = response
        .predictions
        .iter()
        .map(|p| p.labels[0].label.as_str())
        .collect();
    assert_eq!(predicted, labels);
}

/// `tlserve bench --images`: the load tool sends encoded photos, which the
/// server decodes, batches and embeds.
#[tokio::test]
async fn the_load_tool_sends_images() {
    let server = start_vision_server().await;
    let dir = tempfile::tempdir().expect("temporary folder");
    let list = dir.path().join("images.txt");
    let paths: Vec<String> = PHOTOS
        .iter()
        .map(|(name, _)| test_image(name).display().to_string())
        .collect();
    std::fs::write(&list, paths.join("\n")).expect("write the image list");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tlserve"))
        .args([
            "bench",
            "--backbone",
            LITE0,
            "-c",
            "2",
            "-k",
            "2",
            "--requests",
            "6",
        ])
        .arg("--addr")
        .arg(format!("http://{}", server.grpc))
        .arg("--images")
        .arg(&list)
        .output()
        .expect("run tlserve bench");
    assert!(
        output.status.success(),
        "tlserve bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    assert_eq!(report["ok"], 6, "{report}");
    assert_eq!(report["inputs_per_request"], 2, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
}

/// ResNet-50 and VGG16 (pool5 features) on generated weights in torchvision's
/// layout (scripts/bench/generate_convnet.py; no pretrained ones are
/// fetchable here), on both engines, against the independent float64 numpy
/// reference (tests/reference/torchvision_convnets_reference.py), at 64x64 to
/// keep the reference quick.
#[test]
fn resnet50_and_vgg16_match_the_numpy_reference_on_generated_weights() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let side = 64;
    let tensors: Vec<Vec<f32>> = (0..2)
        .map(|seed| {
            (0..3 * side * side)
                .map(|i| (((i * (seed + 7)) % 1013) as f32 / 253.0 - 2.0) * 0.9)
                .collect()
        })
        .collect();
    for (architecture, features) in [("resnet50", "fc7"), ("vgg16", "pool5")] {
        let weights = dir.path().join(architecture);
        let status = std::process::Command::new(python())
            .arg(repo_root().join("scripts/bench/generate_convnet.py"))
            .args([
                architecture,
                weights.to_str().expect("utf-8 path"),
                "--features-only",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run generate_convnet.py");
        assert!(
            status.success(),
            "generate_convnet.py {architecture} failed"
        );
        let reference = run_reference(
            "torchvision_convnets_reference.py",
            &serde_json::json!({
                "weights": weights.join("model.safetensors"),
                "architecture": architecture,
                "features": features,
                "tensors": tensors,
            }),
        );
        let expected = as_f64s(&reference["features"]);
        for engine in ["auto", "candle"] {
            let toml = format!(
                "[[backbones]]\nname = \"net\"\narchitecture = \"{architecture}\"\n\
                 engine = \"{engine}\"\nsource = {{ path = \"{}\" }}\n{}\
                 image = {{ resize_shorter = {side}, crop = {side} }}\n",
                weights.display(),
                if architecture == "vgg16" {
                    "vgg_features = \"pool5\"\n"
                } else {
                    ""
                },
            );
            let config =
                Config::from_toml(&toml, &repo_root(), std::iter::empty()).expect("valid config");
            let backbone = tlserve::backbone::load(
                &config.backbones[0],
                None,
                ImageLimits::from_config(&config.limits),
            )
            .expect("load generated weights");
            let options = EmbedOptions::new(Pooling::Mean, false);
            let prepared: Vec<Prepared> = tensors
                .iter()
                .enumerate()
                .map(|(i, values)| {
                    let input = Input::Tensor {
                        shape: vec![3, side, side],
                        values: values.clone(),
                    };
                    backbone.prepare(i, input, true).expect("prepare")
                })
                .collect();
            let items: Vec<EmbedItem> = prepared
                .iter()
                .map(|input| EmbedItem::frozen(input, options))
                .collect();
            for (i, ours) in backbone.embed(&items).expect("embed").iter().enumerate() {
                let cos = cosine64(ours, &expected[i]);
                println!(
                    "{architecture} ({engine}) input {i}: cosine 1 - {:.2e}",
                    1.0 - cos
                );
                assert!(
                    cos >= 0.9999,
                    "{architecture} ({engine}) input {i}: cosine {cos}"
                );
            }
        }
    }
}
