//! CAS benchmark: the whole stack as `motorpool up` runs it, beside the physical limits measured
//! in the same run. Prints a Markdown table of medians.
//!
//! `cargo bench -p motorpool --bench cas` (set `MOTORPOOL_BENCH_QUICK=1` for a short smoke run,
//! `MOTORPOOL_BENCH_BAZEL=0` to skip the Bazel rows, `MOTORPOOL_BENCH_ONLY=bytestream,batch,find,
//! bazel,nats` to run some sections, `MOTORPOOL_BENCH_HIT_FLAGS="--jobs=8"` to add Bazel flags to
//! the all-hit rebuilds).
//!
//! The client shares the two cores with the stack, so it is kept light, as a client that cares
//! about throughput is: the services' allocator; ByteStream writes of 16 KiB messages whose
//! chunks go out as slices of the blob, several messages to a `writev` ([`LeanWriter`]); and
//! ByteStream reads that take each chunk as a slice of the received buffer over a connection
//! that accepts 1 MiB HTTP/2 frames. Each write and read is also measured through tonic's
//! generated client (every chunk copied; for reads, netty's 16 KiB frames as Bazel 4 reads), in
//! rows of their own.

#[path = "../tests/support/mod.rs"]
mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use bytes::{Buf, Bytes};
use futures::StreamExt;
use motorpool_messages::{BlobDigest, DigestFunction};
use std::time::{Duration, Instant};
use support::AuthChannel as Channel;
use support::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The services' allocator: the client's megabyte buffers should not be faulted in afresh for
/// every chunk either.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Row {
    name: String,
    median: String,
    limit: String,
    ratio: String,
    goal: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Single-core rate of `f` over a 256 MiB buffer, GB/s (median of 3).
fn rate(buf: &[u8], mut f: impl FnMut(&[u8])) -> f64 {
    median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f(buf);
                gbps(buf.len() as u64, t.elapsed())
            })
            .collect(),
    )
}

fn unique(base: &[u8], rep: u64) -> Vec<u8> {
    let mut v = base.to_vec();
    v[..8].copy_from_slice(&rep.to_le_bytes());
    let end = v.len();
    v[end - 8..].copy_from_slice(&(rep ^ 0x5555).to_le_bytes());
    v
}

async fn write_blob(c: &mut Clients, d: &BlobDigest, data: &[u8]) -> Duration {
    let name = write_name("", d, &uuid::Uuid::new_v4().to_string());
    let chunk = 16 * 1024;
    let n = data.len().div_ceil(chunk);
    let reqs = futures::stream::iter(0..n).map(move |i| {
        let start = i * chunk;
        let end = (start + chunk).min(data.len());
        bs::WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: start as i64,
            finish_write: end == data.len(),
            data: data[start..end].to_vec(),
        }
    });
    // The stream borrows `data`; run it to completion here.
    let reqs: Vec<bs::WriteRequest> = reqs.collect().await;
    let t = Instant::now();
    let r =
        c.bs.write(futures::stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
    let e = t.elapsed();
    assert_eq!(r.committed_size, d.size as i64);
    e
}

/// Byte slices sent as one buffer, in order, with vectored writes.
struct Parts {
    parts: std::collections::VecDeque<Bytes>,
    remaining: usize,
}

impl Parts {
    fn new(parts: Vec<Bytes>) -> Parts {
        let remaining = parts.iter().map(Bytes::len).sum();
        Parts {
            parts: parts.into(),
            remaining,
        }
    }
}

impl Buf for Parts {
    fn remaining(&self) -> usize {
        self.remaining
    }
    fn chunk(&self) -> &[u8] {
        self.parts.front().map(|b| &b[..]).unwrap_or(&[])
    }
    fn advance(&mut self, mut cnt: usize) {
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("advance within remaining");
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }
    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts) {
            *slot = std::io::IoSlice::new(part);
            n += 1;
        }
        n
    }
}

/// A ByteStream Write client over `h2` directly. It sends the same 16 KiB `WriteRequest`s as
/// Bazel, as a throughput-minded client does: each message's few header bytes are encoded apart
/// and its chunk goes out as a slice of the blob, never copied into an encode buffer as tonic's
/// generated client does; and [`LeanWriter::PACK`] messages share a DATA frame, sent with one
/// `writev` (netty, under Bazel, also hands several messages to each `writev`; `h2` sends one
/// frame per write).
struct LeanWriter {
    send: h2::client::SendRequest<Parts>,
    uri: String,
    /// `authorization: Bearer <key>`.
    auth: String,
}

impl LeanWriter {
    /// Messages per DATA frame: 16 x 16 KiB stays within `h2`'s default send buffer (400 KiB).
    const PACK: usize = 16;

    async fn connect(addr: std::net::SocketAddr, key: &str) -> LeanWriter {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(tcp)
            .await
            .unwrap();
        tokio::spawn(conn);
        LeanWriter {
            send,
            uri: format!("http://{addr}/google.bytestream.ByteStream/Write"),
            auth: format!("Bearer {key}"),
        }
    }

