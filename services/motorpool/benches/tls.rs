//! The CAS over TLS beside plain gRPC: two stacks as `motorpool up` runs them (`--tls` or
//! not), the same client (tonic's generated one) and the same blobs, in one run. Prints a
//! Markdown table of medians and the TLS/plain ratio of each.
//!
//! `cargo bench -p motorpool --bench tls` (`MOTORPOOL_BENCH_QUICK=1`: fewer rounds).

#[path = "../tests/support/mod.rs"]
mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use futures::StreamExt;
use std::time::{Duration, Instant};
use support::*;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Figures {
    write_mbps: f64,
    read_mbps: f64,
    /// The gateway's CPU seconds per GB read.
    read_cpu_s_per_gb: f64,
    /// This client's CPU seconds per GB read.
    client_cpu_s_per_gb: f64,
    batch_read_ms: f64,
    find_missing_ms: f64,
}

async fn measure(stack: &Stack, ch: AuthChannel, rounds: usize) -> Figures {
    let mut bsc = bs::byte_stream_client::ByteStreamClient::new(ch.clone())
        .max_decoding_message_size(MAX_MSG)
        .max_encoding_message_size(MAX_MSG);
    let mut cas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch)
        .max_decoding_message_size(MAX_MSG);
    let gateway = stack.child_pid(&["gateway"]).unwrap();
    let size = 64 << 20;
    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    let (mut read_cpu, mut client_cpu) = (0.0, 0.0);
    let me = std::process::id();
    for r in 0..rounds {
        let data = bytes(1000 + r as u64, size);
        let d = sha(&data);
        let reqs = write_requests(&write_name("", &d, &format!("u{r}")), &data, 0, 1 << 20);
        let t = Instant::now();
        bsc.write(futures::stream::iter(reqs)).await.unwrap();
        writes.push(t.elapsed());
        let (g0, _) = cpu_of(gateway);
        let (c0, _) = cpu_of(me);
        let t = Instant::now();
        let mut s = bsc
            .read(bs::ReadRequest {
                resource_name: read_name("", &d),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(m) = s.next().await {
            n += m.unwrap().data.len();
        }
        reads.push(t.elapsed());
        read_cpu += cpu_of(gateway).0 - g0;
        client_cpu += cpu_of(me).0 - c0;
        assert_eq!(n, size);
    }
    // 200 blobs of 4 KiB: uploaded once, read back in one batch, asked for with FindMissing.
    let small: Vec<Vec<u8>> = (0..200).map(|i| bytes(5000 + i, 4096)).collect();
    cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
        requests: small
            .iter()
            .map(|b| re::batch_update_blobs_request::Request {
                digest: Some(proto(&sha(b))),
                data: b.clone(),
                compressor: 0,
            })
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let digests: Vec<_> = small.iter().map(|b| proto(&sha(b))).collect();
    let (mut batch, mut find) = (Vec::new(), Vec::new());
    for _ in 0..rounds * 4 {
        let t = Instant::now();
        cas.batch_read_blobs(re::BatchReadBlobsRequest {
            digests: digests.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        batch.push(t.elapsed());
        let t = Instant::now();
        cas.find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: digests.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        find.push(t.elapsed());
    }
    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    Figures {
        write_mbps: mbps(median(writes)),
        read_mbps: mbps(median(reads)),
        read_cpu_s_per_gb: read_cpu / (rounds * size) as f64 * 1e9,
        client_cpu_s_per_gb: client_cpu / (rounds * size) as f64 * 1e9,
        batch_read_ms: median(batch).as_secs_f64() * 1e3,
        find_missing_ms: median(find).as_secs_f64() * 1e3,
    }
}

fn main() {
    let quick = std::env::var("MOTORPOOL_BENCH_QUICK").is_ok();
    let rounds = if quick { 3 } else { 9 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let plain = {
        let stack = Stack::up(&["--workers", "0"]);
        rt.block_on(async {
            let ch = stack.channel_with_frames(1 << 20).await;
            measure(&stack, ch, rounds).await
        })
    };
    let tls = {
        let stack = Stack::up(&["--workers", "0", "--tls"]);
        rt.block_on(async {
            let ch = stack.tls_channel_as(&stack.keys.admin).await;
            measure(&stack, ch, rounds).await
        })
    };
    println!("\n| CAS, one client, medians of {rounds} | plain gRPC | TLS | TLS / plain |");
    println!("|---|---|---|---|");
    let row = |name: &str, p: f64, t: f64, unit: &str| {
        println!("| {name} | {p:.1} {unit} | {t:.1} {unit} | {:.2} |", t / p);
    };
    row(
        "ByteStream write, 64 MiB",
        plain.write_mbps,
        tls.write_mbps,
        "MB/s",
    );
    row(
        "ByteStream read, 64 MiB",
        plain.read_mbps,
        tls.read_mbps,
        "MB/s",
    );
    row(
        "gateway CPU per GB read",
        plain.read_cpu_s_per_gb,
        tls.read_cpu_s_per_gb,
        "s",
    );
    row(
        "client CPU per GB read",
        plain.client_cpu_s_per_gb,
        tls.client_cpu_s_per_gb,
        "s",
    );
    row(
        "BatchReadBlobs, 200 x 4 KiB",
        plain.batch_read_ms,
        tls.batch_read_ms,
        "ms",
    );
    row(
        "FindMissingBlobs, 200",
        plain.find_missing_ms,
        tls.find_missing_ms,
        "ms",
    );
}
