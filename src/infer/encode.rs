//! Encoder requests, for every protocol: the model chosen, each input tokenized (with its
//! characters' offsets) and checked against the model's length, queued on the model's batcher,
//! and the outputs gathered; recorded in the request metrics like generation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ErrorKind, Infer, InferError, Record, window};
use crate::infer::Endpoint;
use crate::repository::EncoderVersion;
use crate::scheduler::{EncodeRefused, EncoderOutput};

/// Most inputs one request may hold (TEI's `max_client_batch_size`).
pub const MAX_ENCODER_INPUTS: usize = 32;

/// What a request asks an encoder.
#[derive(Debug, Clone, Default)]
pub struct EncodeRequest {
    /// The model; none: the one encoder loaded.
    pub model: Option<String>,
    pub inputs: Vec<String>,
    /// Cut inputs longer than the model takes, at this end (else they are refused).
    pub truncate: Option<TruncationDirection>,
    /// Run inputs longer than the model takes in overlapping windows and merge their
    /// per-token outputs (token classification), instead of refusing or cutting them.
    pub window: bool,
    /// With a query, each input is the second text of a pair (`[CLS] query [SEP] input
    /// [SEP]`, segment 1 for the input), as a cross-encoder reads it.
    pub query: Option<String>,
    /// The client's deadline.
    pub timeout: Option<Duration>,
}

impl EncodeRequest {
    /// A request for `inputs` on `model`: long inputs refused (or cut at the end `truncate`
    /// names), no windows, no query.
    pub fn new(
        model: Option<String>,
        inputs: Vec<String>,
        truncate: Option<TruncationDirection>,
        timeout: Option<Duration>,
    ) -> Self {
        Self {
            model,
            inputs,
            truncate,
            window: false,
            query: None,
            timeout,
        }
    }
}

/// Which end of a long input `truncate` cuts, as TEI's `truncation_direction`: `Right` keeps
/// the beginning, `Left` the end; the first and last special tokens stay either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum TruncationDirection {
    #[default]
    #[serde(alias = "right")]
    Right,
    #[serde(alias = "left")]
    Left,
}

/// One input's output, with what its tokens cover.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub output: EncoderOutput,
    /// Each token's span of the input, in characters (special tokens: `(0, 0)`).
    pub offsets: Vec<(usize, usize)>,
    /// Whether each token is a special token (`[CLS]`, `[SEP]`).
    pub special: Vec<bool>,
}

impl Infer {
    /// Runs `request` on its encoder: one output per input, in order.
    pub async fn encode(
        &self,
        endpoint: Endpoint,
        request: EncodeRequest,
    ) -> Result<(Arc<EncoderVersion>, Vec<Encoded>), InferError> {
        let span = tracing::info_span!("encode", endpoint = endpoint.as_str(), model = tracing::field::Empty);
        let mut record = Record::new(&self.metrics, endpoint, span.clone());
        if self.lifecycle.is_draining() {
            let e = InferError::new(ErrorKind::Unavailable, "the server is shutting down").retry_after(1);
            return Err(record.fail(e));
        }
        let _in_flight = self.lifecycle.track();
        let model = self.encoder(request.model.as_deref()).map_err(|e| record.fail(e))?;
        record.model = model.name.clone();
        span.record("model", model.name.as_str());
        let deadline = match (request.timeout, self.request_timeout) {
            (Some(client), Some(server)) => Some(client.min(server)),
            (client, server) => client.or(server),
        }
        .and_then(|t| record.started.checked_add(t));
        check_inputs(&request.inputs).map_err(|e| record.fail(e))?;
        let long = match (request.window && request.query.is_none(), request.truncate) {
            (true, _) => Long::Window,
            (false, Some(direction)) => Long::Truncate(direction),
            (false, None) => Long::Refuse,
        };
        let (tokenizing, inputs, query) = (Arc::clone(&model), request.inputs, request.query);
        let tokenized = tokio::task::spawn_blocking(move || tokenize(&tokenizing, query.as_deref(), &inputs, long))
            .await
            .map_err(|e| record.fail(InferError::internal(format!("tokenizing stopped: {e}"))))?
            .map_err(|e| record.fail(e))?;
        // Every input (or window of one) is queued before any is awaited, so they can share
        // batches.
        let mut answers = Vec::with_capacity(tokenized.len());
        for (ids, _, special, types) in &tokenized {
            let windows = window::split(ids, special, model.max_length);
            let mut pending = Vec::with_capacity(windows.pieces.len());
            for piece in &windows.pieces {
                // Pairs are never split (they are cut or refused when long).
                let answer = model
                    .scheduler
                    .submit(piece.clone(), types.clone(), deadline)
                    .map_err(|e| {
                        record.fail(match e {
                            EncodeRefused::Busy { retry_after, .. } => {
                                InferError::new(ErrorKind::Overloaded, e.to_string()).retry_after(retry_after)
                            }
                            EncodeRefused::Stopped => {
                                InferError::new(ErrorKind::Unavailable, e.to_string()).retry_after(5)
                            }
                        })
                    })?;
                pending.push(answer);
            }
            answers.push((windows, pending));
        }
        let mut encoded = Vec::with_capacity(answers.len());
        for ((windows, pending), (ids, offsets, special, _)) in answers.into_iter().zip(tokenized) {
            let mut outputs = Vec::with_capacity(pending.len());
            for answer in pending {
                let output = answer
                    .await
                    .map_err(|_| record.fail(InferError::internal("the encoder's worker stopped")))?
                    .map_err(|e| record.fail(e.into()))?;
                outputs.push(output);
            }
            let output = match outputs.len() {
                1 => outputs.remove(0),
                _ => windows.merge(&outputs, ids.len()),
            };
            encoded.push(Encoded {
                output,
                offsets,
                special,
            });
        }
        record.outcome = "success";
        Ok((model, encoded))
    }

