//! The bad-input matrix: malformed, hostile or absurd requests to every RPC of
//! the real server, each answered with its documented gRPC code. Afterwards the
//! server still serves Health and a normal Embed, and has not panicked once
//! (tlserve_panics_total stays 0).

use crate::common;

use common::*;
use tlserve::proto::{
    self, embedder_client::EmbedderClient, input::Kind, models_client::ModelsClient,
    predictor_client::PredictorClient, trainer_client::TrainerClient,
};
use tonic::{transport::Channel, Code};
use tonic_health::pb::health_check_response::ServingStatus;

fn text(s: &str) -> proto::Input {
    text_input(s)
}

fn tensor(shape: Vec<u32>, values: Vec<f32>) -> proto::Input {
    proto::Input {
        kind: Some(Kind::Tensor(proto::Tensor { shape, values })),
    }
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::DynamicImage::new_rgb8(width, height)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("encode");
    bytes
}

/// A valid PNG whose header claims `side` x `side` pixels.
fn png_claiming(side: u32) -> Vec<u8> {
    let mut bytes = png(1, 1);
    bytes[16..20].copy_from_slice(&side.to_be_bytes());
    bytes[20..24].copy_from_slice(&side.to_be_bytes());
    bytes
}

fn embed(backbone: &str, inputs: Vec<proto::Input>) -> proto::EmbedRequest {
    proto::EmbedRequest {
        backbone: backbone.into(),
        inputs,
        ..Default::default()
    }
}

fn train(
    head: &str,
    training: proto::TrainingConfig,
    rows: &[(&str, &str)],
) -> proto::TrainHeadRequest {
    proto::TrainHeadRequest {
        backbone: MINILM.into(),
        head_name: head.into(),
        training: Some(training),
        data: Some(proto::train_head_request::Data::Examples(
            proto::ExampleSet {
                examples: rows
                    .iter()
                    .map(|(label, t)| proto::Example {
                        input: Some(text(t)),
                        label: (*label).into(),
                    })
                    .collect(),
            },
        )),
        ..Default::default()
    }
}

/// Training with the given fine-tuning.
fn fine_tuning(tuning: proto::FineTuning) -> proto::TrainingConfig {
    proto::TrainingConfig {
        fine_tuning: Some(tuning),
        ..Default::default()
    }
}

/// LoRA fine-tuning with defaults, changed by `change`.
fn lora_with(change: impl FnOnce(&mut proto::LoraFineTuning)) -> proto::TrainingConfig {
    let mut settings = proto::LoraFineTuning::default();
    change(&mut settings);
    fine_tuning(proto::FineTuning {
        method: Some(proto::fine_tuning::Method::Lora(settings)),
        ..Default::default()
    })
}

fn two_labels() -> Vec<(&'static str, &'static str)> {
    vec![("a", "first text"), ("b", "second text")]
}

