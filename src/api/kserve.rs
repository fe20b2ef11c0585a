//! KServe v2 (Open Inference Protocol) HTTP routes: health, server and model metadata, and
//! tensor inference on encoders (`POST /v2/models/{name}/infer`: a BYTES input of N texts, an
//! FP32 output of N rows), in JSON or with Triton's binary tensor data extension, so that
//! `tritonclient.http` works with its defaults.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::InferError;
use super::openai::{parse_json, timeout};
use crate::infer::{EncodeRequest, Endpoint, TruncationDirection, embedding};
use crate::repository::{EncoderTask, EncoderVersion, Served};

/// Name of the BYTES input holding the prompt text.
pub const TEXT_INPUT: &str = "text_input";
/// Name of the BYTES output holding the generated text.
pub const TEXT_OUTPUT: &str = "text_output";

/// An error on a KServe v2 route, in the protocol's shape `{"error": "message"}` (a string,
/// which Triton's clients read), with the status and headers of the [`InferError`].
pub struct KServeError(pub InferError);

impl<E> From<E> for KServeError
where
    InferError: From<E>,
{
    fn from(e: E) -> Self {
        Self(InferError::from(e))
    }
}

impl IntoResponse for KServeError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.0.message}).to_string();
        let mut response = self.0.into_response();
        *response.body_mut() = Body::from(body);
        response
    }
}

/// `GET /v2`.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({"name": "distill-serve", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}))
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
) -> Result<Json<Value>, KServeError> {
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
        Err(e) => KServeError::from(e).into_response(),
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
    let truncate = truncate.then_some(TruncationDirection::Right);
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

/// Header of the binary tensor extension: the length of the JSON that starts the body; the
/// tensors' bytes follow it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The elements of a BYTES tensor in its raw form: each a 4-byte little-endian length followed
/// by that many bytes (the binary tensor extension and gRPC's `raw_input_contents`).
pub fn bytes_elements(raw: &[u8]) -> Result<Vec<Vec<u8>>, InferError> {
    let mut items = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let item = rest.split_first_chunk::<4>().and_then(|(len, tail)| {
            let len = u32::from_le_bytes(*len) as usize;
            Some((tail.get(..len)?, &tail[len..]))
        });
        let Some((item, tail)) = item else {
            return Err(InferError::bad_request(
                "a raw BYTES element is a 4-byte little-endian length and that many bytes",
            ));
        };
        items.push(item.to_vec());
        rest = tail;
    }
    Ok(items)
}

/// The texts of BYTES `elements` of input `name`, which must be valid UTF-8.
pub fn utf8_texts(name: &str, elements: Vec<Vec<u8>>) -> Result<Vec<String>, InferError> {
    elements
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            String::from_utf8(bytes)
                .map_err(|_| InferError::bad_request(format!("element {i} of input `{name}` is not valid UTF-8")))
        })
        .collect()
}

/// Splits a request body into its JSON header and the binary tensor data after it, as the
/// [`HEADER_LENGTH`] header says (all JSON without it).
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), InferError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let length = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n <= body.len())
        .ok_or_else(|| {
            InferError::bad_request(format!(
                "{HEADER_LENGTH} must be a byte count no larger than the body ({} bytes)",
                body.len()
            ))
        })?;
    Ok(body.split_at(length))
}

/// The `binary_data_size` parameter of a tensor, if it travels as binary data.
fn binary_size(tensor: &Value) -> Option<usize> {
    tensor["parameters"]["binary_data_size"].as_u64().map(|n| n as usize)
}

