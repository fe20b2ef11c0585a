//! Serving latency while a refresh job trains: the same closed-loop load before, during and
//! after the training stage of a refresh, on one server. The student is its own teacher
//! (token-level KD from its own `/v1`), so no second process competes; the load runs only
//! while the job is in its training stage, then the job is cancelled. Bounded in count and
//! time; the figures are ratios within this one run.
//!
//! ```sh
//! cargo bench --bench refresh                       # mid (16M) student, 1 training thread
//! cargo bench --bench refresh -- --shape tiny --train-threads 2
//! ```
//! Flags: `--shape tiny|mid`, `--clients N` (default 4), `--requests N` per level (default
//! 200), `--train-threads N` (default 1), `--nice N` (training threads' CPU priority, default
//! 10), `--intra-threads N` (serving's ONNX Runtime threads, default 0 = all cores),
//! `--max-tokens N` (default 32).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use distill_serve::tiny::ShapePreset;
use loadtest::{Bounds, Client, Load, Plan, Protocol, Report, Sampling, Workload, workload};
use serde_json::{Value, json};

const TOKEN: &str = "bench-admin-token";

/// Serving latency before, during and after a refresh job's training stage.
#[derive(clap::Parser)]
struct Options {
    /// The student's shape.
    #[arg(long, value_enum, default_value = "mid")]
    shape: ShapePreset,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Requests per phase.
    #[arg(long, default_value_t = 200)]
    requests: u64,
    #[arg(long, default_value_t = 1)]
    train_threads: usize,
    /// CPU priority of the training threads.
    #[arg(long, default_value_t = 10)]
    nice: i32,
    /// Serving's ONNX Runtime threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    intra_threads: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A server on loopback with the bench's admin token.
struct Server {
    process: common::Server,
}

impl Server {
    fn start(repo: &std::path::Path, intra_threads: usize) -> Result<Self> {
        let (repo, threads) = (
            repo.to_str().context("repository path is not UTF-8")?,
            intra_threads.to_string(),
        );
        let args = [
            "--intra-threads",
            &threads,
            "--max-queue",
            "1024",
            "--admin-token",
            TOKEN,
            "--model-repository",
            repo,
        ];
        Ok(Self {
            process: common::Server::start(&args, "info", |_| {})?,
        })
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        self.process
            .admin(TOKEN, method, path, body.map(|b| b.to_string()))
            .await
    }
}

async fn level(o: &Options, workload: &Arc<Workload>, base: &str) -> Result<Report> {
    let sampling = Sampling {
        model: "bench".into(),
        max_tokens: o.max_tokens,
        temperature: 0.7,
        stream: false,
    };
    let plan = Plan {
        client: Client::new(Protocol::Completions, base, sampling.clone(), Duration::from_secs(120))?,
        target: base.to_string(),
        protocol: Protocol::Completions,
        sampling,
        workload: Arc::clone(workload),
        seed: 0,
        loads: vec![Load::Closed { concurrency: o.clients }],
        bounds: Bounds {
            requests: o.requests,
            duration: Duration::from_secs(120),
            max_in_flight: 1024,
        },
        warmup: 4,
        metrics_url: None,
    };
    Ok(loadtest::execute(&plan).await)
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Options::parse();
    let dir = tempfile::tempdir()?;
    let repo = common::student_repository(dir.path(), o.shape, true)?;
    let workload = Arc::new(Workload::Lognormal {
        modes: workload::parse_mix("0.7:6:0.5,0.3:24:0.4")?,
        max_words: 100,
    });
    let server = Server::start(&repo, o.intra_threads)?;

    let before = level(&o, &workload, &server.process.base).await?;

    let prompts: Vec<Value> = (0..64)
        .map(|i| json!({"prompt": format!("Patient {i} reports chest pain and shortness of breath.")}))
        .collect();
    let job = json!({
        "dataset": "bench", "prompts": prompts,
        "teacher": {"url": format!("{}/v1", server.process.base), "model": "bench", "mode": "token",
                    "max_tokens": 24, "concurrency": 2},
        "train": {"steps": 1_000_000, "batch_size": 8, "threads": o.train_threads, "nice": o.nice},
    });
    let started = server
        .admin(reqwest::Method::POST, "/admin/v1/models/bench/refresh", Some(job))
        .await?;
    let id = started["id"].as_str().context("no job id")?.to_string();
    let path = format!("/admin/v1/jobs/{id}");
    let waited = Instant::now();
    let step_at = |j: &Value| j["result"]["training"]["step"].as_u64().unwrap_or(0);
    let first = loop {
        let j = server.admin(reqwest::Method::GET, &path, None).await?;
        if j["stage"] == "training" && step_at(&j) > 0 {
            break j;
        }
        if j["state"] != "running" && j["state"] != "queued" {
            bail!("the job ended before training: {j}");
        }
        if waited.elapsed() > Duration::from_secs(300) {
            bail!("the job did not reach training in 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let t0 = Instant::now();
    let during = level(&o, &workload, &server.process.base).await?;
    let last = server.admin(reqwest::Method::GET, &path, None).await?;
    let steps_per_s = (step_at(&last) - step_at(&first)) as f64 / t0.elapsed().as_secs_f64();
    if last["stage"] != "training" {
        bail!("training ended during the measurement: {last}");
    }
    server
        .admin(reqwest::Method::POST, &format!("{path}/cancel"), None)
        .await?;
    let ended = Instant::now();
    loop {
        let j = server.admin(reqwest::Method::GET, &path, None).await?;
        if j["state"] == "cancelled" || ended.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = level(&o, &workload, &server.process.base).await?;

    println!(
        "\n### refresh: serving latency while training — {:?} student, INT8, {} clients, {} requests per level, {} training thread(s) at nice {}, serving on {} ORT thread(s) (0 = all cores)\n",
        o.shape, o.clients, o.requests, o.train_threads, o.nice, o.intra_threads
    );
    println!("| phase | req/s | gen tok/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|---|");
    let mut p99 = Vec::new();
    for (name, report) in [("before", &before), ("during training", &during), ("after", &after)] {
        let l = &report.levels[0];
        let (p50, p) = l.latency_ms.map_or((f64::NAN, f64::NAN), |p| (p.p50, p.p99));
        p99.push(p);
        println!(
            "| {name} | {:.1} | {:.0} | {p50:.1} | {p:.1} | {} |",
            l.requests_per_s,
            l.tokens_per_s,
            l.failed()
        );
    }
    println!(
        "\np99 during training / before: {:.2}x; training ran {steps_per_s:.2} steps/s (batch 8) during the load",
        p99[1] / p99[0]
    );
    Ok(())
}
