//! Every NATS subject and JetStream resource Motorpool uses, built here and nowhere else.
//!
//! Scheme: `mp.<version>.<domain>.<noun>.<verb>[.<id>]`. The id comes last so that a wildcard
//! (`mp.v1.cas.shard.heartbeat.*`) selects all instances of one message.

use std::fmt;

/// Subject root shared by every Motorpool message.
pub const ROOT: &str = "mp";
/// Subject-scheme version; a breaking change to the scheme gets a new one.
pub const VERSION: &str = "v1";

/// A NATS subject.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subject(String);

impl Subject {
    fn build(domain: &str, noun: &str, verb: &str, id: Option<&str>) -> Subject {
        let mut s = format!("{ROOT}.{VERSION}.{domain}.{noun}.{verb}");
        if let Some(id) = id {
            s.push('.');
            s.push_str(id);
        }
        Subject(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Subject> for async_nats::Subject {
    fn from(s: Subject) -> Self {
        async_nats::Subject::from(s.0)
    }
}

/// True when `id` can be a subject token and a KV key: ASCII letters, digits, `-` and `_`,
/// at most 64 characters.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Content-addressable storage: the gateway and the CAS shards.
pub mod cas {
    use super::Subject;

    const DOMAIN: &str = "cas";

    /// `FindMissing` to one shard.
    pub fn find_missing(shard: &str) -> Subject {
        Subject::build(DOMAIN, "blob", "find", Some(shard))
    }
    /// `BatchWrite` to one shard.
    pub fn batch_write(shard: &str) -> Subject {
        Subject::build(DOMAIN, "blob", "write", Some(shard))
    }
    /// `BatchRead` to one shard.
    pub fn batch_read(shard: &str) -> Subject {
        Subject::build(DOMAIN, "blob", "read", Some(shard))
    }
    /// `ListBlobs` to one shard.
    pub fn list(shard: &str) -> Subject {
        Subject::build(DOMAIN, "blob", "list", Some(shard))
    }
    /// `ReadChunk` to one shard (chunked read over NATS).
    pub fn read_chunk(shard: &str) -> Subject {
        Subject::build(DOMAIN, "chunk", "read", Some(shard))
    }
    /// `WriteChunk` to one shard (chunked write over NATS).
    pub fn write_chunk(shard: &str) -> Subject {
        Subject::build(DOMAIN, "chunk", "write", Some(shard))
    }
    /// `QueryWrite` to one shard.
    pub fn query_write(shard: &str) -> Subject {
        Subject::build(DOMAIN, "upload", "query", Some(shard))
    }
    /// `AcGet` to one shard.
    pub fn ac_get(shard: &str) -> Subject {
        Subject::build(DOMAIN, "action", "get", Some(shard))
    }
    /// `AcPut` to one shard.
    pub fn ac_put(shard: &str) -> Subject {
        Subject::build(DOMAIN, "action", "put", Some(shard))
    }
    /// `AcDelete` to one shard.
    pub fn ac_delete(shard: &str) -> Subject {
        Subject::build(DOMAIN, "action", "delete", Some(shard))
    }
    /// `ShardInfo` heartbeats of one shard.
    pub fn heartbeat(shard: &str) -> Subject {
        Subject::build(DOMAIN, "shard", "heartbeat", Some(shard))
    }
    /// Heartbeats of every shard.
    pub fn all_heartbeats() -> Subject {
        Subject::build(DOMAIN, "shard", "heartbeat", Some("*"))
    }
    /// `ShardNews` of one shard: removals and beats, in order.
    pub fn news(shard: &str) -> Subject {
        Subject::build(DOMAIN, "shard", "news", Some(shard))
    }
    /// `ShardNews` of every shard.
    pub fn all_news() -> Subject {
        Subject::build(DOMAIN, "shard", "news", Some("*"))
    }
    /// The shard registry: a JetStream KV bucket, key = shard id, value = `ShardInfo`.
    pub const REGISTRY_BUCKET: &str = "mp_v1_cas_shards";

    /// How the shard registry bucket is set up (by whichever service starts first): the latest
    /// entry per shard; entries of shards silent for an hour age out.
    pub fn registry_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: REGISTRY_BUCKET.to_string(),
            history: 1,
            max_age: std::time::Duration::from_secs(3600),
            ..Default::default()
        }
    }
}

/// Remote execution: gateway, scheduler and workers.
pub mod exec {
    use super::Subject;
    use std::time::Duration;

