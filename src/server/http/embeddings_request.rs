//! The body of `POST /v1/embeddings`, parsed with its sizes bounded while it
//! is read: `input` may be a list of millions of empty strings, which would
//! take hundreds of MB once parsed, so the parse stops at the first input
//! past `limits.max_inputs_per_request` (and the first token id past
//! `limits.max_text_chars`) instead of counting afterwards.

use std::fmt;

use serde::{
    de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};

use crate::backbone::Input;

#[derive(Deserialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// OpenAI's embeddings request; `input` (one text, texts, one text's token
/// ids, or several) as the inputs it names.
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: Vec<Input>,
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
}

/// Bounds applied while the body is parsed.
#[derive(Clone, Copy)]
pub struct Bounds {
    /// Most inputs (limits.max_inputs_per_request).
    pub inputs: usize,
    /// Most token ids of one input (limits.max_text_chars).
    pub token_ids: usize,
}

/// Parses a whole body.
pub fn parse(body: &[u8], bounds: Bounds) -> Result<EmbeddingsRequest, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let request = RequestSeed(bounds).deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(request)
}

struct RequestSeed(Bounds);

impl<'de> DeserializeSeed<'de> for RequestSeed {
    type Value = EmbeddingsRequest;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed {
    type Value = EmbeddingsRequest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with `model` and `input`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut model, mut inputs) = (None, None);
        let (mut encoding_format, mut dimensions) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            let fresh = match key.as_str() {
                "model" => model.replace(map.next_value::<String>()?).is_none(),
                "input" => inputs
                    .replace(map.next_value_seed(InputSeed(self.0))?)
                    .is_none(),
                "encoding_format" => encoding_format.replace(map.next_value()?).is_none(),
                "dimensions" => dimensions
                    .replace(map.next_value::<Option<usize>>()?)
                    .is_none(),
                // An end-user id, for the caller's own abuse tracking; not used here.
                "user" => map.next_value::<Option<String>>().map(|_| true)?,
                _ => map.next_value::<IgnoredAny>().map(|_| true)?,
            };
            if !fresh {
                return Err(A::Error::custom(format!("duplicate field `{key}`")));
            }
        }
        Ok(EmbeddingsRequest {
            model: model.ok_or_else(|| A::Error::missing_field("model"))?,
            inputs: inputs.ok_or_else(|| A::Error::missing_field("input"))?,
            encoding_format: encoding_format.unwrap_or_default(),
            dimensions: dimensions.flatten(),
        })
    }
}

/// `input`: a string, or a list whose first element says what all are.
struct InputSeed(Bounds);

impl<'de> DeserializeSeed<'de> for InputSeed {
    type Value = Vec<Input>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// One element of an `input` list.
enum Element {
    Text(String),
    Id(u32),
    Ids(Vec<u32>),
}

impl<'de> Visitor<'de> for InputSeed {
    type Value = Vec<Input>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a list of strings, token ids or lists of token ids")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(vec![Input::Text(text.to_owned())])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let bounds = self.0;
        let mut inputs = Vec::new();
        let mut ids = Vec::new();
        while let Some(element) = seq.next_element_seed(ElementSeed(bounds))? {
            match element {
                Element::Id(id) if inputs.is_empty() => {
                    if ids.len() == bounds.token_ids {
                        return Err(too_many_ids(bounds));
                    }
                    ids.push(id);
                }
                Element::Text(_) | Element::Ids(_) if !ids.is_empty() => {
                    return Err(A::Error::custom(MIXED));
                }
                Element::Id(_) => return Err(A::Error::custom(MIXED)),
                Element::Text(text) => push(&mut inputs, Input::Text(text), bounds)?,
                Element::Ids(list) => push(&mut inputs, Input::TokenIds(list), bounds)?,
            }
        }
        if !ids.is_empty() {
            return Ok(vec![Input::TokenIds(ids)]);
        }
        Ok(inputs)
    }
}

const MIXED: &str = "input mixes strings, token ids and lists of token ids: send one kind";

fn push<E: serde::de::Error>(
    inputs: &mut Vec<Input>,
    input: Input,
    bounds: Bounds,
) -> Result<(), E> {
    let same_kind = match (inputs.first(), &input) {
        (None, _) => true,
        (Some(first), input) => std::mem::discriminant(first) == std::mem::discriminant(input),
    };
    if !same_kind {
        return Err(E::custom(MIXED));
    }
    if inputs.len() == bounds.inputs {
        return Err(E::custom(format!(
            "input holds more than {} inputs; this server accepts at most {} in one request \
             (limits.max_inputs_per_request): split the request",
            bounds.inputs, bounds.inputs
        )));
    }
    inputs.push(input);
    Ok(())
}

