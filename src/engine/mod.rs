//! ONNX Runtime sessions for exported students: loading the runtime, building sessions, and
//! running decoder and encoder graphs.

mod decoder;
mod encoder;
mod runtime;

use std::path::Path;

use ort::session::{Session, builder::GraphOptimizationLevel};

pub use decoder::{DecoderSession, KvCache};
pub use encoder::EncoderSession;
pub use runtime::{ORT_VERSION, default_library_path, environment};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The ONNX Runtime library is missing or could not start.
    #[error("{0}")]
    Runtime(String),
    /// ONNX Runtime rejected the model or a run.
    #[error("onnx runtime: {0}")]
    Ort(String),
    /// The graph does not have the inputs and outputs this engine needs.
    #[error("model layout: {0}")]
    Layout(String),
    /// Inputs of the wrong shape were passed.
    #[error("invalid input: {0}")]
    Input(String),
}

impl<R> From<ort::Error<R>> for EngineError {
    fn from(e: ort::Error<R>) -> Self {
        EngineError::Ort(e.to_string())
    }
}

/// Settings of one ONNX Runtime session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionOptions {
    /// Threads of the intra-op pool (0 lets ONNX Runtime choose).
    pub intra_threads: usize,
}

/// Opens `model` (an `.onnx` file, with its external data beside it) on the CPU.
pub fn open_session(model: &Path, options: SessionOptions) -> Result<Session, EngineError> {
    let env = environment(None)?;
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(options.intra_threads)?;
    Ok(builder.commit_from_file(model)?)
}
