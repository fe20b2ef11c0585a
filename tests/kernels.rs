//! Our CUDA kernels (`kernels/`): every source compiles to PTX with NVRTC for the oldest and a
//! newer target (no GPU needed: setup installs NVRTC), compiled PTX is cached on disk, and where
//! a GPU is, the sampling kernel picks what its CPU reference picks. GPU tests print why they
//! skip.
#![cfg(feature = "cuda-native")]

use distill_serve::kernels::device::CudaDevice;
use distill_serve::kernels::reference;
use distill_serve::kernels::sampling::{DeviceSampler, RowSampling, TOP_N_MAX, bitset};
use distill_serve::kernels::{KernelError, KernelSource, SOURCES, compile, nvrtc_version};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn every_kernel_compiles_to_ptx_for_sm75_and_sm90() {
    let (major, minor) = nvrtc_version().expect("NVRTC (scripts/setup.sh installs it)");
    println!("NVRTC {major}.{minor}");
    for kernel in SOURCES {
        for arch in ["sm_75", "sm_90"] {
            let ptx = compile(kernel, arch, None).unwrap_or_else(|e| panic!("{e}")).to_src();
            assert!(ptx.contains(&format!(".target {arch}")), "{}: {arch}", kernel.name);
            for entry in kernel.entry_points {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{}: no {entry} in the PTX",
                    kernel.name
                );
            }
        }
    }
}

#[test]
fn compiled_ptx_is_cached_by_source_and_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = &SOURCES[0];
    let first = compile(kernel, "sm_75", Some(dir.path())).unwrap().to_src();
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("sampling-sm_75-") && name.ends_with(".ptx"), "{name}");
    // A cached file is what is loaded: a marked copy comes back as written.
    std::fs::write(&files[0], format!("{first}// cached\n")).unwrap();
    assert!(
        compile(kernel, "sm_75", Some(dir.path()))
            .unwrap()
            .to_src()
            .ends_with("// cached\n")
    );
    compile(kernel, "sm_90", Some(dir.path())).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_naming_it() {
    let broken = KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        entry_points: &["k"],
        options: &[],
    };
    match compile(&broken, "sm_75", None) {
        Err(KernelError::Compile { kernel, arch, log }) => {
            assert_eq!((kernel.as_str(), arch.as_str()), ("broken", "sm_75"));
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("expected a compile error, got {:?}", other.map(|p| p.to_src())),
    }
}

/// The GPU, or None after printing why the test skips.
fn gpu() -> Option<CudaDevice> {
    match CudaDevice::open(0) {
        Ok(device) => {
            println!(
                "GPU: {} (compute capability {:?})",
                device.name(),
                device.compute_capability()
            );
            Some(device)
        }
        Err(e @ (KernelError::NoDriver | KernelError::NoDevice { .. })) => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("opening the GPU failed: {e}"),
    }
}

#[test]
fn opening_a_missing_gpu_is_an_error_not_a_panic() {
    match CudaDevice::open(1_000) {
        Err(KernelError::NoDriver | KernelError::NoDevice { .. }) => {}
        other => panic!("GPU 1000: {:?}", other.map(|d| d.name().to_string())),
    }
}

/// Random rows with a mix of sampling settings, half of them masked.
struct Case {
    logits: Vec<f32>,
    masks: Vec<Option<Vec<u32>>>,
    params: Vec<RowSampling>,
}

fn case(rng: &mut ChaCha8Rng, rows: usize, vocab: usize) -> Case {
    let logits = (0..rows * vocab).map(|_| rng.random_range(-6.0f32..6.0)).collect();
    let masks = (0..rows)
        .map(|r| match r % 4 {
            0 | 1 => None,
            2 => Some(bitset(
                vocab,
                (0..vocab as u32).filter(|_| rng.random_bool(0.01)).chain([7]),
            )),
            _ => Some(bitset(vocab, (0..vocab as u32).filter(|t| t % 3 == 0))),
        })
        .collect();
    let params = (0..rows)
        .map(|r| RowSampling {
            temperature: [0.0, 1.0, 0.7, 1.3][r % 4],
            top_k: [0, 0, 40, 0][(r / 4) % 4],
            top_p: [1.0, 0.9, 1.0, 0.5][(r / 8) % 4],
            seed: 1000 + r as u64,
            step: r as u64 * 3,
        })
        .collect();
    Case { logits, masks, params }
}

