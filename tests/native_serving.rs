//! The native engine behind the server (`execution_provider = "native-cpu"` / `"native-cuda"`
//! in `model.toml`): requests over HTTP get what the engine gives each prompt alone, however
//! they are batched; constraints, seeds and logprobs hold; a request longer than a slot is
//! refused; `native-cuda` without a GPU is a load error the admin API reports while other
//! models serve. `native-cuda` serves here through the emulated GPU of `tests/emulate/`.

mod common;

use common::PROMPTS;
use common::server::{TestServer, add_trainable_version};
use distill_serve::checkpoint::{Checkpoint, ModelConfig};
use distill_serve::engine::cuda::reference::CpuBackend;
use distill_serve::engine::cuda::{NativeDecoder, StepRows, WeightFormat};
use distill_serve::generate::argmax;
use serde_json::{Value, json};

const SLOT_TOKENS: usize = 64;
const NEW_TOKENS: usize = 8;

/// A repository with model `native` (a tiny qwen2 with its checkpoint) on `provider`, FP16.
fn repository(provider: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    repository_with(provider, WeightFormat::Fp16)
}

/// A repository with model `native` on `provider` with `weights`.
fn repository_with(provider: &str, weights: WeightFormat) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models");
    add_trainable_version(&repo, "native", 1, 5);
    let toml = format!(
        "name = \"native\"\nexecution_provider = \"{provider}\"\nnative_weights = \"{}\"\nmax_batch_size = 4\nnative_slot_tokens = {SLOT_TOKENS}\n",
        format!("{weights:?}").to_lowercase()
    );
    std::fs::write(repo.join("native/model.toml"), toml).unwrap();
    (dir, repo)
}

/// Greedy continuation of `prompt` by the engine alone, cut at the first stop token.
fn greedy_alone(engine: &mut NativeDecoder<CpuBackend>, prompt: &[u32], stops: &[u32]) -> Vec<u32> {
    let mut tokens = Vec::new();
    let mut rows = StepRows {
        tokens: prompt.to_vec(),
        slots: vec![0; prompt.len()],
        positions: (0..prompt.len() as u32).collect(),
    };
    while tokens.len() < NEW_TOKENS {
        let last = rows.len() as u32 - 1;
        let next = argmax(&engine.step(&rows, &[last]).unwrap()[0]);
        if stops.contains(&next) {
            break;
        }
        tokens.push(next);
        rows = StepRows {
            tokens: vec![next],
            slots: vec![0],
            positions: vec![(prompt.len() + tokens.len() - 1) as u32],
        };
    }
    tokens
}

async fn complete(server: &TestServer, prompt: &[u32]) -> (u16, Value) {
    let body = json!({"model": "native", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0});
    let r = server.post("/v1/completions", &body).await;
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn concurrent_requests_get_what_the_engine_gives_each_alone() {
    serves_what_the_engine_gives_each_alone("native-cpu", WeightFormat::Fp16, &[]).await;
}

/// `native-cuda` end to end where no GPU is: the server process loads the emulated driver of
/// `tests/emulate/` (first on its library path), so the CUDA backend and the device sampler
/// serve, and must give what the CPU reference gives; BF16 weights.
#[cfg(feature = "cuda-native")]
#[tokio::test]
async fn native_cuda_on_the_emulated_gpu_serves_what_the_engine_gives_each_alone() {
    let fake = common::fake_gpu::library_dir().display().to_string();
    serves_what_the_engine_gives_each_alone("native-cuda", WeightFormat::Bf16, &[("LD_LIBRARY_PATH", &fake)]).await;
}

/// Six prompts, alone and then at once through four slots of `provider` with `weights`, each get
/// the CPU reference engine's greedy continuation; a prompt longer than a slot is a 400.
async fn serves_what_the_engine_gives_each_alone(provider: &str, weights: WeightFormat, env: &[(&str, &str)]) {
    let (dir, repo) = repository_with(provider, weights);
    let checkpoint = repo.join("native/1/checkpoint");
    let tokenizer = tokenizers::Tokenizer::from_file(checkpoint.join("tokenizer.json")).unwrap();
    let ModelConfig::Decoder(config) = Checkpoint::open(&checkpoint).unwrap().config else {
        panic!("a decoder")
    };
    let texts = [
        PROMPTS[0],
        PROMPTS[1],
        PROMPTS[2],
        "Code: I10",
        "Chest pain",
        "Acute bronchitis due to",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode(*t, false).unwrap().get_ids().to_vec())
        .collect();
    let mut engine = NativeDecoder::load(&checkpoint, CpuBackend, weights, 1, SLOT_TOKENS).unwrap();
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            tokenizer
                .decode(&greedy_alone(&mut engine, p, &config.eos_token_ids), true)
                .unwrap()
        })
        .collect();

    let distinct: std::collections::HashSet<&String> = expected.iter().filter(|t| !t.is_empty()).collect();
    assert!(
        distinct.len() >= 4,
        "the prompts should continue differently: {expected:?}"
    );

    let server = TestServer::start_with_env(dir, repo, &[], env);
    let mut alone = Vec::new();
    for prompt in &prompts {
        let (status, v) = complete(&server, prompt).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert_eq!(alone, expected, "served alone vs the engine alone");
    // Six at once through four slots: four prefill together, two join as slots free up.
    let together = futures::future::join_all(prompts.iter().map(|p| complete(&server, p))).await;
    for (i, (status, v)) in together.iter().enumerate() {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"].as_str().unwrap(),
            expected[i],
            "prompt {i} batched"
        );
    }
    let long: Vec<u32> = prompts
        .iter()
        .flatten()
        .copied()
        .cycle()
        .take(SLOT_TOKENS + 1)
        .collect();
    let (status, v) = complete(&server, &long).await;
    assert_eq!(status, 400, "{v}");
    // native-cuda replays decode steps as CUDA graphs: one for a lone sequence, more for the
    // batch's shapes; the CPU backend has none.
    let graphs = server.metric("distill_serve_cuda_graphs{model=\"native\"}").await;
    if provider == "native-cuda" {
        assert!(graphs >= 2.0, "{graphs} decode shapes recorded as CUDA graphs");
    } else {
        assert_eq!(graphs, 0.0);
    }
}

