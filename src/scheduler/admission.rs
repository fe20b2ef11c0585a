//! Admission by time: a request is queued when its estimated finish (the work ahead of it plus
//! its own, from the model's measured step times) fits its deadline and the longest queue time;
//! otherwise it is refused at once with the time after which it would fit. Counts (requests and
//! prompt tokens waiting, requests in flight) are only a memory bound.
//!
//! Counters are atomics so `submit` never waits on the worker; a [`Ticket`] travels with each
//! request and gives its share of the load back when it is dropped, on whichever path the
//! request ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::SubmitError;

/// A request's class: higher classes are admitted against less work and scheduled first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

/// Number of priority classes.
const CLASSES: usize = 3;

impl Priority {
    /// The class of vLLM's integer `priority`: lower is earlier (below 0 high, 0 normal, above 0
    /// low).
    pub fn from_vllm(priority: i64) -> Self {
        match priority {
            p if p < 0 => Priority::High,
            0 => Priority::Normal,
            _ => Priority::Low,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The limits of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Longest a request may be expected to wait before its prefill starts.
    pub max_queue_time: Duration,
    /// Requests that may wait (a memory bound).
    pub max_queue: usize,
    /// Prompt tokens that may wait (a memory bound; one request is always let in).
    pub max_queued_tokens: usize,
    /// Requests that may be waiting or generating at once (`usize::MAX`: no bound).
    pub max_concurrent: usize,
}

/// What a request asks of the model, for the estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub priority: Priority,
    /// When its client stops waiting.
    pub deadline: Option<Instant>,
}

/// How long a request is expected to wait and to take, at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Until its prefill starts.
    pub wait: Duration,
    /// Until its last token.
    pub finish: Duration,
}

/// Work waiting in one class.
#[derive(Default)]
struct Waiting {
    requests: AtomicUsize,
    prompt_tokens: AtomicUsize,
    /// Tokens the waiting requests may generate (their `max_new_tokens`).
    decode_tokens: AtomicUsize,
}

#[derive(Default)]
struct Load {
    in_flight: AtomicUsize,
    waiting_total: AtomicUsize,
    waiting_tokens_total: AtomicUsize,
    waiting: [Waiting; CLASSES],
    running: AtomicUsize,
    /// Tokens the running requests may still generate.
    running_decode_tokens: AtomicUsize,
    /// Moving averages, in nanoseconds: one decode step, one prefilled prompt token.
    step_nanos: AtomicU64,
    prefill_token_nanos: AtomicU64,
}

/// The admission state of one model; cloning shares it.
#[derive(Clone)]
pub struct Admission {
    limits: AdmissionLimits,
    /// Sequences decoded together: the estimate's parallelism.
    slots: usize,
    load: Arc<Load>,
}

/// A request's share of the load: waiting, then running.
pub struct Ticket {
    load: Arc<Load>,
    priority: Priority,
    prompt_tokens: usize,
    /// Tokens it may still generate.
    remaining: usize,
    waiting: bool,
}

/// Takes one place from `counter` unless it is already at `limit`.
fn reserve(counter: &AtomicUsize, amount: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n == 0 || n.saturating_add(amount) <= limit).then_some(n + amount)
        })
        .is_ok()
}

/// Whole seconds, rounded up, at least 1: a `Retry-After`.
fn retry_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Folds `sample` into the moving average in `slot` (the first sample sets it).
fn average_into(slot: &AtomicU64, sample: u64) {
    let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
        Some(if old == 0 { sample } else { (old * 4 + sample) / 5 })
    });
}

impl Admission {
    /// Admission for `limits` over `slots` decode slots.
    pub fn new(limits: AdmissionLimits, slots: usize) -> Self {
        let limits = AdmissionLimits {
            max_queue: limits.max_queue.max(1),
            max_concurrent: limits.max_concurrent.max(1),
            ..limits
        };
        Self {
            limits,
            slots: slots.max(1),
            load: Arc::default(),
        }
    }

