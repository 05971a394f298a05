//! The blob store of one shard: blob bodies in content-addressed files, metadata in sled, an
//! in-memory index for lookups, and size-bounded LRU eviction.
//!
//! On disk, under the shard's data dir:
//! ```text
//! packs/<id:08x>.pack                                  small blobs (<= 1 MiB), appended back to back
//! blobs/<namespace:016x>/<function>/<hh>/<hash hex>   one file per large blob, immutable once renamed
//! tmp/                                                 large-blob writes before their rename
//! uploads/<upload key hash>                            resumable uploads
//! meta/                                                sled: `blobs` (key -> size, tick, location), `ac`
//! ```
//! A namespace is an instance name (hashed): instance names isolate caches.
//!
//! Small blobs go into append-only pack files because a file per blob costs a create, a write and
//! a rename (about 0.5 ms each on the VM disks measured here, so 2k blobs/s at best), while an
//! append of a whole batch costs one write. Eviction drops whole packs, oldest first, after copying
//! forward the blobs in them that were used since the pack filled up; large blobs are evicted one
//! by one. Both are ordered by the same access ticks, so the store stays least-recently-used. See
//! `docs/adr/0003-blob-storage.md`.
//!
//! Invariants:
//! - A blob is in the index only after its file is complete, verified and renamed into place.
//! - A pinned blob (being read) is never evicted; an upload in flight is not in the index at all,
//!   so it cannot be evicted, but its size is reserved against the capacity.
//! - Every API here is synchronous (blocking file I/O); async callers use `spawn_blocking`.

use motorpool_messages::{BlobDigest, DigestFunction, ErrorCode, Hasher, WireError};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Invalid(_) => ErrorCode::InvalidArgument,
            StoreError::Busy(_) => ErrorCode::Unavailable,
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

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    ns: u64,
    function: u8,
    hash: [u8; 32],
}

impl Key {
    fn new(ns: u64, d: &BlobDigest) -> Key {
        Key {
            ns,
            function: d.function.tag(),
            hash: d.hash,
        }
    }

    fn bytes(&self) -> [u8; 41] {
        let mut k = [0u8; 41];
        k[..8].copy_from_slice(&self.ns.to_be_bytes());
        k[8] = self.function;
        k[9..].copy_from_slice(&self.hash);
        k
    }

