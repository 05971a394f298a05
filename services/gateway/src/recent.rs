//! What this gateway has just seen, kept briefly so that Execute saves bus round trips.
//!
//! Bazel runs each remote action as GetActionResult (a miss), uploads of what is missing (the
//! Action and Command among them), then Execute, which reads the Action and the Command and
//! looks the action cache up again. Two small memories answer those from this process:
//! - [`Recent::blob`]: small blobs written through this gateway *after* a shard accepted them,
//!   or read from a shard whole (shards verify every digest they store and re-hash what they
//!   serve, so nothing unverified is kept). Content addressing makes a kept copy correct
//!   forever; the budget only bounds memory. ByteStream reads of them are answered from here,
//!   which is most outputs of an all-hit rebuild.
//! - [`Recent::take_miss`]: action-cache misses answered in the last [`MISS_TTL`]. Execute may
//!   skip its own lookup after one: executing an action whose result appeared in between is
//!   wasted work, never a wrong answer, and a miss is used once.

use motorpool_messages::BlobDigest;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Largest blob kept (Actions and Commands are a few KiB at most, and so are most outputs).
pub const BLOB_MAX: usize = 64 * 1024;
/// Bytes of blobs kept by default; the oldest go first.
const BLOB_BUDGET: usize = 8 << 20;
/// How long an action-cache miss stands in for Execute's own lookup.
pub const MISS_TTL: Duration = Duration::from_secs(10);
/// Misses kept at most; the oldest go first.
const MISS_MAX: usize = 100_000;

type Key = (String, BlobDigest);

#[derive(Default)]
struct Blobs {
    map: HashMap<Key, Vec<u8>>,
    order: VecDeque<Key>,
    bytes: usize,
}

#[derive(Default)]
struct Misses {
    map: HashMap<Key, Instant>,
    order: VecDeque<(Key, Instant)>,
}

/// See the module docs.
pub struct Recent {
    blobs: Mutex<Blobs>,
    misses: Mutex<Misses>,
    budget: usize,
}

impl Default for Recent {
    fn default() -> Self {
        Recent::with_budget(BLOB_BUDGET)
    }
}

impl Recent {
    /// A memory that keeps at most `budget` bytes of blobs (0: none).
    pub fn with_budget(budget: usize) -> Recent {
        Recent {
            blobs: Mutex::default(),
            misses: Mutex::default(),
            budget,
        }
    }

    /// Keeps a copy of a small blob a shard has accepted (verified) under `d`, or served.
    pub fn keep_blob(&self, instance: &str, d: &BlobDigest, data: &[u8]) {
        if data.len() > BLOB_MAX || data.len() as u64 != d.size || data.len() > self.budget {
            return;
        }
        let key = (instance.to_string(), *d);
        let mut b = self.blobs.lock();
        if b.map.contains_key(&key) {
            return;
        }
        b.bytes += data.len();
        b.map.insert(key.clone(), data.to_vec());
        b.order.push_back(key);
        while b.bytes > self.budget {
            let Some(old) = b.order.pop_front() else {
                break;
            };
            if let Some(v) = b.map.remove(&old) {
                b.bytes -= v.len();
            }
        }
    }

    /// A kept copy of blob `d`, if this gateway wrote or served it recently.
    pub fn blob(&self, instance: &str, d: &BlobDigest) -> Option<Vec<u8>> {
        self.blobs
            .lock()
            .map
            .get(&(instance.to_string(), *d))
            .cloned()
    }

    /// Notes that the action cache had no (usable) result for `action`.
    pub fn note_miss(&self, instance: &str, action: &BlobDigest) {
        self.note_miss_at(instance, action, Instant::now());
    }

    fn note_miss_at(&self, instance: &str, action: &BlobDigest, now: Instant) {
        let key = (instance.to_string(), *action);
        let mut m = self.misses.lock();
        m.map.insert(key.clone(), now);
        m.order.push_back((key, now));
        while m.order.len() > MISS_MAX || m.order.front().is_some_and(|(_, t)| now - *t > MISS_TTL)
        {
            let Some((old, t)) = m.order.pop_front() else {
                break;
            };
            // A later miss of the same action re-inserted it; that one stays.
            if m.map.get(&old) == Some(&t) {
                m.map.remove(&old);
            }
        }
    }

