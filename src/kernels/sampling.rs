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
    use std::sync::{Arc, Mutex};

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
        staging: Mutex<Option<Staging>>,
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
                staging: Mutex::new(None),
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
            let mut kept = self
                .staging
                .lock()
                .map_err(|_| KernelError::Invalid("a sampling call panicked on this sampler".into()))?;
            let staging = match &mut *kept {
                Some(staging) if staging.rows >= rows => staging,
                slot => {
                    *slot = None; // freed before the larger one is allocated
                    slot.insert(Staging::new(stream, rows)?)
                }
            };
            stream.memcpy_htod(&pack_params(&mask_addresses, params), &mut staging.params)?;
            let (params_at, params_guard) = staging.params.device_ptr(stream);
            let (outputs_at, outputs_guard) = staging.outputs.device_ptr(stream);
            let (vocab_arg, top_n_arg) = (vocab as u32, top_n.min(TOP_N_MAX) as u32);
            let config = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (crate::kernels::reference::THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let [masks_at, seeds_at, steps_at, temperatures_at, top_k_at, top_p_at] =
                param_offsets(rows).map(|words| params_at + 4 * words as u64);
            let [tokens_at, logprobs_at, top_ids_at, top_logprobs_at] =
                output_offsets(rows).map(|words| outputs_at + 4 * words as u64);
            let mut launch = stream.launch_builder(&self.function);
            launch
                .arg(&logits)
                .arg(&vocab_arg)
                .arg(&masks_at)
                .arg(&temperatures_at)
                .arg(&top_k_at)
                .arg(&top_p_at)
                .arg(&seeds_at)
                .arg(&steps_at)
                .arg(&top_n_arg)
                .arg(&tokens_at)
                .arg(&logprobs_at)
                .arg(&top_ids_at)
                .arg(&top_logprobs_at);
            // SAFETY: the arguments match `sample_rows`' parameters in order (pointers passed as
            // device addresses); every buffer holds what the kernel indexes (checked above: rows x
            // vocab logits, as the caller vouches for `logits`; masks of vocab bits; the staging
            // buffers hold `rows` rows of the layouts of `pack_params` and `unpack`).
            unsafe { launch.launch(config) }?;
            drop((guards, params_guard, outputs_guard));
            let wanted = if top_n == 0 { 2 * rows } else { OUTPUT_WORDS * rows };
            let Some(outputs) = staging.outputs.try_slice(..wanted) else {
                return Err(KernelError::Invalid("sampling outputs out of their buffer".into()));
            };
            let words = stream.clone_dtoh(&outputs)?;
            Ok(unpack(&words, rows, top_n))
        }
    }

    /// u32 words of parameters a row takes: mask address, seed and step (two words each, first,
    /// so they stay 8-byte aligned), then temperature, top_k and top_p.
    const PARAM_WORDS: usize = 9;
    /// u32 words of results a row gives: token, logprob, and `TOP_N_MAX` ids and logprobs.
    const OUTPUT_WORDS: usize = 2 + 2 * TOP_N_MAX;

    /// Where each parameter of `rows` rows starts, in words: masks, seeds, steps (u64s, two
    /// words a row), temperatures, top_k, top_p; [`pack_params`] writes them in this order.
    fn param_offsets(rows: usize) -> [usize; 6] {
        [0, 2 * rows, 4 * rows, 6 * rows, 7 * rows, 8 * rows]
    }

    /// Where each result of `rows` rows starts, in words: tokens, logprobs, top ids, top
    /// logprobs (`TOP_N_MAX` a row for the last two).
    fn output_offsets(rows: usize) -> [usize; 4] {
        [0, rows, 2 * rows, 2 * rows + rows * TOP_N_MAX]
    }

    /// Device buffers a sampling call reuses for up to `rows` rows, so a step allocates nothing
    /// and its parameters go up in one copy and its choices come back in one.
    struct Staging {
        rows: usize,
        params: CudaSlice<u32>,
        outputs: CudaSlice<u32>,
    }

    impl Staging {
        fn new(stream: &Arc<CudaStream>, rows: usize) -> Result<Self, KernelError> {
            Ok(Self {
                rows,
                params: stream.alloc_zeros(PARAM_WORDS * rows)?,
                outputs: stream.alloc_zeros(OUTPUT_WORDS * rows)?,
            })
        }
    }

    /// The parameters of `params.len()` rows as `sample_rows` reads them (see [`param_offsets`]).
    fn pack_params(mask_addresses: &[u64], params: &[RowSampling]) -> Vec<u32> {
        let wide = |value: u64| [value as u32, (value >> 32) as u32];
        let mut words = Vec::with_capacity(PARAM_WORDS * params.len());
        words.extend(mask_addresses.iter().flat_map(|&a| wide(a)));
        words.extend(params.iter().flat_map(|p| wide(p.seed)));
        words.extend(params.iter().flat_map(|p| wide(p.step)));
        words.extend(params.iter().map(|p| p.temperature.to_bits()));
        words.extend(params.iter().map(|p| p.top_k));
        words.extend(params.iter().map(|p| p.top_p.to_bits()));
        words
    }

    /// Each row's result from the kernel's result words (see [`output_offsets`]; the top ones
    /// only read when `top_n` > 0).
    fn unpack(words: &[u32], rows: usize, top_n: usize) -> Vec<Sampled> {
        let [tokens, logprobs, top_ids, top_logprobs] = output_offsets(rows);
        let at = |r: usize, m: usize| r * TOP_N_MAX + m;
        (0..rows)
            .map(|r| Sampled {
                token: (words[tokens + r] != u32::MAX).then_some(words[tokens + r]),
                logprob: f32::from_bits(words[logprobs + r]),
                top: (0..top_n.min(TOP_N_MAX))
                    .map(|m| {
                        (
                            words[top_ids + at(r, m)],
                            f32::from_bits(words[top_logprobs + at(r, m)]),
                        )
                    })
                    .take_while(|&(id, _)| id != u32::MAX)
                    .collect(),
            })
            .collect()
    }
}
