//! Action results this gateway has verified complete, answered again from memory until a shard
//! says something they rest on is gone.
//!
//! A GetActionResult hit costs two bus round trips when checked on the shards (the entry, then
//! FindMissing over every blob it references), which is most of what an all-hit rebuild spends
//! in the platform. Instead, a result found complete (by that check, or by UpdateActionResult's
//! own) is remembered with the hashes it references, and served from here while nothing it rests
//! on has changed. What can change it, and how this side learns of it:
//! - A shard drops blobs (eviction, a corrupt copy found on read) or an action-cache entry: the
//!   store reports it the moment it is out of the index, and the shard publishes it as
//!   [`ShardNews`]; every entry referencing one of those hashes is forgotten.
//! - An announcement is lost (a reconnect, a slow consumer): each shard numbers its removals and
//!   repeats the count in a beat every heartbeat, in order on one subject, so a gap shows at the
//!   next message; everything is forgotten. A reconnect of this gateway's own connection is
//!   seen at once (its connect count).
//! - A shard restarts (a new start time), leaves (it says so) or falls silent for the shard
//!   timeout: everything is forgotten, since its blobs may be out of reach.
//!
//! A result verified while a removal arrived is not remembered (the check may predate it). A read
//! through this gateway that finds a blob missing forgets the results using it at once. What
//! remains is the delay of one bus message between a shard dropping a blob and this gateway
//! hearing of it, the same order as the gap that always existed between the check and the
//! client's download. Entries also expire after a maximum age, and the memory is bounded (the
//! least recently used go first).

use bytes::Bytes;
use motorpool_bus::{Bus, subjects};
use motorpool_messages::BlobDigest;
use motorpool_messages::cas::ShardNews;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Results referencing more blobs than this are checked on the shards every time: remembering
/// them would cost more memory than the round trips they save.
const MAX_REFS: usize = 4096;
/// Memory charged per referenced hash (its index entry) and per entry (maps, order, key).
const REF_COST: usize = 48;
const ENTRY_COST: usize = 160;

/// What a lookup needs to know before it starts checking on the shards, to tell afterwards
/// whether anything changed meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    changes: u64,
    connects: u64,
}

/// Why everything was forgotten at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// This gateway's bus connection was re-established: announcements may have been missed.
    Reconnected,
    /// A shard's announcement count skipped ahead of what arrived.
    Gap,
    /// A shard restarted (or was first heard of with removals already behind it).
    Restarted,
    /// A shard announced that it is stopping.
    Leaving,
    /// A shard has been silent longer than the shard timeout.
    Silent,
}

impl Flush {
    fn label(self) -> &'static str {
        match self {
            Flush::Reconnected => "reconnected",
            Flush::Gap => "gap",
            Flush::Restarted => "restarted",
            Flush::Leaving => "leaving",
            Flush::Silent => "silent",
        }
    }
}

struct Entry {
    instance: String,
    action: BlobDigest,
    result: Bytes,
    /// Hash keys of the action and of every blob the result references.
    refs: Box<[u64]>,
    at: Instant,
    cost: usize,
    /// Served since it last came up for eviction (a second chance, as in CLOCK).
    used: bool,
}

/// What one shard last said.
struct Heard {
    started_at_ms: u64,
    seq: u64,
    at: Instant,
}

#[derive(Default)]
struct State {
    /// Bumped by anything that may have made a remembered result wrong.
    changes: u64,
    /// The bus connect count the entries were verified under.
    connects: u64,
    ids: HashMap<String, HashMap<BlobDigest, u64>>,
    entries: HashMap<u64, Entry>,
    /// Entry ids, oldest first; ids of entries already gone are skipped.
    order: VecDeque<u64>,
    /// Hash key -> ids of the entries referencing it.
    by_hash: HashMap<u64, Vec<u64>>,
    cost: usize,
    next_id: u64,
    shards: HashMap<String, Heard>,
}

impl State {
    fn clear(&mut self) {
        self.changes += 1;
        self.ids.clear();
        self.entries.clear();
        self.order.clear();
        self.by_hash.clear();
        self.cost = 0;
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.cost -= e.cost;
        if let Some(m) = self.ids.get_mut(&e.instance) {
            if m.get(&e.action) == Some(&id) {
                m.remove(&e.action);
            }
            if m.is_empty() {
                self.ids.remove(&e.instance);
            }
        }
        for h in e.refs.iter() {
            if let Some(v) = self.by_hash.get_mut(h) {
                v.retain(|&x| x != id);
                if v.is_empty() {
                    self.by_hash.remove(h);
                }
            }
        }
        Some(e)
    }

