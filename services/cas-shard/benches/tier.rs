//! What the object-store tier costs a shard, in one run: a set of blobs (1,000 of 4 KiB, as a
//! build's sources and objects are, and 8 of 8 MiB) written to a store alone and to a store with
//! the tier behind it (through and behind), then read by a store that holds them (local) and by
//! an empty store that fetches every one from the bucket and keeps it (a shard that lost its
//! disk). The bucket is an S3-compatible server, moto, when `moto_server` is on PATH (it is
//! Python: a real S3 is faster per request, slower per round trip), and a file system otherwise
//! too. Medians of three rounds.
//! `cargo bench -p motorpool-cas-shard --bench tier`.

use motorpool_cas_shard::store::Store;
use motorpool_cas_shard::tier::ObjectTier;
use motorpool_config::{ObjectStoreConfig, TierWrite};
use motorpool_messages::{BlobDigest, DigestFunction};
use std::sync::Arc;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

type Blobs = Vec<(BlobDigest, Vec<u8>)>;

fn blobs(round: u32) -> Blobs {
    let mut out: Blobs = (0..1000u32)
        .map(|i| {
            let data: Vec<u8> = (i ^ (round << 20)).to_le_bytes().repeat(1024);
            (DigestFunction::Sha256.digest_of(&data), data)
        })
        .collect();
    out.extend((0..8u32).map(|i| {
        let data: Vec<u8> = (0..8u32 << 20)
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(37) ^ round as u8)
            .collect();
        (DigestFunction::Sha256.digest_of(&data), data)
    }));
    out
}

/// Writes the blobs (small ones in batches of 100, as gateways send them); seconds.
fn write(store: &Store, blobs: &Blobs) -> f64 {
    let t = Instant::now();
    let (small, large): (Vec<_>, Vec<_>) = blobs.iter().partition(|(d, _)| d.size < 1 << 20);
    for chunk in small.chunks(100) {
        let batch: Vec<(BlobDigest, &[u8])> =
            chunk.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        assert!(store.put_batch(0, &batch).iter().all(Result::is_ok));
    }
    for (d, b) in large {
        store.put(0, d, b).unwrap();
    }
    t.elapsed().as_secs_f64()
}

/// Reads every blob whole through the shard's serving read, one by one (as ByteStream reads
/// come) or with the small ones in batches of 100 (as BatchReadBlobs comes); seconds.
fn read(store: &Store, blobs: &Blobs, batched: bool) -> f64 {
    let t = Instant::now();
    if batched {
        for chunk in blobs.chunks(100) {
            let digests: Vec<BlobDigest> = chunk.iter().map(|(d, _)| *d).collect();
            store.fetch_missing(0, &digests);
            for (d, b) in chunk {
                assert_eq!(store.read_or_fetch(0, d, 0, 0).unwrap().len(), b.len());
            }
        }
    } else {
        for (d, b) in blobs {
            assert_eq!(store.read_or_fetch(0, d, 0, 0).unwrap().len(), b.len());
        }
    }
    t.elapsed().as_secs_f64()
}

type Options = std::collections::BTreeMap<String, String>;

fn tier(url: &str, options: &Options, write: TierWrite) -> Arc<ObjectTier> {
    Arc::new(
        ObjectTier::open(&ObjectStoreConfig {
            url: url.into(),
            write,
            options: options.clone(),
        })
        .unwrap(),
    )
}

/// Starts moto on a free port with a bucket; its URL, the client's options and the server.
fn moto() -> Option<(String, Options, std::process::Child)> {
    support_which("moto_server")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.write_all(
            b"PUT /bench HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .ok()?;
        let mut answer = String::new();
        c.read_to_string(&mut answer).ok()?;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "could not create the bench bucket: {answer}"
        );
    }
    let options = [
        ("endpoint", format!("http://127.0.0.1:{port}")),
        ("allow_http", "true".into()),
        ("access_key_id", "bench".into()),
        ("secret_access_key", "bench".into()),
        ("region", "us-east-1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Some(("s3://bench/motorpool".into(), options, child))
}

fn support_which(tool: &str) -> Option<()> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .any(|d| d.join(tool).is_file())
            .then_some(())
    })
}

fn main() {
    let mut server = None;
    let bucket = tempfile::tempdir().unwrap();
    let mut buckets = vec![(
        "file system".to_string(),
        format!("file://{}/motorpool", bucket.path().display()),
        Options::new(),
    )];
    if let Some((url, options, child)) = moto() {
        buckets.insert(0, ("S3 (moto)".into(), url, options));
        server = Some(child);
    }
    let bytes: u64 = blobs(0).iter().map(|(d, _)| d.size).sum();
    println!(
        "{} blobs, {:.1} MiB per round; medians of 3 rounds\n",
        blobs(0).len(),
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "| bucket | write: shard alone | write through | write behind (ack) | read: local | read: fetched one by one | read: fetched in batches |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, url, options) in &buckets {
        let mut cols: [Vec<f64>; 6] = Default::default();
        for round in 0..3 {
            let set = blobs(round + 1);
            let alone = tempfile::tempdir().unwrap();
            let s = Store::open(alone.path(), 8 << 30, false).unwrap();
            cols[0].push(write(&s, &set));
            cols[3].push(read(&s, &set, false));

            let through_dir = tempfile::tempdir().unwrap();
            let s = Store::open(through_dir.path(), 8 << 30, false).unwrap();
            s.put_behind(tier(url, options, TierWrite::Through), true);
            cols[1].push(write(&s, &set));

            let behind_dir = tempfile::tempdir().unwrap();
            let s = Store::open(behind_dir.path(), 8 << 30, false).unwrap();
            s.put_behind(tier(url, options, TierWrite::Behind), false);
            // Its own set, so the uploads it leaves pending are its own.
            let own = blobs(round + 100);
            cols[2].push(write(&s, &own));
            while s.drain_behind(256).unwrap() > 0 {}

            // A shard that lost its disk: every read goes to the bucket.
            for (col, batched) in [(4, false), (5, true)] {
                let empty = tempfile::tempdir().unwrap();
                let s = Store::open(empty.path(), 8 << 30, false).unwrap();
                s.put_behind(tier(url, options, TierWrite::Through), true);
                cols[col].push(read(&s, &set, batched));
            }
        }
        let mb = bytes as f64 / (1 << 20) as f64;
        let cell = |v: &Vec<f64>| {
            let m = median(v.clone());
            format!("{m:.2} s ({:.0} MiB/s)", mb / m)
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            cell(&cols[0]),
            cell(&cols[1]),
            cell(&cols[2]),
            cell(&cols[3]),
            cell(&cols[4]),
            cell(&cols[5])
        );
    }
    if let Some(mut c) = server {
        let _ = c.kill();
        let _ = c.wait();
    }
}
