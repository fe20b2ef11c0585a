//! Admin routes under `/admin/v1/`, behind a bearer token: list, load (or reload) and unload
//! models; list terminologies. Also the optional API key of the `/v1` routes.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::auth::{bearer, check_api_key, matches};
use super::error::{ErrorKind, InferError};
use crate::repository::ModelState;

/// Rejects requests without the configured token: 401 when absent, 403 when wrong (or when the
/// server has no admin token, which turns the admin API off).
pub async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match (&state.admin_token, bearer(request.headers())) {
        (None, _) => InferError::new(
            ErrorKind::PermissionDenied,
            "the admin API is off; start the server with --admin-token",
        )
        .into_response(),
        (Some(_), None) => InferError::new(ErrorKind::Unauthenticated, "missing bearer token").into_response(),
        (Some(expected), Some(token)) if matches(expected, token) => next.run(request).await,
        (Some(_), Some(_)) => InferError::new(ErrorKind::PermissionDenied, "wrong bearer token").into_response(),
    }
}

/// Rejects `/v1` requests without the configured API key (401), when the server has one.
pub async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match check_api_key(state.api_key.as_deref(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /admin/v1/models`: every model's state, version and load error.
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"models": state.repository.statuses()}))
}

/// `POST /admin/v1/models/{name}/load` (also `/reload`): loads the chosen version beside the
/// serving one and swaps it in.
pub async fn load(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, InferError> {
    let repository = state.repository.clone();
    let loaded = tokio::task::spawn_blocking(move || repository.load(&name))
        .await
        .map_err(|e| InferError::internal(e.to_string()))?;
    match loaded {
        Ok(model) => Ok(Json(
            json!({"name": model.name, "version": model.version, "state": ModelState::Ready}),
        )),
        Err(crate::repository::RepositoryError::Invalid(message)) => {
            Err(InferError::new(ErrorKind::Unprocessable, message))
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /admin/v1/models/{name}/unload`.
pub async fn unload(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>, InferError> {
    state.repository.unload(&name)?;
    Ok(Json(json!({"name": name, "state": ModelState::Unloaded})))
}

/// `GET /admin/v1/terminologies`: the loaded terminologies and what each holds.
pub async fn terminologies(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "terminologies": state.terminologies.summaries() }))
}
