//! Which scheduler is active: a lease in a JetStream KV bucket.
//!
//! One record names the holder. The holder renews it every third of the lease with a
//! compare-and-set write on the revision it last wrote; a standby polls it and takes it (a
//! compare-and-set write on the revision it saw, with the next term) once the same revision has
//! stood for a whole lease by the standby's own clock, or at once when the holder released it.
//! No clock is compared across hosts: only "has this revision changed", timed locally.
//!
//! **Safety does not rest on the lease.** Every change the scheduler makes to an operation is a
//! compare-and-set on the operation's record, and an assignment is recorded before it is sent,
//! so two schedulers that both believe they are active (a holder cut off from the bus while a
//! standby takes over) can never hand out the same attempt twice: one write wins, the other is
//! told the record moved. The lease keeps one scheduler doing the work, so that slot counts and
//! rate limits are kept in one place; a holder that learns it lost the lease stops at once, and
//! one that cannot renew for two leases stops too.

use async_nats::jetstream::kv;
use bytes::Bytes;
use motorpool_messages::exec::SchedulerLease;
use motorpool_messages::{codec, now_ms};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How this process takes part.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// `--scheduler-id`.
    pub holder: String,
    /// Random per process.
    pub instance: String,
    /// How long a holder may stay silent before a standby takes over.
    pub lease: Duration,
}

impl LeaseSettings {
    fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    fn poll_every(&self) -> Duration {
        (self.lease / 6).max(Duration::from_millis(50))
    }
}

/// The lease while this process holds it.
pub struct Held {
    pub term: u64,
    revision: u64,
    record: SchedulerLease,
    /// When the last confirmed renewal was sent.
    renewed: Instant,
    /// How long the standby waited, from first seeing the last holder's final revision (none
    /// when the lease was free or released).
    pub waited: Option<Duration>,
    pub previous: Option<String>,
}

impl Held {
    /// When the last renewal the bus confirmed was sent (or the lease taken).
    pub fn renewed(&self) -> Instant {
        self.renewed
    }
}

/// Waits until this process holds the lease (or `stop` fires: `None`).
pub async fn acquire(kv: &kv::Store, me: &LeaseSettings, stop: &CancellationToken) -> Option<Held> {
    // The revision a standby is watching, and since when (its own clock).
    let mut watching: Option<(u64, Instant)> = None;
    let mut said_standby = false;
    loop {
        let now = Instant::now();
        let attempt = match kv.entry(subjects_key()).await {
            Ok(None) => Some((None, 0, None)),
            Ok(Some(entry)) if entry.operation != kv::Operation::Put => {
                Some((None, entry.revision, None))
            }
            Ok(Some(entry)) => match codec::decode::<SchedulerLease>(&entry.value) {
                Err(error) => {
                    tracing::warn!(%error, "The scheduler lease record is unreadable; taking it over");
                    Some((None, entry.revision, None))
                }
                Ok(current) => {
                    let since = match watching {
                        Some((rev, since)) if rev == entry.revision => since,
                        _ => {
                            watching = Some((entry.revision, now));
                            now
                        }
                    };
                    if current.released {
                        Some((Some(current), entry.revision, None))
                    } else if now.duration_since(since) >= me.lease {
                        Some((
                            Some(current),
                            entry.revision,
                            Some(now.duration_since(since)),
                        ))
                    } else {
                        if !said_standby {
                            tracing::info!(active = %current.holder, term = current.term, "Standing by: another scheduler is active");
                            said_standby = true;
                        }
                        None
                    }
                }
            },
            Err(error) => {
                tracing::debug!(%error, "Cannot read the scheduler lease; trying again");
                None
            }
        };
        if let Some((current, revision, waited)) = attempt {
            let term = current.as_ref().map_or(0, |c| c.term) + 1;
            let record = SchedulerLease {
                holder: me.holder.clone(),
                instance: me.instance.clone(),
                term,
                since_ms: now_ms(),
                renewed_ms: now_ms(),
                released: false,
            };
            let sent = Instant::now();
            let written = match codec::encode(&record) {
                Ok(frame) => {
                    let frame = Bytes::from(frame);
                    if revision == 0 {
                        kv.create(subjects_key(), frame)
                            .await
                            .map_err(|e| e.to_string())
                    } else {
                        kv.update(subjects_key(), frame, revision)
                            .await
                            .map_err(|e| e.to_string())
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match written {
                Ok(revision) => {
                    return Some(Held {
                        term,
                        revision,
                        record,
                        renewed: sent,
                        waited,
                        previous: current.map(|c| c.holder),
                    });
                }
                // Someone else was faster (or renewed just now): keep watching.
                Err(error) => {
                    tracing::debug!(%error, "Lost the race for the scheduler lease");
                    watching = None;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(me.poll_every()) => {}
        }
    }
}

/// Why a holder stopped holding.
#[derive(Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another scheduler holds it now.
    TakenBy(String),
    /// No renewal was confirmed for two leases: a standby may well be active.
    Unrenewed(Duration),
    /// `stop` fired.
    Stopped,
}

/// Renews the lease until it is lost or `stop` fires (the caller then [`release`]s it, once it
/// has stopped working).
pub async fn hold(
    kv: &kv::Store,
    me: &LeaseSettings,
    held: &mut Held,
    stop: &CancellationToken,
) -> Lost {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Lost::Stopped,
            _ = tokio::time::sleep(me.renew_every()) => {}
        }
        let sent = Instant::now();
        let mut record = held.record.clone();
        record.renewed_ms = now_ms();
        let Ok(frame) = codec::encode(&record) else {
            continue;
        };
        match kv
            .update(subjects_key(), Bytes::from(frame), held.revision)
            .await
        {
            Ok(revision) => {
                held.revision = revision;
                held.record = record;
                held.renewed = sent;
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Moved: read who holds it. A write of ours whose answer was lost reads back as
                // ours (same instance and term) and is kept.
                if let Ok(Some(entry)) = kv.entry(subjects_key()).await
                    && let Ok(current) = codec::decode::<SchedulerLease>(&entry.value)
                {
                    if current.instance == held.record.instance && current.term == held.term {
                        held.revision = entry.revision;
                        held.record = current;
                        held.renewed = sent;
                        continue;
                    }
                    return Lost::TakenBy(current.holder);
                }
                return Lost::TakenBy("(unknown)".into());
            }
            Err(error) => {
                let silent = held.renewed.elapsed();
                if silent >= me.lease * 2 {
                    return Lost::Unrenewed(silent);
                }
                tracing::warn!(%error, ?silent, "Cannot renew the scheduler lease; trying again");
            }
        }
    }
}

/// Lets go of the lease so that a standby takes it at once.
pub async fn release(kv: &kv::Store, held: &Held) {
    let mut record = held.record.clone();
    record.released = true;
    record.renewed_ms = now_ms();
    if let Ok(frame) = codec::encode(&record)
        && let Err(error) = kv
            .update(subjects_key(), Bytes::from(frame), held.revision)
            .await
    {
        tracing::warn!(%error, "Could not release the scheduler lease; a standby takes it after a lease");
    }
}

fn subjects_key() -> &'static str {
    motorpool_bus::subjects::exec::LEASE_KEY
}
