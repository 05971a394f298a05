//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `stage`: Labeling jobs failed, by stage.
pub const LABEL_FAILURES_TOTAL: &str = "motorpool_label_failures_total";

/// Histogram, labels `stage`: Time a labeling stage took for a clip, by stage.
pub const LABEL_STAGE_SECONDS: &str = "motorpool_label_stage_seconds";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(LABEL_FAILURES_TOTAL, "Labeling jobs failed, by stage.");
    metrics::describe_histogram!(
        LABEL_STAGE_SECONDS,
        "Time a labeling stage took for a clip, by stage."
    );
}
