//! The request layer every protocol shares: a protocol-neutral [`InferRequest`] is validated
//! once (on a blocking worker), submitted to its model's scheduler, and followed as a
//! [`Generation`]. Request metrics, prompt capture and the request's tracing span are recorded
//! here, so HTTP and gRPC cannot drift apart; handlers only translate wire formats.

mod encode;
mod error;
mod labels;
mod request;
mod validate;
mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::auth::Caller;
use crate::constrain::{Provenance, Terminologies};
use crate::distill::service::Distiller;
use crate::generate::{Event, FinishReason, Timings, TokenLogprob};
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::Metrics;
use crate::repository::capture::CapturePolicy;
use crate::repository::{ModelVersion, Repository};
use crate::scheduler::{Events, Priority};
use crate::tokenize::ChatMessage;
pub use encode::{EncodeRequest, Encoded, MAX_ENCODER_INPUTS, TruncationDirection, check_count};
pub use error::{ErrorKind, InferError};
pub use labels::{
    Aggregation, Entity, LabelCoverage, LabelScore, embedding, entities, label_coverage, label_scores,
    log_label_coverage,
};
pub use request::{Endpoint, GuideSpec, InferRequest, Params, Prompt};
pub use validate::{
    MAX_CONSTRAINT_ITEMS, MAX_PROMPT_BYTES_PER_TOKEN, MAX_SEPARATOR_BYTES, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};

/// Runs generation requests for every protocol; cloning shares it.
#[derive(Clone)]
pub struct Infer {
    repository: Arc<Repository>,
    terminologies: Arc<Terminologies>,
    metrics: Arc<Metrics>,
    distiller: Arc<Distiller>,
    /// Deadline of requests that set none.
    request_timeout: Option<Duration>,
    lifecycle: Arc<Lifecycle>,
    /// Validations (templates, tokenizers, compiles) running at once: about one per core, so
    /// a burst of large prompts waits here instead of filling the blocking pool.
    validating: Arc<tokio::sync::Semaphore>,
    /// Whether prompts and answers are logged (redacted), `--log-prompts`.
    log_prompts: bool,
}

