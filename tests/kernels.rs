//! Our CUDA kernels (`kernels/`): every source compiles to PTX with NVRTC for the oldest and a
//! newer target (no GPU needed: setup installs NVRTC), compiled PTX is cached on disk, and where
//! a GPU is, the GPU checks of `tests/gpu_checks/` (sampling, the native engine) run on it. GPU
//! tests print why they skip.
#![cfg(feature = "cuda-native")]

mod common;
mod gpu_checks;

use distill_serve::kernels::device::CudaDevice;
use distill_serve::kernels::{KernelError, KernelSource, SOURCES, compile, nvrtc_version};

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

/// The 32 greedy steps for the mid shape too.
const MID_STEPS: usize = 32;

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
