//! The batcher of an encoder model (classification, token classification): a whole request is
//! one forward pass, so there is no decode loop and padding is the cost. Requests wait in the
//! same length buckets as prompts ([`BucketQueue`]: a bucket goes out when full, at the token
//! budget, or when its oldest request has waited `max_queue_delay`) and each batch is one
//! padded forward. A bounded number may wait; past it a request is refused at once (HTTP 429 /
//! `RESOURCE_EXHAUSTED`), as a request past its deadline is dropped unrun.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use ndarray::{Array2, Axis};
use tokio::sync::oneshot;

use super::health::{HealthState, spawn_watched};
use super::queue::{BatchPolicy, BucketQueue, Pending};
use super::{Health, RequestError};
use crate::engine::EncoderSession;
use crate::metrics::ModelMetrics;

/// One request's output rows: `[labels]` for a sequence, `[tokens, labels]` per token.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderOutput {
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
}

/// Why an encoder request was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeRefused {
    /// As many requests wait as the model allows.
    #[error("the model is busy: {waiting} requests are waiting already; retry in {retry_after} s")]
    Busy { waiting: usize, retry_after: u64 },
    /// The worker stopped.
    #[error("the model's worker stopped; reload the model")]
    Stopped,
}

struct Job {
    ids: Vec<i64>,
    /// Each token's segment (`token_type_ids`); none: all 0.
    types: Option<Vec<i64>>,
    deadline: Option<Instant>,
    arrived: Instant,
    reply: oneshot::Sender<Result<EncoderOutput, RequestError>>,
}

/// Hands requests to an encoder's worker thread; cloning shares it.
#[derive(Clone)]
pub struct EncoderScheduler {
    jobs: std_mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    health: Arc<HealthState>,
}

impl EncoderScheduler {
    /// Starts the worker that owns `session`; `pad_id` fills the rows of shorter inputs; at
    /// most `max_waiting` requests wait.
    pub fn spawn(
        name: &str,
        session: EncoderSession,
        pad_id: i64,
        policy: BatchPolicy,
        max_waiting: usize,
        metrics: ModelMetrics,
    ) -> std::io::Result<Self> {
        let (jobs, arrivals) = std_mpsc::channel();
        let health = Arc::new(HealthState::default());
        let waiting = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            session,
            pad_id,
            queue: BucketQueue::new(policy),
            metrics,
            health: Arc::clone(&health),
            waiting: Arc::clone(&waiting),
        };
        spawn_watched(format!("encoder-{name}"), &health, move || worker.run(arrivals))?;
        Ok(Self {
            jobs,
            waiting,
            max_waiting: max_waiting.max(1),
            health,
        })
    }

    /// Whether the worker can serve.
    pub fn health(&self) -> Health {
        self.health.get()
    }

    /// Queues one input (token ids, and segment ids for a pair) to be dropped at `deadline`;
    /// its output comes back on the returned receiver.
    pub fn submit(
        &self,
        ids: Vec<i64>,
        types: Option<Vec<i64>>,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Result<EncoderOutput, RequestError>>, EncodeRefused> {
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EncodeRefused::Busy {
                waiting,
                retry_after: 1,
            });
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            ids,
            types,
            deadline,
            arrived: Instant::now(),
            reply,
        };
        self.jobs.send(job).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            EncodeRefused::Stopped
        })?;
        Ok(answer)
    }
}

struct Worker {
    session: EncoderSession,
    pad_id: i64,
    queue: BucketQueue<Job>,
    metrics: ModelMetrics,
    health: Arc<HealthState>,
    waiting: Arc<AtomicUsize>,
}

impl Worker {
    fn run(mut self, arrivals: std_mpsc::Receiver<Job>) {
        loop {
            let wait = self
                .queue
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            let first = match wait {
                None => match arrivals.recv() {
                    Ok(job) => Some(job),
                    // Every sender is gone and nothing waits: the model was unloaded.
                    Err(_) => return,
                },
                Some(wait) => match arrivals.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                        // Serve what waits, without waiting for buckets to fill.
                        std::thread::sleep(wait.min(Duration::from_millis(1)));
                        None
                    }
                },
            };
            for job in first.into_iter().chain(arrivals.try_iter()) {
                let (tokens, arrived) = (job.ids.len(), job.arrived);
                self.queue.push(job, tokens, arrived, arrived);
            }
            while let Some((bucket, batch)) = self.queue.next_batch(Instant::now(), usize::MAX) {
                self.metrics.bucket_dispatch(self.queue.bucket_bound(bucket));
                self.waiting.fetch_sub(batch.len(), Ordering::AcqRel);
                self.run_batch(batch);
            }
            self.metrics.queue_depth.set(self.queue.len() as i64);
        }
    }

    /// One padded forward for `batch`; each request gets its own rows.
    fn run_batch(&mut self, batch: Vec<Pending<Job>>) {
        let now = Instant::now();
        let mut jobs = Vec::with_capacity(batch.len());
        for p in batch {
            let job = p.item;
            if job.reply.is_closed() {
                self.metrics.cancelled.inc();
            } else if job.deadline.is_some_and(|d| d <= now) {
                self.metrics.deadline_exceeded.inc();
                let _ = job.reply.send(Err(RequestError::DeadlineExceeded));
            } else {
                self.metrics
                    .queue_time
                    .observe(now.duration_since(job.arrived).as_secs_f64());
                jobs.push(job);
            }
        }
        if jobs.is_empty() {
            return;
        }
        let longest = jobs.iter().map(|j| j.ids.len()).max().unwrap_or(1).max(1);
        let mut ids = Array2::from_elem((jobs.len(), longest), self.pad_id);
        let mut mask = Array2::<i64>::zeros((jobs.len(), longest));
        let mut types = Array2::<i64>::zeros((jobs.len(), longest));
        for (row, job) in jobs.iter().enumerate() {
            for (col, &id) in job.ids.iter().enumerate() {
                ids[[row, col]] = id;
                mask[[row, col]] = 1;
            }
            for (col, &t) in job.types.iter().flatten().enumerate() {
                types[[row, col]] = t;
            }
        }
        self.metrics.batch_size.observe(jobs.len() as f64);
        let real: usize = jobs.iter().map(|j| j.ids.len()).sum();
        self.metrics.observe_prefill(jobs.len() * longest, real);
        let result = self.session.forward_typed(&ids, &mask, Some(&types));
        self.health.record(result.is_ok());
        match result {
            Ok(logits) => {
                for (row, job) in jobs.into_iter().enumerate() {
                    let rows = logits.index_axis(Axis(0), row);
                    // Per-token outputs keep this input's own positions, not the padding.
                    let rows = match rows.ndim() {
                        2 => rows.slice_axis(Axis(0), (0..job.ids.len()).into()).to_owned(),
                        _ => rows.to_owned(),
                    };
                    let output = EncoderOutput {
                        shape: rows.shape().to_vec(),
                        values: rows.iter().copied().collect(),
                    };
                    let _ = job.reply.send(Ok(output));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, rows = jobs.len(), "encoder forward failed");
                for job in jobs {
                    let _ = job
                        .reply
                        .send(Err(RequestError::Failed(format!("the model failed: {e}"))));
                }
            }
        }
    }
}
