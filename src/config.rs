//! Server configuration: one TOML file, every field overridable by a flag or an environment
//! variable (flag > environment > file > default). The same defaults serve every entry point.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::auth::AuthSettings;
use crate::constrain::TerminologySpec;
use crate::distill::outbound::OutboundPolicy;
use crate::distill::service::JobPolicy;
use crate::repository::ModelLimits;
use crate::telemetry::TraceSettings;
use crate::transport::ConnectionLimits;
use crate::transport::tls::TlsSettings;

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
    /// Visible in `ps`: prefer --admin-token-file.
    #[arg(long, env = "DISTILL_SERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File whose first line is the admin token (16 characters or more); re-read when it
    /// changes.
    #[arg(long, env = "DISTILL_SERVE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token clients must send on the model routes (HTTP `/v1`, gRPC `Generate`, KServe
    /// `ModelInfer`), as vLLM's `--api-key`; its tenant is `default`. Visible in `ps`: prefer
    /// --api-keys-file.
    #[arg(long, env = "DISTILL_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// TOML file of API keys, each with a tenant name and optional limits (`[[keys]]` with
    /// name, key, requests_per_second, max_concurrent_requests, tokens_per_minute); re-read
    /// when it changes. The model routes are open when no key is configured.
    #[arg(long, env = "DISTILL_SERVE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Ask for an API key or the admin token on `/metrics` too.
    #[arg(long, env = "DISTILL_SERVE_PROTECT_METRICS")]
    #[serde(default)]
    pub protect_metrics: bool,
    /// Audit log: one JSON line per admin action and failed authentication, fsynced; "" turns
    /// it off [default: <model repository>/.distill/audit.jsonl].
    #[arg(long, env = "DISTILL_SERVE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// PEM certificate chain: both listeners serve TLS (1.2 and 1.3; ALPN h2 and http/1.1).
    /// Re-read when it changes.
    #[arg(long, env = "DISTILL_SERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DISTILL_SERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one (mutual TLS).
    #[arg(long, env = "DISTILL_SERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Connections each listener keeps open at once; more are closed at accept [default: 4096].
    #[arg(long, env = "DISTILL_SERVE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Time a new connection has to finish its TLS handshake and send its first request's
    /// headers, in ms [default: 30000].
    #[arg(long, env = "DISTILL_SERVE_HEADER_TIMEOUT_MS")]
    pub header_timeout_ms: Option<u64>,
    /// Hosts refresh jobs may call as teachers besides loopback (`host`, `host:port`,
    /// `*.domain`, or `*` for any), always over https; repeatable or comma-separated.
    #[arg(long, env = "DISTILL_SERVE_TEACHER_ALLOW", value_delimiter = ',')]
    #[serde(default)]
    pub teacher_allow: Vec<String>,
    /// Log each prompt and answer at info, redacted by the model's `capture_redact` patterns.
    /// Off by default: prompts are medical records and unpublished figures.
    #[arg(long, env = "DISTILL_SERVE_LOG_PROMPTS")]
    #[serde(default)]
    pub log_prompts: bool,
    /// Turn off reading datasets' prompts back through the admin API (uploads, refreshes and
    /// deletes still work).
    #[arg(long, env = "DISTILL_SERVE_NO_DATASET_READ")]
    #[serde(default)]
    pub no_dataset_read: bool,
    /// Days captured prompts (datasets `capture/<model>`) are kept; 0 keeps them until deleted
    /// [default: 30].
    #[arg(long, env = "DISTILL_SERVE_CAPTURE_RETENTION_DAYS")]
    pub capture_retention_days: Option<u64>,
    /// Export traces (a span per request, with its queue, prefill and decode) to this
    /// OpenTelemetry collector over OTLP/HTTP protobuf: a base URL such as
    /// `http://otel-collector:4318` (`/v1/traces` is appended) or the full traces URL. Off when
    /// absent. `OTEL_BSP_*` tune the batching of exports.
    #[arg(long, env = "DISTILL_SERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans [default: OTEL_SERVICE_NAME, else distill-serve].
    #[arg(long, env = "DISTILL_SERVE_OTLP_SERVICE_NAME", requires = "otlp_endpoint")]
    pub otlp_service_name: Option<String>,
    /// Refresh jobs running at once [default: 1].
    #[arg(long, env = "DISTILL_SERVE_MAX_REFRESH_JOBS")]
    pub max_refresh_jobs: Option<usize>,
    /// Limits of every model whose `model.toml` does not set its own.
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: ModelLimits,
    /// Deadline of requests that set none (header x-request-timeout-ms, gRPC deadline), in ms;
    /// 0 = none [default: 300000].
    #[arg(long, env = "DISTILL_SERVE_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// After SIGTERM or Ctrl-C, how long in-flight requests may run to their end before they
    /// are cut (with an error), in seconds [default: 30].
    #[arg(long, env = "DISTILL_SERVE_SHUTDOWN_GRACE_S")]
    pub shutdown_grace_s: Option<u64>,
    /// Terminologies for constrained decoding, `NAME=KIND:PATH` (kinds: icd10cm-xml,
    /// icd10cm-order, snomed-rf2, tsv); repeatable.
    #[arg(long = "terminology", env = "DISTILL_SERVE_TERMINOLOGIES", value_delimiter = ',')]
    #[serde(default, rename = "terminology")]
    pub terminologies: Vec<TerminologySpec>,
    /// SQLite file of the dataset store (prompts, teacher outputs, refresh jobs) [default:
    /// <model repository>/.distill/store.sqlite3].
    #[arg(long, env = "DISTILL_SERVE_STORE")]
    pub store: Option<PathBuf>,
    /// The ONNX Runtime shared library [default: the one scripts/setup.sh installs; in a build
    /// with the `cuda` feature, its GPU build when `setup.sh --gpu` installed it].
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
    /// Folder of CUDA libraries the GPU providers preload (those it lacks come from the
    /// system) [default: the one `setup.sh --gpu` fills].
    #[arg(long, env = "DISTILL_SERVE_CUDA_LIBRARIES")]
    pub cuda_libraries: Option<PathBuf>,
    /// Once both listeners are bound, write their addresses here as JSON
    /// (`{"http": "127.0.0.1:8080", "grpc": "127.0.0.1:8081"}`), for supervisors and tests
    /// that start the server on port 0.
    #[arg(long, env = "DISTILL_SERVE_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

