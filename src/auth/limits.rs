//! Per-key limits: requests per second and tokens per minute (token buckets from `governor`),
//! and requests running at once (a semaphore whose permit a generation holds to its end).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{AuthError, Refusal};

/// Smallest `requests_per_second` accepted: one request every ~17 minutes.
const MIN_REQUESTS_PER_SECOND: f64 = 0.001;

/// The limits of one API key, as its entry in the keys file sets them (each off when absent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyLimits {
    /// Requests per second, with bursts of up to one second's worth.
    pub requests_per_second: Option<f64>,
    /// Generations running or queued at once.
    pub max_concurrent_requests: Option<u32>,
    /// Prompt plus `max_tokens` per minute, charged when a generation is admitted.
    pub tokens_per_minute: Option<u32>,
}

/// The live state of a key's limits.
pub struct Limiter {
    settings: KeyLimits,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    running: Option<Arc<Semaphore>>,
}

impl Limiter {
    /// Checks `settings` and starts with full buckets.
    pub fn new(settings: KeyLimits) -> Result<Self, String> {
        let requests = match settings.requests_per_second {
            None => None,
            Some(rps) if rps.is_finite() && rps >= MIN_REQUESTS_PER_SECOND => {
                let period = Duration::from_secs_f64(1.0 / rps);
                let burst = NonZeroU32::new(rps.ceil().min(u32::MAX as f64) as u32).unwrap_or(NonZeroU32::MIN);
                Quota::with_period(period).map(|q| DefaultDirectRateLimiter::direct(q.allow_burst(burst)))
            }
            Some(rps) => {
                return Err(format!(
                    "requests_per_second must be a number of at least {MIN_REQUESTS_PER_SECOND}, not {rps}"
                ));
            }
        };
        let tokens = match settings.tokens_per_minute {
            None => None,
            Some(tpm) => {
                let tpm = NonZeroU32::new(tpm).ok_or("tokens_per_minute must be at least 1")?;
                Some(DefaultDirectRateLimiter::direct(Quota::per_minute(tpm)))
            }
        };
        let running = match settings.max_concurrent_requests {
            None => None,
            Some(0) => return Err("max_concurrent_requests must be at least 1".into()),
            Some(n) => Some(Arc::new(Semaphore::new(n as usize))),
        };
        Ok(Self {
            settings,
            requests,
            tokens,
            running,
        })
    }

    /// What this limiter was built from.
    pub fn settings(&self) -> &KeyLimits {
        &self.settings
    }

    /// Counts one request of key `name`: 429 once it is past its requests per second.
    pub fn check_request(&self, name: &str) -> Result<(), AuthError> {
        let (Some(limiter), Some(rps)) = (&self.requests, self.settings.requests_per_second) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            AuthError::new(
                Refusal::Limited,
                format!("API key {name:?} is over its limit of {rps} requests per second (requests_per_second)"),
            )
            .retry_after(whole_seconds(wait))
        })
    }

    /// Admits a generation of key `name` that may use `tokens` (prompt and `max_tokens`): a
    /// permit held while it runs when the key has a concurrency limit, 429 when the key is at
    /// it or past its tokens per minute, 400 when `tokens` alone is more than a minute's worth.
    pub fn admit(&self, name: &str, tokens: usize) -> Result<Option<OwnedSemaphorePermit>, AuthError> {
        let permit = match (&self.running, self.settings.max_concurrent_requests) {
            (Some(running), Some(max)) => Some(Arc::clone(running).try_acquire_owned().map_err(|_| {
                AuthError::new(
                    Refusal::Limited,
                    format!("API key {name:?} already has {max} requests running, its max_concurrent_requests"),
                )
                .retry_after(1)
            })?),
            _ => None,
        };
        if let (Some(limiter), Some(tpm)) = (&self.tokens, self.settings.tokens_per_minute) {
            let n = NonZeroU32::new(u32::try_from(tokens).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
            match limiter.check_n(n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    return Err(AuthError::new(
                        Refusal::Limited,
                        format!("API key {name:?} is over its limit of {tpm} tokens per minute (tokens_per_minute)"),
                    )
                    .retry_after(whole_seconds(wait)));
                }
                Err(_) => {
                    return Err(AuthError::new(
                        Refusal::TooLarge,
                        format!(
                            "this request may use {tokens} tokens (prompt and max_tokens), more than API key \
                             {name:?} may use in a minute (tokens_per_minute {tpm})"
                        ),
                    ));
                }
            }
        }
        Ok(permit)
    }
}

/// `wait` rounded up to whole seconds, at least one (a `Retry-After` value).
fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_refuses_past_its_value_and_names_itself() {
        let limits = |rps, conc, tpm| KeyLimits {
            requests_per_second: rps,
            max_concurrent_requests: conc,
            tokens_per_minute: tpm,
        };
        let l = Limiter::new(limits(Some(2.0), None, None)).unwrap();
        assert!(l.check_request("a").is_ok() && l.check_request("a").is_ok());
        let e = l.check_request("a").unwrap_err();
        assert_eq!(e.refusal, Refusal::Limited);
        assert!(
            e.message.contains("requests_per_second") && e.retry_after == Some(1),
            "{e:?}"
        );

        let l = Limiter::new(limits(None, Some(1), None)).unwrap();
        let permit = l.admit("a", 10).unwrap();
        assert!(
            l.admit("a", 10)
                .unwrap_err()
                .message
                .contains("max_concurrent_requests")
        );
        drop(permit);
        assert!(l.admit("a", 10).is_ok());

        let l = Limiter::new(limits(None, None, Some(100))).unwrap();
        assert!(l.admit("a", 100).is_ok());
        let e = l.admit("a", 1).unwrap_err();
        assert!(
            e.refusal == Refusal::Limited && e.message.contains("tokens_per_minute"),
            "{e:?}"
        );
        assert_eq!(l.admit("a", 101).unwrap_err().refusal, Refusal::TooLarge);

        for bad in [
            limits(Some(0.0), None, None),
            limits(Some(1e-300), None, None),
            limits(Some(f64::NAN), None, None),
        ] {
            assert!(Limiter::new(bad).is_err());
        }
        assert!(Limiter::new(limits(None, Some(0), None)).is_err());
        assert!(Limiter::new(limits(None, None, Some(0))).is_err());
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }
}
