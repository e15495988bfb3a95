//! Publishes versions of one head into a head store, forever, as fast as it can:
//! the process tests/crash_safety.rs kills with SIGKILL at random moments.
//!
//! Usage: publish_loop STORE_DIR

use tlserve::{
    head::{
        model::HeadWeights, store::HeadStore, FeatureSettings, HeadKind, HeadMetadata, HeadMetrics,
        TrainingParams,
    },
    nn::Dense,
};

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: publish_loop STORE_DIR");
    let store = HeadStore::open(std::path::Path::new(&dir), usize::MAX).expect("open store");
    // Weights of a realistic size (a 384 x 64 linear head) so that a kill often
    // lands inside the write, not between two.
    let (inputs, outputs) = (384, 64);
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
    loop {
        let meta = HeadMetadata {
            name: "crash".into(),
            version: 0,
            backbone: "all-MiniLM-L6-v2".into(),
            backbone_fingerprint: "f".repeat(64),
            features: FeatureSettings {
                pooling: tlserve::backbone::Pooling::Mean,
                normalize: true,
            },
            input_dim: inputs,
            labels: (0..outputs).map(|i| format!("label-{i}")).collect(),
            kind: HeadKind::Linear,
            training: TrainingParams::default(),
            metrics: HeadMetrics::default(),
            train_examples: 1,
            validation_examples: 0,
            created_at_ms: 0,
            fine_tuning: None,
        };
        let head = store.publish(meta, weights.clone(), None).expect("publish");
        println!("{}", head.meta.version);
    }
}
