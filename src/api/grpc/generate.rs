//! `distill_serve.v1.Generate`: a raw prompt or chat messages in, the completion out, whole or
//! streamed.

use std::pin::Pin;
use std::time::Instant;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::proto::generate::{
    Constraint, GenerateRequest, GenerateResponse, GenerateStreamResponse, Usage, generate_server::Generate,
};
use crate::api::error::ApiError;
use crate::api::validate::{self, Sampling, Stop};
use crate::api::{AppState, collect};
use crate::constrain::ConstraintRequest;
use crate::generate::Event;
use crate::scheduler::Events;
use crate::tokenize::ChatMessage;

pub struct GenerateService {
    pub state: AppState,
}

impl GenerateService {
    fn submit_request(&self, req: Request<GenerateRequest>, stream: bool) -> Result<Events, Status> {
        let deadline = super::deadline(&req, self.state.request_timeout);
        self.submit(req.into_inner(), stream, deadline)
    }

    fn submit(&self, req: GenerateRequest, stream: bool, deadline: Option<Instant>) -> Result<Events, Status> {
        let model = self.state.repository.get(&req.model).map_err(ApiError::from)?;
        let prompt = match (req.prompt.is_empty(), req.messages.is_empty()) {
            (false, true) => validate::text_prompt(&model, &req.prompt)?,
            (true, false) => {
                let messages: Vec<ChatMessage> = req
                    .messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                validate::chat_prompt(&model, &messages)?
            }
            _ => return Err(Status::invalid_argument("give exactly one of `prompt` and `messages`")),
        };
        let sampling = Sampling {
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: (!req.stop.is_empty()).then(|| Stop::Many(req.stop.clone())),
            stream,
            ..Default::default()
        };
        let mut request = validate::build_request(&model, prompt, &sampling, sampling.max_tokens, None, deadline)?;
        let sampling = Sampling {
            constraint: req.constraint.map(constraint_request).transpose()?,
            ..sampling
        };
        request.constraint = validate::guide(&self.state.terminologies, &model, &sampling)?;
        Ok(model.scheduler.submit(request).map_err(ApiError::from)?)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generate for GenerateService {
    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let done = collect(self.submit_request(req, false)?).await?;
        Ok(Response::new(GenerateResponse {
            text: done.text,
            finish_reason: done.reason.as_str().into(),
            usage: Some(Usage {
                prompt_tokens: done.prompt_tokens as u32,
                completion_tokens: done.completion_tokens as u32,
            }),
        }))
    }

    type GenerateStreamStream = ResponseStream;

    async fn generate_stream(&self, req: Request<GenerateRequest>) -> Result<Response<ResponseStream>, Status> {
        let mut events = self.submit_request(req, true)?;
        // Dropping this stream (the client cancelled) drops `events`, which stops the worker.
        let stream = async_stream::stream! {
            while let Some(event) = events.recv().await {
                match event {
                    Ok(Event::Token { text, .. }) if text.is_empty() => {}
                    Ok(Event::Token { text, .. }) => yield Ok(GenerateStreamResponse { text, ..Default::default() }),
                    Ok(Event::Finished { text, reason, prompt_tokens, completion_tokens, .. }) => {
                        yield Ok(GenerateStreamResponse {
                            text,
                            finish_reason: reason.as_str().into(),
                            usage: Some(Usage { prompt_tokens: prompt_tokens as u32, completion_tokens: completion_tokens as u32 }),
                        });
                        break;
                    }
                    Err(message) => {
                        yield Err(Status::from(message));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The API's constraint from its gRPC form (empty strings take the defaults).
fn constraint_request(c: Constraint) -> Result<ConstraintRequest, Status> {
    let mut json = serde_json::json!({ "terminology": c.terminology });
    if !c.r#match.is_empty() {
        json["match"] = c.r#match.into();
    }
    if !c.code_format.is_empty() {
        json["code_format"] = c.code_format.into();
    }
    if let Some(n) = c.max_items {
        json["max_items"] = n.into();
    }
    if let Some(sep) = c.separator {
        json["separator"] = sep.into();
    }
    if let Some(b) = c.billable_only {
        json["billable_only"] = b.into();
    }
    if let Some(after) = c.after {
        json["after"] = after.into();
    }
    serde_json::from_value(json).map_err(|e| Status::invalid_argument(format!("constraint: {e}")))
}
