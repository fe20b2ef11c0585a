//! The native engine as a model's scheduler holds it: the backend is chosen at load from the
//! model's execution provider (`native-cuda`, `native-cpu`), so the scheduler sees one type.

use std::path::Path;

use super::reference::CpuBackend;
use super::{NativeDecoder, NativeError, StepRows, WeightFormat};
use crate::checkpoint::DecoderConfig;
use crate::engine::ExecutionProvider;
use crate::kernels::sampling::{RowPlan, RowSampling, Sampled};

/// A loaded native decoder on its backend.
pub enum NativeEngine {
    /// On the kernels' CPU reference (`native-cpu`).
    Reference(Box<NativeDecoder<CpuBackend>>),
    /// On a GPU (`native-cuda`), sampling there too.
    #[cfg(feature = "cuda-native")]
    Cuda {
        engine: Box<NativeDecoder<super::device::CudaBackend>>,
        sampler: Box<crate::kernels::sampling::DeviceSampler>,
    },
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
                let cache = crate::kernels::default_ptx_cache();
                let device = crate::kernels::device::CudaDevice::open(device_id as usize)?;
                let backend = super::device::CudaBackend::new(device, Some(&cache))?;
                let sampler = crate::kernels::sampling::DeviceSampler::new(backend.device(), Some(&cache))?;
                Ok(Self::Cuda {
                    engine: Box::new(NativeDecoder::load(dir, backend, format, slots, capacity)?),
                    sampler: Box::new(sampler),
                })
            }
            other => {
                let _ = device_id;
                Err(NativeError::Unsupported(format!(
                    "execution provider {other:?} is not one of the native engine's in this build"
                )))
            }
        }
    }

    /// Runs a step (see [`NativeDecoder::step`]) and chooses the token of each row of
    /// `logits_of` by its plan: on the GPU for CUDA, so only ids and log-probabilities leave
    /// it; with the sampling kernel's CPU reference on the CPU backend. Same seeds, same tokens.
    pub fn step_and_sample(
        &mut self,
        rows: &StepRows,
        logits_of: &[u32],
        plans: &[RowPlan],
    ) -> Result<Vec<Sampled>, NativeError> {
        if plans.len() != logits_of.len() {
            return Err(NativeError::Shape(format!(
                "{} plans for {} rows",
                plans.len(),
                logits_of.len()
            )));
        }
        let vocab = self.config().vocab_size;
        let params: Vec<RowSampling> = plans.iter().map(|p| p.sampling).collect();
        let top_n = plans.iter().map(|p| p.top_n).max().unwrap_or(0);
        let sampled = match self {
            Self::Reference(engine) => {
                let logits: Vec<f32> = engine.step(rows, logits_of)?.concat();
                let masks: Vec<Option<&[u32]>> = plans.iter().map(|p| p.allowed.as_deref()).collect();
                crate::kernels::reference::sample_rows(&logits, vocab, &masks, &params, top_n)
            }
            #[cfg(feature = "cuda-native")]
            Self::Cuda { engine, sampler } => {
                let Some(logits) = engine.step_logits(rows, logits_of)? else {
                    return Ok(Vec::new());
                };
                let keys: Vec<Option<u64>> = plans
                    .iter()
                    .map(|p| p.allowed.as_deref().map(|words| sampler.keep_mask(words)).transpose())
                    .collect::<Result<_, _>>()?;
                let masks: Vec<_> = keys.iter().map(|k| k.and_then(|k| sampler.cached_mask(k))).collect();
                sampler.sample(logits.data(), vocab, &masks, &params, top_n)?
            }
        };
        Ok(sampled
            .into_iter()
            .zip(plans)
            .map(|(mut s, p)| {
                s.top.truncate(p.top_n);
                s
            })
            .collect())
    }

    /// Whether decode steps are replayed as CUDA graphs (see [`NativeDecoder::set_graphs`]).
    pub fn set_graphs(&mut self, on: bool) {
        match self {
            Self::Reference(engine) => engine.set_graphs(on),
            #[cfg(feature = "cuda-native")]
            Self::Cuda { engine, .. } => engine.set_graphs(on),
        }
    }

    /// Decode step shapes recorded as CUDA graphs so far (none on the CPU backend).
    pub fn recorded_graphs(&self) -> usize {
        match self {
            Self::Reference(engine) => engine.recorded_graphs(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda { engine, .. } => engine.recorded_graphs(),
        }
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &DecoderConfig {
        match self {
            Self::Reference(engine) => engine.config(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda { engine, .. } => engine.config(),
        }
    }

    /// Tokens a slot holds.
    pub fn capacity(&self) -> usize {
        match self {
            Self::Reference(engine) => engine.capacity(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda { engine, .. } => engine.capacity(),
        }
    }

    /// Sequences it holds at once.
    pub fn slots(&self) -> usize {
        match self {
            Self::Reference(engine) => engine.slots(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda { engine, .. } => engine.slots(),
        }
    }

    /// Where it runs, for logs: `cpu-reference` or the GPU's name.
    pub fn device_name(&self) -> String {
        match self {
            Self::Reference(_) => "cpu-reference".into(),
            #[cfg(feature = "cuda-native")]
            Self::Cuda { engine, .. } => engine.backend().device().name().to_string(),
        }
    }
}
