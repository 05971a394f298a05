//! The blob index: keys, entries and packs in memory, and their records in sled.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) struct Key {
    pub(super) ns: u64,
    pub(super) function: u8,
    pub(super) hash: [u8; 32],
}

impl Key {
    pub(super) fn new(ns: u64, d: &BlobDigest) -> Key {
        Key {
            ns,
            function: d.function.tag(),
            hash: d.hash,
        }
    }

    pub(super) fn bytes(&self) -> [u8; 41] {
        let mut k = [0u8; 41];
        k[..8].copy_from_slice(&self.ns.to_be_bytes());
        k[8] = self.function;
        k[9..].copy_from_slice(&self.hash);
        k
    }

    pub(super) fn digest(&self, size: u64) -> Option<BlobDigest> {
        Some(BlobDigest {
            function: DigestFunction::from_tag(self.function)?,
            hash: self.hash,
            size,
        })
    }

    pub(super) fn from_bytes(b: &[u8]) -> Option<Key> {
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
pub(super) struct Entry {
    pub(super) size: u64,
    pub(super) tick: u64,
    pub(super) pins: u32,
    /// Pack id (0 = the blob has its own file) and offset in the pack.
    pub(super) pack: u32,
    pub(super) offset: u64,
    /// The [`stamp`] of the blob's file (its own, or its pack) when its bytes last hashed to
    /// its digest (0: not since this process opened the store). Reads re-hash the blob whenever
    /// the file's stamp differs.
    pub(super) verified: u64,
}

/// A pack file known to the index.
#[derive(Debug, Default)]
pub(super) struct PackMeta {
    /// The access tick when the pack filled up; `None` while it is the active pack.
    pub(super) sealed_tick: Option<u64>,
    /// Keys written into this pack (some may since have moved or gone; check `Entry::pack`).
    pub(super) keys: Vec<Key>,
}

#[derive(Default)]
pub(super) struct Index {
    /// Keyed by digest; foldhash (seeded per process) instead of SipHash: FindMissingBlobs looks up
    /// a hundred thousand keys per call.
    pub(super) map: HashMap<Key, Entry, foldhash::fast::RandomState>,
    /// Bytes of blobs and action-cache entries held.
    pub(super) used: u64,
    pub(super) reserved: u64,
    /// Action-cache entries (see `action_cache`), and the part of `used` they take.
    pub(super) actions: HashMap<AcKey, AcEntry, foldhash::fast::RandomState>,
    pub(super) action_bytes: u64,
    /// Keys whose files are being deleted by eviction; a writer of the same key waits.
    pub(super) evicting: HashSet<Key>,
    pub(super) packs: std::collections::BTreeMap<u32, PackMeta>,
}

pub(super) fn put_meta<'a>(
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
pub(super) fn encode_meta(e: &Entry) -> [u8; 28] {
    let mut v = [0u8; 28];
    v[..8].copy_from_slice(&e.size.to_le_bytes());
    v[8..16].copy_from_slice(&e.tick.to_le_bytes());
    v[16..20].copy_from_slice(&e.pack.to_le_bytes());
    v[20..].copy_from_slice(&e.offset.to_le_bytes());
    v
}

pub(super) fn decode_meta(v: &[u8]) -> Option<Entry> {
    if v.len() != 28 {
        return None;
    }
    Some(Entry {
        size: u64::from_le_bytes(v[..8].try_into().ok()?),
        tick: u64::from_le_bytes(v[8..16].try_into().ok()?),
        pins: 0,
        pack: u32::from_le_bytes(v[16..20].try_into().ok()?),
        offset: u64::from_le_bytes(v[20..].try_into().ok()?),
        verified: 0,
    })
}

/// Removes upload files in `dir` untouched for longer than `idle`, except those in `keep`.
/// How long [`open_meta`] waits for a lock that a store just closed in this process still holds.
pub(super) const META_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens the metadata database. sled releases its file lock from a background thread some
/// moments after the last handle is dropped (sled issue 1234), so a store reopened at once in
/// the same process can find it still held: that is waited out, for a bounded time. A lock held
/// by a live shard is held for its whole life, so a second shard on one data dir still fails,
/// with sled's own message, once the wait is over.
pub(super) fn open_meta(path: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + META_LOCK_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(Some(1000))
            .open()
        {
            Err(sled::Error::Io(e))
                if lock_contention(&e) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            r => return Ok(r?),
        }
    }
}

/// Whether sled's error is its file lock being held (`flock` answered `EWOULDBLOCK`). sled
/// wraps that error in one of its own, so the kind is read from the inner one.
pub(super) fn lock_contention(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<io::Error>())
            .is_some_and(|inner| inner.kind() == io::ErrorKind::WouldBlock)
        || e.to_string().contains("could not acquire lock")
}
