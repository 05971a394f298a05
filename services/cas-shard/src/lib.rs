//! The CAS shard actor.
//!
//! Layout:
//! - [`store`]: blob files, sled metadata, the in-memory index, LRU eviction, resumable uploads.
//! - [`data`]: the direct data stream (TCP) that carries large blob bodies to and from gateways.
//! - [`tier`]: the [`tier::BlobStore`] interface and the object-store tier behind the shards.
//! - [`run`]: wires the store to the bus: registration and heartbeat in the shard registry, and a
//!   typed mailbox per request subject (`mp.v1.cas.*.<shard id>`).

pub mod data;
pub mod metric_names;
pub mod store;
pub mod tier;

use anyhow::Context;
use motorpool_bus::{Bus, MailboxOptions, serve, subjects};
use motorpool_config::ShardConfig;
use motorpool_messages::cas::*;
use motorpool_messages::{WireError, now_ms};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, namespace};
use tokio_util::sync::CancellationToken;

/// The shard id: configured, or stored in the data dir, or made up once and stored.
pub fn resolve_shard_id(config: &ShardConfig) -> anyhow::Result<String> {
    if let Some(id) = &config.shard_id {
        anyhow::ensure!(
            subjects::valid_id(id),
            "shard id {id:?} must be 1-64 letters, digits, '-' or '_'"
        );
        return Ok(id.clone());
    }
    let path = config.data_dir.join("shard-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if subjects::valid_id(&id) {
            return Ok(id);
        }
    }
    let host: String = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let id = format!(
        "{}-{:08x}",
        if host.is_empty() { "cas" } else { &host },
        rand::random::<u32>()
    );
    std::fs::create_dir_all(&config.data_dir)?;
    std::fs::write(&path, &id)?;
    Ok(id)
}

/// A running shard (returned by [`start`] for tests and for `run`).
pub struct Shard {
    pub id: String,
    pub store: Arc<Store>,
    pub data_addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    data_server: data::DataServer,
    bus: Bus,
    registry: async_nats::jetstream::kv::Store,
    started_at_ms: u64,
    news: News,
}

/// The shard's [`ShardNews`]: removals as the store reports them, and a beat with each heartbeat,
/// published in order under one lock so that a beat never claims a removal not yet sent.
#[derive(Clone)]
struct News {
    bus: Bus,
    id: String,
    started_at_ms: u64,
    seq: Arc<tokio::sync::Mutex<u64>>,
    /// Store removals published so far, and a wake-up for [`News::caught_up`].
    published: Arc<(std::sync::atomic::AtomicU64, tokio::sync::Notify)>,
}

impl News {
    async fn send(&self, removed: Option<store::Removed>, leaving: bool) {
        let mut seq = self.seq.lock().await;
        let (blobs, actions) = match removed {
            Some(r) => {
                *seq += 1;
                (r.blobs, r.actions)
            }
            None => (Vec::new(), Vec::new()),
        };
        let news = ShardNews {
            shard_id: self.id.clone(),
            started_at_ms: self.started_at_ms,
            seq: *seq,
            blobs,
            actions,
            leaving,
        };
        if let Err(error) = self
            .bus
            .publish(&subjects::cas::news(&self.id), &news)
            .await
        {
            // A reader that misses this finds the gap at the next beat and forgets everything.
            tracing::warn!(%error, "Could not announce removals");
        }
    }