impl Infer {
    /// The request layer over these parts.
    pub fn new(
        repository: Arc<Repository>,
        terminologies: Arc<Terminologies>,
        metrics: Arc<Metrics>,
        distiller: Arc<Distiller>,
        request_timeout: Option<Duration>,
        lifecycle: Arc<Lifecycle>,
        log_prompts: bool,
    ) -> Self {
        Self {
            repository,
            terminologies,
            metrics,
            distiller,
            request_timeout,
            lifecycle,
            validating: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            )),
            log_prompts,
        }
    }

    /// Validates `request`, as a protocol translated it from `endpoint`, and queues it on its
    /// model; its events follow on the returned [`Generation`]. A translation error (a
    /// malformed body) is counted like any other failed request and handed back.
    pub async fn generate(
        &self,
        endpoint: Endpoint,
        request: Result<InferRequest, InferError>,
    ) -> Result<Generation, InferError> {
        let request = match request {
            Ok(request) => request,
            Err(e) => return Err(Record::new(&self.metrics, endpoint, tracing::Span::none()).fail(e)),
        };
        let id = crate::request_id::current();
        // Inside the transport's `request` span, which carries the id.
        let span = tracing::info_span!(
            "generate",
            model = %request.model,
            endpoint = request.endpoint.as_str(),
            outcome = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            terminology = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let mut record = Record::new(&self.metrics, request.endpoint, span.clone());
        async {
            if self.lifecycle.is_draining() {
                let e = InferError::new(ErrorKind::Unavailable, "the server is shutting down").retry_after(1);
                return Err(record.fail(e));
            }
            let in_flight = self.lifecycle.track();
            let model = self.repository.get(&request.model).map_err(|e| record.fail(e.into()))?;
            record.model = model.name.clone();
            // A client may shorten the server's deadline, never lengthen it.
            let timeout = match (request.timeout, self.request_timeout) {
                (Some(client), Some(server)) => Some(client.min(server)),
                (client, server) => client.or(server),
            };
            // An instant past what the clock can hold means no deadline, not a panic.
            let deadline = timeout.and_then(|t| record.started.checked_add(t));
            validate::prompt_size(&model, &request.prompt).map_err(|e| record.fail(e))?;
            if self.log_prompts {
                log_prompt(&model, &request.prompt);
            }
            let slot = Arc::clone(&self.validating)
                .acquire_owned()
                .await
                .map_err(|_| record.fail(InferError::internal("validation is closed")))?;
            let (terminologies, version) = (Arc::clone(&self.terminologies), Arc::clone(&model));
            let (request, checked) = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                let checked = validate::generation_request(&terminologies, &version, &request, deadline);
                (request, checked)
            })
            .await
            .map_err(|e| record.fail(InferError::internal(format!("validation stopped: {e}"))))?;
            let (generation, terminologies) = checked.map_err(|e| record.fail(e))?;
            if !terminologies.is_empty() {
                // Which release answered, in the request's log lines (never the text).
                record
                    .span
                    .record("terminology", provenance_label(&terminologies).as_str());
            }
            // The key's concurrency and tokens-per-minute limits, charged what it may use.
            let tenant_permit = match &record.caller {
                Some(caller) => caller
                    .admit(generation.prompt.len() + generation.max_new_tokens)
                    .map_err(|e| record.fail(e.into()))?,
                None => None,
            };
            let logprobs = generation.logprobs.is_some();
            let priority = Priority::from_vllm(request.params.priority.unwrap_or(0));
            let events = model
                .scheduler
                .submit(generation, priority)
                .map_err(|e| record.fail(e.into()))?;
            tracing::debug!("queued");
            self.capture(&model, request.prompt);
            let answer = self.log_prompts.then(|| (Arc::clone(&model.redaction), String::new()));
            Ok(Generation {
                answer,
                terminologies,
                id,
                model,
                logprobs,
                events,
                record,
                in_flight,
                _tenant_permit: tenant_permit,
                ended: false,
            })
        }
        .instrument(span.clone())
        .await
    }

    /// Stores the prompt for refresh jobs where the model's `model.toml` turns capture on.
    fn capture(&self, model: &ModelVersion, prompt: Prompt) {
        let Some(policy) = &model.capture else { return };
        let messages = match prompt {
            Prompt::Text(content) => vec![ChatMessage {
                role: "user".into(),
                content,
            }],
            Prompt::Chat(messages) => messages,
            Prompt::Tokens(_) => return,
        };
        self.distiller.capture(&model.name, policy, &messages);
    }
}

/// `icd10cm@2026 [I20-I25]; snomed@http://snomed.info/sct/...`: releases for a log field.
fn provenance_label(terminologies: &[Provenance]) -> String {
    let label = |p: &Provenance| match &p.subset {
        Some(subset) => format!("{}@{} [{subset}]", p.terminology, p.release),
        None => format!("{}@{}", p.terminology, p.release),
    };
    terminologies.iter().map(label).collect::<Vec<_>>().join("; ")
}

/// Logs `prompt` redacted by the model's `capture_redact` patterns (`--log-prompts` only).
fn log_prompt(model: &ModelVersion, prompt: &Prompt) {
    let redacted = match prompt {
        Prompt::Text(text) => model.redaction.redact_text(text),
        Prompt::Chat(messages) => serde_json::to_string(&model.redaction.redact(messages)).unwrap_or_default(),
        Prompt::Tokens(ids) => format!("{} token ids", ids.len()),
    };
    tracing::info!(prompt = %redacted, "prompt (--log-prompts)");
}

/// Records a request's outcome in the metrics and its span when it ends, on whichever path.
struct Record {
    metrics: Arc<Metrics>,
    endpoint: Endpoint,
    /// The model's name once it is known to exist ("" before, so unknown names add no series).
    model: String,
    /// Who sent it (none outside an authenticated transport, e.g. in benches).
    caller: Option<Caller>,
    started: Instant,
    /// `success`, an [`ErrorKind`]'s name, or `cancelled` while nothing else is known: a
    /// request dropped before its end was given up by its client.
    outcome: &'static str,
    span: tracing::Span,
}

impl Record {
    fn new(metrics: &Arc<Metrics>, endpoint: Endpoint, span: tracing::Span) -> Self {
        Self {
            metrics: Arc::clone(metrics),
            endpoint,
            model: String::new(),
            caller: crate::auth::current(),
            started: Instant::now(),
            outcome: "cancelled",
            span,
        }
    }

