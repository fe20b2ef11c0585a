//! Supervised fine-tuning on labelled prompts (`distill-serve train`): cross-entropy on each
//! label followed by the end-of-turn token. The recipes use it to train a teacher from a
//! dataset's answers before distilling students from it.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, anyhow, bail};
use tokenizers::Tokenizer;

use super::job::{PromptInput, StudentText};
use super::model::TrainableDecoder;
use super::store::{Prompt, TeacherOutput};
use super::trainer::{StepReport, TrainConfig, train};
use crate::checkpoint::{ModelConfig, TokenizerFiles};
use crate::tokenize::ChatTemplate;

/// Reads a JSONL file: prompts ([`PromptInput`]) or labelled texts, one a line (blank lines
/// skipped); an error names the line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), n + 1)))
        .collect()
}

/// Fine-tunes the checkpoint in `checkpoint` on the labelled `prompts` and writes the result,
/// with the configuration and tokenizer files, to `out`.
pub fn finetune(
    checkpoint: &Path,
    prompts: Vec<PromptInput>,
    config: &TrainConfig,
    out: &Path,
    progress: impl FnMut(&StepReport) + Send,
) -> Result<()> {
    let files = TokenizerFiles::open(checkpoint)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_json).map_err(|e| anyhow!("tokenizer.json: {e}"))?;
    let template = ChatTemplate::from_files(&files)?;
    let text = std::fs::read_to_string(checkpoint.join("config.json"))?;
    let ModelConfig::Decoder(c) = ModelConfig::from_json(&text)? else {
        bail!("{}: only decoders can be fine-tuned", checkpoint.display())
    };
    let student = StudentText {
        tokenizer: &tokenizer,
        template: template.as_ref(),
        // The first EOS id ends a turn (`<|im_end|>` in ChatML students), as in refresh jobs.
        eos: c.eos_token_ids.first().copied(),
        max_len: c.max_position_embeddings,
    };
    let mut examples = Vec::with_capacity(prompts.len());
    for (n, p) in prompts.into_iter().enumerate() {
        let (messages, label) = p.into_messages().map_err(|e| anyhow!("prompt {}: {e}", n + 1))?;
        let label = label.with_context(|| format!("prompt {} has no label to learn", n + 1))?;
        let answer = TeacherOutput {
            content: label,
            reasoning: None,
            stopped: true,
            token_ids: None,
            top_logprobs: None,
        };
        let prompt = Prompt {
            id: n as i64,
            messages,
            label: None,
        };
        examples.extend(student.example(&prompt, &answer).map_err(|e| anyhow!(e))?);
    }
    let mut model = TrainableDecoder::load(checkpoint)?;
    train(&mut model, &examples, config, &AtomicBool::new(false), None, progress)?;
    copy_beside_weights(checkpoint, &files, out)?;
    model.save(out)
}

/// Creates `out` and copies the checkpoint's `config.json` and tokenizer `files` into it: a
/// trained checkpoint is those and its new weights.
pub(super) fn copy_beside_weights(checkpoint: &Path, files: &TokenizerFiles, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for f in std::iter::once(checkpoint.join("config.json").as_path()).chain(files.files()) {
        let name = f.file_name().context("file without a name")?;
        std::fs::copy(f, out.join(name)).with_context(|| format!("copying {}", f.display()))?;
    }
    Ok(())
}
