//! Masked sampling on the GPU (`kernels/sampling.cu`): a step's logits stay on the device, the
//! terminology masks go up as bitsets (start-of-answer masks once, cached per key), and only
//! token ids and log-probabilities come back.

#[cfg(feature = "cuda-native")]
pub use device::DeviceSampler;

/// Most alternatives a row may ask for (OpenAI's `top_logprobs` limit).
pub const TOP_N_MAX: usize = 20;

/// How one row picks its token. `temperature` below 1e-5 is greedy; `top_k` 0 and `top_p` 1
/// keep everything. `seed` and `step` (the token's position in its request) fix the draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    pub step: u64,
}

/// How one row chooses its token (a sequence's step, as `generate::Sequence::plan` gives it):
/// the tokens allowed, the sampling settings, and how many alternatives to report.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    /// The allowed tokens as [`bitset`] words over the vocabulary; None: every token.
    pub allowed: Option<Vec<u32>>,
    pub sampling: RowSampling,
    /// Alternatives to report (0 when no log-probabilities are asked for).
    pub top_n: usize,
}

/// One row's result: the token (None when its mask allows nothing), its log-probability under
/// the masked distribution before temperature, and the most likely allowed tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: Option<u32>,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The bitset of `vocab` tokens (32 a word, bit `i % 32` of word `i / 32`) allowing `allowed`.
pub fn bitset(vocab: usize, allowed: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut words = vec![0u32; vocab.div_ceil(32)];
    for token in allowed {
        if let Some(word) = words.get_mut(token as usize / 32) {
            *word |= 1 << (token % 32);
        }
    }
    words
}

#[cfg(feature = "cuda-native")]
mod device {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

    use super::{RowSampling, Sampled, TOP_N_MAX};
    use crate::kernels::device::CudaDevice;
    use crate::kernels::{KernelError, source};

    /// Masks a [`DeviceSampler`] keeps on the device at most (each 19 KB for 151,936 tokens).
    pub const MASK_CACHE_ENTRIES: usize = 1024;

    /// The `sample_rows` kernel, loaded on one GPU, with a cache of masks kept on the device.
    pub struct DeviceSampler {
        stream: Arc<CudaStream>,
        _module: Arc<CudaModule>,
        function: CudaFunction,
        masks: HashMap<u64, CudaSlice<u32>>,
    }

    impl DeviceSampler {
        /// Compiles (or takes from `ptx_cache`) and loads the sampling kernel on `device`.
        pub fn new(device: &CudaDevice, ptx_cache: Option<&Path>) -> Result<Self, KernelError> {
            let module = device.load(source("sampling")?, ptx_cache)?;
            let function = module.load_function("sample_rows")?;
            Ok(Self {
                stream: device.stream().clone(),
                _module: module,
                function,
                masks: HashMap::new(),
            })
        }

        /// The stream the kernel runs on (logits must be ready on it).
        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// Uploads `bitset` under `key` unless a mask is cached there (start-of-answer masks of a
        /// term set and vocabulary are the same every request).
        pub fn cache_mask(&mut self, key: u64, bitset: impl FnOnce() -> Vec<u32>) -> Result<(), KernelError> {
            if !self.masks.contains_key(&key) {
                let slice = self.stream.clone_htod(&bitset())?;
                self.masks.insert(key, slice);
            }
            Ok(())
        }

        /// Keeps `words` on the device under a hash of its content and returns the key: a
        /// mask seen before (the start of an answer in a term set, most of all) is not uploaded
        /// again. The cache is emptied when it holds [`MASK_CACHE_ENTRIES`] masks.
        pub fn keep_mask(&mut self, words: &[u32]) -> Result<u64, KernelError> {
            let key = crate::hash::fnv1a(words.iter().flat_map(|w| w.to_le_bytes()));
            if !self.masks.contains_key(&key) && self.masks.len() >= MASK_CACHE_ENTRIES {
                self.masks.clear();
            }
            self.cache_mask(key, || words.to_vec())?;
            Ok(key)
        }

        /// Uploads a step's own mask (a state deeper in a term than the start).
        pub fn upload_mask(&self, bitset: &[u32]) -> Result<CudaSlice<u32>, KernelError> {
            Ok(self.stream.clone_htod(bitset)?)
        }

        /// A cached mask, if `key` was cached.
        pub fn cached_mask(&self, key: u64) -> Option<&CudaSlice<u32>> {
            self.masks.get(&key)
        }