/// Settings with every default applied.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model_repository: PathBuf,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// API keys, admin token and whether `/metrics` needs them.
    pub auth: AuthSettings,
    /// Where audit lines go (none: nowhere).
    pub audit_log: Option<PathBuf>,
    /// TLS on both listeners, when configured.
    pub tls: Option<TlsSettings>,
    /// Connection count and header deadline of both listeners.
    pub connections: ConnectionLimits,
    /// Where refresh jobs may send requests, and how many run at once.
    pub jobs: JobPolicy,
    /// Whether the admin API may read datasets back.
    pub dataset_read: bool,
    /// Whether prompts and answers are logged (redacted).
    pub log_prompts: bool,
    /// How long captured prompts are kept (none: until deleted).
    pub capture_retention: Option<Duration>,
    /// Where traces are exported (none: not at all).
    pub traces: Option<TraceSettings>,
    pub ort_library: Option<PathBuf>,
    /// Folder of CUDA libraries to preload (none: the setup's).
    pub cuda_libraries: Option<PathBuf>,
    /// Where to write the bound addresses once listening.
    pub ready_file: Option<PathBuf>,
    /// SQLite file of the dataset store.
    pub store: PathBuf,
    pub request_timeout: Option<Duration>,
    /// How long a shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Limits of every model whose `model.toml` leaves them out.
    pub model_limits: ModelLimits,
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
        let audit_log = match self.audit_log.or(file.audit_log) {
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(path),
            None => Some(model_repository.join(".distill").join("audit.jsonl")),
        };
        let tls = match (self.tls_cert.or(file.tls_cert), self.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert,
                key,
                client_ca: self.tls_client_ca.or(file.tls_client_ca),
            }),
            (None, None) if self.tls_client_ca.is_none() && file.tls_client_ca.is_none() => None,
            _ => anyhow::bail!("TLS needs --tls-cert and --tls-key (and --tls-client-ca needs both)"),
        };
        let connections = ConnectionLimits {
            max_connections: self.max_connections.or(file.max_connections).unwrap_or(4096).max(1),
            header_timeout: Duration::from_millis(self.header_timeout_ms.or(file.header_timeout_ms).unwrap_or(30_000)),
        };
        let teacher_allow = if self.teacher_allow.is_empty() {
            file.teacher_allow
        } else {
            self.teacher_allow
        };
        let outbound = OutboundPolicy::new(&teacher_allow).map_err(anyhow::Error::msg)?;
        let traces = match self.otlp_endpoint.or(file.otlp_endpoint) {
            Some(endpoint) => Some(TraceSettings::new(
                &endpoint,
                self.otlp_service_name.or(file.otlp_service_name),
            )?),
            None => None,
        };
        Ok(ServerConfig {
            dataset_read: !(self.no_dataset_read || file.no_dataset_read),
            log_prompts: self.log_prompts || file.log_prompts,
            capture_retention: match self
                .capture_retention_days
                .or(file.capture_retention_days)
                .unwrap_or(30)
            {
                0 => None,
                days => Some(Duration::from_secs(days.saturating_mul(86_400))),
            },
            jobs: JobPolicy {
                outbound,
                max_running: self.max_refresh_jobs.or(file.max_refresh_jobs).unwrap_or(1).max(1),
            },
            traces,
            audit_log,
            tls,
            connections,
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
            auth: AuthSettings {
                admin_token: self.admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
                admin_token_file: self.admin_token_file.or(file.admin_token_file),
                api_key: self.api_key.or(file.api_key).filter(|t| !t.is_empty()),
                api_keys_file: self.api_keys_file.or(file.api_keys_file),
                protect_metrics: self.protect_metrics || file.protect_metrics,
            },
            ort_library: self.ort_library.or(file.ort_library),
            cuda_libraries: self.cuda_libraries.or(file.cuda_libraries),
            ready_file: self.ready_file.or(file.ready_file),
            request_timeout: match self.request_timeout_ms.or(file.request_timeout_ms).unwrap_or(300_000) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s.or(file.shutdown_grace_s).unwrap_or(30)),
            terminologies: if self.terminologies.is_empty() {
                file.terminologies
            } else {
                self.terminologies
            },
            model_limits: self.limits.or(&file.limits),
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
            limits: ModelLimits {
                max_queue: Some(7),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.grpc_addr.port(), 8081);
        assert_eq!(c.model_limits.max_queue, Some(7));
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
