//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, with `stream: true` as server-sent events ending in
//! `data: [DONE]`.

mod types;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::validate;
use crate::generate::{Event, Timings, TokenLogprob};
use crate::repository::ModelVersion;
use crate::scheduler::Events;
use crate::tokenize::ChatMessage;
pub use types::{ChatRequest, CompletionRequest};

/// Parses a JSON body, answering 400 with serde's message (which names the field).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .repository
        .statuses()
        .into_iter()
        .filter(|s| s.state == "READY")
        .map(|s| json!({"id": s.name, "object": "model", "created": 0, "owned_by": "distill-serve"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Which route a request came through; decides the response shapes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Completions,
    Chat,
}

impl Route {
    fn endpoint(self) -> &'static str {
        match self {
            Route::Completions => "completions",
            Route::Chat => "chat_completions",
        }
    }
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let result = async {
        let req: CompletionRequest = parse_json(&body)?;
        if req.echo == Some(true) {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        let model = state.repository.get(&req.model)?;
        let mut captured = None;
        let prompt = match req.prompt {
            types::Prompt::Text(text) => {
                let ids = validate::text_prompt(&model, &text)?;
                captured = Some(text);
                ids
            }
            types::Prompt::Texts(texts) if texts.len() == 1 => validate::text_prompt(&model, &texts[0])?,
            types::Prompt::Texts(texts) => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("one prompt per request, got {}", texts.len()),
                ));
            }
            types::Prompt::Tokens(ids) => validate::check_token_ids(&model, ids)?,
        };
        let deadline = validate::deadline(&headers, state.request_timeout)?;
        let mut request = validate::build_request(
            &model,
            prompt,
            &req.sampling,
            req.sampling.max_tokens,
            req.logprobs,
            deadline,
        )?;
        request.constraint = validate::guide(&state.terminologies, &model, &req.sampling)?;
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let wants_logprobs = request.logprobs.is_some();
        let events = model.scheduler.submit(request)?;
        if let (Some(policy), Some(text)) = (&model.capture, captured) {
            let message = ChatMessage {
                role: "user".into(),
                content: text,
            };
            state.distiller.capture(&model.name, policy, &[message]);
        }
        Ok((model, events, req.sampling.stream, include_usage, wants_logprobs))
    }
    .await;
    respond(state, Route::Completions, started, result).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let result = async {
        let req: ChatRequest = parse_json(&body)?;
        let model = state.repository.get(&req.model)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let messages = req
            .messages
            .iter()
            .map(|m| {
                Ok(ChatMessage {
                    role: m.role.clone(),
                    content: m.text()?,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let prompt = validate::chat_prompt(&model, &messages)?;
        let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
        let logprobs = match (req.logprobs, req.top_logprobs) {
            (true, n) => Some(n.unwrap_or(0)),
            (false, None) => None,
            (false, Some(_)) => return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true")),
        };
        let deadline = validate::deadline(&headers, state.request_timeout)?;
        let mut request = validate::build_request(&model, prompt, &req.sampling, max_tokens, logprobs, deadline)?;
        request.constraint = validate::guide(&state.terminologies, &model, &req.sampling)?;
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let wants_logprobs = request.logprobs.is_some();
        let events = model.scheduler.submit(request)?;
        if let Some(policy) = &model.capture {
            state.distiller.capture(&model.name, policy, &messages);
        }
        Ok((model, events, req.sampling.stream, include_usage, wants_logprobs))
    }
    .await;
    respond(state, Route::Chat, started, result).await
}

/// An admitted request: its model, its events, whether it streams, whether the stream ends
/// with usage, whether it asked for log-probabilities.
type Admitted = (Arc<ModelVersion>, Events, bool, bool, bool);

async fn respond(state: AppState, route: Route, started: Instant, admitted: Result<Admitted, ApiError>) -> Response {
    let (model, events, stream, include_usage, wants_logprobs) = match admitted {
        Ok(a) => a,
        Err(e) => {
            state
                .metrics
                .observe_request("", route.endpoint(), e.status.as_u16(), started.elapsed());
            return e.into_response();
        }
    };
    if stream {
        let body = sse_stream(state, route, started, model, events, include_usage);
        return Sse::new(body).keep_alive(KeepAlive::default()).into_response();
    }
    let response = collect(route, &model, events, wants_logprobs).await;
    let status = match &response {
        Ok(_) => 200,
        Err(e) => e.status.as_u16(),
    };
    state
        .metrics
        .observe_request(&model.name, route.endpoint(), status, started.elapsed());
    match response {
        Ok((body, timings)) => {
            // Where the time went, as TEI reports it (milliseconds).
            let ms = |d: std::time::Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
            let headers = [
                ("x-queue-time", ms(timings.queue)),
                ("x-inference-time", ms(timings.inference)),
                ("x-total-time", ms(started.elapsed())),
            ];
            (headers, Json(body)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn collect(
    route: Route,
    model: &ModelVersion,
    events: Events,
    has_logprobs: bool,
) -> Result<(Value, Timings), ApiError> {
    let c = super::collect(events).await?;
    let reason = c.reason;
    let usage = usage(c.prompt_tokens, c.completion_tokens);
    let body = match route {
        Route::Completions => json!({
            "id": request_id("cmpl"),
            "object": "text_completion",
            "created": unix_now(),
            "model": model.name,
            "choices": [{
                "index": 0,
                "text": c.text,
                "logprobs": has_logprobs.then(|| completion_logprobs(&c.logprobs)),
                "finish_reason": reason.as_str(),
            }],
            "usage": usage,
        }),
        Route::Chat => json!({
            "id": request_id("chatcmpl"),
            "object": "chat.completion",
            "created": unix_now(),
            "model": model.name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": has_logprobs.then(|| json!({"content": chat_logprobs(&c.logprobs)})),
                "finish_reason": reason.as_str(),
            }],
            "usage": usage,
        }),
    };
    Ok((body, c.timings))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The legacy completions shape: parallel lists.
fn completion_logprobs(lps: &[TokenLogprob]) -> Value {
    let top: Vec<Value> = lps
        .iter()
        .map(|l| Value::Object(l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect()))
        .collect();
    json!({
        "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
    })
}

/// The chat shape: one object per token with its alternatives.
fn chat_logprobs(lps: &[TokenLogprob]) -> Vec<Value> {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    lps.iter()
        .map(|l| {
            let mut e = entry(&l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|(t, p)| entry(t, *p)).collect());
            e
        })
        .collect()
}

fn sse_stream(
    state: AppState,
    route: Route,
    started: Instant,
    model: Arc<ModelVersion>,
    mut events: Events,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let (id, created) = (
        request_id(if route == Route::Chat { "chatcmpl" } else { "cmpl" }),
        unix_now(),
    );
    let name = model.name.clone();
    let chunk = move |delta: Value, logprobs: Option<Value>, reason: Option<&str>| -> Value {
        let (object, choice) = match route {
            Route::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}),
            ),
            Route::Completions => (
                "text_completion",
                json!({"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": reason}),
            ),
        };
        json!({"id": id, "object": object, "created": created, "model": model.name, "choices": [choice]})
    };
    let text_delta = move |text: String| match route {
        Route::Chat => json!({"content": text}),
        Route::Completions => json!(text),
    };
    // Records the request when the stream ends; a stream dropped before its end (the client went
    // away) is recorded as 499, as nginx does.
    struct Record {
        state: AppState,
        name: String,
        endpoint: &'static str,
        started: Instant,
        status: u16,
    }
    impl Drop for Record {
        fn drop(&mut self) {
            self.state
                .metrics
                .observe_request(&self.name, self.endpoint, self.status, self.started.elapsed());
        }
    }
    let record = Record {
        name,
        state,
        endpoint: route.endpoint(),
        started,
        status: 499,
    };
    async_stream::stream! {
        // Move the whole guard in (a closure would capture only the field it assigns).
        let mut record = record;
        if route == Route::Chat {
            yield Ok(SseEvent::default().data(chunk(json!({"role": "assistant", "content": ""}), None, None).to_string()));
        }
        while let Some(event) = events.recv().await {
            match event {
                Ok(Event::Token { text, logprob, .. }) => {
                    let lp = logprob.map(|l| match route {
                        Route::Chat => json!({"content": chat_logprobs(std::slice::from_ref(&l))}),
                        Route::Completions => completion_logprobs(std::slice::from_ref(&l)),
                    });
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    yield Ok(SseEvent::default().data(chunk(text_delta(text), lp, None).to_string()));
                }
                Ok(Event::Finished { text, reason, prompt_tokens, completion_tokens, .. }) => {
                    let delta = if text.is_empty() && route == Route::Chat { json!({}) } else { text_delta(text) };
                    yield Ok(SseEvent::default().data(chunk(delta, None, Some(reason.as_str())).to_string()));
                    if include_usage {
                        let mut last = chunk(json!({}), None, None);
                        last["choices"] = json!([]);
                        last["usage"] = usage(prompt_tokens, completion_tokens);
                        yield Ok(SseEvent::default().data(last.to_string()));
                    }
                    record.status = 200;
                }
                Err(e) => {
                    let e = ApiError::from(e);
                    let error = json!({"error": {"message": e.message, "type": e.kind, "code": e.status.as_u16()}});
                    yield Ok(SseEvent::default().data(error.to_string()));
                    record.status = e.status.as_u16();
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}
