//! The blob store of one shard: blob bodies in content-addressed files, metadata in sled, an
//! in-memory index for lookups, and size-bounded LRU eviction.
//!
//! On disk, under the shard's data dir:
//! ```text
//! packs/<id:08x>.pack                                  small blobs (<= 1 MiB), appended back to back
//! blobs/<namespace:016x>/<function>/<hh>/<hash hex>   one file per large blob, immutable once renamed
//! tmp/                                                 large-blob writes before their rename
//! uploads/<upload key hash>                            resumable uploads
//! meta/                                                sled: `blobs` (key -> size, tick, location),
//!                                                      `ac` (action -> ActionResult), `ac_used` (action ->
//!                                                      tick), `instances`, `behind_pending` (blobs still to
//!                                                      write behind)
//! ```
//! A namespace is an instance name (hashed): instance names isolate caches.
//!
//! Small blobs go into append-only pack files because a file per blob costs a create, a write and
//! a rename (about 0.5 ms each on the VM disks measured here, so 2k blobs/s at best), while an
//! append of a whole batch costs one write. Eviction drops whole packs, oldest first, after copying
//! forward the blobs in them that were used since the pack filled up; large blobs are evicted one
//! by one. Action-cache entries count against the same capacity and are evicted one by one. All
//! three are ordered by the same access ticks, so the store stays least-recently-used. See
//! `docs/adr/0003-blob-storage.md`.
//!
//! This module holds the store and its blob reads and writes; the rest is split by concern:
//! `index` (keys, entries, packs and their sled records), `eviction` (reservations and LRU
//! eviction), `verify` (re-hashing what is read or was written just before a crash), `uploads`
//! (resumable large-blob writes), `action_cache`, and `behind` (the store behind this one).
//!
//! Invariants:
//! - A blob is in the index only after its file is complete, verified and renamed into place.
//! - A pinned blob (being read) is never evicted; an upload in flight is not in the index at all,
//!   so it cannot be evicted, but its size is reserved against the capacity.
//! - Every API here is synchronous (blocking file I/O); async callers use `spawn_blocking`.
//!
//! **A store behind.** With [`Store::put_behind`] (the object-store tier, `crate::tier`) every
//! blob this store commits is marked pending in `behind_pending` and written there too: at once
//! (through: the write is acknowledged after it) or by [`Store::drain_behind`] (behind). The
//! `*_or_fetch` reads and [`Store::find_missing_anywhere`] look there for what this store does
//! not hold, and a blob read from there is stored here again (re-warmed). Plain reads stay local:
//! a worker's own shard is asked first for inputs and must miss fast.

use crate::tier::{BlobStore, Used};
use motorpool_messages::{BlobDigest, DigestFunction, ErrorCode, Hasher, WireError};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod action_cache;
mod behind;
mod eviction;
mod index;
#[cfg(test)]
mod tests;
mod uploads;
mod verify;

pub use action_cache::DEFAULT_ACTION_CACHE_SHARE;
use action_cache::*;
use behind::*;
use index::*;
use uploads::*;
pub use uploads::{MAX_UPLOADS, UPLOAD_IDLE, UploadHandle};
pub use verify::verify;
use verify::*;

