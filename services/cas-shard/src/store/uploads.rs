//! Resumable uploads of large blobs (ByteStream writes), and their cleanup.

use super::*;

/// A resumable upload of one large blob.
pub(super) struct Upload {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) hasher: Hasher,
    pub(super) committed: u64,
    pub(super) touched: Instant,
}

pub(super) type UploadKey = (u64, BlobDigest, String);

/// An upload session: the state behind a lock held by the one stream writing it, and the
/// committed offset readable without that lock (QueryWriteStatus must not wait for the stream).
pub(super) struct Session {
    pub(super) state: Arc<Mutex<Upload>>,
    pub(super) committed: AtomicU64,
}

pub(super) fn open_upload(path: &Path, d: &BlobDigest) -> io::Result<Upload> {
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
    pub(super) store: &'a Store,
    pub(super) ns: u64,
    pub(super) digest: BlobDigest,
    pub(super) key: UploadKey,
    pub(super) guard: parking_lot::ArcMutexGuard<parking_lot::RawMutex, Upload>,
    pub(super) session: Arc<Session>,
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
        self.store.reserve(data.len() as u64)?;
        if let Err(e) = u.file.write_all(data) {
            self.store.unreserve(data.len() as u64);
            return Err(io_err("write upload")(e));
        }
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
        let store = self.store;
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
                // Only what arrives is reserved: against the capacity and the disk, and as blocks
                // (one allocation per chunk rather than a delayed-allocation reservation per
                // page; best effort where the file system lacks fallocate).
                if let Err(e) = store.reserve(chunk.len() as u64) {
                    result = Err((e, false));
                    break;
                }
                let _ = nix::fcntl::fallocate(
                    &u.file,
                    nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    u.committed as i64,
                    chunk.len() as i64,
                );
                if let Err(e) = u.file.write_all(&chunk) {
                    store.unreserve(chunk.len() as u64);
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
                    store.unreserve(u.committed);
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
        // What the upload reserved as it arrived becomes the blob's reservation below, or goes.
        let reserved = u.committed;
        if let Err(e) = outcome {
            let _ = fs::remove_file(&path);
            self.store.unreserve(reserved);
            return Err(e);
        }
        if self.store.contains(self.ns, &d) {
            let _ = fs::remove_file(&path);
            self.store.unreserve(reserved);
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
            self.store.unreserve(reserved);
            return self.store.put_verified(self.ns, &d, &data);
        }
        let r = (|| {
            if self.store.fsync {
                u.file.sync_data().map_err(io_err("fsync upload"))?;
            }
            self.store.rename_into_place(&path, &key)?;
            self.store
                .commit_entries(&[(key, d.size, 0, 0)], d.size, Origin::Client)
        })();
        match r {
            Ok(()) => self.store.mark_verified(&key),
            Err(_) => self.store.unreserve(reserved),
        }
        r
    }
}

pub(super) fn remove_stale_uploads(dir: &Path, idle: Duration, keep: &HashSet<PathBuf>) -> u64 {
    let mut removed = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > idle);
        if stale && !keep.contains(&path) && fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// How long an upload may go untouched before it is abandoned (its session and file removed).
pub const UPLOAD_IDLE: Duration = Duration::from_secs(3600);
/// Upload sessions a shard keeps at once; one more is refused until some finish or expire.
pub const MAX_UPLOADS: usize = 1024;
impl Store {
    pub(super) fn upload_path(&self, ns: u64, d: &BlobDigest, upload_id: &str) -> PathBuf {
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
                    if uploads.len() >= MAX_UPLOADS {
                        return Err(StoreError::Busy(format!(
                            "{MAX_UPLOADS} uploads are in flight on this shard; retry later"
                        )));
                    }
                    // The declared size must fit; only what arrives is reserved.
                    self.check_free(d.size.saturating_sub(offset))?;
                    let path = self.upload_path(ns, d, upload_id);
                    let upload =
                        open_upload(&path, d).map_err(io_err(format!("open upload of {d}")))?;
                    // Bytes of an upload resumed after a restart count again.
                    self.reserve(upload.committed)?;
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
            self.unreserve(guard.committed);
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

    /// Drops upload sessions idle for longer than `idle`, their files and what they reserved,
    /// and upload files no session has (left by an earlier run) untouched that long.
    pub fn expire_uploads(&self, idle: Duration) {
        let mut freed = 0;
        let mut uploads = self.uploads.lock();
        uploads.retain(|_, s| match s.state.try_lock() {
            Some(u) if u.touched.elapsed() > idle => {
                let _ = fs::remove_file(&u.path);
                freed += u.committed;
                false
            }
            _ => true,
        });
        let open: HashSet<PathBuf> = uploads
            .values()
            .filter_map(|s| s.state.try_lock().map(|u| u.path.clone()))
            .collect();
        drop(uploads);
        self.unreserve(freed);
        remove_stale_uploads(&self.root.join("uploads"), idle, &open);
    }

    // ---- action cache ----
}
