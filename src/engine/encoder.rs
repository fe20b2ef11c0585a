//! Running an encoder: `input_ids`, `attention_mask` and, where the graph has it,
//! `token_type_ids` -> `logits` (or `last_hidden_state` for a model without a head).

use std::borrow::Cow;
use std::path::Path;

use ndarray::{Array2, ArrayD};
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;

use super::{EngineError, SessionOptions, open_session};

/// An encoder session.
pub struct EncoderSession {
    session: Session,
    has_token_type_ids: bool,
}

impl EncoderSession {
    /// Opens an exported encoder.
    pub fn open(model: &Path, options: SessionOptions) -> Result<Self, EngineError> {
        let session = open_session(model, options)?;
        let has = |name: &str| session.inputs().iter().any(|i| i.name() == name);
        if !has("input_ids") || !has("attention_mask") {
            return Err(EngineError::Layout(
                "encoder needs `input_ids` and `attention_mask` inputs".into(),
            ));
        }
        let has_token_type_ids = has("token_type_ids");
        Ok(Self {
            session,
            has_token_type_ids,
        })
    }

    /// Runs a padded batch and returns `logits` (or `last_hidden_state`); every token of
    /// segment 0.
    pub fn forward(
        &mut self,
        input_ids: &Array2<i64>,
        attention_mask: &Array2<i64>,
    ) -> Result<ArrayD<f32>, EngineError> {
        self.forward_typed(input_ids, attention_mask, None)
    }

    /// As [`EncoderSession::forward`], with each token's segment (`token_type_ids`: 1 for the
    /// second text of a pair) where given.
    pub fn forward_typed(
        &mut self,
        input_ids: &Array2<i64>,
        attention_mask: &Array2<i64>,
        token_type_ids: Option<&Array2<i64>>,
    ) -> Result<ArrayD<f32>, EngineError> {
        if attention_mask.dim() != input_ids.dim() {
            return Err(EngineError::Input(format!(
                "attention_mask {:?} must match input_ids {:?}",
                attention_mask.dim(),
                input_ids.dim()
            )));
        }
        let token_types = match token_type_ids {
            Some(t) if t.dim() == input_ids.dim() => t.as_standard_layout().into_owned(),
            Some(t) => {
                return Err(EngineError::Input(format!(
                    "token_type_ids {:?} must match input_ids {:?}",
                    t.dim(),
                    input_ids.dim()
                )));
            }
            None => Array2::<i64>::zeros(input_ids.dim()),
        };
        // ONNX Runtime needs row-major buffers; views of sliced or grown arrays may not be.
        let input_ids = input_ids.as_standard_layout();
        let attention_mask = attention_mask.as_standard_layout();
        let mut inputs: Vec<(Cow<str>, SessionInputValue)> = vec![
            ("input_ids".into(), TensorRef::from_array_view(input_ids.view())?.into()),
            (
                "attention_mask".into(),
                TensorRef::from_array_view(attention_mask.view())?.into(),
            ),
        ];
        if self.has_token_type_ids {
            inputs.push((
                "token_type_ids".into(),
                TensorRef::from_array_view(token_types.view())?.into(),
            ));
        }
        let outputs = self.session.run(inputs)?;
        let logits = outputs
            .get("logits")
            .or_else(|| outputs.get("last_hidden_state"))
            .ok_or_else(|| EngineError::Layout("no `logits` or `last_hidden_state` output".into()))?;
        Ok(logits.try_extract_array::<f32>()?.to_owned())
    }
}
