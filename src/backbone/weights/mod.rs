//! Where a backbone's weights come from and the formats we read them in:
//! source resolution (a local folder or a hub repository, cached), GGUF files
//! (decoders, tokenizer included) and PyTorch's legacy `.pth` format.

pub mod gguf;
pub mod pytorch_legacy;
pub mod source;
