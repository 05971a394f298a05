//! Capacity: space reserved for writes in flight, and least-recently-used eviction.

use super::*;

/// Eviction starts above the capacity and frees down to this fraction of it.
pub(super) const LOW_WATERMARK: f64 = 0.9;

impl Store {
    /// Fails with `Full` when writing `size` more bytes would leave the disk under the shard
    /// with less than its minimum free space, whatever the capacity says.
    pub(super) fn check_free(&self, size: u64) -> Result<(), StoreError> {
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| io_err("statvfs")(io::Error::from(e)))?;
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        if avail < size.saturating_add(self.min_free_bytes) {
            return Err(StoreError::Full(format!(
                "the disk under {} has {avail} bytes free; {size} more would leave less than \
                 the {} it must keep free",
                self.root.display(),
                self.min_free_bytes
            )));
        }
        Ok(())
    }

    pub(super) fn reserve(&self, size: u64) -> Result<(), StoreError> {
        if size > self.capacity {
            return Err(StoreError::Full(format!(
                "blob of {size} bytes exceeds the shard capacity of {} bytes",
                self.capacity
            )));
        }
        self.check_free(size)?;
        self.index.lock().reserved += size;
        self.evict_if_needed();
        Ok(())
    }

    pub(super) fn unreserve(&self, size: u64) {
        let mut idx = self.index.lock();
        idx.reserved = idx.reserved.saturating_sub(size);
    }

    /// Evicts least-recently-used blobs and action-cache entries until used + reserved is under
    /// the low watermark, and the action cache under its share.
    ///
    /// Candidates are large blobs (by their last access), sealed packs (by the tick at which
    /// they filled up) and action-cache entries (by their last access), oldest first. A pack's
    /// blobs that were used after it filled up are copied forward into the active pack before
    /// the pack is deleted; pinned blobs and packs holding them are skipped. Each pass sorts
    /// every candidate; passes are rare, since each frees a tenth of the capacity.
    pub fn evict_if_needed(&self) {
        let action_capacity = self.action_cache_capacity();
        let within = |idx: &Index| {
            idx.used + idx.reserved <= self.capacity && idx.action_bytes <= action_capacity
        };
        // The common case, without waiting for an eviction pass that may be running.
        if within(&self.index.lock()) {
            return;
        }
        let _one_at_a_time = self.eviction.lock();
        let active = self.active_id.load(Ordering::Acquire);
        let (files, packs, actions) = {
            let mut idx = self.index.lock();
            if within(&idx) {
                return;
            }
            let target = (self.capacity as f64 * LOW_WATERMARK) as u64;
            let mut over = if idx.used + idx.reserved > self.capacity {
                (idx.used + idx.reserved).saturating_sub(target)
            } else {
                0
            };
            let mut files: Vec<(u64, Key, u64)> = idx
                .map
                .iter()
                .filter(|(_, e)| e.pack == 0 && e.pins == 0)
                .map(|(k, e)| (e.tick, *k, e.size))
                .collect();
            files.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
            let mut packs: Vec<(u64, u32)> = idx
                .packs
                .iter()
                .filter(|(id, m)| **id != active && m.sealed_tick.is_some())
                .map(|(id, m)| (m.sealed_tick.unwrap_or(0), *id))
                .collect();
            packs.sort_unstable_by_key(|p| std::cmp::Reverse(*p));
            let mut actions: Vec<(u64, AcKey, u64)> = idx
                .actions
                .iter()
                .map(|(k, e)| (e.tick, *k, e.bytes))
                .collect();
            actions.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
            let mut victim_files = Vec::new();
            let mut victim_packs = Vec::new();
            let mut victim_actions = Vec::new();
            // Takes the least recently used entry off `actions`; false when none is left.
            fn drop_action(
                actions: &mut Vec<(u64, AcKey, u64)>,
                idx: &mut Index,
                over: &mut u64,
                victims: &mut Vec<AcKey>,
            ) -> bool {
                let Some((_, key, bytes)) = actions.pop() else {
                    return false;
                };
                idx.actions.remove(&key);
                idx.action_bytes -= bytes;
                idx.used -= bytes;
                *over = over.saturating_sub(bytes);
                victims.push(key);
                true
            }
            // An action cache past its share gives up its own oldest entries first, down to the
            // low watermark of its share.
            if idx.action_bytes > action_capacity {
                let action_target = (action_capacity as f64 * LOW_WATERMARK) as u64;
                while idx.action_bytes > action_target
                    && drop_action(&mut actions, &mut idx, &mut over, &mut victim_actions)
                {
                }
            }
            #[derive(PartialEq)]
            enum Next {
                Pack,
                File,
                Action,
            }
            while over > 0 {
                // The least recently used of the three; a pack wins a tie, then a file.
                let next = [
                    packs.last().map(|p| (p.0, Next::Pack)),
                    files.last().map(|f| (f.0, Next::File)),
                    actions.last().map(|a| (a.0, Next::Action)),
                ]
                .into_iter()
                .flatten()
                .min_by_key(|c| c.0)
                .map(|c| c.1);
                match next {
                    None => break,
                    Some(Next::Action) => {
                        drop_action(&mut actions, &mut idx, &mut over, &mut victim_actions);
                    }
                    Some(Next::Pack) => {
                        let (sealed_tick, id) = packs.pop().expect("a pack");
                        let meta = idx
                            .packs
                            .get(&id)
                            .map(|m| m.keys.clone())
                            .unwrap_or_default();
                        let live: Vec<(Key, Entry)> = meta
                            .iter()
                            .filter_map(|k| {
                                idx.map.get(k).filter(|e| e.pack == id).map(|e| (*k, *e))
                            })
                            .collect();
                        if live.iter().any(|(_, e)| e.pins > 0) {
                            continue;
                        }
                        let mut keep = Vec::new();
                        let mut dropped = Vec::new();
                        for (k, e) in live {
                            if e.tick > sealed_tick {
                                keep.push((k, e));
                            } else {
                                idx.map.remove(&k);
                                idx.used -= e.size;
                                over = over.saturating_sub(e.size);
                                dropped.push(k);
                            }
                        }
                        idx.packs.remove(&id);
                        victim_packs.push((id, keep, dropped));
                    }
                    Some(Next::File) => {
                        let (_, key, size) = files.pop().expect("a file");
                        idx.map.remove(&key);
                        idx.used -= size;
                        idx.evicting.insert(key);
                        over = over.saturating_sub(size);
                        victim_files.push(key);
                    }
                }
            }
            (victim_files, victim_packs, victim_actions)
        };
        self.drop_actions(&actions);
        self.removed(
            files
                .iter()
                .chain(packs.iter().flat_map(|(_, _, dropped)| dropped))
                .map(|k| k.hash),
            Vec::new(),
        );
        let mut evicted = files.len() as u64;
        for key in &files {
            let _ = fs::remove_file(self.blob_path(key));
            let _ = self.blobs.remove(&key.bytes()[..]);
        }
        {
            let mut idx = self.index.lock();
            for key in &files {
                idx.evicting.remove(key);
            }
        }
        for (id, keep, mut dropped) in packs {
            if let Err(error) = self.copy_forward(id, &keep) {
                tracing::warn!(pack = id, %error, "Could not copy recently used blobs out of an evicted pack");
                let before = dropped.len();
                let mut idx = self.index.lock();
                for (k, _) in &keep {
                    if let Some(e) = idx.map.get(k).filter(|e| e.pack == id).copied() {
                        idx.map.remove(k);
                        idx.used -= e.size;
                        dropped.push(*k);
                    }
                }
                drop(idx);
                self.removed(dropped[before..].iter().map(|k| k.hash), Vec::new());
            }
            evicted += dropped.len() as u64;
            let _ = put_meta(&self.blobs, dropped.iter().map(|k| (k, None)));
            let _ = fs::remove_file(self.pack_path(id));
        }
        metrics::counter!(crate::metric_names::CAS_SHARD_EVICTIONS_TOTAL).increment(evicted);
        if evicted > 0 {
            tracing::debug!(evicted, "Evicted least-recently-used blobs");
        }
    }

    /// Rewrites blobs of pack `id` into the active pack and points the index at the copies.
    pub(super) fn copy_forward(&self, id: u32, keep: &[(Key, Entry)]) -> Result<(), StoreError> {
        if keep.is_empty() {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let f = File::open(self.pack_path(id)).map_err(io_err("open evicted pack"))?;
        let mut bufs = Vec::with_capacity(keep.len());
        for (_, e) in keep {
            let mut b = vec![0u8; e.size as usize];
            f.read_exact_at(&mut b, e.offset)
                .map_err(io_err("read evicted pack"))?;
            bufs.push(b);
        }
        let refs: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        let locs = self.append_to_pack(&refs)?;
        let mut moved = Vec::with_capacity(keep.len());
        let mut idx = self.index.lock();
        for ((k, _), (pack, offset)) in keep.iter().zip(locs) {
            if let Some(e) = idx.map.get_mut(k).filter(|e| e.pack == id) {
                e.pack = pack;
                e.offset = offset;
                moved.push((*k, *e));
                idx.packs.entry(pack).or_default().keys.push(*k);
            }
        }
        drop(idx);
        put_meta(&self.blobs, moved.iter().map(|(k, e)| (k, Some(e))))?;
        Ok(())
    }
}
