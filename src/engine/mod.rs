//! ONNX Runtime sessions for exported students: loading the runtime, building sessions, and
//! running decoder and encoder graphs.

pub mod cuda;
mod decoder;
mod encoder;
pub mod gpu;
mod runtime;
mod slots;

use std::path::Path;

use ort::session::{Session, builder::GraphOptimizationLevel};

pub use decoder::{CacheRows, DecoderSession, KvCache};
pub use encoder::EncoderSession;
pub use runtime::{ORT_GPU_VERSION, ORT_VERSION, default_library_path, environment};
pub use slots::{PrefillRows, SlotCache, SlotSource};

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
    /// Not ONNX Runtime: the native decoder engine on our own CUDA kernels, from the version's
    /// Hugging Face checkpoint (feature `cuda-native`; decoders only).
    #[serde(rename = "native-cuda")]
    #[value(name = "native-cuda")]
    NativeCuda,
    /// The native decoder engine on its kernels' CPU reference: far slower than `cpu`; for
    /// checking the native engine where no GPU is.
    #[serde(rename = "native-cpu")]
    #[value(name = "native-cpu")]
    NativeCpu,
}

impl ExecutionProvider {
    /// Whether models on this provider run in the native engine rather than ONNX Runtime.
    pub fn is_native(self) -> bool {
        matches!(self, Self::NativeCuda | Self::NativeCpu)
    }
}

/// Settings of one ONNX Runtime session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionOptions {
    /// Threads of the intra-op pool (0 lets ONNX Runtime choose).
    pub intra_threads: usize,
    pub execution_provider: ExecutionProvider,
    /// The GPU of a GPU provider.
    pub device_id: u32,
}

/// Opens `model` (an `.onnx` file, with its external data beside it).
pub fn open_session(model: &Path, options: SessionOptions) -> Result<Session, EngineError> {
    let env = environment(None)?;
    let builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(options.intra_threads)?;
    let mut builder = match options.execution_provider {
        ExecutionProvider::Cpu => builder,
        ExecutionProvider::Cuda => gpu::cuda(builder, options.device_id)?,
        ExecutionProvider::Tensorrt => gpu::tensorrt(builder, options.device_id)?,
        ExecutionProvider::NativeCuda | ExecutionProvider::NativeCpu => {
            return Err(EngineError::Unavailable(
                "the native engine (native-cuda, native-cpu) runs decoder checkpoints, not ONNX graphs: encoders need cpu, cuda or tensorrt".into(),
            ));
        }
    };
    Ok(builder.commit_from_file(model)?)
}

/// Opens `model` (a graph of input `x` [1, 8] and output `y`, as
/// [`crate::export::write_probe_model`] writes) on `provider` and runs it once: whether the
/// provider can load and run here.
pub fn run_probe(model: &Path, provider: ExecutionProvider) -> Result<(), EngineError> {
    let mut session = open_session(
        model,
        SessionOptions {
            intra_threads: 1,
            execution_provider: provider,
            device_id: 0,
        },
    )?;
    let x = ndarray::Array2::<f32>::ones((1, 8));
    let outputs = session.run(ort::inputs!["x" => ort::value::TensorRef::from_array_view(x.view())?])?;
    let y = outputs
        .get("y")
        .ok_or_else(|| EngineError::Layout("the probe has no `y` output".into()))?
        .try_extract_array::<f32>()?;
    if y.len() != 8 {
        return Err(EngineError::Layout(format!(
            "the probe answered {} values, not 8",
            y.len()
        )));
    }
    Ok(())
}
