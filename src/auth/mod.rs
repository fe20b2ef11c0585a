//! Who is calling, decided the same way on every protocol. A request's path says what it needs
//! ([`Access`]): probes and metadata are open, model routes (HTTP `/v1`, gRPC `Generate`,
//! KServe `ModelInfer`) need an API key when any is configured, `/admin` needs the admin token,
//! `/metrics` needs either when `--protect-metrics` is on. Keys come from `--api-key` (tenant
//! `default`) and `--api-keys-file` (named tenants with limits, reloaded on change); the admin
//! token from `--admin-token` or `--admin-token-file`. A caller that passes runs inside a
//! [`scope`], so the request layer can charge its limits and label its metrics by tenant.

pub mod keys;
pub mod limits;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::http::{HeaderMap, header};
use subtle::ConstantTimeEq;
use tokio::sync::OwnedSemaphorePermit;

use crate::audit::{Audit, Entry};
use crate::watch::{Parser, Watched, warn_if_shared};
pub use keys::Keyring;
use limits::{KeyLimits, Limiter};

/// Why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, or one the server does not know (401, `UNAUTHENTICATED`).
    Unauthenticated,
    /// A credential that does not open this door (403, `PERMISSION_DENIED`).
    Forbidden,
    /// The key is past one of its limits (429, `RESOURCE_EXHAUSTED`).
    Limited,
    /// The request alone is more than the key's limit allows (400, `INVALID_ARGUMENT`).
    TooLarge,
}

/// A refused caller: why, in words that name the limit, and when to retry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub refusal: Refusal,
    pub message: String,
    /// Seconds to wait before retrying (limits only).
    pub retry_after: Option<u64>,
}

impl AuthError {
    fn new(refusal: Refusal, message: impl Into<String>) -> Self {
        Self {
            refusal,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(self, seconds: u64) -> Self {
        Self {
            retry_after: Some(seconds),
            ..self
        }
    }
}

/// Name of callers without a key, where none is needed (or none matched, in the audit log).
pub const ANONYMOUS: &str = "anonymous";
/// Name of the admin token's holder.
pub const ADMIN: &str = "admin";

/// What a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health, readiness, server and model metadata, gRPC reflection: probes need them open.
    Open,
    /// Runs a model or reads a terminology (`/fhir/`): an API key, when keys are configured.
    Model,
    /// Changes what is served: the admin token.
    Admin,
    /// Prometheus metrics: a key or the admin token when protected.
    Metrics,
}

/// What `path` (an HTTP route or a gRPC method) needs.
pub fn access(path: &str) -> Access {
    let kserve_infer = path.strip_prefix("/v2/models/").is_some_and(|rest| {
        rest.ends_with("/infer") || rest.ends_with("/generate") || rest.ends_with("/generate_stream")
    });
    if path.starts_with("/admin/") || path == "/admin" {
        Access::Admin
    } else if path.starts_with("/v1/")
        || path.starts_with("/fhir/")
        || path == "/predict"
        || path == "/embed"
        || path == "/rerank"
        || path == "/tokenize"
        || path == "/decode"
        || kserve_infer
        || path.starts_with("/distill_serve.v1.Generate/")
        || path == "/inference.GRPCInferenceService/ModelInfer"
    {
        Access::Model
    } else if path == "/metrics" {
        Access::Metrics
    } else {
        Access::Open
    }
}

/// Who a request comes from, once authenticated.
#[derive(Clone)]
pub struct Caller {
    /// The tenant (key name), [`ADMIN`] or [`ANONYMOUS`].
    pub name: Arc<str>,
    /// The client's address, when the transport knows it.
    pub client: Option<SocketAddr>,
    limiter: Option<Arc<Limiter>>,
}

impl Caller {
    /// A caller without a key.
    pub fn anonymous(client: Option<SocketAddr>) -> Self {
        Self {
            name: ANONYMOUS.into(),
            client,
            limiter: None,
        }
    }

    /// Admits a generation that may use `tokens`, under the key's limits: the permit (if the
    /// key limits concurrency) is held until the generation ends.
    pub fn admit(&self, tokens: usize) -> Result<Option<OwnedSemaphorePermit>, AuthError> {
        match &self.limiter {
            Some(limiter) => limiter.admit(&self.name, tokens),
            None => Ok(None),
        }
    }
}

tokio::task_local! {
    static CALLER: Caller;
}

/// Runs `fut` as `caller`'s request.
pub async fn scope<F: Future>(caller: Caller, fut: F) -> F::Output {
    CALLER.scope(caller, fut).await
}

/// The caller of the request this task serves (none outside a request).
pub fn current() -> Option<Caller> {
    CALLER.try_with(Clone::clone).ok()
}

/// Where keys and the admin token come from.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub api_key: Option<String>,
    pub api_keys_file: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    pub protect_metrics: bool,
}

