//! `distill_serve.v1.Generate`: a raw prompt or chat messages in, the completion out, whole or
//! streamed. The handlers translate protobuf messages; [`crate::infer`] does the rest.

use std::pin::Pin;

use futures::Stream;
use serde::Deserialize;
use serde::de::IntoDeserializer;
use serde::de::value::{Error as ValueError, StrDeserializer};
use tonic::{Request, Response, Status};

use super::proto::generate::{
    Constraint, GenerateRequest, GenerateResponse, GenerateStreamResponse, TerminologyRelease, Usage,
    generate_server::Generate,
};
use crate::api::AppState;
use crate::constrain::{ConstraintRequest, Provenance, SubsetText};
use crate::generate::Event;
use crate::infer::{Endpoint, Generation, GuideSpec, InferError, InferRequest, Params, Prompt};
use crate::tokenize::ChatMessage;

pub struct GenerateService {
    pub state: AppState,
}

impl GenerateService {
    /// Translates and runs `req`.
    async fn start(&self, req: Request<GenerateRequest>, endpoint: Endpoint) -> Result<Generation, Status> {
        let timeout = super::timeout(&req);
        let request = neutral(req.into_inner(), endpoint).map(|r| InferRequest { timeout, ..r });
        Ok(self.state.infer.generate(endpoint, request).await?)
    }
}

/// The protocol-neutral form of `req`.
pub(super) fn neutral(req: GenerateRequest, endpoint: Endpoint) -> Result<InferRequest, InferError> {
    let prompt = match (req.prompt.is_empty(), req.messages.is_empty()) {
        (false, true) => Prompt::Text(req.prompt),
        (true, false) => Prompt::Chat(
            req.messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        ),
        _ => {
            return Err(InferError::invalid(
                "prompt",
                "give exactly one of `prompt` and `messages`",
            ));
        }
    };
    Ok(InferRequest {
        params: Params {
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            min_tokens: req.min_tokens,
            priority: req.priority,
            ..Params::default()
        },
        guide: req.constraint.map(constraint).transpose()?.map(GuideSpec::Terms),
        stream: endpoint == Endpoint::GenerateStream,
        ..InferRequest::new(req.model, endpoint, prompt)
    })
}

/// The constraint of its protobuf form (empty strings and absent fields take the defaults).
fn constraint(c: Constraint) -> Result<ConstraintRequest, InferError> {
    /// One of the constraint's named values (`match`, `code_format`), by its API name.
    fn named<'de, T: Deserialize<'de>>(field: &'static str, value: &'de str) -> Result<T, InferError> {
        let de: StrDeserializer<'de, ValueError> = value.into_deserializer();
        T::deserialize(de).map_err(|e| InferError::invalid(field, format!("{field}: {e}")))
    }
    let mut spec = ConstraintRequest::new(c.terminology);
    if !c.r#match.is_empty() {
        spec.match_kind = named("constraint.match", &c.r#match)?;
    }
    if !c.code_format.is_empty() {
        spec.code_format = named("constraint.code_format", &c.code_format)?;
    }
    if let Some(n) = c.max_items {
        spec.max_items = n as usize;
    }
    if let Some(separator) = c.separator {
        spec.separator = separator;
    }
    if let Some(billable) = c.billable_only {
        spec.billable_only = billable;
    }
    spec.after = c.after;
    if !c.subset.is_empty() {
        spec.subset = Some(SubsetText::Many(c.subset));
    }
    Ok(spec)
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: prompt_tokens as u32,
        completion_tokens: completion_tokens as u32,
    })
}

/// The wire form of the releases an answer came from.
fn releases(terminologies: &[Provenance]) -> Vec<TerminologyRelease> {
    terminologies
        .iter()
        .map(|p| TerminologyRelease {
            terminology: p.terminology.clone(),
            release: p.release.clone(),
            subset: p.subset.clone().unwrap_or_default(),
        })
        .collect()
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generate for GenerateService {
    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let generation = self.start(req, Endpoint::Generate).await?;
        let terminologies = releases(&generation.terminologies);
        let done = generation.collect().await?;
        Ok(Response::new(GenerateResponse {
            text: done.text,
            finish_reason: done.reason.as_str().into(),
            usage: usage(done.prompt_tokens, done.completion_tokens),
            terminologies,
        }))
    }

    type GenerateStreamStream = ResponseStream;

    async fn generate_stream(&self, req: Request<GenerateRequest>) -> Result<Response<ResponseStream>, Status> {
        let mut generation = self.start(req, Endpoint::GenerateStream).await?;
        let terminologies = releases(&generation.terminologies);
        // Dropping this stream (the client cancelled) drops the generation, which stops its work.
        let stream = async_stream::stream! {
            while let Some(event) = generation.next().await {
                match event {
                    Ok(Event::Token { text, .. }) if text.is_empty() => {}
                    Ok(Event::Token { text, .. }) => yield Ok(GenerateStreamResponse { text, ..Default::default() }),
                    Ok(Event::Finished { text, reason, prompt_tokens, completion_tokens, .. }) => {
                        yield Ok(GenerateStreamResponse {
                            text,
                            finish_reason: reason.as_str().into(),
                            usage: usage(prompt_tokens, completion_tokens),
                            terminologies: terminologies.clone(),
                        });
                    }
                    Err(e) => yield Err(Status::from(e)),
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
