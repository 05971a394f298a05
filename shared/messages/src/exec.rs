//! Messages of remote execution: the operation record, worker registration and the scheduler's
//! conversation with workers. Kind ids live in 200..300.
//!
//! The operation record ([`Operation`]) is the durable state of one Execute call. It lives in a
//! JetStream KV bucket keyed by operation id: the gateway creates it, the scheduler alone moves it
//! through its states afterwards, and every gateway watches it to stream progress to clients.

use crate::{BlobDigest, DigestFunction, WireError, message};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Priority lane of a job, highest first. Every kind of work (builds, tests, image builds,
/// labeling) rides the same lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Lane {
    Release,
    Build,
    Test,
    Lint,
}

impl Lane {
    /// Every lane, highest priority first.
    pub const ALL: [Lane; 4] = [Lane::Release, Lane::Build, Lane::Test, Lane::Lint];

    /// 3 for release down to 0 for lint: higher runs first.
    pub fn rank(self) -> u32 {
        match self {
            Lane::Release => 3,
            Lane::Build => 2,
            Lane::Test => 1,
            Lane::Lint => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lane::Release => "release",
            Lane::Build => "build",
            Lane::Test => "test",
            Lane::Lint => "lint",
        }
    }

    /// The lane a job of this lane competes as after waiting `waited_ms`: one lane higher for
    /// every `aging_step_ms` waited, capped at release. The one aging rule for every kind of job
    /// (actions, image builds, labeling), so no lane starves anywhere.
    pub fn effective_rank(self, waited_ms: u64, aging_step_ms: u64) -> u32 {
        let aged = (waited_ms / aging_step_ms.max(1)).min(3) as u32;
        (self.rank() + aged).min(Lane::Release.rank())
    }

    /// Parses a lane name (case-insensitive).
    pub fn from_name(s: &str) -> Option<Lane> {
        Lane::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Worker pool: CPU or GPU machines. Each lane has one queue per pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Pool {
    Cpu,
    Gpu,
}

impl Pool {
    pub const ALL: [Pool; 2] = [Pool::Cpu, Pool::Gpu];

    pub fn name(self) -> &'static str {
        match self {
            Pool::Cpu => "cpu",
            Pool::Gpu => "gpu",
        }
    }

    /// The pool a job's platform properties ask for: GPU when `pool=gpu`, or when `gpu` (or
    /// `gpus`) is a number of at least 1 or `true`.
    pub fn of(properties: &[(String, String)]) -> Pool {
        let gpu = properties.iter().any(|(k, v)| match k.as_str() {
            "pool" => v.eq_ignore_ascii_case("gpu"),
            "gpu" | "gpus" => v.parse::<f64>().map(|n| n >= 1.0).unwrap_or(false) || v == "true",
            _ => false,
        });
        if gpu { Pool::Gpu } else { Pool::Cpu }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// True when a worker offering `offered` can run a job asking for `wanted`: every wanted label
/// is offered with the same value, and every wanted number is at most the offered number.
/// `pool` is not a label to match: it only selects the queue.
pub fn platform_matches(wanted: &[(String, String)], offered: &[(String, String)]) -> bool {
    wanted.iter().filter(|(k, _)| k != "pool").all(|(k, v)| {
        offered.iter().any(|(ok, ov)| {
            ok == k
                && match (v.parse::<f64>(), ov.parse::<f64>()) {
                    (Ok(want), Ok(have)) => want <= have,
                    _ => v == ov,
                }
        })
    })
}

/// Where an operation is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpState {
    /// Waiting in its lane (or for an identical action already in flight: `follows`).
    Queued { follows: Option<String> },
    /// Assigned to a worker.
    Executing { worker: String, since_ms: u64 },
    /// Finished, one way or another.
    Completed(Outcome),
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `None` when the action ran (whatever its exit code); otherwise why it could not.
    pub error: Option<WireError>,
    /// The encoded `ActionResult` (also present with a timeout: the partial result).
    #[serde(with = "crate::bytes::option")]
    pub result: Option<Vec<u8>>,
    /// Served from the action cache or from an identical operation's run.
    pub cached: bool,
    /// A human-readable note for the client (ExecuteResponse.message).
    pub message: String,
}

/// The durable record of one Execute call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// 32 lower-case hex characters; also the operation's name.
    pub id: String,
    pub instance: String,
    pub digest_function: DigestFunction,
    pub action: BlobDigest,
    pub lane: Lane,
    pub pool: Pool,
    /// Platform properties, sorted by name.
    pub platform: Vec<(String, String)>,
    pub do_not_cache: bool,
    /// The action's timeout in milliseconds (0: the worker's default).
    pub timeout_ms: u64,
    /// Who asked: the API client id, or the build tool's invocation id.
    pub client: String,
    /// Triggered through the API (rate-limited) rather than by a developer's build.
    pub api: bool,
    pub created_ms: u64,
    /// Not dispatched before this time (rate limits).
    pub not_before_ms: u64,
    /// How many times it was dispatched to a worker.
    pub attempts: u32,
    /// Why earlier attempts failed (infrastructure failures only).
    pub failures: Vec<String>,
    pub state: OpState,
    /// Stage timestamps (ms since the epoch) the client sees in ExecutedActionMetadata.
    pub queued_ms: u64,
    /// The W3C `traceparent` of the call that queued it, empty outside any trace: the record
    /// reaches the scheduler through a KV watch, not a message with headers.
    pub trace: String,
}
message!(Operation, 200, 2);

impl Operation {
    pub fn is_done(&self) -> bool {
        matches!(self.state, OpState::Completed(_))
    }
}

/// A worker's registration, refreshed every heartbeat (KV bucket keyed by worker id, and the
/// heartbeat subject).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub pool: Pool,
    /// Platform properties this worker offers, sorted by name.
    pub platform: Vec<(String, String)>,
    /// Jobs it runs at once.
    pub slots: u32,
    /// Every job it holds, in any stage, by operation id.
    pub running: Vec<HeldJob>,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    /// Leaving: takes no new work.
    pub draining: bool,
    /// Names the worker's data dir (a random token kept there): a worker restarted on the same
    /// data dir knows the registry entry it finds is its own predecessor's.
    pub instance: String,
}
message!(WorkerInfo, 201, 2);

