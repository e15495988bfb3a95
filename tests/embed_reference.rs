//! Numerical correctness of MiniLM embeddings against an independent float64 numpy
//! implementation (tests/reference/minilm_reference.py: its own safetensors reader,
//! WordPiece tokenizer and BERT forward), through the library and through the
//! running server.
//!
//! Tolerance: cosine similarity >= 0.9999 per sentence (float32 against float64;
//! observed differences are far smaller). Token ids must match exactly.

mod common;

use common::*;
use tlserve::backbone::{self, Backbone, EmbedItem, EmbedOptions, Input, Pooling};

const MIN_COSINE: f64 = 0.9999;
/// sentence-transformers' max_seq_length for this model.
const MAX_LEN: usize = 256;

fn embed_all(model: &dyn Backbone, sentences: &[String], options: EmbedOptions) -> Vec<Vec<f32>> {
    let prepared: Vec<_> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            model
                .prepare(i, Input::Text(s.clone()), true)
                .expect("prepare")
        })
        .collect();
    let items: Vec<_> = prepared
        .iter()
        .map(|input| EmbedItem { input, options })
        .collect();
    model.embed(&items).expect("embed")
}

fn assert_close(label: &str, ours: &[Vec<f32>], reference: &[Vec<f64>]) {
    assert_eq!(ours.len(), reference.len());
    let mut lowest = f64::INFINITY;
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let cos = cosine(a, b);
        assert!(cos >= MIN_COSINE, "{label}: sentence {i} cosine {cos}");
        lowest = lowest.min(cos);
    }
    eprintln!(
        "{label}: lowest cosine to the reference over {} sentences: 1 - {:.1e}",
        ours.len(),
        1.0 - lowest
    );
}

#[test]
fn corpus_is_varied_enough() {
    let sentences = sentences();
    assert!(sentences.len() >= 20, "need at least 20 test sentences");
    assert!(
        sentences.iter().any(|s| !s.is_ascii()),
        "need non-ASCII text"
    );
    assert!(
        sentences.iter().any(|s| s.split_whitespace().count() > 300),
        "need a text that is truncated"
    );
}

/// Both engines: the native packed forward pass (the default on CPU) and
/// candle-transformers' BertModel.
const ENGINES: [&str; 2] = ["native", "candle"];

#[test]
fn library_mean_pooled_unit_vectors_match_the_reference() {
    let sentences = sentences();
    let reference = reference(&sentences, "mean", true, MAX_LEN);
    for engine in ENGINES {
        mean_pooled_unit_vectors(engine, &sentences, &reference);
    }
}

fn mean_pooled_unit_vectors(engine: &str, sentences: &[String], reference: &Reference) {
    let model = load_minilm_on(engine);
    assert_eq!(model.descriptor().max_sequence_length, MAX_LEN);

    let mut truncated = 0;
    for (i, sentence) in sentences.iter().enumerate() {
        let prepared = model
            .prepare(i, Input::Text(sentence.clone()), true)
            .expect("prepare");
        let backbone::Prepared::Text(tokens) = &prepared else {
            panic!("a text backbone prepares text");
        };
        assert_eq!(
            tokens.ids, reference.token_ids[i],
            "token ids of sentence {i} differ from the reference tokenizer"
        );
        assert!(tokens.ids.len() <= MAX_LEN);
        let refused = model
            .prepare(i, Input::Text(sentence.clone()), false)
            .is_err();
        assert_eq!(tokens.truncated, refused, "sentence {i}: truncation flag");
        truncated += usize::from(tokens.truncated);
    }
    assert!(truncated >= 2, "the corpus has texts over {MAX_LEN} tokens");

    let options = EmbedOptions {
        pooling: Pooling::Mean,
        normalize: true,
    };
    let ours = embed_all(model.as_ref(), sentences, options);
    assert_close(&format!("{engine}, batched"), &ours, &reference.embeddings);
    for v in &ours {
        assert!((norm(v) - 1.0).abs() < 1e-5);
    }
}

#[test]
fn library_cls_pooling_without_normalization_matches_the_reference() {
    let sentences = sentences();
    let reference = reference(&sentences, "cls", false, MAX_LEN);
    let options = EmbedOptions {
        pooling: Pooling::Cls,
        normalize: false,
    };
    for engine in ENGINES {
        let model = load_minilm_on(engine);
        let ours = embed_all(model.as_ref(), &sentences, options);
        assert_close(&format!("{engine}, cls"), &ours, &reference.embeddings);
        for (a, b) in ours.iter().zip(&reference.embeddings) {
            let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
            let relative = (norm(a) - nb).abs() / nb;
            assert!(
                relative < 1e-4,
                "{engine}: unnormalized length differs by {relative}"
            );
        }
    }
}

#[tokio::test]
async fn server_embeddings_match_the_reference() {
    let sentences = sentences();
    let reference = reference(&sentences, "mean", true, MAX_LEN);
    let server = TestServer::start_minilm().await;
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let response = server
        .embedder()
        .await
        .embed(embed_request(&texts))
        .await
        .expect("Embed")
        .into_inner();
    assert_eq!(response.backbone, MINILM);
    assert_eq!(response.dimension, 384);
    assert_eq!(response.embeddings.len(), sentences.len());
    let vectors: Vec<Vec<f32>> = response
        .embeddings
        .iter()
        .map(|e| e.values.clone())
        .collect();
    assert_close("server", &vectors, &reference.embeddings);
    for (e, ids) in response.embeddings.iter().zip(&reference.token_ids) {
        assert_eq!(e.tokens as usize, ids.len());
    }
    assert!(response.embeddings.iter().any(|e| e.truncated));
}
