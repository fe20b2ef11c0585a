//! Latency and throughput of a real server over loopback: one client, then 16 concurrent
//! clients, each sending `/v1/completions` requests one after another. Bounded in count and
//! time; the ratio of the two runs is the figure to compare.
//!
//! ```sh
//! cargo bench --bench serve                      # the default tiny student
//! cargo bench --bench serve -- --shape mid       # a 16M-parameter student
//! ```
//! Flags: `--shape tiny|mid`, `--requests N` (per level, default 64), `--max-tokens N`
//! (default 32), `--concurrency 1,16`, `--max-batch-size N` (passed to the server; 1 turns
//! batching off).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use distill_serve::checkpoint::Family;
use distill_serve::export::{self, ExternalData, Precision};
use distill_serve::tiny::{ShapePreset, TinySpec, write_tiny};
use serde_json::{Value, json};

struct Options {
    /// Extra flags for `distill-serve serve` (e.g. `--max-batch-size 1`).
    server_args: Vec<String>,
    shape: ShapePreset,
    requests: usize,
    max_tokens: usize,
    levels: Vec<usize>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        server_args: Vec::new(),
        shape: ShapePreset::Tiny,
        requests: 64,
        max_tokens: 32,
        levels: vec![1, 16],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--shape" => {
                o.shape = match value()?.as_str() {
                    "tiny" => ShapePreset::Tiny,
                    "mid" => ShapePreset::Mid,
                    other => bail!("unknown shape {other} (tiny, mid)"),
                }
            }
            "--requests" => o.requests = value()?.parse()?,
            "--max-tokens" => o.max_tokens = value()?.parse()?,
            "--concurrency" => o.levels = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--max-batch-size" => o.server_args.extend(["--max-batch-size".to_string(), value()?]),
            "--intra-threads" => o.server_args.extend(["--intra-threads".to_string(), value()?]),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn client(base: String, ids: Vec<usize>, max_tokens: usize, deadline: Instant) -> Result<Vec<(Duration, u64)>> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for i in ids {
        if Instant::now() > deadline {
            break;
        }
        let body = json!({"model": "bench", "prompt": format!("Request {i}: the patient reports"),
                          "max_tokens": max_tokens, "temperature": 0.7, "seed": i});
        let started = Instant::now();
        let response = http.post(format!("{base}/v1/completions")).json(&body).send().await?;
        if !response.status().is_success() {
            bail!("request {i}: HTTP {}", response.status());
        }
        let v: Value = response.json().await?;
        out.push((started.elapsed(), v["usage"]["completion_tokens"].as_u64().unwrap_or(0)));
    }
    Ok(out)
}

/// (sum, count) of the server's decode batch size histogram.
async fn batch_counts(base: &str) -> Result<(f64, f64)> {
    let text = reqwest::get(format!("{base}/metrics")).await?.text().await?;
    let value = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    Ok((
        value("distill_serve_batch_size_sum{model=\"bench\"}"),
        value("distill_serve_batch_size_count{model=\"bench\"}"),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse_args()?;
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("checkpoint");
    let mut spec = TinySpec::new(Family::Qwen2, 0);
    spec.shape = o.shape;
    write_tiny(&spec, &ckpt)?;
    let repo = dir.path().join("models");
    export::export(
        &ckpt,
        &repo.join("bench/1"),
        Precision::DEFAULT_INT8,
        ExternalData::Auto,
    )?;
    std::fs::write(repo.join("bench/model.toml"), "name = \"bench\"\n")?;

    let mut server = Command::new(env!("CARGO_BIN_EXE_distill-serve"))
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--max-queue",
            "256",
        ])
        .args(&o.server_args)
        .arg("--model-repository")
        .arg(&repo)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = server.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("HTTP listening addr=").nth(1) {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let base = format!("http://{}", rx.recv_timeout(Duration::from_secs(60))?);

    println!(
        "\n### serve: {:?} student, INT8, /v1/completions, max_tokens {}, server flags {:?}\n",
        o.shape, o.max_tokens, o.server_args
    );
    println!(
        "| clients | requests | p50 ms | p95 ms | p99 ms | requests/s | generated tok/s | x 1 client | mean decode batch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // Warm-up.
    client(
        base.clone(),
        vec![0, 1],
        o.max_tokens,
        Instant::now() + Duration::from_secs(30),
    )
    .await?;
    let mut baseline = None;
    let mut batches = batch_counts(&base).await?;
    for &level in &o.levels {
        let deadline = Instant::now() + Duration::from_secs(120);
        let started = Instant::now();
        let tasks: Vec<_> = (0..level)
            .map(|c| {
                let ids: Vec<usize> = (0..o.requests).filter(|i| i % level == c).collect();
                tokio::spawn(client(base.clone(), ids, o.max_tokens, deadline))
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.extend(t.await??);
        }
        let wall = started.elapsed().as_secs_f64();
        let mut latencies: Vec<Duration> = results.iter().map(|r| r.0).collect();
        latencies.sort();
        let tokens: u64 = results.iter().map(|r| r.1).sum();
        let tps = tokens as f64 / wall;
        let base_tps = *baseline.get_or_insert(tps);
        let now = batch_counts(&base).await?;
        let mean_batch = (now.0 - batches.0) / (now.1 - batches.1).max(1.0);
        batches = now;
        println!(
            "| {level} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {mean_batch:.1} |",
            results.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.95),
            percentile(&latencies, 0.99),
            results.len() as f64 / wall,
            tps,
            tps / base_tps
        );
    }
    let _ = server.kill();
    let _ = server.wait();
    Ok(())
}
