//! A served encoder version: a BERT-family classifier exported with its head, its tokenizer,
//! its labels and its batcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::RepositoryError;
use super::limits::Limits;
use crate::checkpoint::{EncoderConfig, EncoderHead, TokenizerFiles};
use crate::engine::{EncoderSession, SessionOptions};
use crate::export::MODEL_FILE;
use crate::metrics::ModelMetrics;
use crate::scheduler::EncoderScheduler;

/// What an encoder answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderTask {
    /// One label (softmax over the labels).
    SingleLabelClassification,
    /// Any number of labels (a sigmoid per label): `problem_type` `multi_label_classification`.
    MultiLabelClassification,
    /// A label per token (named entities, BIO/IOB2 tags).
    TokenClassification,
    /// An embedding per text (a bare `BertModel`, pooled as sentence-transformers says).
    Embedding,
}

/// How token states become one embedding (sentence-transformers' `1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean over the input's tokens (special tokens included, as the attention mask).
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
}

/// A loaded encoder version.
pub struct EncoderVersion {
    pub name: String,
    pub version: u32,
    pub dir: PathBuf,
    pub tokenizer: Arc<Tokenizer>,
    pub task: EncoderTask,
    /// Label names by index (`id2label`).
    pub labels: Vec<String>,
    /// Longest input in tokens, special tokens included (the position table's length, less
    /// XLM-RoBERTa's offset).
    pub max_length: usize,
    /// Embedding models: how states are pooled, and whether the result is normalised
    /// (a `Normalize` module in `modules.json`).
    pub pooling: Pooling,
    pub normalize: bool,
    pub scheduler: EncoderScheduler,
}

/// Most requests an encoder lets wait when the limits allow more than this.
const MAX_WAITING: usize = 4096;

/// Opens the encoder in `vdir` (its `config.json` already read as `config`).
pub fn open(
    name: &str,
    version: u32,
    vdir: &Path,
    config: &EncoderConfig,
    limits: &Limits,
    metrics: ModelMetrics,
) -> Result<EncoderVersion, RepositoryError> {
    let invalid = |what: String| RepositoryError::Invalid(format!("{name} version {version}: {what}"));
    let files = TokenizerFiles::open(vdir).map_err(|e| invalid(e.to_string()))?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_json).map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
    let pad_id = files
        .pad_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .unwrap_or(0);
    let task = match (config.head, config.multi_label) {
        (EncoderHead::TokenClassification, _) => EncoderTask::TokenClassification,
        (EncoderHead::Embeddings, _) => EncoderTask::Embedding,
        (EncoderHead::SequenceClassification, true) => EncoderTask::MultiLabelClassification,
        (EncoderHead::SequenceClassification, false) => EncoderTask::SingleLabelClassification,
    };
    let (pooling, normalize) = sentence_transformers(vdir).map_err(invalid)?;
    let options = SessionOptions {
        intra_threads: limits.intra_threads,
        execution_provider: limits.execution_provider,
        device_id: limits.device_id,
    };
    let session = EncoderSession::open(&vdir.join(MODEL_FILE), options).map_err(|e| invalid(e.to_string()))?;
    let max_length = config.max_tokens().min(files.model_max_length.unwrap_or(usize::MAX));
    let mut batch = limits.batch.clone();
    batch.buckets.retain(|&b| b < max_length);
    batch.buckets.push(max_length);
    let max_waiting = limits.admission.max_queue.min(MAX_WAITING);
    let scheduler = EncoderScheduler::spawn(name, session, i64::from(pad_id), batch, max_waiting, metrics)
        .map_err(|e| invalid(format!("starting the worker: {e}")))?;
    tracing::info!(
        model = %name,
        version,
        file = %vdir.join(MODEL_FILE).display(),
        task = ?task,
        labels = config.labels.len(),
        pooling = ?pooling,
        normalize,
        max_length,
        "encoder loaded"
    );
    Ok(EncoderVersion {
        name: name.to_string(),
        version,
        dir: vdir.to_path_buf(),
        tokenizer: Arc::new(tokenizer),
        task,
        labels: config.labels.clone(),
        max_length,
        pooling,
        normalize,
        scheduler,
    })
}

/// The pooling and normalisation of a sentence-transformers folder: mean pooling and no
/// normalisation where it has no such files.
fn sentence_transformers(vdir: &Path) -> Result<(Pooling, bool), String> {
    let read = |name: &str| -> Result<Option<Value>, String> {
        match std::fs::read_to_string(vdir.join(name)) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{name}: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{name}: {e}")),
        }
    };
    let pooling = match read("1_Pooling/config.json")? {
        None => Pooling::Mean,
        Some(c) => {
            let on = |key: &str| c.get(key).and_then(Value::as_bool).unwrap_or(false);
            match (on("pooling_mode_mean_tokens"), on("pooling_mode_cls_token")) {
                (true, false) => Pooling::Mean,
                (false, true) => Pooling::Cls,
                _ => {
                    return Err("1_Pooling/config.json: supported are mean or CLS pooling, one of them".into());
                }
            }
        }
    };
    let normalize = read("modules.json")?
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|modules| {
            modules
                .iter()
                .any(|m| m.get("type").and_then(Value::as_str) == Some("sentence_transformers.models.Normalize"))
        });
    Ok((pooling, normalize))
}
