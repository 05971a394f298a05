//! A shard's file store with the object-store tier behind it (`object_store`'s file system
//! store, `file://`; the S3 path is tested on the stack against moto): writes go through or
//! behind, a store that lost its blobs reads them back and keeps them again, a bad copy in the
//! bucket is refused, and the stores all answer through one interface.

use motorpool_cas_shard::store::{Store, StoreError};
use motorpool_cas_shard::tier::{BlobStore, ObjectTier};
use motorpool_config::{ObjectStoreConfig, TierWrite};
use motorpool_messages::{BlobDigest, DigestFunction};
use std::path::Path;
use std::sync::Arc;

fn tier(bucket: &Path, write: TierWrite) -> Arc<ObjectTier> {
    Arc::new(
        ObjectTier::open(&ObjectStoreConfig {
            url: format!("file://{}/motorpool", bucket.display()),
            write,
            options: Default::default(),
        })
        .unwrap(),
    )
}

fn blob(seed: u8, len: usize) -> (BlobDigest, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    (DigestFunction::Sha256.digest_of(&data), data)
}

/// Files under the bucket's `cas/` or `ac/`, as keys relative to it.
fn objects(bucket: &Path, kind: &str) -> Vec<String> {
    let root = bucket.join("motorpool").join(kind);
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().strip_prefix(&root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn writes_go_through_and_a_wiped_store_reads_them_back_and_keeps_them() {
    let bucket = tempfile::tempdir().unwrap();
    let behind = tier(bucket.path(), TierWrite::Through);
    let (small, small_data) = blob(1, 1000);
    let (small2, small2_data) = blob(5, 1500);
    let (large, large_data) = blob(2, 20 * 1024 * 1024 + 17); // more than one multipart part
    let action = blob(3, 40).0;
    {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30, false).unwrap();
        store.put_behind(behind.clone(), true);
        let ns = store.namespace_of("ci");
        store.put(ns, &small, &small_data).unwrap();
        store.put(ns, &small2, &small2_data).unwrap();
        // A large blob arrives as an upload, in pieces.
        let mut up = store.begin_upload(ns, &large, "u1", 0).unwrap().unwrap();
        for piece in large_data.chunks(3 * 1024 * 1024) {
            up.append(piece).unwrap();
        }
        up.finish().unwrap();
        store.ac_put(ns, &action, b"result").unwrap();
        // Through: there before the writes returned, and nothing left pending.
        assert_eq!(store.behind_pending(), 0);
        assert_eq!(objects(bucket.path(), "cas").len(), 3);
        assert_eq!(objects(bucket.path(), "ac").len(), 1);
        assert_eq!(
            behind.has(ns, &[small, large, blob(9, 5).0]).unwrap(),
            vec![true, true, false]
        );
        // The instance's name is kept beside its namespace, for usage by name.
        let name =
            std::fs::read_to_string(bucket.path().join(format!("motorpool/instances/{ns:016x}")))
                .unwrap();
        assert_eq!(name, "ci");
    }

    // A new, empty store (the shard's disk lost) with the same bucket behind it.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 30, false).unwrap();
    store.put_behind(behind.clone(), true);
    let ns = store.namespace_of("ci");
    assert_eq!(store.find_missing(ns, &[small, large]), vec![0, 1]);
    assert!(
        store
            .find_missing_anywhere(ns, &[small, large])
            .unwrap()
            .is_empty(),
        "what the bucket holds is not missing"
    );
    assert_eq!(
        store.find_missing_anywhere(ns, &[blob(9, 5).0]).unwrap(),
        vec![0]
    );
    // Another instance's blobs are another namespace's, there as here.
    let other = store.namespace_of("other");
    assert_eq!(
        store.find_missing_anywhere(other, &[small]).unwrap(),
        vec![0]
    );
    // Plain reads stay local; the fetching ones read the bucket and keep what they read.
    assert!(matches!(
        store.read(ns, &small, 0, 0),
        Err(StoreError::NotFound(_))
    ));
    // A batch read's small blobs are fetched together first; large ones when read.
    store.fetch_missing(ns, &[small2, small, large, blob(9, 5).0]);
    assert_eq!(store.find_missing(ns, &[small2, small, large]), vec![2]);
    assert_eq!(store.read(ns, &small2, 0, 0).unwrap(), small2_data);
    assert_eq!(store.read_or_fetch(ns, &small, 0, 0).unwrap(), small_data);
    let (file, len, pin) = store.open_read_or_fetch(ns, &large, 5, 0).unwrap();
    assert_eq!(len, large.size - 5);
    drop((file, pin));
    assert!(
        store.find_missing(ns, &[small, large]).is_empty(),
        "re-warmed"
    );
    assert_eq!(store.read(ns, &large, 0, 0).unwrap(), large_data);
    assert_eq!(
        store.ac_get(ns, &action).unwrap().as_deref(),
        Some(&b"result"[..])
    );
    assert_eq!(
        store.behind_pending(),
        0,
        "what came from the bucket is not sent back"
    );

    // A bad copy in the bucket is refused, not served or kept.
    let (bad, bad_data) = blob(4, 2000);
    let mut tampered = bad_data.clone();
    tampered[7] ^= 1;
    behind.put(ns, &bad, &tampered).unwrap();
    match store.read_or_fetch(ns, &bad, 0, 0) {
        Err(StoreError::Behind(m)) => assert!(m.contains("is bad"), "{m}"),
        other => panic!("a tampered copy was served: {other:?}"),
    }
    assert_eq!(store.find_missing(ns, &[bad]), vec![0]);
    // Deleting an action's entry deletes it behind too.
    store.ac_delete(ns, &action).unwrap();
    assert!(objects(bucket.path(), "ac").is_empty());
    assert_eq!(behind.ac_get(ns, &action).unwrap(), None);
}

#[test]
fn writes_behind_are_pending_until_drained_even_across_a_restart() {
    let bucket = tempfile::tempdir().unwrap();
    let behind = tier(bucket.path(), TierWrite::Behind);
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<_> = (0..5).map(|i| blob(10 + i, 500 + i as usize)).collect();
    {
        let store = Store::open(dir.path(), 1 << 30, false).unwrap();
        store.put_behind(behind.clone(), false);
        let ns = store.namespace_of("");
        let batch: Vec<_> = blobs.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        assert!(store.put_batch(ns, &batch).iter().all(Result::is_ok));
        assert_eq!(
            store.behind_pending(),
            5,
            "behind: acknowledged before the bucket has them"
        );
        assert!(objects(bucket.path(), "cas").is_empty());
        assert_eq!(store.drain_behind(2).unwrap(), 2);
        assert_eq!(objects(bucket.path(), "cas").len(), 2);
        store.close().unwrap();
    }
    // Restarted: the rest is still pending and goes up.
    let store = Store::open(dir.path(), 1 << 30, false).unwrap();
    store.put_behind(behind.clone(), false);
    assert_eq!(store.behind_pending(), 3);
    assert_eq!(store.drain_behind(100).unwrap(), 3);
    assert_eq!(store.behind_pending(), 0);
    let ns = store.namespace_of("");
    let digests: Vec<_> = blobs.iter().map(|(d, _)| *d).collect();
    assert!(behind.has(ns, &digests).unwrap().iter().all(|h| *h));
}

#[test]
fn a_failing_bucket_fails_the_write_through_and_the_blob_goes_up_later() {
    let bucket = tempfile::tempdir().unwrap();
    // A "bucket" that is a file: every write to it fails.
    let blocked = bucket.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    let behind = tier(&blocked, TierWrite::Through);
    std::fs::remove_dir_all(&blocked).unwrap();
    std::fs::write(&blocked, b"not a directory").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 30, false).unwrap();
    store.put_behind(behind.clone(), true);
    let (d, data) = blob(20, 3000);
    match store.put(0, &d, &data) {
        Err(StoreError::Behind(m)) => assert!(m.contains(&d.hex()), "{m}"),
        other => panic!("a write through to a failing bucket succeeded: {other:?}"),
    }
    // Kept here and remembered: it goes up once the bucket works again.
    assert_eq!(store.behind_pending(), 1);
    assert_eq!(store.read(0, &d, 0, 0).unwrap(), data);
    assert!(store.drain_behind(10).is_err());
    std::fs::remove_file(&blocked).unwrap();
    assert_eq!(store.drain_behind(10).unwrap(), 1);
    assert_eq!(store.behind_pending(), 0);
    assert_eq!(behind.has(0, &[d]).unwrap(), vec![true]);
}

