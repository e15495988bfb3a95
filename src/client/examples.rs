//! Labelled examples as the command line reads them from files, before they
//! become protobuf messages.

use std::collections::BTreeMap;

use crate::proto;

/// One input of an example: a text, or an encoded image (PNG, JPEG, WebP).
#[derive(Debug, Clone, PartialEq)]
pub enum ExampleInput {
    Text(String),
    Image(Vec<u8>),
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub label: String,
    pub input: ExampleInput,
}

impl Example {
    pub fn text(label: &str, text: &str) -> Self {
        Self {
            label: label.to_owned(),
            input: ExampleInput::Text(text.to_owned()),
        }
    }
}

impl ExampleInput {
    pub fn into_proto(self) -> proto::Input {
        let kind = match self {
            Self::Text(text) => proto::input::Kind::Text(text),
            Self::Image(bytes) => proto::input::Kind::Image(bytes),
        };
        proto::Input { kind: Some(kind) }
    }
}

impl From<Example> for proto::Example {
    fn from(example: Example) -> Self {
        proto::Example {
            input: Some(example.input.into_proto()),
            label: example.label,
        }
    }
}

/// Examples per label, in label order.
pub fn label_counts(examples: &[Example]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for example in examples {
        *counts.entry(example.label.as_str()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_become_protobuf_examples_with_their_input_kind() {
        let text: proto::Example = Example::text("pos", "good film").into();
        assert_eq!(text.label, "pos");
        assert_eq!(
            text.input.and_then(|i| i.kind),
            Some(proto::input::Kind::Text("good film".into()))
        );
        let image: proto::Example = Example {
            label: "cat".into(),
            input: ExampleInput::Image(vec![1, 2, 3]),
        }
        .into();
        assert_eq!(
            image.input.and_then(|i| i.kind),
            Some(proto::input::Kind::Image(vec![1, 2, 3]))
        );
    }

    #[test]
    fn labels_are_counted_in_order() {
        let examples = [
            Example::text("b", "x"),
            Example::text("a", "y"),
            Example::text("b", "z"),
        ];
        let counts: Vec<(&str, usize)> = label_counts(&examples).into_iter().collect();
        assert_eq!(counts, [("a", 1), ("b", 2)]);
    }
}
