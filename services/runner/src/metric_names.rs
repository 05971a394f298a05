//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `kind`: Alerts raised on the bus, by kind.
pub const ALERTS_TOTAL: &str = "motorpool_alerts_total";

/// Counter, labels `forge`, `outcome`: Commit statuses posted to the forge, by forge and outcome.
pub const RUNNER_FORGE_STATUSES_TOTAL: &str = "motorpool_runner_forge_statuses_total";

/// Counter, labels `outcome`: CI jobs run, by outcome.
pub const RUNNER_JOBS_TOTAL: &str = "motorpool_runner_jobs_total";

/// Counter: Warm workspaces cleaned for being over their size.
pub const RUNNER_WORKSPACE_CLEANINGS_TOTAL: &str = "motorpool_runner_workspace_cleanings_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(ALERTS_TOTAL, "Alerts raised on the bus, by kind.");
    metrics::describe_counter!(
        RUNNER_FORGE_STATUSES_TOTAL,
        "Commit statuses posted to the forge, by forge and outcome."
    );
    metrics::describe_counter!(RUNNER_JOBS_TOTAL, "CI jobs run, by outcome.");
    metrics::describe_counter!(
        RUNNER_WORKSPACE_CLEANINGS_TOTAL,
        "Warm workspaces cleaned for being over their size."
    );
}
