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

/// An action result of `len` bytes that names `i`.
fn result_of(i: u32, len: usize) -> (BlobDigest, Vec<u8>) {
    let mut v = vec![b'r'; len];
    v[..4].copy_from_slice(&i.to_be_bytes());
    (sha(format!("action {i}").as_bytes()), v)
}

#[test]
fn the_action_cache_is_counted_and_kept_within_its_share_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let s = Store::open(dir.path(), 1 << 20, false).unwrap();
    s.report_removals(tx);
    let share = s.action_cache_capacity();
    assert_eq!(share, (1 << 20) / 10, "the default share is a tenth");
    let (hot, hot_result) = result_of(0, 1000);
    s.ac_put(1, &hot, &hot_result).unwrap();
    let before = s.stats();
    assert_eq!(before.action_count, 1);
    assert!(before.action_bytes > 1000);
    assert_eq!(
        before.used_bytes, before.action_bytes,
        "entries count as used"
    );
    // Twice the share in entries, the first one read after each write.
    let mut put = 1;
    while put * 1000 < 2 * share as u32 {
        let (a, r) = result_of(put, 1000);
        s.ac_put(1, &a, &r).unwrap();
        assert!(
            s.ac_get(1, &hot).unwrap().is_some(),
            "entry 0 is the most used"
        );
        put += 1;
    }
    let stats = s.stats();
    assert!(
        stats.action_bytes <= share,
        "{} bytes of entries in a share of {share}",
        stats.action_bytes
    );
    assert!(stats.action_count < put as u64 / 2);
    assert_eq!(stats.used_bytes, stats.action_bytes);
    assert_eq!(
        s.ac_get(1, &result_of(1, 1000).0).unwrap(),
        None,
        "the oldest went"
    );
    let mut evicted = Vec::new();
    while let Ok(r) = rx.try_recv() {
        evicted.extend(r.actions);
    }
    assert_eq!(evicted.len() as u64, put as u64 - stats.action_count);
    assert!(evicted.contains(&result_of(1, 1000).0.hash));
    assert!(!evicted.contains(&hot.hash));
    s.close().unwrap();
    drop(s);

    // Reopened: the same entries, counted the same, in the same order of use.
    let s = Store::open(dir.path(), 1 << 20, false).unwrap();
    assert_eq!(s.stats().action_count, stats.action_count);
    assert_eq!(s.stats().action_bytes, stats.action_bytes);
    let survivors_before = (1..put)
        .filter(|i| s.ac_get(1, &result_of(*i, 1000).0).unwrap().is_some())
        .count();
    // (Reading them all just now made them newer than entry 0: make it the newest again.)
    s.ac_get(1, &hot).unwrap().unwrap();
    s.close().unwrap();
    drop(s);
    let s = Store::open(dir.path(), 1 << 20, false).unwrap();
    // New entries worth most of the share push out the old ones, least recently used first.
    let new = (share * 8 / 10 / 1113) as u32;
    for i in 0..new {
        let (a, r) = result_of(100_000 + i, 1000);
        s.ac_put(1, &a, &r).unwrap();
    }
    let old_left = (1..put)
        .filter(|i| s.ac_get(1, &result_of(*i, 1000).0).unwrap().is_some())
        .count();
    assert!(old_left < survivors_before);
    assert!(
        s.ac_get(1, &hot).unwrap().is_some(),
        "the most recently used entry outlives {} older ones",
        survivors_before - old_left
    );
    assert!(s.stats().action_bytes <= share);
}

