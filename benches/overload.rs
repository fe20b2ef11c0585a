//! Overload, measured: the 10x scenario with the official OpenAI Python SDK (its default retries
//! honour Retry-After) against the same binary with the old fixed counts and with admission by
//! time, side by side; then a soak: the 10x load held for `--minutes` (bounded), reporting per
//! minute throughput, p50/p99 and errors, and the server's resident memory every 5 s.
//!
//! ```sh
//! cargo bench --bench overload                       # compare, then a 10-minute soak
//! cargo bench --bench overload -- --minutes 2 --skip-compare
//! ```
//! Flags: `--clients N` (the 10x level, default 160), `--requests-per-client N` (default 4),
//! `--max-tokens N` (default 128),
//! `--minutes N` (soak length, 0 = none; default 10), `--no-warmup` (soak a server started
//! without `--warmup`), `--skip-compare`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use distill_serve::tiny::ShapePreset;
use loadtest::{Bounds, Client, Load, Plan, Protocol, Sampling, Workload, workload};
use serde_json::Value;

/// The 10x scenario, old counts against admission by time, and a soak.
#[derive(clap::Parser)]
struct Options {
    /// Concurrent clients of the 10x level (the normal level is a tenth).
    #[arg(long, default_value_t = 160)]
    clients: usize,
    /// Requests each client of the 10x level sends in turn (the normal level's send ten times
    /// as many): long enough that a queue stays full past the SDK's two retries.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Length of the soak in minutes (0: no soak).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Soak without `--warmup` (the arena then grows to the workload's peak over minutes).
    #[arg(long)]
    no_warmup: bool,
    /// Skip the side-by-side 10x comparison.
    #[arg(long)]
    skip_compare: bool,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn start(repo: &Path, flags: &[&str]) -> Result<common::Server> {
    let repo = repo.to_str().context("repository path is not UTF-8")?;
    let mut args = vec!["--model-repository", repo];
    args.extend(flags);
    common::Server::start(&args, "warn", |_| {})
}

/// Runs the SDK's 10x script; its JSON report.
fn sdk_ten_x(base: &str, o: &Options) -> Result<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/openai_10x.py");
    let normal = (o.clients / 10).max(1).to_string();
    let out = Command::new("python3")
        .args([
            script,
            base,
            "bench",
            &normal,
            &o.requests_per_client.to_string(),
            &o.max_tokens.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        bail!("the SDK script failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn compare(repo: &Path, o: &Options) -> Result<()> {
    let configs: [(&str, &[&str]); 2] = [
        (
            "old fixed counts (--max-queue 64 --max-concurrent-requests 128)",
            &["--max-queue", "64", "--max-concurrent-requests", "128"],
        ),
        ("admission by time (defaults)", &[]),
    ];
    println!(
        "\n### 10x with the OpenAI SDK: {} clients, {} requests of {} tokens each (ignore_eos)\n",
        o.clients, o.requests_per_client, o.max_tokens
    );
    println!(
        "| server | answered | errors | answers/s | tokens/s | p50 s | p99 s | tokens/s at {} clients |",
        o.clients / 10
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, flags) in configs {
        let server = start(repo, flags)?;
        let r = sdk_ten_x(&server.base, o)?;
        let t = &r["tenfold"];
        println!(
            "| {name} | {}/{} | {} | {} | {} | {} | {} | {} |",
            t["answers"],
            t["requests"],
            t["errors"],
            t["answers_per_s"],
            t["tokens_per_s"],
            t["p50_s"],
            t["p99_s"],
            r["normal"]["tokens_per_s"]
        );
    }
    Ok(())
}

/// Resident memory of process `pid` in MiB (Linux).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn soak(repo: &Path, o: &Options) -> Result<()> {
    let server = start(repo, if o.no_warmup { &[] } else { &["--warmup"] })?;
    let pid = server.pid();
    let sampling = Sampling {
        model: "bench".into(),
        max_tokens: o.max_tokens,
        temperature: 0.7,
        stream: false,
    };
    let workload = Arc::new(Workload::Lognormal {
        modes: workload::parse_mix("0.6:6:0.5,0.3:24:0.4,0.1:80:0.3")?,
        max_words: 130,
    });
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        loop {
            samples.push((started.elapsed().as_secs_f64(), rss_mib(pid)));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stopped.changed() => return samples,
            }
        }
    });
    let warmup = if o.no_warmup { "no warm-up" } else { "--warmup" };
    println!(
        "\n### Soak: {} clients for {} minutes (closed loop, no retries; {warmup})\n",
        o.clients, o.minutes
    );
    println!("| minute | answered | errors | req/s | tokens/s | p50 ms | p99 ms | RSS MiB at its end |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut minute_rss = Vec::new();
    let mut errors = 0;
    for minute in 1..=o.minutes {
        let plan = Plan {
            client: Client::new(
                Protocol::Completions,
                &server.base,
                sampling.clone(),
                Duration::from_secs(120),
            )?,
            target: server.base.clone(),
            protocol: Protocol::Completions,
            sampling: sampling.clone(),
            workload: Arc::clone(&workload),
            seed: minute,
            loads: vec![Load::Closed { concurrency: o.clients }],
            bounds: Bounds {
                requests: u64::MAX,
                duration: Duration::from_secs(60),
                max_in_flight: 4 * o.clients,
            },
            warmup: 0,
            metrics_url: None,
        };
        let report = loadtest::execute(&plan).await;
        let level = report.levels.first().context("no level reported")?;
        let failed: u64 = level.errors.values().sum();
        errors += failed;
        let rss = rss_mib(pid);
        minute_rss.push(rss);
        let pct = |f: fn(&loadtest::Percentiles) -> f64| level.latency_ms.as_ref().map_or(f64::NAN, f);
        println!(
            "| {minute} | {} | {failed} {:?} | {:.1} | {:.0} | {:.0} | {:.0} | {rss:.0} |",
            level.ok,
            level.errors,
            level.requests_per_s,
            level.tokens_per_s,
            pct(|p| p.p50),
            pct(|p| p.p99),
        );
    }
    let _ = stop.send(true);
    let samples = sampler.await?;
    let line: Vec<String> = samples.iter().map(|(t, m)| format!("{t:.0}s {m:.0}")).collect();
    println!("\nRSS MiB every 5 s: {}", line.join(", "));
    if let (Some(first), Some(last)) = (minute_rss.first(), minute_rss.last()) {
        println!(
            "\nRSS minute 1: {first:.0} MiB, minute {}: {last:.0} MiB ({:+.1}%); errors: {errors}",
            o.minutes,
            (last / first - 1.0) * 100.0
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Options::parse();
    let dir = tempfile::tempdir()?;
    // The 16M student: the shape the issue's users load-tested.
    let repo = common::student_repository(dir.path(), ShapePreset::Mid, false)?;
    println!("CPU: {}", cpu_name());
    if !o.skip_compare {
        compare(&repo, &o)?;
    }
    if o.minutes > 0 {
        soak(&repo, &o).await?;
    }
    Ok(())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(|n| n.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}
