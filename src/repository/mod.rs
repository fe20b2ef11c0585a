//! The model repository (Triton-like): `<root>/<model>/model.toml` plus numbered version folders
//! `1/`, `2/`, ... each holding `model.onnx`, `config.json` and the tokenizer files.
//!
//! A version is a decoder (generation) or, where its `config.json` names a BERT encoder, a
//! classifier or embedding model ([`EncoderVersion`]) with its own batcher.
//!
//! Each model serves one version at a time. A reload loads the chosen version beside the one
//! serving and swaps the shared pointer: requests already holding the old version finish on it,
//! and its worker thread ends when the last of them lets go. A model that fails to load is
//! recorded with its error and does not affect the others.

pub mod capture;
mod durable;
mod encoder;
mod engines;
mod limits;
mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use capture::CapturePolicy;

use tokenizers::Tokenizer;

use crate::checkpoint::{ModelConfig, TokenizerFiles};
use crate::constrain::TokenTrie;
use crate::export::Form;
use crate::metrics::Metrics;
use crate::scheduler::{DecoderEngine, FAILING_AFTER, Health, Scheduler};
use crate::tokenize::{ChatTemplate, stop_token_ids};
pub use encoder::{EncoderTask, EncoderVersion, Pooling};
pub use limits::{Limits, ModelLimits};
pub use settings::ModelSettings;

/// Why a model is not available.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// No model of that name exists in the repository.
    #[error("model `{0}` not found")]
    NotFound(String),
    /// The model exists but is not serving (failed to load, or unloaded).
    #[error("model `{name}` is not ready: {reason}")]
    NotReady { name: String, reason: String },
    /// The model's files are invalid.
    #[error("{0}")]
    Invalid(String),
    /// The operation does not fit the model's state.
    #[error("{0}")]
    Conflict(String),
    /// A name that cannot be a model's (it would leave the repository folder).
    #[error("{0}")]
    BadName(String),
    /// The model serves another kind of request (an encoder asked to generate, a decoder to
    /// classify).
    #[error("{0}")]
    WrongKind(String),
}

/// Longest model name.
pub const MAX_MODEL_NAME_LEN: usize = 128;

/// A model name is one folder of the repository: letters, digits, `-`, `_` and `.`, not
/// starting with `.` (no `..`, no slash, no absolute path can reach outside the repository).
pub fn check_model_name(name: &str) -> Result<(), RepositoryError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_MODEL_NAME_LEN
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(RepositoryError::BadName(format!(
            "model name {:?} is not a model folder name: 1 to {MAX_MODEL_NAME_LEN} letters, digits, '-', '_' or '.', not starting with '.'",
            name.chars().take(MAX_MODEL_NAME_LEN).collect::<String>()
        )))
    }
}

/// Context length of a model version that has no `config.json` nor `model_max_length`.
const DEFAULT_CONTEXT_LENGTH: usize = 2048;

/// A loaded, serving version of a model.
pub struct ModelVersion {
    pub name: String,
    pub version: u32,
    pub dir: PathBuf,
    pub tokenizer: Arc<Tokenizer>,
    /// The vocabulary as a byte trie, for constrained decoding.
    pub token_trie: Arc<TokenTrie>,
    pub chat_template: Option<ChatTemplate>,
    pub stop_token_ids: Vec<u32>,
    /// Longest prompt + completion the model takes (`max_position_embeddings`).
    pub context_length: usize,
    /// Default `max_tokens` of a request.
    pub max_tokens: usize,
    pub scheduler: Scheduler,
    /// Whether and how prompts are captured for refresh jobs (off when `None`).
    pub capture: Option<Arc<CapturePolicy>>,
    /// The model's `capture_redact` patterns, for prompts and answers logged with
    /// `--log-prompts`.
    pub redaction: Arc<CapturePolicy>,
    /// The graph's attention and float type, which a refresh keeps.
    pub form: Form,
}

impl ModelVersion {
    /// The training checkpoint kept beside this version's ONNX files, which refresh jobs
    /// fine-tune.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join(CHECKPOINT_DIR)
    }
}

