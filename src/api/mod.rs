//! The HTTP API: OpenAI-compatible routes, encoder routes (TEI's `/predict`, `/v1/classify`),
//! KServe v2 health and metadata, Prometheus metrics, the FHIR terminology operations
//! (`/fhir/`) and the admin routes, on one axum router.

mod admin;
pub mod auth;
mod distill;
mod encode;
pub mod error;
mod fhir;
pub mod grpc;
mod kserve;
pub mod limits;
pub mod openai;
pub mod request_id;
mod terminology;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};

use crate::auth::Authenticator;
use crate::constrain::Terminologies;
use crate::distill::service::Distiller;
use crate::infer::Infer;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::repository::{ModelState, Repository};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub repository: Arc<Repository>,
    /// Terminologies requests may be constrained to.
    pub terminologies: Arc<Terminologies>,
    pub metrics: Arc<Metrics>,
    /// Who may call what (API keys, the admin token), and the audit log.
    pub auth: Authenticator,
    /// Distillation refresh jobs and their dataset store.
    pub distiller: Arc<Distiller>,
    /// The request layer generation routes hand their requests to.
    pub infer: Infer,
    /// Serving or draining: readiness answers from it.
    pub lifecycle: Arc<Lifecycle>,
    /// Whether the admin API may read datasets' prompts back.
    pub dataset_read: bool,
}

impl AppState {
    /// Whether the server takes requests: not draining, and every model that should serve can.
    pub fn is_ready(&self) -> bool {
        !self.lifecycle.is_draining() && self.repository.all_ready()
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/v1/models", get(admin::list))
        .route("/admin/v1/terminologies", get(admin::terminologies))
        .route("/admin/v1/terminologies/{name}", put(admin::install_terminology))
        .route("/admin/v1/models/{name}/load", post(admin::load))
        .route("/admin/v1/models/{name}/reload", post(admin::load))
        .route("/admin/v1/models/{name}/unload", post(admin::unload))
        .route("/admin/v1/models/{name}/refresh", post(distill::refresh))
        .route("/admin/v1/models/{name}/rollback", post(distill::rollback))
        .route("/admin/v1/jobs", get(distill::jobs))
        .route("/admin/v1/jobs/{id}", get(distill::job))
        .route("/admin/v1/jobs/{id}/events", get(distill::events))
        .route("/admin/v1/jobs/{id}/cancel", post(distill::cancel))
        .route("/admin/v1/datasets", get(distill::datasets))
        .layer(DefaultBodyLimit::max(limits::MAX_ADMIN_BODY_BYTES))
        // Dataset names may hold a slash (`capture/<model>`).
        .route(
            "/admin/v1/datasets/{*name}",
            post(distill::upload)
                .get(distill::dataset)
                .delete(distill::delete_dataset)
                .layer(DefaultBodyLimit::max(limits::MAX_UPLOAD_BYTES)),
        );
    let v1 = Router::new()
        .route("/v1/models", get(openai::list_models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/terminologies/{name}/coverage", post(terminology::coverage))
        .route("/v1/classify", post(encode::classify))
        .route("/predict", post(encode::predict))
        .route("/embed", post(encode::embed))
        .route("/rerank", post(encode::rerank))
        .route("/tokenize", post(encode::tokenize))
        .route("/decode", post(encode::decode))
        .route("/v1/embeddings", post(encode::embeddings))
        .route("/fhir/CodeSystem/$validate-code", get(fhir::validate_code))
        .route("/fhir/CodeSystem/$lookup", get(fhir::lookup))
        .route("/fhir/ValueSet/$expand", get(fhir::expand))
        .layer(DefaultBodyLimit::max(limits::MAX_REQUEST_BODY_BYTES));
    Router::new()
        .merge(v1)
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        // TGI, TEI and vLLM clients probe `/health`.
        .route("/health", get(kserve::ready))
        .route("/v2/models/{name}", get(kserve::model_metadata))
        .route("/v2/models/{name}/ready", get(kserve::model_ready))
        .route("/v2/models/{name}/infer", post(kserve::infer))
        .route("/metrics", get(metrics))
        .merge(admin)
        // Every route, the fallback included, is authenticated by its path (`auth::access`).
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .layer(axum::middleware::from_fn(limits::json_errors))
        .layer(request_id::RequestIdLayer)
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Readiness is read at scrape time, so it cannot go stale.
    for status in state.repository.statuses() {
        let ready = match status.state {
            ModelState::Ready => Some(true),
            ModelState::Unavailable => Some(false),
            ModelState::Unloaded => None,
        };
        state.metrics.set_model_ready(&status.name, ready);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