    fn from_bytes(b: &[u8]) -> Option<Key> {
        if b.len() != 41 {
            return None;
        }
        Some(Key {
            ns: u64::from_be_bytes(b[..8].try_into().ok()?),
            function: b[8],
            hash: b[9..].try_into().ok()?,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    size: u64,
    tick: u64,
    pins: u32,
    /// Pack id (0 = the blob has its own file) and offset in the pack.
    pack: u32,
    offset: u64,
}

/// A pack file known to the index.
#[derive(Debug, Default)]
struct PackMeta {
    /// The access tick when the pack filled up; `None` while it is the active pack.
    sealed_tick: Option<u64>,
    /// Keys written into this pack (some may since have moved or gone; check `Entry::pack`).
    keys: Vec<Key>,
}

#[derive(Default)]
struct Index {
    /// Keyed by digest; foldhash (seeded per process) instead of SipHash: FindMissingBlobs looks up
    /// a hundred thousand keys per call.
    map: HashMap<Key, Entry, foldhash::fast::RandomState>,
    used: u64,
    reserved: u64,
    /// Keys whose files are being deleted by eviction; a writer of the same key waits.
    evicting: HashSet<Key>,
    packs: std::collections::BTreeMap<u32, PackMeta>,
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

/// A resumable upload of one large blob.
struct Upload {
    path: PathBuf,
    file: File,
    hasher: Hasher,
    committed: u64,
    touched: Instant,
}

type UploadKey = (u64, BlobDigest, String);

/// An upload session: the state behind a lock held by the one stream writing it, and the
/// committed offset readable without that lock (QueryWriteStatus must not wait for the stream).
struct Session {
    state: Arc<Mutex<Upload>>,
    committed: AtomicU64,
}

/// Store statistics, reported in heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub reserved_bytes: u64,
    pub blob_count: u64,
}

/// One shard's blob store.
pub struct Store {
    root: PathBuf,
    active: Mutex<ActivePack>,
    /// Held by the one eviction pass running at a time.
    eviction: Mutex<()>,
    /// Id of the active pack, readable without its lock.
    active_id: std::sync::atomic::AtomicU32,
    pack_size: u64,
    blobs: sled::Tree,
    ac: sled::Tree,
    /// Namespace -> instance name, for tools that walk the store (the reindexer).
    instances: sled::Tree,
    known_instances: Mutex<std::collections::HashSet<u64>>,
    db: sled::Db,
    index: Mutex<Index>,
    uploads: Mutex<HashMap<UploadKey, Arc<Session>>>,
    capacity: u64,
    fsync: bool,
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

/// Eviction starts above the capacity and frees down to this fraction of it.
const LOW_WATERMARK: f64 = 0.9;

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
        let db = sled::Config::new()
            .path(root.join("meta"))
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(Some(1000))
            .open()?;
        let blobs = db.open_tree("blobs")?;
        let ac = db.open_tree("ac")?;
        let instances = db.open_tree("instances")?;
        let clean = fs::remove_file(root.join(CLEAN_MARKER)).is_ok();
        let store = Store {
            root: root.to_path_buf(),
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
            instances,
            known_instances: Mutex::new(Default::default()),
            db,
            index: Mutex::new(Index::default()),
            uploads: Mutex::new(HashMap::new()),
            capacity,
            fsync,
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

    /// Re-hashes a stored blob.
    fn verify_entry(&self, key: &Key, e: &Entry) -> bool {
        let Some(function) = DigestFunction::from_tag(key.function) else {
            return false;
        };
        let path = if e.pack == 0 {
            self.blob_path(key)
        } else {
            self.pack_path(e.pack)
        };
        let mut buf = vec![0u8; e.size as usize];
        let read = File::open(&path).and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut buf, e.offset)
        });
        read.is_ok() && function.digest_of(&buf).hash == key.hash
    }

    fn new_pack(&self, id: u32) -> Result<ActivePack, StoreError> {
        let path = self.pack_path(id);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(format!("create {}", path.display())))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.index.lock().packs.entry(id).or_default();
        Ok(ActivePack { id, file, len })
    }

