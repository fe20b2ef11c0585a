//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, with `stream: true` as server-sent events ending in
//! `data: [DONE]`. The handlers translate the wire format; [`crate::infer`] does the rest.

mod responses;
mod types;

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::{ErrorBody, InferError};
use crate::constrain::Provenance;
use crate::generate::{Event, Timings, TokenLogprob};
use crate::infer::{Endpoint, Generation, InferRequest};
use crate::repository::ModelState;
use responses::{
    Answer, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatLogprobs, Completion, CompletionChoice,
    CompletionLogprobs, Delta, ModelCard, ModelList, Usage,
};
pub use types::{ChatRequest, CompletionRequest};

/// Parses a JSON body, answering 400 with serde's message (which names the field).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, InferError> {
    serde_json::from_slice(body).map_err(|e| InferError::bad_request(format!("invalid request body: {e}")))
}

/// Header giving a request's timeout in milliseconds (overrides the server default).
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// The timeout the client set with [`TIMEOUT_HEADER`], if any.
pub fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, InferError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|ms| Some(Duration::from_millis(ms)))
        .ok_or_else(|| {
            InferError::invalid(
                TIMEOUT_HEADER,
                "the x-request-timeout-ms header must be whole milliseconds",
            )
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .repository
        .statuses()
        .into_iter()
        .filter(|s| s.state == ModelState::Ready)
        .map(|s| ModelCard {
            id: s.name,
            object: "model",
            created: 0,
            owned_by: "distill-serve",
        })
        .collect();
    Json(ModelList { object: "list", data })
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request = parse_json::<CompletionRequest>(&body).and_then(|r| {
        let include_usage = r.sampling.include_usage();
        Ok((r.into_request(timeout(&headers)?)?, include_usage))
    });
    answer(state, Endpoint::Completions, request).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request = parse_json::<ChatRequest>(&body).and_then(|r| {
        let include_usage = r.sampling.include_usage();
        Ok((r.into_request(timeout(&headers)?)?, include_usage))
    });
    answer(state, Endpoint::ChatCompletions, request).await
}

/// Runs a translated request (with whether its stream ends with usage) and answers it, whole or
/// as server-sent events.
async fn answer(state: AppState, endpoint: Endpoint, request: Result<(InferRequest, bool), InferError>) -> Response {
    let started = Instant::now();
    let include_usage = request.as_ref().is_ok_and(|(_, usage)| *usage);
    let request = request.map(|(request, _)| request);
    let stream = request.as_ref().is_ok_and(|r| r.stream);
    let generation = match state.infer.generate(endpoint, request).await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    if stream {
        let body = sse_stream(endpoint, generation, include_usage);
        return Sse::new(body).keep_alive(KeepAlive::default()).into_response();
    }
    match whole(endpoint, generation).await {
        Ok((body, timings)) => {
            // Where the time went, as TEI reports it (milliseconds).
            let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
            let headers = [
                ("x-queue-time", ms(timings.queue)),
                ("x-inference-time", ms(timings.inference)),
                ("x-total-time", ms(started.elapsed())),
            ];
            (headers, body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The id of an answer, as OpenAI prefixes it.
fn answer_id(endpoint: Endpoint, generation: &Generation) -> String {
    match endpoint {
        Endpoint::ChatCompletions => format!("chatcmpl-{}", generation.id),
        _ => format!("cmpl-{}", generation.id),
    }
}

/// The whole answer and its timings.
async fn whole(endpoint: Endpoint, generation: Generation) -> Result<(Response, Timings), InferError> {
    let id = answer_id(endpoint, &generation);
    let (model, logprobs) = (generation.model.clone(), generation.logprobs);
    let terminologies = generation.terminologies.clone();
    let c = generation.collect().await?;
    let usage = Usage::new(c.prompt_tokens, c.completion_tokens);
    let reason = c.reason.as_str();
    let body = match endpoint {
        Endpoint::ChatCompletions => Json(ChatCompletion {
            id: &id,
            object: "chat.completion",
            created: unix_now(),
            model: &model.name,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: c.text,
                },
                logprobs: logprobs.then(|| ChatLogprobs::new(&c.logprobs)),
                finish_reason: reason,
            }],
            usage: Some(usage),
            terminologies: &terminologies,
        })
        .into_response(),
        _ => Json(Completion {
            id: &id,
            object: "text_completion",
            created: unix_now(),
            model: &model.name,
            choices: vec![CompletionChoice {
                index: 0,
                text: c.text,
                logprobs: logprobs.then(|| CompletionLogprobs::new(&c.logprobs)),
                finish_reason: Some(reason),
            }],
            usage: Some(usage),
            terminologies: &terminologies,
        })
        .into_response(),
    };
    Ok((body, c.timings))
}

/// Builds the chunks of one streamed answer.
struct Chunks {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    terminologies: Vec<Provenance>,
}

impl Chunks {
    fn event(body: &impl Serialize) -> SseEvent {
        SseEvent::default().data(serde_json::to_string(body).unwrap_or_default())
    }

    /// A chunk with these choices (and usage); a `last` one names the terminology releases.
    fn chunk<C: Serialize>(&self, choices: Vec<C>, usage: Option<Usage>, last: bool) -> SseEvent {
        let object = match self.endpoint {
            Endpoint::ChatCompletions => "chat.completion.chunk",
            _ => "text_completion",
        };
        Self::event(&Answer {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices,
            usage,
            terminologies: if last { &self.terminologies } else { &[] },
        })
    }

    /// A chunk adding `text` (and its log-probabilities), ending with `reason` when given.
    fn text(&self, text: String, logprobs: &[TokenLogprob], reason: Option<&'static str>) -> SseEvent {
        match self.endpoint {
            Endpoint::ChatCompletions => self.chat(
                Delta {
                    role: None,
                    content: (!text.is_empty() || reason.is_none()).then_some(text),
                },
                (!logprobs.is_empty()).then(|| ChatLogprobs::new(logprobs)),
                reason,
            ),
            _ => self.chunk(
                vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs: (!logprobs.is_empty()).then(|| CompletionLogprobs::new(logprobs)),
                    finish_reason: reason,
                }],
                None,
                reason.is_some(),
            ),
        }
    }

    fn chat(&self, delta: Delta, logprobs: Option<ChatLogprobs>, reason: Option<&'static str>) -> SseEvent {
        let choice = ChatChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: reason,
        };
        self.chunk(vec![choice], None, reason.is_some())
    }

    /// The last chunk of a stream that asked for usage: no choices.
    fn usage(&self, usage: Usage) -> SseEvent {
        self.chunk(Vec::<ChatChunkChoice>::new(), Some(usage), true)
    }
}

fn sse_stream(
    endpoint: Endpoint,
    mut generation: Generation,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let chunks = Chunks {
        endpoint,
        id: answer_id(endpoint, &generation),
        created: unix_now(),
        model: generation.model.name.clone(),
        terminologies: generation.terminologies.clone(),
    };
    // Dropping the stream (the client went away) drops the generation, which stops its work
    // and records it as cancelled.
    async_stream::stream! {
        if endpoint == Endpoint::ChatCompletions {
            let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
            yield Ok(chunks.chat(delta, None, None));
        }
        while let Some(event) = generation.next().await {
            match event {
                Ok(Event::Token { text, logprob, .. }) => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    yield Ok(chunks.text(text, logprob.as_slice(), None));
                }
                Ok(Event::Finished { text, reason, prompt_tokens, completion_tokens, .. }) => {
                    yield Ok(chunks.text(text, &[], Some(reason.as_str())));
                    if include_usage {
                        yield Ok(chunks.usage(Usage::new(prompt_tokens, completion_tokens)));
                    }
                }
                Err(e) => yield Ok(Chunks::event(&ErrorBody::from(&e))),
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}