#[test]
fn action_cache_entries_and_blobs_are_evicted_in_one_least_recently_used_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 8 << 20, false).unwrap();
    s.set_action_cache_share(1.0).unwrap();
    // A hundred entries of 10 KiB (about 1 MiB), then 6 MiB of large blobs.
    for i in 0..100 {
        let (a, r) = result_of(i, 10 << 10);
        s.ac_put(1, &a, &r).unwrap();
    }
    let blobs: Vec<(BlobDigest, Vec<u8>)> = (0..5u8)
        .map(|i| {
            let data = vec![i; (3 << 20) / 2];
            (sha(&data), data)
        })
        .collect();
    for (d, data) in &blobs[..4] {
        s.put(1, d, data).unwrap();
    }
    // Entry 0 is read after the blobs were written; the other 99 were not.
    assert!(s.ac_get(1, &result_of(0, 10 << 10).0).unwrap().is_some());
    // One blob more is 8.5 MiB: down to 90% takes the 99 stale entries and the oldest blob.
    s.put(1, &blobs[4].0, &blobs[4].1).unwrap();
    assert!(s.ac_get(1, &result_of(0, 10 << 10).0).unwrap().is_some());
    for i in 1..100 {
        assert_eq!(
            s.ac_get(1, &result_of(i, 10 << 10).0).unwrap(),
            None,
            "entry {i}"
        );
    }
    assert!(!s.contains(1, &blobs[0].0), "the oldest blob went too");
    for (d, _) in &blobs[1..] {
        assert!(s.contains(1, d));
    }
    let stats = s.stats();
    assert_eq!(stats.action_count, 1);
    assert!(stats.used_bytes <= 8 << 20);
}

#[test]
fn an_action_result_larger_than_the_share_or_a_share_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 20, false).unwrap();
    let (a, r) = result_of(1, 200 << 10);
    let err = s.ac_put(1, &a, &r).unwrap_err();
    assert!(matches!(err, StoreError::Full(_)), "{err}");
    assert!(err.to_string().contains("action cache"), "{err}");
    assert_eq!(s.ac_get(1, &a).unwrap(), None);
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let err = s.set_action_cache_share(bad).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{bad}: {err}");
    }
    s.set_action_cache_share(0.5).unwrap();
    s.ac_put(1, &a, &r).unwrap();
    assert!(s.ac_get(1, &a).unwrap().is_some());
}

/// A tmpfs of `size` bytes at a new directory (these tests run as root, as CI does): a disk
/// that fills up, and free space that does not depend on the machine's.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs (run the tests as root)");
        Tmpfs(dir)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn every_removal_is_reported_once_it_is_out_of_the_index() {
    let dir = tempfile::tempdir().unwrap();
    // Small enough that a few writes evict, large enough that packs seal.
    let s = Store::open(dir.path(), 64 * 1024, false).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    s.report_removals(tx);
    let all = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Removed>| {
        let mut r = Removed::default();
        while let Ok(more) = rx.try_recv() {
            r.blobs.extend(more.blobs);
            r.actions.extend(more.actions);
        }
        r
    };

    // Eviction: every blob that leaves the index is reported, and no other.
    let blobs: Vec<(BlobDigest, Vec<u8>)> = (0..40u32)
        .map(|i| {
            let data = i.to_le_bytes().repeat(1024);
            (sha(&data), data)
        })
        .collect();
    for (d, data) in &blobs {
        s.put(0, d, data).unwrap();
    }
    let gone: Vec<[u8; 32]> = blobs
        .iter()
        .filter(|(d, _)| !s.contains(0, d))
        .map(|(d, _)| d.hash)
        .collect();
    assert!(!gone.is_empty(), "the store evicted");
    let mut reported = all(&mut rx).blobs;
    reported.sort();
    let mut expected = gone.clone();
    expected.sort();
    assert_eq!(reported, expected);

    // A corrupt blob found on read.
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 30, false).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    s.report_removals(tx);
    let d = sha(&big);
    s.put(3, &d, &big).unwrap();
    let e = s.index.lock().map[&Key::new(3, &d)];
    corrupt(&s.pack_path(e.pack), e.offset + 10);
    assert!(s.read(3, &d, 0, 0).is_err());
    assert_eq!(
        all(&mut rx),
        Removed {
            blobs: vec![d.hash],
            actions: vec![]
        }
    );

    // An action-cache entry deleted; deleting one that is not there reports nothing.
    let action = sha(b"an action");
    s.ac_put(3, &action, b"result").unwrap();
    s.ac_delete(3, &action).unwrap();
    s.ac_delete(3, &action).unwrap();
    assert_eq!(
        all(&mut rx),
        Removed {
            blobs: vec![],
            actions: vec![action.hash]
        }
    );
}

/// Overwrites `n` bytes at `offset` of `path` in place, as a failing disk or a stray
/// writer would.
fn corrupt(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(b"XXXX", offset).unwrap();
}

