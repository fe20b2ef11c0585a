//! Capturing prompts from live traffic for later refreshes: off unless a model's `model.toml`
//! says `capture = true`; its `capture_redact` patterns are replaced before anything is
//! stored.

use regex::Regex;

use crate::tokenize::ChatMessage;

/// Text that replaces each redacted match.
pub const REDACTED: &str = "[REDACTED]";

/// The dataset a model's captured prompts go to.
pub fn dataset_name(model: &str) -> String {
    format!("{DATASET_PREFIX}{model}")
}

/// Prefix of every capture dataset's name.
pub const DATASET_PREFIX: &str = "capture/";

/// How a model's prompts are redacted where they are kept: captured for refresh jobs, or
/// logged with `--log-prompts`.
#[derive(Debug)]
pub struct CapturePolicy {
    redact: Vec<Regex>,
}

impl CapturePolicy {
    /// Compiles the redaction patterns (Rust `regex` syntax).
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let redact = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| format!("capture_redact pattern {p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { redact })
    }

    /// `messages` with every match of every pattern replaced by [`REDACTED`].
    pub fn redact(&self, messages: &[ChatMessage]) -> Vec<ChatMessage> {
        messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: self.redact_text(&m.content),
            })
            .collect()
    }

    /// `text` with every match of every pattern replaced by [`REDACTED`].
    pub fn redact_text(&self, text: &str) -> String {
        self.redact.iter().fold(text.to_string(), |text, re| {
            re.replace_all(&text, REDACTED).into_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_is_redacted_and_bad_patterns_are_named() {
        let policy = CapturePolicy::new(&[r"\b\d{3}-\d{2}-\d{4}\b".into(), r"(?i)mrn:\s*\d+".into()]).unwrap();
        let m = vec![ChatMessage {
            role: "user".into(),
            content: "SSN 123-45-6789, MRN: 998877, pain".into(),
        }];
        assert_eq!(policy.redact(&m)[0].content, "SSN [REDACTED], [REDACTED], pain");
        let err = CapturePolicy::new(&["(".into()]).unwrap_err();
        assert!(err.contains("\"(\""), "{err}");
    }
}