/// Folder of a version that holds its Hugging Face checkpoint.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// A serving version: a decoder (generation) or an encoder (classification).
#[derive(Clone)]
pub enum Served {
    Decoder(Arc<ModelVersion>),
    Encoder(Arc<EncoderVersion>),
}

impl Served {
    /// The model's name.
    pub fn name(&self) -> &str {
        match self {
            Served::Decoder(m) => &m.name,
            Served::Encoder(m) => &m.name,
        }
    }

    /// Its version number.
    pub fn version(&self) -> u32 {
        match self {
            Served::Decoder(m) => m.version,
            Served::Encoder(m) => m.version,
        }
    }

    /// Whether its worker can serve.
    pub fn health(&self) -> Health {
        match self {
            Served::Decoder(m) => m.scheduler.health(),
            Served::Encoder(m) => m.scheduler.health(),
        }
    }
}

/// State of one model name.
enum Slot {
    Ready(Served),
    Failed(String),
    Unloaded,
}

/// Whether a model serves, as Triton's repository index names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ModelState {
    /// Serving.
    Ready,
    /// Failed to load.
    Unavailable,
    /// Unloaded on purpose.
    Unloaded,
}

/// What the admin API and health routes report about a model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    pub name: String,
    pub state: ModelState,
    pub version: Option<u32>,
    pub reason: Option<String>,
}

/// Why a loaded model does not serve.
fn health_reason(health: Health) -> String {
    match health {
        Health::Serving => String::new(),
        Health::Failing => format!("its last {FAILING_AFTER} engine calls failed (see the log)"),
        Health::Stopped => "its worker stopped; reload the model".into(),
    }
}

/// The repository and the state of every model in it.
pub struct Repository {
    root: PathBuf,
    /// The model's name when `root` is itself one model's folder (KServe mounts one model at
    /// `/mnt/models`).
    single: Option<String>,
    defaults: ModelLimits,
    metrics: Arc<Metrics>,
    models: RwLock<BTreeMap<String, Slot>>,
    /// Serialises changes to the set of version folders (promote, rollback).
    versions_lock: Mutex<()>,
}

impl Repository {
    /// Opens `root` and loads every model folder in it (a folder with a `model.toml`); or,
    /// when `root` holds a `model.toml` itself, the one model it is (named by its `name`, else
    /// by the folder).
    pub fn open(root: &Path, defaults: ModelLimits, metrics: Arc<Metrics>) -> Result<Self, RepositoryError> {
        let single = single_model(root)?;
        if let Some(name) = &single {
            tracing::info!(model = %name, folder = %root.display(), "the repository is a single model folder");
        }
        let repo = Self {
            single,
            root: root.to_path_buf(),
            defaults,
            metrics,
            models: RwLock::new(BTreeMap::new()),
            versions_lock: Mutex::new(()),
        };
        for name in repo.model_folders()? {
            if let Err(e) = repo.load(&name) {
                tracing::error!(model = %name, error = %e, "model failed to load");
            }
        }
        Ok(repo)
    }

    fn model_folders(&self) -> Result<Vec<String>, RepositoryError> {
        match &self.single {
            Some(name) => Ok(vec![name.clone()]),
            None => folder_names(&self.root),
        }
    }

    /// The serving version of decoder `name`.
    pub fn get(&self, name: &str) -> Result<Arc<ModelVersion>, RepositoryError> {
        match self.served(name)? {
            Served::Decoder(m) => Ok(m),
            Served::Encoder(m) => {
                let route = match m.task {
                    EncoderTask::TokenClassification => "POST /v1/classify",
                    EncoderTask::Embedding => "POST /embed or /v1/embeddings",
                    _ => "POST /predict",
                };
                Err(RepositoryError::WrongKind(format!(
                    "model `{name}` is an encoder ({:?}): it does not generate text; use {route}",
                    m.task
                )))
            }
        }
    }

    /// The serving version of encoder `name`.
    pub fn get_encoder(&self, name: &str) -> Result<Arc<EncoderVersion>, RepositoryError> {
        match self.served(name)? {
            Served::Encoder(m) => Ok(m),
            Served::Decoder(_) => Err(RepositoryError::WrongKind(format!(
                "model `{name}` is a decoder: it generates text (use /v1/completions); it does not classify"
            ))),
        }
    }