    /// Records a decode step that took `elapsed`.
    pub fn observe_step(&self, elapsed: Duration) {
        average_into(&self.load.step_nanos, elapsed.as_nanos() as u64);
    }

    /// Records a prefill of `tokens` positions that took `elapsed`.
    pub fn observe_prefill(&self, elapsed: Duration, tokens: usize) {
        average_into(
            &self.load.prefill_token_nanos,
            elapsed.as_nanos() as u64 / tokens.max(1) as u64,
        );
    }

    /// The expected wait and finish of `demand` given the work now ahead of it (running
    /// requests and waiting ones of its class or higher). Zero until a step was measured.
    pub fn estimate(&self, demand: &Demand) -> Estimate {
        let load = &self.load;
        let step = load.step_nanos.load(Ordering::Acquire) as f64;
        let per_token = load.prefill_token_nanos.load(Ordering::Acquire) as f64;
        let ahead = &load.waiting[..=demand.priority.index()];
        let sum = |f: fn(&Waiting) -> &AtomicUsize| ahead.iter().map(|w| f(w).load(Ordering::Acquire)).sum::<usize>();
        let requests_ahead = load.running.load(Ordering::Acquire) + sum(|w| &w.requests);
        // While a slot is free the request starts at once; otherwise the work ahead drains
        // `slots` sequences per step.
        let wait = if requests_ahead < self.slots {
            0.0
        } else {
            let decode = load.running_decode_tokens.load(Ordering::Acquire) + sum(|w| &w.decode_tokens);
            step * decode as f64 / self.slots as f64 + per_token * sum(|w| &w.prompt_tokens) as f64
        };
        let own = per_token * demand.prompt_tokens as f64 + step * demand.max_new_tokens as f64;
        Estimate {
            wait: Duration::from_nanos(wait as u64),
            finish: Duration::from_nanos((wait + own) as u64),
        }
    }

    /// Admits `demand` at `now`, or says why not (with when to retry).
    pub fn admit(&self, demand: &Demand, now: Instant) -> Result<Ticket, SubmitError> {
        let estimate = self.estimate(demand);
        if estimate.wait > self.limits.max_queue_time {
            return Err(SubmitError::QueueTime {
                wait: estimate.wait,
                retry_after: retry_seconds(estimate.wait - self.limits.max_queue_time),
            });
        }
        if let Some(deadline) = demand.deadline {
            let left = deadline.saturating_duration_since(now);
            if estimate.finish > left {
                return Err(SubmitError::Deadline {
                    finish: estimate.finish,
                    retry_after: retry_seconds(estimate.finish - left),
                });
            }
        }
        let load = &self.load;
        if !reserve(&load.in_flight, 1, self.limits.max_concurrent) {
            return Err(SubmitError::TooManyRequests(self.limits.max_concurrent));
        }
        if !reserve(&load.waiting_total, 1, self.limits.max_queue) {
            load.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull(self.limits.max_queue));
        }
        if !reserve(
            &load.waiting_tokens_total,
            demand.prompt_tokens,
            self.limits.max_queued_tokens,
        ) {
            load.waiting_total.fetch_sub(1, Ordering::AcqRel);
            load.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueuedTokens(self.limits.max_queued_tokens));
        }
        let waiting = &load.waiting[demand.priority.index()];
        waiting.requests.fetch_add(1, Ordering::AcqRel);
        waiting.prompt_tokens.fetch_add(demand.prompt_tokens, Ordering::AcqRel);
        waiting.decode_tokens.fetch_add(demand.max_new_tokens, Ordering::AcqRel);
        Ok(Ticket {
            load: Arc::clone(load),
            priority: demand.priority,
            prompt_tokens: demand.prompt_tokens,
            remaining: demand.max_new_tokens,
            waiting: true,
        })
    }

    /// Requests waiting for a prefill slot.
    pub fn waiting(&self) -> usize {
        self.load.waiting_total.load(Ordering::Acquire)
    }

    /// Requests waiting or generating.
    pub fn in_flight(&self) -> usize {
        self.load.in_flight.load(Ordering::Acquire)
    }
}

