//! A request's stages in the scheduler (queue, prefill, decode) as spans under the span it
//! was submitted in, so an exported trace shows where its time went. Each stage's span closes
//! as the next opens; the last closes when the request leaves the scheduler.

use tracing::Span;

/// The span of the stage a request is in.
pub(super) struct Stages {
    /// The span the request was submitted in (its generation's).
    parent: Span,
    current: Span,
}

impl Stages {
    /// Opens `queue` under the caller's current span.
    pub(super) fn queued() -> Self {
        let parent = Span::current();
        let current = tracing::info_span!(parent: &parent, "queue");
        Self { parent, current }
    }

    /// Closes `queue` and opens `prefill`, run for `batch_size` requests together.
    pub(super) fn prefill(&mut self, prompt_tokens: usize, batch_size: usize) {
        self.end();
        // As i64: the OpenTelemetry layer exports unsigned fields as strings.
        let (prompt_tokens, batch_size) = (prompt_tokens as i64, batch_size as i64);
        self.current = tracing::info_span!(parent: &self.parent, "prefill", prompt_tokens, batch_size);
    }

    /// Closes `prefill` (the first token is out) and opens `decode`.
    pub(super) fn decode(&mut self) {
        self.end();
        self.current = tracing::info_span!(parent: &self.parent, "decode");
    }

    /// Closes the current stage: before the next opens, so stages never overlap, and when the
    /// answer is complete, before its client can hear so, so they end within its request's span.
    pub(super) fn end(&mut self) {
        drop(std::mem::replace(&mut self.current, Span::none()));
    }
}
