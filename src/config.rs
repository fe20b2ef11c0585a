//! Server configuration: one TOML file, every field overridable by a flag or an environment
//! variable (flag > environment > file > default). The same defaults serve every entry point.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::constrain::TerminologySpec;
use crate::repository::ModelDefaults;

/// Where `scripts/setup.sh` installs what the project downloads (the ONNX Runtime library, the
/// ICD-10-CM release): `${XDG_CACHE_HOME:-~/.cache}/distill-serve`.
pub fn setup_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("distill-serve")
}

/// Settings of `distill-serve serve`, as given (any may be absent).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as the flags, with underscores).
    #[arg(long, env = "DISTILL_SERVE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model repository folder [default: models].
    #[arg(long, env = "DISTILL_SERVE_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "DISTILL_SERVE_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// gRPC listen address [default: 127.0.0.1:8081].
    #[arg(long, env = "DISTILL_SERVE_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Bearer token of the admin API under /admin/v1/ (the admin API is off without one).
    #[arg(long, env = "DISTILL_SERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bearer token clients must send on the `/v1` routes (as vLLM's `--api-key`); open when
    /// absent.
    #[arg(long, env = "DISTILL_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// ONNX Runtime intra-op threads per model, 0 = all cores [default: 0].
    #[arg(long, env = "DISTILL_SERVE_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    /// Requests that may wait per model before new ones get 429 [default: 64].
    #[arg(long, env = "DISTILL_SERVE_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Requests per model that may be waiting or generating at once, beyond which new ones get
    /// 429 [default: 128].
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
    /// Length bucket upper bounds, comma-separated [default: 16,32,64,... up to the context].
    #[arg(long, env = "DISTILL_SERVE_BUCKETS", value_delimiter = ',')]
    pub buckets: Option<Vec<usize>>,
    /// Deadline of requests that set none (header x-request-timeout-ms, gRPC deadline), in ms;
    /// 0 = none [default: 300000].
    #[arg(long, env = "DISTILL_SERVE_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Terminologies for constrained decoding, `NAME=KIND:PATH` (kinds: icd10cm-xml,
    /// icd10cm-order, snomed-rf2, tsv); repeatable.
    #[arg(long = "terminology", env = "DISTILL_SERVE_TERMINOLOGIES", value_delimiter = ',')]
    #[serde(default, rename = "terminology")]
    pub terminologies: Vec<TerminologySpec>,
    /// SQLite file of the dataset store (prompts, teacher outputs, refresh jobs) [default:
    /// <model repository>/.distill/store.sqlite3].
    #[arg(long, env = "DISTILL_SERVE_STORE")]
    pub store: Option<PathBuf>,
    /// The ONNX Runtime shared library [default: the one scripts/setup.sh installs].
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
}

/// Settings with every default applied.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model_repository: PathBuf,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub admin_token: Option<String>,
    pub api_key: Option<String>,
    pub ort_library: Option<PathBuf>,
    /// SQLite file of the dataset store.
    pub store: PathBuf,
    pub request_timeout: Option<Duration>,
    pub model_defaults: ModelDefaults,
    pub terminologies: Vec<TerminologySpec>,
}

impl ServeArgs {
    /// Applies the file (if any) under the flags and environment, then the defaults.
    pub fn resolve(self) -> Result<ServerConfig> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => ServeArgs::default(),
        };
        let model_repository: PathBuf = self
            .model_repository
            .or(file.model_repository)
            .unwrap_or_else(|| "models".into());
        Ok(ServerConfig {
            store: self
                .store
                .or(file.store)
                .unwrap_or_else(|| model_repository.join(".distill").join("store.sqlite3")),
            model_repository,
            http_addr: self
                .http_addr
                .or(file.http_addr)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            grpc_addr: self
                .grpc_addr
                .or(file.grpc_addr)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8081))),
            admin_token: self.admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
            api_key: self.api_key.or(file.api_key).filter(|t| !t.is_empty()),
            ort_library: self.ort_library.or(file.ort_library),
            request_timeout: match self.request_timeout_ms.or(file.request_timeout_ms).unwrap_or(300_000) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            terminologies: if self.terminologies.is_empty() {
                file.terminologies
            } else {
                self.terminologies
            },
            model_defaults: ModelDefaults {
                intra_threads: self.intra_threads.or(file.intra_threads).unwrap_or(0),
                max_queue: self.max_queue.or(file.max_queue).unwrap_or(64),
                max_concurrent_requests: self
                    .max_concurrent_requests
                    .or(file.max_concurrent_requests)
                    .unwrap_or(128),
                max_tokens: self.max_tokens.or(file.max_tokens).unwrap_or(256),
                max_batch_size: self.max_batch_size.or(file.max_batch_size).unwrap_or(32),
                max_batch_tokens: self.max_batch_tokens.or(file.max_batch_tokens).unwrap_or(4096),
                max_queue_delay_ms: self.max_queue_delay_ms.or(file.max_queue_delay_ms).unwrap_or(0),
                buckets: self.buckets.or(file.buckets),
            },
        })
    }
}

fn read_file(path: &Path) -> Result<ServeArgs> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("serve.toml");
        std::fs::write(
            &file,
            "http_addr = \"127.0.0.1:9000\"\nmax_queue = 5\nmodel_repository = \"repo\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            max_queue: Some(7),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.grpc_addr.port(), 8081);
        assert_eq!(c.model_defaults.max_queue, 7);
        assert_eq!(c.model_repository, PathBuf::from("repo"));
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("serve.toml");
        std::fs::write(&file, "http_adr = \"127.0.0.1:9000\"\n").unwrap();
        let err = format!(
            "{:#}",
            ServeArgs {
                config: Some(file),
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
        );
        assert!(err.contains("http_adr"), "{err}");
    }
}