    /// Waits (bounded) until every removal the store reported so far is published, so that a
    /// request whose work dropped blobs (a write that evicted) answers after the announcement:
    /// both leave on this shard's one bus connection, in that order.
    async fn caught_up(&self, store: &Store) {
        let reported = store.removals_reported();
        let (published, wake) = &*self.published;
        let wait = async {
            loop {
                let woken = wake.notified();
                if published.load(std::sync::atomic::Ordering::Acquire) >= reported {
                    return;
                }
                woken.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .is_err()
        {
            tracing::warn!("Answering before this shard's removals were announced");
        }
    }

    /// Announces what the store reports, coalescing what has piled up into one message.
    fn spawn(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<store::Removed>) {
        /// Hashes per message, well under NATS's default payload limit.
        const MAX: usize = 16_384;
        tokio::spawn(async move {
            while let Some(mut r) = rx.recv().await {
                let mut taken = 1;
                while r.blobs.len() + r.actions.len() < MAX
                    && let Ok(more) = rx.try_recv()
                {
                    r.blobs.extend(more.blobs);
                    r.actions.extend(more.actions);
                    taken += 1;
                }
                while r.blobs.len() > MAX {
                    let rest = r.blobs.split_off(MAX);
                    let head = std::mem::replace(&mut r.blobs, rest);
                    self.send(
                        Some(store::Removed {
                            blobs: head,
                            actions: Vec::new(),
                        }),
                        false,
                    )
                    .await;
                }
                self.send(Some(r), false).await;
                let (published, wake) = &*self.published;
                published.fetch_add(taken, std::sync::atomic::Ordering::AcqRel);
                wake.notify_waiters();
            }
        });
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn reply<T>(r: Result<T, store::StoreError>) -> Result<T, WireError> {
    r.map_err(WireError::from)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WireError> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(WireError::internal(format!("shard task failed: {e}"))))
}

/// How often a shard with an object store behind it records there what it saw used.
pub const USE_RECORD_EVERY: Duration = Duration::from_secs(600);

/// Opens the store, starts the data stream and the mailboxes, and registers the shard.
pub async fn start(config: &ShardConfig, shutdown: CancellationToken) -> anyhow::Result<Shard> {
    let id = resolve_shard_id(config)?;
    let store = Arc::new(
        Store::open(&config.data_dir, config.capacity_bytes, config.fsync)
            .with_context(|| format!("open the blob store in {}", config.data_dir.display()))?,
    );
    store
        .set_action_cache_share(config.action_cache_share)
        .context("action_cache_share")?;
    if let Some(tier) = &config.object_store {
        let tier = tier::ObjectTier::open(tier).context("the object store behind the shard")?;
        tracing::info!(url = tier.url(), write = ?tier.write(), "Blobs and action results go to the object store too");
        let through = tier.write() == motorpool_config::TierWrite::Through;
        store.put_behind(Arc::new(tier), through);
    }
    let key = motorpool_messages::cas::load_data_key(config.data_key_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    let data_server = data::DataServer::start(config.data_addr, store.clone(), key)
        .with_context(|| format!("bind the data stream on {}", config.data_addr))?;
    let data_addr = data_server.local_addr();
    let bus = Bus::connect_service(
        &config.nats_url,
        &format!("cas-shard-{id}"),
        config.nats_nkey_file.as_deref(),
        config.nats_tls_ca_file.as_deref(),
        Duration::from_secs(10),
    )
    .await?;
    let registry = bus.ensure_kv(subjects::cas::registry_config()).await?;

    let started_at_ms = now_ms();
    let news = News {
        bus: bus.clone(),
        id: id.clone(),
        started_at_ms,
        seq: Arc::default(),
        published: Arc::default(),
    };
    let (removals, removed) = tokio::sync::mpsc::unbounded_channel();
    store.report_removals(removals);
    news.clone().spawn(removed);

    let mut tasks = Vec::new();
    let opts = MailboxOptions {
        queue_group: Some(format!("cas-shard-{id}")),
        concurrency: 32,
    };
    macro_rules! mailbox {
        ($subject:expr, |$store:ident, $req:ident: $ty:ty| $body:expr) => {{
            let st = store.clone();
            let news = news.clone();
            tasks.push(
                serve(
                    &bus,
                    $subject,
                    opts.clone(),
                    shutdown.clone(),
                    move |$req: $ty| {
                        let $store = st.clone();
                        let news = news.clone();
                        async move {
                            let store = $store.clone();
                            let reply = blocking(move || $body).await;
                            news.caught_up(&store).await;
                            reply
                        }
                    },
                )
                .await?,
            );
        }};
    }
    mailbox!(subjects::cas::find_missing(&id), |s, req: FindMissing| {
        Ok(FindMissingReply {
            missing: reply(s.find_missing_anywhere(namespace(&req.instance), &req.digests))?,
        })
    });
    mailbox!(subjects::cas::batch_write(&id), |s, req: BatchWrite| {
        let ns = s.namespace_of(&req.instance);
        let blobs: Vec<_> = req
            .blobs
            .iter()
            .map(|b| (b.digest, b.data.as_slice()))
            .collect();
        let results = s
            .put_batch(ns, &blobs)
            .into_iter()
            .map(|r| r.err().map(WireError::from))
            .collect();
        Ok(BatchWriteReply { results })
    });
    mailbox!(subjects::cas::list(&id), |s, req: ListBlobs| {
        let limit = (req.limit as usize).clamp(1, 10_000);
        let (blobs, next) = reply(s.list(&req.cursor, limit))?;
        Ok(BlobList { blobs, next })
    });
    mailbox!(subjects::cas::batch_read(&id), |s, req: BatchRead| {
        let ns = namespace(&req.instance);
        s.fetch_missing(ns, &req.digests);
        let blobs = req
            .digests
            .iter()
            .map(|d| reply(s.read_or_fetch(ns, d, 0, 0)))
            .collect();
        Ok(BatchReadReply { blobs })
    });
    mailbox!(subjects::cas::read_chunk(&id), |s, req: ReadChunk| {
        reply(s.read_or_fetch(namespace(&req.instance), &req.digest, req.offset, req.limit))
            .map(|data| ChunkData { data })
    });
    mailbox!(subjects::cas::write_chunk(&id), |s, req: WriteChunk| {
        let ns = s.namespace_of(&req.instance);
        let Some(mut up) = reply(s.begin_upload(ns, &req.digest, &req.upload_id, req.offset))?
        else {
            return Ok(WriteStatus {
                committed: req.digest.size,
                complete: true,
            });
        };
        reply(up.append(&req.data))?;
        if req.finish {
            reply(up.finish())?;
            return Ok(WriteStatus {
                committed: req.digest.size,
                complete: true,
            });
        }
        Ok(WriteStatus {
            committed: up.committed(),
            complete: false,
        })
    });
    mailbox!(subjects::cas::query_write(&id), |s, req: QueryWrite| {
        let (committed, complete) =
            s.upload_status(namespace(&req.instance), &req.digest, &req.upload_id);
        Ok(WriteStatus {
            committed,
            complete,
        })
    });
    mailbox!(subjects::cas::ac_get(&id), |s, req: AcGet| {
        reply(s.ac_get(namespace(&req.instance), &req.action)).map(|result| AcEntry { result })
    });
    mailbox!(subjects::cas::ac_put(&id), |s, req: AcPut| {
        reply(s.ac_put(namespace(&req.instance), &req.action, &req.result))
            .map(|()| AcEntry { result: None })
    });
    mailbox!(subjects::cas::ac_delete(&id), |s, req: AcDelete| {
        reply(s.ac_delete(namespace(&req.instance), &req.action)).map(|()| AcEntry { result: None })
    });

    let shard = Shard {
        id: id.clone(),
        store: store.clone(),
        data_addr,
        tasks,
        data_server,
        bus: bus.clone(),
        registry,
        started_at_ms,
        news: news.clone(),
    };
    let advertise = config
        .advertise_addr
        .clone()
        .unwrap_or_else(|| data_addr.to_string());
    shard.register(&advertise, false).await?;
    let heartbeat = Duration::from_millis(config.heartbeat_ms.max(50));
    {
        let (store, bus, registry, id, stop) = (
            store.clone(),
            bus.clone(),
            shard.registry.clone(),
            id.clone(),
            shutdown.clone(),
        );
        let advertise = advertise.clone();
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(heartbeat);
            let mut housekeeping = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = beat.tick() => {
                        let info = shard_info(&id, &advertise, &store, started_at_ms, false);
                        record_stats(&store);
                        if let Err(error) = publish_info(&bus, &registry, &info).await {
                            tracing::warn!(%error, "Heartbeat failed");
                        }
                        news.send(None, false).await;
                    }
                    _ = housekeeping.tick() => {
                        let s = store.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            s.expire_uploads(crate::store::UPLOAD_IDLE);
                            if let Err(error) = s.flush_access_times() {
                                tracing::warn!(%error, "Cannot persist access times");
                            }
                        }).await;
                    }
                }
            }
        });
    }
    // Writes behind, and writes through that failed: the pending list drains every second.
    {
        let (store, stop) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let s = store.clone();
                let drained = tokio::task::spawn_blocking(move || {
                    let mut total = 0;
                    loop {
                        match s.drain_behind(256) {
                            Ok(0) => break Ok(total),
                            Ok(n) => total += n,
                            Err(e) => break Err(e),
                        }
                    }
                })
                .await;
                if let Ok(Err(error)) = drained {
                    tracing::warn!(%error, pending = store.behind_pending(), "Cannot write to the object store; trying again");
                }
                let s = store.clone();
                if let Ok(Err(error)) =
                    tokio::task::spawn_blocking(move || s.record_use(USE_RECORD_EVERY)).await
                {
                    tracing::warn!(%error, "Cannot record what was used in the object store; trying again");
                }
                metrics::gauge!(crate::metric_names::CAS_TIER_PENDING_BLOBS)
                    .set(store.behind_pending() as f64);
            }
        });
    }
    tracing::info!(shard = %id, data_addr = %advertise, dir = %config.data_dir.display(), "CAS shard is serving");
    Ok(shard)
}