/// A job a worker holds, from its assignment until the scheduler acknowledged its end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldJob {
    pub operation_id: String,
    pub attempt: u32,
    pub stage: JobStage,
    /// When it entered the stage (the worker's clock).
    pub since_ms: u64,
}

/// Where a held job is in the worker's pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobStage {
    /// Accepted, waiting for the input-fetch stage.
    Accepted,
    /// Reading the action and materialising its input tree.
    Fetching,
    /// Inputs in place, waiting for an execution slot (or for the same action already running).
    Ready,
    Executing,
    /// Collecting outputs, uploading them and the action result.
    Uploading,
    /// Ended; its report waits for the scheduler's acknowledgement.
    Reporting,
}

impl JobStage {
    pub const ALL: [JobStage; 6] = [
        JobStage::Accepted,
        JobStage::Fetching,
        JobStage::Ready,
        JobStage::Executing,
        JobStage::Uploading,
        JobStage::Reporting,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobStage::Accepted => "accepted",
            JobStage::Fetching => "fetching",
            JobStage::Ready => "ready",
            JobStage::Executing => "executing",
            JobStage::Uploading => "uploading",
            JobStage::Reporting => "reporting",
        }
    }
}

/// The scheduler hands a job to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assign {
    pub operation: Operation,
}
message!(Assign, 202, 1, reply = AssignReply);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignReply {
    /// False when the worker has no room (the scheduler tries elsewhere later).
    pub accepted: bool,
    pub reason: String,
}
message!(AssignReply, 203, 1);

/// How a job ended on a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobResult {
    /// The action ran, or failed in a way a retry cannot cure (a missing input, a bad command).
    Finished(Outcome),
    /// The platform failed it (exec dir, input fetch, upload): the scheduler retries.
    Infrastructure(String),
}

/// A worker reports the end of a job; sent until the scheduler acknowledges it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDone {
    pub operation_id: String,
    pub attempt: u32,
    pub worker: String,
    pub result: JobResult,
}
message!(JobDone, 204, 1, reply = Ack);

/// A plain acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack;
message!(Ack, 205, 1);

/// Cancel an operation (scheduler), or stop running it (worker).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub operation_id: String,
}
message!(Cancel, 206, 1, reply = Ack);

