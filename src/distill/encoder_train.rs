//! Supervised training of encoder students (`distill-serve train` on a BERT or XLM-RoBERTa
//! checkpoint): a label (or several, for a multi-label model) per text, or entity spans in
//! character offsets that become the BIO tags of the tokens covering them; cross-entropy
//! (a binary one per label for multi-label). Held-out figures are what the README reports:
//! accuracy and macro-F1, micro-F1 over label decisions, or entity-level precision, recall and
//! F1 (exact span and type over the tag sequences, as seqeval counts them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{D, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::encoder_model::TrainableEncoder;
use super::finetune::copy_beside_weights;
use super::trainer::{TrainConfig, adamw, clip_gradients, learning_rate, next_batch, training_pool};
use crate::checkpoint::{EncoderConfig, EncoderHead, TokenizerFiles};

/// One labelled text (a JSONL line).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledText {
    pub text: String,
    /// The label of a single-label classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The labels of a multi-label classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// The entities of a token classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<EntitySpan>>,
}

/// An entity: characters `start..end` of the text, of type `label` (`ORG`, not `B-ORG`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub struct EntitySpan {
    pub start: usize,
    pub end: usize,
    pub label: String,
}

/// What one text teaches.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Class(u32),
    /// 0/1 per label.
    Classes(Vec<f32>),
    /// A label per token; `None` on special tokens, which teach nothing.
    Tags(Vec<Option<u32>>),
}

/// A text as token ids with its target.
#[derive(Debug, Clone)]
pub struct EncodedText {
    ids: Vec<u32>,
    target: Target,
}

/// Turns labelled texts into token ids and targets for a model of `config`, cut to its
/// longest input.
pub fn encode_all(tokenizer: &Tokenizer, config: &EncoderConfig, texts: &[LabelledText]) -> Result<Vec<EncodedText>> {
    let index: BTreeMap<&str, u32> = config
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u32))
        .collect();
    let label_id = |label: &str| {
        index
            .get(label)
            .copied()
            .ok_or_else(|| anyhow!("label {label:?} is not in the model's id2label"))
    };
    texts
        .iter()
        .enumerate()
        .map(|(n, t)| encode_one(tokenizer, config, t, &label_id).with_context(|| format!("text {}", n + 1)))
        .collect()
}

fn encode_one(
    tokenizer: &Tokenizer,
    config: &EncoderConfig,
    text: &LabelledText,
    label_id: &dyn Fn(&str) -> Result<u32>,
) -> Result<EncodedText> {
    let encoding = tokenizer
        .encode(text.text.as_str(), true)
        .map_err(|e| anyhow!("tokenizing: {e}"))?;
    let keep = encoding.len().min(config.max_tokens());
    let ids = encoding.get_ids()[..keep].to_vec();
    let target = match (
        config.head,
        config.multi_label,
        &text.label,
        &text.labels,
        &text.entities,
    ) {
        (EncoderHead::SequenceClassification, false, Some(label), None, None) => Target::Class(label_id(label)?),
        (EncoderHead::SequenceClassification, true, None, Some(labels), None) => {
            let mut hot = vec![0.0; config.labels.len()];
            for l in labels {
                hot[label_id(l)? as usize] = 1.0;
            }
            Target::Classes(hot)
        }
        (EncoderHead::TokenClassification, _, None, None, Some(entities)) => {
            let chars = char_offsets(&text.text);
            let special = encoding.get_special_tokens_mask();
            let mut tags = Vec::with_capacity(keep);
            let mut last_entity = None;
            for (i, &(start, end)) in encoding.get_offsets()[..keep].iter().enumerate() {
                if special[i] == 1 {
                    tags.push(None);
                    continue;
                }
                let start = first_visible(&text.text, chars[start], chars[end]);
                let inside = entities.iter().position(|e| e.start <= start && start < e.end);
                let tag = match inside {
                    Some(e) if last_entity == Some(e) => format!("I-{}", entities[e].label),
                    Some(e) => format!("B-{}", entities[e].label),
                    None => "O".to_string(),
                };
                last_entity = inside;
                tags.push(Some(label_id(&tag)?));
            }
            Target::Tags(tags)
        }
        (EncoderHead::Embeddings, ..) => bail!("an embedding model has no labels to train on"),
        (EncoderHead::SequenceClassification, false, ..) => bail!("a single-label classifier needs `label`"),
        (EncoderHead::SequenceClassification, true, ..) => bail!("a multi-label classifier needs `labels`"),
        (EncoderHead::TokenClassification, ..) => bail!("a token classifier needs `entities`"),
    };
    Ok(EncodedText { ids, target })
}

