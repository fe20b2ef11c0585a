//! `model.toml`: the per-model settings of the model repository. Every field is optional; a
//! file with only `name = "..."` serves the newest version with defaults.

use std::path::Path;

use serde::Deserialize;

use super::RepositoryError;
use super::limits::ModelLimits;

/// The contents of `model.toml`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Name clients use; the folder name when absent.
    pub name: Option<String>,
    /// Serve this version instead of the newest.
    pub version: Option<u32>,
    /// Limits of this model, and its execution provider (the server's for those absent).
    #[serde(flatten)]
    pub limits: ModelLimits,
    /// Store this model's prompts in the dataset `capture/<name>` for refresh jobs.
    #[serde(default)]
    pub capture: bool,
    /// Patterns (Rust regex) replaced by `[REDACTED]` before a captured prompt is stored.
    #[serde(default)]
    pub capture_redact: Vec<String>,
}

impl ModelSettings {
    /// Reads `model.toml` in `dir`.
    pub fn read(dir: &Path) -> Result<Self, RepositoryError> {
        let path = dir.join("model.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| RepositoryError::Invalid(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| RepositoryError::Invalid(format!("{}: {e}", path.display())))
    }
}

/// The numbered version folders of a model, ascending.
pub fn versions(dir: &Path) -> Result<Vec<u32>, RepositoryError> {
    let entries = std::fs::read_dir(dir).map_err(|e| RepositoryError::Invalid(format!("{}: {e}", dir.display())))?;
    let mut versions: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// File in a model's folder naming the version a refresh or rollback chose.
const SERVING_VERSION_FILE: &str = "serving_version";

/// The version recorded by the last refresh or rollback, if any.
pub fn serving_version(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(SERVING_VERSION_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Records `version` as the one to serve after a restart, atomically and durably.
pub fn write_serving_version(dir: &Path, version: u32) -> Result<(), RepositoryError> {
    let path = dir.join(SERVING_VERSION_FILE);
    super::durable::write_atomic(&path, format!("{version}\n").as_bytes())
        .map_err(|e| RepositoryError::Invalid(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ExecutionProvider;

    #[test]
    fn minimal_and_full_settings_parse() {
        let s: ModelSettings = toml::from_str("name = \"coder\"").unwrap();
        assert_eq!(s.name.as_deref(), Some("coder"));
        assert_eq!(s.limits.execution_provider, None);
        let s: ModelSettings = toml::from_str("version = 2\nexecution_provider = \"tensorrt\"\nmax_queue = 8").unwrap();
        assert_eq!(
            (s.version, s.limits.execution_provider, s.limits.max_queue),
            (Some(2), Some(ExecutionProvider::Tensorrt), Some(8))
        );
        let err = toml::from_str::<ModelSettings>("max_qeue = 8").unwrap_err().to_string();
        assert!(err.contains("max_qeue"), "{err}");
    }
}
