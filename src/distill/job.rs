//! What a refresh job asks for, and how its prompts become training and held-out examples.

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::eval::{EvalExample, GateSpec};
use super::store::{Prompt, TeacherOutput};
use super::teacher::TeacherSpec;
use super::trainer::{Example, TrainConfig};
use super::whitebox::WhiteBoxSpec;
use crate::export::Int8Format;
use crate::tokenize::{ChatMessage, ChatTemplate};

/// One prompt given inline in a job or an uploaded JSONL line: a raw `prompt` or chat
/// `messages`, with an optional expected answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl PromptInput {
    /// The prompt as chat messages (a raw prompt is one user message).
    pub fn into_messages(self) -> Result<(Vec<ChatMessage>, Option<String>), String> {
        let messages = match (self.prompt, self.messages) {
            (Some(p), None) if !p.is_empty() => vec![ChatMessage {
                role: "user".into(),
                content: p,
            }],
            (None, Some(m)) if !m.is_empty() => m,
            _ => return Err("each prompt needs exactly one of a non-empty `prompt` or `messages`".into()),
        };
        Ok((messages, self.label))
    }
}

/// A prompt's messages and its label, if any.
pub type LabelledPrompt = (Vec<ChatMessage>, Option<String>);

/// The prompts of a JSONL dataset upload, one `PromptInput` per non-blank line; the error
/// names the line.
pub fn parse_prompts_jsonl(text: &str) -> Result<Vec<LabelledPrompt>, String> {
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let input: PromptInput = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        prompts.push(input.into_messages().map_err(|e| format!("line {}: {e}", n + 1))?);
    }
    if prompts.is_empty() {
        return Err("the body has no prompts (one JSON object per line)".into());
    }
    Ok(prompts)
}

/// The body of `POST /admin/v1/models/{name}/refresh`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSpec {
    /// Dataset of the store to learn from (uploaded, or `capture/<model>`).
    pub dataset: String,
    /// Prompts to add to the dataset first.
    #[serde(default)]
    pub prompts: Vec<PromptInput>,
    pub teacher: TeacherSpec,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub gate: GateSpec,
    /// Share of prompts held out for evaluation (chosen by prompt id, so stable across jobs).
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Use at most this many prompts (oldest first).
    #[serde(default)]
    pub max_prompts: Option<usize>,
    /// White-box distillation from a local teacher checkpoint, beside `teacher`'s outputs.
    #[serde(default)]
    pub white_box: Option<WhiteBoxSpec>,
    /// The forgetting guard: a labelled dataset the candidate must keep answering.
    #[serde(default)]
    pub regression: Option<RegressionSpec>,
    /// Dataset the job's prompts are compared with for drift (`capture/<model>`, the served
    /// traffic, when not given; skipped when that holds nothing).
    #[serde(default)]
    pub drift_reference: Option<String>,
    /// Terminology whose mentions the coverage axis counts.
    #[serde(default)]
    pub terminology: Option<String>,
    /// Tokens generated per held-out prompt for exact match, coverage and speed.
    #[serde(default = "default_eval_tokens")]
    pub eval_max_new_tokens: usize,
    /// INT8 form of the exported candidate.
    #[serde(default)]
    pub int8_format: Int8Format,
}

/// What a candidate must not forget: the labelled prompts of `dataset`, or without one the
/// dataset of the model's last succeeded job. Its held-out split (the same hash as every
/// split, at that job's `eval_fraction` for the last job's) is scored by exact match for both
/// versions; the rest may be replayed into training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegressionSpec {
    #[serde(default)]
    pub dataset: Option<String>,
    /// The candidate's exact match there may be at most this much below the current one's.
    #[serde(default = "default_max_drop")]
    pub max_exact_match_drop: f64,
    /// Share of the training examples drawn from the dataset's other prompts (with their
    /// labels as answers); 0 replays nothing.
    #[serde(default)]
    pub replay: f64,
}

fn default_max_drop() -> f64 {
    0.02
}

fn default_eval_fraction() -> f64 {
    0.2
}
fn default_eval_tokens() -> usize {
    16
}

impl RefreshSpec {
    /// Checks everything that can be checked before the job starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.dataset.trim().is_empty() {
            return Err("dataset must not be empty".into());
        }
        if !(self.eval_fraction > 0.0 && self.eval_fraction < 1.0) {
            return Err("eval_fraction must be between 0 and 1".into());
        }
        let t = &self.train;
        if t.steps == 0 || t.batch_size == 0 || t.threads == 0 {
            return Err("train.steps, train.batch_size and train.threads must be positive".into());
        }
        if !(0.0..=1.0).contains(&t.alpha) || t.tau_start <= 0.0 || t.tau_end <= 0.0 || t.learning_rate <= 0.0 {
            return Err("train.alpha must be in 0..=1; tau_start, tau_end and learning_rate positive".into());
        }
        if let Some(w) = &self.white_box
            && !(w.hidden_weight >= 0.0
                && w.attention_weight >= 0.0
                && w.layers > 0
                && w.layer_map.as_ref().is_none_or(|m| !m.is_empty()))
        {
            return Err(
                "white_box weights must be >= 0, white_box.layers positive and white_box.layer_map (if any) not empty"
                    .into(),
            );
        }
        if let Some(r) = &self.regression
            && (r.dataset.as_deref().is_some_and(|d| d.trim().is_empty())
                || !(0.0..1.0).contains(&r.replay)
                || r.max_exact_match_drop < 0.0)
        {
            return Err(
                "regression needs a non-empty dataset (or none), replay in 0..1 and max_exact_match_drop >= 0".into(),
            );
        }
        self.teacher.validate().map_err(|e| e.to_string())
    }
}

