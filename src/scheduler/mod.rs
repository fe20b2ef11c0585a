//! Per-model scheduling: admission by time, length buckets, batched prefill and continuous
//! decode batching.
//!
//! [`Scheduler::submit`] admits a request when its estimated finish fits its deadline and the
//! longest queue time, and refuses it at once otherwise (HTTP 429 / `RESOURCE_EXHAUSTED`, with
//! the time after which it would fit); see [`admission`]. One worker thread owns
//! the model's ONNX Runtime session (`Session::run` needs `&mut`) and loops: take arrivals into
//! their length bucket, prefill the next ready bucket into the free decode slots, then run one
//! decode step for every active sequence. Sequences join and leave between steps; events go back
//! over an unbounded channel per request, so a slow client never stalls the batch, and a request
//! whose receiver is gone (client disconnected) leaves at its next step.

pub mod admission;
mod batch;
mod encoder;
mod health;
mod native;
mod queue;
mod stages;

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::engine::DecoderSession;
use crate::engine::cuda::NativeEngine;
use crate::generate::{Advance, Event, GenerateError, GenerationRequest, Sequence, Timings};
use crate::metrics::ModelMetrics;
pub use admission::{Admission, AdmissionLimits, Demand, Estimate, Priority, Ticket};
use batch::DecodeBatch;
pub use batch::warm_up;
pub use encoder::{EncodeRefused, EncoderOutput, EncoderScheduler};
pub use health::{FAILING_AFTER, Health};
use health::{HealthState, spawn_watched};
use native::NativeBatch;
pub use queue::{BatchPolicy, BucketQueue, Pending};
use stages::Stages;

/// What a decoder model's worker runs: an ONNX Runtime session, or the native engine.
pub enum DecoderEngine {
    Onnx(DecoderSession),
    Native(NativeEngine),
}

/// The engine with its decode batch (each engine keeps its cache in its own layout).
#[expect(clippy::large_enum_variant, reason = "one per model worker, never moved after start")]
enum Running {
    Onnx {
        session: DecoderSession,
        batch: DecodeBatch<Meta>,
    },
    Native {
        engine: NativeEngine,
        batch: NativeBatch<Meta>,
    },
}

impl Running {
    fn new(engine: DecoderEngine) -> Self {
        match engine {
            DecoderEngine::Onnx(session) => Self::Onnx {
                session,
                batch: DecodeBatch::default(),
            },
            DecoderEngine::Native(engine) => {
                let batch = NativeBatch::new(engine.slots());
                Self::Native { engine, batch }
            }
        }
    }

    /// Sequences decoding.
    fn len(&self) -> usize {
        match self {
            Self::Onnx { batch, .. } => batch.len(),
            Self::Native { batch, .. } => batch.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every sequence with `message` (after an engine failure).
    fn fail_all(&mut self, message: &str) {
        let fail = |meta: &Meta| {
            let _ = meta.events.send(Err(RequestError::Failed(message.to_string())));
        };
        match self {
            Self::Onnx { batch, .. } => {
                batch.metas().for_each(fail);
                *batch = DecodeBatch::default();
            }
            Self::Native { batch, .. } => {
                batch.metas().for_each(fail);
                batch.clear();
            }
        }
    }
}

/// Why a request ended without finishing.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Its deadline passed while it waited or ran.
    #[error("the request's deadline passed before it finished")]
    DeadlineExceeded,
    /// The engine failed.
    #[error("{0}")]
    Failed(String),
}

/// Events a request receives: generation events, or the error that ended it.
pub type EventResult = Result<Event, RequestError>;

/// The receiving end of a request's events.
pub type Events = mpsc::UnboundedReceiver<EventResult>;

/// Why a request was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The work ahead would keep it waiting longer than the longest queue time.
    #[error("the model is busy: this request would wait about {:.1} s to start; retry in {retry_after} s", wait.as_secs_f64())]
    QueueTime { wait: Duration, retry_after: u64 },
    /// It would not finish before its deadline.
    #[error("this request would finish in about {:.1} s, after its deadline; retry in {retry_after} s", finish.as_secs_f64())]
    Deadline { finish: Duration, retry_after: u64 },
    /// The queue is at its memory bound.
    #[error("the model's queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The queued prompts are at their memory bound.
    #[error("the model's queue holds its most prompt tokens ({0})")]
    QueuedTokens(usize),
    /// The model has as many requests in flight as it takes.
    #[error("the model has {0} requests in flight, its limit")]
    TooManyRequests(usize),
    /// The worker has stopped (the model is being unloaded).
    #[error("the model is shutting down")]
    Closed,
}