#[test]
fn corrupt_blobs_are_detected_on_read_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 30, false).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let small = b"a small blob in a pack".repeat(10);
    let (db, ds) = (sha(&big), sha(&small));
    let other = sha(b"its neighbour in the pack");
    s.put(7, &db, &big).unwrap();
    s.put_batch(7, &[(ds, &small), (other, b"its neighbour in the pack")]);
    // Reads before any damage are served (the big one from its stamp after writing).
    assert_eq!(s.read(7, &db, 0, 0).unwrap(), big);
    assert_eq!(s.read(7, &ds, 0, 0).unwrap(), small);

    corrupt(&s.blob_path(&Key::new(7, &db)), 1_000_000);
    let pack = s.index.lock().map[&Key::new(7, &ds)];
    corrupt(&s.pack_path(pack.pack), pack.offset + 3);
    for d in [db, ds] {
        // A whole read, a ranged read and an open for the data stream all refuse it.
        assert!(
            matches!(s.read(7, &d, 0, 0), Err(StoreError::NotFound(_))),
            "{d}"
        );
        assert!(
            matches!(s.read(7, &d, 10, 5), Err(StoreError::NotFound(_))),
            "{d}"
        );
        assert!(s.open_read(7, &d, 0, 0).is_err());
        assert!(
            !s.contains(7, &d),
            "dropped from the index: a replica serves it"
        );
    }
    assert!(
        !s.blob_path(&Key::new(7, &db)).exists(),
        "the bad file is gone"
    );
    assert_eq!(
        s.read(7, &other, 0, 0).unwrap(),
        b"its neighbour in the pack",
        "the rest of the pack is still served"
    );
    // Stored again (a replica's copy, as the reindexer brings it), it is served again.
    s.put(7, &db, &big).unwrap();
    assert_eq!(s.read(7, &db, 0, 0).unwrap(), big);
    assert_eq!(s.stats().used_bytes, big.len() as u64 + 25);

    // After a restart nothing is trusted: the first read hashes the file again.
    drop(s);
    let s = Store::open(dir.path(), 1 << 30, false).unwrap();
    corrupt(&s.blob_path(&Key::new(7, &db)), 2_999_000);
    assert!(matches!(s.read(7, &db, 0, 0), Err(StoreError::NotFound(_))));
}

#[test]
fn a_store_reopens_at_once_after_a_drop_but_never_beside_a_live_one() {
    use nix::fcntl::{Flock, FlockArg};
    let dir = tempfile::tempdir().unwrap();
    let blob = b"survives every reopen".to_vec();
    let s = Store::open(dir.path(), 1 << 20, false).unwrap();
    s.put(0, &sha(&blob), &blob).unwrap();
    drop(s);
    // sled lets go of its lock from a background thread some moments after the drop (as
    // under load in CI); here the lock is held for 300 ms after the drop, on purpose.
    let lock = loop {
        let f = File::open(dir.path().join("meta/db")).unwrap();
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(lock);
    });
    let started = std::time::Instant::now();
    let s = Store::open(dir.path(), 1 << 20, false).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(s.read(0, &sha(&blob), 0, 0).unwrap(), blob);
    release.join().unwrap();
    drop(s);
    let live = Store::open(dir.path(), 1 << 20, false).unwrap();
    let started = std::time::Instant::now();
    let second = Store::open(dir.path(), 1 << 20, false);
    assert!(
        matches!(&second, Err(StoreError::Meta(e)) if e.to_string().contains("lock")),
        "a second store on a live one's data dir: {second:?}"
    );
    assert!(started.elapsed() >= META_LOCK_WAIT);
    assert_eq!(live.read(0, &sha(&blob), 0, 0).unwrap(), blob);
}

