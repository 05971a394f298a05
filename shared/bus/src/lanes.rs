//! Lane work queues on JetStream, for work that is not an REAPI action (labeling jobs, image
//! builds): one durable pull consumer per priority lane, and a picker that hands out the best
//! waiting job by the platform's one rule ([`Lane::effective_rank`]: lane rank plus bounded
//! aging, ties to the older job).
//!
//! Each lane holds at most one job in the picker and one in flight from the server, so a release
//! job queued behind a thousand lint jobs is at most one pick away. A job held here (waiting in
//! the picker or being worked on) is kept alive with progress acknowledgements; it leaves the
//! stream only when the worker calls [`Delivery::ack`] (or [`Delivery::term`] for a job that can
//! never succeed). A worker that dies leaves it to be redelivered after `ack_wait`; after
//! `max_deliver` deliveries the server stops offering it (a poison job never blocks a lane).

use crate::{Bus, BusError, Subject};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use motorpool_messages::exec::Lane;
use motorpool_messages::{Message, codec, now_ms};
use std::marker::PhantomData;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How a lane queue consumes its stream.
#[derive(Clone, Debug)]
pub struct LaneQueueOptions {
    /// Durable consumer name per lane.
    pub consumer: fn(Lane) -> String,
    /// Subject of each lane's jobs.
    pub subject: fn(Lane) -> Subject,
    /// Waiting this long raises a job one lane.
    pub aging_step_ms: u64,
    /// A held job not acknowledged (or kept alive) for this long is redelivered.
    pub ack_wait: Duration,
    /// Deliveries of one job before the server gives up on it.
    pub max_deliver: i64,
}

/// One job taken from a lane queue. Kept alive until acknowledged, terminated or dropped (a
/// dropped delivery is redelivered after `ack_wait`).
pub struct Delivery<M> {
    pub msg: M,
    pub lane: Lane,
    /// When it was queued (ms since the epoch): the stream's publish time.
    pub queued_ms: u64,
    /// 1 for the first delivery.
    pub delivered: i64,
    /// Jobs the server still held for this lane when it delivered this one.
    pending: u64,
    /// The trace of whoever queued it, if any.
    parent: Option<opentelemetry::Context>,
    raw: jetstream::Message,
    keepalive: CancellationToken,
}

impl<M> std::fmt::Debug for Delivery<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("lane", &self.lane)
            .field("queued_ms", &self.queued_ms)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl<M> Drop for Delivery<M> {
    fn drop(&mut self) {
        self.keepalive.cancel();
    }
}

impl<M: Message> Delivery<M> {
    /// The span to work on this job in: a child of the trace that queued it, or no span for a
    /// job queued outside any trace (see [`crate::trace`]).
    pub fn span(&self) -> tracing::Span {
        crate::trace::child_of(self.parent.clone(), || {
            tracing::info_span!(
                "bus.job",
                otel.name = M::NAME,
                otel.kind = "consumer",
                messaging.system = "nats",
                lane = self.lane.name(),
                delivered = self.delivered,
                queue_wait_ms = now_ms().saturating_sub(self.queued_ms),
            )
        })
    }
}

impl<M> Delivery<M> {
    /// Done: the job leaves the stream.
    pub async fn ack(self) -> Result<(), BusError> {
        self.keepalive.cancel();
        self.raw
            .double_ack()
            .await
            .map_err(|e| BusError::JetStream(format!("ack: {e}")))
    }

    /// Never retry: the job leaves the stream without succeeding.
    pub async fn term(self) -> Result<(), BusError> {
        self.keepalive.cancel();
        self.raw
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| BusError::JetStream(format!("term: {e}")))
    }

    /// Retry later, after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        self.keepalive.cancel();
        self.raw
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| BusError::JetStream(format!("nak: {e}")))
    }
}

