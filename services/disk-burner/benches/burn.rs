//! Burn throughput onto 1, 2, 4 and 24 drives at once beside the target's raw sequential write
//! speed, measured in the same run, the memory each burn added against its bound (the image is
//! read from its file, never held whole), and the burn time of a sparse image as its data grows
//! (its size fixed).
//!
//! `cargo bench -p motorpool-disk-burner --bench burn` prints a Markdown table. The drives are
//! sparse files next to each other on the machine's disk, so N drives share one device: the
//! aggregate is what matters. `MOTORPOOL_BENCH_QUICK=1` runs smaller sizes once.

use motorpool_disk_burner::burn::{BUFFER_PER_DRIVE, DriveState, burn_all};
use motorpool_disk_burner::gpt::{Gpt, Guid};
use motorpool_disk_burner::image::Image;
use motorpool_disk_burner::layout::LayoutOptions;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

const MIB: u64 = 1 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// MB/s of writing `bytes` sequentially with O_DIRECT in 8 MiB writes, then fsync.
fn raw_write(dir: &Path, bytes: u64) -> f64 {
    let path = dir.join("raw.bin");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .or_else(|_| {
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
        })
        .unwrap();
    let mut buf = vec![0u8; (8 * MIB) as usize + 4096];
    let at = buf.as_ptr().align_offset(4096);
    let chunk = &mut buf[at..at + (8 * MIB) as usize];
    chunk.copy_from_slice(&noise(chunk.len(), 7));
    let t = Instant::now();
    let mut off = 0;
    while off < bytes {
        f.write_all_at(chunk, off).unwrap();
        off += 8 * MIB;
    }
    f.sync_all().unwrap();
    let s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    bytes as f64 / s / 1e6
}

/// A sparse image of `size` with `data` bytes of incompressible data in 4 MiB extents spread
/// evenly.
fn image(dir: &Path, size: u64, data: u64, id: &str) -> Image {
    let path = dir.join(format!("{id}.img"));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let extents = (data / (4 * MIB)).max(1);
    let stride = size / extents;
    for i in 0..extents {
        f.write_all_at(&noise((4 * MIB) as usize, i), i * stride)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    // Noise, not a file system: mapped, not loaded (which would want ext4).
    let img = Image::map(&path, id).unwrap();
    std::fs::remove_file(&path).unwrap();
    img
}

fn drives(dir: &Path, n: usize, size: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("drive{i}.img"));
            let _ = std::fs::remove_file(&p);
            let mut f = std::fs::File::create(&p).unwrap();
            f.set_len(size).unwrap();
            Gpt {
                disk_guid: Guid::parse(&format!("00000000-{i:04x}-4000-8000-000000000000"))
                    .unwrap(),
                sectors: size / 512,
                partitions: vec![],
            }
            .write(&mut f)
            .unwrap();
            p
        })
        .collect()
}

/// The process's resident memory, bytes (Linux).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Seconds to burn (write + verify) `img` onto `n` fresh drives, and the most resident memory the
/// burn added (sampled every 20 ms).
fn burn_secs(dir: &Path, img: &Image, n: usize) -> (f64, f64, u64) {
    let paths = drives(dir, n, 4 << 30);
    let opts = LayoutOptions {
        esp_bytes: 32 * MIB,
        slots: 2,
        overlay_percent: 10,
        by_size: Vec::new(),
        // The menu is a few small files; the table measures the image's bytes.
        boot_menu: false,
    };
    let t = Instant::now();
    let writing = std::sync::Mutex::new(None::<Instant>);
    let verify_started = std::sync::Mutex::new(Vec::new());
    let on = |_: &Path, s: &DriveState| {
        if let DriveState::Verifying { done: 0, .. } = s {
            verify_started.lock().unwrap().push(Instant::now());
        }
        if let DriveState::Burning { done: 0, .. } = s {
            writing.lock().unwrap().get_or_insert_with(Instant::now);
        }
    };
    let base = rss();
    let peak = std::sync::atomic::AtomicU64::new(base);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reports = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let r = burn_all(&paths, img, &opts, &on);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    let total = t.elapsed().as_secs_f64();
    for r in &reports {
        assert!(matches!(r.state, DriveState::Ready { .. }), "{r:?}");
    }
    let write_end = verify_started
        .lock()
        .unwrap()
        .iter()
        .max()
        .copied()
        .unwrap();
    let write = write_end
        .duration_since(writing.lock().unwrap().unwrap())
        .as_secs_f64();
    for p in paths {
        std::fs::remove_file(p).unwrap();
    }
    (write, total, peak.into_inner().saturating_sub(base))
}

fn main() {
    let quick = std::env::var("MOTORPOOL_BENCH_QUICK").is_ok_and(|v| v == "1");
    let runs = if quick { 1 } else { 3 };
    let data = if quick { 64 * MIB } else { 256 * MIB };
    let dir = tempfile::tempdir_in(
        std::env::var("MOTORPOOL_BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into()),
    )
    .unwrap();
    println!(
        "# Disk burner ({} run(s) each, median; drives are sparse files on the same disk)\n",
        runs
    );
    let raw = median((0..runs).map(|_| raw_write(dir.path(), 4 * data)).collect());
    println!("| measure | MB/s | vs raw sequential write |\n|---|---:|---:|");
    println!(
        "| raw sequential write, O_DIRECT, 8 MiB writes + fsync ({} MiB) | {raw:.0} | 100% |",
        4 * data / MIB
    );
    let img = image(dir.path(), 1 << 30, data, "bench");
    let mut memory = Vec::new();
    for n in [1usize, 2, 4, 24] {
        let results: Vec<(f64, f64, u64)> =
            (0..runs).map(|_| burn_secs(dir.path(), &img, n)).collect();
        let write = median(results.iter().map(|r| r.0).collect());
        let total = median(results.iter().map(|r| r.1).collect());
        memory.push((n, results.iter().map(|r| r.2).max().unwrap_or(0)));
        let bytes = (n as u64 * img.manifest.mapped_bytes()) as f64;
        println!(
            "| burn to {n} drive(s): write phase, aggregate ({} MiB each) | {:.0} | {:.0}% |",
            img.manifest.mapped_bytes() / MIB,
            bytes / write / 1e6,
            100.0 * bytes / write / 1e6 / raw
        );
        println!(
            "| burn to {n} drive(s): write + read-back verify, aggregate | {:.0} | |",
            bytes / total / 1e6
        );
    }
    println!(
        "\n| drives at once | peak memory the burn added (MiB) | bound: one {} MiB buffer per drive (MiB) |\n|---:|---:|---:|",
        BUFFER_PER_DRIVE / MIB
    );
    for (n, peak) in memory {
        println!(
            "| {n} | {:.1} | {} |",
            peak as f64 / MIB as f64,
            n as u64 * BUFFER_PER_DRIVE / MIB
        );
    }
    println!(
        "\n| sparse 1 GiB image, data | burn time to 1 drive (s) | s per GiB of data |\n|---:|---:|---:|"
    );
    for d in [data / 4, data / 2, data] {
        let img = image(dir.path(), 1 << 30, d, "sparse");
        let t = median(
            (0..runs)
                .map(|_| burn_secs(dir.path(), &img, 1).1)
                .collect(),
        );
        println!(
            "| {} MiB | {t:.2} | {:.2} |",
            d / MIB,
            t / (d as f64 / (1u64 << 30) as f64)
        );
    }
}
