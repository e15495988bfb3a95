//! Examples as stored in the shared store: JSON, image bytes in base64.
//!
//! An input is written as an object tagged by `kind`, and read back as a
//! plain struct of optional fields: serde reads an internally tagged enum by
//! buffering each object whole in its generic form first, which costs about
//! 8 times the decoded size for a tensor's values.

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Example;
use crate::{backbone::Input, Error, Result};

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum StoredInput {
    Text { text: String },
    Image { base64: String },
    Tensor { shape: Vec<usize>, values: Vec<f32> },
    TokenIds { ids: Vec<u32> },
}

#[derive(Serialize)]
struct StoredExample {
    label: String,
    input: StoredInput,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Text,
    Image,
    Tensor,
    TokenIds,
}

/// A [`StoredInput`] as read: the tag and whichever fields its kind has.
#[derive(Deserialize)]
struct ReadInput {
    kind: Kind,
    text: Option<String>,
    base64: Option<String>,
    shape: Option<Vec<usize>>,
    values: Option<Vec<f32>>,
    ids: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct ReadExample {
    label: String,
    input: ReadInput,
}

pub fn encode(examples: &[Example]) -> Result<Bytes> {
    let engine = base64::engine::general_purpose::STANDARD;
    let stored: Vec<StoredExample> = examples
        .iter()
        .map(|example| StoredExample {
            label: example.label.clone(),
            input: match &example.input {
                Input::Text(text) => StoredInput::Text { text: text.clone() },
                Input::Image(bytes) => StoredInput::Image {
                    base64: engine.encode(bytes),
                },
                Input::Tensor { shape, values } => StoredInput::Tensor {
                    shape: shape.clone(),
                    values: values.clone(),
                },
                Input::TokenIds(ids) => StoredInput::TokenIds { ids: ids.clone() },
            },
        })
        .collect();
    serde_json::to_vec(&stored)
        .map(Bytes::from)
        .map_err(|err| Error::Storage(format!("cannot encode a dataset: {err}")))
}

pub fn decode(bytes: &[u8]) -> Result<Vec<Example>> {
    let stored: Vec<ReadExample> = serde_json::from_slice(bytes)
        .map_err(|err| Error::Storage(format!("a stored dataset is invalid: {err}")))?;
    stored
        .into_iter()
        .map(|example| {
            Ok(Example {
                input: input_of(example.input)?,
                label: example.label,
            })
        })
        .collect()
}

fn input_of(read: ReadInput) -> Result<Input> {
    let missing = |field: &str| Error::Storage(format!("a stored input lacks its `{field}`"));
    Ok(match read.kind {
        Kind::Text => Input::Text(read.text.ok_or_else(|| missing("text"))?),
        Kind::Image => {
            let base64 = read.base64.ok_or_else(|| missing("base64"))?;
            let engine = base64::engine::general_purpose::STANDARD;
            Input::Image(engine.decode(base64).map_err(|err| {
                Error::Storage(format!("a stored dataset's image is invalid: {err}"))
            })?)
        }
        Kind::Tensor => Input::Tensor {
            shape: read.shape.ok_or_else(|| missing("shape"))?,
            values: read.values.ok_or_else(|| missing("values"))?,
        },
        Kind::TokenIds => Input::TokenIds(read.ids.ok_or_else(|| missing("ids"))?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_input_round_trips() {
        let examples = vec![
            Example {
                input: Input::Text("héllo\n".into()),
                label: "a".into(),
            },
            Example {
                input: Input::Image(vec![0, 255, 7]),
                label: "b".into(),
            },
            Example {
                input: Input::Tensor {
                    shape: vec![1, 2],
                    values: vec![0.5, -1.25],
                },
                label: "a".into(),
            },
            Example {
                input: Input::TokenIds(vec![101, 7, 102]),
                label: "b".into(),
            },
        ];
        let encoded = encode(&examples).unwrap();
        // The layout written before the reader changed, still read.
        let text = String::from_utf8(encoded.to_vec()).unwrap();
        assert!(text.contains(r#"{"kind":"tensor","shape":[1,2],"values":[0.5,-1.25]}"#));
        let back = decode(&encoded).unwrap();
        assert_eq!(back.len(), 4);
        for (a, b) in examples.iter().zip(&back) {
            assert_eq!(a.label, b.label);
            assert_eq!(format!("{:?}", a.input), format!("{:?}", b.input));
        }
    }
}
