//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `transport`: Connections opened to shards' data ports, by transport.
pub const CAS_DATA_CONNECTIONS_TOTAL: &str = "motorpool_cas_data_connections_total";

/// Counter: Blobs written to fewer shards than their replica count.
pub const CAS_UNDER_REPLICATED_TOTAL: &str = "motorpool_cas_under_replicated_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        CAS_DATA_CONNECTIONS_TOTAL,
        "Connections opened to shards' data ports, by transport."
    );
    metrics::describe_counter!(
        CAS_UNDER_REPLICATED_TOTAL,
        "Blobs written to fewer shards than their replica count."
    );
}
