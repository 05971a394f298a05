//! The store behind this one (the object-store tier): writing through or behind to it,
//! reading from it what this store lacks, and recording what was used.

use super::*;

/// The store behind this one, and when writes reach it.
pub(super) struct Behind {
    pub(super) store: Arc<dyn BlobStore>,
    pub(super) through: bool,
}

/// Where committed blobs came from: a client (to be written behind too) or the store behind
/// (already there).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Client,
    Behind,
}

/// Counts a read of the store behind: found (with its bytes) or not.
pub(super) fn tier_read(found: bool, bytes: u64) {
    let result = if found { "hit" } else { "miss" };
    metrics::counter!(crate::metric_names::CAS_TIER_READS_TOTAL, "result" => result).increment(1);
    metrics::counter!(crate::metric_names::CAS_TIER_READ_BYTES_TOTAL).increment(bytes);
}

/// The file store is a [`BlobStore`] too: tools and tests treat every store alike.
impl BlobStore for Store {
    fn has(&self, ns: u64, digests: &[BlobDigest]) -> Result<Vec<bool>, StoreError> {
        let missing: HashSet<u32> = self.find_missing(ns, digests).into_iter().collect();
        Ok((0..digests.len() as u32)
            .map(|i| !missing.contains(&i))
            .collect())
    }

