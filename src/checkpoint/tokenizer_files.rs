//! `tokenizer.json`, `tokenizer_config.json` and the chat template.
//!
//! `transformers` 4.x keeps the chat template inside `tokenizer_config.json` (a string, or a list
//! of named templates); 5.x writes it to `chat_template.jinja`. The file wins when both exist, as
//! in `transformers` itself.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::CheckpointError;

/// The tokenizer files of a checkpoint.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// Path of `tokenizer.json`.
    pub tokenizer_json: PathBuf,
    /// Path of `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<PathBuf>,
    /// Path of `chat_template.jinja`, when present.
    pub chat_template_file: Option<PathBuf>,
    /// The chat template, from whichever place holds it.
    pub chat_template: Option<String>,
    /// The end-of-sequence token text (`eos_token`), when configured.
    pub eos_token: Option<String>,
    /// The beginning-of-sequence token text (`bos_token`), when configured.
    pub bos_token: Option<String>,
    /// The padding token text (`pad_token`), when configured.
    pub pad_token: Option<String>,
    /// `model_max_length`, when it is a real limit (`transformers` writes 1e30 for "none").
    pub model_max_length: Option<usize>,
}

impl TokenizerFiles {
    /// Finds and reads the tokenizer files in `dir`; `tokenizer.json` is required.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(CheckpointError::Tokenizer {
                file: tokenizer_json,
                message: "missing (a Hugging Face fast tokenizer file is required)".into(),
            });
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let template_path = dir.join("chat_template.jinja");
        let (chat_template_file, file_template) = if template_path.is_file() {
            let text = std::fs::read_to_string(&template_path).map_err(|source| CheckpointError::Io {
                path: template_path.clone(),
                source,
            })?;
            (Some(template_path), Some(text))
        } else {
            (None, None)
        };
        let token = |key: &str| config.as_ref().and_then(|c| token_text(c.get(key)?));
        Ok(Self {
            chat_template: match file_template {
                Some(t) => Some(t),
                None => config.as_ref().and_then(|c| embedded_template(c.get("chat_template")?)),
            },
            eos_token: token("eos_token"),
            bos_token: token("bos_token"),
            pad_token: token("pad_token"),
            model_max_length: config
                .as_ref()
                .and_then(|c| c.get("model_max_length")?.as_u64())
                .filter(|&n| n > 0 && n < 1 << 24)
                .map(|n| n as usize),
            tokenizer_json,
            tokenizer_config: config.is_some().then_some(config_path),
            chat_template_file,
        })
    }

    /// The files to copy beside an exported model.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.tokenizer_json.as_path())
            .chain(self.tokenizer_config.as_deref())
            .chain(self.chat_template_file.as_deref())
    }
}

fn read_json(path: &Path) -> Result<Value, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Tokenizer {
        file: path.into(),
        message: format!("not valid JSON: {e}"),
    })
}

/// A special token is a string, or an `AddedToken` object with a `content` field.
fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A template string, or the one named `default` in a list of `{name, template}`.
fn embedded_template(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_file_wins_over_embedded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template":[{"name":"default","template":"OLD"}],"eos_token":{"content":"</s>"}}"#,
        )
        .unwrap();
        let files = TokenizerFiles::open(dir.path()).unwrap();
        assert_eq!(files.chat_template.as_deref(), Some("OLD"));
        assert_eq!(files.eos_token.as_deref(), Some("</s>"));
        std::fs::write(dir.path().join("chat_template.jinja"), "NEW").unwrap();
        let files = TokenizerFiles::open(dir.path()).unwrap();
        assert_eq!(files.chat_template.as_deref(), Some("NEW"));
        assert_eq!(files.files().count(), 3);
    }
}