    /// True, once, when `action` missed in the last [`MISS_TTL`].
    pub fn take_miss(&self, instance: &str, action: &BlobDigest) -> bool {
        self.take_miss_at(instance, action, Instant::now())
    }

    fn take_miss_at(&self, instance: &str, action: &BlobDigest, now: Instant) -> bool {
        let seen = self
            .misses
            .lock()
            .map
            .remove(&(instance.to_string(), *action));
        seen.is_some_and(|t| now - t <= MISS_TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_messages::DigestFunction;

    fn digest_of(data: &[u8]) -> BlobDigest {
        DigestFunction::Sha256.digest_of(data)
    }

    #[test]
    fn blobs_are_kept_per_instance_within_the_budget() {
        let r = Recent::default();
        let a = b"an action".to_vec();
        let da = digest_of(&a);
        r.keep_blob("prod", &da, &a);
        assert_eq!(r.blob("prod", &da), Some(a.clone()));
        assert_eq!(r.blob("staging", &da), None, "instances are isolated");

        // Data that does not match the digest's size, and blobs over the limit, are not kept.
        let big = vec![7u8; BLOB_MAX + 1];
        r.keep_blob("prod", &digest_of(&big), &big);
        assert_eq!(r.blob("prod", &digest_of(&big)), None);
        let other = digest_of(b"other");
        r.keep_blob("prod", &other, b"longer than five");
        assert_eq!(r.blob("prod", &other), None);

        // Filling the budget pushes the oldest out.
        for i in 0..(BLOB_BUDGET / BLOB_MAX + 1) as u32 {
            let mut b = vec![0u8; BLOB_MAX];
            b[..4].copy_from_slice(&i.to_le_bytes());
            r.keep_blob("prod", &digest_of(&b), &b);
        }
        assert_eq!(r.blob("prod", &da), None);
        let b = r.blobs.lock();
        assert!(b.bytes <= BLOB_BUDGET);
        assert_eq!(b.map.len(), b.order.len());
    }

    #[test]
    fn a_smaller_budget_keeps_less_and_none_keeps_nothing() {
        let blob = vec![1u8; 1000];
        let d = digest_of(&blob);
        let off = Recent::with_budget(0);
        off.keep_blob("prod", &d, &blob);
        assert_eq!(off.blob("prod", &d), None);
        let small = Recent::with_budget(2500);
        for i in 0..5u8 {
            let b = vec![i; 1000];
            small.keep_blob("prod", &digest_of(&b), &b);
        }
        assert_eq!(
            small.blobs.lock().map.len(),
            2,
            "two of 1000 bytes fit in 2500"
        );
        assert!(
            small.blob("prod", &digest_of(&[4u8; 1000])).is_some(),
            "the newest stays"
        );
    }

    #[test]
    fn a_miss_is_used_once_and_only_while_fresh() {
        let r = Recent::default();
        let d = digest_of(b"action");
        let t0 = Instant::now();
        assert!(!r.take_miss_at("prod", &d, t0));
        r.note_miss_at("prod", &d, t0);
        assert!(!r.take_miss_at("staging", &d, t0));
        assert!(r.take_miss_at("prod", &d, t0 + Duration::from_secs(1)));
        assert!(
            !r.take_miss_at("prod", &d, t0 + Duration::from_secs(1)),
            "used once"
        );

        r.note_miss_at("prod", &d, t0);
        assert!(!r.take_miss_at("prod", &d, t0 + MISS_TTL + Duration::from_millis(1)));

        // Old misses are dropped as new ones arrive; a repeated miss keeps its newest time.
        let e = digest_of(b"another");
        r.note_miss_at("prod", &e, t0);
        r.note_miss_at("prod", &e, t0 + MISS_TTL);
        r.note_miss_at("prod", &d, t0 + MISS_TTL + Duration::from_secs(1));
        assert!(r.take_miss_at("prod", &e, t0 + MISS_TTL + Duration::from_secs(1)));
        assert!(r.misses.lock().order.len() <= 2);
    }
}