/// The consuming side of a lane work queue.
pub struct LaneQueue<M> {
    receivers: Vec<(Lane, mpsc::Receiver<Delivery<M>>)>,
    heads: Vec<Option<Delivery<M>>>,
    /// Per lane: more jobs were queued behind the last one taken (their fetch is under way).
    more: Vec<bool>,
    aging_step_ms: u64,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    _m: PhantomData<M>,
}

impl<M> Drop for LaneQueue<M> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl<M: Message> LaneQueue<M> {
    /// Opens (creating where needed) the stream's per-lane consumers and starts fetching.
    pub async fn open(
        bus: &Bus,
        stream: jetstream::stream::Config,
        options: LaneQueueOptions,
    ) -> Result<LaneQueue<M>, BusError> {
        let stream = bus.ensure_stream(stream).await?;
        let shutdown = CancellationToken::new();
        let mut receivers = Vec::new();
        let mut tasks = Vec::new();
        let mut more = Vec::new();
        for lane in Lane::ALL {
            let durable = (options.consumer)(lane);
            let config = pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: (options.subject)(lane).to_string(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                max_deliver: options.max_deliver,
                ..Default::default()
            };
            let consumer: jetstream::consumer::PullConsumer =
                crate::bus::settle(|| stream.get_or_create_consumer(&durable, config.clone()))
                    .await
                    .map_err(|e| BusError::JetStream(format!("consumer {durable}: {e}")))?;
            // Jobs already queued in a lane are coming: a lower lane's job must not slip out
            // ahead of them while their first fetch is under way.
            more.push(consumer.cached_info().num_pending > 0);
            let (tx, rx) = mpsc::channel(1);
            receivers.push((lane, rx));
            tasks.push(tokio::spawn(fetch_lane::<M>(
                consumer,
                lane,
                tx,
                options.ack_wait,
                shutdown.clone(),
            )));
        }
        Ok(LaneQueue {
            heads: (0..receivers.len()).map(|_| None).collect(),
            more,
            receivers,
            aging_step_ms: options.aging_step_ms,
            shutdown,
            tasks,
            _m: PhantomData,
        })
    }

    /// The next job by the lane rule; waits while every lane is empty. `None` once closed.
    ///
    /// A higher lane whose next job is still being fetched (the server said more were queued
    /// behind the last one) is waited for, briefly, before a lower lane's job is handed out:
    /// otherwise a backlog in both would hand out lower-lane jobs between higher-lane ones.
    pub async fn next(&mut self) -> Option<Delivery<M>> {
        /// How long a lane that said it had more may take to deliver it (another consumer may
        /// have taken it meanwhile). A fetch takes a millisecond or two on a quiet machine and
        /// hundreds on a loaded one; waiting costs only when another consumer took the job, and
        /// the jobs queued here run for seconds to hours.
        const FETCHING: Duration = Duration::from_secs(2);
        loop {
            for i in 0..self.receivers.len() {
                if self.heads[i].is_none()
                    && let Ok(d) = self.receivers[i].1.try_recv()
                {
                    self.heads[i] = Some(d);
                }
            }
            if let Some((best, rank)) = self.best(now_ms()) {
                let coming: Vec<usize> = (0..self.receivers.len())
                    .filter(|&i| {
                        self.heads[i].is_none() && self.more[i] && self.receivers[i].0.rank() > rank
                    })
                    .collect();
                if !coming.is_empty() {
                    match tokio::time::timeout(FETCHING, self.recv_any(|i| coming.contains(&i)))
                        .await
                    {
                        Ok((i, Some(d))) => {
                            self.heads[i] = Some(d);
                            continue;
                        }
                        Ok((_, None)) => return None,
                        Err(_) => coming.iter().for_each(|&i| self.more[i] = false),
                    }
                }
                let d = self.heads[best].take()?;
                self.more[best] = d.pending > 0;
                return Some(d);
            }
            match self.recv_any(|_| true).await {
                (i, Some(d)) => self.heads[i] = Some(d),
                (_, None) => return None,
            }
        }
    }

