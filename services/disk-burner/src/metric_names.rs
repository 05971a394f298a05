//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `how`: Image bytes a burner fetched into its depot or reused from it.
pub const FLEET_DEPOT_BYTES_TOTAL: &str = "motorpool_fleet_depot_bytes_total";

/// Gauge, labels `state`: Drives in the burner's bays, by state.
pub const FLEET_DRIVES: &str = "motorpool_fleet_drives";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        FLEET_DEPOT_BYTES_TOTAL,
        "Image bytes a burner fetched into its depot or reused from it."
    );
    metrics::describe_gauge!(FLEET_DRIVES, "Drives in the burner's bays, by state.");
}
