//! The limits of one model (and where its graph runs), declared once: the server's flags (and
//! its config file) set them for every model, a model's `model.toml` overrides them for that
//! model, and the defaults below fill in what neither sets.

use std::time::Duration;

use serde::Deserialize;

use crate::engine::ExecutionProvider;
use crate::engine::cuda::WeightFormat;
use crate::scheduler::{AdmissionLimits, BatchPolicy};

/// Limits as one layer gives them (any may be absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    /// Where models run: cpu, cuda (a build with `--features cuda`) or tensorrt (`--features
    /// tensorrt`), with an ONNX Runtime library built with them [default: cpu].
    #[arg(long, env = "DISTILL_SERVE_EXECUTION_PROVIDER", value_enum)]
    pub execution_provider: Option<ExecutionProvider>,
    /// How the native engine (native-cuda, native-cpu) stores weights: int8 (per-channel,
    /// quantised at load) or fp16 [default: int8].
    #[arg(long, env = "DISTILL_SERVE_NATIVE_WEIGHTS", value_enum)]
    pub native_weights: Option<WeightFormat>,
    /// Tokens each sequence slot of the native engine holds (its KV cache is allocated once per
    /// slot, `max_batch_size` slots); requests longer than this are refused [default: the
    /// model's context, at most 4096].
    #[arg(long, env = "DISTILL_SERVE_NATIVE_SLOT_TOKENS")]
    pub native_slot_tokens: Option<usize>,
    /// Whether native-cuda records each decode step shape as a CUDA graph and replays it;
    /// false runs every step eagerly (vLLM's `enforce_eager`) [default: true].
    #[arg(long, env = "DISTILL_SERVE_NATIVE_CUDA_GRAPHS", num_args = 0..=1, default_missing_value = "true")]
    pub native_cuda_graphs: Option<bool>,
    /// The GPU a GPU provider runs models on (CUDA's numbering) [default: 0].
    #[arg(long, env = "DISTILL_SERVE_DEVICE_ID")]
    pub device_id: Option<u32>,
    /// ONNX Runtime intra-op threads per model, 0 = all cores [default: 0].
    #[arg(long, env = "DISTILL_SERVE_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    /// Longest a request may be expected to wait for its prefill, in ms: a request whose
    /// estimated wait (the work ahead, from measured step times) is longer gets 429 with a
    /// Retry-After [default: 30000].
    #[arg(long, env = "DISTILL_SERVE_MAX_QUEUE_TIME_MS")]
    pub max_queue_time_ms: Option<u64>,
    /// Requests that may wait per model, a memory bound [default: 4096].
    #[arg(long, env = "DISTILL_SERVE_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Prompt tokens that may wait per model, a memory bound [default: 1048576].
    #[arg(long, env = "DISTILL_SERVE_MAX_QUEUED_TOKENS")]
    pub max_queued_tokens: Option<usize>,
    /// Requests per model that may be waiting or generating at once [default: no bound].
    #[arg(long, env = "DISTILL_SERVE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// `max_tokens` of requests that give none [default: 256].
    #[arg(long, env = "DISTILL_SERVE_MAX_TOKENS")]
    pub max_tokens: Option<usize>,
    /// Most sequences decoded together per model; 1 turns batching off [default: 32].
    #[arg(long, env = "DISTILL_SERVE_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Most padded prompt tokens per prefill batch [default: 4096].
    #[arg(long, env = "DISTILL_SERVE_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Longest a request waits for its length bucket to fill, in ms [default: 0: batch what is waiting].
    #[arg(long, env = "DISTILL_SERVE_MAX_QUEUE_DELAY_MS")]
    pub max_queue_delay_ms: Option<u64>,
    /// At load, run the largest prefill the limits allow (the longest bucket, as many rows as
    /// the token budget takes) and a decode step, so ONNX Runtime's memory is at its peak from
    /// the start instead of growing under traffic (as TGI's warm-up); costs a second or more and
    /// the memory of a full-context prompt [default: false].
    #[arg(long, env = "DISTILL_SERVE_WARMUP", num_args = 0..=1, default_missing_value = "true")]
    pub warmup: Option<bool>,
    /// Length bucket upper bounds, comma-separated [default: 16,32,64,... up to the context].
    #[arg(long, env = "DISTILL_SERVE_BUCKETS", value_delimiter = ',')]
    pub buckets: Option<Vec<usize>>,
}

