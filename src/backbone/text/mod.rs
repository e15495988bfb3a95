//! What the text families share: tokenization with the backbone's length
//! policy, a batch's tokenized texts, and pooling.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

pub mod pooling;

use super::{EmbedItem, Input, Prepared};
use crate::{Error, Result};

/// A tokenized text, special tokens included, ready for a forward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    /// True when the text was cut to the maximum sequence length.
    pub truncated: bool,
}

/// The tokenized texts of a batch's items, in order. An image among them
/// would be the batcher's mistake: one backbone's batches hold one kind.
pub fn texts_of<'a>(items: &[EmbedItem<'a>]) -> Result<Vec<&'a TokenizedText>> {
    items
        .iter()
        .map(|item| match item.input {
            Prepared::Text(text) => Ok(text),
            Prepared::Image(_) => Err(Error::Inference("image item in a text batch".into())),
        })
        .collect()
}

/// Wraps a Hugging Face `tokenizer.json` with the backbone's own length policy.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_len: usize,
}

impl TextEncoder {
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|err| {
            Error::ModelLoad(format!("cannot read tokenizer {}: {err}", path.display()))
        })?;
        Self::new(tokenizer, max_len)
    }

    /// Wraps a tokenizer built in memory (from a GGUF file's metadata).
    pub fn new(mut tokenizer: Tokenizer, max_len: usize) -> Result<Self> {
        // Model repositories often ship fixed padding (all-MiniLM-L6-v2 pads every
        // text to 128) and their own truncation. Padding is the batcher's business
        // (to the longest item of a batch), and truncation follows our config.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|err| Error::ModelLoad(format!("invalid truncation setting: {err}")))?;
        Ok(Self { tokenizer, max_len })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A text or a client's token ids as the model's sequence; other inputs
    /// are refused, naming `backbone`.
    pub fn prepare(
        &self,
        index: usize,
        input: Input,
        truncate: bool,
        backbone: &str,
    ) -> Result<Prepared> {
        match input {
            Input::Text(text) => Ok(Prepared::Text(self.encode(index, &text, truncate)?)),
            Input::TokenIds(ids) => Ok(Prepared::Text(self.from_ids(index, ids, truncate)?)),
            other => Err(Error::InvalidInput {
                index,
                reason: format!("backbone `{backbone}` takes text, not {}", other.kind()),
            }),
        }
    }

    /// Tokenizes one input; `index` names it in errors.
    pub fn encode(&self, index: usize, text: &str, truncate: bool) -> Result<TokenizedText> {
        if text.trim().is_empty() {
            return Err(Error::InvalidInput {
                index,
                reason: "text is empty".into(),
            });
        }
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|err| Error::InvalidInput {
                index,
                reason: format!("text cannot be tokenized: {err}"),
            })?;
        let truncated = !encoding.get_overflowing().is_empty();
        if truncated && !truncate {
            return Err(Error::InvalidInput {
                index,
                reason: format!(
                    "text is longer than the backbone's maximum of {} tokens; \
                     shorten it or set truncate to true",
                    self.max_len
                ),
            });
        }
        Ok(TokenizedText {
            ids: encoding.get_ids().to_vec(),
            truncated,
        })
    }

    /// Takes ids a client tokenized itself as the whole sequence, after checking
    /// each against the vocabulary; a sequence beyond the maximum length is cut
    /// when `truncate` allows, else refused.
    pub fn from_ids(
        &self,
        index: usize,
        mut ids: Vec<u32>,
        truncate: bool,
    ) -> Result<TokenizedText> {
        if ids.is_empty() {
            return Err(Error::InvalidInput {
                index,
                reason: "token ids are empty".into(),
            });
        }
        let vocabulary = self.tokenizer.get_vocab_size(true);
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocabulary) {
            return Err(Error::InvalidInput {
                index,
                reason: format!(
                    "token id {bad} is outside the backbone's vocabulary of {vocabulary} ids"
                ),
            });
        }
        let truncated = ids.len() > self.max_len;
        if truncated && !truncate {
            return Err(Error::InvalidInput {
                index,
                reason: format!(
                    "{} token ids; the backbone takes at most {}: shorten them or set \
                     truncate to true",
                    ids.len(),
                    self.max_len
                ),
            });
        }
        ids.truncate(self.max_len);
        Ok(TokenizedText { ids, truncated })
    }
}