    fn get(&self, ns: u64, d: &BlobDigest, to: &mut dyn Write) -> Result<bool, StoreError> {
        if d.is_empty_blob() {
            return Ok(true);
        }
        match self.open_read(ns, d, 0, 0) {
            Ok((file, len, _pin)) => {
                let copied =
                    io::copy(&mut file.take(len), to).map_err(io_err(format!("read {d}")))?;
                if copied != len {
                    return Err(StoreError::Io {
                        context: format!("read {d}"),
                        source: io::Error::new(io::ErrorKind::UnexpectedEof, "blob file is short"),
                    });
                }
                Ok(true)
            }
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn put(&self, ns: u64, d: &BlobDigest, data: &[u8]) -> Result<(), StoreError> {
        Store::put(self, ns, d, data)
    }

    fn put_file(&self, ns: u64, d: &BlobDigest, path: &Path) -> Result<(), StoreError> {
        let data = fs::read(path).map_err(io_err(format!("read {}", path.display())))?;
        Store::put(self, ns, d, &data)
    }

    fn ac_get(&self, ns: u64, action: &BlobDigest) -> Result<Option<Vec<u8>>, StoreError> {
        Store::ac_get(self, ns, action)
    }

    fn ac_put(&self, ns: u64, action: &BlobDigest, result: &[u8]) -> Result<(), StoreError> {
        Store::ac_put(self, ns, action, result)
    }

    fn ac_delete(&self, ns: u64, action: &BlobDigest) -> Result<(), StoreError> {
        Store::ac_delete(self, ns, action)
    }
}

impl Store {
    /// Puts `behind` behind this store (once): what it commits from now on is written there
    /// too, `through` before a write is acknowledged, else by [`Store::drain_behind`]; and the
    /// `*_or_fetch` reads look there for what is not here.
    pub fn put_behind(&self, behind: Arc<dyn BlobStore>, through: bool) {
        let _ = self.behind.set(Behind {
            store: behind,
            through,
        });
    }

    /// Blobs committed here and not yet written behind.
    pub fn behind_pending(&self) -> usize {
        self.behind_pending.len()
    }

    /// Writes up to `max` pending blobs behind; returns how many were written. A blob evicted
    /// before it was written is gone from both (counted in
    /// `motorpool_cas_tier_writes_total{result="lost"}`).
    pub fn drain_behind(&self, max: usize) -> Result<usize, StoreError> {
        let mut keys = Vec::new();
        for item in self.behind_pending.iter().take(max) {
            let (k, v) = item?;
            if let (Some(key), Ok(size)) = (Key::from_bytes(&k), <[u8; 8]>::try_from(&v[..])) {
                keys.push((key, u64::from_be_bytes(size)));
            } else {
                self.behind_pending.remove(k)?;
            }
        }
        let n = keys.len();
        self.write_behind(keys.into_iter()).map(|()| n)
    }

    /// Writes these committed blobs behind, removing each from the pending list once there.
    pub(super) fn write_behind(
        &self,
        keys: impl Iterator<Item = (Key, u64)>,
    ) -> Result<(), StoreError> {
        let Some(b) = self.behind.get() else {
            return Ok(());
        };
        let mut first_error = None;
        let mut done = |key: &Key, size: u64, written: Result<(), StoreError>| {
            let result = if written.is_ok() { "ok" } else { "failed" };
            metrics::counter!(crate::metric_names::CAS_TIER_WRITES_TOTAL, "result" => result)
                .increment(1);
            match written {
                Ok(()) => {
                    metrics::counter!(crate::metric_names::CAS_TIER_WRITTEN_BYTES_TOTAL)
                        .increment(size);
                    self.behind_pending.remove(&key.bytes()[..])?;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            Ok::<(), StoreError>(())
        };
        // Small blobs go up together (the tier sends them concurrently); large ones one by one,
        // from their files, each pinned while it goes.
        let mut small: Vec<(Key, BlobDigest, Vec<u8>)> = Vec::new();
        for (key, size) in keys {
            let Some(d) = key.digest(size) else {
                self.behind_pending.remove(&key.bytes()[..])?;
                continue;
            };
            match self.pin(key.ns, &d) {
                Err(StoreError::NotFound(_)) => {
                    tracing::warn!(digest = %d, "A blob was evicted before it was written to the object store");
                    metrics::counter!(crate::metric_names::CAS_TIER_WRITES_TOTAL, "result" => "lost")
                        .increment(1);
                    self.behind_pending.remove(&key.bytes()[..])?;
                }
                Err(e) => done(&key, size, Err(e))?,
                Ok(pin) if pin.pack == 0 => {
                    let written = b.store.put_file(key.ns, &d, &self.blob_path(&key));
                    drop(pin);
                    done(&key, size, written)?;
                }
                Ok(pin) => {
                    drop(pin);
                    match self.read(key.ns, &d, 0, 0) {
                        Ok(data) => small.push((key, d, data)),
                        Err(e) => done(&key, size, Err(e))?,
                    }
                }
            }
        }
        let items: Vec<(u64, BlobDigest, &[u8])> = small
            .iter()
            .map(|(k, d, data)| (k.ns, *d, data.as_slice()))
            .collect();
        for ((key, d, _), written) in small.iter().zip(b.store.put_many(&items)) {
            done(key, d.size, written)?;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`Store::find_missing`], then asks the store behind about what is not here: a blob it
    /// holds is not missing (a read fetches it).
    pub fn find_missing_anywhere(
        &self,
        ns: u64,
        digests: &[BlobDigest],
    ) -> Result<Vec<u32>, StoreError> {
        let missing = self.find_missing(ns, digests);
        let Some(b) = self.behind.get() else {
            return Ok(missing);
        };
        let mut still = Vec::new();
        if !missing.is_empty() {
            let asked: Vec<BlobDigest> = missing.iter().map(|&i| digests[i as usize]).collect();
            let there = b.store.has(ns, &asked)?;
            still = missing
                .into_iter()
                .zip(there)
                .filter(|(_, there)| !there)
                .map(|(i, _)| i)
                .collect();
        }
        // Whatever is found, here or there, is in use.
        let mut gone = still.iter().peekable();
        let mut used = self.used.lock();
        for (i, d) in digests.iter().enumerate() {
            if gone.next_if(|&&g| g as usize == i).is_none() && !d.is_empty_blob() {
                used.0.insert(Used::Blob(ns, *d));
            }
        }
        Ok(still)
    }

    /// Fetches the small blobs of `digests` this store lacks from the store behind, all at once
    /// (a batch read of a store that lost them would otherwise wait for one fetch after the
    /// other); what cannot be fetched is left to the reads, which say why.
    pub fn fetch_missing(&self, ns: u64, digests: &[BlobDigest]) {
        let Some(b) = self.behind.get() else {
            return;
        };
        let mut wanted: Vec<BlobDigest> = self
            .find_missing(ns, digests)
            .into_iter()
            .map(|i| digests[i as usize])
            .filter(|d| d.size <= PACK_THRESHOLD)
            .collect();
        wanted.sort_unstable_by_key(|d| (d.hash, d.size));
        wanted.dedup();
        if wanted.len() < 2 {
            return;
        }
        for (d, got) in wanted.iter().zip(b.store.get_many(ns, &wanted)) {
            let Ok(Some(data)) = got else { continue };
            if verify(d, &data).is_err() {
                continue; // the read fetches it again and reports it
            }
            if self.put_verified_from(ns, d, &data, Origin::Behind).is_ok() {
                tier_read(true, d.size);
            }
        }
    }

    /// [`Store::read`], fetching the blob from the store behind when it is not here.
    pub fn read_or_fetch(
        &self,
        ns: u64,
        d: &BlobDigest,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<u8>, StoreError> {
        self.note_use(Used::Blob(ns, *d));
        match self.read(ns, d, offset, limit) {
            Err(StoreError::NotFound(_)) if self.fetch_behind(ns, d)? => {
                self.read(ns, d, offset, limit)
            }
            r => r,
        }
    }

    /// [`Store::open_read`], fetching the blob from the store behind when it is not here.
    pub fn open_read_or_fetch(
        &self,
        ns: u64,
        d: &BlobDigest,
        offset: u64,
        limit: u64,
    ) -> Result<(File, u64, Pin<'_>), StoreError> {
        self.note_use(Used::Blob(ns, *d));
        match self.open_read(ns, d, offset, limit) {
            Err(StoreError::NotFound(_)) if self.fetch_behind(ns, d)? => {
                self.open_read(ns, d, offset, limit)
            }
            r => r,
        }
    }

    /// Remembers a use, to be recorded behind with the others (only with a store behind).
    pub(super) fn note_use(&self, used: Used) {
        if self.behind.get().is_some() {
            self.used.lock().0.insert(used);
        }
    }

    /// Records what was used since the last time behind, in one write, when `every` has
    /// passed since then or much has piled up; returns how many were recorded.
    pub fn record_use(&self, every: Duration) -> Result<usize, StoreError> {
        let Some(b) = self.behind.get() else {
            return Ok(0);
        };
        let batch: Vec<Used> = {
            let mut used = self.used.lock();
            if used.1.elapsed() < every && used.0.len() < 50_000 {
                return Ok(0);
            }
            used.1 = Instant::now();
            used.0.drain().collect()
        };
        if let Err(e) = b.store.record_use(&batch) {
            // Kept for the next try.
            self.used.lock().0.extend(batch);
            return Err(e);
        }
        Ok(batch.len())
    }

    /// Copies a blob from the store behind into this one (verified); false when it is not there
    /// either (or there is no store behind).
    pub(super) fn fetch_behind(&self, ns: u64, d: &BlobDigest) -> Result<bool, StoreError> {
        let Some(b) = self.behind.get() else {
            return Ok(false);
        };
        if d.size <= PACK_THRESHOLD {
            let mut data = Vec::with_capacity(d.size as usize);
            if !b.store.get(ns, d, &mut data)? {
                tier_read(false, 0);
                return Ok(false);
            }
            verify(d, &data).map_err(|e| {
                metrics::counter!(crate::metric_names::CAS_TIER_CORRUPT_BLOBS_TOTAL).increment(1);
                StoreError::Behind(format!("the object store's copy of {d} is bad: {e}"))
            })?;
            self.put_verified_from(ns, d, &data, Origin::Behind)?;
            tier_read(true, d.size);
            return Ok(true);
        }
        // Large: into a file beside the others, hashed on the way, then renamed into place.
        let tmp = self.tmp_path();
        self.reserve(d.size)?;
        let fetched = (|| {
            let file = File::create(&tmp).map_err(io_err(format!("create a file for {d}")))?;
            let mut sink = HashingFile {
                file: io::BufWriter::with_capacity(1 << 20, file),
                hasher: d.function.hasher(),
                len: 0,
            };
            if !b.store.get(ns, d, &mut sink)? {
                return Ok(false);
            }
            sink.file.flush().map_err(io_err(format!("write {d}")))?;
            let got = sink.hasher.finish();
            if sink.len != d.size || got.hash != d.hash {
                metrics::counter!(crate::metric_names::CAS_TIER_CORRUPT_BLOBS_TOTAL).increment(1);
                return Err(StoreError::Behind(format!(
                    "the object store's copy of {d} is bad: {} bytes hashing to {}",
                    sink.len,
                    got.hex()
                )));
            }
            let key = Key::new(ns, d);
            if self.contains(ns, d) {
                // Fetched meanwhile by another reader; this copy and its reservation go.
                self.unreserve(d.size);
                return Ok(true);
            }
            self.rename_into_place(&tmp, &key)?;
            self.commit_entries(&[(key, d.size, 0, 0)], d.size, Origin::Behind)?;
            self.mark_verified(&key);
            Ok(true)
        })();
        let _ = fs::remove_file(&tmp);
        match fetched {
            Ok(true) => {
                tier_read(true, d.size);
                Ok(true)
            }
            other => {
                self.unreserve(d.size);
                if matches!(other, Ok(false)) {
                    tier_read(false, 0);
                }
                other
            }
        }
    }
}
