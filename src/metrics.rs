//! Prometheus metrics: every name and histogram bucket is defined here, with the
//! `distill_serve_` prefix and a `model` label.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets in seconds, 1 ms to 60 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
];

/// The server's metrics registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_depth: IntGaugeVec,
    queue_time: HistogramVec,
    time_to_first_token: HistogramVec,
    prompt_tokens: IntCounterVec,
    generated_tokens: IntCounterVec,
    cancelled: IntCounterVec,
    rejected: IntCounterVec,
    batch_size: HistogramVec,
    padding_ratio: HistogramVec,
    batch_tokens: HistogramVec,
    padding_tokens: IntCounterVec,
    bucket_dispatches: IntCounterVec,
    inter_token_latency: HistogramVec,
    model_version: IntGaugeVec,
    model_ready: IntGaugeVec,
    cuda_graphs: IntGaugeVec,
    refresh_jobs: IntCounterVec,
    /// The version each model's info gauge shows, to remove it on a swap.
    serving: Mutex<HashMap<String, u32>>,
}

/// The metrics one model's scheduler updates.
#[derive(Clone)]
pub struct ModelMetrics {
    model: String,
    pub queue_depth: IntGauge,
    pub queue_time: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub cancelled: IntCounter,
    rejected: IntCounterVec,
    /// Requests dropped because their deadline passed.
    pub deadline_exceeded: IntCounter,
    /// Sequences per decode step.
    pub batch_size: Histogram,
    padding_ratio: Histogram,
    batch_tokens: Histogram,
    padding_tokens: IntCounter,
    bucket_dispatches: IntCounterVec,
    /// Decode step shapes the native engine replays as CUDA graphs.
    pub cuda_graphs: IntGauge,
}