    /// Appends blobs to the active pack in one write; returns each blob's `(pack, offset)`.
    fn append_to_pack(&self, blobs: &[&[u8]]) -> Result<Vec<(u32, u64)>, StoreError> {
        let mut active = self.active.lock();
        let mut buf = Vec::with_capacity(blobs.iter().map(|b| b.len()).sum());
        let mut locs = Vec::with_capacity(blobs.len());
        for b in blobs {
            locs.push((active.id, active.len + buf.len() as u64));
            buf.extend_from_slice(b);
        }
        active
            .file
            .write_all(&buf)
            .map_err(io_err("append to pack"))?;
        if self.fsync {
            active.file.sync_data().map_err(io_err("fsync pack"))?;
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
                };
                (key, e)
            })
            .collect();
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
        metrics::counter!("motorpool_cas_shard_blobs_written_total").increment(items.len() as u64);
        self.evict_if_needed();
        Ok(())
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
                self.commit_entries(&items, total)
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
            Ok((pack, offset)) => self.commit_entries(&[(key, d.size, pack, offset)], d.size),
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

    fn reserve(&self, size: u64) -> Result<(), StoreError> {
        if size > self.capacity {
            return Err(StoreError::Full(format!(
                "blob of {size} bytes exceeds the shard capacity of {} bytes",
                self.capacity
            )));
        }
        self.index.lock().reserved += size;
        self.evict_if_needed();
        Ok(())
    }

    fn unreserve(&self, size: u64) {
        let mut idx = self.index.lock();
        idx.reserved = idx.reserved.saturating_sub(size);
    }

    /// Evicts least-recently-used blobs until used + reserved is under the low watermark.
    ///
    /// Candidates are large blobs (by their last access) and sealed packs (by the tick at which
    /// they filled up), oldest first. A pack's blobs that were used after it filled up are copied
    /// forward into the active pack before the pack is deleted; pinned blobs and packs holding
    /// them are skipped.
    pub fn evict_if_needed(&self) {
        let _one_at_a_time = self.eviction.lock();
        let active = self.active_id.load(Ordering::Acquire);
        let (files, packs) = {
            let mut idx = self.index.lock();
            if idx.used + idx.reserved <= self.capacity {
                return;
            }
            let target = (self.capacity as f64 * LOW_WATERMARK) as u64;
            let mut over = (idx.used + idx.reserved).saturating_sub(target);
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
            let mut victim_files = Vec::new();
            let mut victim_packs = Vec::new();
            while over > 0 {
                let take_pack = match (packs.last(), files.last()) {
                    (Some(p), Some(f)) => p.0 <= f.0,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                if take_pack {
                    let (sealed_tick, id) = packs.pop().expect("a pack");
                    let meta = idx
                        .packs
                        .get(&id)
                        .map(|m| m.keys.clone())
                        .unwrap_or_default();
                    let live: Vec<(Key, Entry)> = meta
                        .iter()
                        .filter_map(|k| idx.map.get(k).filter(|e| e.pack == id).map(|e| (*k, *e)))
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
                } else {
                    let (_, key, size) = files.pop().expect("a file");
                    idx.map.remove(&key);
                    idx.used -= size;
                    idx.evicting.insert(key);
                    over = over.saturating_sub(size);
                    victim_files.push(key);
                }
            }
            (victim_files, victim_packs)
        };
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
                let mut idx = self.index.lock();
                for (k, _) in &keep {
                    if let Some(e) = idx.map.get(k).filter(|e| e.pack == id).copied() {
                        idx.map.remove(k);
                        idx.used -= e.size;
                        dropped.push(*k);
                    }
                }
            }
            evicted += dropped.len() as u64;
            let _ = put_meta(&self.blobs, dropped.iter().map(|k| (k, None)));
            let _ = fs::remove_file(self.pack_path(id));
        }
        metrics::counter!("motorpool_cas_shard_evictions_total").increment(evicted);
        if evicted > 0 {
            tracing::debug!(evicted, "Evicted least-recently-used blobs");
        }
    }

    /// Rewrites blobs of pack `id` into the active pack and points the index at the copies.
    fn copy_forward(&self, id: u32, keep: &[(Key, Entry)]) -> Result<(), StoreError> {
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

    fn upload_path(&self, ns: u64, d: &BlobDigest, upload_id: &str) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(&ns.to_be_bytes());
        h.update(&[d.function.tag()]);
        h.update(&d.hash);
        h.update(&d.size.to_be_bytes());
        h.update(upload_id.as_bytes());
        self.root
            .join("uploads")
            .join(h.finalize().to_hex().as_str())
    }

    /// Status of an upload: `(committed, complete)`.
    pub fn upload_status(&self, ns: u64, d: &BlobDigest, upload_id: &str) -> (u64, bool) {
        if d.is_empty_blob() || self.contains(ns, d) {
            return (d.size, true);
        }
        let key = (ns, *d, upload_id.to_string());
        if let Some(u) = self.uploads.lock().get(&key) {
            return (u.committed.load(Ordering::Acquire), false);
        }
        // An upload interrupted before a restart is still on disk.
        let len = fs::metadata(self.upload_path(ns, d, upload_id))
            .map(|m| m.len())
            .unwrap_or(0);
        (len.min(d.size), false)
    }

    /// Starts or resumes an upload at `offset`. Returns `None` when the blob is already stored.
    pub fn begin_upload(
        &self,
        ns: u64,
        d: &BlobDigest,
        upload_id: &str,
        offset: u64,
    ) -> Result<Option<UploadHandle<'_>>, StoreError> {
        if d.is_empty_blob() || self.contains(ns, d) {
            return Ok(None);
        }
        if d.size > self.capacity {
            return Err(StoreError::Full(format!(
                "blob of {} bytes exceeds the shard capacity of {} bytes",
                d.size, self.capacity
            )));
        }
        let key = (ns, *d, upload_id.to_string());
        let session = {
            let mut uploads = self.uploads.lock();
            match uploads.get(&key) {
                Some(s) => s.clone(),
                None => {
                    let path = self.upload_path(ns, d, upload_id);
                    let upload =
                        open_upload(&path, d).map_err(io_err(format!("open upload of {d}")))?;
                    let s = Arc::new(Session {
                        committed: AtomicU64::new(upload.committed),
                        state: Arc::new(Mutex::new(upload)),
                    });
                    uploads.insert(key.clone(), s.clone());
                    s
                }
            }
        };
        let Some(mut guard) = session.state.try_lock_arc_for(Duration::from_secs(5)) else {
            return Err(StoreError::Busy(format!(
                "another stream is writing upload {upload_id} of {d}"
            )));
        };
        if offset == 0 && guard.committed > 0 {
            guard.file.set_len(0).map_err(io_err("truncate upload"))?;
            use std::io::Seek;
            guard
                .file
                .seek(io::SeekFrom::Start(0))
                .map_err(io_err("seek upload"))?;
            guard.hasher = d.function.hasher();
            guard.committed = 0;
            session.committed.store(0, Ordering::Release);
        } else if offset != guard.committed {
            return Err(StoreError::Invalid(format!(
                "write offset {offset} does not match the {} bytes committed for {d}; resume at the offset QueryWriteStatus returns",
                guard.committed
            )));
        }
        guard.touched = Instant::now();
        Ok(Some(UploadHandle {
            store: self,
            ns,
            digest: *d,
            key,
            guard,
            session,
        }))
    }

    /// Drops upload sessions idle for longer than `idle`, and their files.
    pub fn expire_uploads(&self, idle: Duration) {
        let mut uploads = self.uploads.lock();
        uploads.retain(|_, s| match s.state.try_lock() {
            Some(u) if u.touched.elapsed() > idle => {
                let _ = fs::remove_file(&u.path);
                false
            }
            _ => true,
        });
    }

    // ---- action cache ----

    fn ac_key(ns: u64, action: &BlobDigest) -> Vec<u8> {
        let mut k = Key::new(ns, action).bytes().to_vec();
        k.extend_from_slice(&action.size.to_be_bytes());
        k
    }

    pub fn ac_get(&self, ns: u64, action: &BlobDigest) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.ac.get(Self::ac_key(ns, action))?.map(|v| v.to_vec()))
    }

    pub fn ac_put(&self, ns: u64, action: &BlobDigest, result: &[u8]) -> Result<(), StoreError> {
        self.ac.insert(Self::ac_key(ns, action), result)?;
        Ok(())
    }

    pub fn ac_delete(&self, ns: u64, action: &BlobDigest) -> Result<(), StoreError> {
        self.ac.remove(Self::ac_key(ns, action))?;
        Ok(())
    }
}

