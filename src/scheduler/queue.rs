//! Waiting requests grouped by prompt length into buckets, and the choice of the next prefill
//! batch. Pure logic over a caller-supplied clock, so it is tested without sleeping.
//!
//! Each request has a rank (its arrival, pushed later for lower priority classes); a bucket is
//! kept in rank order. A bucket is ready when it can fill the free batch slots, when its padded
//! tokens reach the token budget, or when its first request has waited `max_queue_delay`. Among
//! ready buckets the one whose first request ranks earliest goes next, so a lone long prompt is
//! not starved by a stream of short ones.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How prefill batches are formed.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    /// Most sequences decoded together (1 turns batching off).
    pub max_batch_size: usize,
    /// Most padded prompt tokens in one prefill batch (at least one request always fits).
    pub max_batch_tokens: usize,
    /// Longest a request waits for its bucket to fill.
    pub max_queue_delay: Duration,
    /// Upper bounds of the length buckets, ascending; longer prompts share the last bucket.
    pub buckets: Vec<usize>,
}

impl BatchPolicy {
    /// Powers of two from 16 up to `context_length`.
    pub fn default_buckets(context_length: usize) -> Vec<usize> {
        let mut buckets: Vec<usize> = std::iter::successors(Some(16usize), |b| b.checked_mul(2))
            .take_while(|&b| b < context_length)
            .collect();
        buckets.push(context_length);
        buckets
    }
}

/// One waiting request.
#[derive(Debug)]
pub struct Pending<T> {
    pub item: T,
    /// Prompt length in tokens.
    pub tokens: usize,
    pub arrived: Instant,
    /// Its place in line: earlier goes first.
    pub rank: Instant,
}

/// The waiting requests of one model.
pub struct BucketQueue<T> {
    policy: BatchPolicy,
    queues: Vec<VecDeque<Pending<T>>>,
}

impl<T> BucketQueue<T> {
    /// An empty queue.
    pub fn new(mut policy: BatchPolicy) -> Self {
        if policy.buckets.is_empty() {
            policy.buckets.push(usize::MAX);
        }
        policy.max_batch_size = policy.max_batch_size.max(1);
        let queues = policy.buckets.iter().map(|_| VecDeque::new()).collect();
        Self { policy, queues }
    }

    /// The bucket a prompt of `tokens` tokens belongs to.
    pub fn bucket_of(&self, tokens: usize) -> usize {
        self.policy
            .buckets
            .iter()
            .position(|&b| tokens <= b)
            .unwrap_or(self.policy.buckets.len() - 1)
    }

    /// Upper bound of bucket `index`.
    pub fn bucket_bound(&self, index: usize) -> usize {
        self.policy.buckets[index]
    }

    /// Adds a request that arrived at `arrived`, in line at `rank`.
    pub fn push(&mut self, item: T, tokens: usize, arrived: Instant, rank: Instant) {
        let b = self.bucket_of(tokens);
        let queue = &mut self.queues[b];
        let at = queue.partition_point(|p| p.rank <= rank);
        queue.insert(
            at,
            Pending {
                item,
                tokens,
                arrived,
                rank,
            },
        );
    }

    /// Number of waiting requests.
    pub fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many requests from the front of `queue` fit `slots` and the token budget.
    fn take_count(&self, queue: &VecDeque<Pending<T>>, slots: usize) -> (usize, bool) {
        let mut longest = 0;
        let mut count = 0;
        for p in queue.iter().take(slots) {
            let padded = (count + 1) * longest.max(p.tokens);
            if count > 0 && padded > self.policy.max_batch_tokens {
                return (count, true);
            }
            longest = longest.max(p.tokens);
            count += 1;
        }
        (count, count * longest >= self.policy.max_batch_tokens)
    }

    /// Removes and returns the next prefill batch for at most `slots` free sequences, with its
    /// bucket index, if a bucket is ready at `now`.
    pub fn next_batch(&mut self, now: Instant, slots: usize) -> Option<(usize, Vec<Pending<T>>)> {
        if slots == 0 {
            return None;
        }
        let wanted = slots.min(self.policy.max_batch_size);
        let mut best: Option<(usize, Instant, usize)> = None;
        for (b, queue) in self.queues.iter().enumerate() {
            let Some(first) = queue.front() else { continue };
            let (count, budget_full) = self.take_count(queue, wanted);
            let ready =
                count >= wanted || budget_full || now.duration_since(first.arrived) >= self.policy.max_queue_delay;
            if ready && best.is_none_or(|(_, rank, _)| first.rank < rank) {
                best = Some((b, first.rank, count));
            }
        }
        let (b, _, count) = best?;
        Some((b, self.queues[b].drain(..count).collect()))
    }