    const DOMAIN: &str = "exec";

    /// `Assign` to one worker.
    pub fn assign(worker: &str) -> Subject {
        Subject::build(DOMAIN, "job", "assign", Some(worker))
    }
    /// `Cancel` to one worker: stop running that job.
    pub fn stop(worker: &str) -> Subject {
        Subject::build(DOMAIN, "job", "stop", Some(worker))
    }
    /// `JobDone` from `worker` to the scheduler (queue group [`SCHEDULER_GROUP`]; the scheduler
    /// subscribes to `job_done("*")`). Only that worker may publish here, so the subject's id
    /// says who reports.
    pub fn job_done(worker: &str) -> Subject {
        Subject::build(DOMAIN, "job", "done", Some(worker))
    }
    /// `Cancel` of an operation, to the scheduler.
    pub fn cancel() -> Subject {
        Subject::build(DOMAIN, "operation", "cancel", None)
    }
    /// `Admit` (API rate limits) to the scheduler.
    pub fn admit() -> Subject {
        Subject::build(DOMAIN, "client", "admit", None)
    }
    /// `GetQueueStats` to the scheduler.
    pub fn queue_stats() -> Subject {
        Subject::build(DOMAIN, "queue", "stats", None)
    }
    /// `WorkerInfo` heartbeats of one worker.
    pub fn heartbeat(worker: &str) -> Subject {
        Subject::build(DOMAIN, "worker", "heartbeat", Some(worker))
    }
    /// Heartbeats of every worker.
    pub fn all_heartbeats() -> Subject {
        Subject::build(DOMAIN, "worker", "heartbeat", Some("*"))
    }
    /// Queue group of the scheduler's mailboxes.
    pub const SCHEDULER_GROUP: &str = "scheduler";

    /// The operation records: a JetStream KV bucket, key = operation id, value = `Operation`.
    pub const OPERATIONS_BUCKET: &str = "mp_v1_exec_operations";

    /// Operations are kept (latest state only) for a week, then age out.
    pub fn operations_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: OPERATIONS_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        }
    }

    /// The scheduler lease: one record (key [`LEASE_KEY`], value `SchedulerLease`) naming the
    /// active scheduler. Three revisions are kept, so an operator can see the last takeovers.
    pub const LEASE_BUCKET: &str = "mp_v1_exec_scheduler_lease";
    pub const LEASE_KEY: &str = "active";

    pub fn lease_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: LEASE_BUCKET.to_string(),
            history: 3,
            ..Default::default()
        }
    }

    /// The worker registry: a JetStream KV bucket, key = worker id, value = `WorkerInfo`.
    pub const WORKERS_BUCKET: &str = "mp_v1_exec_workers";

    pub fn workers_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: WORKERS_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(3600),
            ..Default::default()
        }
    }
}

/// The BevSlots auto-labeling pipeline: stage job queues and per-stage status.
pub mod label {
    use super::Subject;
    use motorpool_messages::exec::Lane;
    use motorpool_messages::label::Stage;
    use std::time::Duration;

    const DOMAIN: &str = "label";

    /// `LabelJob`s queued for `stage` in `lane` (JetStream stream [`JOBS_STREAM`]).
    pub fn run(stage: Stage, lane: Lane) -> Subject {
        Subject::build(DOMAIN, stage.name(), "run", Some(lane.name()))
    }
    /// Every lane of one stage.
    pub fn all_runs(stage: Stage) -> Subject {
        Subject::build(DOMAIN, stage.name(), "run", Some("*"))
    }
    /// The stream that holds queued jobs until a stage takes and finishes them.
    pub const JOBS_STREAM: &str = "MP_V1_LABEL_JOBS";

    /// Work-queue retention: a job leaves the stream when its stage acknowledges it.
    pub fn jobs_stream_config() -> async_nats::jetstream::stream::Config {
        async_nats::jetstream::stream::Config {
            name: JOBS_STREAM.to_string(),
            subjects: vec![format!(
                "{}.{}.{}.*.run.*",
                super::ROOT,
                super::VERSION,
                DOMAIN
            )],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        }
    }
    /// Durable consumer name of `stage` for `lane`.
    pub fn consumer(stage: Stage, lane: Lane) -> String {
        format!("label-{}-{}", stage.name(), lane.name())
    }
    /// Status of every job in every stage: KV bucket, key `<job id>.<stage>`.
    pub const STATUS_BUCKET: &str = "mp_v1_label_status";

