//! Bounds on the inputs of one request, whatever transport brought them.

use crate::{backbone::Input, config::LimitsConfig, Error, Result};

/// Most dimensions of a tensor input. Backbones take rank-3 tensors (channels,
/// height, width); the bound keeps a shape of millions of 1s, one wire byte
/// each, from costing eight bytes a dimension once decoded.
pub const MAX_TENSOR_RANK: usize = 8;

/// Checks a tensor's shape against its values: rank 1 to [`MAX_TENSOR_RANK`],
/// no dimension 0, and as many values as the dimensions' product.
pub fn check_tensor_shape<D>(shape: &[D], values: usize) -> std::result::Result<(), String>
where
    D: Copy + std::fmt::Debug,
    u64: TryFrom<D>,
{
    if shape.is_empty() || shape.len() > MAX_TENSOR_RANK {
        return Err(format!(
            "tensor has {} dimensions; 1 to {MAX_TENSOR_RANK} are accepted",
            shape.len()
        ));
    }
    let count = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
        .filter(|&count| count > 0);
    if count != Some(values as u64) {
        return Err(format!(
            "tensor shape {shape:?} does not match its {values} values"
        ));
    }
    Ok(())
}

/// Checks the number of inputs and each text's length.
pub fn check_request_inputs(inputs: &[Input], limits: &LimitsConfig) -> Result<()> {
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
    for (index, input) in inputs.iter().enumerate() {
        check_input(index, input, limits.max_text_chars)?;
    }
    Ok(())
}

/// Checks one input's size: a text's length in characters, or the number of
/// token ids (bounded like characters: a token covers at least one). `index`
/// names it in the error.
pub fn check_input(index: usize, input: &Input, max_text_chars: usize) -> Result<()> {
    if let Input::Tensor { shape, values } = input {
        check_tensor_shape(shape, values.len())
            .map_err(|reason| Error::InvalidInput { index, reason })?;
    }
    if let Input::TokenIds(ids) = input {
        if ids.len() > max_text_chars {
            return Err(Error::InvalidInput {
                index,
                reason: format!(
                    "{} token ids; at most {max_text_chars} are accepted (limits.max_text_chars)",
                    ids.len()
                ),
            });
        }
    }
    if let Input::Text(text) = input {
        // Tokenizing costs time in proportion to the text, truncated or not.
        // A character takes at least one byte, so only a text longer in bytes
        // than the limit needs its characters counted.
        if text.len() > max_text_chars {
            let chars = text.chars().count();
            if chars > max_text_chars {
                return Err(Error::InvalidInput {
                    index,
                    reason: format!(
                        "text is {chars} characters; at most {max_text_chars} are accepted \
                         (limits.max_text_chars)"
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_inputs_per_request: usize) -> LimitsConfig {
        LimitsConfig {
            max_inputs_per_request,
            max_text_chars: 10,
            ..LimitsConfig::default()
        }
    }

    fn text(s: &str) -> Input {
        Input::Text(s.into())
    }

    #[test]
    fn request_level_limits() {
        assert!(matches!(
            check_request_inputs(&[], &limits(4)),
            Err(Error::InvalidArgument(m)) if m.contains("empty")
        ));
        assert!(matches!(
            check_request_inputs(&vec![text("a"); 5], &limits(4)),
            Err(Error::InvalidArgument(m)) if m.contains("at most 4")
        ));
        assert!(check_request_inputs(&vec![text("a"); 4], &limits(4)).is_ok());
    }

    #[test]
    fn tensor_shapes_are_bounded_in_rank_and_match_their_values() {
        assert!(check_tensor_shape(&[3u32, 2, 2], 12).is_ok());
        assert!(check_tensor_shape(&[3u32, 2, 2], 11).is_err());
        assert!(check_tensor_shape::<u32>(&[], 0).is_err());
        assert!(check_tensor_shape(&[0u32], 0).is_err(), "no empty tensors");
        assert!(check_tensor_shape(&[1u32; 9], 1).is_err(), "rank over 8");
        assert!(check_tensor_shape(&[u32::MAX; 3], 0).is_err(), "overflow");
        let tensor = Input::Tensor {
            shape: vec![1; 1000],
            values: vec![0.5],
        };
        assert!(matches!(
            check_input(2, &tensor, 10),
            Err(Error::InvalidInput { index: 2, .. })
        ));
    }

    #[test]
    fn long_texts_are_named_by_index() {
        // 11 characters, over the limit of 10; 10 characters of two bytes pass.
        let err =
            check_request_inputs(&[text("fine"), text("ééééééééééé")], &limits(8)).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { index: 1, .. }), "{err}");
        assert!(check_request_inputs(&[text("éééééééééé")], &limits(8)).is_ok());
    }
}
