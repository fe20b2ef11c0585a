//! The id of the request being served, set by the transport for the task that serves it (taken
//! from the client's `x-request-id` when it sends a usable one), so every log line and answer
//! of that request carries it without each handler passing it along.

use std::future::Future;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Longest client-given id kept; longer or unprintable ones are replaced by a fresh id.
const MAX_LEN: usize = 128;

/// `given` if it is a usable id (1 to 128 visible ASCII characters), else a fresh one.
pub fn accept(given: Option<&str>) -> String {
    match given {
        Some(id) if (1..=MAX_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()) => id.to_string(),
        _ => fresh(),
    }
}

/// A new id: 32 hex digits.
pub fn fresh() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Runs `fut` as the request `id`.
pub async fn scope<F: Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// The id of the request this task serves, or a fresh one outside any request.
pub fn current() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_else(|_| fresh())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_usable_client_id_is_kept_and_seen_inside_its_scope() {
        assert_eq!(accept(Some("req-42")), "req-42");
        for bad in ["", "has space", "é", &"x".repeat(129)] {
            let id = accept(Some(bad));
            assert_eq!(id.len(), 32, "{bad:?} -> {id}");
        }
        assert_eq!(scope("req-42".into(), async { current() }).await, "req-42");
        assert_ne!(current(), current(), "outside a request each call is fresh");
    }
}
