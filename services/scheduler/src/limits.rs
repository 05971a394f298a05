//! Rate limits for API-triggered executions: one token bucket per client.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second. An execution takes one
//! token. When none is left, the execution is still admitted but waits in its lane until the
//! token it borrows will have refilled; when that wait would exceed the configured bound, it is
//! refused (RESOURCE_EXHAUSTED). Borrowing keeps the admitted rate exact: N requests at once are
//! spread over N / rate seconds, whatever their lanes.

use motorpool_messages::{ErrorCode, WireError};
use std::collections::HashMap;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Token buckets by client id.
#[derive(Debug)]
pub struct TokenBuckets {
    rate_per_ms: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

impl TokenBuckets {
    pub fn new(rate_per_s: f64, burst: f64) -> Self {
        TokenBuckets {
            rate_per_ms: rate_per_s.max(1e-6) / 1000.0,
            burst: burst.max(1.0),
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `client`: the time from which its execution may start, or an error when
    /// that is more than `max_wait_ms` away.
    pub fn admit(&mut self, client: &str, now_ms: u64, max_wait_ms: u64) -> Result<u64, WireError> {
        let burst = self.burst;
        let b = self.buckets.entry(client.to_string()).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64;
        b.tokens = (b.tokens + elapsed * self.rate_per_ms).min(burst);
        b.at_ms = b.at_ms.max(now_ms);
        let wait_ms = if b.tokens >= 1.0 {
            0.0
        } else {
            (1.0 - b.tokens) / self.rate_per_ms
        };
        if wait_ms > max_wait_ms as f64 {
            return Err(WireError::new(
                ErrorCode::ResourceExhausted,
                format!(
                    "API client {client:?} is over its rate limit ({:.2}/s, burst {burst}); the next slot is {:.1}s away, more than the {:.1}s a request may wait",
                    self.rate_per_ms * 1000.0,
                    wait_ms / 1000.0,
                    max_wait_ms as f64 / 1000.0
                ),
            ));
        }
        b.tokens -= 1.0;
        Ok(now_ms + wait_ms.ceil() as u64)
    }

    /// Forgets clients idle long enough to have a full bucket again.
    pub fn prune(&mut self, now_ms: u64) {
        let full_after = (self.burst / self.rate_per_ms) as u64;
        self.buckets
            .retain(|_, b| now_ms.saturating_sub(b.at_ms) < full_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_spread_then_refuse() {
        let mut b = TokenBuckets::new(2.0, 3.0);
        // Three at once go now.
        for _ in 0..3 {
            assert_eq!(b.admit("ci", 1000, 2000).unwrap(), 1000);
        }
        // The next ones wait 0.5 s more each: the admitted rate is exactly 2/s.
        assert_eq!(b.admit("ci", 1000, 2000).unwrap(), 1500);
        assert_eq!(b.admit("ci", 1000, 2000).unwrap(), 2000);
        assert_eq!(b.admit("ci", 1000, 2000).unwrap(), 2500);
        assert_eq!(b.admit("ci", 1000, 2000).unwrap(), 3000);
        let err = b.admit("ci", 1000, 2000).unwrap_err();
        assert_eq!(err.code, ErrorCode::ResourceExhausted);
        assert!(err.message.contains("\"ci\""), "{}", err.message);
        // Another client is not affected.
        assert_eq!(b.admit("nightly", 1000, 2000).unwrap(), 1000);
        // Time refills the bucket.
        assert_eq!(b.admit("ci", 10_000, 2000).unwrap(), 10_000);
    }

    #[test]
    fn prune_forgets_only_idle_clients() {
        let mut b = TokenBuckets::new(1.0, 2.0);
        b.admit("a", 0, 0).unwrap();
        b.admit("b", 5000, 0).unwrap();
        b.prune(5500);
        assert_eq!(b.buckets.len(), 1);
        assert!(b.buckets.contains_key("b"));
    }
}