fn open_upload(path: &Path, d: &BlobDigest) -> io::Result<Upload> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // Resume after a restart: re-hash what is already there.
    let mut hasher = d.function.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut committed = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        committed += n as u64;
    }
    if committed < d.size && d.size >= 1 << 20 {
        // Reserve the blob's blocks up front (the file's length still counts what is written):
        // the page cache then takes each chunk without a delayed-allocation reservation per page.
        // Best effort: a file system without fallocate just allocates as it goes.
        let _ = nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            committed as i64,
            (d.size - committed) as i64,
        );
    }
    if committed > d.size {
        file.set_len(0)?;
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(0))?;
        hasher = d.function.hasher();
        committed = 0;
    }
    Ok(Upload {
        path: path.to_path_buf(),
        file,
        hasher,
        committed,
        touched: Instant::now(),
    })
}

/// Exclusive access to one upload session.
pub struct UploadHandle<'a> {
    store: &'a Store,
    ns: u64,
    digest: BlobDigest,
    key: UploadKey,
    guard: parking_lot::ArcMutexGuard<parking_lot::RawMutex, Upload>,
    session: Arc<Session>,
}

impl UploadHandle<'_> {
    /// Bytes committed so far.
    pub fn committed(&self) -> u64 {
        self.guard.committed
    }

    /// Appends a chunk. More data than the digest's size is an error.
    pub fn append(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let u = &mut *self.guard;
        if u.committed + data.len() as u64 > self.digest.size {
            return Err(StoreError::Invalid(format!(
                "upload of {} would grow to {} bytes, more than its digest's size",
                self.digest,
                u.committed + data.len() as u64
            )));
        }
        u.file.write_all(data).map_err(io_err("write upload"))?;
        u.hasher.update(data);
        u.committed += data.len() as u64;
        self.session.committed.store(u.committed, Ordering::Release);
        u.touched = Instant::now();
        Ok(())
    }

    /// Appends many chunks, hashing on a second thread while this one writes the file, so a
    /// large upload runs at the speed of the slower of the two rather than their sum. Each chunk,
    /// once hashed, goes to `recycle` (the hasher holds its last reference), so the caller can
    /// read the next chunks into buffers that are already allocated and faulted in.
    pub fn append_pipelined<I>(
        &mut self,
        chunks: I,
        recycle: &(dyn Fn(Vec<u8>) + Sync),
    ) -> Result<(), StoreError>
    where
        I: Iterator<Item = io::Result<Arc<Vec<u8>>>>,
    {
        let size = self.digest.size;
        let u = &mut *self.guard;
        // Two batches queued: enough to ride out either side's hiccups, few enough that the
        // hashing left after the last byte arrives (the client waits for it) stays short.
        // Eight cost about 3% of large-write throughput.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(2);
        let mut hasher = std::mem::replace(&mut u.hasher, self.digest.function.hasher());
        let committed = &self.session.committed;
        let result = std::thread::scope(|scope| {
            let hashing = scope.spawn(move || {
                for chunk in rx {
                    hasher.update(&chunk);
                    if let Ok(buf) = Arc::try_unwrap(chunk) {
                        recycle(buf);
                    }
                }
                hasher
            });
            // (error, whether the file and hasher may disagree so the upload must restart)
            let mut result = Ok(());
            for chunk in chunks {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        // The stream was cut: everything before this chunk is committed and
                        // the upload resumes from there.
                        result = Err((io_err("read upload stream")(e), false));
                        break;
                    }
                };
                if u.committed + chunk.len() as u64 > size {
                    result = Err((
                        StoreError::Invalid(format!(
                            "upload would grow to {} bytes, more than its digest's size {size}",
                            u.committed + chunk.len() as u64
                        )),
                        true,
                    ));
                    break;
                }
                if let Err(e) = u.file.write_all(&chunk) {
                    result = Err((io_err("write upload")(e), true));
                    break;
                }
                u.committed += chunk.len() as u64;
                committed.store(u.committed, Ordering::Release);
                if tx.send(chunk).is_err() {
                    break;
                }
            }
            drop(tx);
            (result, hashing.join().expect("hasher thread"))
        });
        let (result, hasher) = result;
        u.hasher = hasher;
        u.touched = Instant::now();
        match result {
            Ok(()) => Ok(()),
            Err((e, restart)) => {
                if restart {
                    let _ = u.file.set_len(0);
                    use std::io::Seek;
                    let _ = u.file.seek(io::SeekFrom::Start(0));
                    u.hasher = self.digest.function.hasher();
                    u.committed = 0;
                    committed.store(0, Ordering::Release);
                }
                Err(e)
            }
        }
    }

    /// Finishes the upload: the data must be exactly the digest's size and hash to it.
    /// On a mismatch the upload is discarded and nothing is stored.
    pub fn finish(mut self) -> Result<(), StoreError> {
        let d = self.digest;
        let u = &mut *self.guard;
        let outcome = if u.committed != d.size {
            Err(StoreError::Invalid(format!(
                "upload of {d} finished after {} of {} bytes",
                u.committed, d.size
            )))
        } else {
            let got = std::mem::replace(&mut u.hasher, d.function.hasher()).finish();
            if got.hash != d.hash {
                Err(StoreError::Invalid(format!(
                    "uploaded data hashes to {}, not {}",
                    got.hex(),
                    d.hex()
                )))
            } else {
                Ok(())
            }
        };
        let path = u.path.clone();
        self.store.uploads.lock().remove(&self.key);
        if let Err(e) = outcome {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        if self.store.contains(self.ns, &d) {
            let _ = fs::remove_file(&path);
            return Ok(());
        }
        let key = Key::new(self.ns, &d);
        if d.size <= PACK_THRESHOLD {
            // Small: into a pack like any small blob.
            let mut data = Vec::with_capacity(d.size as usize);
            use std::io::Seek;
            u.file
                .seek(io::SeekFrom::Start(0))
                .map_err(io_err("rewind upload"))?;
            u.file
                .read_to_end(&mut data)
                .map_err(io_err("read upload"))?;
            let _ = fs::remove_file(&path);
            return self.store.put_verified(self.ns, &d, &data);
        }
        if self.store.fsync {
            u.file.sync_data().map_err(io_err("fsync upload"))?;
        }
        self.store.reserve(d.size)?;
        let r = self
            .store
            .rename_into_place(&path, &key)
            .and_then(|()| self.store.commit_entries(&[(key, d.size, 0, 0)], d.size));
        if r.is_err() {
            self.store.unreserve(d.size);
        }
        r
    }
}

