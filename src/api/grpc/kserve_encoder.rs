//! KServe v2 `ModelInfer` on an encoder, as Triton clients call a classifier or an embedding
//! model: one BYTES input of N texts (`text_input`, shape `[N]` or `[N, 1]`) and one FP32
//! output, `logits` (`[N, labels]`) for a sequence classifier or `embeddings` (`[N, hidden]`,
//! pooled as the model says) for an embedding model, in `raw_output_contents` as Triton sends
//! it. A `truncate` boolean parameter cuts long inputs. Token classifiers answer on
//! `/v1/classify` only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
    model_infer_response::InferOutputTensor,
};
use crate::api::AppState;
use crate::api::kserve::{TEXT_INPUT, encoder_rows, output_name};
use crate::infer::InferError;
use crate::repository::EncoderVersion;

/// Runs `req` on `model`.
pub async fn infer(
    state: &AppState,
    model: Arc<EncoderVersion>,
    req: ModelInferRequest,
    timeout: Option<Duration>,
) -> Result<ModelInferResponse, InferError> {
    let truncate = match req.parameters.get("truncate").and_then(|p| p.parameter_choice.as_ref()) {
        None => false,
        Some(ParameterChoice::BoolParam(b)) => *b,
        Some(_) => {
            return Err(InferError::invalid(
                "truncate",
                "parameter `truncate` must be a boolean",
            ));
        }
    };
    let (model, rows) = encoder_rows(state, &model, texts(&req)?, truncate, timeout).await?;
    let width = rows.first().map_or(0, Vec::len);
    let raw: Vec<u8> = rows.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
    let task = InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(format!("{:?}", model.task))),
    };
    Ok(ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id: req.id,
        parameters: HashMap::from([("task".to_string(), task)]),
        outputs: vec![InferOutputTensor {
            name: output_name(model.task).into(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, width as i64],
            parameters: HashMap::new(),
            contents: None::<InferTensorContents>,
        }],
        raw_output_contents: vec![raw],
    })
}

/// The texts of the BYTES input: from `raw_input_contents` (each element a 4-byte
/// little-endian length and its bytes) or `contents.bytes_contents`.
fn texts(req: &ModelInferRequest) -> Result<Vec<String>, InferError> {
    let (index, input) = match req.inputs.iter().enumerate().find(|(_, i)| i.name == TEXT_INPUT) {
        Some(found) => found,
        None if req.inputs.len() == 1 => (0, &req.inputs[0]),
        None => {
            return Err(InferError::bad_request(format!(
                "expected one input named `{TEXT_INPUT}`"
            )));
        }
    };
    if input.datatype != "BYTES" {
        return Err(InferError::bad_request(format!(
            "input `{}` must have datatype BYTES, got {}",
            input.name, input.datatype
        )));
    }
    let elements = input.shape.iter().product::<i64>().max(0) as usize;
    let items: Vec<Vec<u8>> = match (req.raw_input_contents.get(index), &input.contents) {
        (Some(raw), _) => {
            let mut items = Vec::new();
            let mut rest = raw.as_slice();
            while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                let len = u32::from_le_bytes(*len) as usize;
                let Some(item) = tail.get(..len) else {
                    return Err(InferError::bad_request(
                        "raw_input_contents: a BYTES element is a 4-byte length and that many bytes",
                    ));
                };
                items.push(item.to_vec());
                rest = &tail[len..];
            }
            items
        }
        (None, Some(contents)) => contents.bytes_contents.clone(),
        (None, None) => {
            return Err(InferError::bad_request(format!(
                "input `{}` has no contents",
                input.name
            )));
        }
    };
    if items.len() != elements {
        return Err(InferError::bad_request(format!(
            "input `{}` has shape {:?} but holds {} elements",
            input.name,
            input.shape,
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            String::from_utf8(bytes)
                .map_err(|_| InferError::bad_request(format!("element {i} of `{}` is not valid UTF-8", input.name)))
        })
        .collect()
}
