//! `distill-serve distill eval`: a served model on a held-out set, over the wire, along the
//! three axes of the distillation recipe — task accuracy (exact match against the labels), code
//! validity and knowledge coverage (through the server's coverage route), and efficiency
//! (latency, tokens per second) — each without and with the terminology constraint.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::finetune::read_jsonl;
use super::job::PromptInput;

/// What to evaluate.
#[derive(Debug, Clone, clap::Args)]
pub struct HeldOutArgs {
    /// The served model.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// JSONL held-out set: prompts with labels.
    #[arg(long)]
    pub data: PathBuf,
    /// Loaded terminology the answers should belong to.
    #[arg(long, default_value = "icd10cm")]
    pub terminology: String,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// At most this many prompts (the first ones).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Bearer token of the `/v1` routes, if the server wants one.
    #[arg(long, env = "DISTILL_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// The figures of one way of asking.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Axes {
    pub prompts: usize,
    /// Answers equal to the label (trimmed).
    pub exact_match: f64,
    /// Answers in the label's category (the same first three characters, e.g. `E11`).
    pub category_match: f64,
    /// Answers that are not exactly one billable code of the terminology.
    pub invalid: f64,
    /// Code mentions in the answers that name a code of the terminology.
    pub coverage: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Generated tokens per second of request time (requests one at a time).
    pub tokens_per_second: f64,
}

struct Caller {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Caller {
    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut request = self.http.post(&url).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let value: Value = response.json().await.with_context(|| format!("reading {url}"))?;
        if !status.is_success() {
            bail!(
                "{url}: {status}: {}",
                value["error"]["message"].as_str().unwrap_or("no details")
            );
        }
        Ok(value)
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Asks every prompt once without and once with the constraint; returns both sets of axes.
pub async fn evaluate(base: &str, args: &HeldOutArgs) -> Result<Value> {
    let mut prompts: Vec<PromptInput> = read_jsonl(&args.data)?;
    if let Some(limit) = args.limit {
        prompts.truncate(limit);
    }
    let caller = Caller {
        http: reqwest::Client::new(),
        base: base.to_string(),
        api_key: args.api_key.clone(),
    };
    let mut sides = Vec::new();
    for constrained in [false, true] {
        let (mut exact, mut category, mut valid, mut mentions, mut matched, mut tokens) =
            (0usize, 0usize, 0usize, 0usize, 0usize, 0u64);
        let mut latencies = Vec::with_capacity(prompts.len());
        for (n, p) in prompts.iter().cloned().enumerate() {
            let (messages, label) = p.into_messages().map_err(|e| anyhow!("prompt {}: {e}", n + 1))?;
            let label = label.with_context(|| format!("prompt {} has no label", n + 1))?;
            let mut body = json!({"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
                "temperature": 0.0});
            if constrained {
                body["constraint"] = json!({"terminology": args.terminology, "match": "code"});
            }
            let started = Instant::now();
            let reply = caller.post("/v1/chat/completions", &body).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            tokens += reply["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            let answer = reply["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_string();
            exact += usize::from(answer == label.trim());
            let head = |s: &str| s.chars().take(3).collect::<String>();
            category += usize::from(answer.chars().count() >= 3 && head(&answer) == head(label.trim()));
            let path = format!("/v1/terminologies/{}/coverage", args.terminology);
            let c = caller.post(&path, &json!({"text": answer})).await?;
            mentions += c["mentions"].as_u64().unwrap_or(0) as usize;
            matched += c["matched"].as_u64().unwrap_or(0) as usize;
            let items = c["items"].as_array().map(Vec::as_slice).unwrap_or_default();
            let whole = items.len() == 1
                && items[0]["text"].as_str() == Some(answer.as_str())
                && items[0]["code"].is_string()
                && items[0]["billable"] == true;
            valid += usize::from(whole);
        }
        let n = prompts.len().max(1) as f64;
        let total_s: f64 = latencies.iter().sum::<f64>() / 1000.0;
        latencies.sort_by(f64::total_cmp);
        sides.push(Axes {
            prompts: prompts.len(),
            exact_match: exact as f64 / n,
            category_match: category as f64 / n,
            invalid: 1.0 - valid as f64 / n,
            coverage: if mentions == 0 {
                0.0
            } else {
                matched as f64 / mentions as f64
            },
            latency_ms_p50: percentile(&latencies, 0.5),
            latency_ms_p99: percentile(&latencies, 0.99),
            tokens_per_second: tokens as f64 / total_s.max(1e-9),
        });
    }
    Ok(
        json!({"model": args.model, "terminology": args.terminology, "unconstrained": sides[0], "constrained": sides[1]}),
    )
}
