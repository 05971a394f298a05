//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter: Blob copies the reindexer made to restore replicas.
pub const REINDEXER_COPIES_TOTAL: &str = "motorpool_reindexer_copies_total";

/// Counter: Index entries of blobs no live shard holds, dropped.
pub const REINDEXER_DROPPED_TOTAL: &str = "motorpool_reindexer_dropped_total";

/// Histogram: Time of one reindexer sweep.
pub const REINDEXER_SWEEP_SECONDS: &str = "motorpool_reindexer_sweep_seconds";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        REINDEXER_COPIES_TOTAL,
        "Blob copies the reindexer made to restore replicas."
    );
    metrics::describe_counter!(
        REINDEXER_DROPPED_TOTAL,
        "Index entries of blobs no live shard holds, dropped."
    );
    metrics::describe_histogram!(REINDEXER_SWEEP_SECONDS, "Time of one reindexer sweep.");
}
