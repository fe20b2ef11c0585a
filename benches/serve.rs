//! The serving benchmark: one server binary under the `loadtest` 10x scenario (closed loop at a
//! baseline concurrency C, then 10C) in four configurations, each compared with the bare
//! engine doing exactly the same work. Bounded in count and time; every figure is a ratio
//! within this one run.
//!
//! - batching: the defaults (length buckets, continuous decode batching);
//! - off: `--max-batch-size 1`;
//! - FIFO: one bucket (`--buckets 512`): plain first-come batches padded to the longest;
//! - gqa: the defaults on the same student exported with fused attention (`--attention gqa`),
//!   its cache written in place in one shared buffer.
//!
//! Serving efficiency: the server logs the shape of every ONNX Runtime run (rows, new tokens,
//! cached positions) at debug level; after the 10C level the bench replays those runs, in order
//! and with the same shapes, on a bare `DecoderSession` in this process. The replay's time is
//! what the engine alone needs for the server's work; the server's wall time over it is the
//! cost of serving (HTTP, scheduling, sampling, cache re-layouts, idle gaps).
//!
//! ```sh
//! cargo bench --bench serve                                 # the mid (16M) student
//! cargo bench --bench serve -- --shape tiny --baseline 4
//! ```
//! Flags: `--shape tiny|mid`, `--baseline C` (default 2), `--requests N` per level (default
//! 200), `--max-tokens N` (default 32), `--lengths weight:median:sigma,...` (words).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use distill_serve::engine::{DecoderSession, KvCache, SessionOptions, SlotCache};
use distill_serve::tiny::ShapePreset;
use loadtest::{Bounds, Client, Load, Plan, Protocol, Report, Sampling, TenX, Workload, workload};
use ndarray::Array2;