/// Checks every request's credentials; cloning shares it.
#[derive(Clone)]
pub struct Authenticator {
    keys: Watched<Keyring>,
    admin: Option<Watched<String>>,
    protect_metrics: bool,
    audit: Audit,
}

impl Authenticator {
    /// Loads keys and token (files are then watched for changes); failures are logged to `audit`.
    pub fn new(settings: &AuthSettings, audit: Audit) -> Result<Self> {
        let flag_key = settings.api_key.clone();
        let with_flag_key = move |mut ring: Keyring| -> Result<Keyring> {
            if let Some(key) = &flag_key {
                let limiter = Arc::new(Limiter::new(KeyLimits::default()).map_err(anyhow::Error::msg)?);
                ring.add("default", key.clone(), limiter)?;
            }
            Ok(ring)
        };
        let keys = match &settings.api_keys_file {
            Some(path) => {
                warn_if_shared(path);
                let parse: Parser<Keyring> = Arc::new(move |bytes, previous| {
                    let text = std::str::from_utf8(bytes.strip_suffix(&[0]).unwrap_or(bytes))?;
                    with_flag_key(Keyring::parse(text, previous)?)
                });
                Watched::load("API keys", vec![path.clone()], parse)?
            }
            None => Watched::fixed(with_flag_key(Keyring::default())?),
        };
        let admin = match (&settings.admin_token, &settings.admin_token_file) {
            (Some(_), Some(_)) => bail!("give the admin token once: --admin-token or --admin-token-file"),
            (Some(token), None) => Some(Watched::fixed(token.clone())),
            (None, Some(path)) => {
                warn_if_shared(path);
                let parse: Parser<String> = Arc::new(|bytes, _| admin_token(bytes));
                Some(Watched::load("admin token", vec![path.clone()], parse)?)
            }
            (None, None) => None,
        };
        Ok(Self {
            keys,
            admin,
            protect_metrics: settings.protect_metrics,
            audit,
        })
    }

    /// The audit log failures and admin actions go to.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// Whether `path` may be served to the holder of `headers`' bearer token, and as whom.
    /// Refusals: 401 for a missing or unknown credential, 403 for a wrong admin token (or an
    /// admin API turned off), 429 for a key past its request rate; failed credentials are
    /// written to the audit log.
    pub fn check(&self, path: &str, headers: &HeaderMap, client: Option<SocketAddr>) -> Result<Caller, AuthError> {
        let given = bearer(headers);
        let admin = self.admin.as_ref().map(Watched::get);
        let is_admin = |token: &str| admin.as_deref().is_some_and(|a| matches(a, token));
        match access(path) {
            Access::Open => Ok(Caller::anonymous(client)),
            Access::Metrics if !self.protect_metrics => Ok(Caller::anonymous(client)),
            needed @ (Access::Model | Access::Metrics) => {
                let keys = self.keys.get();
                let metrics = needed == Access::Metrics;
                if keys.is_empty() && !metrics {
                    return Ok(Caller::anonymous(client));
                }
                if let Some(key) = given.and_then(|g| keys.find(g)) {
                    key.limiter.check_request(&key.name)?;
                    return Ok(Caller {
                        name: Arc::clone(&key.name),
                        client,
                        limiter: Some(Arc::clone(&key.limiter)),
                    });
                }
                if metrics && given.is_some_and(is_admin) {
                    return Ok(Caller {
                        name: ADMIN.into(),
                        client,
                        limiter: None,
                    });
                }
                let why = if given.is_some() {
                    "unknown API key"
                } else {
                    "missing API key"
                };
                self.denied(path, client, why);
                Err(AuthError::new(Refusal::Unauthenticated, "invalid or missing API key"))
            }
            Access::Admin => match (&admin, given) {
                (None, _) => Err(AuthError::new(
                    Refusal::Forbidden,
                    "the admin API is off; start the server with --admin-token-file",
                )),
                (Some(_), None) => {
                    self.denied(path, client, "missing admin token");
                    Err(AuthError::new(Refusal::Unauthenticated, "missing bearer token"))
                }
                (Some(_), Some(token)) if is_admin(token) => Ok(Caller {
                    name: ADMIN.into(),
                    client,
                    limiter: None,
                }),
                (Some(_), Some(_)) => {
                    self.denied(path, client, "wrong admin token");
                    Err(AuthError::new(Refusal::Forbidden, "wrong bearer token"))
                }
            },
        }
    }