    /// One message's bytes before its data: the gRPC prefix, then every field but `data`, then
    /// `data`'s tag and length (prost writes no empty `data`).
    fn head(req: &bs::WriteRequest, data_len: usize) -> Bytes {
        use prost::Message;
        let mut fields = req.encode_to_vec();
        prost::encoding::encode_key(10, prost::encoding::WireType::LengthDelimited, &mut fields);
        prost::encoding::encode_varint(data_len as u64, &mut fields);
        let mut out = Vec::with_capacity(5 + fields.len());
        out.push(0);
        out.extend_from_slice(&((fields.len() + data_len) as u32).to_be_bytes());
        out.extend_from_slice(&fields);
        out.into()
    }

    async fn write(&mut self, d: &BlobDigest, data: &Bytes) -> Duration {
        let name = write_name("", d, &uuid::Uuid::new_v4().to_string());
        let chunk = 16 * 1024;
        let t = Instant::now();
        let req = http::Request::post(&self.uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", &self.auth)
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut stream) = send.send_request(req, false).unwrap();
        let mut start = 0;
        let mut frame = Vec::new();
        while start < data.len() {
            let end = (start + chunk).min(data.len());
            let head = Self::head(
                &bs::WriteRequest {
                    resource_name: if start == 0 {
                        name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: start as i64,
                    finish_write: end == data.len(),
                    data: Vec::new(),
                },
                end - start,
            );
            frame.push(head);
            frame.push(data.slice(start..end));
            start = end;
            if frame.len() < 2 * Self::PACK && start < data.len() {
                continue;
            }
            let frame = Parts::new(std::mem::take(&mut frame));
            let len = frame.remaining();
            stream.reserve_capacity(len);
            while stream.capacity() < len {
                std::future::poll_fn(|cx| stream.poll_capacity(cx))
                    .await
                    .expect("stream open")
                    .unwrap();
            }
            stream.send_data(frame, start == data.len()).unwrap();
        }
        let mut body = response.await.unwrap().into_body();
        let mut reply = Vec::new();
        while let Some(part) = body.data().await {
            let part = part.unwrap();
            body.flow_control().release_capacity(part.len()).unwrap();
            reply.extend_from_slice(&part);
        }
        let trailers = body.trailers().await.unwrap().expect("gRPC trailers");
        let e = t.elapsed();
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "{trailers:?}"
        );
        let r = <bs::WriteResponse as prost::Message>::decode(&reply[5..]).unwrap();
        assert_eq!(r.committed_size, d.size as i64);
        e
    }
}