fn too_many_ids<E: serde::de::Error>(bounds: Bounds) -> E {
    E::custom(format!(
        "an input holds more than {} token ids; at most {} are accepted (limits.max_text_chars)",
        bounds.token_ids, bounds.token_ids
    ))
}

struct ElementSeed(Bounds);

impl<'de> DeserializeSeed<'de> for ElementSeed {
    type Value = Element;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed {
    type Value = Element;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a token id or a list of token ids")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Element::Text(text.to_owned()))
    }

    fn visit_u64<E: serde::de::Error>(self, id: u64) -> Result<Self::Value, E> {
        u32::try_from(id)
            .map(Element::Id)
            .map_err(|_| E::custom(format!("token id {id} is out of range")))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut ids = Vec::new();
        while let Some(id) = seq.next_element::<u32>()? {
            if ids.len() == self.0.token_ids {
                return Err(too_many_ids(self.0));
            }
            ids.push(id);
        }
        Ok(Element::Ids(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        inputs: 3,
        token_ids: 4,
    };

    fn inputs(json: &str) -> Result<Vec<Input>, String> {
        parse(json.as_bytes(), BOUNDS)
            .map(|r| r.inputs)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_form_of_input_parses() {
        let request = parse(
            br#"{"model": "m", "input": "a", "encoding_format": "base64", "dimensions": 8,
                "user": "u", "other": [1, {"x": 2}]}"#,
            BOUNDS,
        )
        .unwrap();
        assert_eq!(request.model, "m");
        assert!(request.encoding_format == EncodingFormat::Base64);
        assert_eq!(request.dimensions, Some(8));
        assert!(matches!(&request.inputs[..], [Input::Text(t)] if t == "a"));
        assert_eq!(
            inputs(r#"{"model":"m","input":["a","b"]}"#).unwrap().len(),
            2
        );
        assert!(matches!(
            &inputs(r#"{"model":"m","input":[1,2,3,4]}"#).unwrap()[..],
            [Input::TokenIds(ids)] if ids.len() == 4
        ));
        assert_eq!(
            inputs(r#"{"model":"m","input":[[1],[2,3]]}"#)
                .unwrap()
                .len(),
            2
        );
        assert!(inputs(r#"{"model":"m","input":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn counts_are_bounded_while_parsing() {
        let err = inputs(r#"{"model":"m","input":["","","",""]}"#).unwrap_err();
        assert!(err.contains("max_inputs_per_request"), "{err}");
        let err = inputs(r#"{"model":"m","input":[[1],[2],[3],[4]]}"#).unwrap_err();
        assert!(err.contains("max_inputs_per_request"), "{err}");
        for ids in [r#"[1,2,3,4,5]"#, r#"[[1,2,3,4,5]]"#] {
            let err = inputs(&format!(r#"{{"model":"m","input":{ids}}}"#)).unwrap_err();
            assert!(err.contains("max_text_chars"), "{err}");
        }
        // A million empty strings stop at the fourth.
        let huge = format!(
            r#"{{"model":"m","input":[{}""]}}"#,
            "\"\",".repeat(1_000_000)
        );
        assert!(inputs(&huge)
            .unwrap_err()
            .contains("max_inputs_per_request"));
    }

    #[test]
    fn malformed_requests_are_refused() {
        for body in [
            r#"{"input":"x"}"#,
            r#"{"model":"m"}"#,
            r#"{"model":"m","input":[1,"mixed"]}"#,
            r#"{"model":"m","input":["a",[1]]}"#,
            r#"{"model":"m","input":[[1],"a"]}"#,
            r#"{"model":"m","input":[-1]}"#,
            r#"{"model":"m","input":[4294967296]}"#,
            r#"{"model":"m","input":"x","encoding_format":"hex"}"#,
            r#"{"model":"m","model":"n","input":"x"}"#,
            r#"{"model":"m","input":"x"} trailing"#,
            r#"["model"]"#,
        ] {
            assert!(inputs(body).is_err(), "{body}");
        }
    }
}
