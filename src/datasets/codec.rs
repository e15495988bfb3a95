//! Examples as stored in the shared store: JSON, image bytes in base64.

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Example;
use crate::{backbone::Input, Error, Result};

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum StoredInput {
    Text { text: String },
    Image { base64: String },
    Tensor { shape: Vec<usize>, values: Vec<f32> },
    TokenIds { ids: Vec<u32> },
}

#[derive(Serialize, Deserialize)]
struct StoredExample {
    label: String,
    input: StoredInput,
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
    let engine = base64::engine::general_purpose::STANDARD;
    let stored: Vec<StoredExample> = serde_json::from_slice(bytes)
        .map_err(|err| Error::Storage(format!("a stored dataset is invalid: {err}")))?;
    stored
        .into_iter()
        .map(|example| {
            let input = match example.input {
                StoredInput::Text { text } => Input::Text(text),
                StoredInput::Image { base64 } => {
                    Input::Image(engine.decode(base64).map_err(|err| {
                        Error::Storage(format!("a stored dataset's image is invalid: {err}"))
                    })?)
                }
                StoredInput::Tensor { shape, values } => Input::Tensor { shape, values },
                StoredInput::TokenIds { ids } => Input::TokenIds(ids),
            };
            Ok(Example {
                input,
                label: example.label,
            })
        })
        .collect()
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
        let back = decode(&encode(&examples).unwrap()).unwrap();
        assert_eq!(back.len(), 4);
        for (a, b) in examples.iter().zip(&back) {
            assert_eq!(a.label, b.label);
            assert_eq!(format!("{:?}", a.input), format!("{:?}", b.input));
        }
    }
}
