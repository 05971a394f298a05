//! The reindexer actor: keeps the shard registry true and every blob on its replica set.
//!
//! Every `period` it
//! 1. intersects the registries with the heartbeats: a CAS shard or worker whose last heartbeat
//!    is older than `dead_after` is dead, and its entries are dropped from the shard registry and
//!    the worker registry (placement never considers it again);
//! 2. when the set of live shards changed since its last sweep (or `sweep` has passed), sweeps:
//!    it pages through every live shard's blobs and copies each blob to the members of its
//!    replica set (under the current placement) that lack it.
//!
//! Everything it does is idempotent: deleting a deleted entry and copying a blob a shard already
//! holds change nothing, so two reindexers at once do no harm (they only share the work twice).

pub mod metric_names;
use anyhow::Context;
use async_nats::jetstream::kv;
use futures::StreamExt;
use motorpool_bus::{Bus, subjects};
use motorpool_cas_client::{ShardRef, Shards};
use motorpool_config::{BlobTransport, ReindexerConfig};
use motorpool_messages::cas::{BlobList, ListBlobs, ShardInfo};
use motorpool_messages::exec::WorkerInfo;
use motorpool_messages::{BlobDigest, codec, now_ms};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepStats {
    pub blobs_seen: u64,
    pub copies: u64,
    pub failures: u64,
}