    /// Forgets every entry referencing `hash`.
    fn drop_hash(&mut self, hash: &[u8; 32]) -> usize {
        let Some(ids) = self.by_hash.remove(&key(hash)) else {
            return 0;
        };
        ids.into_iter()
            .filter(|&id| self.remove(id).is_some())
            .count()
    }
}

/// The hash key an entry is indexed under: the hash's first eight bytes. Two hashes sharing
/// them only make a removal forget more than it had to.
fn key(hash: &[u8; 32]) -> u64 {
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// See the module docs.
pub struct Hits {
    state: Mutex<State>,
    budget: usize,
    max_age: Duration,
    /// How long a shard may be silent before its blobs are presumed out of reach.
    quiet: Duration,
    /// The bus connection's connect count (1 after the first connect).
    connects: Option<Arc<async_nats::Statistics>>,
}

impl Hits {
    /// A memory of at most `budget` bytes (0 turns it off), entries at most `max_age` old.
    pub fn new(budget: usize, max_age: Duration, quiet: Duration) -> Hits {
        Hits {
            state: Mutex::default(),
            budget,
            max_age,
            quiet,
            connects: None,
        }
    }

    /// Subscribes to every shard's news on `bus` and keeps this memory by it; the subscription is
    /// in place when this returns, so nothing verified afterwards can miss a removal.
    pub async fn listen(
        mut self,
        bus: &Bus,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Arc<Hits>> {
        let stats = bus.client().statistics();
        self.state.get_mut().connects = stats.connects.load(Ordering::Acquire);
        self.connects = Some(stats);
        let hits = Arc::new(self);
        if hits.budget == 0 {
            return Ok(hits);
        }
        let mut news = bus
            .subscribe::<ShardNews>(&subjects::cas::all_news())
            .await?;
        // The subscription must be live on the server before the first result is remembered.
        bus.flush().await?;
        let h = hits.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval((h.quiet / 4).max(Duration::from_millis(50)));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    n = news.next_from() => match n {
                        // Only the shard itself may publish under its id.
                        Some((from, n)) if from == n.shard_id => h.heard(&n, Instant::now()),
                        Some((from, n)) => tracing::warn!(subject = %from, claimed = %n.shard_id, "Ignored shard news under another shard's id"),
                        None => {
                            // The subscription ended; without news nothing can be trusted,
                            // and with no shard heard from, nothing is remembered again.
                            let mut st = h.state.lock();
                            st.clear();
                            st.shards.clear();
                            drop(st);
                            tracing::warn!("Shard news subscription ended; remembered results are off");
                            break;
                        }
                    },
                    _ = tick.tick() => h.check_silence(Instant::now()),
                }
            }
        });
        Ok(hits)
    }

    fn connects_now(&self) -> u64 {
        self.connects
            .as_ref()
            .map_or(0, |s| s.connects.load(Ordering::Acquire))
    }

    /// Clears the memory if this gateway's bus connection was re-established since the entries
    /// were verified.
    fn check_connection(&self, st: &mut State) {
        let now = self.connects_now();
        if st.connects != now {
            st.connects = now;
            flushed(st, Flush::Reconnected);
        }
    }

    /// Taken before checking a result on the shards; see [`Hits::remember`].
    pub fn ticket(&self) -> Ticket {
        let mut st = self.state.lock();
        self.check_connection(&mut st);
        Ticket {
            changes: st.changes,
            connects: st.connects,
        }
    }

    /// The remembered result of `action` in `instance`, if it is still known complete.
    pub fn get(&self, instance: &str, action: &BlobDigest) -> Option<Bytes> {
        self.get_at(instance, action, Instant::now())
    }

    fn get_at(&self, instance: &str, action: &BlobDigest, now: Instant) -> Option<Bytes> {
        if self.budget == 0 {
            return None;
        }
        let mut st = self.state.lock();
        self.check_connection(&mut st);
        if st.shards.is_empty() {
            return None; // no news (any more): nothing can be trusted
        }
        let id = *st.ids.get(instance)?.get(action)?;
        let e = st.entries.get_mut(&id)?;
        if now.duration_since(e.at) > self.max_age {
            st.remove(id);
            return None;
        }
        e.used = true;
        let result = e.result.clone();
        drop(st);
        metrics::counter!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS_SERVED_TOTAL)
            .increment(1);
        Some(result)
    }

    /// Remembers that `result` (the encoded entry of `action`) referenced only `refs`, all
    /// present when checked after `ticket` was taken. Nothing is remembered if anything that
    /// could have changed that happened meanwhile.
    pub fn remember(
        &self,
        ticket: Ticket,
        instance: &str,
        action: &BlobDigest,
        result: Bytes,
        refs: &[BlobDigest],
    ) {
        self.remember_at(ticket, instance, action, result, refs, Instant::now());
    }

    fn remember_at(
        &self,
        ticket: Ticket,
        instance: &str,
        action: &BlobDigest,
        result: Bytes,
        refs: &[BlobDigest],
        now: Instant,
    ) {
        if self.budget == 0 || refs.len() > MAX_REFS {
            return;
        }
        let mut hashes: Vec<u64> = refs
            .iter()
            .filter(|d| !d.is_empty_blob())
            .map(|d| key(&d.hash))
            .chain([key(&action.hash)])
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        let cost = ENTRY_COST + instance.len() + result.len() + hashes.len() * REF_COST;
        if cost > self.budget {
            return;
        }
        let mut st = self.state.lock();
        self.check_connection(&mut st);
        if st.changes != ticket.changes || st.connects != ticket.connects {
            metrics::counter!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS_SKIPPED_TOTAL)
                .increment(1);
            return;
        }
        if let Some(old) = st.ids.get(instance).and_then(|m| m.get(action)).copied() {
            st.remove(old);
        }
        let id = st.next_id;
        st.next_id += 1;
        for h in &hashes {
            st.by_hash.entry(*h).or_default().push(id);
        }
        st.ids
            .entry(instance.to_string())
            .or_default()
            .insert(*action, id);
        st.entries.insert(
            id,
            Entry {
                instance: instance.to_string(),
                action: *action,
                result,
                refs: hashes.into_boxed_slice(),
                at: now,
                cost,
                used: false,
            },
        );
        st.order.push_back(id);
        st.cost += cost;
        // Least recently used first, by second chance: a used entry goes round once more.
        while st.cost > self.budget {
            let Some(victim) = st.order.pop_front() else {
                break;
            };
            match st.entries.get_mut(&victim) {
                Some(e) if e.used => {
                    e.used = false;
                    st.order.push_back(victim);
                }
                Some(_) => {
                    st.remove(victim);
                }
                None => {}
            }
        }
        // Ids of entries removed out of order are skipped above; keep the queue from growing
        // without bound when most of them are gone.
        if st.order.len() > 2 * st.entries.len() + 1024 {
            let State { order, entries, .. } = &mut *st;
            order.retain(|id| entries.contains_key(id));
        }
        metrics::gauge!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS)
            .set(st.entries.len() as f64);
    }

    /// True when news has come from every one of these shards (the live ones): only then can a
    /// result verified against them be remembered. A shard not heard from yet (just joined, or
    /// the news subscription is refused by a bus realm that predates it) would drop blobs
    /// unheard.
    pub fn hears_all<'a>(&self, shards: impl IntoIterator<Item = &'a str>) -> bool {
        let st = self.state.lock();
        let mut any = false;
        for id in shards {
            any = true;
            if !st.shards.contains_key(id) {
                return false;
            }
        }
        any
    }

    /// Forgets every result referencing `hash`: a read found it missing on the shards. This
    /// gateway's own reads need not wait for the shard's announcement, so a client that finds an
    /// output gone and asks for the result again gets it checked on the shards.
    pub fn forget(&self, hash: &[u8; 32]) {
        let mut st = self.state.lock();
        if st.drop_hash(hash) > 0 {
            st.changes += 1;
            metrics::gauge!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS)
                .set(st.entries.len() as f64);
        }
    }

    /// Applies one shard's news.
    fn heard(&self, news: &ShardNews, now: Instant) {
        let mut st = self.state.lock();
        self.check_connection(&mut st);
        let removal = !news.is_beat();
        let expected_seq = |seq: u64| if removal { seq + 1 } else { seq };
        let flush = match st.shards.get(&news.shard_id) {
            Some(h) if h.started_at_ms != news.started_at_ms => Some(Flush::Restarted),
            Some(h) if news.seq != expected_seq(h.seq) => Some(Flush::Gap),
            Some(_) => None,
            // First heard of: fine if it has removed nothing before this message (a shard
            // that just started, as at this gateway's own start); otherwise some of its
            // removals may have gone unheard.
            None if news.seq > u64::from(removal) => Some(Flush::Restarted),
            None => None,
        };
        if let Some(why) = flush {
            flushed(&mut st, why);
        }
        if news.leaving {
            st.shards.remove(&news.shard_id);
            flushed(&mut st, Flush::Leaving);
            metrics::gauge!(crate::metric_names::GATEWAY_SHARDS_HEARD).set(st.shards.len() as f64);
            return;
        }
        st.shards.insert(
            news.shard_id.clone(),
            Heard {
                started_at_ms: news.started_at_ms,
                seq: news.seq,
                at: now,
            },
        );
        metrics::gauge!(crate::metric_names::GATEWAY_SHARDS_HEARD).set(st.shards.len() as f64);
        if removal {
            st.changes += 1;
            let dropped: usize = news
                .blobs
                .iter()
                .chain(&news.actions)
                .map(|h| st.drop_hash(h))
                .sum();
            if dropped > 0 {
                metrics::counter!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS_DROPPED_TOTAL)
                    .increment(dropped as u64);
                metrics::gauge!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS)
                    .set(st.entries.len() as f64);
            }
        }
    }

    /// Forgets everything when a shard has been silent for longer than the shard timeout.
    fn check_silence(&self, now: Instant) {
        let mut st = self.state.lock();
        let before = st.shards.len();
        st.shards
            .retain(|_, h| now.duration_since(h.at) <= self.quiet);
        if st.shards.len() < before {
            flushed(&mut st, Flush::Silent);
            metrics::gauge!(crate::metric_names::GATEWAY_SHARDS_HEARD).set(st.shards.len() as f64);
        }
    }
}

