//! The GPU set-up and `doctor`, as far as they can be checked without a GPU: `setup.sh --gpu`
//! leaves an installed state alone and refuses a wheel whose checksum is wrong (offline: the
//! package index is a closed loopback port), and `doctor` reports the machine and fails on a
//! provider the configuration asks for but cannot run. Where a GPU exists, the GPU lines are
//! checked instead of the "none" line, and the GPU form runs on the CUDA provider against the
//! CPU provider (skipped, saying why, without a GPU or a CUDA build).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::server::add_version;
use common::{binary, repo_file};

const GPU_WHEEL: &str = "onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A cache folder where the CPU parts are installed (linked to the real ones, which the suite's
/// setup installed; NVRTC as placeholder files) and the GPU parts are as `gpu` leaves them.
fn cache_with_cpu_parts(gpu: impl FnOnce(&Path)) -> tempfile::TempDir {
    let real = distill_serve::paths::setup_cache_dir();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("distill-serve");
    std::fs::create_dir_all(&cache).unwrap();
    for part in [
        format!("onnxruntime-{}", distill_serve::engine::ORT_VERSION),
        "icd10cm-2026".into(),
    ] {
        std::os::unix::fs::symlink(real.join(&part), cache.join(&part)).unwrap();
    }
    // NVRTC, which setup installs for the tests; only its presence counts here.
    let cuda = cache.join("cuda-13.0");
    std::fs::create_dir_all(&cuda).unwrap();
    for name in ["libnvrtc.so.13", "libnvrtc-builtins.so.13.0"] {
        std::fs::write(cuda.join(name), b"installed").unwrap();
    }
    gpu(&cache);
    dir
}

/// `scripts/setup.sh --gpu` with the cache in `dir`, no clients, and no reachable index.
fn setup_gpu(dir: &Path) -> Output {
    Command::new("bash")
        .arg(repo_file("scripts/setup.sh"))
        .arg("--gpu")
        .env("XDG_CACHE_HOME", dir)
        .env("SETUP_CLIENTS", "0")
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .output()
        .unwrap()
}

fn listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), meta.len(), meta.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn setup_gpu_leaves_an_installed_state_alone() {
    let dir = cache_with_cpu_parts(|cache| {
        let ort = cache.join("onnxruntime-gpu-1.31.1");
        std::fs::create_dir_all(&ort).unwrap();
        for name in ["libonnxruntime.so.1.31.1", "libonnxruntime_providers_cuda.so"] {
            std::fs::write(ort.join(name), b"installed").unwrap();
        }
        let cuda = cache.join("cuda-13.0");
        std::fs::create_dir_all(&cuda).unwrap();
        for name in distill_serve::engine::gpu::CUDA_LIBRARIES {
            std::fs::write(cuda.join(name), b"installed").unwrap();
        }
    });
    let before = listing(dir.path());
    let out = setup_gpu(dir.path());
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("ONNX Runtime GPU 1.31.1 already at"), "{said}");
    for package in ["nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13"] {
        assert!(said.contains(&format!("{package} already there")), "{said}");
    }
    assert!(!said.contains("downloading"), "{said}");
    assert_eq!(listing(dir.path()), before, "a second run changed the cache");
}

#[test]
fn setup_gpu_refuses_and_removes_a_wheel_with_the_wrong_checksum() {
    let dir = cache_with_cpu_parts(|cache| {
        std::fs::create_dir_all(cache.join("wheels")).unwrap();
        std::fs::write(cache.join("wheels").join(GPU_WHEEL), b"not the wheel").unwrap();
    });
    let out = setup_gpu(dir.path());
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("sha256 mismatch") && said.contains(GPU_WHEEL), "{said}");
    let wheel = dir.path().join("distill-serve/wheels").join(GPU_WHEEL);
    assert!(!wheel.exists(), "the corrupted wheel was kept");
    assert!(!dir.path().join("distill-serve/onnxruntime-gpu-1.31.1").exists());
}

fn doctor(args: &[&str]) -> Output {
    Command::new(binary())
        .arg("doctor")
        .args(args)
        .env_remove("DISTILL_SERVE_EXECUTION_PROVIDER")
        .env_remove("DISTILL_SERVE_MODEL_REPOSITORY")
        .output()
        .unwrap()
}

