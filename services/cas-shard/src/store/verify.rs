//! Checking that stored bytes still hash to their digests: on reads, and after an unclean stop.

use super::*;

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
/// A file being written whose bytes are hashed as they arrive.
pub(super) struct HashingFile {
    pub(super) file: io::BufWriter<File>,
    pub(super) hasher: Hasher,
    pub(super) len: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A fingerprint of a file's identity and last change (device, inode, size, change and
/// modification times): any write, truncation or replacement changes it. Never 0.
pub(super) fn stamp(m: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    // Not a defence against a forger (who could write the bytes and the times alike, but not a
    // digest): a cheap way to see that something wrote.
    [
        m.dev(),
        m.ino(),
        m.size(),
        m.ctime() as u64,
        m.ctime_nsec() as u64,
        m.mtime() as u64,
        m.mtime_nsec() as u64,
    ]
    .into_iter()
    .fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(23)
    }) | 1
}

/// Hashes `len` bytes of `file` from `offset` (reads at explicit offsets: the file's position
/// is the caller's). A file that ends early is `UnexpectedEof`.
pub(super) fn hash_range(
    file: &File,
    offset: u64,
    len: u64,
    function: DigestFunction,
) -> io::Result<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let mut h = function.hasher();
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finish().hash)
}

impl Store {
    /// Re-hashes a stored blob.
    pub(super) fn verify_entry(&self, key: &Key, e: &Entry) -> bool {
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

    /// Checks, before a read serves it, that the pinned blob's bytes in `file` hash to its
    /// digest, unless they did since the file (its own, or its pack) last changed: its
    /// [`stamp`] then is still the one recorded. Blobs in the active pack, which every append
    /// changes, are re-hashed on each read; those in sealed packs and in their own files once.
    /// A blob that does not match is dropped from this shard and reported missing: readers then
    /// take it from a replica, and the reindexer copies a good one back.
    pub(super) fn check_read(
        &self,
        pin: &Pin<'_>,
        d: &BlobDigest,
        file: &File,
    ) -> Result<(), StoreError> {
        if !self.verify_reads.load(Ordering::Relaxed) {
            return Ok(());
        }
        let m = file.metadata().map_err(io_err(format!("stat {d}")))?;
        let stamp = stamp(&m);
        if self
            .index
            .lock()
            .map
            .get(&pin.key)
            .is_some_and(|e| e.verified == stamp)
        {
            return Ok(());
        }
        let good = match hash_range(file, pin.offset, pin.size, d.function) {
            Ok(h) => h == d.hash,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
            Err(e) => return Err(io_err(format!("verify {d}"))(e)),
        };
        if !good {
            self.drop_corrupt(&pin.key, d);
            return Err(StoreError::NotFound(*d));
        }
        if let Some(e) = self.index.lock().map.get_mut(&pin.key) {
            e.verified = stamp;
        }
        metrics::counter!(crate::metric_names::CAS_SHARD_VERIFIED_BYTES_TOTAL).increment(pin.size);
        Ok(())
    }

    /// Removes a blob whose bytes are not what its digest says.
    pub(super) fn drop_corrupt(&self, key: &Key, d: &BlobDigest) {
        metrics::counter!(crate::metric_names::CAS_SHARD_CORRUPT_BLOBS_TOTAL).increment(1);
        tracing::error!(blob = %d, "A stored blob does not hash to its digest: dropped from this shard");
        let pack = {
            let mut idx = self.index.lock();
            let e = idx.map.remove(key);
            if let Some(e) = &e {
                idx.used -= e.size;
            }
            e.map(|e| e.pack)
        };
        self.removed([key.hash], Vec::new());
        let _ = self.blobs.remove(&key.bytes()[..]);
        if pack == Some(0) {
            let _ = fs::remove_file(self.blob_path(key));
        }
    }

    /// Records that the blob's own file, just written from verified bytes, is what it should be.
    pub(super) fn mark_verified(&self, key: &Key) {
        if let Ok(m) = fs::metadata(self.blob_path(key))
            && let Some(e) = self.index.lock().map.get_mut(key)
        {
            e.verified = stamp(&m);
        }
    }

    /// Forgets which blob files were verified, as a restart does: each one's next read re-hashes
    /// it (after a disk scare, say).
    pub fn forget_verified(&self) {
        for e in self.index.lock().map.values_mut() {
            e.verified = 0;
        }
    }

    /// Turns read verification off (benchmarks compare it) or on.
    pub fn set_verify_reads(&self, on: bool) {
        self.verify_reads.store(on, Ordering::Relaxed);
    }
}
