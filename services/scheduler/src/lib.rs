//! The scheduler actor: lane queues, dispatch to workers, in-flight deduplication, retries with
//! alerts, and rate limits for API clients.
//!
//! Layout:
//! - [`queue`]: the lane queues and the pick rule (priority with bounded aging).
//! - [`limits`]: per-client token buckets for API-triggered executions.
//! - [`lease`]: which of several schedulers is active (a lease in JetStream KV).
//! - this file: the actor. One task owns all state and handles one [`Event`] at a time; the
//!   mailboxes (NATS subjects), the operation watch and the worker heartbeats only turn messages
//!   into events.
//!
//! **Durability.** The operation records in the JetStream KV bucket are the queue: the gateway
//! creates a record (`Queued`); the scheduler learns of it through a watch, and moves it with
//! compare-and-set updates (`Executing` on a worker, `Completed`). A scheduler that restarts
//! replays the bucket and rebuilds its queues; jobs running on live workers keep running and
//! report to whichever scheduler is up (workers resend `JobDone` until it is acknowledged). An
//! assignment is recorded before it is sent, and a worker lists the jobs it holds in every
//! heartbeat, so a job is never run twice: a job recorded on a worker that does not hold it is
//! requeued only after that worker's heartbeat proves it.
//!
//! **High availability.** Any number of schedulers may run; one is active, the others stand by
//! ([`lease`]). The active one serves the mailboxes and watches the bucket; a standby does
//! nothing but watch the lease, and when it takes over it starts exactly as a restarted
//! scheduler does: from the bucket and the workers' heartbeats.

pub mod lease;
pub mod limits;
pub mod metric_names;
pub mod queue;

use anyhow::Context;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use lease::LeaseSettings;
use limits::TokenBuckets;
use motorpool_bus::{Bus, MailboxOptions, serve_from, subjects, trace};
use motorpool_config::SchedulerConfig;
use motorpool_messages::exec::*;
use motorpool_messages::{BlobDigest, ErrorCode, WireError, codec, now_ms};
use queue::{Entry, LaneQueues};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type Reply<T> = oneshot::Sender<Result<T, WireError>>;

/// Everything the scheduler reacts to.
enum Event {
    /// A record changed in the operations bucket (ours or anyone's).
    Op {
        op: Operation,
        revision: u64,
    },
    Heartbeat(WorkerInfo),
    /// A job report, with the worker id of the subject it came on.
    Done {
        sender: String,
        done: JobDone,
        reply: Reply<Ack>,
    },
    Cancel(String, Reply<Ack>),
    Admit(String, Reply<Admission>),
    Stats(Reply<QueueStats>),
    /// A worker refused an assignment, or could not be asked.
    AssignFailed {
        id: String,
        worker: String,
        attempt: u32,
        reason: String,
    },
}

/// An operation the scheduler is responsible for (not completed).
struct Tracked {
    op: Operation,
    revision: u64,
}

/// A job on a worker.
struct Execution {
    worker: String,
    attempt: u32,
    since_ms: u64,
}

struct WorkerSeen {
    info: WorkerInfo,
    seen: Instant,
}

struct Actor {
    bus: Bus,
    kv: kv::Store,
    config: SchedulerConfig,
    ops: HashMap<String, Tracked>,
    queues: LaneQueues,
    /// (instance, action) -> the operation that runs it; identical ones follow it.
    primaries: HashMap<(String, BlobDigest), String>,
    followers: HashMap<String, Vec<String>>,
    executions: HashMap<String, Execution>,
    workers: HashMap<String, WorkerSeen>,
    buckets: TokenBuckets,
    events: mpsc::Sender<Event>,
    started: Instant,
    /// This scheduler's id and the term of the lease it works under.
    holder: String,
    term: u64,
}

/// A started scheduler.
pub struct Started {
    task: JoinHandle<()>,
}