    /// The encoder `name`, or the only one loaded.
    pub fn encoder(&self, name: Option<&str>) -> Result<Arc<EncoderVersion>, InferError> {
        if let Some(name) = name {
            return Ok(self.repository.get_encoder(name)?);
        }
        match self.repository.encoder_names().as_slice() {
            [one] => Ok(self.repository.get_encoder(one)?),
            [] => Err(InferError::invalid("model", "no encoder model is loaded")),
            several => Err(InferError::invalid(
                "model",
                format!(
                    "several encoders are loaded ({}): name one in `model`",
                    several.join(", ")
                ),
            )),
        }
    }
}

/// Refuses more than [`MAX_ENCODER_INPUTS`] items in one request (413 naming `param`).
pub fn check_count(param: &'static str, n: usize) -> Result<(), InferError> {
    if n > MAX_ENCODER_INPUTS {
        return Err(InferError {
            param: Some(param),
            ..InferError::new(
                ErrorKind::TooLarge,
                format!("{n} inputs in one request; at most {MAX_ENCODER_INPUTS} are taken"),
            )
        });
    }
    Ok(())
}

fn check_inputs(inputs: &[String]) -> Result<(), InferError> {
    if inputs.is_empty() {
        return Err(InferError::invalid("inputs", "inputs must not be empty"));
    }
    check_count("inputs", inputs.len())?;
    if let Some(i) = inputs.iter().position(|t| t.trim().is_empty()) {
        return Err(InferError::invalid("inputs", format!("input {i} is empty")));
    }
    Ok(())
}

/// A tokenized input: ids, character offsets, special-token flags, and segment ids for a pair.
type Tokenized = (Vec<i64>, Vec<(usize, usize)>, Vec<bool>, Option<Vec<i64>>);

/// What to do with an input longer than the model takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Long {
    Refuse,
    Truncate(TruncationDirection),
    Window,
}

/// Keeps `keep` items of `v`: its last ones when `left`, else its first.
fn cut<T>(v: &mut Vec<T>, keep: usize, left: bool) {
    if left {
        v.drain(..v.len().saturating_sub(keep));
    } else {
        v.truncate(keep);
    }
}

/// Each input's tokens: cut to the model's length (at the end, or at the start with
/// `TruncationDirection::Left`; the first and final special tokens kept), kept
/// whole for windows, or refused when longer, as `long` says.
fn tokenize(
    model: &EncoderVersion,
    query: Option<&str>,
    inputs: &[String],
    long: Long,
) -> Result<Vec<Tokenized>, InferError> {
    let started = Instant::now();
    let mut out = Vec::with_capacity(inputs.len());
    for (i, text) in inputs.iter().enumerate() {
        let encoded = match query {
            Some(query) => model.tokenizer.encode_char_offsets((query, text.as_str()), true),
            None => model.tokenizer.encode_char_offsets(text.as_str(), true),
        };
        let encoding =
            encoded.map_err(|e| InferError::invalid("inputs", format!("input {i} cannot be tokenized: {e}")))?;
        let mut types: Option<Vec<i64>> =
            query.map(|_| encoding.get_type_ids().iter().map(|&t| i64::from(t)).collect());
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        let mut offsets = encoding.get_offsets().to_vec();
        let mut special: Vec<bool> = encoding.get_special_tokens_mask().iter().map(|&m| m == 1).collect();
        if ids.len() > model.max_length && long != Long::Window {
            if long == Long::Refuse {
                return Err(InferError {
                    param: Some("inputs"),
                    ..InferError::new(
                        ErrorKind::TooLarge,
                        format!(
                            "input {i} is {} tokens; model `{}` takes at most {} (send `truncate: true` to cut it)",
                            ids.len(),
                            model.name,
                            model.max_length
                        ),
                    )
                });
            }
            let first = (ids[0], offsets[0], special[0]);
            let last = (
                ids[ids.len() - 1],
                offsets[offsets.len() - 1],
                special[special.len() - 1],
            );
            let (keep, left) = (model.max_length, long == Long::Truncate(TruncationDirection::Left));
            cut(&mut ids, keep, left);
            cut(&mut offsets, keep, left);
            cut(&mut special, keep, left);
            if let Some(types) = &mut types {
                cut(types, keep, left);
            }
            if first.2 {
                (ids[0], offsets[0], special[0]) = first;
            }
            if last.2 {
                (ids[keep - 1], offsets[keep - 1], special[keep - 1]) = last;
            }
        }
        out.push((ids, offsets, special, types));
    }
    tracing::debug!(
        inputs = inputs.len(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "tokenized"
    );
    Ok(out)
}
