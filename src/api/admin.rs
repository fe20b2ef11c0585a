//! Admin routes under `/admin/v1/` (behind the admin token, see [`crate::auth`]): list, load
//! (or reload) and unload models; list terminologies.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::AppState;
use super::error::{ErrorKind, InferError};
use crate::repository::ModelState;

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
