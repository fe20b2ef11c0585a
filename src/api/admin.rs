//! Admin routes under `/admin/v1/` (behind the admin token, see [`crate::auth`]): list, load
//! (or reload) and unload models; list terminologies and install a release under a name.

use std::path::PathBuf;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ErrorKind, InferError};
use super::openai::parse_json;
use crate::constrain::{SourceKind, TerminologySpec};
use crate::infer::{label_coverage, log_label_coverage};
use crate::repository::{ModelState, Served};

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
        Ok(model) => {
            let mut answer = json!({"name": model.name(), "version": model.version(), "state": ModelState::Ready});
            // A classifier's labels against the terminologies whose codes they are.
            if let Served::Encoder(encoder) = &model {
                log_label_coverage(encoder, &state.terminologies);
                answer["label_coverage"] = json!(label_coverage(encoder, &state.terminologies));
            }
            Ok(Json(answer))
        }
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

/// `GET /admin/v1/terminologies`: the loaded terminologies, their releases and what each holds.
pub async fn terminologies(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "terminologies": state.terminologies.summaries() }))
}

/// Body of `PUT /admin/v1/terminologies/{name}`: the release to serve under that name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallRequest {
    kind: SourceKind,
    /// A release file (or, for SNOMED CT, the RF2 release folder) on the server's disk.
    path: PathBuf,
}

/// `PUT /admin/v1/terminologies/{name}`: loads a release beside the one the name serves (no
/// request waits for it), then serves it under the name. Requests already admitted finish on
/// the release they were compiled from.
pub async fn install_terminology(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, InferError> {
    let req: InstallRequest = parse_json(&body)?;
    let spec = TerminologySpec {
        name: name.clone(),
        kind: req.kind,
        path: req.path,
    };
    let terminologies = state.terminologies.clone();
    let installed = tokio::task::spawn_blocking(move || terminologies.install(spec))
        .await
        .map_err(|e| InferError::internal(e.to_string()))?;
    let (new, old) = installed.map_err(|e| InferError::new(ErrorKind::Unprocessable, e.to_string()))?;
    tracing::info!(
        name = %name,
        release = %new.release.version,
        replaced = old.as_ref().map_or("none", |o| o.release.version.as_str()),
        codes = new.stats.codes,
        "terminology release installed"
    );
    Ok(Json(json!({ "terminology": new, "replaced": old })))
}