/// The texts of the request's BYTES input, from its JSON `data` (flat or nested) or from its
/// slice of the binary data (inputs' binary parts follow each other in input order).
fn input_texts(req: &Value, binary: &[u8]) -> Result<Vec<String>, InferError> {
    let inputs = req["inputs"].as_array().map(Vec::as_slice).unwrap_or_default();
    let index = inputs
        .iter()
        .position(|i| i["name"] == TEXT_INPUT)
        .or((inputs.len() == 1).then_some(0))
        .ok_or_else(|| InferError::invalid("inputs", format!("expected an input named `{TEXT_INPUT}`")))?;
    let input = &inputs[index];
    let name = input["name"].as_str().unwrap_or(TEXT_INPUT);
    if input["datatype"] != "BYTES" {
        return Err(InferError::invalid("inputs", "the input's datatype must be BYTES"));
    }
    let texts = match binary_size(input) {
        Some(size) => {
            // Saturating: sizes are the client's numbers, and must not overflow into a panic.
            let offset = inputs[..index]
                .iter()
                .filter_map(binary_size)
                .fold(0, usize::saturating_add);
            let raw = offset
                .checked_add(size)
                .and_then(|end| binary.get(offset..end))
                .ok_or_else(|| {
                    InferError::invalid(
                        "inputs",
                        format!(
                            "input `{name}` says {size} binary bytes at {offset}; the body has {}",
                            binary.len()
                        ),
                    )
                })?;
            utf8_texts(name, bytes_elements(raw)?)?
        }
        None => {
            let mut texts = Vec::new();
            flatten_strings(&input["data"], &mut texts)?;
            texts
        }
    };
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
    Ok(texts)
}

/// Collects the strings of a BYTES tensor's JSON data, which may be nested by its shape.
fn flatten_strings(data: &Value, out: &mut Vec<String>) -> Result<(), InferError> {
    match data {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().try_for_each(|item| flatten_strings(item, out))?,
        Value::Null => {}
        other => {
            return Err(InferError::invalid(
                "inputs",
                format!("a BYTES input holds strings, not {other}"),
            ));
        }
    }
    Ok(())
}

/// Whether the answer's tensor goes as binary data: asked for by the request's
/// `binary_data_output` parameter or by the output's `binary_data`. An output the model does
/// not have is an error.
fn binary_output(req: &Value, output: &str) -> Result<bool, InferError> {
    let mut binary = req["parameters"]["binary_data_output"].as_bool().unwrap_or(false);
    for requested in req["outputs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        if requested["name"] != output {
            return Err(InferError::invalid(
                "outputs",
                format!("this model has one output, `{output}`; asked for {}", requested["name"]),
            ));
        }
        if let Some(b) = requested["parameters"]["binary_data"].as_bool() {
            binary = b;
        }
    }
    Ok(binary)
}

/// `POST /v2/models/{name}/infer` on an encoder: `{"inputs": [{"name": "text_input",
/// "datatype": "BYTES", "shape": [N], "data": [...]}], "parameters": {"truncate": bool}}`, in
/// JSON or with the binary tensor extension (inputs and the output, as the request asks).
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, KServeError> {
    let model = match state.repository.served(&name)? {
        Served::Encoder(model) => model,
        Served::Decoder(_) => {
            return Err(InferError::invalid(
                "model",
                format!("model `{name}` is a decoder: use /v1/completions or gRPC ModelInfer"),
            )
            .into());
        }
    };
    let (header, binary) = split_body(&headers, &body)?;
    let req: Value = parse_json(header)?;
    let texts = input_texts(&req, binary)?;
    let output = output_name(model.task);
    let binary_out = binary_output(&req, output)?;
    let truncate = req["parameters"]["truncate"].as_bool().unwrap_or(false);
    let (model, rows) = encoder_rows(&state, &model, texts, truncate, timeout(&headers)?).await?;
    let width = rows.first().map_or(0, Vec::len);
    let mut tensor = json!({"name": output, "datatype": "FP32", "shape": [rows.len(), width]});
    let values = rows.concat();
    let raw: Vec<u8> = if binary_out {
        tensor["parameters"] = json!({"binary_data_size": values.len() * 4});
        values.iter().flat_map(|x| x.to_le_bytes()).collect()
    } else {
        tensor["data"] = json!(values);
        Vec::new()
    };
    let answer = json!({
        "model_name": model.name,
        "model_version": model.version.to_string(),
        "id": req["id"],
        "outputs": [tensor],
    });
    if !binary_out {
        return Ok(Json(answer).into_response());
    }
    let mut body = answer.to_string().into_bytes();
    let length = body.len();
    body.extend_from_slice(&raw);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (HeaderName::from_static(HEADER_LENGTH), length.to_string()),
        ],
        body,
    )
        .into_response())
}