/// The server under the loadtest 10x scenario, batching on and off, against the bare engine.
#[derive(clap::Parser)]
struct Options {
    /// The student's shape.
    #[arg(long, value_enum, default_value = "mid")]
    shape: ShapePreset,
    /// Clients of the normal level; the scenario then runs ten times as many.
    #[arg(long, default_value_t = 2)]
    baseline: usize,
    /// Requests per level.
    #[arg(long, default_value_t = 200)]
    requests: u64,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Prompt length mix in words, `share:median:sigma,...` (the tiny BPE spends about 3
    /// tokens per word, and the context is 512).
    #[arg(long, default_value = "0.6:6:0.5,0.3:24:0.4,0.1:80:0.3")]
    lengths: String,
    /// `cargo bench` passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

const MAX_WORDS: usize = 130;

/// One ONNX Runtime run of the server: rows, new tokens per row, cached positions, and how long
/// it took there (microseconds).
type Shape = (usize, usize, usize, u64);

/// Reads `rows=.. tokens=.. past=.. micros=..` from a server's debug line.
fn parse_shape(line: &str) -> Option<Shape> {
    let fields = line.split(" forward ").nth(1)?;
    let value = |key: &str| -> Option<usize> {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    Some((
        value("rows=")?,
        value("tokens=")?,
        value("past=")?,
        value("micros=")? as u64,
    ))
}

/// A server and the shapes of its runs.
struct Server {
    process: common::Server,
    shapes: Arc<Mutex<Vec<Shape>>>,
}

impl Server {
    fn start(repo: &Path, flags: &[&str]) -> Result<Self> {
        let shapes = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&shapes);
        let repo = repo.to_str().context("repository path is not UTF-8")?;
        let mut args = vec!["--max-queue", "1024", "--model-repository", repo];
        args.extend(flags);
        let process = common::Server::start(&args, "info,distill_serve::engine::decoder=debug", move |line| {
            if let Some(shape) = parse_shape(line) {
                recorded.lock().unwrap_or_else(|p| p.into_inner()).push(shape);
            }
        })?;
        Ok(Self { process, shapes })
    }

    /// Takes the shapes recorded so far.
    fn take_shapes(&self) -> Vec<Shape> {
        std::mem::take(&mut *self.shapes.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Runs one closed-loop level of `concurrency` clients.
async fn level(
    o: &Options,
    workload: &Arc<Workload>,
    (base, model): (&str, &str),
    concurrency: usize,
    warmup: u64,
) -> Result<Report> {
    let sampling = Sampling {
        model: model.into(),
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
        loads: vec![Load::Closed { concurrency }],
        bounds: Bounds {
            requests: o.requests,
            duration: Duration::from_secs(120),
            max_in_flight: 1024,
        },
        warmup,
        metrics_url: Some(format!("{base}/metrics")),
    };
    Ok(loadtest::execute(&plan).await)
}

/// The 10x scenario against `server`, and the shapes the server ran during the 10C level.
async fn ten_x(o: &Options, workload: &Arc<Workload>, server: &Server, model: &str) -> Result<(Report, Vec<Shape>)> {
    let target = (server.process.base.as_str(), model);
    let mut report = level(o, workload, target, o.baseline, 4).await?;
    server.take_shapes();
    let ten = level(o, workload, target, o.baseline * 10, 0).await?;
    // The server logs each run before it returns; give the last lines time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shapes = server.take_shapes();
    report.levels.extend(ten.levels);
    report.ten_x = Some(TenX::compare(o.baseline, &report.levels[0], &report.levels[1]));
    Ok((report, shapes))
}

/// Time the bare engine needs to run `shapes` in order (cache set-up between runs whose
/// shapes do not chain is not counted).
fn replay(session: &mut DecoderSession, shapes: &[Shape]) -> Result<Duration> {
    if session.fused_attention() {
        return replay_fused(session, shapes);
    }
    let mut held: Option<(usize, KvCache)> = None;
    let mut busy = Duration::ZERO;
    for &(rows, tokens, past, _) in shapes {
        let cache = match held.take() {
            Some((r, cache)) if r == rows && cache.len() == past => cache,
            _ => session.zeroed_cache(rows, past)?,
        };
        let ids = Array2::<i64>::zeros((rows, tokens));
        let mask = Array2::<i64>::ones((rows, past + tokens));
        let positions = Array2::from_shape_fn((rows, tokens), |(_, i)| (past + i) as i64);
        let started = Instant::now();
        let (_, cache) = session.forward_last(&ids, &mask, &positions, cache)?;
        busy += started.elapsed();
        held = Some((rows, cache));
    }
    Ok(busy)
}

/// [`replay`] for a fused-attention graph: prefills as right-padded batches of `tokens`-long
/// rows, decode steps over a shared cache whose rows all hold `past` positions (the server logs
/// the mean of its rows' lengths). Buffer set-up is not counted.
fn replay_fused(session: &mut DecoderSession, shapes: &[Shape]) -> Result<Duration> {
    let mut busy = Duration::ZERO;
    for &(rows, tokens, past, _) in shapes {
        if tokens > 1 || past == 0 {
            let prompt = vec![0u32; tokens];
            let prompts = vec![prompt.as_slice(); rows];
            let started = Instant::now();
            session.prefill_rows(&prompts)?;
            busy += started.elapsed();
        } else {
            let mut slots = SlotCache::with_lengths(session, &vec![past; rows], past + 1)?;
            let started = Instant::now();
            slots.step(session, &vec![0; rows])?;
            busy += started.elapsed();
        }
    }
    Ok(busy)
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = Options::parse();
    let dir = tempfile::tempdir()?;
    let repo = common::student_repository(dir.path(), o.shape, false)?;
    common::add_fused_export(dir.path())?;
    let workload = Arc::new(Workload::Lognormal {
        modes: workload::parse_mix(&o.lengths)?,
        max_words: MAX_WORDS,
    });

    let open = |model: &str| DecoderSession::open(&repo.join(model).join("1/model.onnx"), SessionOptions::default());
    let (mut with_past, mut fused) = (open("bench")?, open("bench-gqa")?);

    let configs: [(&str, &[&str], &str); 4] = [
        ("batching (buckets)", &[], "bench"),
        ("off (--max-batch-size 1)", &["--max-batch-size", "1"], "bench"),
        ("FIFO pad-to-longest (--buckets 512)", &["--buckets", "512"], "bench"),
        ("batching, fused attention (--attention gqa)", &[], "bench-gqa"),
    ];
    let mut rows = Vec::new();
    for (name, flags, model) in configs {
        let server = Server::start(&repo, flags)?;
        let (report, shapes) = ten_x(&o, &workload, &server, model).await?;
        drop(server);
        println!("\n#### {name}\n\n{}", report.markdown());
        let session = if model == "bench" { &mut with_past } else { &mut fused };
        let engine = replay(session, &shapes)?;
        let in_server = Duration::from_micros(shapes.iter().map(|s| s.3).sum());
        rows.push((name, report, engine, in_server));
    }

    println!(
        "\n### serve: {:?} student, INT8, {} clients (10 x {}), max_tokens {}, {} requests per level\n",
        o.shape,
        o.baseline * 10,
        o.baseline,
        o.max_tokens,
        o.requests
    );
    println!(
        "| configuration | gen tok/s | x off | p50 ms | p99 ms | errors | mean decode batch | prefill padding | engine alone tok/s | efficiency | wall s: in ORT / replayed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let off_tps = rows[1].1.levels[1].tokens_per_s;
    for (name, report, engine, in_server) in &rows {
        let l = &report.levels[1];
        let (p50, p99) = l.latency_ms.map_or((f64::NAN, f64::NAN), |p| (p.p50, p.p99));
        let (batch, padding) = l
            .server
            .map_or((f64::NAN, f64::NAN), |s| (s.mean_decode_batch, s.padding_ratio));
        let engine_tps = l.completion_tokens as f64 / engine.as_secs_f64().max(1e-9);
        println!(
            "| {name} | {:.0} | {:.2} | {p50:.1} | {p99:.1} | {} | {batch:.1} | {:.1}% | {engine_tps:.0} | {:.0}% | {:.2}: {:.2} / {:.2} |",
            l.tokens_per_s,
            l.tokens_per_s / off_tps,
            l.failed(),
            padding * 100.0,
            100.0 * l.tokens_per_s / engine_tps,
            l.duration_s,
            in_server.as_secs_f64(),
            engine.as_secs_f64()
        );
    }
    Ok(())
}