#[test]
fn bad_object_store_settings_are_named() {
    let err = |url: &str, options: &[(&str, &str)]| {
        ObjectTier::open(&ObjectStoreConfig {
            url: url.into(),
            write: TierWrite::Through,
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .unwrap_err()
        .to_string()
    };
    assert!(err("bucket/prefix", &[]).contains("is not a URL"));
    assert!(err("ftp://host/x", &[]).contains("ftp:// is not one of"));
    let e = err("s3://bucket/p", &[("endpoitn", "http://x")]);
    assert!(e.contains("object_store.options.endpoitn"), "{e}");
}

#[test]
fn every_store_answers_through_one_interface() {
    let bucket = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file_store: Arc<dyn BlobStore> = Arc::new(Store::open(dir.path(), 1 << 30, false).unwrap());
    let object_store: Arc<dyn BlobStore> = tier(bucket.path(), TierWrite::Through);
    for store in [file_store, object_store] {
        let (d, data) = blob(30, 4321);
        let absent = blob(31, 10).0;
        assert_eq!(store.has(7, &[d, absent]).unwrap(), vec![false, false]);
        store.put(7, &d, &data).unwrap();
        assert_eq!(store.has(7, &[d, absent]).unwrap(), vec![true, false]);
        let mut got = Vec::new();
        assert!(store.get(7, &d, &mut got).unwrap());
        assert_eq!(got, data);
        assert!(!store.get(7, &absent, &mut Vec::new()).unwrap());
        assert_eq!(store.ac_get(7, &d).unwrap(), None);
        store.ac_put(7, &d, b"r").unwrap();
        assert_eq!(store.ac_get(7, &d).unwrap().as_deref(), Some(&b"r"[..]));
        store.ac_delete(7, &d).unwrap();
        assert_eq!(store.ac_get(7, &d).unwrap(), None);
    }
}

/// Sets an object's modification time `days` back, as if it had been written then.
fn age(bucket: &Path, key: &str, days: u64) {
    let when = std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86_400);
    std::fs::File::options()
        .write(true)
        .open(bucket.join("motorpool").join(key))
        .unwrap()
        .set_modified(when)
        .unwrap();
}

fn cas_key(ns: u64, d: &BlobDigest) -> String {
    format!("cas/{ns:016x}/sha256/{}-{}", d.hex(), d.size)
}

#[test]
fn the_sweep_keeps_what_is_recent_used_or_referenced_and_removes_the_rest() {
    use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
    use prost::Message;
    let bucket = tempfile::tempdir().unwrap();
    let behind = tier(bucket.path(), TierWrite::Through);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 30, false).unwrap();
    store.put_behind(behind.clone(), true);
    let ns = store.namespace_of("ci");
    let re_digest = |d: &BlobDigest| re::Digest {
        hash: d.hex(),
        size_bytes: d.size as i64,
    };
    // old and unused; old but used; an output; a file in an output tree; recent.
    let (unused, unused_data) = blob(40, 100);
    let (used, used_data) = blob(41, 100);
    let (output, output_data) = blob(42, 100);
    let (in_tree, in_tree_data) = blob(43, 100);
    let (recent, recent_data) = blob(44, 100);
    let tree = re::Tree {
        root: Some(re::Directory {
            files: vec![re::FileNode {
                name: "f".into(),
                digest: Some(re_digest(&in_tree)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    let tree_digest = DigestFunction::Sha256.digest_of(&tree);
    for (d, data) in [
        (unused, &unused_data),
        (used, &used_data),
        (output, &output_data),
        (in_tree, &in_tree_data),
        (recent, &recent_data),
        (tree_digest, &tree),
    ] {
        store.put(ns, &d, data).unwrap();
    }
    // A recent result referencing the output and the tree; an old one referencing the unused.
    let kept_action = blob(45, 10).0;
    let old_action = blob(46, 10).0;
    let kept = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(re_digest(&output)),
            ..Default::default()
        }],
        output_directories: vec![re::OutputDirectory {
            path: "dir".into(),
            tree_digest: Some(re_digest(&tree_digest)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let old = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(re_digest(&unused)),
            ..Default::default()
        }],
        ..Default::default()
    };
    store
        .ac_put(ns, &kept_action, &kept.encode_to_vec())
        .unwrap();
    store.ac_put(ns, &old_action, &old.encode_to_vec()).unwrap();
    // Everything but the recent blob and the kept result was written 40 days ago.
    for d in [unused, used, output, in_tree, tree_digest] {
        age(bucket.path(), &cas_key(ns, &d), 40);
    }
    let ac_key = |a: &BlobDigest| format!("ac/{ns:016x}/{}-{}", a.hex(), a.size);
    age(bucket.path(), &ac_key(&old_action), 40);
    // `used` is read today (a shard that lost it fetches it); the use is recorded once.
    let fresh = tempfile::tempdir().unwrap();
    let reader = Store::open(fresh.path(), 1 << 30, false).unwrap();
    reader.put_behind(behind.clone(), true);
    assert_eq!(reader.read_or_fetch(ns, &used, 0, 0).unwrap(), used_data);
    assert_eq!(reader.record_use(std::time::Duration::ZERO).unwrap(), 1);
    assert_eq!(reader.record_use(std::time::Duration::ZERO).unwrap(), 0);
    // A use record from 40 days ago.
    let old_day = motorpool_messages::now_ms() / 86_400_000 - 40;
    let stale = bucket.path().join(format!("motorpool/used/{old_day}/old"));
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, cas_key(ns, &unused)).unwrap();

    let keep = std::time::Duration::from_secs(30 * 86_400);
    let now = motorpool_messages::now_ms();
    let report = behind.sweep(keep, now, true).unwrap();
    let ci = report.instances["ci"];
    assert_eq!(
        (
            ci.blobs_kept,
            ci.blobs_removed,
            ci.entries_kept,
            ci.entries_removed
        ),
        (5, 1, 1, 1),
        "{report:?}"
    );
    assert_eq!((report.use_records, report.use_records_removed), (1, 1));
    assert_eq!(ci.bytes_removed, 100);
    assert!(
        bucket
            .path()
            .join("motorpool")
            .join(cas_key(ns, &unused))
            .exists(),
        "a dry run removes nothing"
    );

    let report = behind.sweep(keep, now, false).unwrap();
    assert_eq!(report.instances["ci"], ci);
    let present = |key: String| bucket.path().join("motorpool").join(key).exists();
    assert!(!present(cas_key(ns, &unused)), "old and unused: removed");
    assert!(!present(ac_key(&old_action)), "an old result: removed");
    assert!(!stale.exists(), "an old use record: removed");
    for (what, d) in [
        ("used recently", used),
        ("an output of a kept result", output),
        ("a kept result's tree", tree_digest),
        ("a file in a kept result's tree", in_tree),
        ("written recently", recent),
    ] {
        assert!(present(cas_key(ns, &d)), "{what}: kept");
    }
    assert!(present(ac_key(&kept_action)));
    // A second sweep finds nothing more to remove.
    let again = behind.sweep(keep, now, false).unwrap();
    assert_eq!(
        (
            again.instances["ci"].blobs_removed,
            again.instances["ci"].entries_removed
        ),
        (0, 0)
    );
}
