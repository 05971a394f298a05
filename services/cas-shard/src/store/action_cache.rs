//! The action cache: ActionResult entries per instance name, kept in sled (`ac`), counted in the
//! shard's capacity and evicted with its blobs.
//!
//! Each entry is counted for its key and value plus [`AC_ENTRY_OVERHEAD`], and carries an access
//! tick from the same clock as the blobs, so one least-recently-used order covers both: an entry
//! nobody asked for goes before a blob read a moment ago, and the other way round. On top of that
//! the action cache may not take more than its share of the capacity
//! ([`Store::set_action_cache_share`]); past it, its own oldest entries go first. Ticks are kept in
//! `ac_used` (written with the blobs' access times), so the order survives a restart.

use super::*;

/// An entry's key, in sled and in the index: the action digest's blob key and its size.
pub(super) type AcKey = [u8; 49];

/// What the index keeps of an action-cache entry.
#[derive(Clone, Copy, Debug)]
pub(super) struct AcEntry {
    /// What the entry is counted for against the capacity.
    pub(super) bytes: u64,
    pub(super) tick: u64,
}

/// Bytes an entry costs beyond its key and value (sled's record header and index slot, rounded
/// up): a cache of many tiny entries must not look free.
pub(super) const AC_ENTRY_OVERHEAD: u64 = 64;

/// The share of a shard's capacity its action cache may take unless configured otherwise.
pub const DEFAULT_ACTION_CACHE_SHARE: f64 = 0.1;

pub(super) fn ac_hash(key: &AcKey) -> [u8; 32] {
    key[9..41].try_into().expect("32 bytes")
}

fn entry_bytes(value_len: usize) -> u64 {
    std::mem::size_of::<AcKey>() as u64 + value_len as u64 + AC_ENTRY_OVERHEAD
}

impl Store {
    pub(super) fn ac_key(ns: u64, action: &BlobDigest) -> AcKey {
        let mut k = [0u8; 49];
        k[..41].copy_from_slice(&Key::new(ns, action).bytes());
        k[41..].copy_from_slice(&action.size.to_be_bytes());
        k
    }

    /// Lets the action cache take at most `share` (above 0, at most 1) of the capacity.
    pub fn set_action_cache_share(&self, share: f64) -> Result<(), StoreError> {
        if !(share > 0.0 && share <= 1.0) {
            return Err(StoreError::Invalid(format!(
                "the action cache's share of the capacity must be above 0 and at most 1, not {share}"
            )));
        }
        self.action_share_ppm
            .store((share * 1e6).round() as u64, Ordering::Relaxed);
        self.evict_if_needed();
        Ok(())
    }

    /// The bytes the action cache may take.
    pub fn action_cache_capacity(&self) -> u64 {
        (self.capacity as u128 * self.action_share_ppm.load(Ordering::Relaxed) as u128 / 1_000_000)
            as u64
    }

    /// Loads the entries into the index (at open, under its lock); returns the newest tick.
    pub(super) fn load_actions(&self, idx: &mut Index) -> Result<u64, StoreError> {
        let mut newest = 0;
        for item in self.ac.iter() {
            let (k, v) = item?;
            let Ok(key) = AcKey::try_from(&k[..]) else {
                self.ac.remove(k)?;
                continue;
            };
            let tick = self
                .ac_used
                .get(key)?
                .and_then(|t| <[u8; 8]>::try_from(&t[..]).ok())
                .map_or(0, u64::from_be_bytes);
            newest = newest.max(tick);
            let bytes = entry_bytes(v.len());
            idx.actions.insert(key, AcEntry { bytes, tick });
            idx.action_bytes += bytes;
            idx.used += bytes;
        }
        Ok(newest)
    }