#[test]
fn a_full_disk_during_a_pack_append_leaves_every_other_blob_readable() {
    let disk = Tmpfs::new("8m");
    let s = Store::open(disk.path(), 4 << 20, false).unwrap();
    let a = vec![1u8; 10_000];
    s.put(0, &sha(&a), &a).unwrap();
    s.flush().unwrap(); // stored a while ago: its metadata is on disk
    // Something else fills the disk.
    let filler = disk.path().join("filler");
    let mut f = File::create(&filler).unwrap();
    while f.write_all(&[0u8; 4096]).is_ok() {}
    drop(f);
    // The shard refuses to write rather than fill the disk.
    let b = vec![2u8; 100_000];
    assert!(matches!(s.put(0, &sha(&b), &b), Err(StoreError::Full(m)) if m.contains("free")));
    // And when the disk fills between that check and the write, the partial record is cut
    // back off: nothing points into it, and the next append lands where it would have.
    let end = s.active.lock().len;
    assert!(s.append_to_pack(&[&b]).is_err());
    assert_eq!(s.active.lock().len, end);
    let pack = s.pack_path(s.active.lock().id);
    assert_eq!(
        fs::metadata(&pack).unwrap().len(),
        end,
        "the partial record is gone"
    );
    // What was stored before still reads back, while the disk is full.
    assert_eq!(s.read(0, &sha(&a), 0, 0).unwrap(), a);
    // Once there is room again (sled, whose background flush may have met the full disk and
    // then refuses writes until it is reopened, after a restart), writes land right.
    fs::remove_file(&filler).unwrap();
    drop(s);
    let s = Store::open(disk.path(), 4 << 20, false).unwrap();
    let c = vec![3u8; 10_000];
    s.put(0, &sha(&c), &c).unwrap();
    assert_eq!(s.read(0, &sha(&a), 0, 0).unwrap(), a);
    assert_eq!(s.read(0, &sha(&c), 0, 0).unwrap(), c);
    drop(s);
    let s = Store::open(disk.path(), 4 << 20, false).unwrap();
    assert_eq!(
        s.read(0, &sha(&c), 0, 0).unwrap(),
        c,
        "and after another restart"
    );
}

#[test]
fn uploads_reserve_only_what_arrived_and_abandoned_ones_are_cleaned() {
    let disk = Tmpfs::new("4g");
    let s = Store::open(disk.path(), 3 << 30, false).unwrap();
    // Declares 3 GiB (less the capacity's slack), sends 1 KiB.
    let d = BlobDigest {
        function: DigestFunction::Sha256,
        hash: [9; 32],
        size: (3 << 30) - (1 << 20),
    };
    let mut up = s.begin_upload(0, &d, "big", 0).unwrap().unwrap();
    up.append(&[5u8; 1024]).unwrap();
    drop(up); // the client went away
    assert_eq!(s.stats().reserved_bytes, 1024);
    let path = s.upload_path(0, &d, "big");
    let blocks = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&path).unwrap().blocks() * 512
    };
    assert!(
        blocks <= 64 * 1024,
        "{blocks} bytes allocated on disk for 1 KiB"
    );
    // A declared size that cannot fit is refused at the start.
    let huge = BlobDigest { size: 5 << 30, ..d };
    assert!(matches!(
        s.begin_upload(0, &huge, "x", 0),
        Err(StoreError::Full(_))
    ));
    // Expiry removes the session, its file and its reservation.
    s.expire_uploads(Duration::ZERO);
    assert!(!path.exists());
    assert_eq!(s.stats().reserved_bytes, 0);

    // One abandoned before a restart, untouched for longer than the idle time: gone at start.
    let mut up = s.begin_upload(0, &d, "old", 0).unwrap().unwrap();
    up.append(&[6u8; 2048]).unwrap();
    drop(up);
    let mut up = s.begin_upload(0, &d, "recent", 0).unwrap().unwrap();
    up.append(&[7u8; 2048]).unwrap();
    drop(up);
    let old_path = s.upload_path(0, &d, "old");
    drop(s);
    let old = std::time::SystemTime::now() - UPLOAD_IDLE - Duration::from_secs(60);
    File::options()
        .write(true)
        .open(&old_path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let s = Store::open(disk.path(), 3 << 30, false).unwrap();
    assert!(!s.upload_path(0, &d, "old").exists());
    assert_eq!(
        s.upload_status(0, &d, "recent"),
        (2048, false),
        "a recent one resumes"
    );
    // Resumed, it counts against the capacity again.
    let up = s.begin_upload(0, &d, "recent", 2048).unwrap().unwrap();
    assert_eq!(s.stats().reserved_bytes, 2048);
    drop(up);
}