/// Whether prompt `id` is held out: a hash of the id against the fraction, so a prompt stays on
/// its side of the split in every job.
pub fn is_held_out(id: i64, fraction: f64) -> bool {
    // SplitMix64 finaliser: consecutive ids land far apart.
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z as f64 / u64::MAX as f64) < fraction
}

/// How the student reads prompts and answers.
pub struct StudentText<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    /// Appended to a completion the teacher ended itself.
    pub eos: Option<u32>,
    /// Longest prompt + completion kept.
    pub max_len: usize,
}

impl StudentText<'_> {
    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Prompt tokens, rendered as the server renders chat requests.
    pub fn prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        match self.template {
            Some(t) => self.encode(&t.render(messages).map_err(|e| e.to_string())?, false),
            None => {
                let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                self.encode(&text.join("\n"), true)
            }
        }
    }

    /// Completion tokens and their top-k: the teacher's own tokens in token-level KD, else its
    /// text (reasoning first, R1 style) tokenised by the student.
    #[allow(clippy::type_complexity)]
    pub fn completion(&self, out: &TeacherOutput) -> Result<(Vec<u32>, Option<Vec<Vec<(u32, f32)>>>), String> {
        if let (Some(ids), Some(top)) = (&out.token_ids, &out.top_logprobs) {
            let (mut ids, mut top) = (ids.clone(), top.clone());
            // Servers leave the stop token out of the answer; the student must still learn to
            // stop, so it is learned as the teacher's certain choice.
            if out.stopped
                && let Some(eos) = self.eos
            {
                ids.push(eos);
                top.push(vec![(eos, 0.0)]);
            }
            return Ok((ids, Some(top)));
        }
        let text = match &out.reasoning {
            Some(r) => format!("<think>\n{r}\n</think>\n\n{}", out.content),
            None => out.content.clone(),
        };
        let mut ids = self.encode(&text, false)?;
        if out.stopped
            && let Some(eos) = self.eos
        {
            ids.push(eos);
        }
        Ok((ids, None))
    }

    /// The training example of a prompt and its teacher output, cut to `max_len` tokens.
    pub fn example(&self, prompt: &Prompt, out: &TeacherOutput) -> Result<Option<Example>, String> {
        let mut tokens = self.prompt(&prompt.messages)?;
        let completion_start = tokens.len();
        if completion_start + 1 >= self.max_len {
            return Ok(None);
        }
        let (mut completion, mut top) = self.completion(out)?;
        let room = self.max_len - completion_start;
        completion.truncate(room);
        if let Some(t) = &mut top {
            t.truncate(room);
        }
        if completion.is_empty() {
            return Ok(None);
        }
        tokens.extend(completion);
        Ok(Some(Example {
            tokens,
            completion_start,
            top,
        }))
    }

    /// The held-out example of a prompt and its teacher output.
    pub fn eval_example(&self, prompt: &Prompt, out: &TeacherOutput) -> Result<Option<EvalExample>, String> {
        Ok(self.example(prompt, out)?.map(|e| EvalExample {
            prompt: e.tokens[..e.completion_start].to_vec(),
            completion: e.tokens[e.completion_start..].to_vec(),
            top: e.top,
            label: prompt.label.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_stable_and_near_the_fraction() {
        let held: Vec<i64> = (1..=1000).filter(|&id| is_held_out(id, 0.2)).collect();
        assert!((150..=250).contains(&held.len()), "{}", held.len());
        assert_eq!(held, (1..=1000).filter(|&id| is_held_out(id, 0.2)).collect::<Vec<_>>());
        assert!((1..=1000).all(|id| !is_held_out(id, 0.0)));
    }

    #[test]
    fn specs_parse_with_defaults_and_are_validated() {
        let spec: RefreshSpec = serde_json::from_value(serde_json::json!({
            "dataset": "d",
            "teacher": {"url": "http://127.0.0.1:1/v1", "model": "t"},
            "train": {"steps": 5}
        }))
        .unwrap();
        assert_eq!(
            (spec.train.steps, spec.train.batch_size, spec.eval_fraction),
            (5, 8, 0.2)
        );
        spec.validate().unwrap();
        let bad = RefreshSpec {
            eval_fraction: 1.0,
            ..spec.clone()
        };
        assert!(bad.validate().unwrap_err().contains("eval_fraction"));
        let typo = serde_json::from_value::<RefreshSpec>(serde_json::json!({
            "dataset": "d", "teacher": {"url": "http://x", "model": "t"}, "trian": {}
        }));
        assert!(typo.unwrap_err().to_string().contains("trian"));
    }

    #[test]
    fn prompt_inputs_need_one_form() {
        let p = PromptInput {
            prompt: Some("hi".into()),
            messages: None,
            label: Some("x".into()),
        };
        let (m, label) = p.into_messages().unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[0].content.as_str(), label.as_deref()),
            ("user", "hi", Some("x"))
        );
        let neither = PromptInput {
            prompt: None,
            messages: None,
            label: None,
        };
        assert!(neither.into_messages().is_err());
    }
}