/// How far ahead of the next lower class a request is queued: a higher class goes first unless
/// the lower one has waited this much longer, so no class starves.
const PRIORITY_HEADSTART: Duration = Duration::from_secs(5);

struct Job {
    request: GenerationRequest,
    events: mpsc::UnboundedSender<EventResult>,
    queued_at: Instant,
    ticket: Ticket,
    stages: Stages,
}

/// Where a running sequence's events go, and its timings.
struct Meta {
    events: mpsc::UnboundedSender<EventResult>,
    /// Events held back until the end for a client that does not stream.
    held: Option<Vec<Event>>,
    queued_at: Instant,
    /// When its prefill started.
    admitted_at: Instant,
    deadline: Option<Instant>,
    first_token_at: Option<Instant>,
    last_event: Option<Instant>,
    /// The request's share of the load, given back when the sequence leaves, however it ends.
    ticket: Ticket,
    stages: Stages,
}

/// Handle to a model's scheduler; cloning shares it.
#[derive(Clone)]
pub struct Scheduler {
    jobs: std_mpsc::Sender<Job>,
    admission: Admission,
    metrics: ModelMetrics,
    health: Arc<HealthState>,
}

impl Scheduler {
    /// Starts the worker thread for `engine`.
    pub fn spawn(
        name: &str,
        engine: DecoderEngine,
        tokenizer: Arc<Tokenizer>,
        policy: BatchPolicy,
        limits: AdmissionLimits,
        metrics: ModelMetrics,
    ) -> std::io::Result<Self> {
        let (jobs, arrivals) = std_mpsc::channel();
        let admission = Admission::new(limits, policy.max_batch_size);
        let health = Arc::new(HealthState::default());
        let worker = Worker {
            running: Running::new(engine),
            tokenizer,
            queue: BucketQueue::new(policy.clone()),
            max_batch_size: policy.max_batch_size.max(1),
            admission: admission.clone(),
            metrics: metrics.clone(),
            health: Arc::clone(&health),
        };
        spawn_watched(format!("model-{name}"), &health, move || worker.run(arrivals))?;
        Ok(Self {
            jobs,
            admission,
            metrics,
            health,
        })
    }

    /// Whether the worker can serve.
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// Queues `request` in class `priority`; its events arrive on the returned receiver.
    pub fn submit(&self, request: GenerationRequest, priority: Priority) -> Result<Events, SubmitError> {
        let demand = Demand {
            prompt_tokens: request.prompt.len(),
            max_new_tokens: request.max_new_tokens,
            priority,
            deadline: request.deadline,
        };
        let queued_at = Instant::now();
        let ticket = self.admission.admit(&demand, queued_at).inspect_err(|e| {
            self.metrics.rejected(e.reason());
        })?;
        let (events, receiver) = mpsc::unbounded_channel();
        let job = Job {
            request,
            events,
            queued_at,
            ticket,
            stages: Stages::queued(),
        };
        // A failed send drops the job and its ticket, which gives the places back.
        self.jobs.send(job).map_err(|_| SubmitError::Closed)?;
        self.metrics.queue_depth.set(self.admission.waiting() as i64);
        Ok(receiver)
    }
}

impl SubmitError {
    /// The `reason` label of `distill_serve_rejected_requests_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            SubmitError::QueueTime { .. } => "queue_time",
            SubmitError::Deadline { .. } => "deadline_estimate",
            SubmitError::QueueFull(_) => "queue_full",
            SubmitError::QueuedTokens(_) => "queued_tokens",
            SubmitError::TooManyRequests(_) => "max_concurrent",
            SubmitError::Closed => "closed",
        }
    }
}