pub struct Reindexer {
    config: ReindexerConfig,
    bus: Bus,
    shards: Shards,
    shard_registry: kv::Store,
    worker_registry: kv::Store,
    last_sweep: Option<(Instant, BTreeSet<String>)>,
    /// A shard announced removals (a blob it found corrupt, or evicted) since the last sweep.
    removals: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How soon after a shard's removals a sweep runs again (at most this often for that reason).
const AFTER_REMOVALS: Duration = Duration::from_secs(5);

impl Reindexer {
    pub async fn connect(config: ReindexerConfig) -> anyhow::Result<Reindexer> {
        let bus = Bus::connect_service(
            &config.nats_url,
            "reindexer",
            config.nats_nkey_file.as_deref(),
            config.nats_tls_ca_file.as_deref(),
            Duration::from_secs(30),
        )
        .await?;
        let shard_registry = bus.ensure_kv(subjects::cas::registry_config()).await?;
        let worker_registry = bus.ensure_kv(subjects::exec::workers_config()).await?;
        let shards = Shards::watch(
            bus.clone(),
            Duration::from_secs(30),
            Duration::from_millis(config.shard_timeout_ms),
            BlobTransport::Direct,
        )
        .await
        .context("watch the shard registry")?
        .with_data_key(
            motorpool_messages::cas::load_data_key(config.data_key_file.as_deref())
                .map_err(anyhow::Error::msg)?,
        )
        .with_replicas(config.replicas);
        let removals = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut news = bus
            .subscribe::<motorpool_messages::cas::ShardNews>(&subjects::cas::all_news())
            .await?;
        let flag = removals.clone();
        tokio::spawn(async move {
            while let Some(n) = news.next().await {
                if !n.blobs.is_empty() && !n.leaving {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        Ok(Reindexer {
            config,
            bus,
            shards,
            shard_registry,
            worker_registry,
            last_sweep: None,
            removals,
        })
    }

    /// Drops registry entries of shards and workers silent for `dead_after`; returns their ids.
    pub async fn drop_dead(&self) -> anyhow::Result<Vec<String>> {
        let cutoff = now_ms().saturating_sub(self.config.dead_after_ms);
        let mut dropped = Vec::new();
        for (store, is_shard) in [(&self.shard_registry, true), (&self.worker_registry, false)] {
            let keys: Vec<String> = store
                .keys()
                .await?
                .filter_map(|k| async move { k.ok() })
                .collect()
                .await;
            for key in keys {
                let Ok(Some(value)) = store.get(&key).await else {
                    continue;
                };
                let heartbeat = if is_shard {
                    codec::decode::<ShardInfo>(&value).map(|i| i.heartbeat_at_ms)
                } else {
                    codec::decode::<WorkerInfo>(&value).map(|i| i.heartbeat_at_ms)
                };
                // An entry nobody can read is as good as dead.
                if heartbeat.map_or(true, |h| h < cutoff) {
                    store.delete(&key).await?;
                    tracing::warn!(id = %key, registry = if is_shard { "shards" } else { "workers" }, "Dropped the entry of a dead member");
                    metrics::counter!(crate::metric_names::REINDEXER_DROPPED_TOTAL).increment(1);
                    dropped.push(key);
                }
            }
        }
        Ok(dropped)
    }

    /// One pass: drop the dead, then sweep if membership changed or the sweep period passed.
    pub async fn pass(&mut self) -> anyhow::Result<Option<SweepStats>> {
        self.drop_dead().await?;
        let live: BTreeSet<String> = self.shards.live().into_iter().map(|s| s.shard_id).collect();
        let due = match &self.last_sweep {
            None => true,
            Some((at, members)) => {
                *members != live
                    || at.elapsed() >= Duration::from_millis(self.config.sweep_ms)
                    || (at.elapsed() >= AFTER_REMOVALS
                        && self.removals.load(std::sync::atomic::Ordering::Relaxed))
            }
        };
        if !due || live.is_empty() {
            return Ok(None);
        }
        self.removals
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let stats = self.sweep().await;
        self.last_sweep = Some((Instant::now(), live));
        Ok(Some(stats))
    }

    /// Copies every blob of every live shard to the members of its replica set that lack it.
    pub async fn sweep(&self) -> SweepStats {
        let started = Instant::now();
        let placement = self.shards.placement();
        let mut stats = SweepStats::default();
        let sources = placement.members();
        for source in &sources {
            let mut cursor = Vec::new();
            loop {
                let page: BlobList = match self
                    .bus
                    .request(
                        &subjects::cas::list(&source.id),
                        &ListBlobs {
                            cursor: cursor.clone(),
                            limit: 2000,
                        },
                    )
                    .await
                {
                    Ok(p) => p,
                    Err(error) => {
                        tracing::warn!(shard = %source.id, %error, "Cannot list a shard's blobs");
                        stats.failures += 1;
                        break;
                    }
                };
                stats.blobs_seen += page.blobs.len() as u64;
                let (copies, failures) = self.repair_page(source, &placement, page.blobs).await;
                stats.copies += copies;
                stats.failures += failures;
                match page.next {
                    Some(c) => cursor = c,
                    None => break,
                }
            }
        }
        metrics::counter!(crate::metric_names::REINDEXER_COPIES_TOTAL).increment(stats.copies);
        metrics::histogram!(crate::metric_names::REINDEXER_SWEEP_SECONDS)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(
            shards = sources.len(),
            blobs = stats.blobs_seen,
            copies = stats.copies,
            failures = stats.failures,
            elapsed = ?started.elapsed(),
            "Sweep done"
        );
        stats
    }

    /// Copies the blobs of one page (held by `source`) to the replicas that lack them.
    async fn repair_page(
        &self,
        source: &ShardRef,
        placement: &motorpool_cas_client::Placement,
        blobs: Vec<(String, BlobDigest)>,
    ) -> (u64, u64) {
        // (target, instance) -> digests that should be there.
        let mut want: HashMap<(String, String), (ShardRef, Vec<BlobDigest>)> = HashMap::new();
        for (instance, d) in blobs {
            for t in self.shards.replica_set(placement, &d) {
                if t.id != source.id {
                    want.entry((t.id.clone(), instance.clone()))
                        .or_insert_with(|| (t, Vec::new()))
                        .1
                        .push(d);
                }
            }
        }
        let (mut copies, mut failures) = (0, 0);
        for ((_, instance), (target, digests)) in want {
            let missing = match self
                .shards
                .find_missing_on(&target, &instance, &digests)
                .await
            {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(shard = %target.id, %error, "Cannot ask a replica what it lacks");
                    failures += 1;
                    continue;
                }
            };
            for (d, _) in digests.iter().zip(missing).filter(|(_, m)| *m) {
                match self.shards.copy(&instance, d, source, &target).await {
                    Ok(_) => copies += 1,
                    Err(error) => {
                        tracing::warn!(blob = %d, from = %source.id, to = %target.id, %error, "Re-replication failed");
                        failures += 1;
                    }
                }
            }
        }
        (copies, failures)
    }
}

/// Runs passes every `period` until `shutdown` fires (the `motorpool reindexer` command).
pub async fn run(config: ReindexerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = config
        .http_addr
        .map(motorpool_telemetry::serve_metrics)
        .transpose()?;
    let period = Duration::from_millis(config.period_ms.max(100));
    let mut r = Reindexer::connect(config).await?;
    tracing::info!("Reindexer is running");
    // Let the shard registry watch fill before the first look.
    tokio::time::sleep(Duration::from_millis(500)).await;
    loop {
        if let Err(error) = r.pass().await {
            tracing::warn!(%error, "Reindexer pass failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(period) => {}
        }
    }
    if let Some(h) = http {
        h.stop(true).await;
    }
    Ok(())
}