/// The limits of a loaded model, every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub execution_provider: ExecutionProvider,
    pub native_weights: WeightFormat,
    /// Tokens a native engine slot holds.
    pub native_slot_tokens: usize,
    /// Whether native-cuda replays decode steps as CUDA graphs.
    pub native_cuda_graphs: bool,
    pub device_id: u32,
    pub intra_threads: usize,
    pub admission: AdmissionLimits,
    pub max_tokens: usize,
    pub batch: BatchPolicy,
    /// Whether to warm up at the peak shape at load.
    pub warmup: bool,
}

impl ModelLimits {
    /// Each limit of `self`, else the one of `under`.
    pub fn or(self, under: &ModelLimits) -> Self {
        Self {
            execution_provider: self.execution_provider.or(under.execution_provider),
            native_weights: self.native_weights.or(under.native_weights),
            native_slot_tokens: self.native_slot_tokens.or(under.native_slot_tokens),
            native_cuda_graphs: self.native_cuda_graphs.or(under.native_cuda_graphs),
            device_id: self.device_id.or(under.device_id),
            intra_threads: self.intra_threads.or(under.intra_threads),
            max_queue_time_ms: self.max_queue_time_ms.or(under.max_queue_time_ms),
            max_queue: self.max_queue.or(under.max_queue),
            max_queued_tokens: self.max_queued_tokens.or(under.max_queued_tokens),
            max_concurrent_requests: self.max_concurrent_requests.or(under.max_concurrent_requests),
            max_tokens: self.max_tokens.or(under.max_tokens),
            max_batch_size: self.max_batch_size.or(under.max_batch_size),
            max_batch_tokens: self.max_batch_tokens.or(under.max_batch_tokens),
            max_queue_delay_ms: self.max_queue_delay_ms.or(under.max_queue_delay_ms),
            buckets: self.buckets.or_else(|| under.buckets.clone()),
            warmup: self.warmup.or(under.warmup),
        }
    }

    /// The limits with the defaults filled in, for a model of `context_length` tokens.
    pub fn resolve(self, context_length: usize) -> Limits {
        Limits {
            execution_provider: self.execution_provider.unwrap_or_default(),
            native_weights: self.native_weights.unwrap_or_default(),
            native_slot_tokens: self
                .native_slot_tokens
                .unwrap_or(context_length.min(4096))
                .min(context_length),
            native_cuda_graphs: self.native_cuda_graphs.unwrap_or(true),
            device_id: self.device_id.unwrap_or(0),
            intra_threads: self.intra_threads.unwrap_or(0),
            admission: AdmissionLimits {
                max_queue_time: Duration::from_millis(self.max_queue_time_ms.unwrap_or(30_000)),
                max_queue: self.max_queue.unwrap_or(4096),
                max_queued_tokens: self.max_queued_tokens.unwrap_or(1 << 20),
                max_concurrent: self.max_concurrent_requests.unwrap_or(usize::MAX),
            },
            max_tokens: self.max_tokens.unwrap_or(256),
            batch: BatchPolicy {
                max_batch_size: self.max_batch_size.unwrap_or(32),
                max_batch_tokens: self.max_batch_tokens.unwrap_or(4096),
                max_queue_delay: Duration::from_millis(self.max_queue_delay_ms.unwrap_or(0)),
                buckets: self
                    .buckets
                    .unwrap_or_else(|| BatchPolicy::default_buckets(context_length)),
            },
            warmup: self.warmup.unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_overrides_the_server_which_overrides_the_defaults() {
        let server = ModelLimits {
            device_id: Some(1),
            max_queue: Some(5),
            max_tokens: Some(9),
            ..Default::default()
        };
        let model = ModelLimits {
            execution_provider: Some(ExecutionProvider::Cuda),
            max_queue: Some(7),
            buckets: Some(vec![8, 64]),
            ..Default::default()
        };
        let limits = model.or(&server).resolve(2048);
        assert_eq!(limits.admission.max_queue, 7);
        assert_eq!(limits.execution_provider, ExecutionProvider::Cuda);
        assert_eq!(limits.device_id, 1);
        assert_eq!(limits.max_tokens, 9);
        assert_eq!(limits.batch.buckets, vec![8, 64]);
        assert_eq!(limits.admission.max_concurrent, usize::MAX);
        assert_eq!(limits.admission.max_queue_time, Duration::from_secs(30));
        let defaults = ModelLimits::default().resolve(64);
        assert_eq!(defaults.batch.buckets, BatchPolicy::default_buckets(64));
        assert_eq!(defaults.batch.max_batch_size, 32);
        assert_eq!(defaults.execution_provider, ExecutionProvider::Cpu);
    }
}
