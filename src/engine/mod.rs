//! ONNX Runtime sessions for exported students: loading the runtime, building sessions, and
//! running decoder and encoder graphs.

mod decoder;
mod encoder;
mod runtime;

use std::path::Path;

use ort::session::{Session, builder::GraphOptimizationLevel};

pub use decoder::{CacheRows, DecoderSession, KvCache};
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
    /// The configured execution provider is not in this build.
    #[error("{0}")]
    Unavailable(String),
}

impl<R> From<ort::Error<R>> for EngineError {
    fn from(e: ort::Error<R>) -> Self {
        EngineError::Ort(e.to_string())
    }
}

/// Where a model's graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA provider (Cargo feature `cuda`).
    Cuda,
    /// ONNX Runtime's TensorRT provider, CUDA for what TensorRT does not take (feature
    /// `tensorrt`).
    Tensorrt,
}

/// Settings of one ONNX Runtime session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionOptions {
    /// Threads of the intra-op pool (0 lets ONNX Runtime choose).
    pub intra_threads: usize,
    pub execution_provider: ExecutionProvider,
}

/// Opens `model` (an `.onnx` file, with its external data beside it).
pub fn open_session(model: &Path, options: SessionOptions) -> Result<Session, EngineError> {
    let env = environment(None)?;
    let builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(options.intra_threads)?;
    let mut builder = match options.execution_provider {
        ExecutionProvider::Cpu => builder,
        ExecutionProvider::Cuda => gpu::cuda(builder)?,
        ExecutionProvider::Tensorrt => gpu::tensorrt(builder)?,
    };
    Ok(builder.commit_from_file(model)?)
}

/// GPU execution providers; each fails loudly instead of silently falling back to the CPU.
mod gpu {
    use ort::session::builder::SessionBuilder;

    use super::EngineError;

    #[cfg(feature = "cuda")]
    pub fn cuda(builder: SessionBuilder) -> Result<SessionBuilder, EngineError> {
        Ok(builder.with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])?)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn cuda(_: SessionBuilder) -> Result<SessionBuilder, EngineError> {
        Err(EngineError::Unavailable(
            "execution provider `cuda` needs a build with `--features cuda`".into(),
        ))
    }

    #[cfg(feature = "tensorrt")]
    pub fn tensorrt(builder: SessionBuilder) -> Result<SessionBuilder, EngineError> {
        Ok(builder.with_execution_providers([
            ort::ep::TensorRT::default().build().error_on_failure(),
            ort::ep::CUDA::default().build(),
        ])?)
    }

    #[cfg(not(feature = "tensorrt"))]
    pub fn tensorrt(_: SessionBuilder) -> Result<SessionBuilder, EngineError> {
        Err(EngineError::Unavailable(
            "execution provider `tensorrt` needs a build with `--features tensorrt`".into(),
        ))
    }
}
