//! The lane queues: one FIFO per (pool, lane), and the rule that picks the next job.
//!
//! **The rule.** A free slot of a worker in pool P takes, among the jobs of P it can run, the one
//! with the highest *effective rank*: its lane's rank (release 3, build 2, test 1, lint 0) plus one
//! for every `aging_step` it has waited, capped at the release rank. Ties go to the older job,
//! then to the higher base lane. So a release job starts at the next free slot (nothing outranks
//! it unless it has waited as long); a lint job that has waited three aging steps competes with
//! release jobs as an equal and, being older, wins against newer ones: no lane starves, and a
//! job's wait is bounded by `3 * aging_step` plus the time to drain the older jobs of rank 3.
//!
//! Within a lane jobs keep their arrival order. Only the first `SCAN` jobs of each lane are
//! looked at for a slot whose platform does not fit the head, which bounds the cost per pick.

use motorpool_messages::exec::{Lane, Pool};
use std::collections::{BTreeMap, VecDeque};

/// Jobs looked at per lane for one pick.
const SCAN: usize = 64;

/// A queued job, as the queues see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// When it entered the queue (ms since the epoch); a retried job keeps its first time.
    pub since_ms: u64,
    /// Not eligible before this time (rate limits).
    pub not_before_ms: u64,
}

/// One FIFO per (pool, lane).
#[derive(Debug, Default)]
pub struct LaneQueues {
    queues: BTreeMap<(Pool, Lane), VecDeque<Entry>>,
    aging_step_ms: u64,
}

impl LaneQueues {
    pub fn new(aging_step_ms: u64) -> Self {
        LaneQueues {
            queues: BTreeMap::new(),
            aging_step_ms: aging_step_ms.max(1),
        }
    }

    /// Appends a job to its lane.
    pub fn push(&mut self, pool: Pool, lane: Lane, entry: Entry) {
        let q = self.queues.entry((pool, lane)).or_default();
        // Keep arrival order even when a retried job comes back with its original time.
        let at = q
            .iter()
            .rposition(|e| e.since_ms <= entry.since_ms)
            .map_or(0, |i| i + 1);
        q.insert(at, entry);
    }

    /// Removes a job wherever it is; true when it was queued.
    pub fn remove(&mut self, pool: Pool, lane: Lane, id: &str) -> bool {
        if let Some(q) = self.queues.get_mut(&(pool, lane))
            && let Some(i) = q.iter().position(|e| e.id == id)
        {
            q.remove(i);
            return true;
        }
        false
    }

    /// Jobs waiting in (pool, lane).
    pub fn depth(&self, pool: Pool, lane: Lane) -> usize {
        self.queues.get(&(pool, lane)).map_or(0, VecDeque::len)
    }

    /// Jobs waiting in all lanes.
    pub fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The effective rank of a job of `lane` that entered at `since_ms`.
    pub fn effective_rank(&self, lane: Lane, since_ms: u64, now_ms: u64) -> u32 {
        lane.effective_rank(now_ms.saturating_sub(since_ms), self.aging_step_ms)
    }

