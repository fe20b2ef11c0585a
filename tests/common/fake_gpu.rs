//! The emulated GPU of `tests/emulate/fake_cuda.cpp`: a `libcuda.so` whose device memory is the
//! host's and whose kernels are `kernels/*.cu` compiled for the CPU, so our host code (cudarc
//! calls, buffers, argument order, grids) runs where no GPU is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The folder holding the emulated `libcuda.so`, compiled once per content of its sources (test
/// processes share it: each builds into its own file and renames it into place).
pub fn library_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sources: Vec<String> = [
            "tests/emulate/fake_cuda.cpp",
            "tests/emulate/cuda_shim.h",
            "kernels/decoder.cu",
            "kernels/sampling.cu",
        ]
        .iter()
        .map(|p| std::fs::read_to_string(root.join(p)).unwrap())
        .collect();
        let key = distill_serve::hash::fnv1a(sources.concat().bytes());
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-cuda-{key:016x}"));
        let library = dir.join("libcuda.so");
        if !library.is_file() {
            std::fs::create_dir_all(&dir).unwrap();
            let partial = dir.join(format!("libcuda.so.{}.partial", std::process::id()));
            let out = Command::new("g++")
                .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Werror", "-shared", "-fPIC"])
                .args(["-fvisibility=hidden", "-Wl,-soname,libcuda.so"])
                .arg(root.join("tests/emulate/fake_cuda.cpp"))
                .arg("-o")
                .arg(&partial)
                .output()
                .expect("g++ (the C++ compiler cc builds need)");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            std::fs::rename(&partial, &library).unwrap();
        }
        dir
    })
}

/// Makes this process's CUDA driver the emulated one: loaded by path before cudarc opens
/// `libcuda.so` by name, the loader hands cudarc this library. Call it before anything touches
/// CUDA, in a test binary of its own (a process keeps the first driver it loads).
pub fn install() {
    driver();
}

/// The emulated driver, loaded once and kept for the process.
fn driver() -> &'static libloading::Library {
    static LOADED: OnceLock<libloading::Library> = OnceLock::new();
    // SAFETY: our own test library; its initialisers only set up empty tables.
    LOADED.get_or_init(|| unsafe { libloading::Library::new(library_dir().join("libcuda.so")) }.unwrap())
}

/// Device allocations the emulated driver has made on this thread so far.
pub fn allocations_made() -> u64 {
    // SAFETY: the library defines this function with this signature (tests/emulate/fake_cuda.cpp).
    unsafe {
        let count = driver()
            .get::<unsafe extern "C" fn() -> u64>(b"fake_cuda_allocations_made")
            .unwrap();
        count()
    }
}
