//! Protobuf messages to domain types and back. Every check of a request's shape
//! that does not need a model happens here.

use crate::{
    backbone::{BackboneDescriptor, EmbedOptions, Input, Modality, Pooling},
    batching::Priority,
    config::LimitsConfig,
    proto, Error, Result,
};

/// Converts the wire inputs, naming the index of the first malformed one.
pub fn inputs(inputs: Vec<proto::Input>, limits: &LimitsConfig) -> Result<Vec<Input>> {
    let max_inputs = limits.max_inputs_per_request;
    if inputs.is_empty() {
        return Err(Error::InvalidArgument(
            "inputs is empty: send at least one input".into(),
        ));
    }
    if inputs.len() > max_inputs {
        return Err(Error::InvalidArgument(format!(
            "{} inputs in one request; this server accepts at most {max_inputs} \
             (limits.max_inputs_per_request): split the request",
            inputs.len()
        )));
    }
    inputs
        .into_iter()
        .enumerate()
        .map(|(index, input)| input_of(index, input, limits.max_text_chars))
        .collect()
}

pub fn input_of(index: usize, input: proto::Input, max_text_chars: usize) -> Result<Input> {
    use proto::input::Kind;
    let invalid = |reason: String| Error::InvalidInput { index, reason };
    match input.kind {
        None => Err(invalid("no input set: give text, image or tensor".into())),
        Some(Kind::Text(text)) => {
            // Tokenizing costs time in proportion to the text, truncated or not.
            // A character takes at least one byte, so only a text longer in
            // bytes than the limit needs its characters counted.
            if text.len() > max_text_chars {
                let chars = text.chars().count();
                if chars > max_text_chars {
                    return Err(invalid(format!(
                        "text is {chars} characters; at most {max_text_chars} are accepted \
                         (limits.max_text_chars)"
                    )));
                }
            }
            Ok(Input::Text(text))
        }
        Some(Kind::Image(bytes)) => {
            if bytes.is_empty() {
                return Err(invalid("image is empty".into()));
            }
            Ok(Input::Image(bytes))
        }
        Some(Kind::Tensor(tensor)) => {
            let shape: Vec<usize> = tensor.shape.iter().map(|&d| d as usize).collect();
            let count = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .filter(|_| !shape.is_empty());
            if count != Some(tensor.values.len()) {
                return Err(invalid(format!(
                    "tensor shape {:?} does not match its {} values",
                    tensor.shape,
                    tensor.values.len()
                )));
            }
            if let Some(at) = tensor.values.iter().position(|v| !v.is_finite()) {
                return Err(invalid(format!("tensor value {at} is not a finite number")));
            }
            Ok(Input::Tensor {
                shape,
                values: tensor.values,
            })
        }
    }
}

/// The request's pooling and normalization, defaulting to the backbone's.
pub fn embed_options(
    pooling: i32,
    normalize: Option<bool>,
    descriptor: &BackboneDescriptor,
) -> Result<EmbedOptions> {
    let pooling = match proto::Pooling::try_from(pooling) {
        Ok(proto::Pooling::Unspecified) => descriptor.default_options.pooling,
        Ok(proto::Pooling::Mean) => Pooling::Mean,
        Ok(proto::Pooling::Cls) => Pooling::Cls,
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "pooling {pooling} is not a known value"
            )))
        }
    };
    if pooling == Pooling::Cls && descriptor.modality == Modality::Image {
        return Err(Error::InvalidArgument(format!(
            "backbone `{}` takes images, which are pooled globally (POOLING_MEAN); \
             POOLING_CLS is for text backbones",
            descriptor.name
        )));
    }
    Ok(EmbedOptions {
        pooling,
        normalize: normalize.unwrap_or(descriptor.default_options.normalize),
    })
}

/// The request's scheduling class; unspecified means online.
pub fn priority(value: i32) -> Result<Priority> {
    match proto::Priority::try_from(value) {
        Ok(proto::Priority::Unspecified | proto::Priority::Online) => Ok(Priority::Online),
        Ok(proto::Priority::Bulk) => Ok(Priority::Bulk),
        Err(_) => Err(Error::InvalidArgument(format!(
            "priority {value} is not a known value"
        ))),
    }
}

pub fn modality(modality: Modality) -> proto::Modality {
    match modality {
        Modality::Text => proto::Modality::Text,
        Modality::Image => proto::Modality::Image,
    }
}

pub fn pooling(pooling: Pooling) -> proto::Pooling {
    match pooling {
        Pooling::Mean => proto::Pooling::Mean,
        Pooling::Cls => proto::Pooling::Cls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::input::Kind;

    fn tensor(shape: Vec<u32>, values: Vec<f32>) -> proto::Input {
        proto::Input {
            kind: Some(Kind::Tensor(proto::Tensor { shape, values })),
        }
    }

    fn limits(max_inputs_per_request: usize) -> LimitsConfig {
        LimitsConfig {
            max_inputs_per_request,
            max_text_chars: 10,
            ..LimitsConfig::default()
        }
    }

    fn text(s: &str) -> proto::Input {
        proto::Input {
            kind: Some(Kind::Text(s.into())),
        }
    }

    #[test]
    fn request_level_limits() {
        assert!(matches!(
            inputs(vec![], &limits(4)),
            Err(Error::InvalidArgument(m)) if m.contains("empty")
        ));
        assert!(matches!(
            inputs(vec![text("a"); 5], &limits(4)),
            Err(Error::InvalidArgument(m)) if m.contains("at most 4")
        ));
        assert_eq!(inputs(vec![text("a"); 4], &limits(4)).unwrap().len(), 4);
    }

    #[test]
    fn malformed_items_are_named_by_index() {
        let cases = [
            proto::Input { kind: None },
            proto::Input {
                kind: Some(Kind::Image(vec![])),
            },
            tensor(vec![2, 2], vec![1.0; 3]),
            tensor(vec![], vec![]),
            tensor(vec![u32::MAX, u32::MAX, u32::MAX], vec![]),
            tensor(vec![2], vec![1.0, f32::NAN]),
            text("ééééééééééé"), // 11 characters, over the limit of 10
        ];
        for case in cases {
            let err = inputs(vec![text("fine"), case.clone()], &limits(8)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidInput { index: 1, .. }),
                "{case:?} gave {err}"
            );
        }
        assert!(inputs(vec![tensor(vec![2, 1], vec![0.5, 1.5])], &limits(8)).is_ok());
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        assert_eq!(priority(0).unwrap(), Priority::Online);
        assert_eq!(priority(2).unwrap(), Priority::Bulk);
        assert!(priority(42).is_err());
    }
}