/// The character index of every byte offset of `text` (and of its end).
fn char_offsets(text: &str) -> Vec<usize> {
    let mut at = vec![0; text.len() + 1];
    let mut n = 0;
    for (b, c) in text.char_indices() {
        for slot in &mut at[b..b + c.len_utf8()] {
            *slot = n;
        }
        n += 1;
    }
    at[text.len()] = n;
    at
}

/// The first character of `start..end` that is not whitespace (a `▁` or `Ġ` piece's span
/// begins at the space it stands for).
fn first_visible(text: &str, start: usize, end: usize) -> usize {
    let skipped = text
        .chars()
        .skip(start)
        .take(end - start)
        .take_while(|c| c.is_whitespace())
        .count();
    (start + skipped).min(end.saturating_sub(1).max(start))
}

/// A padded batch: ids `[batch, seq]` and each row's length.
fn pad(batch: &[&EncodedText], pad_id: u32) -> Result<(Tensor, Vec<usize>)> {
    let seq = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(batch.len() * seq);
    for e in batch {
        ids.extend(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, seq - e.ids.len()));
    }
    let lengths = batch.iter().map(|e| e.ids.len()).collect();
    Ok((Tensor::from_vec(ids, (batch.len(), seq), &Device::Cpu)?, lengths))
}

/// The mean loss of `batch`.
fn batch_loss(model: &TrainableEncoder, batch: &[&EncodedText]) -> Result<Tensor> {
    let (ids, lengths) = pad(batch, model.config().pad_token_id)?;
    let out = model.forward(&ids, &lengths)?;
    let dev = Device::Cpu;
    match &batch[0].target {
        Target::Class(_) => {
            let targets: Vec<u32> = batch.iter().map(|e| class_of(&e.target)).collect::<Result<_>>()?;
            Ok(candle_nn::loss::cross_entropy(&out, &Tensor::new(targets, &dev)?)?)
        }
        Target::Classes(_) => {
            let mut hot: Vec<f32> = Vec::new();
            for e in batch {
                let Target::Classes(h) = &e.target else {
                    bail!("a batch mixes kinds of targets")
                };
                hot.extend(h);
            }
            let y = Tensor::from_vec(hot, out.dims(), &dev)?;
            // log(1 + exp(-|x|)) + max(x, 0) - x y: binary cross-entropy on logits, stable.
            let softplus = (out.abs()?.neg()?.exp()? + 1.0)?.log()?;
            let loss = ((softplus + out.relu()?)? - (&out * &y)?)?;
            Ok(loss.mean_all()?)
        }
        Target::Tags(_) => {
            let seq = ids.dim(1)?;
            let (mut rows, mut targets) = (Vec::new(), Vec::new());
            for (b, e) in batch.iter().enumerate() {
                let Target::Tags(tags) = &e.target else {
                    bail!("a batch mixes kinds of targets")
                };
                for (i, tag) in tags.iter().enumerate() {
                    if let Some(t) = tag {
                        rows.push((b * seq + i) as u32);
                        targets.push(*t);
                    }
                }
            }
            if rows.is_empty() {
                bail!("the batch has no tagged tokens");
            }
            let labels = out.dim(D::Minus1)?;
            let picked = out.reshape(((), labels))?.index_select(&Tensor::new(rows, &dev)?, 0)?;
            Ok(candle_nn::loss::cross_entropy(&picked, &Tensor::new(targets, &dev)?)?)
        }
    }
}