/// Store errors; each maps to one gRPC-style code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} not found")]
    NotFound(BlobDigest),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("shard is full: {0}")]
    Full(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("metadata: {0}")]
    Meta(#[from] sled::Error),
    /// The store behind this one (the object-store tier) failed.
    #[error("object store: {0}")]
    Behind(String),
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Invalid(_) => ErrorCode::InvalidArgument,
            StoreError::Busy(_) | StoreError::Behind(_) => ErrorCode::Unavailable,
            StoreError::Full(_) => ErrorCode::ResourceExhausted,
            StoreError::Io { .. } | StoreError::Meta(_) => ErrorCode::Internal,
        };
        WireError::new(code, e.to_string())
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// The namespace of an instance name.
pub fn namespace(instance: &str) -> u64 {
    let h = blake3::hash(instance.as_bytes());
    u64::from_be_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The pack small blobs are appended to.
struct ActivePack {
    id: u32,
    file: File,
    len: u64,
}

/// Blobs up to this size are packed; larger ones get their own file.
pub const PACK_THRESHOLD: u64 = 1 << 20;
/// Largest pack file (smaller on small shards: a sixteenth of the capacity).
const PACK_SIZE: u64 = 64 << 20;

/// Store statistics, reported in heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub reserved_bytes: u64,
    pub blob_count: u64,
    /// Action-cache entries, and the part of `used_bytes` they take.
    pub action_count: u64,
    pub action_bytes: u64,
    /// What the action cache may take (its share of the capacity).
    pub action_capacity_bytes: u64,
}

/// What the store dropped: blob hashes (evicted, or found corrupt) and action hashes (entries
/// deleted), in any namespace. The shard announces them (see `ShardNews`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub blobs: Vec<[u8; 32]>,
    pub actions: Vec<[u8; 32]>,
}

/// One shard's blob store.
pub struct Store {
    root: PathBuf,
    /// Where removals are reported, once someone listens ([`Store::report_removals`]).
    removals: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Removed>>,
    /// Removals reported so far.
    reported: AtomicU64,
    active: Mutex<ActivePack>,
    /// Held by the one eviction pass running at a time.
    eviction: Mutex<()>,
    /// Id of the active pack, readable without its lock.
    active_id: std::sync::atomic::AtomicU32,
    pack_size: u64,
    blobs: sled::Tree,
    ac: sled::Tree,
    /// Action-cache entry -> its last access tick.
    ac_used: sled::Tree,
    /// The action cache's share of the capacity, in millionths.
    action_share_ppm: AtomicU64,
    /// Namespace -> instance name, for tools that walk the store (the reindexer).
    instances: sled::Tree,
    known_instances: Mutex<std::collections::HashSet<u64>>,
    /// Blobs committed here and not yet written to the store behind (key -> size).
    behind_pending: sled::Tree,
    behind: std::sync::OnceLock<Behind>,
    /// What was used since it was last recorded behind, and when that was.
    used: Mutex<(HashSet<Used>, Instant)>,
    db: sled::Db,
    index: Mutex<Index>,
    uploads: Mutex<HashMap<UploadKey, Arc<Session>>>,
    capacity: u64,
    fsync: bool,
    /// Re-hash what reads serve (see [`Entry::verified`]). On unless a benchmark turns it off.
    verify_reads: std::sync::atomic::AtomicBool,
    /// Bytes the disk must keep free after a write.
    min_free_bytes: u64,
    tick: AtomicU64,
    flushed_tick: AtomicU64,
    tmp_seq: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// A read pin: while it lives, its blob is not evicted.
pub struct Pin<'a> {
    store: &'a Store,
    key: Key,
    size: u64,
    pack: u32,
    offset: u64,
}

impl Pin<'_> {
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.store.index.lock().map.get_mut(&self.key) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

