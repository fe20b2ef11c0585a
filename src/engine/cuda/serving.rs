//! The native engine as a model's scheduler holds it: the backend is chosen at load from the
//! model's execution provider (`native-cuda`, `native-cpu`), so the scheduler sees one type.

use std::path::Path;

use super::reference::CpuBackend;
use super::{NativeDecoder, NativeError, StepRows, WeightFormat};
use crate::checkpoint::DecoderConfig;
use crate::engine::ExecutionProvider;

/// A loaded native decoder on its backend.
pub enum NativeEngine {
    /// On the kernels' CPU reference (`native-cpu`).
    Reference(Box<NativeDecoder<CpuBackend>>),
    /// On a GPU (`native-cuda`).
    #[cfg(feature = "cuda-native")]
    Cuda(Box<NativeDecoder<super::device::CudaBackend>>),
}

impl NativeEngine {
    /// Loads the decoder checkpoint in `dir` for `provider` (GPU `device_id` for CUDA), with
    /// `slots` sequences of up to `capacity` tokens. No driver, no GPU, an old GPU or too
    /// little memory are errors here, never panics.
    pub fn open(
        dir: &Path,
        provider: ExecutionProvider,
        device_id: u32,
        format: WeightFormat,
        slots: usize,
        capacity: usize,
    ) -> Result<Self, NativeError> {
        match provider {
            ExecutionProvider::NativeCpu => Ok(Self::Reference(Box::new(NativeDecoder::load(
                dir, CpuBackend, format, slots, capacity,
            )?))),
            #[cfg(feature = "cuda-native")]
            ExecutionProvider::NativeCuda => {
                let device = crate::kernels::device::CudaDevice::open(device_id as usize)?;
                let backend = super::device::CudaBackend::new(device, Some(&crate::kernels::default_ptx_cache()))?;
                Ok(Self::Cuda(Box::new(NativeDecoder::load(
                    dir, backend, format, slots, capacity,
                )?)))
            }
            other => {
                let _ = device_id;
                Err(NativeError::Unsupported(format!(
                    "execution provider {other:?} is not one of the native engine's in this build"
                )))
            }
        }
    }

    /// See [`NativeDecoder::step`].
    pub fn step(&mut self, rows: &StepRows, logits_of: &[u32]) -> Result<Vec<Vec<f32>>, NativeError> {
        match self {
            Self::Reference(engine) => engine.step(rows, logits_of),
            #[cfg(feature = "cuda-native")]
            Self::Cuda(engine) => engine.step(rows, logits_of),
        }
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &DecoderConfig {
        match self {
            Self::Reference(engine) => engine.config(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda(engine) => engine.config(),
        }
    }

    /// Tokens a slot holds.
    pub fn capacity(&self) -> usize {
        match self {
            Self::Reference(engine) => engine.capacity(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda(engine) => engine.capacity(),
        }
    }

    /// Sequences it holds at once.
    pub fn slots(&self) -> usize {
        match self {
            Self::Reference(engine) => engine.slots(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda(engine) => engine.slots(),
        }
    }

    /// Where it runs, for logs: `cpu-reference` or the GPU's name.
    pub fn device_name(&self) -> String {
        match self {
            Self::Reference(_) => "cpu-reference".into(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda(engine) => engine.backend().device().name().to_string(),
        }
    }
}