    /// The first job to arrive from any of the lanes `wanted` picks (by index), with its lane's
    /// index; `None` with it when that lane's fetching has ended.
    async fn recv_any(&mut self, wanted: impl Fn(usize) -> bool) -> (usize, Option<Delivery<M>>) {
        let waits = self
            .receivers
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| wanted(*i))
            .map(|(i, (_, rx))| Box::pin(async move { (i, rx.recv().await) }));
        futures::future::select_all(waits).await.0
    }

    /// The index of the head to take, and its effective rank: highest effective rank, then the
    /// older, then the higher base lane.
    fn best(&self, now: u64) -> Option<(usize, u32)> {
        let mut best: Option<(u32, u64, u32, usize)> = None;
        for (i, d) in self.heads.iter().enumerate() {
            let Some(d) = d else { continue };
            let key = (
                d.lane
                    .effective_rank(now.saturating_sub(d.queued_ms), self.aging_step_ms),
                d.queued_ms,
                d.lane.rank(),
                i,
            );
            let better = match best {
                None => true,
                Some(b) => {
                    key.0 > b.0 || (key.0 == b.0 && (key.1 < b.1 || (key.1 == b.1 && key.2 > b.2)))
                }
            };
            if better {
                best = Some(key);
            }
        }
        best.map(|b| (b.3, b.0))
    }

    /// Hands jobs to `handle`, at most `concurrency` at a time, taking a job from the queue only
    /// when there is room to work on it; until `shutdown`, then waits (at most 30 s) for the jobs
    /// in hand. The worker loop of every lane-queue actor.
    pub async fn serve<F, Fut>(mut self, concurrency: usize, shutdown: CancellationToken, handle: F)
    where
        F: Fn(Delivery<M>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let capacity = concurrency.max(1);
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(capacity));
        let handle = std::sync::Arc::new(handle);
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = self.next() => match d { Some(d) => d, None => break },
            };
            let handle = handle.clone();
            let span = delivery.span();
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let _permit = permit;
                    handle(delivery).await;
                },
                span,
            ));
        }
        self.close().await;
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            permits.acquire_many(capacity as u32),
        )
        .await;
    }

    /// Stops fetching; held jobs are redelivered after `ack_wait`.
    pub async fn close(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

async fn fetch_lane<M: Message>(
    consumer: jetstream::consumer::PullConsumer,
    lane: Lane,
    tx: mpsc::Sender<Delivery<M>>,
    ack_wait: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(1)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%lane, %error, "Cannot pull from a lane queue; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = messages.next() => n,
            };
            let raw = match next {
                Some(Ok(raw)) => raw,
                Some(Err(error)) => {
                    tracing::warn!(%lane, %error, "Lane queue pull failed; re-subscribing");
                    break;
                }
                None => break,
            };
            let (queued_ms, delivered, pending) = raw
                .info()
                .map(|i| {
                    (
                        (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
                        i.delivered,
                        i.pending,
                    )
                })
                .unwrap_or((now_ms(), 1, 0));
            let msg = match codec::decode::<M>(&raw.payload) {
                Ok(m) => m,
                Err(error) => {
                    metrics::counter!(crate::metric_names::BUS_MALFORMED_TOTAL, "message" => M::NAME)
                        .increment(1);
                    tracing::warn!(%lane, %error, "Dropped a malformed job");
                    let _ = raw.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            let keepalive = CancellationToken::new();
            tokio::spawn(keep_alive(raw.clone(), ack_wait, keepalive.clone()));
            let d = Delivery {
                msg,
                lane,
                queued_ms,
                delivered,
                pending,
                parent: crate::trace::extract(raw.headers.as_ref()),
                raw,
                keepalive,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                sent = tx.send(d) => if sent.is_err() { return },
            }
        }
    }
}

/// Tells the server, every third of `ack_wait`, that a held job is still being worked on.
async fn keep_alive(raw: jetstream::Message, ack_wait: Duration, stop: CancellationToken) {
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {
                if let Err(error) = raw.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "Keep-alive of a held job failed");
                }
            }
        }
    }
}
