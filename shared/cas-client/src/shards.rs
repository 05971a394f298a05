//! The gateway's view of the CAS shards: the registry (a KV watch), placement, and typed calls to
//! shards over the bus and the direct data stream.
//!
//! Placement is rendezvous hashing over the live shards: every gateway computes the same owner for
//! a digest with no coordination, and a shard joining or leaving moves only its share of digests.
//! Lookups that miss on the owner search the other live shards before answering "missing", so a
//! blob written before a membership change is still found, and "present" is never said for a blob
//! that no live shard holds.

use crate::error::ApiError;
use bytes::Bytes;
use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use motorpool_bus::{Bus, BusError, subjects};
use motorpool_messages::cas::*;
use motorpool_messages::{BlobDigest, ErrorCode, WireError, codec};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub use motorpool_config::BlobTransport;

#[derive(Clone)]
struct Live {
    info: ShardInfo,
    seen: Instant,
    weight_key: u64,
    pool: Arc<Pool>,
}

/// The live shards and the calls to them.
#[derive(Clone)]
pub struct Shards {
    bus: Bus,
    live: Arc<RwLock<HashMap<String, Live>>>,
    timeout: Duration,
    liveness: Duration,
    transport: BlobTransport,
    /// Shards every written blob goes to (the owner and the next ones in placement order).
    replicas: usize,
    /// The deployment's data key, proven to a shard on every new data-stream connection.
    data_key: Option<[u8; 32]>,
}

/// One shard picked for a call.
#[derive(Clone)]
pub struct ShardRef {
    pub id: String,
    addr: String,
    pool: Arc<Pool>,
}

/// A snapshot of the live shards with rendezvous placement over them.
pub struct Placement {
    /// `(weight key, shard)`, sorted by shard id.
    shards: Vec<(u64, ShardRef)>,
}

impl Placement {
    /// Index (into the id-sorted shards) of the owner of `d`.
    fn owner_index(&self, d: &BlobDigest) -> usize {
        let k = digest_key(d);
        let mut best = 0;
        let mut best_score = 0;
        for (i, (w, _)) in self.shards.iter().enumerate() {
            let score = splitmix(w ^ k);
            if i == 0 || score > best_score {
                best = i;
                best_score = score;
            }
        }
        best
    }

    /// The owner of `d`.
    pub fn owner(&self, d: &BlobDigest) -> &ShardRef {
        &self.shards[self.owner_index(d)].1
    }

    /// All shards in placement order for `d`: the owner first.
    pub fn ranked(&self, d: &BlobDigest) -> Vec<ShardRef> {
        let k = digest_key(d);
        let mut v: Vec<_> = self
            .shards
            .iter()
            .map(|(w, r)| (splitmix(w ^ k), r.clone()))
            .collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        v.into_iter().map(|(_, r)| r).collect()
    }

    /// The live shards, by id.
    pub fn members(&self) -> Vec<ShardRef> {
        self.shards.iter().map(|(_, r)| r.clone()).collect()
    }

    /// Number of live shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// True when no shard is live.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

/// A stream over a channel receiver.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = T> + Send>> {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn digest_key(d: &BlobDigest) -> u64 {
    u64::from_le_bytes(d.hash[..8].try_into().expect("8 bytes"))
}