    pub fn status_key(job_id: &str, stage: Stage) -> String {
        format!("{job_id}.{}", stage.name())
    }

    pub fn status_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: STATUS_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        }
    }
}

/// Fleet images: build jobs, build statuses, drive states.
pub mod fleet {
    use super::Subject;
    use motorpool_messages::exec::Lane;
    use std::time::Duration;

    const DOMAIN: &str = "fleet";

    /// `ImageBuildJob`s queued in `lane` (stream [`BUILDS_STREAM`]).
    pub fn build(lane: Lane) -> Subject {
        Subject::build(DOMAIN, "image", "build", Some(lane.name()))
    }
    pub const BUILDS_STREAM: &str = "MP_V1_FLEET_BUILDS";

    pub fn builds_stream_config() -> async_nats::jetstream::stream::Config {
        async_nats::jetstream::stream::Config {
            name: BUILDS_STREAM.to_string(),
            subjects: vec![build_all().as_str().to_string()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            max_age: Duration::from_secs(7 * 24 * 3600),
            // A build queued twice under one id (a webhook delivery finished again) runs once.
            duplicate_window: super::ci::DUPLICATE_WINDOW,
            ..Default::default()
        }
    }
    fn build_all() -> Subject {
        Subject::build(DOMAIN, "image", "build", Some("*"))
    }
    /// Durable consumer of the builders for `lane`.
    pub fn build_consumer(lane: Lane) -> String {
        format!("fleet-build-{}", lane.name())
    }
    /// Build statuses: KV bucket, key = job id.
    pub const BUILDS_BUCKET: &str = "mp_v1_fleet_builds";
    pub fn builds_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: BUILDS_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        }
    }
    /// `DriveStatus` changes of one burner (cheap signals for dashboards).
    pub fn drive_state(burner: &str) -> Subject {
        Subject::build(DOMAIN, "drive", "state", Some(burner))
    }
    /// Drive states: KV bucket, key `<burner>.<drive>`.
    pub const DRIVES_BUCKET: &str = "mp_v1_fleet_drives";
    pub fn drives_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: DRIVES_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        }
    }
}

/// CI: jobs from forge events and API calls, their statuses, deliveries seen.
pub mod ci {
    use super::Subject;
    use motorpool_messages::exec::Lane;
    use std::time::Duration;

    const DOMAIN: &str = "ci";

    /// `CiJob`s queued in `lane` (stream [`JOBS_STREAM`]).
    pub fn run(lane: Lane) -> Subject {
        Subject::build(DOMAIN, "job", "run", Some(lane.name()))
    }
    fn run_all() -> Subject {
        Subject::build(DOMAIN, "job", "run", Some("*"))
    }
    pub const JOBS_STREAM: &str = "MP_V1_CI_JOBS";

    /// Jobs wait here until a runner has done them (a work queue: each is taken once). A job
    /// published twice with the same id within [`DUPLICATE_WINDOW`] is stored once.
    pub fn jobs_stream_config() -> async_nats::jetstream::stream::Config {
        async_nats::jetstream::stream::Config {
            name: JOBS_STREAM.to_string(),
            subjects: vec![run_all().as_str().to_string()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        }
    }
    /// How long JetStream remembers a job id it stored.
    pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
    /// Durable consumer of the runners for `lane`.
    pub fn run_consumer(lane: Lane) -> String {
        format!("ci-run-{}", lane.name())
    }
    /// Job statuses: KV bucket, key = job id.
    pub const JOBS_BUCKET: &str = "mp_v1_ci_jobs";
    pub fn jobs_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: JOBS_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        }
    }
    /// Deliveries seen: KV bucket, key = a hash of forge and delivery id. Forges redeliver for
    /// days at most (GitHub keeps deliveries three days), so a week covers every retry.
    pub const DELIVERIES_BUCKET: &str = "mp_v1_ci_deliveries";
    pub fn deliveries_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: DELIVERIES_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        }
    }
    /// Workspace pools: KV bucket, key = `<pool>.<workspace>`. Entries hold the leases.
    pub const WORKSPACES_BUCKET: &str = "mp_v1_ci_workspaces";
    pub fn workspaces_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: WORKSPACES_BUCKET.to_string(),
            history: 1,
            ..Default::default()
        }
    }
    /// A merge request's newest jobs: KV bucket, key = `<project hash>.<number>`.
    pub const MERGE_REQUESTS_BUCKET: &str = "mp_v1_ci_merge_requests";
    pub fn merge_requests_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: MERGE_REQUESTS_BUCKET.to_string(),
            history: 1,
            max_age: Duration::from_secs(90 * 24 * 3600),
            ..Default::default()
        }
    }
}