    /// When the first request of a bucket reaches `max_queue_delay` (the moment to look again).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|q| q.front())
            .map(|p| p.arrived + self.policy.max_queue_delay)
            .min()
    }

    /// Every waiting request, bucket by bucket.
    pub fn items(&self) -> impl Iterator<Item = &T> {
        self.queues.iter().flatten().map(|p| &p.item)
    }

    /// Removes every waiting request for which `drop` returns true (e.g. cancelled ones).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for q in &mut self.queues {
            q.retain(|p| keep(&p.item));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(size: usize, tokens: usize, delay_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: size,
            max_batch_tokens: tokens,
            max_queue_delay: Duration::from_millis(delay_ms),
            buckets: vec![16, 32, 64, 128],
        }
    }

    fn ids<T: Copy>(batch: &[Pending<T>]) -> Vec<T> {
        batch.iter().map(|p| p.item).collect()
    }

    #[test]
    fn requests_go_to_the_bucket_of_their_length() {
        let q: BucketQueue<u32> = BucketQueue::new(policy(4, 1000, 10));
        assert_eq!([1, 16, 17, 64, 65, 500].map(|t| q.bucket_of(t)), [0, 0, 1, 2, 3, 3]);
        assert_eq!(BatchPolicy::default_buckets(100), vec![16, 32, 64, 100]);
    }

    #[test]
    fn a_bucket_waits_until_full_or_delayed() {
        let t0 = Instant::now();
        let mut q = BucketQueue::new(policy(3, 1000, 10));
        q.push(1, 10, t0, t0);
        let t1 = t0 + Duration::from_millis(1);
        q.push(2, 12, t1, t1);
        assert!(
            q.next_batch(t0 + Duration::from_millis(5), 8).is_none(),
            "not full, not late"
        );
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_millis(10)));
        let (b, batch) = q.next_batch(t0 + Duration::from_millis(10), 8).unwrap();
        assert_eq!((b, ids(&batch)), (0, vec![1, 2]));
        for i in 0..4 {
            q.push(10 + i, 5, t0, t0);
        }
        let (_, batch) = q.next_batch(t0, 8).unwrap();
        assert_eq!(
            ids(&batch),
            vec![10, 11, 12],
            "a full batch goes at once, at most max_batch_size"
        );
        assert!(q.next_batch(t0, 8).is_none());
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn free_slots_limit_the_batch() {
        let t0 = Instant::now();
        let mut q = BucketQueue::new(policy(8, 1000, 10));
        for i in 0..5 {
            q.push(i, 5, t0, t0);
        }
        let (_, batch) = q.next_batch(t0, 2).unwrap();
        assert_eq!(ids(&batch), vec![0, 1], "two free slots fill a batch of two");
        assert!(q.next_batch(t0, 0).is_none());
    }

    #[test]
    fn the_token_budget_counts_padded_tokens() {
        let t0 = Instant::now();
        let mut q = BucketQueue::new(policy(8, 200, 10));
        for (i, len) in [(0, 40), (1, 60), (2, 64), (3, 50)] {
            q.push(i, len, t0, t0);
        }
        // 3 x 64 = 192 fits, 4 x 64 = 256 does not: the budget makes the batch ready early.
        let (_, batch) = q.next_batch(t0, 8).unwrap();
        assert_eq!(ids(&batch), vec![0, 1, 2]);
        // A single request longer than the budget still goes alone (after its delay).
        q.push(9, 120, t0, t0);
        let (_, batch) = q.next_batch(t0 + Duration::from_millis(10), 8).unwrap();
        assert_eq!(
            ids(&batch),
            vec![3],
            "oldest first: request 3 waited as long and is ahead"
        );
        let (_, batch) = q.next_batch(t0 + Duration::from_millis(10), 8).unwrap();
        assert_eq!(ids(&batch), vec![9]);
    }

    #[test]
    fn a_lone_long_request_is_not_starved_by_short_ones() {
        let t0 = Instant::now();
        let mut q = BucketQueue::new(policy(2, 1000, 10));
        q.push(999, 100, t0, t0);
        let mut served_long_at = None;
        for step in 0..50u32 {
            let now = t0 + Duration::from_millis(u64::from(step));
            // Two short requests arrive every millisecond: their bucket is always full.
            q.push(step * 2, 5, now, now);
            q.push(step * 2 + 1, 5, now, now);
            let (_, batch) = q.next_batch(now, 2).unwrap();
            if batch.iter().any(|p| p.item == 999) {
                served_long_at = Some(step);
                break;
            }
        }
        assert_eq!(served_long_at, Some(10), "served as soon as it waited max_queue_delay");
    }

    #[test]
    fn a_bucket_is_served_in_rank_order() {
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        let mut q = BucketQueue::new(policy(1, 1000, 0));
        // A low-class request (ranked 5 s after its arrival), then a high one that came later.
        q.push(1, 5, t0, later(5000));
        q.push(2, 5, later(10), later(10));
        q.push(3, 5, later(20), later(20));
        let order: Vec<u32> = (0..3).map(|_| ids(&q.next_batch(later(30), 1).unwrap().1)[0]).collect();
        assert_eq!(order, vec![2, 3, 1]);
    }

    #[test]
    fn batching_off_sends_each_request_alone() {
        let t0 = Instant::now();
        let mut q = BucketQueue::new(policy(1, 1000, 10));
        q.push(1, 5, t0, t0);
        q.push(2, 6, t0, t0);
        assert_eq!(ids(&q.next_batch(t0, 1).unwrap().1), vec![1]);
        assert_eq!(ids(&q.next_batch(t0, 1).unwrap().1), vec![2]);
    }
}
