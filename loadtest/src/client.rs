//! One request against the server under test, over the protocol chosen, timed from send to
//! last byte (and to the first piece of text when streamed).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

/// The generated gRPC client of `distill_serve.v1.Generate`.
pub mod proto {
    tonic::include_proto!("distill_serve.v1");
}

use proto::generate_client::GenerateClient;

/// Which API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// OpenAI `POST /v1/completions`.
    Completions,
    /// OpenAI `POST /v1/chat/completions`.
    Chat,
    /// gRPC `distill_serve.v1.Generate`.
    Grpc,
}

/// Generation settings every request carries.
#[derive(Debug, Clone, Serialize)]
pub struct Sampling {
    pub model: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub stream: bool,
}

/// What one successful request measured.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub latency: Duration,
    /// Time to the first piece of text (streamed requests only).
    pub first_token: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A failed request, classified for the report (`http_429`, `timeout`, `grpc_unavailable`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

/// A connection to the server under test; cheap to clone.
#[derive(Clone)]
pub struct Client {
    protocol: Protocol,
    http: reqwest::Client,
    base: String,
    grpc: Option<GenerateClient<tonic::transport::Channel>>,
    sampling: Sampling,
    timeout: Duration,
}

impl Client {
    /// A client for `base` (`http://host:port`), connecting lazily.
    pub fn new(protocol: Protocol, base: &str, sampling: Sampling, timeout: Duration) -> Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        let grpc = match protocol {
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(base.clone())
                    .with_context(|| format!("gRPC address {base}"))?
                    .connect_lazy();
                Some(GenerateClient::new(channel))
            }
            _ => None,
        };
        Ok(Self {
            protocol,
            http: reqwest::Client::builder().pool_max_idle_per_host(4096).build()?,
            base,
            grpc,
            sampling,
            timeout,
        })
    }

    /// Sends `prompt` (request number `seed`, used as its sampling seed) and waits for the
    /// whole answer, at most the request timeout.
    pub async fn send(&self, prompt: &str, seed: u64) -> Result<Sample, Failure> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, async {
            match self.protocol {
                Protocol::Grpc => self.grpc(prompt, seed, started).await,
                _ => self.http(prompt, seed, started).await,
            }
        })
        .await;
        match result {
            Ok(r) => r,
            Err(_) => Err(Failure("timeout".into())),
        }
    }

    async fn http(&self, prompt: &str, seed: u64, started: Instant) -> Result<Sample, Failure> {
        let s = &self.sampling;
        let (path, mut body) = match self.protocol {
            Protocol::Chat => (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": prompt}]}),
            ),
            _ => ("/v1/completions", json!({"prompt": prompt})),
        };
        body["model"] = json!(s.model);
        body["max_tokens"] = json!(s.max_tokens);
        body["temperature"] = json!(s.temperature);
        body["seed"] = json!(seed);
        if s.stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| classify_reqwest(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Failure(format!("http_{}", status.as_u16())));
        }
        if !s.stream {
            let v: Value = response.json().await.map_err(|_| Failure("bad_response".into()))?;
            let (prompt_tokens, completion_tokens) = usage(&v).ok_or(Failure("bad_response".into()))?;
            return Ok(Sample {
                latency: started.elapsed(),
                first_token: None,
                prompt_tokens,
                completion_tokens,
            });
        }
        read_sse(response, started)
            .await
            .map_err(|e| Failure(format!("bad_stream: {e}")))
    }

    async fn grpc(&self, prompt: &str, seed: u64, started: Instant) -> Result<Sample, Failure> {
        let Some(mut client) = self.grpc.clone() else {
            return Err(Failure("no_grpc_client".into()));
        };
        let s = &self.sampling;
        let request = proto::GenerateRequest {
            model: s.model.clone(),
            prompt: prompt.to_string(),
            max_tokens: Some(i64::from(s.max_tokens)),
            temperature: Some(s.temperature),
            seed: Some(seed),
            ..Default::default()
        };
        let status_failure = |st: tonic::Status| Failure(format!("grpc_{:?}", st.code()).to_lowercase());
        if !s.stream {
            let answer = client.generate(request).await.map_err(status_failure)?.into_inner();
            let usage = answer.usage.unwrap_or_default();
            return Ok(Sample {
                latency: started.elapsed(),
                first_token: None,
                prompt_tokens: u64::from(usage.prompt_tokens),
                completion_tokens: u64::from(usage.completion_tokens),
            });
        }
        let mut stream = client
            .generate_stream(request)
            .await
            .map_err(status_failure)?
            .into_inner();
        let mut first_token = None;
        let mut usage = None;
        while let Some(message) = stream.message().await.map_err(status_failure)? {
            if first_token.is_none() && !message.text.is_empty() {
                first_token = Some(started.elapsed());
            }
            if message.usage.is_some() {
                usage = message.usage;
            }
        }
        let usage = usage.ok_or(Failure("bad_stream: no usage".into()))?;
        Ok(Sample {
            latency: started.elapsed(),
            first_token,
            prompt_tokens: u64::from(usage.prompt_tokens),
            completion_tokens: u64::from(usage.completion_tokens),
        })
    }
}

fn classify_reqwest(e: &reqwest::Error) -> Failure {
    let kind = if e.is_connect() {
        "connect"
    } else if e.is_timeout() {
        "timeout"
    } else {
        "transport"
    };
    Failure(kind.into())
}

fn usage(v: &Value) -> Option<(u64, u64)> {
    Some((
        v["usage"]["prompt_tokens"].as_u64()?,
        v["usage"]["completion_tokens"].as_u64()?,
    ))
}

/// Reads an OpenAI server-sent event stream to `[DONE]`.
async fn read_sse(response: reqwest::Response, started: Instant) -> Result<Sample> {
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut first_token = None;
    let mut tokens = None;
    let mut done = false;
    while let Some(chunk) = body.next().await {
        buffer.extend_from_slice(&chunk?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event)?;
            for data in text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                let choice = &v["choices"][0];
                let piece = choice["text"].as_str().or(choice["delta"]["content"].as_str());
                if first_token.is_none() && piece.is_some_and(|p| !p.is_empty()) {
                    first_token = Some(started.elapsed());
                }
                if let Some(u) = usage(&v) {
                    tokens = Some(u);
                }
            }
        }
    }
    if !done {
        bail!("the stream ended without [DONE]");
    }
    let (prompt_tokens, completion_tokens) = tokens.context("no usage in the stream")?;
    Ok(Sample {
        latency: started.elapsed(),
        first_token,
        prompt_tokens,
        completion_tokens,
    })
}