struct Worker {
    running: Running,
    tokenizer: Arc<Tokenizer>,
    queue: BucketQueue<Job>,
    max_batch_size: usize,
    admission: Admission,
    metrics: ModelMetrics,
    health: Arc<HealthState>,
}

/// Sends one sequence's events; false when its client is gone or it failed.
fn deliver(meta: &mut Meta, advance: Result<Advance, GenerateError>, metrics: &ModelMetrics) -> bool {
    let now = Instant::now();
    let since = now
        .duration_since(meta.last_event.unwrap_or(meta.queued_at))
        .as_secs_f64();
    match meta.last_event {
        None => {
            metrics.time_to_first_token.observe(since);
            meta.first_token_at = Some(now);
            meta.stages.decode();
        }
        Some(_) => metrics.inter_token_latency.observe(since),
    }
    meta.last_event = Some(now);
    if meta.deadline.is_some_and(|d| now > d) {
        metrics.deadline_exceeded.inc();
        let _ = meta.events.send(Err(RequestError::DeadlineExceeded));
        return false;
    }
    let advance = match advance {
        Ok(advance) => advance,
        Err(e) => {
            let _ = meta.events.send(Err(RequestError::Failed(e.to_string())));
            return false;
        }
    };
    let mut finished = false;
    for mut event in advance.events {
        match &mut event {
            Event::Token { .. } => {
                metrics.generated_tokens.inc();
                meta.ticket.generated();
            }
            Event::Finished { timings, .. } => {
                *timings = Timings {
                    queue: meta.admitted_at.duration_since(meta.queued_at),
                    prefill: meta.first_token_at.unwrap_or(now).duration_since(meta.admitted_at),
                    inference: now.duration_since(meta.admitted_at),
                };
                finished = true;
                meta.stages.end();
            }
        }
        match &mut meta.held {
            Some(held) => held.push(event),
            None if meta.events.send(Ok(event)).is_err() => {
                metrics.cancelled.inc();
                return false;
            }
            None => {}
        }
    }
    if let Some(held) = &mut meta.held {
        // A client that does not stream is still watched: when it is gone, stop.
        if meta.events.is_closed() {
            metrics.cancelled.inc();
            return false;
        }
        if finished {
            for event in held.drain(..) {
                let _ = meta.events.send(Ok(event));
            }
        }
    }
    true
}

impl Worker {
    fn enqueue(&mut self, job: Job) {
        let tokens = job.request.prompt.len();
        let arrived = job.queued_at;
        let rank = arrived + PRIORITY_HEADSTART * job.ticket.priority() as u32;
        self.queue.push(job, tokens, arrived, rank);
    }

    /// Runs until every [`Scheduler`] handle is gone and the work is done.
    fn run(mut self, arrivals: std_mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            if self.running.is_empty() && self.queue.is_empty() {
                match arrivals.recv() {
                    Ok(job) => self.enqueue(job),
                    Err(_) => return,
                }
            }
            while open {
                match arrivals.try_recv() {
                    Ok(job) => self.enqueue(job),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_abandoned_waiting();
            self.admit();
            if self.running.is_empty() {
                // Nothing decoding and no bucket ready: wait for an arrival, a bucket's delay, or
                // a waiting request's deadline (its client hears at once that it expired).
                let expiry = self.queue.items().filter_map(|job| job.request.deadline).min();
                if let Some(deadline) = self.queue.next_deadline().into_iter().chain(expiry).min() {
                    match arrivals.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(job) => self.enqueue(job),
                        Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => open = false,
                    }
                } else if !open {
                    return;
                }
                continue;
            }
            self.metrics.batch_size.observe(self.running.len() as f64);
            let (tokenizer, metrics) = (&self.tokenizer, &self.metrics);
            let started = Instant::now();
            let on_advance = |meta: &mut Meta, advance| deliver(meta, advance, metrics);
            let stepped = match &mut self.running {
                Running::Onnx { session, batch } => {
                    batch.step(session, tokenizer, on_advance).map_err(|e| e.to_string())
                }
                Running::Native { engine, batch } => {
                    let stepped = batch.step(engine, tokenizer, on_advance).map_err(|e| e.to_string());
                    metrics.cuda_graphs.set(engine.recorded_graphs() as i64);
                    stepped
                }
            };
            match stepped {
                Ok(()) => {
                    self.admission.observe_step(started.elapsed());
                    self.health.record(true);
                }
                Err(e) => {
                    tracing::error!(error = %e, "decode step failed");
                    self.health.record(false);
                    self.running.fail_all(&e);
                }
            }
        }
    }