impl Store {
    /// Opens (or creates) a store at `root`, loading the index and dropping entries whose files
    /// are missing or shorter than recorded (for example after a power cut without fsync).
    pub fn open(root: &Path, capacity: u64, fsync: bool) -> Result<Store, StoreError> {
        for dir in ["blobs", "tmp", "uploads", "packs"] {
            fs::create_dir_all(root.join(dir))
                .map_err(io_err(format!("create {}", root.join(dir).display())))?;
        }
        // Leftover small-blob temp files belong to writes that never finished.
        if let Ok(rd) = fs::read_dir(root.join("tmp")) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        // Uploads nobody resumed within the idle time are abandoned; younger ones may still be.
        remove_stale_uploads(&root.join("uploads"), UPLOAD_IDLE, &HashSet::new());
        let db = open_meta(&root.join("meta"))?;
        let blobs = db.open_tree("blobs")?;
        let ac = db.open_tree("ac")?;
        let ac_used = db.open_tree("ac_used")?;
        let instances = db.open_tree("instances")?;
        let behind_pending = db.open_tree("behind_pending")?;
        let clean = fs::remove_file(root.join(CLEAN_MARKER)).is_ok();
        let store = Store {
            root: root.to_path_buf(),
            removals: std::sync::OnceLock::new(),
            reported: AtomicU64::new(0),
            // Replaced right after the index is loaded, when the next pack id is known.
            active: Mutex::new(ActivePack {
                id: 0,
                file: File::open(root).map_err(io_err("open data dir"))?,
                len: 0,
            }),
            pack_size: (capacity / 16).clamp(1, PACK_SIZE),
            eviction: Mutex::new(()),
            active_id: std::sync::atomic::AtomicU32::new(0),
            blobs,
            ac,
            ac_used,
            action_share_ppm: AtomicU64::new((DEFAULT_ACTION_CACHE_SHARE * 1e6) as u64),
            instances,
            known_instances: Mutex::new(Default::default()),
            behind_pending,
            behind: std::sync::OnceLock::new(),
            used: Mutex::new((HashSet::new(), Instant::now())),
            db,
            index: Mutex::new(Index::default()),
            uploads: Mutex::new(HashMap::new()),
            capacity,
            fsync,
            verify_reads: std::sync::atomic::AtomicBool::new(true),
            min_free_bytes: MIN_FREE_BYTES.min(capacity / 4),
            tick: AtomicU64::new(1),
            flushed_tick: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        store.load_index(clean)?;
        let next = store
            .index
            .lock()
            .packs
            .keys()
            .next_back()
            .map_or(1, |id| id + 1);
        *store.active.lock() = store.new_pack(next)?;
        store.active_id.store(next, Ordering::Release);
        Ok(store)
    }

    fn load_index(&self, clean: bool) -> Result<(), StoreError> {
        let mut idx = self.index.lock();
        let mut max_tick = 0;
        let mut dropped = 0u64;
        // Pack ids on disk and their lengths.
        let mut pack_lens: HashMap<u32, u64> = HashMap::new();
        if let Ok(rd) = fs::read_dir(self.root.join("packs")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name
                    .strip_suffix(".pack")
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                {
                    pack_lens.insert(id, e.metadata().map(|m| m.len()).unwrap_or(0));
                }
            }
        }
        let mut recent: Vec<(Key, Entry)> = Vec::new();
        let newest_mtime = newest_mtime(&self.root);
        for item in self.blobs.iter() {
            let (k, v) = item?;
            let (Some(key), Some(mut entry)) = (Key::from_bytes(&k), decode_meta(&v)) else {
                self.blobs.remove(k)?;
                dropped += 1;
                continue;
            };
            let ok = if entry.pack == 0 {
                match fs::metadata(self.blob_path(&key)) {
                    Ok(m) if m.len() == entry.size => {
                        if !clean && is_recent(&m, newest_mtime) {
                            recent.push((key, entry));
                        }
                        true
                    }
                    _ => false,
                }
            } else {
                pack_lens
                    .get(&entry.pack)
                    .is_some_and(|len| entry.offset + entry.size <= *len)
            };
            if !ok {
                self.blobs.remove(k)?;
                dropped += 1;
                continue;
            }
            max_tick = max_tick.max(entry.tick);
            idx.used += entry.size;
            entry.pins = 0;
            if entry.pack != 0 {
                let meta = idx.packs.entry(entry.pack).or_default();
                meta.keys.push(key);
                meta.sealed_tick = Some(meta.sealed_tick.unwrap_or(0).max(entry.tick));
                if !clean && self.pack_is_recent(entry.pack, newest_mtime) {
                    recent.push((key, entry));
                }
            }
            idx.map.insert(key, entry);
        }
        // Packs nothing points to are garbage (a crash between the append and the metadata).
        for id in pack_lens.keys() {
            if !idx.packs.contains_key(id) {
                let _ = fs::remove_file(self.pack_path(*id));
            }
        }
        // After an unclean stop, blobs written in the last moments may have reached the disk only
        // partly (without fsync): check them against their digests.
        let mut corrupt = 0;
        for (key, entry) in recent {
            if !self.verify_entry(&key, &entry) {
                if let Some(e) = idx.map.remove(&key) {
                    idx.used -= e.size;
                }
                self.blobs.remove(&key.bytes()[..])?;
                corrupt += 1;
            }
        }
        max_tick = max_tick.max(self.load_actions(&mut idx)?);
        self.tick.store(max_tick + 1, Ordering::Relaxed);
        self.flushed_tick.store(max_tick, Ordering::Relaxed);
        if dropped + corrupt > 0 {
            tracing::warn!(
                dropped,
                corrupt,
                "Dropped index entries whose blobs were missing, short or corrupt"
            );
        }
        tracing::info!(
            blobs = idx.map.len(),
            used_bytes = idx.used,
            packs = idx.packs.len(),
            actions = idx.actions.len(),
            clean,
            "Loaded the blob index"
        );
        Ok(())
    }

