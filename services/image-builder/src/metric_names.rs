//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `result`: Fleet image builds, by result.
pub const FLEET_BUILDS_TOTAL: &str = "motorpool_fleet_builds_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(FLEET_BUILDS_TOTAL, "Fleet image builds, by result.");
}