fn shard_info(
    id: &str,
    data_addr: &str,
    store: &Store,
    started_at_ms: u64,
    draining: bool,
) -> ShardInfo {
    let stats = store.stats();
    ShardInfo {
        shard_id: id.to_string(),
        data_addr: data_addr.to_string(),
        capacity_bytes: stats.capacity_bytes,
        used_bytes: stats.used_bytes,
        blob_count: stats.blob_count,
        started_at_ms,
        heartbeat_at_ms: now_ms(),
        draining,
    }
}

fn record_stats(store: &Store) {
    let s = store.stats();
    metrics::gauge!(crate::metric_names::CAS_SHARD_USED_BYTES).set(s.used_bytes as f64);
    metrics::gauge!(crate::metric_names::CAS_SHARD_CAPACITY_BYTES).set(s.capacity_bytes as f64);
    metrics::gauge!(crate::metric_names::CAS_SHARD_BLOBS).set(s.blob_count as f64);
    metrics::gauge!(crate::metric_names::CAS_SHARD_ACTION_CACHE_ENTRIES).set(s.action_count as f64);
    metrics::gauge!(crate::metric_names::CAS_SHARD_ACTION_CACHE_BYTES).set(s.action_bytes as f64);
    metrics::gauge!(crate::metric_names::CAS_SHARD_ACTION_CACHE_CAPACITY_BYTES)
        .set(s.action_capacity_bytes as f64);
}