/// Something an operator must look at: published on the alerts subject, logged and counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Short machine-readable kind, for example `retries_exhausted`.
    pub kind: String,
    /// The service that raised it.
    pub source: String,
    pub subject_id: String,
    pub message: String,
    pub at_ms: u64,
}
message!(Alert, 207, 1);

/// The scheduler's view, for `/api/v1/queues` and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// `(pool, lane, queued)`.
    pub depth: Vec<(Pool, Lane, u64)>,
    pub executing: u64,
    pub workers: u64,
    pub free_slots: u64,
    /// The active scheduler that answered (its `--scheduler-id`) and its lease term.
    pub scheduler: String,
    pub term: u64,
}
message!(QueueStats, 208, 2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetQueueStats;
message!(GetQueueStats, 209, 1, reply = QueueStats);

/// Which scheduler is active: the single record of the scheduler lease bucket. The holder
/// renews it (a compare-and-set write) every third of the lease; a standby that sees the same
/// revision for a whole lease, or a released one, takes it with the next term.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerLease {
    /// The holder's `--scheduler-id`.
    pub holder: String,
    /// A random token per process: a scheduler restarted under the same id is another holder.
    pub instance: String,
    /// Raised by one at every change of holder.
    pub term: u64,
    /// When the holder took it, and when it last renewed it (the holder's clock; shown to
    /// people, never compared across hosts).
    pub since_ms: u64,
    pub renewed_ms: u64,
    /// Let go on a clean stop: a standby takes it at once.
    pub released: bool,
}
message!(SchedulerLease, 212, 1);

/// May this API client start an execution now? Asked by the gateway before it queues an
/// API-triggered operation; the scheduler keeps one token bucket per client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admit {
    pub client: String,
}
message!(Admit, 210, 1, reply = Admission);

/// Admitted: the operation waits in its lane until `not_before_ms`. (Over the configured bound the
/// reply is a `ResourceExhausted` error instead.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub not_before_ms: u64,
}
message!(Admission, 211, 1);

#[cfg(test)]
mod tests {
    use super::*;

    fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_match_exactly_and_numbers_as_minimums() {
        let offered = props(&[("OSFamily", "linux"), ("cores", "8"), ("gpu", "1")]);
        assert!(platform_matches(&props(&[]), &offered));
        assert!(platform_matches(
            &props(&[("OSFamily", "linux"), ("cores", "4")]),
            &offered
        ));
        assert!(!platform_matches(&props(&[("cores", "16")]), &offered));
        assert!(!platform_matches(
            &props(&[("OSFamily", "windows")]),
            &offered
        ));
        assert!(!platform_matches(&props(&[("arch", "arm64")]), &offered));
        assert!(platform_matches(
            &props(&[("pool", "gpu"), ("gpu", "1")]),
            &offered
        ));
    }

    #[test]
    fn pool_comes_from_properties() {
        assert_eq!(Pool::of(&props(&[])), Pool::Cpu);
        assert_eq!(Pool::of(&props(&[("pool", "GPU")])), Pool::Gpu);
        assert_eq!(Pool::of(&props(&[("gpu", "2")])), Pool::Gpu);
        assert_eq!(Pool::of(&props(&[("gpu", "0")])), Pool::Cpu);
        assert_eq!(Pool::of(&props(&[("pool", "cpu-large")])), Pool::Cpu);
    }

    #[test]
    fn lanes_order_and_parse() {
        assert!(Lane::Release.rank() > Lane::Build.rank());
        assert!(Lane::Test.rank() > Lane::Lint.rank());
        assert_eq!(Lane::from_name(" Release"), Some(Lane::Release));
        assert_eq!(Lane::from_name("urgent"), None);
    }

    #[test]
    fn waiting_raises_a_lane_up_to_release() {
        assert_eq!(Lane::Lint.effective_rank(0, 10_000), 0);
        assert_eq!(Lane::Lint.effective_rank(19_999, 10_000), 1);
        assert_eq!(Lane::Test.effective_rank(20_000, 10_000), 3);
        assert_eq!(
            Lane::Lint.effective_rank(u64::MAX, 10_000),
            3,
            "capped at release"
        );
        assert_eq!(Lane::Release.effective_rank(0, 0), 3);
    }
}