#[test]
fn device_sampling_matches_the_cpu_reference_token_for_token() {
    let Some(device) = gpu() else { return };
    let mut sampler = DeviceSampler::new(&device, None).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (rows, vocab) in [(32, 151_936), (9, 1_000), (4, 37)] {
        let c = case(&mut rng, rows, vocab);
        let logits = sampler.stream().clone_htod(&c.logits).unwrap();
        sampler
            .cache_mask(1, || bitset(vocab, (0..vocab as u32).filter(|t| t % 3 == 0)))
            .unwrap();
        let uploaded: Vec<_> = c
            .masks
            .iter()
            .map(|m| m.as_ref().map(|m| sampler.upload_mask(m).unwrap()))
            .collect();
        let device_masks: Vec<_> = c
            .masks
            .iter()
            .enumerate()
            .map(|(r, m)| match (r % 4, m) {
                (3, Some(_)) => sampler.cached_mask(1),
                _ => uploaded[r].as_ref(),
            })
            .collect();
        let host_masks: Vec<Option<&[u32]>> = c.masks.iter().map(|m| m.as_deref()).collect();
        let got = sampler.sample(&logits, vocab, &device_masks, &c.params, 5).unwrap();
        let want = reference::sample_rows(&c.logits, vocab, &host_masks, &c.params, 5);
        for r in 0..rows {
            assert_eq!(got[r].token, want[r].token, "vocab {vocab} row {r} {:?}", c.params[r]);
            assert!((got[r].logprob - want[r].logprob).abs() < 1e-3, "row {r}");
            let ids = |s: &distill_serve::kernels::sampling::Sampled| s.top.iter().map(|t| t.0).collect::<Vec<_>>();
            assert_eq!(ids(&got[r]), ids(&want[r]), "row {r}");
            let token = got[r].token.unwrap() as usize;
            if let Some(mask) = &c.masks[r] {
                assert!(
                    (mask[token / 32] >> (token % 32)) & 1 == 1,
                    "row {r}: masked token {token}"
                );
            }
        }
        let again = sampler.sample(&logits, vocab, &device_masks, &c.params, 5).unwrap();
        assert_eq!(again, got, "a second run differs");
    }
}

#[test]
fn device_masks_never_let_a_forbidden_token_through() {
    let Some(device) = gpu() else { return };
    let sampler = DeviceSampler::new(&device, None).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let (rows, vocab) = (64, 151_936);
    let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let allowed: Vec<Vec<u32>> = (0..rows)
        .map(|_| (0..6).map(|_| rng.random_range(0..vocab as u32)).collect())
        .collect();
    // Make the forbidden tokens the likeliest by far.
    for (r, row) in logits.chunks_mut(vocab).enumerate() {
        for (t, l) in row.iter_mut().enumerate() {
            if !allowed[r].contains(&(t as u32)) && t % 97 == 0 {
                *l = 40.0;
            }
        }
    }
    let masks: Vec<_> = allowed
        .iter()
        .map(|a| sampler.upload_mask(&bitset(vocab, a.iter().copied())).unwrap())
        .collect();
    let empty = sampler.upload_mask(&bitset(vocab, [])).unwrap();
    let device_logits = sampler.stream().clone_htod(&logits).unwrap();
    for step in 0..8 {
        let params: Vec<RowSampling> = (0..rows)
            .map(|r| RowSampling {
                temperature: if r % 2 == 0 { 0.0 } else { 2.0 },
                top_k: 0,
                top_p: 1.0,
                seed: r as u64,
                step,
            })
            .collect();
        let mut row_masks: Vec<_> = masks.iter().map(Some).collect();
        row_masks[rows - 1] = Some(&empty);
        let got = sampler
            .sample(&device_logits, vocab, &row_masks, &params, TOP_N_MAX)
            .unwrap();
        for r in 0..rows - 1 {
            let token = got[r].token.unwrap();
            assert!(allowed[r].contains(&token), "row {r} step {step}: {token}");
            assert!(got[r].top.iter().all(|(id, _)| allowed[r].contains(id)));
        }
        assert_eq!(got[rows - 1].token, None);
    }
}