#[cfg(feature = "cuda-native")]
#[tokio::test]
async fn native_cuda_without_a_gpu_is_a_load_error_the_admin_api_reports() {
    if distill_serve::kernels::device::CudaDevice::open(0).is_ok() {
        println!("skipped: this machine has a GPU, where native-cuda loads");
        return;
    }
    let (dir, repo) = repository("native-cuda");
    common::server::add_version(&repo, "tiny", 1, 1);
    let server = TestServer::start_with_repo(dir, repo, &[]);
    let models = server.admin_get("/admin/v1/models").await;
    let native = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "native")
        .unwrap()
        .clone();
    assert_eq!(native["state"], "UNAVAILABLE", "{models}");
    assert!(native["reason"].as_str().unwrap().contains("CUDA driver"), "{native}");
    let body = json!({"model": "tiny", "prompt": "still serving", "max_tokens": 2});
    assert_eq!(server.post("/v1/completions", &body).await.status(), 200);
}

#[tokio::test]
async fn constrained_seeded_sampling_with_logprobs_on_the_native_engine() {
    constrained_seeded_sampling_with_logprobs("native-cpu", &[]).await;
}

/// The same on `native-cuda` over the emulated GPU: masks go up to the device (the start of an
/// answer's from its cache), the sampling kernel chooses, ids and log-probabilities come back.
#[cfg(feature = "cuda-native")]
#[tokio::test]
async fn constrained_seeded_sampling_with_logprobs_on_the_emulated_gpu() {
    let fake = common::fake_gpu::library_dir().display().to_string();
    constrained_seeded_sampling_with_logprobs("native-cuda", &[("LD_LIBRARY_PATH", &fake)]).await;
}

/// Tokens chosen by the engine on `provider` from each sequence's plan: terminology constraints
/// hold, a seed repeats its answer, and log-probabilities come back.
async fn constrained_seeded_sampling_with_logprobs(provider: &str, env: &[(&str, &str)]) {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/terminology/icd10cm_tabular_small.xml");
    let codes = common::billable_codes(&fixture);
    let (dir, repo) = repository(provider);
    let terminology = format!("icd=icd10cm-xml:{}", fixture.display());
    let server = TestServer::start_with_env(dir, repo, &["--terminology", &terminology], env);
    let mut answers = Vec::new();
    for seed in 0..6 {
        let body = json!({"model": "native", "prompt": "Code for the patient:", "max_tokens": 40,
                          "temperature": if seed == 0 { 0.0 } else { 1.0 }, "top_p": 0.95, "seed": seed,
                          "constraint": {"terminology": "icd"}});
        let v = post_ok(&server, &body).await;
        let text = v["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(codes.contains(&text), "{text:?} is not a billable code");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            post_ok(&server, &body).await["choices"][0]["text"],
            text.as_str(),
            "seed {seed} repeats"
        );
        answers.push(text);
    }
    let distinct: std::collections::BTreeSet<&String> = answers.iter().collect();
    assert!(distinct.len() > 1, "six seeds gave one answer: {answers:?}");
    let body = json!({"model": "native", "prompt": "The patient", "max_tokens": 5, "logprobs": 3, "seed": 1});
    let v = post_ok(&server, &body).await;
    let logprobs = &v["choices"][0]["logprobs"];
    let tokens = logprobs["token_logprobs"].as_array().unwrap();
    assert!(!tokens.is_empty(), "{v}");
    for (lp, top) in tokens.iter().zip(logprobs["top_logprobs"].as_array().unwrap()) {
        let lp = lp.as_f64().unwrap();
        let top: Vec<f64> = top.as_object().unwrap().values().map(|x| x.as_f64().unwrap()).collect();
        // Three alternatives, fewer keys when two decode to the same text (such as "\u{fffd}").
        assert!(lp <= 0.0 && (1..=3).contains(&top.len()), "{v}");
        // The alternatives are the most likely tokens: the best is at least the chosen one.
        assert!(top.iter().copied().fold(f64::MIN, f64::max) >= lp - 1e-6, "{v}");
    }
}

async fn post_ok(server: &TestServer, body: &Value) -> Value {
    let r = server.post("/v1/completions", body).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}