fn flushed(st: &mut State, why: Flush) {
    let n = st.entries.len();
    st.clear();
    metrics::counter!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS_FLUSHES_TOTAL, "reason" => why.label())
        .increment(1);
    metrics::gauge!(crate::metric_names::GATEWAY_REMEMBERED_RESULTS).set(0.0);
    if n > 0 {
        tracing::info!(
            reason = why.label(),
            forgotten = n,
            "Forgot every remembered action result"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_messages::DigestFunction;

    fn d(s: &str) -> BlobDigest {
        DigestFunction::Sha256.digest_of(s.as_bytes())
    }

    fn news(shard: &str, started: u64, seq: u64, blobs: &[BlobDigest]) -> ShardNews {
        ShardNews {
            shard_id: shard.into(),
            started_at_ms: started,
            seq,
            blobs: blobs.iter().map(|b| b.hash).collect(),
            actions: Vec::new(),
            leaving: false,
        }
    }

    fn hits() -> Hits {
        Hits::new(1 << 20, Duration::from_secs(3600), Duration::from_secs(5))
    }

    fn remember(h: &Hits, instance: &str, action: &BlobDigest, refs: &[BlobDigest]) {
        let t = h.ticket();
        h.remember(t, instance, action, Bytes::from_static(b"result"), refs);
    }

    #[test]
    fn a_removed_blob_forgets_exactly_the_results_that_reference_it() {
        let h = hits();
        let now = Instant::now();
        h.heard(&news("s1", 1, 0, &[]), now);
        let (a, b) = (d("action a"), d("action b"));
        remember(&h, "prod", &a, &[d("out a"), d("shared")]);
        remember(&h, "prod", &b, &[d("out b")]);
        assert!(h.get("prod", &a).is_some());
        assert!(h.get("staging", &a).is_none(), "instances are isolated");

        h.heard(&news("s1", 1, 1, &[d("shared")]), now);
        assert!(h.get("prod", &a).is_none(), "its output is gone");
        assert!(h.get("prod", &b).is_some(), "unrelated results stay");

        // A deleted action-cache entry is forgotten too.
        let mut n = news("s1", 1, 2, &[]);
        n.actions = vec![b.hash];
        h.heard(&n, now);
        assert!(h.get("prod", &b).is_none());
        let st = h.state.lock();
        assert!(st.entries.is_empty() && st.by_hash.is_empty() && st.cost == 0);
    }

    #[test]
    fn a_removal_during_the_check_keeps_its_result_out() {
        let h = hits();
        h.heard(&news("s1", 1, 0, &[]), Instant::now());
        let a = d("action");
        let t = h.ticket();
        // The shards answered "complete", but a removal arrived before the answer was kept.
        h.heard(&news("s1", 1, 1, &[d("unrelated")]), Instant::now());
        h.remember(t, "prod", &a, Bytes::from_static(b"r"), &[d("out")]);
        assert!(h.get("prod", &a).is_none());
    }

    #[test]
    fn lost_news_restarts_leaving_and_silence_forget_everything() {
        let a = d("action");
        let t0 = Instant::now();
        type Event<'a> = Box<dyn Fn(&Hits) + 'a>;
        let cases: Vec<(&str, Event)> = vec![
            // Removal 2 arrives but 1 never did.
            (
                "gap in removals",
                Box::new(|h| h.heard(&news("s1", 1, 2, &[d("x")]), t0)),
            ),
            // A beat claims a removal that never arrived.
            (
                "gap at a beat",
                Box::new(|h| h.heard(&news("s1", 1, 1, &[]), t0)),
            ),
            ("restart", Box::new(|h| h.heard(&news("s1", 2, 0, &[]), t0))),
            (
                "leaving",
                Box::new(|h| {
                    let mut n = news("s1", 1, 0, &[]);
                    n.leaving = true;
                    h.heard(&n, t0)
                }),
            ),
            (
                "a new shard with removals behind it",
                Box::new(|h| h.heard(&news("s2", 7, 3, &[]), t0)),
            ),
            (
                "silence",
                Box::new(|h| h.check_silence(t0 + Duration::from_secs(6))),
            ),
        ];
        for (what, event) in cases {
            let h = hits();
            h.heard(&news("s1", 1, 0, &[]), t0);
            remember(&h, "prod", &a, &[d("out")]);
            assert!(h.get("prod", &a).is_some(), "{what}: remembered");
            event(&h);
            assert!(h.get("prod", &a).is_none(), "{what}: forgotten");
        }

        // In-order news, and a new shard that has removed nothing yet, keep what is known.
        let h = hits();
        h.heard(&news("s1", 1, 0, &[]), t0);
        remember(&h, "prod", &a, &[d("out")]);
        h.heard(&news("s1", 1, 1, &[d("x")]), t0);
        h.heard(&news("s1", 1, 1, &[]), t0);
        h.heard(&news("s2", 9, 0, &[]), t0);
        h.heard(&news("s3", 9, 1, &[d("y")]), t0);
        h.check_silence(t0 + Duration::from_secs(4));
        assert!(h.get("prod", &a).is_some());
    }

    #[test]
    fn entries_expire_and_memory_stays_in_budget_keeping_the_used_ones() {
        let h = Hits::new(40 * 1024, Duration::from_secs(60), Duration::from_secs(5));
        let t0 = Instant::now();
        h.heard(&news("s1", 1, 0, &[]), t0);
        let a = d("action");
        h.remember_at(h.ticket(), "prod", &a, Bytes::from_static(b"r"), &[], t0);
        assert!(h.get_at("prod", &a, t0 + Duration::from_secs(59)).is_some());
        assert!(h.get_at("prod", &a, t0 + Duration::from_secs(61)).is_none());

        let hot = d("hot");
        h.remember(h.ticket(), "prod", &hot, Bytes::from(vec![0u8; 200]), &[]);
        for i in 0..1000 {
            assert!(
                h.get("prod", &hot).is_some(),
                "the used entry survives ({i})"
            );
            h.remember(
                h.ticket(),
                "prod",
                &d(&format!("cold {i}")),
                Bytes::from(vec![0u8; 200]),
                &[d(&format!("out {i}"))],
            );
        }
        let st = h.state.lock();
        assert!(st.cost <= 40 * 1024);
        assert!(st.entries.len() > 50 && st.entries.len() < 1000);
        assert!(st.order.len() <= 2 * st.entries.len() + 1024);
        let refs: usize = st.by_hash.values().map(Vec::len).sum();
        assert_eq!(
            refs,
            st.entries.values().map(|e| e.refs.len()).sum::<usize>()
        );
    }

    #[test]
    fn nothing_is_served_without_news_and_only_shards_heard_from_count() {
        let h = hits();
        let a = d("action");
        remember(&h, "prod", &a, &[d("out")]);
        assert!(
            h.get("prod", &a).is_none(),
            "no shard heard from: nothing is trusted"
        );
        assert!(!h.hears_all([]), "no live shard");
        h.heard(&news("s1", 1, 0, &[]), Instant::now());
        assert!(h.hears_all(["s1"]));
        assert!(!h.hears_all(["s1", "s2"]), "s2 has not been heard from");
        assert!(h.get("prod", &a).is_some());
    }

    #[test]
    fn off_when_the_budget_is_zero_and_for_results_with_too_many_blobs() {
        let h = Hits::new(0, Duration::from_secs(60), Duration::from_secs(5));
        let a = d("action");
        remember(&h, "prod", &a, &[]);
        assert!(h.get("prod", &a).is_none());

        let h = hits();
        let many: Vec<_> = (0..=MAX_REFS).map(|i| d(&i.to_string())).collect();
        remember(&h, "prod", &a, &many);
        assert!(h.get("prod", &a).is_none());
    }
}