/// The Build Event Service: Bazel's build events and the platform's actions, per invocation.
pub mod bes {
    use super::Subject;
    use std::time::Duration;

    const DOMAIN: &str = "bes";

    /// `BesEvent`s of one invocation, in the order they were acknowledged.
    pub fn event(invocation: &str) -> Subject {
        Subject::build(DOMAIN, "event", "publish", Some(invocation))
    }
    /// `RemoteAction`s of one invocation.
    pub fn action(invocation: &str) -> Subject {
        Subject::build(DOMAIN, "action", "record", Some(invocation))
    }
    pub const STREAM: &str = "MP_V1_BES";

    /// Events and actions of every invocation, kept `max_age` and at most `max_bytes` (the
    /// oldest go first). A message published twice under one id within the duplicate window
    /// (Bazel resending an event it saw no acknowledgement for) is stored once.
    pub fn stream_config(
        max_age: Duration,
        max_bytes: i64,
    ) -> async_nats::jetstream::stream::Config {
        async_nats::jetstream::stream::Config {
            name: STREAM.to_string(),
            subjects: vec![format!("mp.v1.{DOMAIN}.*.*.*")],
            max_age,
            max_bytes,
            discard: async_nats::jetstream::stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        }
    }
    /// Invocation summaries: KV bucket, key = invocation id.
    pub const INVOCATIONS_BUCKET: &str = "mp_v1_bes_invocations";
    pub fn invocations_config(max_age: Duration) -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: INVOCATIONS_BUCKET.to_string(),
            history: 1,
            max_age,
            ..Default::default()
        }
    }
}

/// Operations: alerts for people.
pub mod ops {
    use super::Subject;

    const DOMAIN: &str = "ops";

    /// An `Alert` of one kind (`retries_exhausted`, ...).
    pub fn alert(kind: &str) -> Subject {
        Subject::build(DOMAIN, "alert", "raise", Some(kind))
    }
    /// Alerts of every kind.
    pub fn all_alerts() -> Subject {
        Subject::build(DOMAIN, "alert", "raise", Some("*"))
    }
    /// The stream that keeps alerts for whoever looks later.
    pub const ALERTS_STREAM: &str = "MP_V1_ALERTS";

    pub fn alerts_stream_config() -> async_nats::jetstream::stream::Config {
        async_nats::jetstream::stream::Config {
            name: ALERTS_STREAM.to_string(),
            subjects: vec![all_alerts().as_str().to_string()],
            max_age: std::time::Duration::from_secs(30 * 24 * 3600),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_puts_ids_last() {
        assert_eq!(cas::find_missing("s1").as_str(), "mp.v1.cas.blob.find.s1");
        assert_eq!(
            cas::heartbeat("w-7").as_str(),
            "mp.v1.cas.shard.heartbeat.w-7"
        );
        assert_eq!(
            cas::all_heartbeats().as_str(),
            "mp.v1.cas.shard.heartbeat.*"
        );
    }

    #[test]
    fn label_subjects_fit_the_jobs_stream() {
        use motorpool_messages::{exec::Lane, label::Stage};
        let s = label::run(Stage::Prelabel, Lane::Release);
        assert_eq!(s.as_str(), "mp.v1.label.prelabel.run.release");
        assert_eq!(
            label::jobs_stream_config().subjects,
            ["mp.v1.label.*.run.*"]
        );
    }

    #[test]
    fn ids_are_single_tokens() {
        assert!(valid_id("shard-01_a"));
        for bad in ["", "a.b", "a b", "a*", ">", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