/// Reads a blob with tonic's generated client: every chunk decoded into a new `Vec`.
async fn read_blob(c: &mut Clients, d: &BlobDigest) -> Duration {
    let t = Instant::now();
    let mut s =
        c.bs.read(bs::ReadRequest {
            resource_name: read_name("", d),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0u64;
    while let Some(m) = s.next().await {
        n += m.unwrap().data.len() as u64;
    }
    assert_eq!(n, d.size);
    t.elapsed()
}

/// ByteStream Read with each `ReadResponse.data` taken as a slice of the received buffer.
#[derive(Clone, Copy)]
struct SliceRead;

impl Codec for SliceRead {
    type Encode = bs::ReadRequest;
    type Decode = bytes::Bytes;
    type Encoder = SliceRead;
    type Decoder = SliceRead;

    fn encoder(&mut self) -> SliceRead {
        SliceRead
    }

    fn decoder(&mut self) -> SliceRead {
        SliceRead
    }
}

impl Encoder for SliceRead {
    type Item = bs::ReadRequest;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        prost::Message::encode(&item, dst).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl Decoder for SliceRead {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<bytes::Bytes>, Self::Error> {
        use bytes::Buf;
        if !src.has_remaining() {
            return Ok(Some(bytes::Bytes::new()));
        }
        // `data` (field 10, length-delimited) is the message's only field.
        let key = prost::encoding::decode_varint(src).map_err(bad)?;
        if key != (10 << 3 | 2) {
            return Err(tonic::Status::internal(format!(
                "unexpected field key {key}"
            )));
        }
        let len = prost::encoding::decode_varint(src).map_err(bad)? as usize;
        if len != src.remaining() {
            return Err(tonic::Status::internal(
                "ReadResponse of an unexpected shape",
            ));
        }
        Ok(Some(src.copy_to_bytes(len)))
    }
}

fn bad(e: prost::DecodeError) -> tonic::Status {
    tonic::Status::internal(e.to_string())
}

/// Reads a blob through [`SliceRead`] on `channel`.
async fn read_blob_sliced(channel: &Channel, d: &BlobDigest) -> Duration {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let t = Instant::now();
    let mut s = grpc
        .server_streaming(
            tonic::Request::new(bs::ReadRequest {
                resource_name: read_name("", d),
                read_offset: 0,
                read_limit: 0,
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/google.bytestream.ByteStream/Read",
            ),
            SliceRead,
        )
        .await
        .unwrap()
        .into_inner();
    let mut n = 0u64;
    while let Some(m) = s.next().await {
        n += m.unwrap().len() as u64;
    }
    assert_eq!(n, d.size);
    t.elapsed()
}

/// CPU seconds used so far by each of `pids`.
fn cpu_now(pids: &[u32]) -> Vec<f64> {
    pids.iter().map(|p| cpu_of(*p).0).collect()
}

async fn bytestream_rows(
    rows: &mut Vec<Row>,
    c: &mut Clients,
    wide: &Channel,
    stack: &Stack,
    label: &str,
    sizes: &[(u64, usize)],
    limits: &Limits,
) {
    let sha_rate = limits.sha;
    // Where a write's CPU goes: this client, the gateway, the shard (all on the same cores).
    let pids = [
        Some(std::process::id()),
        stack.child_pid(&["gateway"]),
        stack.child_pid(&["cas-shard"]),
    ];
    let pids: Option<Vec<u32>> = pids.into_iter().collect();
    let mut lean = LeanWriter::connect(stack.grpc, &stack.keys.admin).await;
    for &(size, reps) in sizes {
        let base = bytes(size, size as usize);
        let (mut w, mut w_bazel) = (Vec::new(), Vec::new());
        let mut write_cpu = [0.0f64; 3];
        let (mut r, mut r_bazel) = (Vec::new(), Vec::new());
        for rep in 0..reps as u64 {
            let data = Bytes::from(unique(&base, rep + 1));
            let d = DigestFunction::Sha256.digest_of(&data);
            let before = cpu_now(pids.as_deref().unwrap_or_default());
            w.push(gbps(size, lean.write(&d, &data).await));
            let after = cpu_now(pids.as_deref().unwrap_or_default());
            for (sum, (a, b)) in write_cpu.iter_mut().zip(after.iter().zip(&before)) {
                *sum += a - b;
            }
            drop(data);
            r.push(gbps(size, read_blob_sliced(wide, &d).await));
            r_bazel.push(gbps(size, read_blob(c, &d).await));
            // The same write through tonic's generated client, as Bazel's own copies each chunk.
            let data = unique(&base, u64::MAX - rep);
            let d = DigestFunction::Sha256.digest_of(&data);
            w_bazel.push(gbps(size, write_blob(c, &d, &data).await));
        }
        let (w, r) = (median(w), median(r));
        let (w_bazel, r_bazel) = (median(w_bazel), median(r_bazel));
        let human = if size >= 1 << 30 {
            format!("{} GiB", size >> 30)
        } else {
            format!("{} MiB", size >> 20)
        };
        rows.push(Row {
            name: format!("ByteStream write {human} ({label}, 16 KiB chunks, SHA-256)"),
            median: format!("{w:.2} GB/s"),
            limit: format!(
                "SHA-256 1 core {sha_rate:.2} GB/s; page cache {:.2}-{:.2} GB/s",
                limits.page_cache_fresh, limits.page_cache_reused
            ),
            ratio: format!("{:.0}%", 100.0 * w / sha_rate),
            goal: if label == "direct" && size >= 64 << 20 {
                ">= 70%".into()
            } else {
                "-".into()
            },
        });
        rows.push(Row {
            name: format!(
                "ByteStream write {human} ({label}), generated client: each chunk encoded into tonic's buffer"
            ),
            median: format!("{w_bazel:.2} GB/s"),
            limit: String::new(),
            ratio: format!("{:.0}%", 100.0 * w_bazel / sha_rate),
            goal: "-".into(),
        });
        if pids.is_some() && size >= 64 << 20 {
            // /proc counts CPU in 10 ms ticks: only large writes are long enough to tell.
            let per_gb = write_cpu.map(|s| s / (size as f64 * reps as f64 / 1e9));
            rows.push(Row {
                name: format!(
                    "ByteStream write {human} ({label}): CPU per GB written, client / gateway / shard"
                ),
                median: format!(
                    "{:.2} / {:.2} / {:.2} s",
                    per_gb[0], per_gb[1], per_gb[2]
                ),
                limit: format!("SHA-256 alone {:.2} s", 1.0 / sha_rate),
                ratio: String::new(),
                goal: "-".into(),
            });
        }
        rows.push(Row {
            name: format!("ByteStream read {human} ({label})"),
            median: format!("{r:.2} GB/s"),
            limit: String::new(),
            ratio: String::new(),
            goal: if label == "direct" && size >= 64 << 20 {
                ">= 1.5 GB/s".into()
            } else {
                "-".into()
            },
        });
        rows.push(Row {
            name: format!(
                "ByteStream read {human} ({label}), as Bazel 4 reads: 16 KiB HTTP/2 frames, generated client"
            ),
            median: format!("{r_bazel:.2} GB/s"),
            limit: String::new(),
            ratio: String::new(),
            goal: "-".into(),
        });
    }
}

fn batch_request(blobs: &[(BlobDigest, Vec<u8>)]) -> re::BatchUpdateBlobsRequest {
    re::BatchUpdateBlobsRequest {
        requests: blobs
            .iter()
            .map(|(d, b)| re::batch_update_blobs_request::Request {
                digest: Some(proto(d)),
                data: b.clone(),
                compressor: 0,
            })
            .collect(),
        ..Default::default()
    }
}

/// Uploads blobs as Bazel does: requests under the batch limit, several in flight.
async fn batch_upload(c: &Clients, blobs: &[(BlobDigest, Vec<u8>)]) -> Duration {
    let per_request = (4 * 1024 * 1024 - 64 * 1024) / (blobs[0].1.len() + 80);
    let reqs: Vec<_> = blobs.chunks(per_request).map(batch_request).collect();
    let t = Instant::now();
    let futs = reqs.into_iter().map(|r| {
        let mut cas = c.cas.clone();
        async move {
            let resp = cas.batch_update_blobs(r).await.unwrap().into_inner();
            assert!(
                resp.responses
                    .iter()
                    .all(|r| r.status.as_ref().unwrap().code == 0)
            );
        }
    });
    futures::future::join_all(futs).await;
    t.elapsed()
}

fn small_blobs(seed: u64, n: usize, size: usize) -> Vec<(BlobDigest, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let b = bytes(seed * 1_000_000 + i as u64, size);
            (DigestFunction::Sha256.digest_of(&b), b)
        })
        .collect()
}

fn bazel_rows(rows: &mut Vec<Row>, stack: &Stack, ideal: std::net::SocketAddr, reps: usize) {
    use support::workspace::{Bazel, Workspace};
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 50);
    // Extra Bazel flags for every one of these builds (`--jobs=8`, say), from the environment.
    let extra: Vec<String> = std::env::var("MOTORPOOL_BENCH_HIT_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let with_extra =
        |v: Vec<String>| -> Vec<String> { v.into_iter().chain(extra.clone()).collect() };
    let flags = with_extra(vec![
        "//...".to_string(),
        format!("--remote_cache=grpc://{}", stack.grpc),
        stack.bazel_auth(&stack.keys.ci),
    ]);
    // Bazel's own cache on local disk: the same all-hit rebuild with no server in between, which
    // is what Bazel's execution phase costs by itself, whichever cache it reads from.
    let disk = with_extra(vec![
        "//...".to_string(),
        format!("--disk_cache={}", dir.path().join("disk-cache").display()),
    ]);
    // The same through a gRPC cache that costs nothing (see `ideal`): Bazel's own gRPC floor.
    let nothing = with_extra(vec![
        "//...".to_string(),
        format!("--remote_cache=grpc://{ideal}"),
    ]);
    let methods = ["GetActionResult", "Read"];
    let mut before = Vec::new();
    // `--batch`, a fresh JVM per command as CI often runs Bazel (`clean --expunge` between
    // builds), and a warm Bazel server as developers run it (`clean`, which keeps the server).
    for batch in [true, false] {
        let root = dir.path().join(if batch { "batch" } else { "server" });
        let bazel = if batch {
            Bazel::new(&ws, &root)
        } else {
            Bazel::with_server(&ws, &root)
        };
        let clean = || {
            if batch {
                bazel.run("clean", &["--expunge".into()]);
            } else {
                bazel.run("clean", &[]);
            }
        };
        // Fill each cache (the first time round) and warm the server on each.
        for f in [&flags, &disk, &nothing] {
            clean();
            bazel.run("build", f);
        }
        if before.is_empty() {
            // Latencies of hits only: the first build's misses and uploads are behind.
            before = methods.iter().map(|m| gateway_buckets(stack, m)).collect();
        }
        let (mut floor, mut hit, mut local, mut grpc_floor) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            clean();
            floor.push(
                bazel
                    .run("build", &["--nobuild".into(), "//...".into()])
                    .elapsed
                    .as_secs_f64(),
            );
            for (flags, times) in [
                (&flags, &mut hit),
                (&disk, &mut local),
                (&nothing, &mut grpc_floor),
            ] {
                clean();
                let run = bazel.run("build", flags);
                let (total, hits, internal) = run.process_summary();
                assert_eq!(hits, total - internal, "all hits");
                times.push(run.elapsed.as_secs_f64());
            }
        }
        clean();
        if !batch {
            bazel.run("shutdown", &[]);
        }
        let (f, h, l, g) = (
            median(floor),
            median(hit),
            median(local),
            median(grpc_floor),
        );
        let how = if batch {
            "bazel --batch, after clean --expunge"
        } else {
            "warm Bazel server, after clean"
        };
        rows.push(Row {
            name: format!(
                "Bazel all-hit rebuild, 50 libs + 50 tests, {how}{}",
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(", {}", extra.join(" "))
                }
            ),
            median: format!("{h:.2} s"),
            limit: format!(
                "floor (--nobuild) {f:.2} s; Bazel's own --disk_cache {l:.2} s; a gRPC cache \
                 that does nothing (a map in memory) {g:.2} s"
            ),
            ratio: format!(
                "{:.3}x the disk cache; {:.3}x the do-nothing gRPC cache",
                h / l,
                h / g
            ),
            goal: "<= 1.05x the disk cache".into(),
        });
    }
    for (m, before) in methods.iter().zip(&before) {
        let after = gateway_buckets(stack, m);
        let (p50, calls) = quantile_between(before, &after, 0.5);
        let (p99, _) = quantile_between(before, &after, 0.99);
        rows.push(Row {
            name: format!("{m} in the gateway during the all-hit rebuilds"),
            median: format!("p50 {:.3} ms", p50 * 1e3),
            limit: format!("p99 {:.2} ms; {calls:.0} calls", p99 * 1e3),
            ratio: String::new(),
            goal: if *m == "GetActionResult" {
                "p50 < 0.5 ms".into()
            } else {
                String::new()
            },
        });
    }
}

