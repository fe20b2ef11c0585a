//! KServe v2 (Open Inference Protocol) HTTP routes: health, server and model metadata.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::InferError;

/// Name of the BYTES input holding the prompt text.
pub const TEXT_INPUT: &str = "text_input";
/// Name of the BYTES output holding the generated text.
pub const TEXT_OUTPUT: &str = "text_output";

/// `GET /v2`.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({"name": "distill-serve", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
}

/// `GET /v2/health/live`: the process answers.
pub async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// `GET /v2/health/ready` (and `/health`): not draining, and every model that should serve can.
pub async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready}))).into_response()
}

/// `GET /v2/models/{name}`: versions, platform and the text input/output tensors.
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, InferError> {
    let model = state.repository.get(&name)?;
    Ok(Json(json!({
        "name": model.name,
        "versions": [model.version.to_string()],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}],
    })))
}

/// `GET /v2/models/{name}/ready` (decoders and encoders).
pub async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.repository.served(&name) {
        Ok(_) => (StatusCode::OK, Json(json!({"name": name, "ready": true}))).into_response(),
        Err(e) => InferError::from(e).into_response(),
    }
}
