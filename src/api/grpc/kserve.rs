//! KServe v2 `GRPCInferenceService`: health, metadata, and `ModelInfer` with one BYTES input
//! (`text_input`) and one BYTES output (`text_output`). Generation settings travel as request
//! parameters: `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`. Encoders answer
//! `ModelInfer` with FP32 tensors (see [`super::kserve_encoder`]).

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use super::kserve_encoder;
use super::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
    grpc_inference_service_server::GrpcInferenceService, infer_parameter::ParameterChoice,
    model_infer_response::InferOutputTensor, model_metadata_response::TensorMetadata,
};
use crate::api::AppState;
use crate::api::kserve::{TEXT_INPUT, TEXT_OUTPUT, bytes_elements, utf8_texts};
use crate::infer::{Endpoint, ErrorKind, InferError, InferRequest, Params, Prompt};
use crate::repository::{ModelVersion, Served};

pub struct KServe {
    pub state: AppState,
}

fn invalid(message: impl Into<String>) -> InferError {
    InferError::bad_request(message)
}

impl KServe {
    /// The serving version of `name`, which must be `version` when one is given.
    fn model(&self, name: &str, version: &str) -> Result<std::sync::Arc<ModelVersion>, InferError> {
        let model = self.state.repository.get(name)?;
        if !version.is_empty() && version != model.version.to_string() {
            return Err(InferError::new(
                ErrorKind::NotFound,
                format!("model `{name}` serves version {}, not {version}", model.version),
            ));
        }
        Ok(model)
    }

    /// The serving version of `name` (either kind), which must be `version` when one is given.
    fn served(&self, name: &str, version: &str) -> Result<Served, InferError> {
        let model = self.state.repository.served(name)?;
        if !version.is_empty() && version != model.version().to_string() {
            return Err(InferError::new(
                ErrorKind::NotFound,
                format!("model `{name}` serves version {}, not {version}", model.version()),
            ));
        }
        Ok(model)
    }
}

/// The BYTES input of `req` (`text_input`, or the only input) and its elements, from
/// `raw_input_contents` or `contents.bytes_contents`; their count must match its shape.
pub(super) fn bytes_input(req: &ModelInferRequest) -> Result<(&str, Vec<Vec<u8>>), InferError> {
    let (index, input) = match req.inputs.iter().enumerate().find(|(_, i)| i.name == TEXT_INPUT) {
        Some(found) => found,
        None if req.inputs.len() == 1 => (0, &req.inputs[0]),
        None => return Err(invalid(format!("expected one input named `{TEXT_INPUT}`"))),
    };
    if input.datatype != "BYTES" {
        return Err(invalid(format!(
            "input `{}` must have datatype BYTES, got {}",
            input.name, input.datatype
        )));
    }
    let items = match (&input.contents, req.raw_input_contents.get(index)) {
        (_, Some(raw)) => bytes_elements(raw)?,
        (Some(contents), None) => contents.bytes_contents.clone(),
        (None, None) => return Err(invalid(format!("input `{}` has no contents", input.name))),
    };
    let elements: i64 = input.shape.iter().product();
    if elements != items.len() as i64 {
        return Err(invalid(format!(
            "input `{}` has shape {:?} but holds {} elements",
            input.name,
            input.shape,
            items.len()
        )));
    }
    Ok((&input.name, items))
}

/// The one prompt of a decoder's `ModelInfer`.
fn text_input(req: &ModelInferRequest) -> Result<String, InferError> {
    let (name, items) = bytes_input(req)?;
    if items.len() != 1 {
        return Err(invalid(format!(
            "input `{name}` must hold one prompt (shape [1]), got {}",
            items.len()
        )));
    }
    Ok(utf8_texts(name, items)?.remove(0))
}

fn int_param(params: &HashMap<String, InferParameter>, key: &'static str) -> Result<Option<i64>, InferError> {
    match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(v)) => Ok(Some(*v)),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(*v as i64)),
        Some(_) => Err(InferError::invalid(
            key,
            format!("parameter `{key}` must be an integer"),
        )),
    }
}