async fn publish_info(
    bus: &Bus,
    registry: &async_nats::jetstream::kv::Store,
    info: &ShardInfo,
) -> anyhow::Result<()> {
    let frame = motorpool_messages::encode(info)?;
    registry
        .put(&info.shard_id, frame.into())
        .await
        .context("update the shard registry")?;
    bus.publish(&subjects::cas::heartbeat(&info.shard_id), info)
        .await?;
    Ok(())
}

impl Shard {
    async fn register(&self, advertise: &str, draining: bool) -> anyhow::Result<()> {
        let info = shard_info(
            &self.id,
            advertise,
            &self.store,
            self.started_at_ms,
            draining,
        );
        publish_info(&self.bus, &self.registry, &info).await
    }

    /// Leaves the registry, stops the mailboxes and the data stream, flushes metadata. The
    /// `shutdown` token given to [`start`] must have fired. Leaving the registry is bounded in
    /// time: with NATS gone, the entry ages out instead.
    pub async fn stop(self) {
        let leave = async {
            self.news.send(None, true).await;
            let _ = self.register(&self.data_addr.to_string(), true).await;
            let _ = self.registry.delete(&self.id).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), leave).await;
        for t in self.tasks {
            let _ = t.await;
        }
        self.data_server.stop();
        // What was used since the last record is recorded now, not lost with the process.
        let store = self.store.clone();
        if let Ok(Err(error)) =
            tokio::task::spawn_blocking(move || store.record_use(Duration::ZERO)).await
        {
            tracing::warn!(%error, "Could not record what was used in the object store");
        }
        let store = self.store.clone();
        if let Ok(Err(error)) = tokio::task::spawn_blocking(move || store.close()).await {
            tracing::warn!(%error, "Could not close the blob store cleanly");
        }
        tracing::info!(shard = %self.id, "CAS shard stopped");
    }
}

/// Runs a shard until `shutdown` fires.
pub async fn run(config: ShardConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shard = start(&config, shutdown.clone()).await?;
    let http = match config.http_addr {
        Some(addr) => Some(motorpool_telemetry::serve_metrics(addr)?),
        None => None,
    };
    shutdown.cancelled().await;
    if let Some(h) = http {
        h.stop(true).await;
    }
    shard.stop().await;
    Ok(())
}

/// The data dir's blob store, for tools that inspect a stopped shard.
pub fn open_store(dir: &Path, capacity: u64) -> anyhow::Result<Store> {
    Ok(Store::open(dir, capacity, false)?)
}
