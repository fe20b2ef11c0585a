//! `POST /v1/terminologies/{name}/coverage`: the knowledge coverage of a text against a loaded
//! terminology (the code mentions it makes and the share that exist).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::error::{ErrorKind, InferError};
use super::openai::parse_json;
use crate::constrain::ConstraintError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CoverageRequest {
    text: String,
}

/// The coverage of the posted `text`.
pub async fn coverage(State(state): State<AppState>, Path(name): Path<String>, body: Bytes) -> Response {
    let result = parse_json::<CoverageRequest>(&body).and_then(|req| {
        state.terminologies.coverage(&name, &req.text).map_err(|e| match e {
            ConstraintError::UnknownTerminology { .. } => InferError::new(ErrorKind::NotFound, e.to_string()),
            ConstraintError::Invalid(_) => InferError::bad_request(e.to_string()),
        })
    });
    match result {
        Ok(coverage) => Json(coverage).into_response(),
        Err(e) => e.into_response(),
    }
}
