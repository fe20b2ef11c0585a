//! The server's life after start-up: serving, then draining once a shutdown signal comes.
//! Draining turns readiness off and refuses new generations (503 / `UNAVAILABLE`) while the
//! ones in flight run to their end; when the grace period ends first, those still running are
//! cut, and each ends with an error rather than a `finish_reason` that would call it complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Whether the server takes new work, and the generations it still owes answers.
pub struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    cut: watch::Sender<bool>,
}

/// A generation in flight; counted until it is dropped.
pub struct InFlight {
    lifecycle: Arc<Lifecycle>,
    cut: watch::Receiver<bool>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: watch::channel(false).0,
        }
    }
}

impl Lifecycle {
    /// A server that is serving.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Whether a shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops taking new work (readiness turns off at once).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Generations in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a generation until the returned guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            lifecycle: Arc::clone(self),
            cut: self.cut.subscribe(),
        }
    }

    /// Returns once no generation is in flight.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Ends every generation still in flight (with an error, at its next event).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
}

impl InFlight {
    /// Resolves when the server cuts the generations in flight; never otherwise.
    pub async fn cut(&mut self) {
        if self.cut.wait_for(|cut| *cut).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.lifecycle.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.lifecycle.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn drained_waits_for_every_generation_and_cut_reaches_each() {
        let lifecycle = Lifecycle::new();
        lifecycle.drained().await;
        let mut first = lifecycle.track();
        let second = lifecycle.track();
        assert_eq!(lifecycle.in_flight(), 2);
        let waiting = tokio::spawn({
            let lifecycle = Arc::clone(&lifecycle);
            async move { lifecycle.drained().await }
        });
        drop(second);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one is still in flight");
        lifecycle.cut();
        tokio::time::timeout(Duration::from_secs(5), first.cut())
            .await
            .expect("the cut reaches a generation");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("drained once the last one ends")
            .unwrap();
    }
}