fn class_of(target: &Target) -> Result<u32> {
    match target {
        Target::Class(c) => Ok(*c),
        _ => bail!("a batch mixes kinds of targets"),
    }
}

/// Progress of one encoder training step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EncoderStep {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub learning_rate: f64,
    pub grad_norm: f32,
}

/// Trains `model` on `examples` for `config.steps` steps of AdamW (warm-up then cosine,
/// gradient clipping, seeded batch order), calling `progress` after each.
pub fn train_encoder(
    model: &TrainableEncoder,
    examples: &[EncodedText],
    config: &TrainConfig,
    mut progress: impl FnMut(&EncoderStep) + Send,
) -> Result<()> {
    if examples.is_empty() {
        bail!("no training examples");
    }
    training_pool(config)?.install(|| {
        let vars: Vec<Var> = model.vars().map(|(_, v)| v.clone()).collect();
        let mut optimizer = adamw(&vars, config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut order = Vec::new();
        for step in 0..config.steps {
            let batch: Vec<&EncodedText> = next_batch(&mut order, &mut rng, examples.len(), config.batch_size)
                .into_iter()
                .map(|i| &examples[i])
                .collect();
            let loss = batch_loss(model, &batch)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                bail!("the loss diverged at step {step} ({value})");
            }
            let mut grads = loss.backward()?;
            let grad_norm = clip_gradients(&mut grads, &vars, config.max_grad_norm)?;
            let lr = learning_rate(step, config.steps, config.warmup_steps, config.learning_rate);
            optimizer.set_learning_rate(lr);
            optimizer.step(&grads)?;
            progress(&EncoderStep {
                step: step + 1,
                steps: config.steps,
                loss: value,
                learning_rate: lr,
                grad_norm,
            });
        }
        Ok(())
    })
}

/// Held-out figures of an encoder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EncoderMetrics {
    pub texts: usize,
    /// Single-label: share of texts whose best label is right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Single-label: F1 averaged over the labels that occur (gold or predicted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// Multi-label decisions (logit > 0), or entities (exact span and type).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_f1: Option<f64>,
    /// Token classifiers: gold entities in the texts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entities: Option<usize>,
}

/// Precision/recall/F1 counts.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    hit: usize,
    predicted: usize,
    gold: usize,
}

impl Counts {
    fn f1(self) -> (f64, f64, f64) {
        let p = self.hit as f64 / self.predicted.max(1) as f64;
        let r = self.hit as f64 / self.gold.max(1) as f64;
        let f = if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 };
        (p, r, f)
    }
}

/// Evaluates `model` on `examples` (in batches, no gradient).
pub fn evaluate(model: &TrainableEncoder, examples: &[EncodedText]) -> Result<EncoderMetrics> {
    let labels = &model.config().labels;
    let mut metrics = EncoderMetrics {
        texts: examples.len(),
        accuracy: None,
        macro_f1: None,
        precision: None,
        recall: None,
        micro_f1: None,
        entities: None,
    };
    let (mut correct, mut micro) = (0usize, Counts::default());
    let mut per_label = vec![Counts::default(); labels.len()];
    for chunk in examples.chunks(64) {
        let batch: Vec<&EncodedText> = chunk.iter().collect();
        let (ids, lengths) = pad(&batch, model.config().pad_token_id)?;
        let out = model.forward(&ids, &lengths)?.detach();
        for (b, e) in chunk.iter().enumerate() {
            let row = out.get(b)?;
            match &e.target {
                Target::Class(gold) => {
                    let best = row.argmax(0)?.to_scalar::<u32>()?;
                    correct += usize::from(best == *gold);
                    per_label[best as usize].predicted += 1;
                    per_label[*gold as usize].gold += 1;
                    per_label[*gold as usize].hit += usize::from(best == *gold);
                }
                Target::Classes(hot) => {
                    for (logit, gold) in row.to_vec1::<f32>()?.iter().zip(hot) {
                        let (p, g) = (*logit > 0.0, *gold > 0.5);
                        micro.predicted += usize::from(p);
                        micro.gold += usize::from(g);
                        micro.hit += usize::from(p && g);
                    }
                }
                Target::Tags(gold) => {
                    let best = row.argmax(D::Minus1)?.to_vec1::<u32>()?;
                    let predicted: Vec<Option<u32>> = gold.iter().zip(&best).map(|(g, p)| g.map(|_| *p)).collect();
                    let (want, got) = (spans(gold, labels), spans(&predicted, labels));
                    micro.gold += want.len();
                    micro.predicted += got.len();
                    micro.hit += want.intersection(&got).count();
                }
            }
        }
    }
    match examples.first().map(|e| &e.target) {
        Some(Target::Class(_)) => {
            metrics.accuracy = Some(correct as f64 / examples.len() as f64);
            let seen: Vec<f64> = per_label
                .iter()
                .filter(|c| c.gold + c.predicted > 0)
                .map(|c| c.f1().2)
                .collect();
            metrics.macro_f1 = Some(seen.iter().sum::<f64>() / seen.len().max(1) as f64);
        }
        Some(target) => {
            let (p, r, f) = micro.f1();
            (metrics.precision, metrics.recall, metrics.micro_f1) = (Some(p), Some(r), Some(f));
            if matches!(target, Target::Tags(_)) {
                metrics.entities = Some(micro.gold);
            }
        }
        None => {}
    }
    Ok(metrics)
}

