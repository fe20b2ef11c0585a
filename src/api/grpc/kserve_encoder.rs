//! KServe v2 `ModelInfer` on an encoder, as Triton clients call a classifier or an embedding
//! model: one BYTES input of N texts (`text_input`, shape `[N]` or `[N, 1]`) and one FP32
//! output, `logits` (`[N, labels]`) for a sequence classifier or `embeddings` (`[N, hidden]`,
//! pooled as the model says) for an embedding model, in `raw_output_contents` as Triton sends
//! it. A `truncate` boolean parameter cuts long inputs. Token classifiers answer on
//! `/v1/classify` only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::kserve::{bool_param, bytes_input};
use super::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
    model_infer_response::InferOutputTensor,
};
use crate::api::AppState;
use crate::api::kserve::{encoder_rows, output_name, utf8_texts};
use crate::infer::InferError;
use crate::repository::EncoderVersion;

/// Runs `req` on `model`.
pub async fn infer(
    state: &AppState,
    model: Arc<EncoderVersion>,
    req: ModelInferRequest,
    timeout: Option<Duration>,
) -> Result<ModelInferResponse, InferError> {
    let truncate = bool_param(&req.parameters, "truncate")?;
    let (name, items) = bytes_input(&req)?;
    let texts = utf8_texts(name, items)?;
    let (model, rows) = encoder_rows(state, &model, texts, truncate, timeout).await?;
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