impl Started {
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Connects and sets up the buckets; then, until `shutdown` fires, stands by until this
/// scheduler holds the lease and works while it holds it.
pub async fn start(
    config: SchedulerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Started> {
    let bus = Bus::connect_service(
        &config.nats_url,
        "scheduler",
        config.nats_nkey_file.as_deref(),
        config.nats_tls_ca_file.as_deref(),
        Duration::from_secs(10),
    )
    .await?;
    let kv = bus
        .ensure_kv(subjects::exec::operations_config())
        .await
        .context("operations bucket")?;
    bus.ensure_kv(subjects::exec::workers_config()).await?;
    bus.ensure_stream(subjects::ops::alerts_stream_config())
        .await
        .context("alerts stream")?;
    let lease_kv = bus
        .ensure_kv(subjects::exec::lease_config())
        .await
        .context("scheduler lease bucket")?;
    let me = LeaseSettings {
        holder: config.scheduler_id(),
        instance: format!("{:016x}", rand::random::<u64>()),
        lease: Duration::from_millis(config.lease_ms.max(300)),
    };
    metrics::gauge!(crate::metric_names::SCHEDULER_ACTIVE).set(0.0);
    let task = tokio::spawn(async move {
        loop {
            let Some(mut held) = lease::acquire(&lease_kv, &me, &shutdown).await else {
                break;
            };
            let took = Instant::now();
            let term = shutdown.child_token();
            let actor = match activate(
                bus.clone(),
                kv.clone(),
                config.clone(),
                (me.holder.clone(), held.term),
                term.clone(),
            )
            .await
            {
                Ok(actor) => actor,
                Err(error) => {
                    // Let a standby try; this one tries again after a lease.
                    tracing::error!(
                        error = format!("{error:#}"),
                        "Cannot start scheduling; letting the lease go"
                    );
                    term.cancel();
                    lease::release(&lease_kv, &held).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(me.lease) => continue,
                    }
                }
            };
            metrics::gauge!(crate::metric_names::SCHEDULER_ACTIVE).set(1.0);
            metrics::gauge!(crate::metric_names::SCHEDULER_LEASE_TERM).set(held.term as f64);
            match (&held.previous, held.waited) {
                (Some(previous), Some(waited)) => {
                    metrics::counter!(crate::metric_names::SCHEDULER_TAKEOVERS_TOTAL).increment(1);
                    tracing::warn!(id = %me.holder, term = held.term, %previous, silent_for = ?waited, ready_in = ?took.elapsed(), "Took over as the active scheduler: the last one stopped renewing its lease");
                }
                (previous, _) => {
                    tracing::info!(id = %me.holder, term = held.term, previous = previous.as_deref().unwrap_or("none"), ready_in = ?took.elapsed(), "Active scheduler");
                }
            }
            let lost = lease::hold(&lease_kv, &me, &mut held, &shutdown).await;
            term.cancel();
            let _ = actor.await;
            metrics::gauge!(crate::metric_names::SCHEDULER_ACTIVE).set(0.0);
            match lost {
                lease::Lost::Stopped => {
                    lease::release(&lease_kv, &held).await;
                    break;
                }
                lost => {
                    tracing::warn!(id = %me.holder, ?lost, "No longer the active scheduler; standing by");
                }
            }
        }
        tracing::info!("Scheduler stopped");
    });
    Ok(Started { task })
}

/// Starts the actor with its mailboxes, heartbeat subscription and operations watch, all of
/// which end when `shutdown` fires.
async fn activate(
    bus: Bus,
    kv: kv::Store,
    config: SchedulerConfig,
    (holder, term): (String, u64),
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let (tx, rx) = mpsc::channel(4096);
    let group = || MailboxOptions {
        queue_group: Some(subjects::exec::SCHEDULER_GROUP.into()),
        concurrency: 256,
    };
    let mut mailboxes = Vec::new();
    macro_rules! mailbox {
        ($subject:expr, $req:ty, $make:expr) => {{
            let tx = tx.clone();
            mailboxes.push(
                serve_from(
                    &bus,
                    $subject,
                    group(),
                    shutdown.clone(),
                    move |sender: String, req: $req| {
                        let tx = tx.clone();
                        async move {
                            let (reply, rx) = oneshot::channel();
                            #[allow(clippy::redundant_closure_call)]
                            let event = ($make)(sender, req, reply);
                            tx.send(event).await.map_err(|_| {
                                WireError::new(ErrorCode::Unavailable, "scheduler is stopping")
                            })?;
                            rx.await.map_err(|_| {
                                WireError::new(ErrorCode::Unavailable, "scheduler is stopping")
                            })?
                        }
                    },
                )
                .await?,
            );
        }};
    }
    // A worker reports on its own subject (the bus lets no one else publish there).
    mailbox!(
        subjects::exec::job_done("*"),
        JobDone,
        |sender, done, reply| Event::Done {
            sender,
            done,
            reply
        }
    );
    mailbox!(subjects::exec::cancel(), Cancel, |_, r: Cancel, reply| {
        Event::Cancel(r.operation_id, reply)
    });
    mailbox!(subjects::exec::admit(), Admit, |_, r: Admit, reply| {
        Event::Admit(r.client, reply)
    });
    mailbox!(
        subjects::exec::queue_stats(),
        GetQueueStats,
        |_, _, reply| { Event::Stats(reply) }
    );

    // Heartbeats.
    let mut beats = bus
        .subscribe::<WorkerInfo>(&subjects::exec::all_heartbeats())
        .await?;
    let btx = tx.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                b = beats.next_from() => match b {
                    // A worker beats on its own subject only; a beat naming another is forged.
                    Some((sender, info)) if sender != info.worker_id => {
                        tracing::warn!(%sender, claimed = %info.worker_id, "Ignored a heartbeat sent in another worker's name");
                    }
                    Some((_, info)) => { if btx.send(Event::Heartbeat(info)).await.is_err() { break } }
                    None => break,
                }
            }
        }
    });

    // The operations watch: the whole bucket first, then every change.
    let wkv = kv.clone();
    let wtx = tx.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            match wkv.watch_with_history(">").await {
                Ok(mut watch) => loop {
                    let entry = tokio::select! {
                        _ = stop.cancelled() => return,
                        e = watch.next() => e,
                    };
                    let Some(Ok(entry)) = entry else { break };
                    if entry.operation != kv::Operation::Put {
                        continue;
                    }
                    match codec::decode::<Operation>(&entry.value) {
                        Ok(op) => {
                            let ev = Event::Op {
                                op,
                                revision: entry.revision,
                            };
                            if wtx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(key = %entry.key, %error, "Skipped an unreadable operation record")
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "Cannot watch the operations bucket; retrying")
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    let actor = Actor {
        bus,
        kv,
        buckets: TokenBuckets::new(config.api_rate_per_s, config.api_burst),
        queues: LaneQueues::new(config.aging_step_ms),
        config,
        ops: HashMap::new(),
        primaries: HashMap::new(),
        followers: HashMap::new(),
        executions: HashMap::new(),
        workers: HashMap::new(),
        events: tx,
        started: Instant::now(),
        holder,
        term,
    };
    Ok(tokio::spawn(actor.run(rx, shutdown)))
}

/// Runs a scheduler until `shutdown` fires (the `motorpool scheduler` command).
pub async fn run(config: SchedulerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    motorpool_telemetry::with_metrics(config.http_addr, async move {
        start(config, shutdown.clone()).await?.join().await;
        Ok(())
    })
    .await
}

fn is_cancelled(o: &Outcome) -> bool {
    o.error
        .as_ref()
        .is_some_and(|e| e.code == ErrorCode::Cancelled)
}

fn dedup_key(op: &Operation) -> Option<(String, BlobDigest)> {
    (!op.do_not_cache).then(|| (op.instance.clone(), op.action))
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.tick().await,
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev).await,
                    None => break,
                }
            }
            // Drain what else arrived before dispatching once.
            while let Ok(ev) = rx.try_recv() {
                self.handle(ev).await;
            }
            self.dispatch().await;
        }
    }

    async fn handle(&mut self, ev: Event) {
        match ev {
            Event::Op { op, revision } => self.on_op(op, revision).await,
            Event::Heartbeat(info) => self.on_heartbeat(info).await,
            Event::Done {
                sender,
                done,
                reply,
            } => {
                let r = if sender == done.worker {
                    self.on_done(done).await
                } else {
                    tracing::warn!(op = %done.operation_id, %sender, claimed = %done.worker, "Refused a job report sent in another worker's name");
                    metrics::counter!(crate::metric_names::SCHEDULER_FORGED_REPORTS_TOTAL)
                        .increment(1);
                    Err(WireError::new(
                        ErrorCode::PermissionDenied,
                        format!(
                            "{sender} reported a job as {}: workers report only their own jobs",
                            done.worker
                        ),
                    ))
                };
                let _ = reply.send(r);
            }
            Event::Cancel(id, reply) => {
                let r = self.on_cancel(&id).await;
                let _ = reply.send(r);
            }
            Event::Admit(client, reply) => {
                let r = self
                    .buckets
                    .admit(&client, now_ms(), self.config.api_max_wait_ms)
                    .map(|not_before_ms| Admission { not_before_ms });
                if r.is_err() {
                    metrics::counter!(crate::metric_names::SCHEDULER_RATE_LIMITED_TOTAL)
                        .increment(1);
                }
                let _ = reply.send(r);
            }
            Event::Stats(reply) => {
                let _ = reply.send(Ok(self.stats()));
            }
            Event::AssignFailed {
                id,
                worker,
                attempt,
                reason,
            } => {
                let current = self
                    .executions
                    .get(&id)
                    .is_some_and(|e| e.worker == worker && e.attempt == attempt);
                if current {
                    tracing::info!(op = %id, %worker, %reason, "Assignment refused; requeueing");
                    self.executions.remove(&id);
                    // Not the job's fault: give the attempt back.
                    self.requeue(&id, None, true).await;
                }
            }
        }
    }

    fn stats(&self) -> QueueStats {
        let mut depth = Vec::new();
        for pool in Pool::ALL {
            for lane in Lane::ALL {
                depth.push((pool, lane, self.queues.depth(pool, lane) as u64));
            }
        }
        let free: u64 = self
            .workers
            .values()
            .map(|w| self.free_slots(&w.info) as u64)
            .sum();
        QueueStats {
            depth,
            executing: self.executions.len() as u64,
            workers: self.workers.len() as u64,
            free_slots: free,
            scheduler: self.holder.clone(),
            term: self.term,
        }
    }

    fn free_slots(&self, w: &WorkerInfo) -> u32 {
        if w.draining {
            return 0;
        }
        let busy = self
            .executions
            .values()
            .filter(|e| e.worker == w.worker_id)
            .count() as u32;
        w.slots.saturating_sub(busy)
    }

    /// A record changed in the bucket.
    async fn on_op(&mut self, op: Operation, revision: u64) {
        if let Some(t) = self.ops.get(&op.id)
            && t.revision >= revision
        {
            return; // our own write, or older news
        }
        let id = op.id.clone();
        match &op.state {
            OpState::Completed(outcome) => {
                // Completed elsewhere (a scheduler that lost its lease right after), or by this
                // one before its watch caught up: forget it, running or queued.
                self.executions.remove(&id);
                if let Some(t) = self.ops.remove(&id) {
                    self.queues.remove(t.op.pool, t.op.lane, &id);
                }
                // Operations that followed it share its result. A cancelled one keeps them: they
                // wait for its run (still going for them) or take its place (`promote_follower`).
                if !is_cancelled(outcome) && self.followers.contains_key(&id) {
                    self.release_primary(&id);
                    self.complete_followers(&id, outcome).await;
                }
            }
            OpState::Executing { worker, since_ms } => {
                if !self.executions.contains_key(&id) {
                    self.executions.insert(
                        id.clone(),
                        Execution {
                            worker: worker.clone(),
                            attempt: op.attempts,
                            since_ms: *since_ms,
                        },
                    );
                    if let Some(k) = dedup_key(&op) {
                        self.primaries.entry(k).or_insert_with(|| id.clone());
                    }
                }
                self.ops.insert(id, Tracked { op, revision });
            }
            OpState::Queued { follows } => {
                let known = self.ops.contains_key(&id);
                let follows = follows.clone();
                let key = dedup_key(&op);
                let parent = trace::from_traceparent(&op.trace);
                let lane = op.lane;
                self.ops.insert(id.clone(), Tracked { op, revision });
                if known {
                    return;
                }
                // From the moment this scheduler hears of it to where it waits: queued,
                // following another, or completed from a finished run.
                let _heard = trace::child_of(
                    parent,
                    || tracing::info_span!("scheduler.queue", op = %id, lane = lane.name()),
                );
                // A follower replayed before the operation it follows (the watch gives records
                // in the order of their last change; the primary changed later, when it was
                // dispatched): its record, not memory, says whether the run it waits for goes
                // on. Taken for a primary, it would run the same action a second time.
                if let Some(p) = follows.as_ref().filter(|p| **p != id)
                    && !self.ops.contains_key(p)
                    && let Some(outcome) = self.replay_primary(p).await
                {
                    let mut o = outcome;
                    o.message = format!("shared the execution of operation {p}. {}", o.message);
                    self.complete(&id, o).await;
                    return;
                }
                // Follow an identical operation that is queued or running.
                let primary = key.as_ref().and_then(|k| self.primaries.get(k)).cloned();
                if let Some(p) = primary.filter(|p| p != &id) {
                    self.followers
                        .entry(p.clone())
                        .or_default()
                        .push(id.clone());
                    metrics::counter!(crate::metric_names::SCHEDULER_DEDUPLICATED_TOTAL)
                        .increment(1);
                    if follows.as_deref() != Some(p.as_str()) {
                        let p2 = p.clone();
                        self.write(&id, |op| {
                            op.state = OpState::Queued { follows: Some(p2) };
                        })
                        .await;
                    }
                    return;
                }
                if let Some(k) = key {
                    self.primaries.insert(k, id.clone());
                }
                self.enqueue(&id);
            }
        }
    }

    fn enqueue(&mut self, id: &str) {
        if let Some(t) = self.ops.get(id) {
            self.queues.push(
                t.op.pool,
                t.op.lane,
                Entry {
                    id: id.to_string(),
                    since_ms: t.op.queued_ms,
                    not_before_ms: t.op.not_before_ms,
                },
            );
        }
    }

    /// Applies `change` to a tracked operation and stores it (compare-and-set). False when the
    /// record moved under us (its new state arrives through the watch).
    async fn write(&mut self, id: &str, change: impl FnOnce(&mut Operation)) -> bool {
        let Some(t) = self.ops.get_mut(id) else {
            return false;
        };
        let mut op = t.op.clone();
        change(&mut op);
        let frame = match codec::encode(&op) {
            Ok(f) => f,
            Err(error) => {
                tracing::error!(%error, "Cannot encode an operation");
                return false;
            }
        };
        // A write the bus could not confirm (a timeout, a stream electing its leader while a
        // NATS server is lost) is tried again against the same revision: it lands once, or the
        // record moved. Only a moved record is left to the watch.
        let revision = t.revision;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut pause = Duration::from_millis(100);
        let error = loop {
            match self
                .kv
                .update(id, Bytes::from(frame.clone()), revision)
                .await
            {
                Ok(revision) => {
                    self.stored(id, op, revision);
                    return true;
                }
                Err(error)
                    if error.kind()
                        != async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(op = %id, %error, "Operation write not confirmed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(error) => break error,
            }
        };
        // Re-read it: the watch brings the new state too, but do not act on a stale one. A
        // write that landed although its answer was lost reads back as ours.
        if let Ok(Some(e)) = self.kv.entry(id).await
            && let Ok(fresh) = codec::decode::<Operation>(&e.value)
        {
            if fresh == op {
                self.stored(id, op, e.revision);
                return true;
            }
            tracing::warn!(op = %id, %error, "Operation record changed under the scheduler");
            if fresh.is_done() {
                self.ops.remove(id);
            } else if let Some(t) = self.ops.get_mut(id) {
                t.op = fresh;
                t.revision = e.revision;
            }
        } else {
            tracing::warn!(op = %id, %error, "Operation record could not be written or read back");
        }
        false
    }

    /// Records what was stored for `id` at `revision`.
    fn stored(&mut self, id: &str, op: Operation, revision: u64) {
        if op.is_done() {
            self.ops.remove(id);
        } else if let Some(t) = self.ops.get_mut(id) {
            t.op = op;
            t.revision = revision;
        }
    }

    /// The record of `primary`, which a follower names but this scheduler has not yet heard of,
    /// read now and taken in: its outcome when it already completed (not cancelled) for the
    /// follower to share. A primary that is gone, cancelled or unreadable leaves the follower to
    /// run on its own.
    async fn replay_primary(&mut self, primary: &str) -> Option<Outcome> {
        let entry = match self.kv.entry(primary).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => e,
            Ok(_) => return None,
            Err(error) => {
                tracing::warn!(op = %primary, %error, "Cannot read a followed operation");
                return None;
            }
        };
        let op = codec::decode::<Operation>(&entry.value).ok()?;
        match &op.state {
            OpState::Completed(o) if !is_cancelled(o) => Some(o.clone()),
            OpState::Completed(_) => None,
            _ => {
                Box::pin(self.on_op(op, entry.revision)).await;
                None
            }
        }
    }

    /// Completes an operation and every operation that follows it.
    async fn complete(&mut self, id: &str, outcome: Outcome) {
        if let Some(t) = self.ops.get(id) {
            self.queues.remove(t.op.pool, t.op.lane, id);
            let status = match &outcome.error {
                None => "ok",
                Some(e) if e.code == ErrorCode::Cancelled => "cancelled",
                Some(_) => "error",
            };
            metrics::counter!(crate::metric_names::SCHEDULER_COMPLETED_TOTAL, "status" => status)
                .increment(1);
            let o = outcome.clone();
            self.write(id, move |op| op.state = OpState::Completed(o))
                .await;
        }
        self.release_primary(id);
        self.complete_followers(id, &outcome).await;
    }

    /// Completes the operations that follow `id` with its outcome.
    async fn complete_followers(&mut self, id: &str, outcome: &Outcome) {
        for f in self.followers.remove(id).unwrap_or_default() {
            let mut o = outcome.clone();
            o.message = format!("shared the execution of operation {id}. {}", o.message);
            Box::pin(self.complete(&f, o)).await;
        }
    }

    fn release_primary(&mut self, id: &str) {
        self.primaries.retain(|_, p| p != id);
    }

    /// Back into the queue; `attempt_back` when the attempt did not really happen.
    async fn requeue(&mut self, id: &str, failure: Option<String>, attempt_back: bool) {
        // A retry after a failure waits a little, longer each time (0.5 s, 1 s, 2 s, at most
        // 5 s): what failed (a shard, the bus failing over) gets the time to come back.
        let not_before = failure.as_ref().map(|_| {
            let attempts = self.ops.get(id).map_or(1, |t| t.op.attempts.max(1));
            now_ms() + (500u64 << (attempts - 1).min(4)).min(5_000)
        });
        let ok = self
            .write(id, |op| {
                if attempt_back {
                    op.attempts = op.attempts.saturating_sub(1);
                }
                if let Some(f) = failure {
                    op.failures.push(f);
                }
                if let Some(t) = not_before {
                    op.not_before_ms = op.not_before_ms.max(t);
                }
                op.state = OpState::Queued { follows: None };
            })
            .await;
        if ok {
            self.enqueue(id);
        }
    }

    /// The platform failed an attempt: retry, or give up with an alert.
    async fn infrastructure_failure(&mut self, id: &str, reason: String) {
        self.executions.remove(id);
        let Some(t) = self.ops.get(id) else {
            // Cancelled while running: nothing to retry for it; its followers still wait.
            if let Some(next) = self.promote_follower(id).await {
                tracing::info!(op = %next, "Retrying for the operations that shared a cancelled one");
            }
            return;
        };
        let attempts = t.op.attempts;
        metrics::counter!(crate::metric_names::SCHEDULER_INFRASTRUCTURE_FAILURES_TOTAL)
            .increment(1);
        if attempts >= self.config.max_attempts {
            let mut failures = t.op.failures.clone();
            failures.push(reason);
            let message = format!(
                "operation {id} failed on all {attempts} attempts for infrastructure reasons: {}",
                failures.join("; ")
            );
            self.alert("retries_exhausted", id, &message).await;
            let outcome = Outcome {
                error: Some(WireError::new(ErrorCode::Unavailable, message.clone())),
                result: None,
                cached: false,
                message,
            };
            self.complete(id, outcome).await;
        } else {
            tracing::warn!(op = %id, attempt = attempts, %reason, "Retrying after an infrastructure failure");
            metrics::counter!(crate::metric_names::SCHEDULER_RETRIES_TOTAL).increment(1);
            self.requeue(id, Some(reason), false).await;
        }
    }

    async fn alert(&self, kind: &str, subject_id: &str, message: &str) {
        tracing::error!(alert = kind, id = subject_id, "{message}");
        metrics::counter!(crate::metric_names::ALERTS_TOTAL, "kind" => kind.to_string())
            .increment(1);
        let alert = Alert {
            kind: kind.into(),
            source: "scheduler".into(),
            subject_id: subject_id.into(),
            message: message.into(),
            at_ms: now_ms(),
        };
        if let Err(error) = self.bus.publish(&subjects::ops::alert(kind), &alert).await {
            tracing::error!(%error, "Cannot publish an alert");
        }
    }

    /// Whether `done` reports the attempt this scheduler has running on its worker.
    fn reports_current(&self, done: &JobDone) -> bool {
        self.executions
            .get(&done.operation_id)
            .is_some_and(|e| e.worker == done.worker && e.attempt == done.attempt)
    }

    async fn on_done(&mut self, done: JobDone) -> Result<Ack, WireError> {
        if !self.reports_current(&done) {
            // A scheduler that just started or took over may hear a report before its watch
            // has delivered the operation's record: the record decides, not memory. Were the
            // report dropped as stale, the worker would forget the job, and the record, still
            // saying it runs there, would send it to run a second time.
            let entry = self.kv.entry(&done.operation_id).await.map_err(|e| {
                WireError::new(ErrorCode::Unavailable, format!("read the operation: {e}"))
            })?;
            if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put)
                && let Ok(op) = codec::decode::<Operation>(&entry.value)
                && matches!(&op.state, OpState::Executing { worker, .. } if *worker == done.worker)
                && op.attempts == done.attempt
            {
                self.on_op(op, entry.revision).await;
            }
        }
        if !self.reports_current(&done) {
            // A late report of an attempt that was given up on: nothing to do.
            tracing::debug!(op = %done.operation_id, worker = %done.worker, "Stale job report");
            return Ok(Ack);
        }
        let id = done.operation_id;
        match done.result {
            JobResult::Finished(outcome) => {
                self.executions.remove(&id);
                self.complete(&id, outcome).await;
            }
            JobResult::Infrastructure(reason) => {
                let reason = format!("on worker {}: {reason}", done.worker);
                self.infrastructure_failure(&id, reason).await;
            }
        }
        Ok(Ack)
    }

    /// The first follower of `id` becomes the one that runs; the others follow it.
    async fn promote_follower(&mut self, id: &str) -> Option<String> {
        self.release_primary(id);
        let mut rest = self.followers.remove(id).unwrap_or_default();
        if rest.is_empty() {
            return None;
        }
        let next = rest.remove(0);
        let key = self.ops.get(&next).and_then(|t| dedup_key(&t.op));
        if let Some(k) = key {
            self.primaries.insert(k, next.clone());
        }
        if !rest.is_empty() {
            self.followers.insert(next.clone(), rest);
        }
        if self
            .write(&next, |op| op.state = OpState::Queued { follows: None })
            .await
        {
            self.enqueue(&next);
        }
        Some(next)
    }

    async fn on_cancel(&mut self, id: &str) -> Result<Ack, WireError> {
        let Some(t) = self.ops.get(id) else {
            return match self.kv.entry(id).await {
                Ok(Some(_)) => Ok(Ack), // already completed
                Ok(None) => Err(WireError::not_found(format!("no operation {id}"))),
                Err(e) => Err(WireError::new(ErrorCode::Unavailable, e.to_string())),
            };
        };
        let cancelled = Outcome {
            error: Some(WireError::new(
                ErrorCode::Cancelled,
                format!("operation {id} was cancelled"),
            )),
            result: None,
            cached: false,
            message: "cancelled".into(),
        };
        match t.op.state.clone() {
            OpState::Queued { follows: Some(p) } => {
                if let Some(f) = self.followers.get_mut(&p) {
                    f.retain(|x| x != id);
                }
            }
            OpState::Queued { follows: None } => {
                self.queues.remove(t.op.pool, t.op.lane, id);
                self.promote_follower(id).await;
            }
            OpState::Executing { worker, .. } => {
                if self.followers.get(id).is_none_or(Vec::is_empty) {
                    // Nobody else waits for it: stop it, and let no new identical operation
                    // follow a run that ends cancelled. The slot frees when the worker reports.
                    self.release_primary(id);
                    let _ = self
                        .bus
                        .publish(
                            &subjects::exec::stop(&worker),
                            &Cancel {
                                operation_id: id.to_string(),
                            },
                        )
                        .await;
                }
            }
            OpState::Completed(_) => {}
        }
        // Write the cancelled state for this operation alone; followers keep their execution.
        let followers = self.followers.remove(id);
        if let Some(t) = self.ops.get(id) {
            self.queues.remove(t.op.pool, t.op.lane, id);
        }
        let o = cancelled;
        self.write(id, move |op| op.state = OpState::Completed(o))
            .await;
        if let Some(f) = followers {
            self.followers.insert(id.to_string(), f);
        }
        Ok(Ack)
    }

    async fn on_heartbeat(&mut self, info: WorkerInfo) {
        let id = info.worker_id.clone();
        // Jobs recorded on this worker that it does not hold, although it had time to show them.
        let grace = self.config.assign_timeout_ms + 1000;
        let lost: Vec<String> = self
            .executions
            .iter()
            .filter(|(op, e)| {
                e.worker == id
                    && info.heartbeat_at_ms > e.since_ms + grace
                    && !info
                        .running
                        .iter()
                        .any(|h| h.operation_id == **op && h.attempt == e.attempt)
            })
            .map(|(op, _)| op.clone())
            .collect();
        let fresh = !self.workers.contains_key(&id);
        self.workers.insert(
            id.clone(),
            WorkerSeen {
                info,
                seen: Instant::now(),
            },
        );
        if fresh {
            tracing::info!(worker = %id, "Worker joined");
        }
        for op in lost {
            self.infrastructure_failure(&op, format!("worker {id} does not hold the job"))
                .await;
        }
    }

    async fn tick(&mut self) {
        let timeout = Duration::from_millis(self.config.worker_timeout_ms);
        // Silence counts only while this scheduler was connected to hear it: after its own
        // reconnection (a NATS server lost), workers get a full timeout to be heard again.
        let heard_for = self.bus.connected_for();
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.seen.elapsed().min(heard_for) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for w in &gone {
            self.workers.remove(w);
            self.alert(
                "worker_lost",
                w,
                &format!("worker {w} sent no heartbeat for {timeout:?}"),
            )
            .await;
        }
        // Jobs on lost workers, and (after a start-up grace) on workers never heard of.
        let settled = self.started.elapsed() > timeout;
        let orphaned: Vec<(String, String)> = self
            .executions
            .iter()
            .filter(|(_, e)| {
                gone.contains(&e.worker) || (settled && !self.workers.contains_key(&e.worker))
            })
            .map(|(op, e)| (op.clone(), e.worker.clone()))
            .collect();
        for (op, worker) in orphaned {
            self.infrastructure_failure(&op, format!("worker {worker} was lost"))
                .await;
        }
        for pool in Pool::ALL {
            for lane in Lane::ALL {
                metrics::gauge!(crate::metric_names::SCHEDULER_QUEUE_DEPTH, "pool" => pool.name(), "lane" => lane.name())
                    .set(self.queues.depth(pool, lane) as f64);
            }
        }
        metrics::gauge!(crate::metric_names::SCHEDULER_EXECUTING).set(self.executions.len() as f64);
        self.buckets.prune(now_ms());
        metrics::gauge!(crate::metric_names::SCHEDULER_WORKERS).set(self.workers.len() as f64);
    }

    /// Fills free worker slots from the queues.
    async fn dispatch(&mut self) {
        if self.queues.is_empty() {
            return;
        }
        let now = now_ms();
        let mut workers: Vec<WorkerInfo> = self.workers.values().map(|w| w.info.clone()).collect();
        // Emptiest workers first, so load spreads.
        workers.sort_by_key(|w| std::cmp::Reverse(self.free_slots(w)));
        for w in workers {
            let mut free = self.free_slots(&w);
            while free > 0 {
                let ops = &self.ops;
                let Some(entry) = self.queues.pick(w.pool, now, |id| {
                    ops.get(id)
                        .is_some_and(|t| platform_matches(&t.op.platform, &w.platform))
                }) else {
                    break;
                };
                let id = entry.id;
                let worker = w.worker_id.clone();
                let since = now_ms();
                let ok = self
                    .write(&id, |op| {
                        op.attempts += 1;
                        op.state = OpState::Executing {
                            worker: worker.clone(),
                            since_ms: since,
                        };
                    })
                    .await;
                if !ok {
                    // The record moved under us; if it is still waiting, it keeps its place.
                    if self
                        .ops
                        .get(&id)
                        .is_some_and(|t| matches!(t.op.state, OpState::Queued { follows: None }))
                    {
                        self.enqueue(&id);
                    }
                    continue;
                }
                let Some(t) = self.ops.get(&id) else {
                    continue;
                };
                let op = t.op.clone();
                metrics::counter!(crate::metric_names::SCHEDULER_DISPATCHED_TOTAL, "lane" => op.lane.name(), "pool" => op.pool.name())
                    .increment(1);
                metrics::histogram!(crate::metric_names::SCHEDULER_QUEUE_WAIT_SECONDS, "lane" => op.lane.name())
                    .record(since.saturating_sub(op.queued_ms) as f64 / 1000.0);
                self.executions.insert(
                    id.clone(),
                    Execution {
                        worker: worker.clone(),
                        attempt: op.attempts,
                        since_ms: since,
                    },
                );
                free -= 1;
                self.send_assignment(op, worker);
            }
        }
    }

    fn send_assignment(&self, op: Operation, worker: String) {
        let bus = self.bus.clone();
        let events = self.events.clone();
        let timeout = Duration::from_millis(self.config.assign_timeout_ms);
        let span = trace::child_of(trace::from_traceparent(&op.trace), || {
            tracing::info_span!(
                "scheduler.dispatch",
                op = %op.id,
                worker = %worker,
                attempt = op.attempts,
                lane = op.lane.name(),
                pool = op.pool.name(),
                queue_wait_ms = now_ms().saturating_sub(op.queued_ms),
            )
        });
        let assign = async move {
            let id = op.id.clone();
            let attempt = op.attempts;
            let req = Assign { operation: op };
            let reason = match bus
                .request_with_timeout(&subjects::exec::assign(&worker), &req, timeout)
                .await
            {
                Ok(AssignReply { accepted: true, .. }) => return,
                Ok(AssignReply { reason, .. }) => reason,
                // Nobody listens there: the worker did not get it.
                Err(e @ motorpool_bus::BusError::NoResponders { .. }) => e.to_string(),
                // No reply (a timeout, a connection lost while the bus fails over): the worker
                // may or may not hold it. Its heartbeat will tell; sending it elsewhere now could
                // run it twice.
                Err(error) => {
                    tracing::warn!(op = %id, %worker, %error, "No answer to an assignment; the worker's heartbeat will tell");
                    return;
                }
            };
            let _ = events
                .send(Event::AssignFailed {
                    id,
                    worker,
                    attempt,
                    reason,
                })
                .await;
        };
        tokio::spawn(tracing::Instrument::instrument(assign, span));
    }
}