impl ModelMetrics {
    /// Counts a request refused at admission for `reason`.
    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[&self.model, reason]).inc();
    }

    /// Counts a prefill batch sent from the bucket bounded by `bound` tokens.
    pub fn bucket_dispatch(&self, bound: usize) {
        self.bucket_dispatches
            .with_label_values(&[&self.model, &bound.to_string()])
            .inc();
    }

    /// Records a prefill batch that computes `computed` positions for `prompt` prompt tokens.
    pub fn observe_prefill(&self, computed: usize, prompt: usize) {
        let padding = computed.saturating_sub(prompt);
        self.batch_tokens.observe(computed as f64);
        self.prompt_tokens.inc_by(prompt as u64);
        self.padding_tokens.inc_by(padding as u64);
        self.padding_ratio.observe(padding as f64 / computed.max(1) as f64);
    }
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        let gauge = |name: &str, help: &str, labels: &[&str]| IntGaugeVec::new(Opts::new(name, help), labels);
        let m = Self {
            requests: counter(
                "distill_serve_requests_total",
                "Requests by model, endpoint, tenant (API key name) and outcome (success, cancelled, or the error's type)",
                &["model", "endpoint", "tenant", "outcome"],
            )?,
            request_duration: histogram(
                "distill_serve_request_duration_seconds",
                "End-to-end request latency",
                &["model", "endpoint", "tenant"],
            )?,
            queue_depth: gauge(
                "distill_serve_queue_depth",
                "Requests waiting in the model's queue",
                &["model"],
            )?,
            queue_time: histogram(
                "distill_serve_queue_time_seconds",
                "Time from admission to start",
                &["model"],
            )?,
            time_to_first_token: histogram(
                "distill_serve_time_to_first_token_seconds",
                "Time from start to the first generated token",
                &["model"],
            )?,
            prompt_tokens: counter(
                "distill_serve_prompt_tokens_total",
                "Prompt tokens processed",
                &["model"],
            )?,
            generated_tokens: counter("distill_serve_generated_tokens_total", "Tokens generated", &["model"])?,
            cancelled: counter(
                "distill_serve_cancelled_requests_total",
                "Requests stopped because the client went away",
                &["model"],
            )?,
            rejected: counter(
                "distill_serve_rejected_requests_total",
                "Requests refused at admission, by reason",
                &["model", "reason"],
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new("distill_serve_batch_size", "Sequences per decode step")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
                &["model"],
            )?,
            padding_ratio: HistogramVec::new(
                HistogramOpts::new(
                    "distill_serve_padding_ratio",
                    "Padded positions over computed positions, per prefill batch",
                )
                .buckets(vec![0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0]),
                &["model"],
            )?,
            batch_tokens: HistogramVec::new(
                HistogramOpts::new(
                    "distill_serve_batch_tokens",
                    "Positions computed per prefill batch (sequences times the longest prompt)",
                )
                .buckets(prometheus::exponential_buckets(16.0, 2.0, 10)?),
                &["model"],
            )?,
            padding_tokens: counter(
                "distill_serve_padding_tokens_total",
                "Padded positions computed by prefill batches (over these plus prompt tokens: the padding ratio)",
                &["model"],
            )?,
            bucket_dispatches: counter(
                "distill_serve_bucket_dispatches_total",
                "Prefill batches sent, by length bucket (upper bound in tokens)",
                &["model", "bucket"],
            )?,
            inter_token_latency: histogram(
                "distill_serve_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence",
                &["model"],
            )?,
            model_version: gauge(
                "distill_serve_model_version_info",
                "1 for the version each model serves",
                &["model", "version"],
            )?,
            model_ready: gauge(
                "distill_serve_model_ready",
                "1 when the model serves, 0 when it should but cannot (failed to load, or its engine keeps failing); no series when unloaded on purpose",
                &["model"],
            )?,
            cuda_graphs: gauge(
                "distill_serve_cuda_graphs",
                "Decode step shapes (sequences a step) the native-cuda engine has recorded as CUDA graphs and replays",
                &["model"],
            )?,
            refresh_jobs: counter(
                "distill_serve_refresh_jobs_total",
                "Distillation refresh jobs ended, by outcome (succeeded, rejected, failed, cancelled)",
                &["model", "outcome"],
            )?,
            serving: Mutex::new(HashMap::new()),
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.request_duration.clone()))?;
        m.registry.register(Box::new(m.queue_depth.clone()))?;
        m.registry.register(Box::new(m.queue_time.clone()))?;
        m.registry.register(Box::new(m.time_to_first_token.clone()))?;
        m.registry.register(Box::new(m.prompt_tokens.clone()))?;
        m.registry.register(Box::new(m.generated_tokens.clone()))?;
        m.registry.register(Box::new(m.cancelled.clone()))?;
        m.registry.register(Box::new(m.rejected.clone()))?;
        m.registry.register(Box::new(m.batch_size.clone()))?;
        m.registry.register(Box::new(m.padding_ratio.clone()))?;
        m.registry.register(Box::new(m.batch_tokens.clone()))?;
        m.registry.register(Box::new(m.padding_tokens.clone()))?;
        m.registry.register(Box::new(m.bucket_dispatches.clone()))?;
        m.registry.register(Box::new(m.inter_token_latency.clone()))?;
        m.registry.register(Box::new(m.model_version.clone()))?;
        m.registry.register(Box::new(m.model_ready.clone()))?;
        m.registry.register(Box::new(m.refresh_jobs.clone()))?;
        m.registry.register(Box::new(m.cuda_graphs.clone()))?;
        Ok(m)
    }

    /// The handles one model's worker uses.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        ModelMetrics {
            model: model.to_string(),
            queue_depth: self.queue_depth.with_label_values(&[model]),
            queue_time: self.queue_time.with_label_values(&[model]),
            time_to_first_token: self.time_to_first_token.with_label_values(&[model]),
            inter_token_latency: self.inter_token_latency.with_label_values(&[model]),
            prompt_tokens: self.prompt_tokens.with_label_values(&[model]),
            generated_tokens: self.generated_tokens.with_label_values(&[model]),
            cancelled: self.cancelled.with_label_values(&[model]),
            rejected: self.rejected.clone(),
            deadline_exceeded: self.rejected.with_label_values(&[model, "deadline_exceeded"]),
            batch_size: self.batch_size.with_label_values(&[model]),
            padding_ratio: self.padding_ratio.with_label_values(&[model]),
            batch_tokens: self.batch_tokens.with_label_values(&[model]),
            padding_tokens: self.padding_tokens.with_label_values(&[model]),
            bucket_dispatches: self.bucket_dispatches.clone(),
            cuda_graphs: self.cuda_graphs.with_label_values(&[model]),
        }
    }

    /// Records a finished request.
    pub fn observe_request(&self, model: &str, endpoint: &str, tenant: &str, outcome: &str, duration: Duration) {
        self.requests
            .with_label_values(&[model, endpoint, tenant, outcome])
            .inc();
        self.request_duration
            .with_label_values(&[model, endpoint, tenant])
            .observe(duration.as_secs_f64());
    }

    /// Records whether `model` serves (`None`: unloaded on purpose, no series).
    pub fn set_model_ready(&self, model: &str, ready: Option<bool>) {
        match ready {
            Some(ready) => self.model_ready.with_label_values(&[model]).set(i64::from(ready)),
            None => {
                let _ = self.model_ready.remove_label_values(&[model]);
            }
        }
    }

    /// Counts a refresh job of `model` that ended with `outcome`.
    pub fn refresh_job_ended(&self, model: &str, outcome: &str) {
        self.refresh_jobs.with_label_values(&[model, outcome]).inc();
    }

    /// Marks `version` as the one `model` serves (and no other).
    pub fn set_model_version(&self, model: &str, version: Option<u32>) {
        let mut serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = serving.remove(model) {
            let _ = self.model_version.remove_label_values(&[model, &old.to_string()]);
        }
        if let Some(version) = version {
            self.model_version
                .with_label_values(&[model, &version.to_string()])
                .set(1);
            serving.insert(model.to_string(), version);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}
