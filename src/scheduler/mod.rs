//! Per-model request queue and the worker that runs it.
//!
//! Admission is bounded: a request is queued with `try_send`, and a full queue is an immediate
//! [`SubmitError::QueueFull`] (HTTP 429 / `RESOURCE_EXHAUSTED`), never a wait. One worker thread
//! owns the model's ONNX Runtime session (`Session::run` needs `&mut`) and serves the queue in
//! order, one sequence at a time; events go back over a bounded channel per request, and a
//! request whose receiver is gone (client disconnected) is skipped or stopped at the next token.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::engine::DecoderSession;
use crate::generate::{Event, GenerationRequest, generate};
use crate::metrics::ModelMetrics;

/// Events a request receives: generation events, or the error that ended it.
pub type EventResult = Result<Event, String>;

/// Why a request was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is at capacity.
    #[error("the model's queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The worker has stopped (the model is being unloaded).
    #[error("the model is shutting down")]
    Closed,
}

struct Job {
    request: GenerationRequest,
    events: mpsc::Sender<EventResult>,
    queued_at: Instant,
}

/// Handle to a model's queue; cloning shares the queue.
#[derive(Clone)]
pub struct Scheduler {
    jobs: mpsc::Sender<Job>,
    capacity: usize,
    waiting: Arc<AtomicUsize>,
    metrics: ModelMetrics,
}

impl Scheduler {
    /// Starts the worker thread for `session`; at most `capacity` requests wait.
    pub fn spawn(
        name: &str,
        mut session: DecoderSession,
        tokenizer: Arc<Tokenizer>,
        capacity: usize,
        metrics: ModelMetrics,
    ) -> std::io::Result<Self> {
        let capacity = capacity.max(1);
        let (jobs, mut queue) = mpsc::channel::<Job>(capacity);
        let waiting = Arc::new(AtomicUsize::new(0));
        let worker_waiting = Arc::clone(&waiting);
        let worker_metrics = metrics.clone();
        std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || {
                // Ends when every `Scheduler` clone is dropped (the model version was swapped out or
                // unloaded) and the queue is drained.
                while let Some(job) = queue.blocking_recv() {
                    worker_waiting.fetch_sub(1, Ordering::Relaxed);
                    worker_metrics
                        .queue_depth
                        .set(worker_waiting.load(Ordering::Relaxed) as i64);
                    worker_metrics.queue_time.observe(job.queued_at.elapsed().as_secs_f64());
                    run_job(&mut session, &tokenizer, job, &worker_metrics);
                }
            })?;
        Ok(Self {
            jobs,
            capacity,
            waiting,
            metrics,
        })
    }

    /// Queues `request`; its events arrive on the returned receiver.
    pub fn submit(&self, request: GenerationRequest) -> Result<mpsc::Receiver<EventResult>, SubmitError> {
        let (events, receiver) = mpsc::channel(64);
        let job = Job {
            request,
            events,
            queued_at: Instant::now(),
        };
        // Count before sending: the worker may take the job (and count it down) at once.
        let depth = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.set(depth as i64);
                Ok(receiver)
            }
            Err(e) => {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull(self.capacity),
                    mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
                })
            }
        }
    }
}

fn run_job(session: &mut DecoderSession, tokenizer: &Tokenizer, job: Job, metrics: &ModelMetrics) {
    if job.events.is_closed() {
        metrics.cancelled.inc();
        return;
    }
    let started = Instant::now();
    let mut first = true;
    let mut cancelled = false;
    let result = generate(session, tokenizer, &job.request, |event| {
        if first {
            metrics.time_to_first_token.observe(started.elapsed().as_secs_f64());
            first = false;
        }
        let sent = job.events.blocking_send(Ok(event)).is_ok();
        cancelled |= !sent;
        sent
    });
    match result {
        Ok(tokens) => {
            metrics.generated_tokens.inc_by(tokens as u64);
            metrics.prompt_tokens.inc_by(job.request.prompt.len() as u64);
            if cancelled {
                metrics.cancelled.inc();
            }
        }
        Err(e) => {
            // The receiver may be gone too; nothing else to tell.
            let _ = job.events.blocking_send(Err(e.to_string()));
        }
    }
}
