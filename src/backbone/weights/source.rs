//! Finding a backbone's files: a local folder, or a Hugging Face hub repository
//! fetched once into the model cache.

use std::path::{Path, PathBuf};

use crate::{config::SourceConfig, Error, Result};

/// Which files an architecture reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// model.safetensors, config.json and tokenizer.json (BERT).
    Text,
    /// model.safetensors alone.
    Image,
    /// One GGUF file holding settings, weights and tokenizer.
    Gguf,
}

/// The files of a Hugging Face-layout model. Image backbones need only the
/// weights; text backbones also the config and the tokenizer.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub weights: PathBuf,
    /// config.json and tokenizer.json: present for text backbones.
    pub text: Option<TextFiles>,
    /// sentence-transformers' settings (max_seq_length), when the model has them.
    pub sentence_config: Option<PathBuf>,
    /// For logs and listings: the folder or `hub:<repo>@<revision>`.
    pub origin: String,
}

#[derive(Debug, Clone)]
pub struct TextFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
}

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const TOKENIZER: &str = "tokenizer.json";
const SENTENCE_CONFIG: &str = "sentence_bert_config.json";

pub fn resolve(
    source: &SourceConfig,
    cache_dir: Option<&Path>,
    layout: Layout,
) -> Result<ModelFiles> {
    match (&source.path, &source.hub) {
        (Some(dir), None) if layout == Layout::Gguf => local_gguf(dir, source.file.as_deref()),
        (Some(dir), None) => local(dir, layout),
        (None, Some(repo)) => hub(
            repo,
            source.revision.as_deref().unwrap_or("main"),
            cache_dir,
            (layout, source.file.as_deref()),
        ),
        _ => Err(Error::ModelLoad(
            "a source needs exactly one of `path` and `hub`".into(),
        )),
    }
}

/// The GGUF file `file` of folder `dir`, or the folder's only one.
fn local_gguf(dir: &Path, file: Option<&str>) -> Result<ModelFiles> {
    let weights = match file {
        Some(name) => dir.join(name),
        None => only_gguf(dir)?,
    };
    if !weights.is_file() {
        return Err(Error::ModelLoad(format!(
            "{} is missing (scripts/fetch-models.sh fetches SmolLM2-135M-Instruct)",
            weights.display()
        )));
    }
    Ok(ModelFiles {
        weights,
        text: None,
        sentence_config: None,
        origin: dir.display().to_string(),
    })
}

fn only_gguf(dir: &Path) -> Result<PathBuf> {
    let listing = std::fs::read_dir(dir)
        .map_err(|err| Error::ModelLoad(format!("cannot list {}: {err}", dir.display())))?;
    let found: Vec<PathBuf> = listing
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "gguf"))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::ModelLoad(format!(
            "{} holds no .gguf file (scripts/fetch-models.sh fetches SmolLM2-135M-Instruct)",
            dir.display()
        ))),
        _ => Err(Error::ModelLoad(format!(
            "{} holds {} .gguf files; name one with source.file",
            dir.display(),
            found.len()
        ))),
    }
}

fn local(dir: &Path, layout: Layout) -> Result<ModelFiles> {
    let required = |name: &str| {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::ModelLoad(format!(
                "{} is missing (run scripts/fetch-models.sh for the default models)",
                path.display()
            )))
        }
    };
    let sentence_config = dir.join(SENTENCE_CONFIG);
    let weights = required(WEIGHTS)?;
    let text = match layout {
        Layout::Text => Some(TextFiles {
            config: required(CONFIG)?,
            tokenizer: required(TOKENIZER)?,
        }),
        Layout::Image | Layout::Gguf => None,
    };
    Ok(ModelFiles {
        weights,
        text,
        sentence_config: sentence_config.is_file().then_some(sentence_config),
        origin: dir.display().to_string(),
    })
}

/// Downloads (or finds in the cache) the model files of a hub repository.
/// `HF_TOKEN` is used for gated or private repositories; `HF_ENDPOINT` selects a
/// mirror.
fn hub(
    repo_id: &str,
    revision: &str,
    cache_dir: Option<&Path>,
    (layout, file): (Layout, Option<&str>),
) -> Result<ModelFiles> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};

    let mut builder = ApiBuilder::from_env().with_progress(false);
    if let Some(dir) = cache_dir {
        builder = builder.with_cache_dir(dir.to_owned());
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|err| Error::ModelLoad(format!("hub client: {err}")))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_owned(),
        RepoType::Model,
        revision.to_owned(),
    ));
    let fetch = |name: &str| {
        repo.get(name).map_err(|err| {
            Error::ModelLoad(format!(
                "cannot fetch {name} from hub repository {repo_id}@{revision}: {err}"
            ))
        })
    };
    if layout == Layout::Gguf {
        let name = file.ok_or_else(|| {
            Error::ModelLoad(format!(
                "hub repository {repo_id} needs source.file: the .gguf file to fetch"
            ))
        })?;
        return Ok(ModelFiles {
            weights: fetch(name)?,
            text: None,
            sentence_config: None,
            origin: format!("hub:{repo_id}@{revision}/{name}"),
        });
    }
    let text = match layout {
        Layout::Text => Some(TextFiles {
            config: fetch(CONFIG)?,
            tokenizer: fetch(TOKENIZER)?,
        }),
        Layout::Image | Layout::Gguf => None,
    };
    Ok(ModelFiles {
        weights: fetch(WEIGHTS)?,
        text,
        // Optional: plain BERT repositories do not have it.
        sentence_config: repo.get(SENTENCE_CONFIG).ok(),
        origin: format!("hub:{repo_id}@{revision}"),
    })
}

/// sha256 of a file, hex: the fingerprint that heads record of their backbone.
pub fn fingerprint(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;

    let mut file = std::fs::File::open(path)
        .map_err(|err| Error::ModelLoad(format!("cannot open {}: {err}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|err| Error::ModelLoad(format!("cannot read {}: {err}", path.display())))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_source_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG), "{}").unwrap();
        let err = local(dir.path(), Layout::Text).unwrap_err().to_string();
        assert!(err.contains(WEIGHTS), "{err}");
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            fingerprint(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