        /// Samples every row of `logits` (`params.len() x vocab`, row-major, on this stream's GPU).
        /// `masks[r]` is row r's bitset on the device (at least `vocab` bits) or None.
        pub fn sample(
            &self,
            logits: &CudaSlice<f32>,
            vocab: usize,
            masks: &[Option<&CudaSlice<u32>>],
            params: &[RowSampling],
            top_n: usize,
        ) -> Result<Vec<Sampled>, KernelError> {
            let (address, _guard) = logits.device_ptr(&self.stream);
            // SAFETY: the slice holds `logits.len()` values on this stream's GPU, and the guard
            // keeps it alive until the kernel has run.
            unsafe { self.sample_at(address, logits.len(), vocab, masks, params, top_n) }
        }

        /// As [`Self::sample`], on `values` f32 logits at device address `logits`: for logits in
        /// buffers another library owns (ONNX Runtime's CUDA outputs bound to the device).
        ///
        /// # Safety
        /// `logits` must address `values` f32 in this stream's context, written by work ordered
        /// before this call on the stream, and stay allocated until it returns.
        pub unsafe fn sample_at(
            &self,
            logits: u64,
            values: usize,
            vocab: usize,
            masks: &[Option<&CudaSlice<u32>>],
            params: &[RowSampling],
            top_n: usize,
        ) -> Result<Vec<Sampled>, KernelError> {
            let rows = params.len();
            if rows == 0 {
                return Ok(Vec::new());
            }
            if masks.len() != rows || values < rows * vocab || vocab == 0 || vocab > u32::MAX as usize {
                return Err(KernelError::Invalid(format!(
                    "{rows} rows of {vocab} logits need {} values and {rows} masks; got {values} and {}",
                    rows * vocab,
                    masks.len()
                )));
            }
            if let Some(short) = masks.iter().flatten().find(|m| m.len() < vocab.div_ceil(32)) {
                return Err(KernelError::Invalid(format!(
                    "a mask of {} words is short of the {} a {vocab}-token vocabulary needs",
                    short.len(),
                    vocab.div_ceil(32)
                )));
            }
            let stream = &self.stream;
            let mut guards = Vec::new();
            let mut mask_addresses = Vec::with_capacity(rows);
            for mask in masks {
                mask_addresses.push(match mask {
                    Some(slice) => {
                        let (address, guard) = slice.device_ptr(stream);
                        guards.push(guard);
                        address
                    }
                    None => 0,
                });
            }
            let mask_addresses = stream.clone_htod(&mask_addresses)?;
            let temperature = stream.clone_htod(&params.iter().map(|p| p.temperature).collect::<Vec<_>>())?;
            let top_k = stream.clone_htod(&params.iter().map(|p| p.top_k).collect::<Vec<_>>())?;
            let top_p = stream.clone_htod(&params.iter().map(|p| p.top_p).collect::<Vec<_>>())?;
            let seed = stream.clone_htod(&params.iter().map(|p| p.seed).collect::<Vec<_>>())?;
            let step = stream.clone_htod(&params.iter().map(|p| p.step).collect::<Vec<_>>())?;
            let mut tokens = stream.alloc_zeros::<u32>(rows)?;
            let mut logprobs = stream.alloc_zeros::<f32>(rows)?;
            let mut top_ids = stream.alloc_zeros::<u32>(rows * TOP_N_MAX)?;
            let mut top_logprobs = stream.alloc_zeros::<f32>(rows * TOP_N_MAX)?;
            let (vocab_arg, top_n_arg) = (vocab as u32, top_n.min(TOP_N_MAX) as u32);
            let config = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (crate::kernels::reference::THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(&self.function);
            launch
                .arg(&logits)
                .arg(&vocab_arg)
                .arg(&mask_addresses)
                .arg(&temperature)
                .arg(&top_k)
                .arg(&top_p)
                .arg(&seed)
                .arg(&step)
                .arg(&top_n_arg)
                .arg(&mut tokens)
                .arg(&mut logprobs)
                .arg(&mut top_ids)
                .arg(&mut top_logprobs);
            // SAFETY: the arguments match `sample_rows`' parameters in order and type; every buffer
            // holds what the kernel indexes (checked above: rows x vocab logits, as the caller
            // vouches for `logits`; masks of vocab bits; rows x TOP_N_MAX outputs).
            unsafe { launch.launch(config) }?;
            drop(guards);
            let tokens = stream.clone_dtoh(&tokens)?;
            let logprobs = stream.clone_dtoh(&logprobs)?;
            let top_ids = stream.clone_dtoh(&top_ids)?;
            let top_logprobs = stream.clone_dtoh(&top_logprobs)?;
            Ok((0..rows)
                .map(|r| Sampled {
                    token: (tokens[r] != u32::MAX).then_some(tokens[r]),
                    logprob: logprobs[r],
                    top: (0..top_n.min(TOP_N_MAX))
                        .map(|m| (top_ids[r * TOP_N_MAX + m], top_logprobs[r * TOP_N_MAX + m]))
                        .take_while(|&(id, _)| id != u32::MAX)
                        .collect(),
                })
                .collect())
        }
    }
}