    fn denied(&self, path: &str, client: Option<SocketAddr>, why: &str) {
        tracing::info!(path, client = ?client, "authentication failed: {why}");
        self.audit.record(Entry {
            actor: ANONYMOUS.into(),
            client,
            action: "authenticate".into(),
            target: path.into(),
            outcome: format!("denied: {why}"),
        });
    }
}

/// The admin token file's first line; at least [`keys::MIN_KEY_LEN`] characters.
fn admin_token(bytes: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(bytes).context("the admin token file is not UTF-8")?;
    let token = text.trim_end_matches('\0').lines().next().unwrap_or("").trim();
    if token.len() < keys::MIN_KEY_LEN {
        bail!("the admin token must be at least {} characters", keys::MIN_KEY_LEN);
    }
    Ok(token.to_string())
}

/// The token of an `Authorization: Bearer <token>` header (HTTP header or gRPC metadata).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether `given` is `expected`, in time that does not depend on where they differ.
pub fn matches(expected: &str, given: &str) -> bool {
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        }
        h
    }

    #[test]
    fn paths_are_classified_alike_on_both_protocols() {
        assert_eq!(access("/v1/chat/completions"), Access::Model);
        assert_eq!(access("/distill_serve.v1.Generate/GenerateStream"), Access::Model);
        assert_eq!(access("/inference.GRPCInferenceService/ModelInfer"), Access::Model);
        assert_eq!(access("/v2/models/m/infer"), Access::Model);
        assert_eq!(access("/admin/v1/models/m/load"), Access::Admin);
        assert_eq!(access("/metrics"), Access::Metrics);
        for open in [
            "/v2/health/ready",
            "/health",
            "/v2/models/m/ready",
            "/v2/models/m",
            "/grpc.health.v1.Health/Check",
            "/inference.GRPCInferenceService/ServerReady",
        ] {
            assert_eq!(access(open), Access::Open, "{open}");
        }
    }

    #[test]
    fn keys_name_their_tenant_and_the_admin_token_only_opens_admin_and_metrics() {
        let settings = AuthSettings {
            api_key: Some("flag-key".into()),
            admin_token: Some("admin-token".into()),
            protect_metrics: true,
            ..Default::default()
        };
        let auth = Authenticator::new(&settings, Audit::off()).unwrap();
        let check = |path, token| auth.check(path, &headers(token), None);
        assert_eq!(
            &*check("/v1/completions", Some("flag-key")).ok().unwrap().name,
            "default"
        );
        assert_eq!(
            check("/v1/completions", None).err().unwrap().refusal,
            Refusal::Unauthenticated
        );
        assert_eq!(
            check("/v1/completions", Some("admin-token")).err().unwrap().refusal,
            Refusal::Unauthenticated
        );
        assert_eq!(
            &*check("/admin/v1/models", Some("admin-token")).ok().unwrap().name,
            ADMIN
        );
        assert_eq!(
            check("/admin/v1/models", Some("flag-key")).err().unwrap().refusal,
            Refusal::Forbidden
        );
        assert_eq!(
            check("/admin/v1/models", None).err().unwrap().refusal,
            Refusal::Unauthenticated
        );
        assert!(check("/metrics", Some("admin-token")).is_ok() && check("/metrics", Some("flag-key")).is_ok());
        assert_eq!(check("/metrics", None).err().unwrap().refusal, Refusal::Unauthenticated);
        assert!(check("/v2/health/ready", None).is_ok());

        let open = Authenticator::new(&AuthSettings::default(), Audit::off()).unwrap();
        assert_eq!(
            &*open.check("/v1/completions", &headers(None), None).ok().unwrap().name,
            ANONYMOUS
        );
        assert!(open.check("/metrics", &headers(None), None).is_ok());
        assert_eq!(
            open.check("/admin/v1/models", &headers(Some("x")), None)
                .err()
                .unwrap()
                .refusal,
            Refusal::Forbidden
        );
    }

    #[test]
    fn the_admin_token_file_needs_a_long_first_line() {
        assert_eq!(admin_token(b"0123456789abcdef\nignored\0").unwrap(), "0123456789abcdef");
        assert!(admin_token(b"short\n").is_err() && admin_token(b"\n").is_err());
    }
}