impl Shards {
    /// Starts watching the shard registry.
    pub async fn watch(
        bus: Bus,
        timeout: Duration,
        liveness: Duration,
        transport: BlobTransport,
    ) -> Result<Shards, BusError> {
        let kv = bus.ensure_kv(subjects::cas::registry_config()).await?;
        let shards = Shards {
            bus,
            live: Arc::default(),
            timeout,
            liveness,
            transport,
            replicas: 2,
            data_key: None,
        };
        let live = shards.live.clone();
        tokio::spawn(async move {
            loop {
                match kv.watch_with_history(">").await {
                    Ok(mut watch) => {
                        while let Some(entry) = watch.next().await {
                            let Ok(entry) = entry else { break };
                            apply_registry_entry(&live, entry);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Cannot watch the shard registry; retrying")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(shards)
    }

    /// Sets how many shards each written blob goes to (default 2: the owner and one replica, so
    /// losing one shard loses no blob). Fewer live shards than that means fewer copies.
    /// Proves `key` to shards on their data stream (shards with a data key serve no one else).
    pub fn with_data_key(mut self, key: Option<[u8; 32]>) -> Shards {
        self.data_key = key;
        self
    }

    pub fn with_replicas(mut self, replicas: usize) -> Shards {
        self.replicas = replicas.max(1);
        self
    }

    /// Live shards, sorted by id.
    pub fn live(&self) -> Vec<ShardInfo> {
        let mut v: Vec<_> = self.live_refs().into_iter().map(|(l, _)| l.info).collect();
        v.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        v
    }

    fn live_refs(&self) -> Vec<(Live, ShardRef)> {
        self.refs_within(1)
    }

    /// Shards heard from within `n` liveness windows. Silence counts only while this
    /// connection was up to hear (after a reconnection every shard gets a full window).
    fn refs_within(&self, n: u32) -> Vec<(Live, ShardRef)> {
        let now = motorpool_messages::now_ms();
        let window = self.liveness * n;
        let heard_for = self.bus.connected_for();
        self.live
            .read()
            .values()
            .filter(|l| {
                !l.info.draining
                    && l.seen.elapsed().min(heard_for) < window
                    && now.saturating_sub(l.info.heartbeat_at_ms) < 2 * window.as_millis() as u64
            })
            .map(|l| {
                (
                    l.clone(),
                    ShardRef {
                        id: l.info.shard_id.clone(),
                        addr: l.info.data_addr.clone(),
                        pool: l.pool.clone(),
                    },
                )
            })
            .collect()
    }

    /// The live shards now, for placing many digests with one look at the registry.
    pub fn placement(&self) -> Placement {
        let mut shards: Vec<(u64, ShardRef)> = self
            .live_refs()
            .into_iter()
            .map(|(l, r)| (l.weight_key, r))
            .collect();
        shards.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        Placement { shards }
    }

    /// Live shards in placement order for `d`: the owner first.
    pub fn ranked(&self, d: &BlobDigest) -> Vec<ShardRef> {
        self.placement().ranked(d)
    }

    /// The placement over live shards. With none (while the bus fails over, the registry's
    /// watch can stall and every shard look silent at once), waits up to a liveness window for
    /// one to be heard again, then places over the shards heard from within six windows: a
    /// shard that is really gone then fails its calls, and the next in rank is asked. Only with
    /// none of those either: UNAVAILABLE.
    async fn require_live(&self) -> Result<Placement, ApiError> {
        let deadline = tokio::time::Instant::now() + self.liveness;
        loop {
            let p = self.placement();
            if !p.shards.is_empty() {
                return Ok(p);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut shards: Vec<(u64, ShardRef)> = self
            .refs_within(6)
            .into_iter()
            .map(|(l, r)| (l.weight_key, r))
            .collect();
        if shards.is_empty() {
            return Err(ApiError::Unavailable(
                "no CAS shard is registered and alive".into(),
            ));
        }
        tracing::warn!(
            shards = shards.len(),
            "No shard heard from lately; placing over the ones heard from recently"
        );
        shards.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        Ok(Placement { shards })
    }

    /// Largest number of blob bytes per bus message (the server's payload limit, less framing).
    pub fn payload_budget(&self) -> usize {
        self.bus
            .max_payload()
            .saturating_sub(64 * 1024)
            .max(64 * 1024)
    }

    /// For each digest: is it missing from every live shard?
    pub async fn find_missing(
        &self,
        instance: &str,
        digests: &[BlobDigest],
    ) -> Result<Vec<bool>, ApiError> {
        let placement = self.require_live().await?;
        let mut missing = vec![true; digests.len()];
        // First round: each digest at its owner.
        let mut owners = vec![usize::MAX; digests.len()];
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); placement.len()];
        for (i, d) in digests.iter().enumerate() {
            if d.is_empty_blob() {
                missing[i] = false;
                continue;
            }
            let o = placement.owner_index(d);
            owners[i] = o;
            groups[o].push(i);
        }
        let calls = placement
            .shards
            .iter()
            .zip(groups)
            .filter(|(_, idx)| !idx.is_empty())
            .map(|((_, s), idx)| (s.clone(), idx))
            .collect();
        for i in self.find_on(instance, digests, calls).await {
            missing[i] = false;
        }
        // Second round: the rest on every other shard (only matters after membership changes).
        if placement.len() > 1 {
            let rest: Vec<usize> = (0..digests.len()).filter(|&i| missing[i]).collect();
            if !rest.is_empty() {
                let calls = placement
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(si, (_, s))| {
                        let idx: Vec<usize> =
                            rest.iter().copied().filter(|&i| owners[i] != si).collect();
                        (s.clone(), idx)
                    })
                    .filter(|(_, idx)| !idx.is_empty())
                    .collect();
                for i in self.find_on(instance, digests, calls).await {
                    missing[i] = false;
                }
            }
        }
        Ok(missing)
    }

    /// For each digest: is it missing from this one shard? A shard that does not answer is an
    /// error here (the caller decides).
    pub async fn find_missing_on(
        &self,
        shard: &ShardRef,
        instance: &str,
        digests: &[BlobDigest],
    ) -> Result<Vec<bool>, ApiError> {
        let mut missing = vec![false; digests.len()];
        for (part, chunk) in digests.chunks(16_384).enumerate() {
            let req = FindMissing {
                instance: instance.to_string(),
                digests: chunk.to_vec(),
            };
            let reply = self
                .bus
                .request_with_timeout(&subjects::cas::find_missing(&shard.id), &req, self.timeout)
                .await?;
            for m in reply.missing {
                if let Some(x) = missing.get_mut(part * 16_384 + m as usize) {
                    *x = true;
                }
            }
        }
        Ok(missing)
    }

    /// The replica set of `d` among the live shards now: the owner first.
    pub fn replica_set(&self, placement: &Placement, d: &BlobDigest) -> Vec<ShardRef> {
        self.targets(placement, d)
    }

    /// How many shards each blob is written to.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Asks each shard about its digests; returns the indices found somewhere. A shard that does
    /// not answer found nothing (a client then uploads again, which is always safe).
    async fn find_on(
        &self,
        instance: &str,
        digests: &[BlobDigest],
        calls: Vec<(ShardRef, Vec<usize>)>,
    ) -> Vec<usize> {
        const PER_MESSAGE: usize = 16_384;
        let mut futs = Vec::new();
        for (shard, idx) in calls {
            for part in idx.chunks(PER_MESSAGE).map(<[usize]>::to_vec) {
                let req = FindMissing {
                    instance: instance.to_string(),
                    digests: part.iter().map(|&i| digests[i]).collect(),
                };
                let subject = subjects::cas::find_missing(&shard.id);
                let bus = &self.bus;
                let timeout = self.timeout;
                futs.push(async move {
                    match bus.request_with_timeout(&subject, &req, timeout).await {
                        Ok(reply) => {
                            let mut present = vec![true; part.len()];
                            for m in reply.missing {
                                if let Some(p) = present.get_mut(m as usize) {
                                    *p = false;
                                }
                            }
                            part.iter().zip(present).filter(|(_, p)| *p).map(|(&i, _)| i).collect()
                        }
                        Err(error) => {
                            tracing::warn!(shard = %subject, %error, "FindMissing failed on a shard");
                            Vec::new()
                        }
                    }
                });
            }
        }
        join_all(futs).await.into_iter().flatten().collect()
    }

    /// Stores small blobs on their owner and replicas; one result per blob. A blob is stored
    /// when any copy is; when every target failed for a transient reason (a shard just died), the
    /// next shards in placement order are tried.
    pub async fn batch_write(
        &self,
        instance: &str,
        blobs: Vec<BlobPut>,
    ) -> Result<Vec<Option<WireError>>, ApiError> {
        let placement = self.require_live().await?;
        let n = blobs.len();
        let mut groups: HashMap<String, (ShardRef, Vec<(usize, BlobPut)>)> = HashMap::new();
        let mut first_rank = 0;
        for (i, b) in blobs.into_iter().enumerate() {
            let targets = self.targets(&placement, &b.digest);
            first_rank = targets.len();
            let last = targets.len() - 1;
            let mut b = Some(b);
            for (k, shard) in targets.into_iter().enumerate() {
                let blob = if k == last {
                    b.take().expect("moved once")
                } else {
                    b.clone().expect("present")
                };
                groups
                    .entry(shard.id.clone())
                    .or_insert_with(|| (shard, Vec::new()))
                    .1
                    .push((i, blob));
            }
        }
        let mut stored = vec![false; n];
        let mut errors: Vec<Option<WireError>> =
            vec![Some(WireError::new(ErrorCode::Unavailable, "no shard answered")); n];
        let mut retry = self
            .write_round(instance, groups, &mut stored, &mut errors)
            .await;
        for rank in first_rank..placement.len() {
            retry.retain(|(i, _)| !stored[*i]);
            retry.sort_by_key(|(i, _)| *i);
            retry.dedup_by_key(|(i, _)| *i);
            if retry.is_empty() {
                break;
            }
            let mut groups: HashMap<String, (ShardRef, Vec<(usize, BlobPut)>)> = HashMap::new();
            for (i, b) in retry.drain(..) {
                if let Some(shard) = placement.ranked(&b.digest).into_iter().nth(rank) {
                    groups
                        .entry(shard.id.clone())
                        .or_insert_with(|| (shard, Vec::new()))
                        .1
                        .push((i, b));
                }
            }
            retry = self
                .write_round(instance, groups, &mut stored, &mut errors)
                .await;
        }
        Ok(stored
            .into_iter()
            .zip(errors)
            .map(|(ok, e)| if ok { None } else { e })
            .collect())
    }

    /// One round of batch writes; returns the blobs that failed for a transient reason.
    async fn write_round(
        &self,
        instance: &str,
        groups: HashMap<String, (ShardRef, Vec<(usize, BlobPut)>)>,
        stored: &mut [bool],
        errors: &mut [Option<WireError>],
    ) -> Vec<(usize, BlobPut)> {
        let budget = self.payload_budget();
        let mut futs = Vec::new();
        for (shard, items) in groups.into_values() {
            let mut batch: Vec<(usize, BlobPut)> = Vec::new();
            let mut bytes = 0;
            let mut batches = Vec::new();
            for item in items {
                let len = item.1.data.len() + 48;
                if !batch.is_empty() && bytes + len > budget {
                    batches.push(std::mem::take(&mut batch));
                    bytes = 0;
                }
                bytes += len;
                batch.push(item);
            }
            if !batch.is_empty() {
                batches.push(batch);
            }
            for batch in batches {
                let subject = subjects::cas::batch_write(&shard.id);
                let (idx, blobs): (Vec<usize>, Vec<BlobPut>) = batch.into_iter().unzip();
                let req = BatchWrite {
                    instance: instance.to_string(),
                    blobs,
                };
                let bus = &self.bus;
                let timeout = self.timeout;
                futs.push(async move {
                    let res = bus.request_with_timeout(&subject, &req, timeout).await;
                    (idx, res, req.blobs)
                });
            }
        }
        let mut retry = Vec::new();
        for (idx, res, blobs) in join_all(futs).await {
            let results: Vec<Option<WireError>> = match res {
                Ok(r) => r.results,
                Err(e) => vec![Some(wire_of(e)); idx.len()],
            };
            for ((i, r), blob) in idx.into_iter().zip(results).zip(blobs) {
                match r {
                    None => stored[i] = true,
                    Some(e) => {
                        if matches!(e.code, ErrorCode::Unavailable | ErrorCode::DeadlineExceeded) {
                            retry.push((i, blob));
                        }
                        errors[i] = Some(e);
                    }
                }
            }
        }
        retry
    }

    /// Reads small blobs whole, from their owners and then from any other live shard.
    pub async fn batch_read(
        &self,
        instance: &str,
        digests: &[BlobDigest],
    ) -> Result<Vec<Result<Vec<u8>, WireError>>, ApiError> {
        let placement = self.require_live().await?;
        let mut out: Vec<Result<Vec<u8>, WireError>> = digests
            .iter()
            .map(|d| Err(WireError::not_found(format!("blob {d} not found"))))
            .collect();
        let mut pending: Vec<usize> = Vec::new();
        for (i, d) in digests.iter().enumerate() {
            if d.is_empty_blob() {
                out[i] = Ok(Vec::new());
            } else {
                pending.push(i);
            }
        }
        // Try rank 0 (the owner) for everything, then rank 1, ... for what is still not found.
        for rank in 0..placement.len() {
            if pending.is_empty() {
                break;
            }
            let mut groups: HashMap<String, (ShardRef, Vec<usize>)> = HashMap::new();
            for &i in &pending {
                let s = if rank == 0 {
                    Some(placement.owner(&digests[i]).clone())
                } else {
                    placement.ranked(&digests[i]).into_iter().nth(rank)
                };
                if let Some(s) = s {
                    groups
                        .entry(s.id.clone())
                        .or_insert_with(|| (s, Vec::new()))
                        .1
                        .push(i);
                }
            }
            let budget = self.payload_budget();
            let mut futs = Vec::new();
            for (shard, idx) in groups.into_values() {
                let mut start = 0;
                while start < idx.len() {
                    let mut end = start;
                    let mut bytes = 0u64;
                    while end < idx.len()
                        && (end == start || bytes + digests[idx[end]].size <= budget as u64)
                    {
                        bytes += digests[idx[end]].size + 48;
                        end += 1;
                    }
                    let part: Vec<usize> = idx[start..end].to_vec();
                    start = end;
                    let req = BatchRead {
                        instance: instance.to_string(),
                        digests: part.iter().map(|&i| digests[i]).collect(),
                    };
                    let subject = subjects::cas::batch_read(&shard.id);
                    let bus = &self.bus;
                    let timeout = self.timeout;
                    futs.push(async move {
                        (
                            part,
                            bus.request_with_timeout(&subject, &req, timeout).await,
                        )
                    });
                }
            }
            for (part, res) in join_all(futs).await {
                scatter(&mut out, part, res.map(|r| r.blobs), Err);
            }
            pending.retain(|&i| matches!(&out[i], Err(e) if e.code == ErrorCode::NotFound || e.code == ErrorCode::Unavailable || e.code == ErrorCode::DeadlineExceeded));
        }
        Ok(out)
    }

    /// Opens a streaming read of `digest` from the first shard that has it.
    pub async fn open_read(
        &self,
        instance: &str,
        d: &BlobDigest,
        offset: u64,
        limit: u64,
    ) -> Result<BlobReader, ApiError> {
        let placement = self.require_live().await?;
        let mut last = ApiError::NotFound(format!("blob {d} not found on any live shard"));
        for shard in placement.ranked(d) {
            let r = match self.transport {
                BlobTransport::Direct => {
                    self.open_read_direct(&shard, instance, d, offset, limit)
                        .await
                }
                BlobTransport::Nats => {
                    self.open_read_nats(&shard, instance, d, offset, limit)
                        .await
                }
            };
            match r {
                Ok(r) => return Ok(r),
                Err(e @ ApiError::NotFound(_)) | Err(e @ ApiError::Unavailable(_)) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn connect(&self, shard: &ShardRef) -> Result<DataStream, ApiError> {
        if let Some(c) = shard.pool.pop() {
            return Ok(c);
        }
        self.dial(shard).await
    }

    /// A new connection to the shard's data stream: its abstract Unix socket when the shard is
    /// on this host's network (no TCP/IP stack between them), TCP otherwise.
    async fn dial(&self, shard: &ShardRef) -> Result<DataStream, ApiError> {
        let mut conn = self.dial_raw(shard).await?;
        // The shard's challenge, and the proof that this side holds the data key.
        let hello = async {
            let DataReply::Challenge { nonce } = read_reply(&mut conn).await? else {
                return Err(std::io::Error::other(
                    "the shard did not start with a challenge",
                ));
            };
            let proof = motorpool_messages::cas::data_proof(self.data_key.as_ref(), &nonce);
            let frame =
                codec::encode(&DataRequest::Hello { proof }).map_err(std::io::Error::other)?;
            let mut out = Vec::with_capacity(frame.len() + 4);
            out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            out.extend_from_slice(&frame);
            conn.write_all(&out).await
        };
        tokio::time::timeout(Duration::from_secs(5), hello)
            .await
            .map_err(|_| std::io::Error::other("timed out"))
            .and_then(|r| r)
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "shard {} data stream at {}: hello: {e}",
                    shard.id, shard.addr
                ))
            })?;
        Ok(conn)
    }

    async fn dial_raw(&self, shard: &ShardRef) -> Result<DataStream, ApiError> {
        if let Some(local) = dial_local(&shard.addr) {
            metrics::counter!(crate::metric_names::CAS_DATA_CONNECTIONS_TOTAL, "transport" => "unix")
                .increment(1);
            return Ok(DataStream::Unix(local));
        }
        metrics::counter!(crate::metric_names::CAS_DATA_CONNECTIONS_TOTAL, "transport" => "tcp")
            .increment(1);
        let c = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&shard.addr))
            .await
            .map_err(|_| {
                ApiError::Unavailable(format!(
                    "shard {} data stream at {} timed out",
                    shard.id, shard.addr
                ))
            })?
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "shard {} data stream at {}: {e}",
                    shard.id, shard.addr
                ))
            })?;
        let _ = c.set_nodelay(true);
        Ok(DataStream::Tcp(c))
    }

    async fn open_read_direct(
        &self,
        shard: &ShardRef,
        instance: &str,
        d: &BlobDigest,
        offset: u64,
        limit: u64,
    ) -> Result<BlobReader, ApiError> {
        let mut conn = self.connect(shard).await?;
        let req = DataRequest::Read {
            instance: instance.to_string(),
            digest: *d,
            offset,
            limit,
        };
        let reply = exchange(&mut conn, &req)
            .await
            .map_err(|e| ApiError::Unavailable(format!("shard {}: {e}", shard.id)))?;
        match reply {
            DataReply::ReadReady { len } => Ok(BlobReader {
                source: Source::Direct {
                    conn: Some(conn),
                    pool: shard.pool.clone(),
                },
                remaining: len,
                len,
            }),
            DataReply::Error(e) => {
                shard.pool.push(conn);
                Err(e.into())
            }
            other => Err(ApiError::Internal(format!(
                "shard {} answered a read with {other:?}",
                shard.id
            ))),
        }
    }

    async fn open_read_nats(
        &self,
        shard: &ShardRef,
        instance: &str,
        d: &BlobDigest,
        offset: u64,
        limit: u64,
    ) -> Result<BlobReader, ApiError> {
        if offset > d.size {
            return Err(ApiError::Invalid(format!(
                "read offset {offset} is past the end of {d}"
            )));
        }
        // Probe with an empty read so NotFound surfaces before the stream starts.
        let probe = ReadChunk {
            instance: instance.to_string(),
            digest: *d,
            offset,
            limit: 1,
        };
        self.bus
            .request_with_timeout(&subjects::cas::read_chunk(&shard.id), &probe, self.timeout)
            .await
            .map_err(ApiError::from)?;
        let rest = d.size - offset;
        let len = if limit == 0 { rest } else { rest.min(limit) };
        Ok(BlobReader {
            source: Source::Nats {
                bus: self.bus.clone(),
                shard: shard.id.clone(),
                instance: instance.to_string(),
                digest: *d,
                offset,
                timeout: self.timeout,
                chunk: self.payload_budget() as u64,
            },
            remaining: len,
            len,
        })
    }

    /// Writes (or resumes) a large blob from a stream of chunks, to the owner and its replicas
    /// at once (each chunk is teed to every target). Committed when any target commits; a target
    /// that fails is counted as under-replicated (the reindexer copies the blob later).
    pub async fn write_stream<S>(
        &self,
        instance: &str,
        d: &BlobDigest,
        upload_id: &str,
        offset: u64,
        mut chunks: S,
    ) -> Result<u64, ApiError>
    where
        S: futures::Stream<Item = Result<WriteData, ApiError>> + Unpin,
    {
        let placement = self.require_live().await?;
        let targets = self.targets(&placement, d);
        if targets.len() == 1 {
            return self
                .write_to(&targets[0], instance, d, upload_id, offset, chunks)
                .await;
        }
        let mut senders = Vec::new();
        let mut writers = Vec::new();
        for t in &targets {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<WriteData, ApiError>>(8);
            senders.push(Some(tx));
            let rx = tokio_stream_from(rx);
            writers.push(self.write_to(t, instance, d, upload_id, offset, rx));
        }
        let pump = async move {
            while let Some(item) = chunks.next().await {
                let end = matches!(&item, Ok(w) if w.finish) || item.is_err();
                for slot in senders.iter_mut() {
                    let Some(tx) = slot else { continue };
                    let copy = match &item {
                        Ok(w) => Ok(WriteData {
                            data: w.data.clone(),
                            finish: w.finish,
                        }),
                        Err(e) => Err(ApiError::Invalid(e.to_string())),
                    };
                    if tx.send(copy).await.is_err() {
                        *slot = None; // that target gave up; the others go on
                    }
                }
                if end || senders.iter().all(Option::is_none) {
                    break;
                }
            }
        };
        let (_, results) = tokio::join!(pump, join_all(writers));
        committed_somewhere(d, &targets, results)
    }

    /// Stores a whole blob that is already in memory (at most [`DATA_PUT_MAX`] bytes) on the
    /// owner and its replicas at once: one round trip per target on the data stream, instead of
    /// a write's two. Committed when any target commits, like [`Shards::write_stream`].
    pub async fn put_whole(
        &self,
        instance: &str,
        d: &BlobDigest,
        data: Bytes,
    ) -> Result<u64, ApiError> {
        if data.len() as u64 != d.size || d.size > DATA_PUT_MAX {
            return Err(ApiError::Invalid(format!(
                "a whole-blob put of {d} carries {} bytes",
                data.len()
            )));
        }
        if self.transport == BlobTransport::Nats {
            self.write_blob(instance, d, data.to_vec()).await?;
            return Ok(d.size);
        }
        let placement = self.require_live().await?;
        let targets = self.targets(&placement, d);
        let puts = targets
            .iter()
            .map(|t| self.put_direct(t, instance, d, &data));
        let results = join_all(puts).await;
        committed_somewhere(d, &targets, results)
    }

    async fn put_direct(
        &self,
        shard: &ShardRef,
        instance: &str,
        d: &BlobDigest,
        data: &[u8],
    ) -> Result<u64, ApiError> {
        let mut conn = self.connect(shard).await?;
        let req = DataRequest::Put {
            instance: instance.to_string(),
            digest: *d,
        };
        let frame = codec::encode(&req).map_err(|e| ApiError::Internal(e.to_string()))?;
        // The frame and the body in one write: one packet for a small blob.
        let mut out = Vec::with_capacity(4 + frame.len() + data.len());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&frame);
        out.extend_from_slice(data);
        let mut attempt = 0;
        let reply = loop {
            let exchange = async {
                conn.write_all(&out).await?;
                read_reply(&mut conn).await
            };
            let failure = match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(reply)) => break reply,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer in {:?}", self.timeout),
            };
            attempt += 1;
            if attempt == 2 {
                return Err(ApiError::Unavailable(format!(
                    "shard {} data stream: {failure}",
                    shard.id
                )));
            }
            // A pooled connection may have died with the shard's last process; a put is
            // idempotent, so one more try on a new connection tells that from a dead shard.
            conn = self.dial(shard).await?;
        };
        match reply {
            DataReply::Committed { size } => {
                shard.pool.push(conn);
                Ok(size)
            }
            DataReply::Error(e) => {
                shard.pool.push(conn);
                Err(e.into())
            }
            other => Err(ApiError::Internal(format!(
                "shard {} answered a put with {other:?}",
                shard.id
            ))),
        }
    }

    async fn write_to<S>(
        &self,
        shard: &ShardRef,
        instance: &str,
        d: &BlobDigest,
        upload_id: &str,
        offset: u64,
        chunks: S,
    ) -> Result<u64, ApiError>
    where
        S: futures::Stream<Item = Result<WriteData, ApiError>> + Unpin,
    {
        match self.transport {
            BlobTransport::Direct => {
                self.write_direct(shard, instance, d, upload_id, offset, chunks)
                    .await
            }
            BlobTransport::Nats => {
                self.write_nats(shard, instance, d, upload_id, offset, chunks)
                    .await
            }
        }
    }

    /// The shards a blob is written to: the owner first, then its replicas.
    fn targets(&self, placement: &Placement, d: &BlobDigest) -> Vec<ShardRef> {
        if self.replicas <= 1 || placement.len() == 1 {
            return vec![placement.owner(d).clone()];
        }
        let mut ranked = placement.ranked(d);
        ranked.truncate(self.replicas);
        ranked
    }

    /// Copies a stored blob from one shard to another (verified again by the receiver).
    pub async fn copy(
        &self,
        instance: &str,
        d: &BlobDigest,
        from: &ShardRef,
        to: &ShardRef,
    ) -> Result<u64, ApiError> {
        let reader = match self.transport {
            BlobTransport::Direct => self.open_read_direct(from, instance, d, 0, 0).await?,
            BlobTransport::Nats => self.open_read_nats(from, instance, d, 0, 0).await?,
        };
        let chunks = Box::pin(futures::stream::unfold(reader, |mut r| async move {
            let item = r.next_chunk(1 << 20).await?;
            let finish = r.remaining == 0;
            Some((
                item.map(|data| WriteData {
                    data: data.into(),
                    finish,
                }),
                r,
            ))
        }));
        let upload_id = format!("copy-{}", from.id);
        self.write_to(to, instance, d, &upload_id, 0, chunks).await
    }

    async fn write_direct<S>(
        &self,
        shard: &ShardRef,
        instance: &str,
        d: &BlobDigest,
        upload_id: &str,
        offset: u64,
        mut chunks: S,
    ) -> Result<u64, ApiError>
    where
        S: futures::Stream<Item = Result<WriteData, ApiError>> + Unpin,
    {
        let mut conn = self.connect(shard).await?;
        let req = DataRequest::Write {
            instance: instance.to_string(),
            digest: *d,
            upload_id: upload_id.to_string(),
            offset,
        };
        let unavailable = |e: std::io::Error| {
            ApiError::Unavailable(format!("shard {} data stream: {e}", shard.id))
        };
        match exchange(&mut conn, &req).await.map_err(unavailable)? {
            DataReply::Committed { size } => {
                shard.pool.push(conn);
                return Ok(size);
            }
            DataReply::WriteReady { .. } => {}
            DataReply::Error(e) => {
                shard.pool.push(conn);
                return Err(e.into());
            }
            other => {
                return Err(ApiError::Internal(format!(
                    "shard answered a write with {other:?}"
                )));
            }
        }
        // Chunks go to the shard as they arrive; when the client is ahead, the ones already here
        // are gathered into frames of up to GATHER bytes (the shard takes frames of at most
        // 16 MiB, whatever size the client's messages were), sent with one writev from the
        // chunks' own buffers, never copied into a write buffer.
        const GATHER: usize = 1 << 20;
        let mut next = chunks.next().await;
        loop {
            let mut frame: Vec<Bytes> = Vec::new();
            let mut framed = 0usize;
            let (mut finished, mut ended, mut broke) = (false, false, None);
            loop {
                match next.take() {
                    None => ended = true,
                    // The client's stream broke: what came before it still goes to the shard,
                    // then dropping the connection keeps the upload resumable.
                    Some(Err(e)) => broke = Some(e),
                    Some(Ok(item)) => {
                        if !item.data.is_empty() {
                            framed += item.data.len();
                            frame.push(item.data);
                        }
                        finished = item.finish;
                    }
                }
                if finished || ended || broke.is_some() || framed >= GATHER {
                    break;
                }
                match chunks.next().now_or_never() {
                    Some(item) => next = item, // `None`: the stream ended
                    None => break,
                }
            }
            let parts = data_frames(frame, GATHER, finished);
            if write_gathered(&mut conn, &parts).await.is_err() {
                // The shard refused more data; its reply says why.
                return match read_reply(&mut conn).await {
                    Ok(DataReply::Error(e)) => Err(e.into()),
                    _ => Err(ApiError::Unavailable(format!(
                        "shard {} closed the upload",
                        shard.id
                    ))),
                };
            }
            if let Some(e) = broke {
                return Err(e);
            }
            if ended {
                return Err(ApiError::Invalid(
                    "the write stream ended without finish_write; resume at the offset QueryWriteStatus returns".into(),
                ));
            }
            if finished {
                break;
            }
            next = chunks.next().await;
        }
        match read_reply(&mut conn).await.map_err(unavailable)? {
            DataReply::Committed { size } => {
                shard.pool.push(conn);
                Ok(size)
            }
            DataReply::Error(e) => Err(e.into()),
            other => Err(ApiError::Internal(format!(
                "shard answered a finished write with {other:?}"
            ))),
        }
    }

    async fn write_nats<S>(
        &self,
        shard: &ShardRef,
        instance: &str,
        d: &BlobDigest,
        upload_id: &str,
        mut offset: u64,
        mut chunks: S,
    ) -> Result<u64, ApiError>
    where
        S: futures::Stream<Item = Result<WriteData, ApiError>> + Unpin,
    {
        let budget = self.payload_budget();
        let subject = subjects::cas::write_chunk(&shard.id);
        let mut buf: Vec<u8> = Vec::with_capacity(budget);
        loop {
            let (finish, end) = match chunks.next().await {
                Some(Ok(w)) => {
                    buf.extend_from_slice(&w.data);
                    (w.finish, false)
                }
                Some(Err(e)) => return Err(e),
                None => (false, true),
            };
            if buf.len() >= budget || finish || end {
                let req = WriteChunk {
                    instance: instance.to_string(),
                    digest: *d,
                    upload_id: upload_id.to_string(),
                    offset,
                    data: std::mem::take(&mut buf),
                    finish,
                };
                let status = self
                    .bus
                    .request_with_timeout(&subject, &req, self.timeout)
                    .await?;
                if status.complete {
                    return Ok(status.committed);
                }
                offset = status.committed;
            }
            if end {
                return Err(ApiError::Invalid(
                    "the write stream ended without finish_write; resume at the offset QueryWriteStatus returns".into(),
                ));
            }
        }
    }

    /// How far an upload got: `(committed, complete)`.
    pub async fn query_write(
        &self,
        instance: &str,
        d: &BlobDigest,
        upload_id: &str,
    ) -> Result<(u64, bool), ApiError> {
        let shard = self.require_live().await?.owner(d).clone();
        let req = QueryWrite {
            instance: instance.to_string(),
            digest: *d,
            upload_id: upload_id.to_string(),
        };
        let s = self
            .bus
            .request_with_timeout(&subjects::cas::query_write(&shard.id), &req, self.timeout)
            .await?;
        Ok((s.committed, s.complete))
    }

    /// The encoded ActionResult for `action`, from its owner or any other live shard.
    pub async fn ac_get(
        &self,
        instance: &str,
        action: &BlobDigest,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        for shard in self.require_live().await?.ranked(action) {
            let req = AcGet {
                instance: instance.to_string(),
                action: *action,
            };
            match self
                .bus
                .request_with_timeout(&subjects::cas::ac_get(&shard.id), &req, self.timeout)
                .await
            {
                Ok(AcEntry { result: Some(r) }) => return Ok(Some(r)),
                Ok(_) => {}
                Err(e) if e.is_transient() => {
                    tracing::warn!(shard = %shard.id, error = %e, "AcGet failed on a shard")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Stores an ActionResult on the owner of `action` and its replicas; stored when any is.
    pub async fn ac_put(
        &self,
        instance: &str,
        action: &BlobDigest,
        result: Vec<u8>,
    ) -> Result<(), ApiError> {
        let placement = self.require_live().await?;
        let targets = self.targets(&placement, action);
        let puts = targets.iter().map(|shard| {
            let req = AcPut {
                instance: instance.to_string(),
                action: *action,
                result: result.clone(),
            };
            let subject = subjects::cas::ac_put(&shard.id);
            async move {
                self.bus
                    .request_with_timeout(&subject, &req, self.timeout)
                    .await
            }
        });
        let mut first_err = None;
        for r in join_all(puts).await {
            match r {
                Ok(_) => return Ok(()),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.map_or_else(|| ApiError::Internal("no shard".into()), ApiError::from))
    }

    /// Reads one blob whole: in one bus message when it fits, else on the data stream.
    pub async fn read_blob(&self, instance: &str, d: &BlobDigest) -> Result<Vec<u8>, ApiError> {
        if d.size <= self.payload_budget() as u64 {
            return self
                .batch_read(instance, std::slice::from_ref(d))
                .await?
                .pop()
                .expect("one result")
                .map_err(ApiError::from);
        }
        let mut r = self.open_read(instance, d, 0, 0).await?;
        let mut out = Vec::with_capacity(r.len() as usize);
        while let Some(c) = r.next_chunk(1 << 20).await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    /// Stores one blob whole (verified by the shard against `d`): in one bus message when it
    /// fits, else on the data stream.
    pub async fn write_blob(
        &self,
        instance: &str,
        d: &BlobDigest,
        data: Vec<u8>,
    ) -> Result<(), ApiError> {
        if d.size <= self.payload_budget() as u64 {
            let put = BlobPut { digest: *d, data };
            return match self.batch_write(instance, vec![put]).await?.pop().flatten() {
                None => Ok(()),
                Some(e) => Err(e.into()),
            };
        }
        let upload_id = format!(
            "put-{:016x}",
            splitmix(digest_key(d) ^ motorpool_messages::now_ms())
        );
        let chunk = futures::stream::iter([Ok(WriteData {
            data: data.into(),
            finish: true,
        })]);
        self.write_stream(instance, d, &upload_id, 0, chunk).await?;
        Ok(())
    }

    /// Removes an ActionResult from every live shard.
    pub async fn ac_delete(&self, instance: &str, action: &BlobDigest) -> Result<(), ApiError> {
        for (_, shard) in self.require_live().await?.shards {
            let req = AcDelete {
                instance: instance.to_string(),
                action: *action,
            };
            let _ = self
                .bus
                .request_with_timeout(&subjects::cas::ac_delete(&shard.id), &req, self.timeout)
                .await;
        }
        Ok(())
    }
}

fn apply_registry_entry(
    live: &RwLock<HashMap<String, Live>>,
    entry: async_nats::jetstream::kv::Entry,
) {
    use async_nats::jetstream::kv::Operation;
    match entry.operation {
        Operation::Put => match codec::decode::<ShardInfo>(&entry.value) {
            // The bus lets a shard write only its own key; an entry naming another shard under
            // it is not that shard's.
            Ok(info) if info.shard_id != entry.key => {
                tracing::warn!(key = %entry.key, claimed = %info.shard_id, "Ignored a shard registration under another shard's key")
            }
            Ok(info) => {
                let mut live = live.write();
                let key = info.shard_id.clone();
                let weight_key = u64::from_le_bytes(
                    blake3::hash(key.as_bytes()).as_bytes()[..8]
                        .try_into()
                        .expect("8 bytes"),
                );
                match live.get_mut(&key) {
                    Some(l) if l.info.data_addr == info.data_addr => {
                        l.info = info;
                        l.seen = Instant::now();
                    }
                    _ => {
                        tracing::info!(shard = %key, data_addr = %info.data_addr, "CAS shard joined");
                        live.insert(
                            key,
                            Live {
                                info,
                                seen: Instant::now(),
                                weight_key,
                                pool: Arc::default(),
                            },
                        );
                    }
                }
            }
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "Ignored a malformed shard registration")
            }
        },
        Operation::Delete | Operation::Purge => {
            if live.write().remove(&entry.key).is_some() {
                tracing::info!(shard = %entry.key, "CAS shard left");
            }
        }
    }
}

/// Writes each reply item to its request index, or the call's error to all of them.
fn scatter<T>(
    out: &mut [T],
    idx: Vec<usize>,
    reply: Result<Vec<T>, BusError>,
    on_error: impl Fn(WireError) -> T,
) {
    match reply {
        Ok(items) => {
            for (i, item) in idx.into_iter().zip(items) {
                out[i] = item;
            }
        }
        Err(e) => {
            let e = wire_of(e);
            for i in idx {
                out[i] = on_error(e.clone());
            }
        }
    }
}

/// The outcome of writing one blob to several targets: committed when any target committed
/// (a replica that missed it is counted and logged; the reindexer copies it later).
fn committed_somewhere(
    d: &BlobDigest,
    targets: &[ShardRef],
    results: Vec<Result<u64, ApiError>>,
) -> Result<u64, ApiError> {
    let mut first_err = None;
    let mut size = None;
    for (t, r) in targets.iter().zip(results) {
        match r {
            Ok(n) => size = Some(n),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                } else {
                    metrics::counter!(crate::metric_names::CAS_UNDER_REPLICATED_TOTAL).increment(1);
                    tracing::warn!(blob = %d, shard = %t.id, "A replica missed a write");
                }
            }
        }
    }
    match (size, first_err) {
        (Some(n), None) => Ok(n),
        (Some(n), Some(e)) => {
            metrics::counter!(crate::metric_names::CAS_UNDER_REPLICATED_TOTAL).increment(1);
            tracing::warn!(blob = %d, error = %e, "A replica missed a write");
            Ok(n)
        }
        (None, Some(e)) => Err(e),
        (None, None) => Err(ApiError::Internal("no write target".into())),
    }
}

fn wire_of(e: BusError) -> WireError {
    match e {
        BusError::Remote(w) => w,
        BusError::Timeout { .. } => WireError::new(ErrorCode::DeadlineExceeded, e.to_string()),
        other => WireError::new(ErrorCode::Unavailable, other.to_string()),
    }
}

async fn exchange(conn: &mut DataStream, req: &DataRequest) -> std::io::Result<DataReply> {
    let frame = codec::encode(req).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame);
    conn.write_all(&out).await?;
    read_reply(conn).await
}

