//! KServe v2 (Open Inference Protocol) HTTP routes: health, server and model metadata, and
//! JSON tensor inference on encoders (`POST /v2/models/{name}/infer`: a BYTES input of N texts,
//! an FP32 output of N rows).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::InferError;
use super::openai::{parse_json, timeout};
use crate::infer::{EncodeRequest, Endpoint, embedding};
use crate::repository::{EncoderTask, EncoderVersion, Served};

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
    let model = state.repository.served(&name)?;
    let (inputs, outputs) = match &model {
        Served::Decoder(_) => (
            json!([{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [1]}]),
            json!([{"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [1]}]),
        ),
        Served::Encoder(e) => (
            json!([{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]),
            json!([{"name": output_name(e.task), "datatype": "FP32", "shape": [-1, -1]}]),
        ),
    };
    Ok(Json(json!({
        "name": model.name(),
        "versions": [model.version().to_string()],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
    })))
}

/// `GET /v2/models/{name}/ready` (decoders and encoders).
pub async fn model_ready(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.repository.served(&name) {
        Ok(_) => (StatusCode::OK, Json(json!({"name": name, "ready": true}))).into_response(),
        Err(e) => InferError::from(e).into_response(),
    }
}

/// The name of the output tensor an encoder of `task` answers in.
pub fn output_name(task: EncoderTask) -> &'static str {
    match task {
        EncoderTask::Embedding => "embeddings",
        _ => "logits",
    }
}

/// One FP32 row per text from `model` (logits of a classifier, pooled embeddings), for both
/// KServe transports.
pub async fn encoder_rows(
    state: &AppState,
    model: &EncoderVersion,
    texts: Vec<String>,
    truncate: bool,
    timeout: Option<Duration>,
) -> Result<(Arc<EncoderVersion>, Vec<Vec<f32>>), InferError> {
    if model.task == EncoderTask::TokenClassification {
        return Err(InferError::invalid(
            "model",
            format!("model `{}` labels tokens: use POST /v1/classify", model.name),
        ));
    }
    let request = EncodeRequest::new(Some(model.name.clone()), texts, truncate, timeout);
    let (model, encoded) = state.infer.encode(Endpoint::ModelInfer, request).await?;
    let rows = encoded
        .iter()
        .map(|e| match model.task {
            EncoderTask::Embedding => embedding(&model, e, model.normalize),
            _ => e.output.values.clone(),
        })
        .collect();
    Ok((model, rows))
}

/// `POST /v2/models/{name}/infer` (JSON): `{"inputs": [{"name": "text_input", "datatype":
/// "BYTES", "shape": [N], "data": [...]}], "parameters": {"truncate": bool}}` on an encoder.
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, InferError> {
    let model = match state.repository.served(&name)? {
        Served::Encoder(model) => model,
        Served::Decoder(_) => {
            return Err(InferError::invalid(
                "model",
                format!("model `{name}` is a decoder: use /v1/completions or gRPC ModelInfer"),
            ));
        }
    };
    let req: Value = parse_json(&body)?;
    let input = req["inputs"]
        .as_array()
        .and_then(|inputs| inputs.iter().find(|i| i["name"] == TEXT_INPUT).or(inputs.first()))
        .ok_or_else(|| InferError::invalid("inputs", format!("expected an input named `{TEXT_INPUT}`")))?;
    if input["datatype"] != "BYTES" {
        return Err(InferError::invalid("inputs", "the input's datatype must be BYTES"));
    }
    let texts: Vec<String> = input["data"]
        .as_array()
        .map(|data| data.iter().filter_map(|d| d.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let elements: i64 = input["shape"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_i64).product())
        .unwrap_or(-1);
    if elements != texts.len() as i64 {
        return Err(InferError::invalid(
            "inputs",
            format!(
                "the input's shape {} holds {elements} elements, its data {} strings",
                input["shape"],
                texts.len()
            ),
        ));
    }
    let truncate = req["parameters"]["truncate"].as_bool().unwrap_or(false);
    let (model, rows) = encoder_rows(&state, &model, texts, truncate, timeout(&headers)?).await?;
    let width = rows.first().map_or(0, Vec::len);
    Ok(Json(json!({
        "model_name": model.name,
        "model_version": model.version.to_string(),
        "id": req["id"],
        "outputs": [{
            "name": output_name(model.task),
            "datatype": "FP32",
            "shape": [rows.len(), width],
            "data": rows.concat(),
        }],
    })))
}
