//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `kind`: Alerts raised on the bus, by kind.
pub const ALERTS_TOTAL: &str = "motorpool_alerts_total";

/// Gauge: 1 when this scheduler holds the lease and schedules, 0 on standby.
pub const SCHEDULER_ACTIVE: &str = "motorpool_scheduler_active";

/// Counter, labels `status`: Operations completed, by status.
pub const SCHEDULER_COMPLETED_TOTAL: &str = "motorpool_scheduler_completed_total";

/// Counter: Operations that followed an identical one instead of running.
pub const SCHEDULER_DEDUPLICATED_TOTAL: &str = "motorpool_scheduler_deduplicated_total";

/// Counter, labels `lane`, `pool`: Operations sent to workers, by lane and pool.
pub const SCHEDULER_DISPATCHED_TOTAL: &str = "motorpool_scheduler_dispatched_total";

/// Gauge: Operations executing on workers.
pub const SCHEDULER_EXECUTING: &str = "motorpool_scheduler_executing";

/// Counter: Job reports refused for naming another worker.
pub const SCHEDULER_FORGED_REPORTS_TOTAL: &str = "motorpool_scheduler_forged_reports_total";

/// Counter: Attempts that failed for platform reasons (worker lost, input missing).
pub const SCHEDULER_INFRASTRUCTURE_FAILURES_TOTAL: &str =
    "motorpool_scheduler_infrastructure_failures_total";

/// Gauge: The term of the lease this scheduler holds.
pub const SCHEDULER_LEASE_TERM: &str = "motorpool_scheduler_lease_term";

/// Gauge, labels `pool`, `lane`: Operations queued, by pool and lane.
pub const SCHEDULER_QUEUE_DEPTH: &str = "motorpool_scheduler_queue_depth";

/// Histogram, labels `lane`: Time from queueing to dispatch, by lane.
pub const SCHEDULER_QUEUE_WAIT_SECONDS: &str = "motorpool_scheduler_queue_wait_seconds";

/// Counter: API-triggered operations refused by the rate limit.
pub const SCHEDULER_RATE_LIMITED_TOTAL: &str = "motorpool_scheduler_rate_limited_total";

/// Counter: Attempts retried after an infrastructure failure.
pub const SCHEDULER_RETRIES_TOTAL: &str = "motorpool_scheduler_retries_total";

/// Counter: Times this scheduler took over from one that stopped renewing its lease.
pub const SCHEDULER_TAKEOVERS_TOTAL: &str = "motorpool_scheduler_takeovers_total";

/// Gauge: Workers the scheduler has heard from within the timeout.
pub const SCHEDULER_WORKERS: &str = "motorpool_scheduler_workers";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(ALERTS_TOTAL, "Alerts raised on the bus, by kind.");
    metrics::describe_gauge!(
        SCHEDULER_ACTIVE,
        "1 when this scheduler holds the lease and schedules, 0 on standby."
    );
    metrics::describe_counter!(
        SCHEDULER_COMPLETED_TOTAL,
        "Operations completed, by status."
    );
    metrics::describe_counter!(
        SCHEDULER_DEDUPLICATED_TOTAL,
        "Operations that followed an identical one instead of running."
    );
    metrics::describe_counter!(
        SCHEDULER_DISPATCHED_TOTAL,
        "Operations sent to workers, by lane and pool."
    );
    metrics::describe_gauge!(SCHEDULER_EXECUTING, "Operations executing on workers.");
    metrics::describe_counter!(
        SCHEDULER_FORGED_REPORTS_TOTAL,
        "Job reports refused for naming another worker."
    );
    metrics::describe_counter!(
        SCHEDULER_INFRASTRUCTURE_FAILURES_TOTAL,
        "Attempts that failed for platform reasons (worker lost, input missing)."
    );
    metrics::describe_gauge!(
        SCHEDULER_LEASE_TERM,
        "The term of the lease this scheduler holds."
    );
    metrics::describe_gauge!(
        SCHEDULER_QUEUE_DEPTH,
        "Operations queued, by pool and lane."
    );
    metrics::describe_histogram!(
        SCHEDULER_QUEUE_WAIT_SECONDS,
        "Time from queueing to dispatch, by lane."
    );
    metrics::describe_counter!(
        SCHEDULER_RATE_LIMITED_TOTAL,
        "API-triggered operations refused by the rate limit."
    );
    metrics::describe_counter!(
        SCHEDULER_RETRIES_TOTAL,
        "Attempts retried after an infrastructure failure."
    );
    metrics::describe_counter!(
        SCHEDULER_TAKEOVERS_TOTAL,
        "Times this scheduler took over from one that stopped renewing its lease."
    );
    metrics::describe_gauge!(
        SCHEDULER_WORKERS,
        "Workers the scheduler has heard from within the timeout."
    );
}