/// The data-stream frames carrying `chunks` (a `u32` little-endian length, then that many bytes)
/// in frames of at most `max` bytes, plus the zero-length frame that ends an upload when
/// `finish`. Only the length prefixes are new buffers; the chunks are sliced, never copied.
fn data_frames(chunks: Vec<Bytes>, max: usize, finish: bool) -> Vec<Bytes> {
    fn close(out: &mut Vec<Bytes>, frame: &mut Vec<Bytes>, len: &mut usize) {
        if *len > 0 {
            out.push(Bytes::copy_from_slice(&(*len as u32).to_le_bytes()));
            out.append(frame);
            *len = 0;
        }
    }
    let mut out = Vec::with_capacity(chunks.len() + 2);
    let (mut frame, mut len) = (Vec::new(), 0usize);
    for mut chunk in chunks {
        while !chunk.is_empty() {
            let take = (max - len).min(chunk.len());
            frame.push(chunk.split_to(take));
            len += take;
            if len == max {
                close(&mut out, &mut frame, &mut len);
            }
        }
    }
    close(&mut out, &mut frame, &mut len);
    if finish {
        out.push(Bytes::from_static(&[0; 4]));
    }
    out
}

/// Writes `parts` in order, with as few `writev` calls as the socket allows.
async fn write_gathered(conn: &mut DataStream, parts: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| std::io::IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = conn.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

async fn read_reply(conn: &mut DataStream) -> std::io::Result<DataReply> {
    let len = conn.read_u32_le().await? as usize;
    if len > 64 * 1024 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "oversized control frame",
        ));
    }
    let mut buf = vec![0u8; len];
    conn.read_exact(&mut buf).await?;
    codec::decode(&buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The shard with data stream `data_addr` at its abstract Unix socket address, if it is on this
/// network namespace (connecting to a Unix socket does not block: it is there or refused).
fn dial_local(data_addr: &str) -> Option<UnixStream> {
    let c =
        std::os::unix::net::UnixStream::connect_addr(&data_socket_addr(data_addr).ok()?).ok()?;
    c.set_nonblocking(true).ok()?;
    UnixStream::from_std(c).ok()
}

/// A shard's idle data-stream connections, newest last. One idle longer than [`POOL_IDLE`] is
/// not used again: the shard closes connections silent for two minutes, and a connection it
/// closed would fail the next call.
#[derive(Debug, Default)]
pub(crate) struct Pool(Mutex<Vec<(Instant, DataStream)>>);

/// How long a pooled connection may sit idle before it is dropped instead of reused.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(30);

impl Pool {
    pub(crate) fn push(&self, c: DataStream) {
        self.0.lock().push((Instant::now(), c));
    }

    pub(crate) fn pop(&self) -> Option<DataStream> {
        let mut pool = self.0.lock();
        // The oldest are at the front: drop those idle too long, take the newest.
        pool.retain(|(at, _)| at.elapsed() < POOL_IDLE);
        pool.pop().map(|(_, c)| c)
    }
}

/// A connection to a shard's data stream.
#[derive(Debug)]
pub(crate) enum DataStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for DataStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            DataStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DataStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DataStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            DataStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DataStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            DataStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            DataStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            DataStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One chunk of a write stream.
#[derive(Debug)]
pub struct WriteData {
    /// The chunk's bytes; a slice of the buffer it arrived in, where the caller has one.
    pub data: Bytes,
    pub finish: bool,
}

enum Source {
    Direct {
        conn: Option<DataStream>,
        pool: Arc<Pool>,
    },
    Nats {
        bus: Bus,
        shard: String,
        instance: String,
        digest: BlobDigest,
        offset: u64,
        timeout: Duration,
        chunk: u64,
    },
}

/// A blob being read from a shard.
pub struct BlobReader {
    source: Source,
    remaining: u64,
    len: u64,
}

impl BlobReader {
    /// Bytes this read yields in all.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty read.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next chunk of at most `max` bytes; `None` at the end.
    pub async fn next_chunk(&mut self, max: usize) -> Option<Result<Vec<u8>, ApiError>> {
        if self.remaining == 0 {
            if let Source::Direct { conn, pool } = &mut self.source
                && let Some(c) = conn.take()
            {
                pool.push(c);
            }
            return None;
        }
        match &mut self.source {
            Source::Direct { conn, .. } => {
                let n = (max as u64).min(self.remaining) as usize;
                // Read into spare capacity: no zeroing of a buffer about to be overwritten.
                let mut buf = Vec::with_capacity(n);
                let c = conn.as_mut()?;
                while buf.len() < n {
                    let broke = match c.read_buf(&mut buf).await {
                        Ok(0) => Some("the shard closed the connection".to_string()),
                        Ok(_) => None,
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(e) = broke {
                        *conn = None;
                        self.remaining = 0;
                        return Some(Err(ApiError::Unavailable(format!(
                            "shard data stream broke: {e}"
                        ))));
                    }
                }
                self.remaining -= n as u64;
                Some(Ok(buf))
            }
            Source::Nats {
                bus,
                shard,
                instance,
                digest,
                offset,
                timeout,
                chunk,
            } => {
                let n = (*chunk).min(max as u64).min(self.remaining);
                let req = ReadChunk {
                    instance: instance.clone(),
                    digest: *digest,
                    offset: *offset,
                    limit: n,
                };
                match bus
                    .request_with_timeout(&subjects::cas::read_chunk(shard), &req, *timeout)
                    .await
                {
                    Ok(c) if c.data.len() as u64 == n => {
                        *offset += n;
                        self.remaining -= n;
                        Some(Ok(c.data))
                    }
                    Ok(_) => {
                        self.remaining = 0;
                        Some(Err(ApiError::Internal(
                            "shard returned a short chunk".into(),
                        )))
                    }
                    Err(e) => {
                        self.remaining = 0;
                        Some(Err(e.into()))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads frames back as the shard does: `(frame lengths, the bytes, ended)`.
    fn unframe(parts: &[Bytes]) -> (Vec<usize>, Vec<u8>, bool) {
        let wire: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let (mut lens, mut data, mut rest) = (Vec::new(), Vec::new(), &wire[..]);
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            if len == 0 {
                assert_eq!(rest.len(), 4, "nothing follows the end of an upload");
                return (lens, data, true);
            }
            lens.push(len);
            data.extend_from_slice(&rest[4..4 + len]);
            rest = &rest[4 + len..];
        }
        (lens, data, false)
    }

    #[test]
    fn data_frames_carry_every_byte_in_order_within_the_frame_limit() {
        let chunks: Vec<Bytes> = [5usize, 0, 3, 17, 1, 8]
            .iter()
            .enumerate()
            .map(|(i, n)| Bytes::from(vec![i as u8; *n]))
            .collect();
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();

        let (lens, data, ended) = unframe(&data_frames(chunks.clone(), 8, true));
        assert_eq!(data, all);
        assert_eq!(lens, vec![8, 8, 8, 8, 2]);
        assert!(ended);

        // A limit above the total: one frame; not finished: no end marker.
        let (lens, data, ended) = unframe(&data_frames(chunks.clone(), 1 << 20, false));
        assert_eq!((lens, data, ended), (vec![34], all, false));

        // Nothing to send but the end; nothing at all.
        assert_eq!(
            unframe(&data_frames(vec![], 8, true)),
            (vec![], vec![], true)
        );
        assert!(data_frames(vec![Bytes::new()], 8, false).is_empty());

        // Chunks are sliced, not copied.
        let big = Bytes::from(vec![1u8; 20]);
        let parts = data_frames(vec![big.clone()], 8, false);
        let inside = big.as_ptr_range();
        for p in parts.iter().filter(|p| p.len() > 4) {
            assert!(inside.contains(&p.as_ptr()));
        }
    }
}