#[test]
fn doctor_reports_the_machine_and_passes_on_the_cpu() {
    let out = doctor(&[]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("ONNX Runtime 1."), "{said}");
    assert!(said.contains("execution providers in this build: cpu"), "{said}");
    assert!(
        said.contains("provider cpu: runs (configured for the server default)"),
        "{said}"
    );
    assert!(said.contains("CUDA libraries:") && said.contains("TensorRT:"), "{said}");
    // setup installs NVRTC: the kernels compile here, GPU or not.
    assert!(said.contains("native CUDA kernels: NVRTC 13."), "{said}");
    let has_gpu = Command::new("nvidia-smi").output().is_ok_and(|o| o.status.success());
    if has_gpu {
        assert!(said.contains("GPU 0: "), "{said}");
    } else {
        println!("no NVIDIA driver here: checking the no-GPU report");
        assert!(said.contains("GPU: none (no NVIDIA driver"), "{said}");
    }
}

#[test]
fn doctor_fails_on_a_configured_provider_that_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_version(&repo, "coder", 1, 1);
    std::fs::write(
        repo.join("coder/model.toml"),
        "name = \"coder\"\nexecution_provider = \"tensorrt\"\n",
    )
    .unwrap();
    if cfg!(feature = "tensorrt") {
        println!("skipped: this build has TensorRT, so whether a tensorrt model runs depends on the machine");
        return;
    }
    let out = doctor(&["--model-repository", repo.to_str().unwrap()]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("provider tensorrt: cannot run (configured for model coder)"),
        "{said}"
    );
    assert!(
        said.contains("a configured execution provider cannot run here"),
        "{said}"
    );
    // The CPU default alone passes.
    let out = doctor(&["--execution-provider", "cpu"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The native engine's providers as doctor sees them: native-cpu always runs; native-cuda
/// configured where there is no GPU fails the check, naming why.
#[test]
fn doctor_probes_the_native_engine() {
    let out = doctor(&["--execution-provider", "native-cpu"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("provider native-cpu: runs (configured for the server default)"),
        "{said}"
    );
    if gpu_present() || !cfg!(feature = "cuda-native") {
        println!("skipped the no-GPU half: this machine has a GPU, or the build no native engine");
        return;
    }
    let out = doctor(&["--execution-provider", "native-cuda"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("provider native-cuda: cannot run (configured for the server default): no CUDA driver"),
        "{said}"
    );
}

/// Whether an NVIDIA GPU answers here.
fn gpu_present() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

#[test]
fn the_gpu_form_on_cuda_gives_the_logits_of_the_cpu() {
    use distill_serve::checkpoint::Family;
    use distill_serve::engine::{DecoderSession, ExecutionProvider, SessionOptions, SlotCache};
    use distill_serve::export::{self, ExternalData, Form, Int8Format, Precision};

    if !cfg!(feature = "cuda") {
        println!("skipped: this build has no CUDA provider (cargo test --features cuda)");
        return;
    }
    if !gpu_present() {
        println!("skipped: no NVIDIA GPU here (nvidia-smi lists none)");
        return;
    }
    let student = common::student(Family::Qwen2, 21, |_| {});
    let dir = student.dir.path().join("gpu-form");
    let precision = Precision::Int8(Int8Format::MatMulNBits);
    export::export_form(&student.checkpoint, &dir, precision, ExternalData::Never, Form::GPU).unwrap();
    let model = dir.join(export::MODEL_FILE);
    let prompts: Vec<Vec<u32>> = common::PROMPTS.iter().map(|p| student.encode(p)).collect();
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let run = |provider| {
        let options = SessionOptions {
            execution_provider: provider,
            ..SessionOptions::default()
        };
        let mut session = DecoderSession::open(&model, options).unwrap();
        let (first, prefill) = session.prefill_rows(&rows).unwrap();
        let mut slots = SlotCache::new(&session, rows.len(), 64).unwrap();
        for b in 0..rows.len() {
            slots.write(b, &prefill, b).unwrap();
        }
        let step = slots.step(&mut session, &vec![7; rows.len()]).unwrap();
        (first, step)
    };
    let (cpu, gpu) = (run(ExecutionProvider::Cpu), run(ExecutionProvider::Cuda));
    for (name, a, b) in [("prefill", &cpu.0, &gpu.0), ("step", &cpu.1, &gpu.1)] {
        for r in 0..rows.len() {
            let c = distill_serve::reference::cosine(&a.row(r).to_vec(), &b.row(r).to_vec());
            assert!(
                c >= 0.999,
                "{name} row {r}: cosine {c} between the CPU and CUDA providers"
            );
        }
    }
}
