//! What identifying a call costs the gateway: `Auth::identify` (the SHA-256 of the presented key
//! and a lookup among 1,000 keys), timed per call. `cargo bench -p motorpool-gateway --bench auth`.

use motorpool_config::{Anonymous, AuthConfig};
use motorpool_gateway::auth::{Auth, KeyEntry, KeysFile, Role, hash_key};
use std::time::Instant;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("mp_{i:064x}")).collect();
    let file = KeysFile {
        keys: keys
            .iter()
            .enumerate()
            .map(|(i, k)| KeyEntry {
                id: format!("client-{i}"),
                sha256: hex::encode(hash_key(k)),
                roles: vec![Role::Read, Role::WriteCas],
                instances: vec![],
                max_lane: "build".into(),
                api: false,
            })
            .collect(),
    };
    let path = dir.path().join("keys.toml");
    file.write(&path).unwrap();
    let auth = Auth::open(&AuthConfig {
        keys_file: Some(path),
        anonymous: Anonymous::None,
    })
    .unwrap();
    let headers: Vec<http::HeaderMap> = keys
        .iter()
        .map(|k| {
            let mut h = http::HeaderMap::new();
            h.insert("authorization", format!("Bearer {k}").parse().unwrap());
            h
        })
        .collect();
    let mut times = Vec::with_capacity(100_000);
    for i in 0..100_000 {
        let t = Instant::now();
        let who = auth.identify(&headers[i % headers.len()]).unwrap();
        times.push(t.elapsed());
        std::hint::black_box(who);
    }
    times.sort();
    let us = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    println!("\nIdentifying a call, 100,000 calls among 1,000 keys\n");
    println!("| | p50 | p99 | goal |");
    println!("|---|---|---|---|");
    println!(
        "| `Auth::identify` | {:.2} µs | {:.2} µs | p50 < 20 µs |",
        us(0.5),
        us(0.99)
    );
}
