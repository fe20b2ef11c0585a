//! Prompt rendering: the student's own chat template (Jinja, as `transformers` renders it) and
//! the token ids that end a turn.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::checkpoint::TokenizerFiles;

/// One chat message as templates see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Instructions one rendering may run.
pub const TEMPLATE_FUEL: u64 = 1_000_000;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Why a chat prompt could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl ChatTemplate {
    /// Compiles `source` with the helpers Hugging Face templates use (`raise_exception`, Python
    /// string methods).
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // A template that loops without end (or nearly) fails instead of holding a validation
        // worker: real chat templates spend a few thousand instructions on a long chat.
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| TemplateError(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// Builds the template of a checkpoint's tokenizer files, if it has one.
    pub fn from_files(files: &TokenizerFiles) -> Result<Option<Self>, TemplateError> {
        match &files.chat_template {
            Some(source) => Self::new(source.clone(), files.bos_token.clone(), files.eos_token.clone()).map(Some),
            None => Ok(None),
        }
    }

    /// Renders `messages` followed by the assistant's opening, ready to generate.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TemplateError(e.to_string()))
    }
}

/// The ids that end generation: the configured EOS ids plus the tokenizer's `eos_token`.
pub fn stop_token_ids(tokenizer: &Tokenizer, configured: &[u32], eos_token: Option<&str>) -> Vec<u32> {
    let mut ids = configured.to_vec();
    if let Some(id) = eos_token.and_then(|t| tokenizer.token_to_id(t))
        && !ids.contains(&id)
    {
        ids.push(id);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(crate::tiny::CHAT_TEMPLATE.to_string(), None, Some("<|im_end|>".into())).unwrap();
        let out = t
            .render(&[ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }])
            .unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn template_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}".into(), None, None).unwrap();
        let err = t.render(&[]).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
        assert!(ChatTemplate::new("{% for %}".into(), None, None).is_err());
        let endless = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let err = ChatTemplate::new(endless.into(), None, None)
            .unwrap()
            .render(&[])
            .unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}".into(), None, None).unwrap();
        let out = t
            .render(&[ChatMessage {
                role: "user".into(),
                content: "  ok ".into(),
            }])
            .unwrap();
        assert_eq!(out, "OK");
    }
}
