//! What the store examples share: a head to publish, and the store their
//! arguments name.

use tlserve::{
    head::{model::HeadWeights, BackboneRef, FeatureSettings, HeadKind, HeadMetadata},
    nn::Dense,
    storage::{Location, S3Location},
};

/// A linear head `name` on MiniLM's features, `inputs` wide with `outputs`
/// labels, its weights a fixed pattern.
pub fn linear_head(name: &str, inputs: usize, outputs: usize) -> (HeadMetadata, HeadWeights) {
    let backbone = BackboneRef {
        name: "all-MiniLM-L6-v2".into(),
        fingerprint: "f".repeat(64),
    };
    let features = FeatureSettings {
        pooling: tlserve::backbone::Pooling::Mean,
        normalize: true,
    };
    let labels = (0..outputs).map(|i| format!("label-{i}")).collect();
    let meta = HeadMetadata {
        train_examples: 1,
        ..HeadMetadata::new(name, HeadKind::Linear, backbone, features, inputs, labels)
    };
    let weights = HeadWeights::Linear {
        output: Dense {
            weight: (0..inputs * outputs)
                .map(|i| (i as f32 * 0.01).sin())
                .collect(),
            bias: vec![0.1; outputs],
            inputs,
            outputs,
        },
    };
    (meta, weights)
}

/// The store the arguments name, `DIR` or `s3 ENDPOINT BUCKET PREFIX` (S3
/// credentials from the environment), and the number after it, if any.
pub fn store_from_args(usage: &str) -> (Location, Option<usize>) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |at: usize| args.get(at).map(|c| c.parse().expect(usage));
    match args.first().map(String::as_str) {
        Some("s3") if args.len() >= 4 => (
            Location::S3(S3Location {
                bucket: args[2].clone(),
                prefix: args[3].clone(),
                region: "us-east-1".into(),
                endpoint: Some(args[1].clone()),
                allow_http: true,
                credentials: None,
            }),
            number(4),
        ),
        Some(dir) => (Location::Volume(dir.into()), number(1)),
        None => panic!("{usage}"),
    }
}
