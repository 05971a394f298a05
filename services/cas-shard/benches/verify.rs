//! What verifying reads costs a shard: blobs read straight from a store with read verification
//! off, on for a first read (the whole blob re-hashed), and on for later reads (the file's stamp
//! unchanged), in one run, alternating. `cargo bench -p motorpool-cas-shard --bench verify`.

use motorpool_cas_shard::store::Store;
use motorpool_messages::{BlobDigest, DigestFunction};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reads every blob whole (into a buffer reused from one blob to the next, as a data-stream
/// read hands the file to the socket) and returns GB/s.
fn read_all(s: &Store, digests: &[BlobDigest]) -> f64 {
    use std::io::Read;
    let t = Instant::now();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for d in digests {
        let (mut f, mut left, _pin) = s.open_read(0, d, 0, 0).unwrap();
        while left > 0 {
            let n = f.read(&mut buf[..left.min(1 << 20) as usize]).unwrap();
            assert!(n > 0);
            left -= n as u64;
            bytes += n as u64;
        }
    }
    bytes as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 8 << 30, false).unwrap();
    let large: Vec<BlobDigest> = (0..8u8)
        .map(|i| {
            let data: Vec<u8> = (0..64u32 << 20)
                .map(|j| (j as u8) ^ i.wrapping_mul(37))
                .collect();
            let d = DigestFunction::Sha256.digest_of(&data);
            s.put(0, &d, &data).unwrap();
            d
        })
        .collect();
    let small: Vec<(BlobDigest, Vec<u8>)> = (0..20_000u32)
        .map(|i| {
            let data: Vec<u8> = i.to_le_bytes().repeat(1024);
            (DigestFunction::Sha256.digest_of(&data), data)
        })
        .collect();
    for chunk in small.chunks(500) {
        let batch: Vec<(BlobDigest, &[u8])> =
            chunk.iter().map(|(d, b)| (*d, b.as_slice())).collect();
        s.put_batch(0, &batch);
    }
    let sha = {
        let data = vec![7u8; 256 << 20];
        let t = Instant::now();
        DigestFunction::Sha256.digest_of(&data);
        (256 << 20) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let (mut off, mut first, mut later) = (Vec::new(), Vec::new(), Vec::new());
    let (mut small_off, mut small_first, mut small_on) = (Vec::new(), Vec::new(), Vec::new());
    let small_rate = |s: &Store| {
        let t = Instant::now();
        for (d, _) in &small {
            s.read(0, d, 0, 0).unwrap();
        }
        small.len() as f64 / t.elapsed().as_secs_f64()
    };
    for _ in 0..5 {
        s.set_verify_reads(false);
        off.push(read_all(&s, &large));
        small_off.push(small_rate(&s));
        s.set_verify_reads(true);
        first.push(read_all_fresh(&s, &large));
        later.push(read_all(&s, &large));
        small_first.push(small_rate(&s));
        small_on.push(small_rate(&s));
    }
    println!(
        "\nShard reads, 8 x 64 MiB and 20,000 x 4 KiB blobs, page cache warm, 5 rounds (medians)\n"
    );
    println!("| | verification off | on | loss | limit |");
    println!("|---|---|---|---|---|");
    let (o, f, l) = (median(off), median(first), median(later));
    println!(
        "| 64 MiB blobs, a read after the file last hashed | {o:.2} GB/s | {l:.2} GB/s | {:.1}% | stat of the file |",
        (1.0 - l / o) * 100.0
    );
    println!(
        "| 64 MiB blobs, first read after start or change | {o:.2} GB/s | {f:.2} GB/s | {:.1}% | SHA-256 1 core {sha:.2} GB/s |",
        (1.0 - f / o) * 100.0
    );
    let (so, sf, sn) = (median(small_off), median(small_first), median(small_on));
    for (what, on) in [
        (
            "4 KiB blobs, a read after their pack last hashed (the active pack's: every read)",
            sn,
        ),
        ("4 KiB blobs, first read after start or change", sf),
    ] {
        println!(
            "| {what} | {:.0}k/s | {:.0}k/s | {:.1}% | - |",
            so / 1e3,
            on / 1e3,
            (1.0 - on / so) * 100.0
        );
    }
}

/// A first read: the store forgets what it verified, as a restart does.
fn read_all_fresh(s: &Store, digests: &[BlobDigest]) -> f64 {
    s.forget_verified();
    read_all(s, digests)
}
