//! The checks of a refresh job beyond its gate: how far its prompts drift from the served
//! traffic and how often its teacher is right, both before training; and the forgetting
//! guard's replay and scored examples from a regression dataset.

use anyhow::{Result, anyhow, bail};
use serde_json::json;

use super::drift::drift;
use super::eval::EvalExample;
use super::job::{RefreshSpec, StudentText, is_held_out};
use super::service::Progress;
use super::store::{JobState, Prompt, Store, TeacherOutput};
use super::trainer::Example;

/// The forgetting guard's examples.
pub(super) struct Regression {
    /// The dataset guarded.
    pub dataset: String,
    /// From its training side (labels as answers), as many as make up `replay` of the
    /// training set.
    pub replay: Vec<Example>,
    /// Its labelled held-out prompts, to score both versions on.
    pub scored: Vec<EvalExample>,
}

/// The forgetting guard's examples, where the job has one, from the dataset it names or else
/// from the held-out split of `model`'s last succeeded job.
pub(super) fn regression_examples(
    store: &Store,
    model: &str,
    spec: &RefreshSpec,
    text: &StudentText,
    train_len: usize,
) -> Result<Option<Regression>> {
    let Some(r) = &spec.regression else {
        return Ok(None);
    };
    let (dataset, eval_fraction) = match &r.dataset {
        Some(d) => (d.clone(), spec.eval_fraction),
        None => last_succeeded_split(store, model)?,
    };
    let (mut pool, mut scored) = (Vec::new(), Vec::new());
    for prompt in store.prompts(&dataset)? {
        let Some(label) = &prompt.label else {
            continue;
        };
        let answer = TeacherOutput {
            content: label.clone(),
            reasoning: None,
            stopped: true,
            token_ids: None,
            top_logprobs: None,
        };
        if is_held_out(prompt.id, eval_fraction) {
            scored.extend(text.eval_example(&prompt, &answer).map_err(|e| anyhow!(e))?);
        } else {
            pool.extend(text.example(&prompt, &answer).map_err(|e| anyhow!(e))?);
        }
    }
    if scored.is_empty() {
        bail!("regression dataset `{dataset}` has no labelled held-out prompts to score");
    }
    let wanted = (r.replay / (1.0 - r.replay) * train_len as f64).round() as usize;
    let replay = pool
        .iter()
        .cycle()
        .take(if pool.is_empty() { 0 } else { wanted })
        .cloned()
        .collect();
    Ok(Some(Regression {
        dataset,
        replay,
        scored,
    }))
}

/// The dataset and held-out fraction of `model`'s newest succeeded job.
fn last_succeeded_split(store: &Store, model: &str) -> Result<(String, f64)> {
    let last = store
        .jobs(LOOKED_BACK_JOBS)?
        .into_iter()
        .find(|j| j.model == model && j.state == JobState::Succeeded);
    let spec = last
        .map(|j| serde_json::from_value::<RefreshSpec>(j.spec))
        .transpose()?;
    match spec {
        Some(s) => Ok((s.dataset, s.eval_fraction)),
        None => {
            bail!("regression names no dataset and `{model}` has no succeeded job whose held-out split it could guard")
        }
    }
}

/// How many of the newest jobs are searched for a model's last succeeded one.
const LOOKED_BACK_JOBS: usize = 10_000;

/// Measures how far the job's prompts drift from the reference traffic and reports it;
/// the failure when the gate's `max_drift_kl` is exceeded. Without reference prompts there
/// is nothing to compare, which only a gate that asks for the check makes an error.
pub(super) fn check_drift(
    store: &Store,
    p: &mut Progress,
    model: &str,
    tokenizer: &tokenizers::Tokenizer,
    spec: &RefreshSpec,
    prompts: &[Prompt],
) -> Result<Option<String>> {
    let reference_name = spec
        .drift_reference
        .clone()
        .unwrap_or_else(|| format!("capture/{model}"));
    let reference = store.prompts(&reference_name)?;
    if reference.is_empty() {
        if spec.gate.max_drift_kl.is_some() {
            bail!("gate.max_drift_kl compares with dataset `{reference_name}`, which holds no prompts");
        }
        return Ok(None);
    }
    let d = drift(tokenizer, prompts, &reference);
    let mut report = json!(d);
    report["reference"] = json!(reference_name);
    p.set("drift", report);
    Ok(spec
        .gate
        .max_drift_kl
        .filter(|&max| d.unigram_kl > max)
        .map(|max| format!("drift: unigram KL {:.3} from `{reference_name}` > {max}", d.unigram_kl)))
}

/// The teacher's accuracy on the labelled held-out prompts (its answer equal to the label,
/// trimmed), reported; the failure when it is below the gate's `min_teacher_accuracy`, which
/// needs labelled held-out prompts to judge by.
pub(super) fn check_teacher(
    p: &mut Progress,
    spec: &RefreshSpec,
    prompts: &[Prompt],
    outputs: &[TeacherOutput],
) -> Result<Option<String>> {
    let (mut labelled, mut correct) = (0usize, 0usize);
    for (prompt, out) in prompts.iter().zip(outputs) {
        if let (Some(label), true) = (&prompt.label, is_held_out(prompt.id, spec.eval_fraction)) {
            labelled += 1;
            correct += usize::from(out.content.trim() == label.trim());
        }
    }
    if labelled == 0 {
        if spec.gate.min_teacher_accuracy.is_some() {
            bail!(
                "gate.min_teacher_accuracy needs labelled held-out prompts; dataset `{}` has none",
                spec.dataset
            );
        }
        return Ok(None);
    }
    let accuracy = correct as f64 / labelled as f64;
    p.set(
        "teacher_accuracy",
        json!({"labelled": labelled, "correct": correct, "accuracy": accuracy}),
    );
    Ok(spec
        .gate
        .min_teacher_accuracy
        .filter(|&min| accuracy < min)
        .map(|min| format!("teacher accuracy {accuracy:.3} on {labelled} labelled held-out prompts < {min}")))
}