impl Ticket {
    /// The request's class.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The request left the queue (its prefill starts); it still counts as in flight.
    pub fn started(&mut self) {
        if !std::mem::take(&mut self.waiting) {
            return;
        }
        let load = &self.load;
        let waiting = &load.waiting[self.priority.index()];
        waiting.requests.fetch_sub(1, Ordering::AcqRel);
        waiting.prompt_tokens.fetch_sub(self.prompt_tokens, Ordering::AcqRel);
        waiting.decode_tokens.fetch_sub(self.remaining, Ordering::AcqRel);
        load.waiting_total.fetch_sub(1, Ordering::AcqRel);
        load.waiting_tokens_total
            .fetch_sub(self.prompt_tokens, Ordering::AcqRel);
        load.running.fetch_add(1, Ordering::AcqRel);
        load.running_decode_tokens.fetch_add(self.remaining, Ordering::AcqRel);
    }

    /// One token was generated.
    pub fn generated(&mut self) {
        if !self.waiting && self.remaining > 0 {
            self.remaining -= 1;
            self.load.running_decode_tokens.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.started();
        self.load.running.fetch_sub(1, Ordering::AcqRel);
        self.load
            .running_decode_tokens
            .fetch_sub(self.remaining, Ordering::AcqRel);
        self.load.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn admission(max_queue: usize, max_concurrent: usize) -> Admission {
        Admission::new(
            AdmissionLimits {
                max_queue_time: MINUTE,
                max_queue,
                max_queued_tokens: 1000,
                max_concurrent,
            },
            4,
        )
    }

    fn demand(priority: Priority) -> Demand {
        Demand {
            prompt_tokens: 10,
            max_new_tokens: 100,
            priority,
            deadline: None,
        }
    }

    fn admit(a: &Admission) -> Result<Ticket, SubmitError> {
        a.admit(&demand(Priority::Normal), Instant::now())
    }

    #[test]
    fn the_queue_bound_counts_only_waiting_requests() {
        let a = admission(2, 10);
        let mut first = admit(&a).unwrap();
        let _second = admit(&a).unwrap();
        assert_eq!(admit(&a).err(), Some(SubmitError::QueueFull(2)));
        first.started();
        let _third = admit(&a).expect("a started request frees its queue place");
        assert_eq!((a.waiting(), a.in_flight()), (2, 3));
    }

    #[test]
    fn the_concurrency_bound_counts_running_requests_too() {
        let a = admission(10, 2);
        let mut tickets: Vec<Ticket> = (0..2).map(|_| admit(&a).unwrap()).collect();
        tickets.iter_mut().for_each(Ticket::started);
        assert_eq!(admit(&a).err(), Some(SubmitError::TooManyRequests(2)));
        assert_eq!(a.waiting(), 0, "a refused request leaves no trace");
        tickets.pop();
        assert!(admit(&a).is_ok(), "a finished request frees its place");
    }

    #[test]
    fn queued_prompt_tokens_are_bounded_but_one_request_always_fits() {
        let a = admission(100, usize::MAX);
        let huge = Demand {
            prompt_tokens: 5000,
            ..demand(Priority::Normal)
        };
        let ticket = a.admit(&huge, Instant::now()).expect("alone, any prompt is let in");
        assert_eq!(admit(&a).err(), Some(SubmitError::QueuedTokens(1000)));
        drop(ticket);
        assert!(admit(&a).is_ok());
    }

    #[test]
    fn dropping_tickets_gives_every_share_back() {
        let a = admission(10, 10);
        a.observe_step(Duration::from_millis(10));
        let mut running: Vec<Ticket> = (0..4).map(|_| admit(&a).unwrap()).collect();
        running.iter_mut().for_each(Ticket::started);
        running[0].generated();
        let waiting = admit(&a).unwrap();
        assert!(a.estimate(&demand(Priority::Normal)).wait > Duration::ZERO);
        drop(running);
        drop(waiting);
        assert_eq!((a.waiting(), a.in_flight()), (0, 0));
        let idle = a.estimate(&demand(Priority::Normal));
        assert_eq!(idle.wait, Duration::ZERO);
        assert_eq!(
            idle.finish,
            Duration::from_millis(1000),
            "100 tokens of 10 ms, nothing ahead"
        );
    }

    #[test]
    fn the_wait_is_the_work_ahead_spread_over_the_slots() {
        let a = admission(100, usize::MAX);
        a.observe_step(Duration::from_millis(10));
        // Four slots, all busy with 100 tokens each: 400 tokens / 4 slots = 100 steps = 1 s.
        let mut running: Vec<Ticket> = (0..4).map(|_| admit(&a).unwrap()).collect();
        running.iter_mut().for_each(Ticket::started);
        let e = a.estimate(&demand(Priority::Normal));
        assert_eq!(e.wait, Duration::from_secs(1));
        assert_eq!(e.finish, Duration::from_secs(2));
        for _ in 0..50 {
            running.iter_mut().for_each(Ticket::generated);
        }
        assert_eq!(a.estimate(&demand(Priority::Normal)).wait, Duration::from_millis(500));
    }

    #[test]
    fn a_request_that_would_wait_too_long_or_miss_its_deadline_is_refused_with_a_retry_time() {
        let a = Admission::new(
            AdmissionLimits {
                max_queue_time: Duration::from_millis(1500),
                max_queue: 100,
                max_queued_tokens: 10_000,
                max_concurrent: usize::MAX,
            },
            1,
        );
        a.observe_step(Duration::from_millis(10));
        let mut first = admit(&a).unwrap();
        first.started();
        let _second = admit(&a).expect("1 s of work ahead is within 1.5 s");
        // 2 s ahead now: half a second too long.
        match admit(&a) {
            Err(SubmitError::QueueTime { wait, retry_after }) => {
                assert_eq!((wait, retry_after), (Duration::from_secs(2), 1));
            }
            other => panic!("{:?}", other.err()),
        }
        let now = Instant::now();
        let hurried = Demand {
            deadline: Some(now + Duration::from_millis(500)),
            ..demand(Priority::High)
        };
        // A high request skips the waiting one: 1 s wait + 1 s own > 0.5 s.
        match a.admit(&hurried, now) {
            Err(SubmitError::Deadline { finish, retry_after }) => {
                assert_eq!((finish, retry_after), (Duration::from_secs(2), 2));
            }
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn higher_classes_see_only_the_work_of_their_class_and_above() {
        let a = admission(100, usize::MAX);
        a.observe_step(Duration::from_millis(10));
        let mut running: Vec<Ticket> = (0..4).map(|_| admit(&a).unwrap()).collect();
        running.iter_mut().for_each(Ticket::started);
        let _low: Vec<Ticket> = (0..8)
            .map(|_| a.admit(&demand(Priority::Low), Instant::now()).unwrap())
            .collect();
        let high = a.estimate(&demand(Priority::High)).wait;
        let low = a.estimate(&demand(Priority::Low)).wait;
        assert_eq!(high, Duration::from_secs(1));
        assert_eq!(low, Duration::from_secs(3));
        assert_eq!(Priority::from_vllm(-5), Priority::High);
        assert_eq!(Priority::from_vllm(0), Priority::Normal);
        assert_eq!(Priority::from_vllm(3), Priority::Low);
    }

    #[test]
    fn a_burst_from_many_threads_never_exceeds_the_bounds() {
        let a = admission(5, 8);
        let admitted: Vec<Ticket> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16).map(|_| s.spawn(|| admit(&a).ok())).collect();
            handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(admitted.len(), 5);
        assert_eq!(a.waiting(), 5);
        drop(admitted);
        assert_eq!((a.waiting(), a.in_flight()), (0, 0));
    }
}