/// Checks `data` against its digest.
pub fn verify(d: &BlobDigest, data: &[u8]) -> Result<(), StoreError> {
    if data.len() as u64 != d.size {
        return Err(StoreError::Invalid(format!(
            "blob {d} has {} bytes, but its digest says {}",
            data.len(),
            d.size
        )));
    }
    let got = d.function.digest_of(data);
    if got.hash != d.hash {
        return Err(StoreError::Invalid(format!(
            "blob data hashes to {}, not {}",
            got.hex(),
            d.hex()
        )));
    }
    Ok(())
}

/// Writes (`Some`) or removes (`None`) blob metadata in sled, one key at a time.
///
/// Not `apply_batch`: sled 0.34 seals and writes its log buffer for every batch and wakes its
/// whole I/O thread pool to do it, about half a millisecond of CPU per batch at a build's pace
/// of a few puts at a time, while single-key writes share the buffer sled flushes once a
/// second. Nothing here needs a batch's all-or-nothing recovery: every key stands alone, and
/// opening the store checks each entry against its file or pack.
fn put_meta<'a>(
    tree: &sled::Tree,
    items: impl IntoIterator<Item = (&'a Key, Option<&'a Entry>)>,
) -> Result<(), StoreError> {
    for (key, entry) in items {
        match entry {
            Some(e) => tree.insert(&key.bytes()[..], &encode_meta(e)[..])?,
            None => tree.remove(&key.bytes()[..])?,
        };
    }
    Ok(())
}