/// Entities of a tag sequence, as (type, first token, last token): `B-X` opens one, `I-X`
/// continues an open `X` (or opens one after anything else, as seqeval's default), `O` and
/// special tokens close it.
fn spans(tags: &[Option<u32>], labels: &[String]) -> BTreeSet<(String, usize, usize)> {
    let mut out = BTreeSet::new();
    let mut open: Option<(String, usize, usize)> = None;
    for (i, tag) in tags.iter().enumerate() {
        let label = tag.and_then(|t| labels.get(t as usize)).map_or("O", String::as_str);
        let (begins, kind) = match label.split_once('-') {
            Some(("B", k)) => (true, Some(k)),
            Some((_, k)) => (false, Some(k)),
            None => (false, None),
        };
        match (&mut open, kind) {
            (Some((k, _, end)), Some(kind)) if !begins && k == kind => *end = i,
            _ => {
                out.extend(open.take());
                open = kind.map(|k| (k.to_string(), i, i));
            }
        }
    }
    out.extend(open);
    out
}

/// Summary of `distill-serve train` on an encoder.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderTrainReport {
    pub train_texts: usize,
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    /// Held-out figures before and after training, when held-out texts were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out_before: Option<EncoderMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out_after: Option<EncoderMetrics>,
}

/// Trains the encoder checkpoint in `checkpoint` on `train` and writes it, with its
/// configuration and tokenizer files, to `out`; evaluates on `held_out` before and after.
pub fn train_encoder_checkpoint(
    checkpoint: &Path,
    train: &[LabelledText],
    held_out: &[LabelledText],
    config: &TrainConfig,
    out: &Path,
    mut progress: impl FnMut(&EncoderStep) + Send,
) -> Result<EncoderTrainReport> {
    let files = TokenizerFiles::open(checkpoint)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_json).map_err(|e| anyhow!("tokenizer.json: {e}"))?;
    let model = TrainableEncoder::load(checkpoint)?;
    let examples = encode_all(&tokenizer, model.config(), train).context("training texts")?;
    let held_out = encode_all(&tokenizer, model.config(), held_out).context("held-out texts")?;
    let score = |model: &TrainableEncoder| (!held_out.is_empty()).then(|| evaluate(model, &held_out)).transpose();
    let held_out_before = score(&model)?;
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    train_encoder(&model, &examples, config, |s| {
        if s.step == 1 {
            first_loss = s.loss;
        }
        last_loss = s.loss;
        progress(s);
    })?;
    copy_beside_weights(checkpoint, &files, out)?;
    model.save(out)?;
    Ok(EncoderTrainReport {
        train_texts: examples.len(),
        steps: config.steps,
        first_loss,
        last_loss,
        held_out_before,
        held_out_after: score(&model)?,
    })
}
