//! Bounded admission: how many requests of a model may wait, and how many may be in flight
//! (waiting or generating). Counters are atomics so `submit` never waits on the worker; a
//! [`Ticket`] travels with each request and gives its places back when it is dropped, on
//! whichever path the request ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::SubmitError;

/// The limits of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Requests that may wait for a prefill slot.
    pub max_queue: usize,
    /// Requests that may be waiting or generating at once.
    pub max_concurrent: usize,
}

#[derive(Default)]
struct Counts {
    waiting: AtomicUsize,
    in_flight: AtomicUsize,
}

/// The admission counters of one model; cloning shares them.
#[derive(Clone)]
pub struct Admission {
    limits: AdmissionLimits,
    counts: Arc<Counts>,
}

/// A request's places in the queue and among the requests in flight.
pub struct Ticket {
    counts: Arc<Counts>,
    waiting: bool,
}

/// Takes one place from `counter` unless it is already at `limit`.
fn reserve(counter: &AtomicUsize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
        .is_ok()
}

impl Admission {
    /// Counters for `limits` (each limit at least 1).
    pub fn new(limits: AdmissionLimits) -> Self {
        let limits = AdmissionLimits {
            max_queue: limits.max_queue.max(1),
            max_concurrent: limits.max_concurrent.max(1),
        };
        Self {
            limits,
            counts: Arc::default(),
        }
    }

    /// Admits one request, or says which limit it hit.
    pub fn admit(&self) -> Result<Ticket, SubmitError> {
        if !reserve(&self.counts.in_flight, self.limits.max_concurrent) {
            return Err(SubmitError::TooManyRequests(self.limits.max_concurrent));
        }
        if !reserve(&self.counts.waiting, self.limits.max_queue) {
            self.counts.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull(self.limits.max_queue));
        }
        Ok(Ticket {
            counts: Arc::clone(&self.counts),
            waiting: true,
        })
    }

    /// Requests waiting for a prefill slot.
    pub fn waiting(&self) -> usize {
        self.counts.waiting.load(Ordering::Acquire)
    }

    /// Requests waiting or generating.
    pub fn in_flight(&self) -> usize {
        self.counts.in_flight.load(Ordering::Acquire)
    }
}

impl Ticket {
    /// The request left the queue (its prefill starts); it still counts as in flight.
    pub fn started(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.counts.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.started();
        self.counts.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_queue: usize, max_concurrent: usize) -> Admission {
        Admission::new(AdmissionLimits {
            max_queue,
            max_concurrent,
        })
    }

    #[test]
    fn the_queue_limit_counts_only_waiting_requests() {
        let a = admission(2, 10);
        let mut first = a.admit().unwrap();
        let _second = a.admit().unwrap();
        assert_eq!(a.admit().err(), Some(SubmitError::QueueFull(2)));
        first.started();
        let _third = a.admit().expect("a started request frees its queue place");
        assert_eq!((a.waiting(), a.in_flight()), (2, 3));
    }

    #[test]
    fn the_concurrency_limit_counts_running_requests_too() {
        let a = admission(10, 2);
        let mut tickets: Vec<Ticket> = (0..2).map(|_| a.admit().unwrap()).collect();
        tickets.iter_mut().for_each(Ticket::started);
        assert_eq!(a.admit().err(), Some(SubmitError::TooManyRequests(2)));
        assert_eq!(a.waiting(), 0, "a refused request leaves no trace");
        tickets.pop();
        assert!(a.admit().is_ok(), "a finished request frees its place");
    }

    #[test]
    fn dropping_a_waiting_ticket_frees_both_places() {
        let a = admission(1, 1);
        let ticket = a.admit().unwrap();
        assert!(a.admit().is_err());
        drop(ticket);
        assert_eq!((a.waiting(), a.in_flight()), (0, 0));
        assert!(a.admit().is_ok());
    }

    #[test]
    fn a_burst_from_many_threads_never_exceeds_the_limits() {
        let a = admission(5, 8);
        let admitted: Vec<Ticket> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16).map(|_| s.spawn(|| a.admit().ok())).collect();
            handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(admitted.len(), 5);
        assert_eq!(a.waiting(), 5);
        drop(admitted);
        assert_eq!((a.waiting(), a.in_flight()), (0, 0));
    }
}
