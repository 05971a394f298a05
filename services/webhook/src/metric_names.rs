//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `lane`: Fleet image builds queued by tag events, by lane.
pub const CI_IMAGES_QUEUED_TOTAL: &str = "motorpool_ci_images_queued_total";

/// Counter, labels `lane`, `kind`: CI jobs queued, by lane and kind.
pub const CI_JOBS_QUEUED_TOTAL: &str = "motorpool_ci_jobs_queued_total";

/// Counter: Queued CI jobs cancelled by a newer push to the same merge request.
pub const CI_JOBS_SUPERSEDED_TOTAL: &str = "motorpool_ci_jobs_superseded_total";

/// Counter, labels `forge`, `outcome`: Forge events received, by forge and outcome.
pub const WEBHOOK_EVENTS_TOTAL: &str = "motorpool_webhook_events_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        CI_IMAGES_QUEUED_TOTAL,
        "Fleet image builds queued by tag events, by lane."
    );
    metrics::describe_counter!(CI_JOBS_QUEUED_TOTAL, "CI jobs queued, by lane and kind.");
    metrics::describe_counter!(
        CI_JOBS_SUPERSEDED_TOTAL,
        "Queued CI jobs cancelled by a newer push to the same merge request."
    );
    metrics::describe_counter!(
        WEBHOOK_EVENTS_TOTAL,
        "Forge events received, by forge and outcome."
    );
}
