//! The reindexer against the real stack: a shard that dies for good is dropped from the registry,
//! and the blobs it held are copied back to two live shards; a blob corrupted on a shard's disk
//! is never served, and comes back from its replica.

mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_bus::{Bus, subjects};
use motorpool_messages::BlobDigest;
use motorpool_messages::cas::{BatchRead, FindMissing, ReadChunk};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// A CAS shard the test starts itself (no supervisor restarts it); killed when dropped.
struct OwnShard(Child);

impl OwnShard {
    fn start(nats: &str, nkey: &std::path::Path, id: &str, dir: &std::path::Path) -> OwnShard {
        let child = Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .args(["cas-shard", "--nats-url", nats, "--shard-id", id])
            .arg("--nats-nkey-file")
            .arg(nkey)
            .arg("--data-dir")
            .arg(dir.join(id))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        OwnShard(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for OwnShard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn missing_on(bus: &Bus, shard: &str, digests: &[BlobDigest]) -> usize {
    let req = FindMissing {
        instance: "ci".into(),
        digests: digests.to_vec(),
    };
    match bus.request(&subjects::cas::find_missing(shard), &req).await {
        Ok(r) => r.missing.len(),
        Err(_) => digests.len(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_shards_are_dropped_and_lost_replicas_restored() {
    let stack = Stack::up_with_env(
        &["--shards", "1", "--workers", "0"],
        &[
            ("MOTORPOOL_REINDEXER_PERIOD_MS", "300"),
            ("MOTORPOOL_REINDEXER_DEAD_AFTER_MS", "3000"),
            ("MOTORPOOL_REINDEXER_SHARD_TIMEOUT_MS", "2000"),
        ],
    );
    let nats = stack.nats_url();
    let dir = tempfile::tempdir().unwrap();
    let bus = stack.bus_as("admin").await;
    // A shard started by hand, with a bus user an operator adds to the running stack.
    let nkey = stack.add_bus_user("shard:extra").await;
    let mut extra = OwnShard::start(&nats, &nkey, "extra", dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stack.http_get("/api/v1/shards").contains("\"extra\"") {
        assert!(
            Instant::now() < deadline,
            "the extra shard never registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 300 small blobs and one large one, each written to both live shards.
    let mut c = stack.clients().await;
    let blobs: Vec<Vec<u8>> = (0..300).map(|i| bytes(i, 1000 + i as usize)).collect();
    let digests: Vec<BlobDigest> = blobs.iter().map(|b| sha(b)).collect();
    let req = re::BatchUpdateBlobsRequest {
        instance_name: "ci".into(),
        requests: blobs
            .iter()
            .zip(&digests)
            .map(|(b, d)| re::batch_update_blobs_request::Request {
                digest: Some(proto(d)),
                data: b.clone(),
                compressor: 0,
            })
            .collect(),
        digest_function: 0,
    };
    c.cas.batch_update_blobs(req).await.unwrap();
    let large = bytes(999, 6 << 20);
    let large_d = sha(&large);
    bs_write(&mut c, "ci", &large_d, &large).await.unwrap();
    let mut all = digests.clone();
    all.push(large_d);
    assert_eq!(missing_on(&bus, "cas-0", &all).await, 0, "written to cas-0");
    assert_eq!(
        missing_on(&bus, "extra", &all).await,
        0,
        "and replicated to extra"
    );

    // The extra shard dies for good; a fresh one joins.
    extra.kill();
    let fresh_key = stack.add_bus_user("shard:fresh").await;
    let mut fresh = OwnShard::start(&nats, &fresh_key, "fresh", dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shards = stack.http_get("/api/v1/shards");
        let restored = missing_on(&bus, "fresh", &all).await == 0;
        let dropped = !registry_has(&bus, "extra").await;
        if restored && dropped && !shards.contains("\"extra\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not repaired in time: restored={restored} dropped={dropped}\n{shards}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(missing_on(&bus, "cas-0", &all).await, 0);
    // Reads of every blob work, from either replica.
    let r = c
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "ci".into(),
            blob_digests: all.iter().map(proto).collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.missing_blob_digests.is_empty());
    assert_eq!(
        bs_read(&mut c, &read_name("ci", &large_d), 0, 0)
            .await
            .unwrap(),
        large
    );
    fresh.kill();
}

/// The files below `dir` whose name is `name`, or that contain `needle`.
fn find_files(dir: &std::path::Path, name: &str, needle: &[u8], out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            find_files(&p, name, needle, out);
        } else if e.file_name() == name
            || (!needle.is_empty()
                && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        {
            out.push(p);
        }
    }
}

fn overwrite(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_corrupted_on_a_shards_disk_are_never_served_and_come_back_from_a_replica() {
    let stack = Stack::up_with_env(
        &["--shards", "2", "--workers", "0"],
        &[("MOTORPOOL_REINDEXER_PERIOD_MS", "300")],
    );
    let _log = support::LogOnPanic(&stack);
    let bus = stack.bus_as("admin").await;
    let mut c = stack.clients().await;
    let large = bytes(7, 5 << 20);
    let large_d = sha(&large);
    bs_write(&mut c, "ci", &large_d, &large).await.unwrap();
    let small = bytes(8, 3000);
    let small_d = sha(&small);
    c.cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: "ci".into(),
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(proto(&small_d)),
                data: small.clone(),
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap();
    for shard in ["cas-0", "cas-1"] {
        assert_eq!(
            missing_on(&bus, shard, &[large_d, small_d]).await,
            0,
            "on {shard}"
        );
    }

    // cas-0's disk goes bad under both: its own file for the large one, its pack for the small.
    let cas0 = stack.dir.path().join("data/cas-0");
    let mut files = Vec::new();
    find_files(&cas0.join("blobs"), &large_d.hex(), b"", &mut files);
    find_files(&cas0.join("packs"), "", &small[..64], &mut files);
    assert_eq!(files.len(), 2, "{files:?}");
    overwrite(&files[0], 4 << 20, b"rot");
    let pack = std::fs::read(&files[1]).unwrap();
    let at = pack.windows(64).position(|w| w == &small[..64]).unwrap();
    overwrite(&files[1], at as u64 + 100, b"rot");

    // cas-0 itself refuses to serve either: its reads re-hash what they would send.
    let req = ReadChunk {
        instance: "ci".into(),
        digest: large_d,
        offset: 0,
        limit: 1000,
    };
    let e = bus
        .request(&subjects::cas::read_chunk("cas-0"), &req)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    let req = BatchRead {
        instance: "ci".into(),
        digests: vec![small_d],
    };
    let r = bus
        .request(&subjects::cas::batch_read("cas-0"), &req)
        .await
        .unwrap();
    assert!(r.blobs[0].is_err(), "the corrupt small blob was served");
    // Every read through the gateway returns the right bytes, however often, whichever shard it
    // asks first.
    for _ in 0..5 {
        assert!(
            bs_read(&mut c, &read_name("ci", &large_d), 0, 0)
                .await
                .unwrap()
                == large
        );
        let got = c
            .cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                instance_name: "ci".into(),
                digests: vec![proto(&small_d)],
                acceptable_compressors: vec![],
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.responses[0].data, small);
    }
    // The reindexer copies cas-1's good copies back to cas-0.
    let deadline = Instant::now() + Duration::from_secs(30);
    while missing_on(&bus, "cas-0", &[large_d, small_d]).await > 0 {
        assert!(Instant::now() < deadline, "cas-0 was not repaired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut files = Vec::new();
    find_files(&cas0.join("blobs"), &large_d.hex(), b"", &mut files);
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        large,
        "cas-0's copy is good again"
    );
}

async fn registry_has(bus: &Bus, id: &str) -> bool {
    let kv = bus
        .ensure_kv(subjects::cas::registry_config())
        .await
        .unwrap();
    matches!(kv.get(id).await, Ok(Some(_)))
}