/// The gateway's latency histogram of `method` so far: `(upper bound in seconds, calls at or
/// under it)`, cumulative, from its metrics.
fn gateway_buckets(stack: &Stack, method: &str) -> Vec<(f64, f64)> {
    let metrics = stack.http_get("/metrics");
    let prefix = "motorpool_gateway_request_duration_seconds_bucket{";
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter(|l| l.contains(&format!("method=\"{method}\"")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = l.rsplit(' ').next()?.trim().parse().ok()?;
            Some((le, n))
        })
        .collect()
}

/// The `q` quantile of the calls between two [`gateway_buckets`] snapshots, interpolated within
/// its bucket (the buckets are Prometheus's: 0.1, 0.25, 0.5, 1, 2.5 ms, ...), and the calls.
fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> (f64, f64) {
    let count =
        |v: &[(f64, f64)], le: f64| v.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, n)| *n);
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| (*le, n - count(before, *le)))
        .collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in &delta {
        if n >= want && n > 0.0 {
            if !le.is_finite() {
                return (prev.0, total);
            }
            let share = if n > prev.1 {
                (want - prev.1) / (n - prev.1)
            } else {
                1.0
            };
            return (prev.0 + (le - prev.0) * share, total);
        }
        prev = (le, n);
    }
    (f64::NAN, total)
}

