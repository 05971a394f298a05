//! The blob store of one shard: blob bodies in content-addressed files, metadata in sled, an
//! in-memory index for lookups, and size-bounded LRU eviction.
//!
//! On disk, under the shard's data dir:
//! ```text
//! blobs/<namespace:016x>/<function>/<hh>/<hash hex>   one file per blob, immutable once renamed here
//! tmp/                                                 small-blob writes before their rename
//! uploads/<upload key hash>                            resumable large-blob uploads
//! meta/                                                sled: `blobs` (key -> size, access tick), `ac`
//! ```
//! A namespace is an instance name (hashed): instance names isolate caches.
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
}

#[derive(Default)]
struct Index {
    map: HashMap<Key, Entry>,
    used: u64,
    reserved: u64,
    /// Keys whose files are being deleted by eviction; a writer of the same key waits.
    evicting: HashSet<Key>,
}

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
    blobs: sled::Tree,
    ac: sled::Tree,
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
        for dir in ["blobs", "tmp", "uploads"] {
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
        let store = Store {
            root: root.to_path_buf(),
            blobs,
            ac,
            db,
            index: Mutex::new(Index::default()),
            uploads: Mutex::new(HashMap::new()),
            capacity,
            fsync,
            tick: AtomicU64::new(1),
            flushed_tick: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        store.load_index()?;
        Ok(store)
    }

    fn load_index(&self) -> Result<(), StoreError> {
        let mut idx = self.index.lock();
        let mut max_tick = 0;
        let mut dropped = 0u64;
        for item in self.blobs.iter() {
            let (k, v) = item?;
            let (Some(key), Some((size, tick))) = (Key::from_bytes(&k), decode_meta(&v)) else {
                self.blobs.remove(k)?;
                dropped += 1;
                continue;
            };
            let ok = fs::metadata(self.blob_path(&key))
                .map(|m| m.len() == size)
                .unwrap_or(false);
            if !ok {
                self.blobs.remove(k)?;
                dropped += 1;
                continue;
            }
            max_tick = max_tick.max(tick);
            idx.used += size;
            idx.map.insert(
                key,
                Entry {
                    size,
                    tick,
                    pins: 0,
                },
            );
        }
        self.tick.store(max_tick + 1, Ordering::Relaxed);
        self.flushed_tick.store(max_tick, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "Dropped index entries whose blob files were missing or short"
            );
        }
        tracing::info!(
            blobs = idx.map.len(),
            used_bytes = idx.used,
            "Loaded the blob index"
        );
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
        let pin = self.pin(ns, d)?;
        if offset > pin.size {
            return Err(StoreError::Invalid(format!(
                "read offset {offset} is past the end of {d}"
            )));
        }
        let mut file = File::open(self.blob_path(&pin.key)).map_err(io_err(format!("open {d}")))?;
        if offset > 0 {
            use std::io::Seek;
            file.seek(io::SeekFrom::Start(offset))
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

    /// Verifies and stores one small blob.
    pub fn put(&self, ns: u64, d: &BlobDigest, data: &[u8]) -> Result<(), StoreError> {
        verify(d, data)?;
        self.put_verified(ns, d, data)
    }

    /// Verifies and stores a batch; one result per blob. Metadata is written in one sled batch.
    pub fn put_batch(&self, ns: u64, blobs: &[(BlobDigest, &[u8])]) -> Vec<Result<(), StoreError>> {
        let tick = self.next_tick();
        let mut results = Vec::with_capacity(blobs.len());
        let mut meta = sled::Batch::default();
        let mut committed = Vec::new();
        for (d, data) in blobs {
            let r = verify(d, data).and_then(|()| {
                if d.is_empty_blob() || self.contains(ns, d) {
                    return Ok(None);
                }
                let key = Key::new(ns, d);
                self.reserve(d.size)?;
                let written = self.write_file(&key, data);
                if written.is_err() {
                    self.unreserve(d.size);
                }
                written.map(|()| Some(key))
            });
            results.push(r.map(|k| {
                if let Some(key) = k {
                    meta.insert(&key.bytes()[..], &encode_meta(data.len() as u64, tick)[..]);
                    committed.push((key, data.len() as u64));
                }
            }));
        }
        if !committed.is_empty() {
            if let Err(e) = self.blobs.apply_batch(meta) {
                tracing::error!(error = %e, "Cannot record blob metadata");
            }
            let mut idx = self.index.lock();
            for (key, size) in committed {
                idx.reserved = idx.reserved.saturating_sub(size);
                if idx
                    .map
                    .insert(
                        key,
                        Entry {
                            size,
                            tick,
                            pins: 0,
                        },
                    )
                    .is_none()
                {
                    idx.used += size;
                }
            }
        }
        self.evict_if_needed();
        results
    }

    fn put_verified(&self, ns: u64, d: &BlobDigest, data: &[u8]) -> Result<(), StoreError> {
        if d.is_empty_blob() || self.contains(ns, d) {
            return Ok(());
        }
        let key = Key::new(ns, d);
        self.reserve(d.size)?;
        let r = self
            .write_file(&key, data)
            .and_then(|()| self.commit(key, d.size));
        if r.is_err() {
            self.unreserve(d.size);
        }
        r
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

    fn commit(&self, key: Key, size: u64) -> Result<(), StoreError> {
        let tick = self.next_tick();
        self.blobs
            .insert(&key.bytes()[..], &encode_meta(size, tick)[..])?;
        {
            let mut idx = self.index.lock();
            idx.reserved = idx.reserved.saturating_sub(size);
            if idx
                .map
                .insert(
                    key,
                    Entry {
                        size,
                        tick,
                        pins: 0,
                    },
                )
                .is_none()
            {
                idx.used += size;
            }
        }
        metrics::counter!("motorpool_cas_shard_blobs_written_total").increment(1);
        self.evict_if_needed();
        Ok(())
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

    /// Evicts least-recently-used unpinned blobs until used + reserved is under the low watermark.
    pub fn evict_if_needed(&self) {
        let victims: Vec<(Key, u64)> = {
            let mut idx = self.index.lock();
            if idx.used + idx.reserved <= self.capacity {
                return;
            }
            let target = (self.capacity as f64 * LOW_WATERMARK) as u64;
            let mut candidates: Vec<(u64, Key, u64)> = idx
                .map
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .map(|(k, e)| (e.tick, *k, e.size))
                .collect();
            candidates.sort_unstable_by_key(|c| c.0);
            let mut over = (idx.used + idx.reserved).saturating_sub(target);
            let mut victims = Vec::new();
            for (_, key, size) in candidates {
                if over == 0 {
                    break;
                }
                idx.map.remove(&key);
                idx.used -= size;
                idx.evicting.insert(key);
                over = over.saturating_sub(size);
                victims.push((key, size));
            }
            victims
        };
        for (key, _) in &victims {
            let _ = fs::remove_file(self.blob_path(key));
            let _ = self.blobs.remove(&key.bytes()[..]);
        }
        let mut idx = self.index.lock();
        for (key, _) in &victims {
            idx.evicting.remove(key);
        }
        metrics::counter!("motorpool_cas_shard_evictions_total").increment(victims.len() as u64);
        if !victims.is_empty() {
            tracing::debug!(evicted = victims.len(), "Evicted least-recently-used blobs");
        }
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
        let mut batch = sled::Batch::default();
        for (k, e) in changed {
            batch.insert(&k.bytes()[..], &encode_meta(e.size, e.tick)[..]);
        }
        self.blobs.apply_batch(batch)?;
        self.flushed_tick.store(now, Ordering::Relaxed);
        Ok(())
    }

    /// Flushes metadata to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_access_times()?;
        self.db.flush()?;
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
    /// large upload runs at the speed of the slower of the two rather than their sum.
    pub fn append_pipelined<I>(&mut self, chunks: I) -> Result<(), StoreError>
    where
        I: Iterator<Item = io::Result<Arc<Vec<u8>>>>,
    {
        let size = self.digest.size;
        let u = &mut *self.guard;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(8);
        let mut hasher = std::mem::replace(&mut u.hasher, self.digest.function.hasher());
        let committed = &self.session.committed;
        let result = std::thread::scope(|scope| {
            let hashing = scope.spawn(move || {
                for chunk in rx {
                    hasher.update(&chunk);
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
        if self.store.fsync {
            u.file.sync_data().map_err(io_err("fsync upload"))?;
        }
        let key = Key::new(self.ns, &d);
        self.store.reserve(d.size)?;
        let r = self
            .store
            .rename_into_place(&path, &key)
            .and_then(|()| self.store.commit(key, d.size));
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

fn encode_meta(size: u64, tick: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&size.to_le_bytes());
    v[8..].copy_from_slice(&tick.to_le_bytes());
    v
}

fn decode_meta(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    Some((
        u64::from_le_bytes(v[..8].try_into().ok()?),
        u64::from_le_bytes(v[8..].try_into().ok()?),
    ))
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
    fn index_survives_reopen_and_drops_truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = sha(b"aaaa");
        let b = sha(b"bbbbbbbb");
        {
            let s = Store::open(dir.path(), 1 << 20, false).unwrap();
            s.put(0, &a, b"aaaa").unwrap();
            s.put(0, &b, b"bbbbbbbb").unwrap();
            s.flush().unwrap();
            // Simulate a power cut that lost the tail of b's file.
            fs::write(s.blob_path(&Key::new(0, &b)), b"bbb").unwrap();
        }
        let s = Store::open(dir.path(), 1 << 20, false).unwrap();
        assert_eq!(s.find_missing(0, &[a, b]), vec![1]);
        assert_eq!(s.stats().used_bytes, 4);
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
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let d = DigestFunction::Blake3.digest_of(&data);
        {
            let s = Store::open(dir.path(), 1 << 30, false).unwrap();
            let mut up = s.begin_upload(0, &d, "u1", 0).unwrap().unwrap();
            up.append(&data[..100_000]).unwrap();
            drop(up); // the stream was cut
            assert_eq!(s.upload_status(0, &d, "u1"), (100_000, false));
            assert!(matches!(
                s.begin_upload(0, &d, "u1", 5),
                Err(StoreError::Invalid(_))
            ));
        }
        let s = Store::open(dir.path(), 1 << 30, false).unwrap();
        assert_eq!(s.upload_status(0, &d, "u1"), (100_000, false));
        let mut up = s.begin_upload(0, &d, "u1", 100_000).unwrap().unwrap();
        let chunks = data[100_000..]
            .chunks(16 * 1024)
            .map(|c| Ok(Arc::new(c.to_vec())));
        up.append_pipelined(chunks).unwrap();
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