    /// The names of the encoders serving now.
    pub fn encoder_names(&self) -> Vec<String> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Ready(Served::Encoder(_))))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The serving version of `name`, of either kind.
    pub fn served(&self, name: &str) -> Result<Served, RepositoryError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        match models.get(name) {
            Some(Slot::Ready(m)) => Ok(m.clone()),
            Some(Slot::Failed(reason)) => Err(RepositoryError::NotReady {
                name: name.into(),
                reason: reason.clone(),
            }),
            Some(Slot::Unloaded) => Err(RepositoryError::NotReady {
                name: name.into(),
                reason: "unloaded".into(),
            }),
            None => Err(RepositoryError::NotFound(name.into())),
        }
    }

    /// Every model's state.
    pub fn statuses(&self) -> Vec<ModelStatus> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .iter()
            .map(|(name, slot)| {
                let (state, version, reason) = match slot {
                    Slot::Ready(m) => match m.health() {
                        Health::Serving => (ModelState::Ready, Some(m.version()), None),
                        health => (ModelState::Unavailable, Some(m.version()), Some(health_reason(health))),
                    },
                    Slot::Failed(r) => (ModelState::Unavailable, None, Some(r.clone())),
                    Slot::Unloaded => (ModelState::Unloaded, None, None),
                };
                ModelStatus {
                    name: name.clone(),
                    state,
                    version,
                    reason,
                }
            })
            .collect()
    }

    /// Whether every model that is not deliberately unloaded can serve: loaded, and its worker
    /// neither stopped nor failing step after step.
    pub fn all_ready(&self) -> bool {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        !models.is_empty()
            && models.values().all(|s| match s {
                Slot::Ready(m) => m.health() == Health::Serving,
                Slot::Failed(_) => false,
                Slot::Unloaded => true,
            })
    }

    /// Loads (or reloads) the model in folder `name` and swaps it in. Blocking: call it off the
    /// async runtime. It waits for a promotion or rollback of the model to finish, so it never
    /// picks a version folder that is being moved.
    pub fn load(&self, name: &str) -> Result<Served, RepositoryError> {
        let _guard = self.versions_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.load_version(name, None)
    }

    /// Loads `version` of `name` (or the version [`Repository::load`] would choose) beside the
    /// serving one and swaps it in; a failure keeps the serving version.
    pub fn load_version(&self, name: &str, version: Option<u32>) -> Result<Served, RepositoryError> {
        check_model_name(name)?;
        let dir = self.model_dir(name);
        if !dir.join("model.toml").is_file() || self.single.as_ref().is_some_and(|single| single != name) {
            return Err(RepositoryError::NotFound(name.into()));
        }
        match self.open_version(name, &dir, version) {
            Ok(model) => {
                self.metrics.set_model_version(name, Some(model.version()));
                tracing::info!(model = %name, version = model.version(), "model ready");
                self.set(name, Slot::Ready(model.clone()));
                Ok(model)
            }
            Err(e) => {
                // A failed reload keeps the version that is serving.
                let serving = matches!(
                    self.models.read().unwrap_or_else(|p| p.into_inner()).get(name),
                    Some(Slot::Ready(_))
                );
                if !serving {
                    self.set(name, Slot::Failed(e.to_string()));
                }
                Err(e)
            }
        }
    }

    /// The folder of model `name`.
    pub fn model_dir(&self, name: &str) -> PathBuf {
        match &self.single {
            Some(_) => self.root.clone(),
            None => self.root.join(name),
        }
    }

    /// Moves the finished version folder `staged` (inside the model's folder) into place as
    /// the next version number, serves it, and records it as the serving version. The rename
    /// is atomic: a crash leaves either no new version or a whole one.
    pub fn promote(&self, name: &str, staged: &Path) -> Result<Served, RepositoryError> {
        let _guard = self.versions_lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.model_dir(name);
        let next = settings::versions(&dir)?.last().map_or(1, |v| v + 1);
        let target = dir.join(next.to_string());
        // Every file on disk before the version appears, and the rename itself after.
        durable::sync_tree(staged)
            .and_then(|()| std::fs::rename(staged, &target))
            .and_then(|()| durable::sync_dir(&dir))
            .map_err(|e| RepositoryError::Invalid(format!("moving {} into place: {e}", staged.display())))?;
        let model = match self.load_version(name, Some(next)) {
            Ok(model) => model,
            Err(e) => {
                // Out of the way again, so a restart does not pick a version that cannot load.
                if let Err(back) = std::fs::rename(&target, staged) {
                    tracing::error!(path = %target.display(), error = %back, "could not move a failed version back");
                }
                return Err(e);
            }
        };
        settings::write_serving_version(&dir, next)?;
        Ok(model)
    }

    /// Serves the version before the serving one again and records that choice.
    pub fn rollback(&self, name: &str) -> Result<(u32, Served), RepositoryError> {
        let _guard = self.versions_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.served(name)?.version();
        let dir = self.model_dir(name);
        let previous = settings::versions(&dir)?
            .into_iter()
            .rfind(|&v| v < current)
            .ok_or_else(|| RepositoryError::Conflict(format!("model `{name}` has no version before {current}")))?;
        let model = self.load_version(name, Some(previous))?;
        settings::write_serving_version(&dir, previous)?;
        Ok((current, model))
    }

    /// Stops serving `name`; in-flight requests finish on the version they hold.
    pub fn unload(&self, name: &str) -> Result<(), RepositoryError> {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        match models.get_mut(name) {
            Some(slot) => {
                *slot = Slot::Unloaded;
                self.metrics.set_model_version(name, None);
                Ok(())
            }
            None => Err(RepositoryError::NotFound(name.into())),
        }
    }

    fn set(&self, name: &str, slot: Slot) {
        self.models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), slot);
    }

    fn open_version(&self, name: &str, dir: &Path, requested: Option<u32>) -> Result<Served, RepositoryError> {
        let settings = ModelSettings::read(dir)?;
        if let Some(declared) = &settings.name
            && declared != name
        {
            return Err(RepositoryError::Invalid(format!(
                "{}: name {declared:?} differs from its folder {name:?}",
                dir.join("model.toml").display()
            )));
        }
        let available = settings::versions(dir)?;
        // An explicit request or the pin in model.toml is served or fails as it is.
        if let Some(v) = requested.or(settings.version) {
            if !available.contains(&v) {
                return Err(RepositoryError::Invalid(format!("version {v} has no folder {v}/")));
            }
            return self.open_exact(name, dir, &settings, v);
        }
        // Else the version a refresh or rollback last chose, else the newest; if it cannot
        // load, the versions before it, newest first, so the model still serves.
        let preferred = settings::serving_version(dir)
            .filter(|v| available.contains(v))
            .or(available.last().copied())
            .ok_or_else(|| RepositoryError::Invalid(format!("{}: no version folder (1/, 2/, ...)", dir.display())))?;
        let mut first_error = None;
        for &version in available.iter().rev().filter(|&&v| v <= preferred) {
            match self.open_exact(name, dir, &settings, version) {
                Ok(model) => {
                    if let Some(e) = &first_error {
                        tracing::warn!(model = %name, version, "serving an older version: the preferred one failed to load: {e}");
                    }
                    return Ok(model);
                }
                Err(e) => {
                    tracing::error!(model = %name, version, error = %e, "version failed to load");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| RepositoryError::Invalid(format!("{}: no version to load", dir.display()))))
    }

    /// Opens `version` of `name` as it is.
    fn open_exact(
        &self,
        name: &str,
        dir: &Path,
        settings: &ModelSettings,
        version: u32,
    ) -> Result<Served, RepositoryError> {
        let vdir = dir.join(version.to_string());
        let invalid = |what: String| RepositoryError::Invalid(format!("{name} version {version}: {what}"));
        let files = TokenizerFiles::open(&vdir).map_err(|e| invalid(e.to_string()))?;
        let tokenizer =
            Tokenizer::from_file(&files.tokenizer_json).map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
        let chat_template = ChatTemplate::from_files(&files).map_err(|e| invalid(e.to_string()))?;
        // Context length and EOS ids come from config.json; without one, from the tokenizer's
        // `model_max_length` and `eos_token`.
        let (context_length, eos_ids) = match std::fs::read_to_string(vdir.join("config.json")) {
            Ok(text) => match ModelConfig::from_json(&text).map_err(|e| invalid(e.to_string()))? {
                ModelConfig::Decoder(c) => (c.max_position_embeddings, c.eos_token_ids),
                ModelConfig::Encoder(c) => {
                    let limits = settings
                        .limits
                        .clone()
                        .or(&self.defaults)
                        .resolve(c.max_position_embeddings);
                    let metrics = self.metrics.for_model(name);
                    let encoder = encoder::open(name, version, &vdir, &c, &limits, metrics)?;
                    return Ok(Served::Encoder(Arc::new(encoder)));
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (files.model_max_length.unwrap_or(DEFAULT_CONTEXT_LENGTH), Vec::new())
            }
            Err(e) => return Err(invalid(format!("config.json: {e}"))),
        };
        let limits = settings.limits.clone().or(&self.defaults).resolve(context_length);
        let redaction = Arc::new(CapturePolicy::new(&settings.capture_redact).map_err(invalid)?);
        let capture = match settings.capture {
            true => Some(Arc::clone(&redaction)),
            false => None,
        };
        let (engine, context_length, form) = if limits.execution_provider.is_native() {
            let (engine, slot_tokens) = engines::open_native(name, version, &vdir, &limits).map_err(invalid)?;
            (DecoderEngine::Native(engine), slot_tokens, Form::default())
        } else {
            let (session, form) = engines::open_onnx(name, version, &vdir, &limits, context_length).map_err(invalid)?;
            (DecoderEngine::Onnx(session), context_length, form)
        };
        let tokenizer = Arc::new(tokenizer);
        let stops = stop_token_ids(&tokenizer, &eos_ids, files.eos_token.as_deref());
        let scheduler = Scheduler::spawn(
            name,
            engine,
            Arc::clone(&tokenizer),
            limits.batch,
            limits.admission,
            self.metrics.for_model(name),
        )
        .map_err(|e| invalid(format!("starting the worker: {e}")))?;
        Ok(Served::Decoder(Arc::new(ModelVersion {
            name: name.to_string(),
            version,
            dir: vdir,
            token_trie: Arc::new(TokenTrie::new(&tokenizer)),
            tokenizer,
            chat_template,
            stop_token_ids: stops,
            context_length,
            max_tokens: limits.max_tokens,
            scheduler,
            capture,
            redaction,
            form,
        })))
    }
}

/// The models of the repository at `root`, each as (the name it is served as, its folder): see
/// [`Repository::open`].
pub fn models_in(root: &Path) -> Result<Vec<(String, PathBuf)>, RepositoryError> {
    Ok(match single_model(root)? {
        Some(name) => vec![(name, root.to_path_buf())],
        None => folder_names(root)?
            .into_iter()
            .map(|name| (name.clone(), root.join(name)))
            .collect(),
    })
}

/// The model `root` is when it holds a `model.toml` itself (named by its `name`, else by the
/// folder); none when it is a repository of model folders.
fn single_model(root: &Path) -> Result<Option<String>, RepositoryError> {
    if !root.join("model.toml").is_file() {
        return Ok(None);
    }
    let declared = ModelSettings::read(root)?.name;
    let folder = root.file_name().and_then(|n| n.to_str()).map(str::to_string);
    let name = declared.or(folder).unwrap_or_else(|| "model".into());
    check_model_name(&name)?;
    Ok(Some(name))
}

/// The sub-folders of `root` holding a `model.toml`, by name; those whose name cannot be a
/// model's are skipped with a warning.
fn folder_names(root: &Path) -> Result<Vec<String>, RepositoryError> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| RepositoryError::Invalid(format!("model repository {}: {e}", root.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("model.toml").is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| match check_model_name(name) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("skipping a model folder: {e}");
                false
            }
        })
        .collect();
    names.sort();
    Ok(names)
}