    /// Takes the next job of `pool` for a slot that can run the jobs `fits` accepts.
    pub fn pick(&mut self, pool: Pool, now_ms: u64, fits: impl Fn(&str) -> bool) -> Option<Entry> {
        // (effective rank, arrival, base rank, lane, index)
        let mut best: Option<(u32, u64, u32, Lane, usize)> = None;
        for lane in Lane::ALL {
            let Some(q) = self.queues.get(&(pool, lane)) else {
                continue;
            };
            let found = q
                .iter()
                .take(SCAN)
                .position(|e| e.not_before_ms <= now_ms && fits(&e.id));
            let Some(i) = found else { continue };
            let e = &q[i];
            let key = (
                self.effective_rank(lane, e.since_ms, now_ms),
                e.since_ms,
                lane.rank(),
                lane,
                i,
            );
            let better = match &best {
                None => true,
                Some(b) => {
                    key.0 > b.0 || (key.0 == b.0 && (key.1 < b.1 || (key.1 == b.1 && key.2 > b.2)))
                }
            };
            if better {
                best = Some(key);
            }
        }
        let (_, _, _, lane, i) = best?;
        self.queues.get_mut(&(pool, lane))?.remove(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str, since_ms: u64) -> Entry {
        Entry {
            id: id.into(),
            since_ms,
            not_before_ms: 0,
        }
    }

    #[test]
    fn higher_lanes_first_fifo_within_a_lane() {
        let mut q = LaneQueues::new(10_000);
        q.push(Pool::Cpu, Lane::Test, e("t1", 0));
        q.push(Pool::Cpu, Lane::Lint, e("l1", 0));
        q.push(Pool::Cpu, Lane::Test, e("t2", 1));
        q.push(Pool::Cpu, Lane::Release, e("r1", 5));
        let order: Vec<_> = std::iter::from_fn(|| q.pick(Pool::Cpu, 100, |_| true))
            .map(|e| e.id)
            .collect();
        assert_eq!(order, ["r1", "t1", "t2", "l1"]);
    }

    #[test]
    fn pools_are_separate_queues() {
        let mut q = LaneQueues::new(10_000);
        q.push(Pool::Gpu, Lane::Release, e("g", 0));
        q.push(Pool::Cpu, Lane::Lint, e("c", 0));
        assert_eq!(q.pick(Pool::Cpu, 0, |_| true).unwrap().id, "c");
        assert!(q.pick(Pool::Cpu, 0, |_| true).is_none());
        assert_eq!(q.pick(Pool::Gpu, 0, |_| true).unwrap().id, "g");
    }

    #[test]
    fn aging_is_bounded_and_lets_old_low_lanes_through() {
        let mut q = LaneQueues::new(1000);
        q.push(Pool::Cpu, Lane::Lint, e("old-lint", 0));
        q.push(Pool::Cpu, Lane::Release, e("new-release", 2_900));
        q.push(Pool::Cpu, Lane::Build, e("new-build", 2_950));
        // At 3 s the lint job has aged three lanes: equal to release, and older.
        assert_eq!(q.effective_rank(Lane::Lint, 0, 3_000), 3);
        assert_eq!(q.effective_rank(Lane::Lint, 0, 60_000), 3, "capped");
        assert_eq!(q.pick(Pool::Cpu, 3_000, |_| true).unwrap().id, "old-lint");
        assert_eq!(
            q.pick(Pool::Cpu, 3_000, |_| true).unwrap().id,
            "new-release"
        );
        // Before aging, release wins even against an older lint job.
        q.push(Pool::Cpu, Lane::Lint, e("lint-2", 2_500));
        q.push(Pool::Cpu, Lane::Release, e("release-2", 2_990));
        assert_eq!(q.pick(Pool::Cpu, 3_000, |_| true).unwrap().id, "release-2");
    }

    #[test]
    fn platform_and_not_before_skip_to_the_next_fitting_job() {
        let mut q = LaneQueues::new(10_000);
        q.push(Pool::Cpu, Lane::Build, e("big", 0));
        q.push(Pool::Cpu, Lane::Build, e("small", 1));
        q.push(
            Pool::Cpu,
            Lane::Release,
            Entry {
                id: "later".into(),
                since_ms: 0,
                not_before_ms: 500,
            },
        );
        assert_eq!(
            q.pick(Pool::Cpu, 100, |id| id != "big").unwrap().id,
            "small"
        );
        assert_eq!(q.pick(Pool::Cpu, 600, |_| true).unwrap().id, "later");
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn retried_jobs_keep_their_place() {
        let mut q = LaneQueues::new(10_000);
        q.push(Pool::Cpu, Lane::Test, e("b", 20));
        q.push(Pool::Cpu, Lane::Test, e("c", 30));
        q.push(Pool::Cpu, Lane::Test, e("a", 10));
        let order: Vec<_> = std::iter::from_fn(|| q.pick(Pool::Cpu, 100, |_| true))
            .map(|e| e.id)
            .collect();
        assert_eq!(order, ["a", "b", "c"]);
        assert!(!q.remove(Pool::Cpu, Lane::Test, "a"));
    }
}
