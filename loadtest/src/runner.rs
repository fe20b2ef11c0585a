//! The load loops. Closed loop: N clients, each sending its next request when the previous one
//! is answered. Open loop: requests arrive as a Poisson process at a rate, whether or not earlier
//! ones are answered; each is timed from the moment it was due, so a server (or a generator) that
//! falls behind shows in the latency instead of silently lowering the load (coordinated
//! omission). Every level stops at its request count or its time limit, whichever comes first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Client, Failure, Sample};
use crate::stats::Latencies;
use crate::workload::Workload;

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Load {
    /// `concurrency` clients, each with one request outstanding.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` requests per second.
    Open { rate: f64 },
}

impl Load {
    /// The level's x value in plots: clients, or requests per second.
    pub fn level(&self) -> f64 {
        match *self {
            Self::Closed { concurrency } => concurrency as f64,
            Self::Open { rate } => rate,
        }
    }
}

/// Bounds of one level.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most requests sent.
    pub requests: u64,
    /// No request starts after this long.
    pub duration: Duration,
    /// Open loop: most requests outstanding; a due request waits for a place (and its latency
    /// counts the wait).
    pub max_in_flight: usize,
}

/// What one level measured.
#[derive(Clone, Default)]
pub struct LevelResult {
    pub sent: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub wall: Duration,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Closed loop: send to answer. Open loop: due time to answer (corrected).
    pub latency: Latencies,
    /// Open loop only: send to answer (uncorrected), to compare with `latency`.
    pub service: Latencies,
    pub first_token: Latencies,
}

impl LevelResult {
    fn add(&mut self, outcome: Result<Sample, Failure>, behind: Duration, open: bool) {
        self.sent += 1;
        match outcome {
            Ok(s) => {
                self.ok += 1;
                self.prompt_tokens += s.prompt_tokens;
                self.completion_tokens += s.completion_tokens;
                self.latency.record(s.latency + behind);
                if open {
                    self.service.record(s.latency);
                }
                if let Some(t) = s.first_token {
                    self.first_token.record(t + behind);
                }
            }
            Err(Failure(kind)) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    fn merge(&mut self, other: LevelResult) {
        self.sent += other.sent;
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.latency.merge(&other.latency);
        self.service.merge(&other.service);
        self.first_token.merge(&other.first_token);
    }
}

/// Runs one level; request numbers (prompts and seeds) start at `first`.
pub async fn run_level(
    client: &Client,
    workload: &Arc<Workload>,
    seed: u64,
    load: Load,
    bounds: Bounds,
    first: u64,
) -> LevelResult {
    let started = Instant::now();
    let mut result = match load {
        Load::Closed { concurrency } => closed(client, workload, seed, concurrency, bounds, first).await,
        Load::Open { rate } => open(client, workload, seed, rate, bounds, first).await,
    };
    result.wall = started.elapsed();
    result
}

async fn closed(
    client: &Client,
    workload: &Arc<Workload>,
    seed: u64,
    concurrency: usize,
    bounds: Bounds,
    first: u64,
) -> LevelResult {
    let next = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + bounds.duration;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, workload, next) = (client.clone(), Arc::clone(workload), Arc::clone(&next));
        tasks.spawn(async move {
            let mut part = LevelResult::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bounds.requests || Instant::now() >= stop_at {
                    return part;
                }
                let index = first + i;
                let outcome = client.send(&workload.prompt(seed, index), index).await;
                part.add(outcome, Duration::ZERO, false);
            }
        });
    }
    let mut result = LevelResult::default();
    while let Some(part) = tasks.join_next().await {
        result.merge(part.unwrap_or_else(|e| panicked(&e)));
    }
    result
}

async fn open(
    client: &Client,
    workload: &Arc<Workload>,
    seed: u64,
    rate: f64,
    bounds: Bounds,
    first: u64,
) -> LevelResult {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ first);
    let Ok(gaps) = Exp::new(rate) else {
        return LevelResult::default();
    };
    let places = Arc::new(Semaphore::new(bounds.max_in_flight.max(1)));
    let start = tokio::time::Instant::now();
    let mut due = start;
    let mut tasks = JoinSet::new();
    for i in 0..bounds.requests {
        due += Duration::from_secs_f64(gaps.sample(&mut rng));
        if due.duration_since(start) > bounds.duration {
            break;
        }
        tokio::time::sleep_until(due).await;
        let Ok(place) = Arc::clone(&places).acquire_owned().await else {
            break;
        };
        let (client, workload) = (client.clone(), Arc::clone(workload));
        tasks.spawn(async move {
            let behind = due.elapsed();
            let index = first + i;
            let outcome = client.send(&workload.prompt(seed, index), index).await;
            drop(place);
            let mut part = LevelResult::default();
            part.add(outcome, behind, true);
            part
        });
    }
    let mut result = LevelResult::default();
    while let Some(part) = tasks.join_next().await {
        result.merge(part.unwrap_or_else(|e| panicked(&e)));
    }
    result
}

/// A client task that panicked counts as one failed request.
fn panicked(e: &tokio::task::JoinError) -> LevelResult {
    let mut r = LevelResult::default();
    r.add(Err(Failure(format!("client_task_failed: {e}"))), Duration::ZERO, false);
    r
}