fn float_param(params: &HashMap<String, InferParameter>, key: &'static str) -> Result<Option<f32>, InferError> {
    match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::DoubleParam(v)) => Ok(Some(*v as f32)),
        Some(ParameterChoice::Int64Param(v)) => Ok(Some(*v as f32)),
        Some(_) => Err(InferError::invalid(key, format!("parameter `{key}` must be a number"))),
    }
}

pub(super) fn bool_param(params: &HashMap<String, InferParameter>, key: &'static str) -> Result<bool, InferError> {
    match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(false),
        Some(ParameterChoice::BoolParam(v)) => Ok(*v),
        Some(_) => Err(InferError::invalid(key, format!("parameter `{key}` must be a boolean"))),
    }
}

/// The generation settings of the request's parameters.
fn params(params: &HashMap<String, InferParameter>) -> Result<Params, InferError> {
    let stop = match params.get("stop").and_then(|p| p.parameter_choice.as_ref()) {
        None => Vec::new(),
        Some(ParameterChoice::StringParam(s)) => vec![s.clone()],
        Some(_) => return Err(InferError::invalid("stop", "parameter `stop` must be a string")),
    };
    Ok(Params {
        max_tokens: int_param(params, "max_tokens")?,
        temperature: float_param(params, "temperature")?,
        top_p: float_param(params, "top_p")?,
        top_k: int_param(params, "top_k")?,
        seed: int_param(params, "seed")?.map(|s| s as u64),
        stop,
        ignore_eos: bool_param(params, "ignore_eos")?,
        min_tokens: int_param(params, "min_tokens")?,
        ..Params::default()
    })
}

/// The protocol-neutral form of `req`.
pub(super) fn neutral(req: &ModelInferRequest) -> Result<InferRequest, InferError> {
    Ok(InferRequest {
        params: params(&req.parameters)?,
        ..InferRequest::new(&req.model_name, Endpoint::ModelInfer, Prompt::Text(text_input(req)?))
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for KServe {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(&self, req: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let req = req.into_inner();
        match self.served(&req.name, &req.version) {
            Ok(_) => Ok(Response::new(ModelReadyResponse { ready: true })),
            Err(e) if e.kind == ErrorKind::Unavailable => Ok(Response::new(ModelReadyResponse { ready: false })),
            Err(e) => Err(e.into()),
        }
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "distill-serve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        let model = self.served(&req.name, &req.version)?;
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape,
        };
        let (inputs, outputs) = match &model {
            Served::Decoder(_) => (
                vec![tensor(TEXT_INPUT, "BYTES", vec![1])],
                vec![tensor(TEXT_OUTPUT, "BYTES", vec![1])],
            ),
            Served::Encoder(e) => (
                vec![tensor(TEXT_INPUT, "BYTES", vec![-1])],
                vec![tensor(crate::api::kserve::output_name(e.task), "FP32", vec![-1, -1])],
            ),
        };
        Ok(Response::new(ModelMetadataResponse {
            name: model.name().to_string(),
            versions: vec![model.version().to_string()],
            platform: "onnxruntime_onnx".into(),
            inputs,
            outputs,
        }))
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let timeout = super::timeout(&req);
        let req = req.into_inner();
        if let Ok(Served::Encoder(encoder)) = self.served(&req.model_name, &req.model_version) {
            return Ok(Response::new(
                kserve_encoder::infer(&self.state, encoder, req, timeout).await?,
            ));
        }
        // A pinned version must be the one serving.
        let checked = self
            .model(&req.model_name, &req.model_version)
            .and_then(|_| neutral(&req));
        let request = checked.map(|r| InferRequest { timeout, ..r });
        let generation = self.state.infer.generate(Endpoint::ModelInfer, request).await?;
        let model = generation.model.clone();
        let done = generation.collect().await?;
        let mut raw = (done.text.len() as u32).to_le_bytes().to_vec();
        raw.extend_from_slice(done.text.as_bytes());
        let finish = InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(done.reason.as_str().into())),
        };
        Ok(Response::new(ModelInferResponse {
            model_name: model.name.clone(),
            model_version: model.version.to_string(),
            id: req.id,
            parameters: HashMap::from([("finish_reason".to_string(), finish)]),
            outputs: vec![InferOutputTensor {
                name: TEXT_OUTPUT.into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                parameters: HashMap::new(),
                contents: None::<InferTensorContents>,
            }],
            raw_output_contents: vec![raw],
        }))
    }
}