/// The gateway's total seconds and calls of `method` so far, from its metrics.
fn gateway_seconds(stack: &Stack, method: &str) -> (f64, f64) {
    let metrics = stack.http_get("/metrics");
    let value = |kind: &str| {
        let prefix =
            format!("motorpool_gateway_request_duration_seconds_{kind}{{method=\"{method}\"}}");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

/// What a client spends on FindMissingBlobs protobufs alone: encoding the request and decoding a
/// reply naming half of it (median of 5, milliseconds). Part of every measured call.
fn client_protobuf_ms(digests: &[re::Digest]) -> f64 {
    use prost::Message;
    let reply = re::FindMissingBlobsResponse {
        missing_blob_digests: digests[digests.len() / 2..].to_vec(),
    }
    .encode_to_vec();
    median(
        (0..5)
            .map(|_| {
                let req = re::FindMissingBlobsRequest {
                    blob_digests: digests.to_vec(),
                    ..Default::default()
                };
                let t = Instant::now();
                std::hint::black_box(req.encode_to_vec());
                std::hint::black_box(re::FindMissingBlobsResponse::decode(&reply[..]).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

/// What bounds a write, measured at the start of the run (GB/s).
struct Limits {
    /// SHA-256 on one core: the shard hashes each write on one.
    sha: f64,
    /// New files into the page cache, on memory the machine has not used lately.
    page_cache_fresh: f64,
    /// The same, on memory a deleted file has just freed.
    page_cache_reused: f64,
}

/// GB/s of writing new 1 GiB files (one thread, 1 MiB writes, no fsync), as a shard stores a
/// large blob, twice over (median of 3 each):
/// - on pages the machine has not used lately: the files are kept until all three are written,
///   as the shard keeps its blobs. These virtual machines hand free memory back to their host
///   within seconds (free page reporting, DAMON page-out), and the first touch of such a page
///   costs far more than `memcpy`. This bounds any ingest that keeps what it writes in the page
///   cache, as a cache must for its reads to be fast.
/// - on pages a deleted file has just given back (each file is deleted right before the next is
///   written): the page cache's own speed, and the ceiling on a machine whose memory is in use.
///
/// An ingest row falls between the two, depending on how much the machine freed just before.
fn page_cache_rates(chunk: &[u8]) -> (f64, f64) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str| {
        let mut f = std::fs::File::create(dir.path().join(name)).unwrap();
        let t = Instant::now();
        for _ in 0..1024 {
            f.write_all(chunk).unwrap();
        }
        gbps(1 << 30, t.elapsed())
    };
    let fresh = (0..3).map(|i| write(&format!("f{i}"))).collect();
    let reused = (0..3)
        .map(|i| {
            std::fs::remove_file(dir.path().join(format!("f{i}"))).unwrap();
            write(&format!("r{i}"))
        })
        .collect();
    (median(fresh), median(reused))
}

/// Whether the section `name` runs (`MOTORPOOL_BENCH_ONLY` lists sections; unset = all).
fn section(name: &str) -> bool {
    std::env::var("MOTORPOOL_BENCH_ONLY")
        .map(|v| v.split(',').any(|s| s.trim() == name))
        .unwrap_or(true)
}

fn main() {
    let quick = std::env::var("MOTORPOOL_BENCH_QUICK").is_ok();
    let with_bazel = std::env::var("MOTORPOOL_BENCH_BAZEL")
        .map(|v| v != "0")
        .unwrap_or(true)
        && !quick
        && section("bazel");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();

    // Physical limits, measured first on an idle machine.
    let buf = bytes(42, 256 << 20);
    let sha_rate = rate(&buf, |b| {
        std::hint::black_box(DigestFunction::Sha256.digest_of(b));
    });
    let b3_rate = rate(&buf, |b| {
        std::hint::black_box(DigestFunction::Blake3.digest_of(b));
    });
    let mut dst = vec![0u8; buf.len()];
    let memcpy = rate(&buf, |b| {
        dst.copy_from_slice(b);
        std::hint::black_box(&dst);
    });
    drop(dst);
    let (fresh, reused) = page_cache_rates(&buf[..1 << 20]);
    let limits = Limits {
        sha: sha_rate,
        page_cache_fresh: fresh,
        page_cache_reused: reused,
    };
    for (n, v) in [
        ("SHA-256, one core", sha_rate),
        ("BLAKE3, one core", b3_rate),
        ("memcpy", memcpy),
        (
            "new 1 GiB files into the page cache, one core: pages not used lately",
            fresh,
        ),
        ("the same, on pages a deleted file just gave back", reused),
    ] {
        rows.push(Row {
            name: format!("limit: {n}"),
            median: format!("{v:.2} GB/s"),
            limit: String::new(),
            ratio: String::new(),
            goal: String::new(),
        });
    }

    let sizes: Vec<(u64, usize)> = if quick {
        vec![(1 << 20, 3), (64 << 20, 1)]
    } else {
        vec![(1 << 20, 21), (64 << 20, 5), (1 << 30, 3)]
    };
    {
        let stack = Stack::up(&["--workers", "0"]);
        rt.block_on(async {
            let mut c = stack.clients().await;
            if section("bytestream") {
                let wide = stack.channel_with_frames(1 << 20).await;
                bytestream_rows(&mut rows, &mut c, &wide, &stack, "direct", &sizes, &limits).await;
            }

            if section("batch") {
                // BatchUpdateBlobs: 10k blobs of 1 KiB.
                let reps = if quick { 1 } else { 5 };
                let mut rates = Vec::new();
                for rep in 0..reps {
                    let blobs = small_blobs(100 + rep, 10_000, 1024);
                    let t = batch_upload(&c, &blobs).await;
                    rates.push(10_000.0 / t.as_secs_f64());
                }
                let r = median(rates);
                rows.push(Row {
                    name: "BatchUpdateBlobs, 10k blobs of 1 KiB".into(),
                    median: format!("{:.0} blobs/s", r),
                    limit: String::new(),
                    ratio: String::new(),
                    goal: ">= 50k blobs/s".into(),
                });
            }
            if section("find") {
                // FindMissingBlobs: half present.
                let present = small_blobs(7, 50_000, 64);
                for chunk in present.chunks(20_000) {
                    batch_upload(&c, chunk).await;
                }
                for n in [10_000usize, 100_000] {
                    let mut digests: Vec<re::Digest> =
                        present.iter().take(n / 2).map(|(d, _)| proto(d)).collect();
                    digests.extend((0..n / 2).map(|i| {
                        proto(&DigestFunction::Sha256.digest_of(format!("absent-{i}").as_bytes()))
                    }));
                    let reps = if quick { 3 } else { 15 };
                    let mut times = Vec::new();
                    let before = gateway_seconds(&stack, "FindMissingBlobs");
                    for _ in 0..reps {
                        let req = re::FindMissingBlobsRequest {
                            blob_digests: digests.clone(),
                            ..Default::default()
                        };
                        let t = Instant::now();
                        let missing = c
                            .cas
                            .find_missing_blobs(req)
                            .await
                            .unwrap()
                            .into_inner()
                            .missing_blob_digests;
                        times.push(t.elapsed().as_secs_f64() * 1000.0);
                        assert_eq!(missing.len(), n / 2);
                    }
                    let after = gateway_seconds(&stack, "FindMissingBlobs");
                    let server_ms = (after.0 - before.0) / (after.1 - before.1).max(1.0) * 1e3;
                    let client_ms = client_protobuf_ms(&digests);
                    rows.push(Row {
                        name: format!("FindMissingBlobs, {}k digests, half present", n / 1000),
                        median: format!("{:.1} ms", median(times)),
                        limit: format!(
                            "client's protobuf work {client_ms:.1} ms; in the gateway {server_ms:.1} ms (mean)"
                        ),
                        ratio: String::new(),
                        goal: if n == 100_000 {
                            "< 75 ms".into()
                        } else {
                            "-".into()
                        },
                    });
                }
            }
        });
        if with_bazel {
            let ideal = ideal::start(&rt);
            bazel_rows(&mut rows, &stack, ideal, 3);
        }
    }
    if section("nats") {
        // The alternative transport, for the ADR: large blobs chunked over NATS.
        let stack = Stack::up(&["--workers", "0", "--blob-transport", "nats"]);
        rt.block_on(async {
            let mut c = stack.clients().await;
            let wide = stack.channel_with_frames(1 << 20).await;
            let sizes: Vec<(u64, usize)> = if quick {
                vec![(64 << 20, 1)]
            } else {
                vec![(64 << 20, 5)]
            };
            bytestream_rows(
                &mut rows,
                &mut c,
                &wide,
                &stack,
                "nats chunks",
                &sizes,
                &limits,
            )
            .await;
        });
    }

    println!("\n| measure | median | limit (same run) | ratio | goal |\n|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.name, r.median, r.limit, r.ratio, r.goal
        );
    }
}

/// A REAPI cache that does nothing but keep blobs and action results in a map: no checks, no
/// bus, no disk. What Bazel's all-hit rebuild costs through any gRPC cache on this machine is
/// its time against this server; Motorpool's own cost is the rest.
mod ideal {
    use super::re;
    use bazel_remote_apis::google::bytestream as bs;
    use bs::byte_stream_server::{ByteStream, ByteStreamServer};
    use futures::StreamExt;
    use re::action_cache_server::{ActionCache, ActionCacheServer};
    use re::capabilities_server::{Capabilities, CapabilitiesServer};
    use re::content_addressable_storage_server::{
        ContentAddressableStorage, ContentAddressableStorageServer,
    };
    use std::collections::HashMap;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use tonic::{Request, Response, Status, Streaming};

    type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

    #[derive(Clone, Default)]
    struct Ideal {
        blobs: Arc<Mutex<HashMap<String, bytes::Bytes>>>,
        ac: Arc<Mutex<HashMap<String, re::ActionResult>>>,
    }

    fn key(d: Option<&re::Digest>) -> String {
        d.map_or_else(String::new, |d| d.hash.clone())
    }

    #[tonic::async_trait]
    impl Capabilities for Ideal {
        async fn get_capabilities(
            &self,
            _: Request<re::GetCapabilitiesRequest>,
        ) -> Result<Response<re::ServerCapabilities>, Status> {
            use re::digest_function::Value as F;
            Ok(Response::new(re::ServerCapabilities {
                cache_capabilities: Some(re::CacheCapabilities {
                    digest_functions: vec![F::Sha256 as i32],
                    action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                        update_enabled: true,
                    }),
                    max_batch_total_size_bytes: 4 << 20,
                    ..Default::default()
                }),
                low_api_version: Some(bazel_remote_apis::build::bazel::semver::SemVer {
                    major: 2,
                    ..Default::default()
                }),
                high_api_version: Some(bazel_remote_apis::build::bazel::semver::SemVer {
                    major: 2,
                    minor: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }))
        }
    }

    #[tonic::async_trait]
    impl ContentAddressableStorage for Ideal {
        async fn find_missing_blobs(
            &self,
            r: Request<re::FindMissingBlobsRequest>,
        ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
            let blobs = self.blobs.lock().unwrap();
            let missing_blob_digests = r
                .into_inner()
                .blob_digests
                .into_iter()
                .filter(|d| d.size_bytes > 0 && !blobs.contains_key(&d.hash))
                .collect();
            Ok(Response::new(re::FindMissingBlobsResponse {
                missing_blob_digests,
            }))
        }

        async fn batch_update_blobs(
            &self,
            r: Request<re::BatchUpdateBlobsRequest>,
        ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
            let mut blobs = self.blobs.lock().unwrap();
            let responses = r
                .into_inner()
                .requests
                .into_iter()
                .map(|q| {
                    blobs.insert(key(q.digest.as_ref()), q.data.into());
                    re::batch_update_blobs_response::Response {
                        digest: q.digest,
                        status: None,
                    }
                })
                .collect();
            Ok(Response::new(re::BatchUpdateBlobsResponse { responses }))
        }

        async fn batch_read_blobs(
            &self,
            r: Request<re::BatchReadBlobsRequest>,
        ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
            let blobs = self.blobs.lock().unwrap();
            let responses = r
                .into_inner()
                .digests
                .into_iter()
                .map(|d| re::batch_read_blobs_response::Response {
                    data: blobs.get(&d.hash).map(|b| b.to_vec()).unwrap_or_default(),
                    digest: Some(d),
                    ..Default::default()
                })
                .collect();
            Ok(Response::new(re::BatchReadBlobsResponse { responses }))
        }

        type GetTreeStream = Stream<re::GetTreeResponse>;
        async fn get_tree(
            &self,
            _: Request<re::GetTreeRequest>,
        ) -> Result<Response<Self::GetTreeStream>, Status> {
            Err(Status::unimplemented("not needed by Bazel 4 with a cache"))
        }

        async fn split_blob(
            &self,
            _: Request<re::SplitBlobRequest>,
        ) -> Result<Response<re::SplitBlobResponse>, Status> {
            Err(Status::unimplemented("split"))
        }

        async fn splice_blob(
            &self,
            _: Request<re::SpliceBlobRequest>,
        ) -> Result<Response<re::SpliceBlobResponse>, Status> {
            Err(Status::unimplemented("splice"))
        }

        type GetChunkMappingStream = Stream<re::GetChunkMappingResponse>;
        async fn get_chunk_mapping(
            &self,
            _: Request<re::GetChunkMappingRequest>,
        ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
            Err(Status::unimplemented("chunk mapping"))
        }

        async fn register_chunk_mapping(
            &self,
            _: Request<Streaming<re::RegisterChunkMappingRequest>>,
        ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
            Err(Status::unimplemented("chunk mapping"))
        }
    }

    /// `.../blobs/<hash>/<size>` or `.../uploads/<uuid>/blobs/<hash>/<size>`: the hash.
    fn hash_of(resource: &str) -> String {
        let parts: Vec<&str> = resource.split('/').collect();
        let i = parts.iter().rposition(|p| *p == "blobs").unwrap_or(0);
        parts.get(i + 1).unwrap_or(&"").to_string()
    }

    #[tonic::async_trait]
    impl ByteStream for Ideal {
        type ReadStream = Stream<bs::ReadResponse>;
        async fn read(
            &self,
            r: Request<bs::ReadRequest>,
        ) -> Result<Response<Self::ReadStream>, Status> {
            let r = r.into_inner();
            let data = self
                .blobs
                .lock()
                .unwrap()
                .get(&hash_of(&r.resource_name))
                .cloned()
                .ok_or_else(|| Status::not_found("no such blob"))?;
            let data = data.slice(r.read_offset.max(0) as usize..);
            let chunks: Vec<Result<bs::ReadResponse, Status>> = if data.is_empty() {
                vec![Ok(bs::ReadResponse::default())]
            } else {
                data.chunks(1 << 20)
                    .map(|c| Ok(bs::ReadResponse { data: c.to_vec() }))
                    .collect()
            };
            Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
        }

        async fn write(
            &self,
            r: Request<Streaming<bs::WriteRequest>>,
        ) -> Result<Response<bs::WriteResponse>, Status> {
            let mut s = r.into_inner();
            let (mut name, mut data) = (String::new(), Vec::new());
            while let Some(m) = s.next().await {
                let m = m?;
                if name.is_empty() {
                    name = m.resource_name;
                }
                data.extend_from_slice(&m.data);
                if m.finish_write {
                    break;
                }
            }
            let committed_size = data.len() as i64;
            self.blobs
                .lock()
                .unwrap()
                .insert(hash_of(&name), data.into());
            Ok(Response::new(bs::WriteResponse { committed_size }))
        }

        async fn query_write_status(
            &self,
            _: Request<bs::QueryWriteStatusRequest>,
        ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
            Ok(Response::new(bs::QueryWriteStatusResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl ActionCache for Ideal {
        async fn get_action_result(
            &self,
            r: Request<re::GetActionResultRequest>,
        ) -> Result<Response<re::ActionResult>, Status> {
            let k = key(r.get_ref().action_digest.as_ref());
            self.ac
                .lock()
                .unwrap()
                .get(&k)
                .cloned()
                .map(Response::new)
                .ok_or_else(|| Status::not_found("no result"))
        }

        async fn update_action_result(
            &self,
            r: Request<re::UpdateActionResultRequest>,
        ) -> Result<Response<re::ActionResult>, Status> {
            let r = r.into_inner();
            let result = r.action_result.unwrap_or_default();
            self.ac
                .lock()
                .unwrap()
                .insert(key(r.action_digest.as_ref()), result.clone());
            Ok(Response::new(result))
        }
    }

    /// Serves the ideal cache on a free port of this host until the process ends.
    pub fn start(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let ideal = Ideal::default();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let max = 64 << 20;
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(CapabilitiesServer::new(ideal.clone()))
                .add_service(
                    ContentAddressableStorageServer::new(ideal.clone())
                        .max_decoding_message_size(max),
                )
                .add_service(ByteStreamServer::new(ideal.clone()).max_decoding_message_size(max))
                .add_service(ActionCacheServer::new(ideal).max_decoding_message_size(max))
                .serve_with_incoming(incoming),
        );
        addr
    }
}