    fn pack_path(&self, id: u32) -> PathBuf {
        self.root.join("packs").join(format!("{id:08x}.pack"))
    }

    fn pack_is_recent(&self, id: u32, newest: Option<std::time::SystemTime>) -> bool {
        fs::metadata(self.pack_path(id))
            .map(|m| is_recent(&m, newest))
            .unwrap_or(true)
    }

    /// Reports every blob and action-cache entry this store drops from now on to `tx`, right
    /// after it is out of the index (so before any later read could miss it). Set once.
    pub fn report_removals(&self, tx: tokio::sync::mpsc::UnboundedSender<Removed>) {
        let _ = self.removals.set(tx);
    }

    fn removed(&self, blobs: impl IntoIterator<Item = [u8; 32]>, actions: Vec<[u8; 32]>) {
        if let Some(tx) = self.removals.get() {
            let blobs: Vec<_> = blobs.into_iter().collect();
            if !blobs.is_empty() || !actions.is_empty() {
                let _ = tx.send(Removed { blobs, actions });
                self.reported.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Removals reported so far (each one [`Removed`] sent).
    pub fn removals_reported(&self) -> u64 {
        self.reported.load(Ordering::Acquire)
    }

    fn new_pack(&self, id: u32) -> Result<ActivePack, StoreError> {
        let path = self.pack_path(id);
        // Written at explicit offsets, never in append mode: a failed write must not move where
        // the next one lands.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("create {}", path.display())))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.index.lock().packs.entry(id).or_default();
        Ok(ActivePack { id, file, len })
    }

    /// Appends blobs to the active pack in one write at the pack's recorded end; returns each
    /// blob's `(pack, offset)`. A write that fails (a full disk, say) is cut back off, and the
    /// recorded end does not move, so the next append lands where this one would have and no
    /// offset ever points into a partial record.
    fn append_to_pack(&self, blobs: &[&[u8]]) -> Result<Vec<(u32, u64)>, StoreError> {
        use std::os::unix::fs::FileExt;
        let mut active = self.active.lock();
        let mut buf = Vec::with_capacity(blobs.iter().map(|b| b.len()).sum());
        let mut locs = Vec::with_capacity(blobs.len());
        for b in blobs {
            locs.push((active.id, active.len + buf.len() as u64));
            buf.extend_from_slice(b);
        }
        let written = active.file.write_all_at(&buf, active.len).and_then(|()| {
            if self.fsync {
                active.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            let _ = active.file.set_len(active.len);
            return Err(io_err("append to pack")(e));
        }
        active.len += buf.len() as u64;
        if active.len >= self.pack_size {
            let sealed = active.id;
            *active = self.new_pack(sealed + 1)?;
            self.active_id.store(active.id, Ordering::Release);
            let tick = self.next_tick();
            if let Some(m) = self.index.lock().packs.get_mut(&sealed) {
                m.sealed_tick = Some(tick);
            }
        }
        Ok(locs)
    }

    /// Makes stored blobs visible: metadata in sled (see `put_meta`), then the index.
    fn commit_entries(
        &self,
        items: &[(Key, u64, u32, u64)],
        reserved: u64,
        origin: Origin,
    ) -> Result<(), StoreError> {
        let tick = self.next_tick();
        let entries: Vec<(Key, Entry)> = items
            .iter()
            .map(|&(key, size, pack, offset)| {
                let e = Entry {
                    size,
                    tick,
                    pins: 0,
                    pack,
                    offset,
                    verified: 0,
                };
                (key, e)
            })
            .collect();
        // Pending before visible: a crash in between leaves the write behind still to do.
        if origin == Origin::Client && self.behind.get().is_some() {
            let pending = items.iter().try_for_each(|(k, size, ..)| {
                self.behind_pending
                    .insert(&k.bytes()[..], &size.to_be_bytes()[..])
                    .map(|_| ())
            });
            if let Err(e) = pending {
                self.unreserve(reserved);
                return Err(e.into());
            }
        }
        let applied = put_meta(&self.blobs, entries.iter().map(|(k, e)| (k, Some(e))));
        let mut idx = self.index.lock();
        idx.reserved = idx.reserved.saturating_sub(reserved);
        applied?;
        let active = self.active_id.load(Ordering::Acquire);
        for (key, e) in entries {
            if e.pack != 0 {
                let meta = idx.packs.entry(e.pack).or_default();
                meta.keys.push(key);
                // A pack that filled up while these were being written is sealed after them, so
                // that "used since the pack was sealed" means used after being written.
                if e.pack != active {
                    meta.sealed_tick = Some(meta.sealed_tick.unwrap_or(0).max(tick));
                }
            }
            if let Some(old) = idx.map.insert(key, e) {
                idx.used -= old.size;
            }
            idx.used += e.size;
        }
        drop(idx);
        metrics::counter!(crate::metric_names::CAS_SHARD_BLOBS_WRITTEN_TOTAL)
            .increment(items.len() as u64);
        let behind = match (origin, self.behind.get()) {
            (Origin::Client, Some(b)) if b.through => {
                self.write_behind(items.iter().map(|i| (i.0, i.1)))
            }
            _ => Ok(()),
        };
        self.evict_if_needed();
        behind
    }

    fn blob_path(&self, key: &Key) -> PathBuf {
        let fname = DigestFunction::from_tag(key.function)
            .map(|f| f.name())
            .unwrap_or("unknown");
        let hex = hex_of(&key.hash);
        self.root
            .join("blobs")
            .join(format!("{:016x}", key.ns))
            .join(fname)
            .join(&hex[..2])
            .join(hex)
    }

    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }

    /// Statistics for heartbeats and metrics.
    pub fn stats(&self) -> StoreStats {
        let idx = self.index.lock();
        StoreStats {
            capacity_bytes: self.capacity,
            used_bytes: idx.used,
            reserved_bytes: idx.reserved,
            blob_count: idx.map.len() as u64,
            action_count: idx.actions.len() as u64,
            action_bytes: idx.action_bytes,
            action_capacity_bytes: self.action_cache_capacity(),
        }
    }

    /// Indices of the digests this store does not hold; present ones count as accessed.
    pub fn find_missing(&self, ns: u64, digests: &[BlobDigest]) -> Vec<u32> {
        let tick = self.next_tick();
        let mut idx = self.index.lock();
        let mut missing = Vec::new();
        for (i, d) in digests.iter().enumerate() {
            if d.size == 0 && d.is_empty_blob() {
                continue; // the empty blob is always present
            }
            match idx.map.get_mut(&Key::new(ns, d)) {
                Some(e) if e.size == d.size => e.tick = tick,
                _ => missing.push(i as u32),
            }
        }
        missing
    }

    /// True when the blob is stored.
    pub fn contains(&self, ns: u64, d: &BlobDigest) -> bool {
        self.find_missing(ns, std::slice::from_ref(d)).is_empty()
    }

    /// Pins a blob for reading.
    pub fn pin(&self, ns: u64, d: &BlobDigest) -> Result<Pin<'_>, StoreError> {
        let key = Key::new(ns, d);
        let tick = self.next_tick();
        let mut idx = self.index.lock();
        match idx.map.get_mut(&key) {
            Some(e) if e.size == d.size => {
                e.pins += 1;
                e.tick = tick;
                Ok(Pin {
                    store: self,
                    key,
                    size: e.size,
                    pack: e.pack,
                    offset: e.offset,
                })
            }
            _ => Err(StoreError::NotFound(*d)),
        }
    }

    /// Opens a pinned blob for reading from `offset`; returns the file and the bytes to read.
    pub fn open_read(
        &self,
        ns: u64,
        d: &BlobDigest,
        offset: u64,
        limit: u64,
    ) -> Result<(File, u64, Pin<'_>), StoreError> {
        if d.is_empty_blob() {
            return Err(StoreError::Invalid("the empty blob has no file".into()));
        }
        // A pack can be deleted between the pin and the open when its blob was just copied
        // forward by eviction; the second pin sees the new location.
        let mut attempt = 0;
        let (mut file, pin) = loop {
            let pin = self.pin(ns, d)?;
            if offset > pin.size {
                return Err(StoreError::Invalid(format!(
                    "read offset {offset} is past the end of {d}"
                )));
            }
            let path = if pin.pack == 0 {
                self.blob_path(&pin.key)
            } else {
                self.pack_path(pin.pack)
            };
            match File::open(path) {
                Ok(f) => break (f, pin),
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 3 => attempt += 1,
                Err(e) => return Err(io_err(format!("open {d}"))(e)),
            }
        };
        self.check_read(&pin, d, &file)?;
        let start = pin.offset + offset;
        if start > 0 {
            use std::io::Seek;
            file.seek(io::SeekFrom::Start(start))
                .map_err(io_err(format!("seek {d}")))?;
        }
        let rest = pin.size - offset;
        let len = if limit == 0 { rest } else { rest.min(limit) };
        Ok((file, len, pin))
    }

    /// Reads `limit` bytes (0 = all) of a blob from `offset`.
    pub fn read(
        &self,
        ns: u64,
        d: &BlobDigest,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<u8>, StoreError> {
        if d.is_empty_blob() {
            return if offset == 0 {
                Ok(Vec::new())
            } else {
                Err(StoreError::Invalid(format!(
                    "read offset {offset} is past the end of {d}"
                )))
            };
        }
        let (file, len, _pin) = self.open_read(ns, d, offset, limit)?;
        let mut buf = Vec::with_capacity(len as usize);
        file.take(len)
            .read_to_end(&mut buf)
            .map_err(io_err(format!("read {d}")))?;
        if buf.len() as u64 != len {
            return Err(StoreError::Io {
                context: format!("read {d}"),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file is shorter than its digest",
                ),
            });
        }
        Ok(buf)
    }

    /// The namespace of `instance`, remembering the name so that [`Store::list`] can report it.
    /// Every write path goes through here.
    pub fn namespace_of(&self, instance: &str) -> u64 {
        let ns = namespace(instance);
        if self.known_instances.lock().insert(ns) {
            let _ = self.instances.insert(ns.to_be_bytes(), instance.as_bytes());
            if let Some(b) = self.behind.get()
                && let Err(error) = b.store.name_instance(ns, instance)
            {
                tracing::warn!(%error, "Cannot record an instance's name in the object store");
            }
        }
        ns
    }

    /// Up to `limit` stored blobs after `cursor` (empty = from the start), in key order, with
    /// their instance names; and the cursor of the next page, if any.
    #[allow(clippy::type_complexity)]
    pub fn list(
        &self,
        cursor: &[u8],
        limit: usize,
    ) -> Result<(Vec<(String, BlobDigest)>, Option<Vec<u8>>), StoreError> {
        use std::ops::Bound;
        let mut out = Vec::new();
        let mut last = None;
        let mut names: HashMap<u64, String> = HashMap::new();
        let start = if cursor.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(cursor.to_vec())
        };
        for item in self.blobs.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = item?;
            last = Some(k.to_vec());
            let (Some(key), Some(e)) = (Key::from_bytes(&k), decode_meta(&v)) else {
                continue;
            };
            let Some(function) = DigestFunction::from_tag(key.function) else {
                continue;
            };
            let name = match names.get(&key.ns) {
                Some(n) => n.clone(),
                None => {
                    let n = self
                        .instances
                        .get(key.ns.to_be_bytes())?
                        .map(|v| String::from_utf8_lossy(&v).into_owned());
                    let Some(n) = n else { continue };
                    names.insert(key.ns, n.clone());
                    n
                }
            };
            out.push((
                name,
                BlobDigest {
                    function,
                    hash: key.hash,
                    size: e.size,
                },
            ));
            if out.len() >= limit {
                break;
            }
        }
        let next = if out.len() >= limit { last } else { None };
        Ok((out, next))
    }

    /// Verifies and stores one small blob.
    pub fn put(&self, ns: u64, d: &BlobDigest, data: &[u8]) -> Result<(), StoreError> {
        verify(d, data)?;
        self.put_verified(ns, d, data)
    }

    /// Verifies and stores a batch; one result per blob. Small blobs are appended to the active
    /// pack in one write and become visible together.
    pub fn put_batch(&self, ns: u64, blobs: &[(BlobDigest, &[u8])]) -> Vec<Result<(), StoreError>> {
        let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(blobs.len());
        let mut packed: Vec<(usize, Key, &[u8])> = Vec::new();
        let mut seen = HashSet::new();
        for (i, (d, data)) in blobs.iter().enumerate() {
            let r = verify(d, data);
            if r.is_ok() && !d.is_empty_blob() && !self.contains(ns, d) {
                let key = Key::new(ns, d);
                if d.size <= PACK_THRESHOLD {
                    if seen.insert(key) {
                        packed.push((i, key, data));
                    }
                } else {
                    results.push(self.put_verified(ns, d, data));
                    continue;
                }
            }
            results.push(r);
        }
        if !packed.is_empty() {
            let total: u64 = packed.iter().map(|(_, _, b)| b.len() as u64).sum();
            let stored = self.reserve(total).and_then(|()| {
                let data: Vec<&[u8]> = packed.iter().map(|(_, _, b)| *b).collect();
                let locs = self.append_to_pack(&data);
                if locs.is_err() {
                    self.unreserve(total);
                }
                let items: Vec<_> = packed
                    .iter()
                    .zip(locs?)
                    .map(|((_, key, b), (pack, offset))| (*key, b.len() as u64, pack, offset))
                    .collect();
                self.commit_entries(&items, total, Origin::Client)
            });
            if let Err(e) = stored {
                let e = WireError::from(e);
                for (i, _, _) in &packed {
                    results[*i] = Err(StoreError::Io {
                        context: "store batch".into(),
                        source: io::Error::other(e.message.clone()),
                    });
                }
            }
        }
        results
    }

    fn put_verified(&self, ns: u64, d: &BlobDigest, data: &[u8]) -> Result<(), StoreError> {
        self.put_verified_from(ns, d, data, Origin::Client)
    }

    fn put_verified_from(
        &self,
        ns: u64,
        d: &BlobDigest,
        data: &[u8],
        origin: Origin,
    ) -> Result<(), StoreError> {
        if d.is_empty_blob() || self.contains(ns, d) {
            return Ok(());
        }
        let key = Key::new(ns, d);
        self.reserve(d.size)?;
        let stored = if d.size <= PACK_THRESHOLD {
            self.append_to_pack(&[data]).map(|locs| locs[0])
        } else {
            self.write_file(&key, data).map(|()| (0, 0))
        };
        match stored {
            Ok((pack, offset)) => {
                self.commit_entries(&[(key, d.size, pack, offset)], d.size, origin)?;
                if pack == 0 {
                    self.mark_verified(&key);
                }
                Ok(())
            }
            Err(e) => {
                self.unreserve(d.size);
                Err(e)
            }
        }
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    fn write_file(&self, key: &Key, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_path();
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            if self.fsync {
                f.sync_data()?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write blob")(e));
        }
        self.rename_into_place(&tmp, key)
    }

    fn rename_into_place(&self, from: &Path, key: &Key) -> Result<(), StoreError> {
        let dest = self.blob_path(key);
        // An eviction of the same key may still be deleting the old file.
        let start = Instant::now();
        while self.index.lock().evicting.contains(key) {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(StoreError::Busy("blob is being evicted".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = fs::rename(from, &dest).or_else(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                fs::create_dir_all(dest.parent().expect("blob path has a parent"))?;
                fs::rename(from, &dest)
            } else {
                Err(e)
            }
        });
        r.map_err(|e| {
            let _ = fs::remove_file(from);
            io_err("rename blob into place")(e)
        })
    }

    /// Writes access ticks changed since the last flush to sled, so LRU order survives restarts.
    pub fn flush_access_times(&self) -> Result<(), StoreError> {
        let since = self.flushed_tick.load(Ordering::Relaxed);
        let now = self.tick.load(Ordering::Relaxed);
        let changed: Vec<(Key, Entry)> = {
            let idx = self.index.lock();
            idx.map
                .iter()
                .filter(|(_, e)| e.tick > since)
                .map(|(k, e)| (*k, *e))
                .collect()
        };
        put_meta(&self.blobs, changed.iter().map(|(k, e)| (k, Some(e))))?;
        self.flush_action_ticks(since)?;
        self.flushed_tick.store(now, Ordering::Relaxed);
        Ok(())
    }

    /// Flushes metadata to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_access_times()?;
        self.db.flush()?;
        Ok(())
    }

    /// Flushes everything and records a clean stop, so the next start skips re-verifying the
    /// most recent writes.
    pub fn close(&self) -> Result<(), StoreError> {
        self.active
            .lock()
            .file
            .sync_all()
            .map_err(io_err("sync pack"))?;
        self.flush()?;
        File::create(self.root.join(CLEAN_MARKER)).map_err(io_err("write clean marker"))?;
        Ok(())
    }

    // ---- resumable uploads ----
}

/// Free disk a shard keeps beside its capacity (a quarter of the capacity on smaller shards).
const MIN_FREE_BYTES: u64 = 256 << 20;

/// The clean-shutdown marker: present only between a clean stop and the next start.
const CLEAN_MARKER: &str = "clean-shutdown";

/// Data younger than the kernel's dirty write-back (30 s) before the newest write may not have
/// reached the disk when a machine lost power.
const WRITEBACK_WINDOW: Duration = Duration::from_secs(60);

/// About when the store last wrote anything: sled rewrites its files every second, so the
/// newest modification under `meta/` and `packs/` is close to the moment of a crash.
fn newest_mtime(root: &Path) -> Option<std::time::SystemTime> {
    ["meta", "packs"]
        .iter()
        .filter_map(|d| fs::read_dir(root.join(d)).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
}

fn is_recent(m: &fs::Metadata, newest: Option<std::time::SystemTime>) -> bool {
    match (m.modified(), newest) {
        (Ok(t), Some(n)) => n
            .duration_since(t)
            .map(|d| d < WRITEBACK_WINDOW)
            .unwrap_or(true),
        _ => true,
    }
}

fn hex_of(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}
