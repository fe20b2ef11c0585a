//! Whether a model's worker can serve: its recent engine calls, and whether its thread is
//! alive. Readiness and the model list read it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Whether a model's worker can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Its last step (or prefill) succeeded.
    Serving,
    /// Its last [`FAILING_AFTER`] steps failed; the next success clears it.
    Failing,
    /// Its thread stopped (a panic): nothing will be served until the model is reloaded.
    Stopped,
}

/// Consecutive failed engine calls after which a worker reports [`Health::Failing`].
pub const FAILING_AFTER: u8 = 3;

/// A worker's health as it reports it: consecutive failures, or `u8::MAX` once stopped.
#[derive(Default)]
pub(super) struct HealthState(AtomicU8);

impl HealthState {
    pub(super) fn get(&self) -> Health {
        match self.0.load(Ordering::Acquire) {
            u8::MAX => Health::Stopped,
            n if n >= FAILING_AFTER => Health::Failing,
            _ => Health::Serving,
        }
    }

    pub(super) fn record(&self, ok: bool) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match (n, ok) {
                (u8::MAX, _) => None,
                (_, true) => Some(0),
                (n, false) => Some(n.saturating_add(1).min(u8::MAX - 1)),
            });
    }

    fn stop(&self) {
        self.0.store(u8::MAX, Ordering::Release);
    }
}

/// Starts a model's worker thread `name` running `run`, marked stopped in `health` if it
/// unwinds.
pub(super) fn spawn_watched(
    name: String,
    health: &Arc<HealthState>,
    run: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let watch = PanicWatch(Arc::clone(health));
    std::thread::Builder::new().name(name).spawn(move || {
        let _watch = watch;
        run();
    })?;
    Ok(())
}

/// Marks the worker stopped if its thread unwinds.
struct PanicWatch(Arc<HealthState>);

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop();
            tracing::error!("a model worker stopped (panic): its model is not ready until it is reloaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_failures_and_a_panic_stops_it_for_good() {
        let health = Arc::new(HealthState::default());
        for _ in 0..FAILING_AFTER - 1 {
            health.record(false);
        }
        assert_eq!(health.get(), Health::Serving, "a failure or two is not yet a pattern");
        health.record(false);
        assert_eq!(health.get(), Health::Failing);
        health.record(true);
        assert_eq!(health.get(), Health::Serving);
        let watch = PanicWatch(Arc::clone(&health));
        let thread = std::thread::spawn(move || {
            let _watch = watch;
            panic!("a fault in the worker");
        });
        assert!(thread.join().is_err());
        assert_eq!(health.get(), Health::Stopped);
        health.record(true);
        assert_eq!(health.get(), Health::Stopped, "only a reload brings it back");
    }
}
