//! The fuzz targets (src/fuzz_targets.rs, run by cargo-fuzz from fuzz/) on
//! stable Rust in every test run: each target gets its seed corpus
//! (fuzz/corpus/<target>/) and then deterministic mutations of it (bit flips,
//! byte changes, insertions, deletions, truncations, splices) for a bounded time.
//! A panic fails the test and leaves the input in target/fuzz-failures/.
//!
//! `TLSERVE_WRITE_FUZZ_SEEDS=1` also (re)writes the request seeds from the
//! structured messages below, for the committed corpus.

use crate::common;

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
    time::{Duration, Instant},
};

use common::repo_root;
use prost::Message;
use tlserve::{fuzz_targets, proto};

/// Per target: enough for tens of thousands of inputs, small next to the suite.
const BUDGET: Duration = Duration::from_secs(4);
const MAX_INPUTS: usize = 1_000_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                // Interesting values: boundaries of the integer types.
                data[at] = [0, 0xFF, 0x7F, 0x80, 1][rng.below(5)];
            }
            2 => {
                let at = rng.below(len + 1);
                let byte = rng.next() as u8;
                data.insert(at, byte);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let end = (at + 1 + rng.below(16)).min(len);
                data.drain(at..end);
            }
            4 if len > 0 => data.truncate(rng.below(len)),
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                let at = rng.below(len + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                // Repeat a chunk: long fields, many repeated elements.
                let at = rng.below(len);
                let end = (at + 1 + rng.below(32)).min(len);
                let chunk = data[at..end].to_vec();
                for _ in 0..rng.below(8) {
                    data.splice(at..at, chunk.iter().copied());
                }
            }
            _ => data.push(rng.next() as u8),
        }
    }
    data
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = repo_root().join("fuzz/corpus").join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("seed corpus {}: {err}", dir.display()))
        .map(|entry| std::fs::read(entry.expect("entry").path()).expect("read seed"))
        .collect();
    assert!(seeds.len() >= 4, "{} holds too few seeds", dir.display());
    seeds.sort();
    seeds
}

fn run(target: &str, seeds: &[Vec<u8>], function: fn(&[u8])) {
    let mut rng = Rng(0x005E_ED0F_F022);
    let started = Instant::now();
    let mut count = 0;
    let mut inputs = seeds.iter().cloned();
    while count < MAX_INPUTS && (count < seeds.len() || started.elapsed() < BUDGET) {
        let input = inputs.next().unwrap_or_else(|| mutate(&mut rng, seeds));
        if catch_unwind(AssertUnwindSafe(|| function(&input))).is_err() {
            let dir = repo_root().join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).expect("failure dir");
            let path = dir.join(format!("{target}-{count}"));
            std::fs::write(&path, &input).expect("write failing input");
            panic!(
                "{target} panicked on input {count}, saved at {}",
                path.display()
            );
        }
        count += 1;
    }
    eprintln!(
        "{target}: {count} inputs in {:.1?} without a panic",
        started.elapsed()
    );
    assert!(count >= seeds.len());
}

#[test]
fn image_decode_survives_its_corpus_and_mutations() {
    run(
        "image_decode",
        &corpus("image_decode"),
        fuzz_targets::image_decode,
    );
}

/// Well-formed messages of each kind the target decodes, first byte = kind.
fn request_seeds() -> Vec<(String, Vec<u8>)> {
    let text = |t: &str| proto::Input {
        kind: Some(proto::input::Kind::Text(t.into())),
    };
    let tensor = proto::Input {
        kind: Some(proto::input::Kind::Tensor(proto::Tensor {
            shape: vec![3, 2, 2],
            values: vec![0.5; 12],
        })),
    };
    let image = proto::Input {
        kind: Some(proto::input::Kind::Image(vec![0x89, b'P', b'N', b'G'])),
    };
    let tagged = |kind: u8, body: Vec<u8>| {
        let mut bytes = vec![kind];
        bytes.extend(body);
        bytes
    };
    vec![
        (
            "embed-text".into(),
            tagged(
                0,
                proto::EmbedRequest {
                    backbone: "all-MiniLM-L6-v2".into(),
                    inputs: vec![text("A cat sits on the mat."), text("ünïcödé ✓")],
                    pooling: 2,
                    normalize: Some(false),
                    truncate: Some(true),
                    priority: 2,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "embed-tensor-image".into(),
            tagged(
                0,
                proto::EmbedRequest {
                    backbone: "efficientnet-lite0".into(),
                    inputs: vec![tensor.clone(), image.clone()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "predict".into(),
            tagged(
                1,
                proto::PredictRequest {
                    head: "sentiment@3".into(),
                    inputs: vec![text("great")],
                    top_k: 2,
                    priority: 1,
                    truncate: None,
                }
                .encode_to_vec(),
            ),
        ),
        (
            "train".into(),
            tagged(
                2,
                proto::TrainHeadRequest {
                    backbone: "all-MiniLM-L6-v2".into(),
                    head_name: "topics".into(),
                    training: Some(proto::TrainingConfig {
                        epochs: 3,
                        learning_rate: 0.01,
                        ..Default::default()
                    }),
                    data: Some(proto::train_head_request::Data::Examples(
                        proto::ExampleSet {
                            examples: vec![
                                proto::Example {
                                    input: Some(text("rain")),
                                    label: "weather".into(),
                                },
                                proto::Example {
                                    input: Some(tensor),
                                    label: "other".into(),
                                },
                            ],
                        },
                    )),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "config".into(),
            tagged(
                3,
                b"[server]\nlisten = \"127.0.0.1:1\"\n[limits]\nmax_text_chars = 5\n\
                  [[backbones]]\nname = \"x\"\narchitecture = \"vgg16\"\n\
                  source = { path = \"m\" }\nimage = { crop = 32, resize_shorter = 40 }\n"
                    .to_vec(),
            ),
        ),
    ]
}

#[test]
fn request_convert_survives_its_corpus_and_mutations() {
    let dir: PathBuf = repo_root().join("fuzz/corpus/request_convert");
    let generated = request_seeds();
    if std::env::var_os("TLSERVE_WRITE_FUZZ_SEEDS").is_some() {
        for (name, bytes) in &generated {
            std::fs::write(dir.join(format!("{name}.bin")), bytes).expect("write seed");
        }
    }
    let mut seeds = corpus("request_convert");
    seeds.extend(generated.into_iter().map(|(_, bytes)| bytes));
    run("request_convert", &seeds, fuzz_targets::request_convert);
}

#[test]
fn message_frames_survive_their_corpus_and_mutations() {
    run(
        "message_frames",
        &corpus("message_frames"),
        fuzz_targets::message_frames,
    );
}