/// Metadata of one blob in sled: size, access tick, pack id (0 = own file), offset in the pack.
fn encode_meta(e: &Entry) -> [u8; 28] {
    let mut v = [0u8; 28];
    v[..8].copy_from_slice(&e.size.to_le_bytes());
    v[8..16].copy_from_slice(&e.tick.to_le_bytes());
    v[16..20].copy_from_slice(&e.pack.to_le_bytes());
    v[20..].copy_from_slice(&e.offset.to_le_bytes());
    v
}

fn decode_meta(v: &[u8]) -> Option<Entry> {
    if v.len() != 28 {
        return None;
    }
    Some(Entry {
        size: u64::from_le_bytes(v[..8].try_into().ok()?),
        tick: u64::from_le_bytes(v[8..16].try_into().ok()?),
        pins: 0,
        pack: u32::from_le_bytes(v[16..20].try_into().ok()?),
        offset: u64::from_le_bytes(v[20..].try_into().ok()?),
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> BlobDigest {
        DigestFunction::Sha256.digest_of(data)
    }

    #[test]
    fn put_read_find_and_reject_bad_digests() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20, false).unwrap();
        let d = sha(b"hello");
        s.put(1, &d, b"hello").unwrap();
        assert_eq!(s.read(1, &d, 0, 0).unwrap(), b"hello");
        assert_eq!(s.read(1, &d, 1, 3).unwrap(), b"ell");
        // Namespaces are isolated.
        assert!(matches!(s.read(2, &d, 0, 0), Err(StoreError::NotFound(_))));
        let other = sha(b"other");
        assert_eq!(s.find_missing(1, &[d, other]), vec![1]);
        // Wrong hash and wrong size store nothing.
        assert!(matches!(
            s.put(1, &other, b"hello"),
            Err(StoreError::Invalid(_))
        ));
        let mut wrong_size = sha(b"abc");
        wrong_size.size = 4;
        assert!(matches!(
            s.put(1, &wrong_size, b"abc"),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(s.stats().blob_count, 1);
        // The empty blob is always there.
        let empty = sha(b"");
        assert!(s.find_missing(1, &[empty]).is_empty());
        assert_eq!(s.read(1, &empty, 0, 0).unwrap(), b"");
    }

    #[test]
    fn list_pages_through_blobs_with_their_instance_names() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20, false).unwrap();
        let prod = s.namespace_of("prod");
        let grey = s.namespace_of("grey");
        let mut want = Vec::new();
        for i in 0..25u32 {
            let data = i.to_le_bytes();
            let d = sha(&data);
            let (ns, name) = if i % 2 == 0 {
                (prod, "prod")
            } else {
                (grey, "grey")
            };
            s.put(ns, &d, &data).unwrap();
            want.push((name.to_string(), d));
        }
        let mut got = Vec::new();
        let mut cursor = Vec::new();
        loop {
            let (page, next) = s.list(&cursor, 10).unwrap();
            assert!(page.len() <= 10);
            got.extend(page);
            match next {
                Some(c) => cursor = c,
                None => break,
            }
        }
        want.sort_by_key(|(n, d)| (n.clone(), d.hex()));
        got.sort_by_key(|(n, d)| (n.clone(), d.hex()));
        assert_eq!(got, want);
    }

    #[test]
    fn index_survives_reopen_and_drops_short_or_corrupt_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let a = sha(b"aaaa");
        let c = sha(b"cccc");
        let big_data = vec![7u8; PACK_THRESHOLD as usize + 1];
        let big = sha(&big_data);
        {
            let s = Store::open(dir.path(), 1 << 30, false).unwrap();
            s.put(0, &a, b"aaaa").unwrap();
            s.put(0, &big, &big_data).unwrap();
            s.close().unwrap();
        }
        {
            // A clean stop and restart keeps everything.
            let s = Store::open(dir.path(), 1 << 30, false).unwrap();
            assert!(s.find_missing(0, &[a, big]).is_empty());
            s.put(0, &c, b"cccc").unwrap();
            s.flush().unwrap();
            // Then a power cut: the large file lost its tail, and c's bytes in the pack never
            // made it (zeros of the right length).
            let f = fs::OpenOptions::new()
                .write(true)
                .open(s.blob_path(&Key::new(0, &big)))
                .unwrap();
            f.set_len(10).unwrap();
            let e = s.index.lock().map[&Key::new(0, &c)];
            use std::os::unix::fs::FileExt;
            File::options()
                .write(true)
                .open(s.pack_path(e.pack))
                .unwrap()
                .write_all_at(b"\0\0\0\0", e.offset)
                .unwrap();
        }
        let s = Store::open(dir.path(), 1 << 30, false).unwrap();
        assert_eq!(s.find_missing(0, &[a, big, c]), vec![1, 2]);
        assert_eq!(s.stats().used_bytes, 4);
        assert_eq!(s.read(0, &a, 0, 0).unwrap(), b"aaaa");
    }

    #[test]
    fn lru_eviction_respects_access_order_and_pins() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1000, false).unwrap();
        let blobs: Vec<(BlobDigest, Vec<u8>)> = (0..5u8)
            .map(|i| {
                let data = vec![i; 200];
                (sha(&data), data)
            })
            .collect();
        for (d, data) in &blobs {
            s.put(0, d, data).unwrap();
        }
        // Touch blob 0 so blob 1 is the oldest; pin blob 1 so it is skipped anyway.
        assert!(s.contains(0, &blobs[0].0));
        let pin = s.pin(0, &blobs[1].0).unwrap();
        let (d, data) = (sha(&[9u8; 200]), vec![9u8; 200]);
        s.put(0, &d, &data).unwrap();
        let present: Vec<bool> = blobs.iter().map(|(d, _)| s.contains(0, d)).collect();
        assert_eq!(
            present,
            vec![true, true, false, false, true],
            "evicts 2 and 3, the oldest unpinned"
        );
        assert!(s.stats().used_bytes <= 900);
        drop(pin);
        assert!(s.contains(0, &d));
        // A blob bigger than the whole shard is refused.
        let big = vec![1u8; 2000];
        assert!(matches!(
            s.put(0, &sha(&big), &big),
            Err(StoreError::Full(_))
        ));
    }

    #[test]
    fn uploads_resume_verify_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let d = DigestFunction::Blake3.digest_of(&data);
        {
            let s = Store::open(dir.path(), 1 << 30, false).unwrap();
            let mut up = s.begin_upload(0, &d, "u1", 0).unwrap().unwrap();
            up.append(&data[..1_000_000]).unwrap();
            drop(up); // the stream was cut
            assert_eq!(s.upload_status(0, &d, "u1"), (1_000_000, false));
            assert!(matches!(
                s.begin_upload(0, &d, "u1", 5),
                Err(StoreError::Invalid(_))
            ));
        }
        let s = Store::open(dir.path(), 1 << 30, false).unwrap();
        assert_eq!(s.upload_status(0, &d, "u1"), (1_000_000, false));
        let mut up = s.begin_upload(0, &d, "u1", 1_000_000).unwrap().unwrap();
        let chunks = data[1_000_000..]
            .chunks(16 * 1024)
            .map(|c| Ok(Arc::new(c.to_vec())));
        // Every chunk comes back once hashed, for the caller to read into again.
        let recycled = std::sync::atomic::AtomicUsize::new(0);
        up.append_pipelined(chunks, &|_| {
            recycled.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(recycled.into_inner(), 2_000_000usize.div_ceil(16 * 1024));
        up.finish().unwrap();
        assert_eq!(s.upload_status(0, &d, "u1"), (d.size, true));
        assert_eq!(s.read(0, &d, 0, 0).unwrap(), data);
        assert!(
            s.begin_upload(0, &d, "u2", 0).unwrap().is_none(),
            "already stored"
        );

        // A wrong hash stores nothing.
        let mut bad = d;
        bad.hash[0] ^= 1;
        let mut up = s.begin_upload(0, &bad, "u3", 0).unwrap().unwrap();
        up.append(&data).unwrap();
        assert!(matches!(up.finish(), Err(StoreError::Invalid(m)) if m.contains("hashes to")));
        assert!(!s.contains(0, &bad));
        // Too much data is refused.
        let mut up = s.begin_upload(0, &bad, "u4", 0).unwrap().unwrap();
        assert!(up.append(&[data.clone(), vec![0]].concat()).is_err());
    }

    #[test]
    fn action_cache_round_trip_per_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20, false).unwrap();
        let a = sha(b"action");
        s.ac_put(1, &a, b"result").unwrap();
        assert_eq!(s.ac_get(1, &a).unwrap().as_deref(), Some(&b"result"[..]));
        assert_eq!(s.ac_get(2, &a).unwrap(), None);
        s.ac_delete(1, &a).unwrap();
        assert_eq!(s.ac_get(1, &a).unwrap(), None);
    }
}