    /// Drops waiting requests whose client is gone or whose deadline passed.
    fn drop_abandoned_waiting(&mut self) {
        let now = Instant::now();
        let (mut cancelled, mut expired) = (0, 0);
        self.queue.retain(|job| {
            if job.events.is_closed() {
                cancelled += 1;
                return false;
            }
            if job.request.deadline.is_some_and(|d| now > d) {
                let _ = job.events.send(Err(RequestError::DeadlineExceeded));
                expired += 1;
                return false;
            }
            true
        });
        if cancelled + expired > 0 {
            self.metrics.queue_depth.set(self.admission.waiting() as i64);
            self.metrics.cancelled.inc_by(cancelled as u64);
            self.metrics.deadline_exceeded.inc_by(expired as u64);
        }
    }

    /// Prefills ready buckets into the free decode slots.
    fn admit(&mut self) {
        loop {
            let free = self.max_batch_size.saturating_sub(self.running.len());
            let Some((bucket, pending)) = self.queue.next_batch(Instant::now(), free) else {
                return;
            };
            self.metrics.bucket_dispatch(self.queue.bucket_bound(bucket));
            let longest = pending.iter().map(|p| p.tokens).max().unwrap_or(0);
            let prompt_tokens: usize = pending.iter().map(|p| p.tokens).sum();
            let rows = pending.len();
            // A padded batch computes every row to the longest; the native engine only the
            // prompts' own tokens.
            let computed = match self.running {
                Running::Onnx { .. } => rows * longest,
                Running::Native { .. } => prompt_tokens,
            };
            self.metrics.observe_prefill(computed, prompt_tokens);
            let seqs: Vec<(Sequence, Meta)> = pending
                .into_iter()
                .map(|p| {
                    self.metrics.queue_time.observe(p.arrived.elapsed().as_secs_f64());
                    let mut job = p.item;
                    job.ticket.started();
                    job.stages.prefill(p.tokens, rows);
                    let held = (!job.request.stream).then(Vec::new);
                    let meta = Meta {
                        events: job.events,
                        held,
                        queued_at: job.queued_at,
                        admitted_at: Instant::now(),
                        deadline: job.request.deadline,
                        first_token_at: None,
                        last_event: None,
                        ticket: job.ticket,
                        stages: job.stages,
                    };
                    (Sequence::new(job.request), meta)
                })
                .collect();
            self.metrics.queue_depth.set(self.admission.waiting() as i64);
            // Kept to report a failed prefill to its requests.
            let senders: Vec<_> = seqs.iter().map(|(_, meta)| meta.events.clone()).collect();
            let metrics = &self.metrics;
            let started = Instant::now();
            let on_advance = |meta: &mut Meta, advance| deliver(meta, advance, metrics);
            let result = match &mut self.running {
                Running::Onnx { session, batch } => batch::prefill(session, &self.tokenizer, seqs, on_advance)
                    .map_err(|e| e.to_string())
                    .map(|prefilled| prefilled.map(|p| batch.join(session, p).map_err(|e| e.to_string()))),
                Running::Native { engine, batch } => batch
                    .prefill(engine, &self.tokenizer, seqs, on_advance)
                    .map_err(|e| e.to_string())
                    .map(|()| None),
            };
            match result {
                Ok(joined) => {
                    self.admission.observe_prefill(started.elapsed(), computed);
                    self.health.record(true);
                    if let Some(Err(e)) = joined {
                        tracing::error!(error = %e, "joining the decode batch failed");
                        self.running.fail_all(&e);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "prefill failed");
                    self.health.record(false);
                    for events in senders {
                        let _ = events.send(Err(RequestError::Failed(e.clone())));
                    }
                }
            }
        }
    }
}