    /// Writes the access ticks of entries used after tick `since`.
    pub(super) fn flush_action_ticks(&self, since: u64) -> Result<(), StoreError> {
        let changed: Vec<(AcKey, u64)> = self
            .index
            .lock()
            .actions
            .iter()
            .filter(|(_, e)| e.tick > since)
            .map(|(k, e)| (*k, e.tick))
            .collect();
        // Key by key, as all metadata (see `put_meta`): a sled batch costs more than it saves.
        for (k, tick) in changed {
            self.ac_used.insert(&k[..], &tick.to_be_bytes()[..])?;
        }
        Ok(())
    }

    /// Counts a stored entry of `value_len` bytes as used now.
    fn index_action(&self, key: AcKey, value_len: usize) {
        let tick = self.next_tick();
        let bytes = entry_bytes(value_len);
        let mut idx = self.index.lock();
        if let Some(old) = idx.actions.insert(key, AcEntry { bytes, tick }) {
            idx.action_bytes -= old.bytes;
            idx.used -= old.bytes;
        }
        idx.action_bytes += bytes;
        idx.used += bytes;
    }

    /// Drops the entries from sled once eviction took them out of the index, and reports them.
    pub(super) fn drop_actions(&self, keys: &[AcKey]) {
        if keys.is_empty() {
            return;
        }
        for k in keys {
            let _ = self.ac.remove(&k[..]);
            let _ = self.ac_used.remove(&k[..]);
        }
        self.removed([], keys.iter().map(ac_hash).collect());
        metrics::counter!(crate::metric_names::CAS_SHARD_ACTION_CACHE_EVICTIONS_TOTAL)
            .increment(keys.len() as u64);
    }

    /// The action's entry here, else (with a store behind) there, kept here again.
    pub fn ac_get(&self, ns: u64, action: &BlobDigest) -> Result<Option<Vec<u8>>, StoreError> {
        let key = Self::ac_key(ns, action);
        if let Some(v) = self.ac.get(key)? {
            let tick = self.next_tick();
            if let Some(e) = self.index.lock().actions.get_mut(&key) {
                e.tick = tick;
            }
            self.note_use(Used::Action(ns, *action));
            return Ok(Some(v.to_vec()));
        }
        let Some(b) = self.behind.get() else {
            return Ok(None);
        };
        let found = b.store.ac_get(ns, action)?;
        if let Some(v) = &found {
            self.ac.insert(key, v.as_slice())?;
            self.index_action(key, v.len());
            self.note_use(Used::Action(ns, *action));
            self.evict_if_needed();
        }
        tier_read(
            found.is_some(),
            found.as_ref().map_or(0, |v| v.len() as u64),
        );
        Ok(found)
    }

    /// Stores the action's entry here and, with a store behind, there before answering: an
    /// entry is small and a lost one costs a whole action.
    pub fn ac_put(&self, ns: u64, action: &BlobDigest, result: &[u8]) -> Result<(), StoreError> {
        let key = Self::ac_key(ns, action);
        if entry_bytes(result.len()) > self.action_cache_capacity() {
            return Err(StoreError::Full(format!(
                "an action result of {} bytes exceeds this shard's action cache of {} bytes",
                result.len(),
                self.action_cache_capacity()
            )));
        }
        self.ac.insert(key, result)?;
        self.index_action(key, result.len());
        if let Some(b) = self.behind.get() {
            b.store.ac_put(ns, action, result)?;
        }
        self.evict_if_needed();
        Ok(())
    }

    pub fn ac_delete(&self, ns: u64, action: &BlobDigest) -> Result<(), StoreError> {
        let key = Self::ac_key(ns, action);
        if self.ac.remove(key)?.is_some() {
            let _ = self.ac_used.remove(key);
            let mut idx = self.index.lock();
            if let Some(e) = idx.actions.remove(&key) {
                idx.action_bytes -= e.bytes;
                idx.used -= e.bytes;
            }
            drop(idx);
            self.removed([], vec![action.hash]);
        }
        if let Some(b) = self.behind.get() {
            b.store.ac_delete(ns, action)?;
        }
        Ok(())
    }
}