/// Calls one RPC and returns the status code of its answer.
async fn code_of<T>(call: impl std::future::Future<Output = Result<T, tonic::Status>>) -> Code {
    match call.await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn every_rpc_answers_bad_input_with_its_documented_code() {
    let server = TestServer::start(&format!(
        "{}{}",
        TestServer::minilm_config(
            "max_message_bytes = 65536\nmax_inputs_per_request = 8\nmax_text_chars = 1000\n\
             max_image_bytes = 32768\nmax_image_pixels = 1000000",
            ""
        ),
        lite0_backbone_toml()
    ))
    .await;
    let channel: Channel = server.channel().await;
    let mut embedder = EmbedderClient::new(channel.clone());
    let mut predictor = PredictorClient::new(channel.clone());
    let mut trainer = TrainerClient::new(channel.clone());
    let mut models = ModelsClient::new(channel.clone());
    let photo = std::fs::read(test_image("grace_hopper.jpg")).expect("photo");
    let invalid = Code::InvalidArgument;

    let mut embed_cases: Vec<(&str, proto::EmbedRequest, Code)> = vec![
        ("no inputs", embed(MINILM, vec![]), invalid),
        (
            "unknown backbone",
            embed("nope", vec![text("x")]),
            Code::NotFound,
        ),
        ("empty backbone name", embed("", vec![text("x")]), invalid),
        (
            "input without kind",
            embed(MINILM, vec![proto::Input { kind: None }]),
            invalid,
        ),
        ("empty text", embed(MINILM, vec![text("")]), invalid),
        (
            "text over max_text_chars",
            embed(MINILM, vec![text(&"é".repeat(1001))]),
            invalid,
        ),
        (
            "too many inputs",
            embed(MINILM, vec![text("x"); 9]),
            invalid,
        ),
        (
            "an image to a text backbone",
            embed(MINILM, vec![image_input(png(8, 8))]),
            invalid,
        ),
        (
            "a tensor to a text backbone",
            embed(MINILM, vec![tensor(vec![1], vec![0.0])]),
            invalid,
        ),
        (
            "NaN in a tensor",
            embed(LITE0, vec![tensor(vec![2], vec![1.0, f32::NAN])]),
            invalid,
        ),
        (
            "infinity in a tensor",
            embed(LITE0, vec![tensor(vec![1], vec![f32::INFINITY])]),
            invalid,
        ),
        (
            "tensor shape and values disagree",
            embed(LITE0, vec![tensor(vec![3, 2], vec![0.0; 5])]),
            invalid,
        ),
        (
            "tensor shape overflows",
            embed(LITE0, vec![tensor(vec![u32::MAX; 4], vec![])]),
            invalid,
        ),
        (
            "tensor of the wrong shape",
            embed(LITE0, vec![tensor(vec![3, 8, 8], vec![0.0; 192])]),
            invalid,
        ),
        (
            "text to an image backbone",
            embed(LITE0, vec![text("a photo")]),
            invalid,
        ),
        (
            "empty image",
            embed(LITE0, vec![image_input(vec![])]),
            invalid,
        ),
        (
            "not an image",
            embed(
                LITE0,
                vec![image_input(b"hello world, not an image".to_vec())],
            ),
            invalid,
        ),
        (
            "corrupt image",
            embed(
                LITE0,
                vec![image_input({
                    let mut b = png(64, 64);
                    let n = b.len();
                    b[40..n - 12].fill(0xAB);
                    b
                })],
            ),
            invalid,
        ),
        (
            "truncated JPEG",
            embed(LITE0, vec![image_input(photo[..photo.len() / 3].to_vec())]),
            invalid,
        ),
        (
            "decompression bomb",
            embed(LITE0, vec![image_input(png_claiming(100_000))]),
            invalid,
        ),
        (
            "image over max_image_pixels",
            embed(LITE0, vec![image_input(png(1001, 1000))]),
            invalid,
        ),
        (
            "image over max_image_bytes",
            embed(LITE0, vec![image_input(photo.clone())]),
            invalid,
        ),
        (
            "zero-sized image header",
            embed(LITE0, vec![image_input(png_claiming(0))]),
            invalid,
        ),
    ];
    // Slivers in every format the server decodes (the fuzz seeds), far beyond
    // limits.max_image_aspect_ratio.
    for seed in [
        "sliver-1x3000.png",
        "sliver-3000x1.jpg",
        "sliver-1x3000.webp",
    ] {
        let bytes = std::fs::read(repo_root().join("fuzz/corpus/image_decode").join(seed))
            .expect("sliver seed");
        embed_cases.push((
            "extreme aspect ratio",
            embed(LITE0, vec![image_input(bytes)]),
            invalid,
        ));
    }
    embed_cases.extend(vec![
        (
            "unknown pooling value",
            proto::EmbedRequest {
                pooling: 99,
                ..embed(MINILM, vec![text("x")])
            },
            invalid,
        ),
        (
            "unknown priority value",
            proto::EmbedRequest {
                priority: -3,
                ..embed(MINILM, vec![text("x")])
            },
            invalid,
        ),
        (
            "CLS pooling of an image",
            proto::EmbedRequest {
                pooling: proto::Pooling::Cls as i32,
                ..embed(LITE0, vec![image_input(png(64, 64))])
            },
            invalid,
        ),
        (
            "eight texts at the length limit (a control: all within limits)",
            embed(MINILM, vec![text(&"x".repeat(1000)); 8]),
            Code::Ok,
        ),
        (
            "control, zero-width and bidi characters are text like any other",
            embed(
                MINILM,
                vec![text("a\u{0}b\u{200b}c\u{202e}d\u{feff}\u{1F600}\r\n\t")],
            ),
            Code::Ok,
        ),
    ]);
    // Over the 64 KB message limit.
    embed_cases.push((
        "over max_message_bytes",
        embed(MINILM, vec![image_input(vec![0u8; 70_000])]),
        Code::ResourceExhausted,
    ));
    let mut failures = Vec::new();
    for (what, request, expected) in embed_cases {
        let got = code_of(embedder.embed(request)).await;
        if got != expected {
            failures.push(format!("Embed, {what}: expected {expected:?}, got {got:?}"));
        }
    }

    let predict = |head: &str| proto::PredictRequest {
        head: head.into(),
        inputs: vec![text("hello")],
        ..Default::default()
    };
    for (what, request, expected) in [
        ("empty head name", predict(""), invalid),
        (
            "path tricks in a head name",
            predict("../etc/passwd"),
            invalid,
        ),
        ("a slash too many", predict("a/b/c"), invalid),
        ("dots as a backbone", predict("../imagenet"), invalid),
        ("unknown head", predict("missing"), Code::NotFound),
        (
            "unknown head version",
            predict("missing@999"),
            Code::NotFound,
        ),
        ("version zero", predict("x@0"), invalid),
        ("version not a number", predict("x@latest"), invalid),
        (
            "unknown built-in head",
            predict(&format!("{LITE0}/cifar")),
            Code::NotFound,
        ),
        (
            "text through the image head",
            predict(&format!("{LITE0}/imagenet")),
            invalid,
        ),
        (
            "unknown priority value",
            proto::PredictRequest {
                priority: 7,
                ..predict(&format!("{LITE0}/imagenet"))
            },
            invalid,
        ),
    ] {
        let got = code_of(predictor.predict(request)).await;
        if got != expected {
            failures.push(format!(
                "Predict, {what}: expected {expected:?}, got {got:?}"
            ));
        }
    }

    let ok_training = proto::TrainingConfig {
        epochs: 1,
        ..Default::default()
    };
    for (what, request, expected) in [
        (
            "path tricks in the head name",
            train("../evil", ok_training.clone(), &two_labels()),
            invalid,
        ),
        (
            "empty head name",
            train("", ok_training.clone(), &two_labels()),
            invalid,
        ),
        ("no examples", train("h", ok_training.clone(), &[]), invalid),
        (
            "one label only",
            train("h", ok_training.clone(), &[("a", "x"), ("a", "y")]),
            invalid,
        ),
        (
            "empty label",
            train("h", ok_training.clone(), &[("", "x"), ("b", "y")]),
            invalid,
        ),
        (
            "absurd epochs",
            train(
                "h",
                proto::TrainingConfig {
                    epochs: 1_000_000_000,
                    ..Default::default()
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "NaN learning rate",
            train(
                "h",
                proto::TrainingConfig {
                    learning_rate: f32::NAN,
                    ..ok_training.clone()
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "negative learning rate",
            train(
                "h",
                proto::TrainingConfig {
                    learning_rate: -1.0,
                    ..ok_training.clone()
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "validation fraction 2",
            train(
                "h",
                proto::TrainingConfig {
                    validation_fraction: 2.0,
                    ..ok_training.clone()
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "infinite weight decay",
            train(
                "h",
                proto::TrainingConfig {
                    weight_decay: f32::INFINITY,
                    ..ok_training.clone()
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "absurd batch size",
            train(
                "h",
                proto::TrainingConfig {
                    batch_size: u32::MAX,
                    ..ok_training.clone()
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "unfreeze_top_layers beyond the backbone's layers",
            train(
                "h",
                proto::TrainingConfig {
                    unfreeze_top_layers: 99,
                    ..ok_training.clone()
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "top layers beyond the backbone's layers",
            train(
                "h",
                fine_tuning(proto::FineTuning {
                    method: Some(proto::fine_tuning::Method::TopLayers(
                        proto::TopLayersFineTuning { layers: 99 },
                    )),
                    ..Default::default()
                }),
                &two_labels(),
            ),
            invalid,
        ),
        (
            "fine-tuning without a method",
            train(
                "h",
                fine_tuning(proto::FineTuning::default()),
                &two_labels(),
            ),
            invalid,
        ),
        (
            "LoRA rank beyond the backbone's width",
            train("h", lora_with(|l| l.rank = 100_000), &two_labels()),
            invalid,
        ),
        (
            "LoRA on more layers than the backbone has",
            train("h", lora_with(|l| l.layers = 99), &two_labels()),
            invalid,
        ),
        (
            "LoRA on an unknown projection",
            train(
                "h",
                lora_with(|l| l.targets = vec!["nope".into()]),
                &two_labels(),
            ),
            invalid,
        ),
        (
            "LoRA dropout of 1",
            train("h", lora_with(|l| l.dropout = 1.0), &two_labels()),
            invalid,
        ),
        (
            "LoRA with the L-BFGS solver",
            train(
                "h",
                proto::TrainingConfig {
                    solver: proto::Solver::Lbfgs as i32,
                    ..lora_with(|_| {})
                },
                &two_labels(),
            ),
            invalid,
        ),
        (
            "LoRA on an image backbone",
            proto::TrainHeadRequest {
                backbone: LITE0.into(),
                ..train("h", lora_with(|_| {}), &two_labels())
            },
            Code::FailedPrecondition,
        ),
        (
            "unknown backbone",
            proto::TrainHeadRequest {
                backbone: "nope".into(),
                ..train("h", ok_training.clone(), &two_labels())
            },
            Code::NotFound,
        ),
        (
            "no data at all",
            proto::TrainHeadRequest {
                data: None,
                ..train("h", ok_training.clone(), &two_labels())
            },
            invalid,
        ),
        (
            "unknown dataset",
            proto::TrainHeadRequest {
                data: Some(proto::train_head_request::Data::DatasetId("nope".into())),
                ..train("h", ok_training.clone(), &two_labels())
            },
            Code::NotFound,
        ),
    ] {
        let got = match trainer.train_head(request).await {
            // Some refusals arrive as the first event's status.
            Ok(response) => {
                let mut stream = response.into_inner();
                match stream.message().await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                }
            }
            Err(status) => status.code(),
        };
        if got != expected {
            failures.push(format!(
                "TrainHead, {what}: expected {expected:?}, got {got:?}"
            ));
        }
    }

    for (what, got, expected) in [
        (
            "WatchJob unknown",
            code_of(trainer.watch_job(proto::WatchJobRequest {
                job_id: "nope".into(),
            }))
            .await,
            Code::NotFound,
        ),
        (
            "WatchJob empty id",
            code_of(trainer.watch_job(proto::WatchJobRequest {
                job_id: String::new(),
            }))
            .await,
            Code::NotFound,
        ),
        (
            "CancelJob unknown",
            code_of(trainer.cancel_job(proto::CancelJobRequest {
                job_id: "nope".into(),
            }))
            .await,
            Code::NotFound,
        ),
        (
            "GetHead path tricks",
            code_of(models.get_head(proto::GetHeadRequest {
                head: "../x".into(),
            }))
            .await,
            invalid,
        ),
        (
            "GetHead unknown",
            code_of(models.get_head(proto::GetHeadRequest {
                head: "missing".into(),
            }))
            .await,
            Code::NotFound,
        ),
        (
            "DeleteHead bad version",
            code_of(models.delete_head(proto::DeleteHeadRequest {
                head: "x@abc".into(),
            }))
            .await,
            invalid,
        ),
        (
            "DeleteHead unknown",
            code_of(models.delete_head(proto::DeleteHeadRequest {
                head: "missing".into(),
            }))
            .await,
            Code::NotFound,
        ),
        (
            "ListHeads unknown backbone",
            code_of(models.list_heads(proto::ListHeadsRequest {
                backbone: "nope".into(),
                all_versions: true,
            }))
            .await,
            Code::Ok,
        ),
    ] {
        if got != expected {
            failures.push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Still serving, and not a single panic along the way.
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));
    embedder
        .embed(embed_request(&["still here"]))
        .await
        .expect("a normal Embed after the matrix");
    assert_eq!(metric(&server.scrape(), "tlserve_panics_total"), 0.0);
    assert!(server.scrape().contains("tlserve_panics_total 0"));
}

#[tokio::test]
async fn slivers_within_the_pixel_limit_are_refused_and_the_server_lives() {
    // Default image limits: 25,000,000 pixels, aspect ratio 32.
    let server = TestServer::start(&format!(
        "{}{}",
        TestServer::minilm_config("", ""),
        lite0_backbone_toml()
    ))
    .await;
    let mut embedder = EmbedderClient::new(server.channel().await);
    // 1 x 25,000,000 once overflowed the resize's size computation and aborted
    // the process; 158 x 158,227 cost 16 s and 0.8 GB.
    for (width, height) in [(1, 25_000_000), (25_000_000, 1), (158, 158_227), (33, 1)] {
        let sliver = gray_png(width, height);
        assert!(
            sliver.len() < 100_000,
            "{width}x{height}: {} bytes",
            sliver.len()
        );
        let status = embedder
            .embed(embed(LITE0, vec![image_input(sliver)]))
            .await
            .expect_err("a sliver is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{width}x{height}");
        assert!(
            status.message().starts_with("input 0:")
                && status.message().contains("max_image_aspect_ratio"),
            "{width}x{height}: {}",
            status.message()
        );
    }
    // At the limit the image is served.
    let response = embedder
        .embed(embed(LITE0, vec![image_input(gray_png(32, 1))]))
        .await
        .expect("32 x 1 is within the aspect-ratio limit")
        .into_inner();
    assert_eq!(response.embeddings.len(), 1);
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));
    assert_eq!(metric(&server.scrape(), "tlserve_panics_total"), 0.0);
}
