//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `sink`, `outcome`: Alerts delivered to a sink, by sink and outcome.
pub const ALERT_RELAY_ALERTS_TOTAL: &str = "motorpool_alert_relay_alerts_total";

/// Counter: Alert messages on the bus that did not decode, dropped.
pub const ALERT_RELAY_MALFORMED_TOTAL: &str = "motorpool_alert_relay_malformed_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        ALERT_RELAY_ALERTS_TOTAL,
        "Alerts delivered to a sink, by sink and outcome."
    );
    metrics::describe_counter!(
        ALERT_RELAY_MALFORMED_TOTAL,
        "Alert messages on the bus that did not decode, dropped."
    );
}
