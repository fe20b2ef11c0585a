//! Hugging Face checkpoints at rest: `config.json`, safetensors weights (single or sharded),
//! `tokenizer.json` and `tokenizer_config.json` (or `chat_template.jinja`).
//!
//! [`Checkpoint::open`] checks every tensor the architecture needs against its expected shape, so
//! a malformed checkpoint fails here with the tensor's name rather than deep inside an export.

mod config;
mod layout;
mod tokenizer_files;
mod weights;

use std::path::{Path, PathBuf};

pub use config::{DecoderConfig, EncoderConfig, EncoderHead, Family, ModelConfig, RopeConfig, RopeScaling};
pub use layout::{TensorRole, TensorSpec, tensor_specs};
pub use tokenizer_files::TokenizerFiles;
pub use weights::{SHARD_INDEX, SINGLE_FILE, TensorMeta, Weights};

/// Why a checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// `config.json` is missing a field, has a wrong one, or describes an unsupported model.
    #[error("config.json: {0}")]
    Config(String),
    /// A tensor the architecture needs is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A weights file is unreadable or inconsistent.
    #[error("{file}: {message}")]
    Weights { file: PathBuf, message: String },
    /// The tokenizer files are missing or malformed.
    #[error("{file}: {message}")]
    Tokenizer { file: PathBuf, message: String },
}

/// An opened, validated checkpoint folder.
pub struct Checkpoint {
    /// The folder it was read from.
    pub dir: PathBuf,
    /// The normalised architecture.
    pub config: ModelConfig,
    /// The weights, read on demand.
    pub weights: Weights,
    /// The tokenizer files beside the weights.
    pub tokenizer: TokenizerFiles,
}

impl Checkpoint {
    /// Opens `dir` and checks that every tensor the configuration needs is there with the right
    /// shape.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| CheckpointError::Io {
            path: config_path,
            source,
        })?;
        let config = ModelConfig::from_json(&text)?;
        let weights = Weights::open(&dir)?;
        for spec in tensor_specs(&config) {
            let meta = weights.meta(&spec.name)?;
            if meta.shape != spec.shape {
                return Err(CheckpointError::Shape {
                    name: spec.name,
                    expected: spec.shape,
                    found: meta.shape,
                });
            }
        }
        let tokenizer = TokenizerFiles::open(&dir)?;
        Ok(Self {
            dir,
            config,
            weights,
            tokenizer,
        })
    }
}