    /// Marks the request failed with `error` and hands the error on.
    fn fail(&mut self, error: InferError) -> InferError {
        self.outcome = error.kind.as_str();
        error
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let tenant = self.caller.as_ref().map_or(crate::auth::ANONYMOUS, |c| &*c.name);
        self.metrics
            .observe_request(&self.model, self.endpoint.as_str(), tenant, self.outcome, elapsed);
        let ms = elapsed.as_secs_f64() * 1000.0;
        self.span.record("outcome", self.outcome);
        if self.outcome != "success" && crate::telemetry::exporting() {
            self.span.record("otel.status_code", "error");
        }
        // Failures at info, so an operator sees them at the default level; successes at debug.
        self.span.in_scope(|| match self.outcome {
            "success" => tracing::debug!(outcome = self.outcome, ms, "request ended"),
            _ => tracing::info!(outcome = self.outcome, ms, "request ended"),
        });
    }
}

/// A whole generation, gathered from its events.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
}

/// An admitted request: its events as they come, recorded when it ends.
pub struct Generation {
    /// The request's id (the client's `x-request-id`, or 32 hex digits), in its log lines and its response.
    pub id: String,
    /// The model version that serves it.
    pub model: Arc<ModelVersion>,
    /// Whether the client asked for log-probabilities.
    pub logprobs: bool,
    /// The terminology releases (and subsets) its constraint was compiled from.
    pub terminologies: Vec<Provenance>,
    events: Events,
    record: Record,
    /// Counts it among the generations a shutdown waits for, and tells it when it is cut.
    in_flight: InFlight,
    /// A place among its API key's `max_concurrent_requests`, given back when it ends.
    _tenant_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// With `--log-prompts`: the model's redaction and the answer so far, logged at its end.
    answer: Option<(Arc<CapturePolicy>, String)>,
    ended: bool,
}

impl Generation {
    /// The next event; `None` after the end. An error ends the generation.
    pub async fn next(&mut self) -> Option<Result<Event, InferError>> {
        if self.ended {
            return None;
        }
        let received = tokio::select! {
            biased;
            received = self.events.recv() => received,
            () = self.in_flight.cut() => {
                let e = InferError::new(ErrorKind::Unavailable, "the server shut down before this answer finished");
                return Some(Err(self.end(e)));
            }
        };
        let event = match received {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Some(Err(self.end(e.into()))),
            None => return Some(Err(self.end(InferError::internal("generation ended before finishing")))),
        };
        if let (Some((_, answer)), Event::Token { text, .. }) = (&mut self.answer, &event) {
            answer.push_str(text);
        }
        if let Event::Finished {
            text,
            timings,
            prompt_tokens,
            completion_tokens,
            ..
        } = &event
        {
            if let Some((redaction, answer)) = &mut self.answer {
                answer.push_str(text);
                let redacted = redaction.redact_text(answer);
                self.record
                    .span
                    .in_scope(|| tracing::info!(answer = %redacted, "answer (--log-prompts)"));
            }
            self.ended = true;
            self.record.outcome = "success";
            // As i64: the OpenTelemetry layer exports unsigned fields as strings.
            self.record.span.record("prompt_tokens", *prompt_tokens as i64);
            self.record.span.record("completion_tokens", *completion_tokens as i64);
            self.record.span.in_scope(|| {
                tracing::debug!(
                    queue_ms = timings.queue.as_secs_f64() * 1000.0,
                    prefill_ms = timings.prefill.as_secs_f64() * 1000.0,
                    decode_ms = timings.inference.saturating_sub(timings.prefill).as_secs_f64() * 1000.0,
                    prompt_tokens,
                    completion_tokens,
                    "finished"
                );
            });
        }
        Some(Ok(event))
    }

    fn end(&mut self, error: InferError) -> InferError {
        self.ended = true;
        self.record.fail(error)
    }

    /// Gathers every event until the end.
    pub async fn collect(mut self) -> Result<Collected, InferError> {
        let mut c = Collected::default();
        while let Some(event) = self.next().await {
            match event? {
                Event::Token { text, logprob, .. } => {
                    c.text.push_str(&text);
                    c.logprobs.extend(logprob);
                }
                Event::Finished {
                    text,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    timings,
                } => {
                    c.text.push_str(&text);
                    c.reason = reason;
                    c.prompt_tokens = prompt_tokens;
                    c.completion_tokens = completion_tokens;
                    c.timings = timings;
                }
            }
        }
        Ok(c)
    }
}
