//! GGUF model files: a decoder's settings, quantized weights and tokenizer,
//! all in one file (the format of llama.cpp and of most published
//! quantized decoders).
//!
//! The container is read by candle's `gguf_file`; the tokenizer is rebuilt
//! from the metadata (`tokenizer.ggml.*`) with the tokenizers crate, the way
//! llama.cpp tokenizes: byte-level BPE over the vocabulary and merges, with
//! the pre-tokenizer the file names, control tokens matched whole.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use tokenizers::{
    models::bpe::{Vocab, BPE},
    pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
    },
    processors::template::TemplateProcessing,
    AddedToken, Tokenizer,
};

use crate::{Error, Result};

/// An open GGUF file: its metadata and tensor directory, read at open; the
/// tensors themselves are read when asked for.
pub struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
}

/// `tokenizer.ggml.token_type` values of tokens that are matched whole in a
/// text rather than produced by merges (llama.cpp's CONTROL and USER_DEFINED).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|err| Error::ModelLoad(format!("cannot open {}: {err}", path.display())))?;
        let content = gguf_file::Content::read(&mut BufReader::new(file)).map_err(|err| {
            Error::ModelLoad(format!("{} is not a GGUF file: {err}", path.display()))
        })?;
        Ok(Self {
            path: path.to_owned(),
            content,
        })
    }

    fn error(&self, what: impl std::fmt::Display) -> Error {
        Error::ModelLoad(format!("{}: {what}", self.path.display()))
    }

    fn value(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.error(format!("metadata `{key}` is missing")))
    }

    /// A string setting, e.g. `general.architecture`.
    pub fn string(&self, key: &str) -> Result<&str> {
        let value = self.value(key)?;
        value
            .to_string()
            .map(String::as_str)
            .map_err(|err| self.error(format!("metadata `{key}`: {err}")))
    }

    /// A non-negative integer setting (any of GGUF's integer types).
    pub fn count(&self, key: &str) -> Result<usize> {
        let value = self.value(key)?;
        let n = match value {
            gguf_file::Value::U8(v) => u64::from(*v),
            gguf_file::Value::U16(v) => u64::from(*v),
            gguf_file::Value::U32(v) => u64::from(*v),
            gguf_file::Value::U64(v) => *v,
            gguf_file::Value::I8(v) => u64::try_from(*v).unwrap_or(u64::MAX),
            gguf_file::Value::I16(v) => u64::try_from(*v).unwrap_or(u64::MAX),
            gguf_file::Value::I32(v) => u64::try_from(*v).unwrap_or(u64::MAX),
            gguf_file::Value::I64(v) => u64::try_from(*v).unwrap_or(u64::MAX),
            other => {
                return Err(self.error(format!("metadata `{key}` is not an integer: {other:?}")))
            }
        };
        usize::try_from(n)
            .ok()
            .filter(|&n| n < (1 << 32))
            .ok_or_else(|| self.error(format!("metadata `{key}` = {n} is out of range")))
    }

    /// A float setting, or `default` when the file leaves it out.
    pub fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.content.metadata.get(key) {
            None => Ok(default),
            Some(gguf_file::Value::F32(v)) => Ok(f64::from(*v)),
            Some(gguf_file::Value::F64(v)) => Ok(*v),
            Some(other) => Err(self.error(format!("metadata `{key}` is not a float: {other:?}"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let values = self
            .value(key)?
            .to_vec()
            .map_err(|err| self.error(format!("metadata `{key}`: {err}")))?;
        values
            .iter()
            .map(|value| {
                value
                    .to_string()
                    .map(String::as_str)
                    .map_err(|err| self.error(format!("metadata `{key}`: {err}")))
            })
            .collect()
    }

    /// The shape of tensor `name` as candle reads it (`[outputs, inputs]` for
    /// a linear weight), and its storage type.
    pub fn tensor_shape(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.error(format!("tensor `{name}` is missing")))?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// Tensor `name` in its stored (quantized) form, on the CPU.
    pub fn quantized(&self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let (found, _) = self.tensor_shape(name)?;
        if found != shape {
            return Err(self.error(format!(
                "tensor `{name}` has shape {found:?}, the settings give {shape:?}"
            )));
        }
        let file =
            File::open(&self.path).map_err(|err| self.error(format!("cannot open: {err}")))?;
        self.content
            .tensor(&mut BufReader::new(file), name, &Device::Cpu)
            .map_err(|err| self.error(format!("cannot read tensor `{name}`: {err}")))
    }

    /// Tensor `name` dequantized to f32, row-major, after checking its shape.
    pub fn dequantized(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let tensor = self.quantized(name, shape)?;
        tensor
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|err| self.error(format!("cannot dequantize `{name}`: {err}")))
    }

    /// The tokenizer the file describes, appending `eos` to every text when
    /// asked (the token whose vector last-token pooling takes).
    pub fn tokenizer(&self, append_eos: bool) -> Result<Tokenizer> {
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(self.error(format!(
                "tokenizer model `{model}` is not supported (byte-level BPE, `gpt2`, is)"
            )));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let mut tokenizer = Tokenizer::new(self.bpe(&tokens, &merges)?);
        let pre = self
            .content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map_or("gpt2", String::as_str);
        tokenizer
            .with_pre_tokenizer(Some(pre_tokenizer(pre).ok_or_else(|| {
                self.error(format!("pre-tokenizer `{pre}` is not supported"))
            })?));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        tokenizer
            .add_special_tokens(self.whole_tokens(&tokens)?)
            .map_err(|err| self.error(format!("control tokens: {err}")))?;
        if append_eos {
            let eos = self.count("tokenizer.ggml.eos_token_id")?;
            let name = tokens.get(eos).ok_or_else(|| {
                self.error(format!("eos token id {eos} is not in the vocabulary"))
            })?;
            let template = TemplateProcessing::builder()
                .try_single(format!("$A:0 {name}:0"))
                .map(|b| b.special_tokens(vec![((*name).to_owned(), eos as u32)]))
                .map_err(|err| self.error(format!("eos template: {err}")))?
                .build()
                .map_err(|err| self.error(format!("eos template: {err}")))?;
            tokenizer.with_post_processor(Some(template));
        }
        Ok(tokenizer)
    }

    fn bpe(&self, tokens: &[&str], merges: &[&str]) -> Result<BPE> {
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| ((*token).to_owned(), id as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| self.error(format!("merge `{merge}` is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|err| self.error(format!("cannot build the BPE tokenizer: {err}")))
    }

    /// Control and user-defined tokens: matched whole wherever they occur in
    /// a text, never split by the pre-tokenizer.
    fn whole_tokens(&self, tokens: &[&str]) -> Result<Vec<AddedToken>> {
        let types = self
            .value("tokenizer.ggml.token_type")?
            .to_vec()
            .map_err(|err| self.error(format!("metadata `tokenizer.ggml.token_type`: {err}")))?;
        Ok(tokens
            .iter()
            .zip(types)
            .filter(|(_, kind)| matches!(kind.to_i32(), Ok(CONTROL | USER_DEFINED)))
            .map(|(token, _)| AddedToken::from((*token).to_owned(), true))
            .collect())
    }
}

/// llama.cpp's pre-tokenizers by the name a GGUF file gives (`gpt2` when it
/// names none), as the tokenizers crate composes them. `smollm`: every digit
/// its own piece, then GPT-2's split; `gpt2`: GPT-2's split alone.
fn pre_tokenizer(name: &str) -> Option<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match name {
        "smollm" => Some(
            Sequence::new(vec![
                Digits::new(true).into(),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])
            .into(),
        ),
        "gpt2" => Some(PreTokenizerWrapper::ByteLevel(byte_level)),
        _ => None,
    }
}
