//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `message`: Bus messages that did not decode, dropped, by message type.
pub const BUS_MALFORMED_TOTAL: &str = "motorpool_bus_malformed_total";

/// Counter: Bytes received on the bus.
pub const BUS_RECEIVED_BYTES_TOTAL: &str = "motorpool_bus_received_bytes_total";

/// Counter: Bytes sent on the bus.
pub const BUS_SENT_BYTES_TOTAL: &str = "motorpool_bus_sent_bytes_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        BUS_MALFORMED_TOTAL,
        "Bus messages that did not decode, dropped, by message type."
    );
    metrics::describe_counter!(BUS_RECEIVED_BYTES_TOTAL, "Bytes received on the bus.");
    metrics::describe_counter!(BUS_SENT_BYTES_TOTAL, "Bytes sent on the bus.");
}
