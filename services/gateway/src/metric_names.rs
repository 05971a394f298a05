//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter, labels `outcome`: Build events received from Bazel, by outcome.
pub const BES_EVENTS_TOTAL: &str = "motorpool_bes_events_total";

/// Counter: Invocations removed by the retention sweep.
pub const BES_INVOCATIONS_SWEPT_TOTAL: &str = "motorpool_bes_invocations_swept_total";

/// Gauge, labels `shard`: Blobs each live shard reports, as the gateway heard it.
pub const CAS_BLOBS: &str = "motorpool_cas_blobs";

/// Gauge, labels `shard`: Bytes each live shard reports in use, as the gateway heard it.
pub const CAS_USED_BYTES: &str = "motorpool_cas_used_bytes";

/// Gauge: Operations executing on workers, as the scheduler reports.
pub const EXECUTING: &str = "motorpool_executing";

/// Counter, labels `outcome`: Action-cache lookups and updates, by outcome.
pub const GATEWAY_ACTION_CACHE_TOTAL: &str = "motorpool_gateway_action_cache_total";

/// Counter: Calls refused for a missing or unknown API key or a missing role.
pub const GATEWAY_AUTH_REFUSED_TOTAL: &str = "motorpool_gateway_auth_refused_total";

/// Counter: Bytes served by ByteStream Read.
pub const GATEWAY_BYTESTREAM_READ_BYTES_TOTAL: &str =
    "motorpool_gateway_bytestream_read_bytes_total";

/// Counter: ByteStream Reads served from the gateway's memory of recent blobs.
pub const GATEWAY_BYTESTREAM_READS_FROM_MEMORY_TOTAL: &str =
    "motorpool_gateway_bytestream_reads_from_memory_total";

/// Counter: Bytes received by ByteStream Write.
pub const GATEWAY_BYTESTREAM_WRITTEN_BYTES_TOTAL: &str =
    "motorpool_gateway_bytestream_written_bytes_total";

/// Gauge: Open client connections.
pub const GATEWAY_CONNECTIONS: &str = "motorpool_gateway_connections";

/// Counter: Client connections refused for being over the limit.
pub const GATEWAY_CONNECTIONS_REFUSED_TOTAL: &str = "motorpool_gateway_connections_refused_total";

/// Counter, labels `lane`, `outcome`: Execute calls, by lane and outcome (queued or cached).
pub const GATEWAY_EXECUTIONS_TOTAL: &str = "motorpool_gateway_executions_total";

/// Counter: Requests failed for sending nothing for the idle timeout.
pub const GATEWAY_IDLE_REQUESTS_TOTAL: &str = "motorpool_gateway_idle_requests_total";

/// Gauge: Shards the gateway currently counts as live.
pub const GATEWAY_LIVE_SHARDS: &str = "motorpool_gateway_live_shards";

/// Gauge: Action results remembered as complete (served without checking the shards).
pub const GATEWAY_REMEMBERED_RESULTS: &str = "motorpool_gateway_remembered_results";

/// Counter: Remembered action results dropped because a blob they use went away.
pub const GATEWAY_REMEMBERED_RESULTS_DROPPED_TOTAL: &str =
    "motorpool_gateway_remembered_results_dropped_total";

/// Counter, labels `reason`: Times the remembered results were forgotten at once, by reason.
pub const GATEWAY_REMEMBERED_RESULTS_FLUSHES_TOTAL: &str =
    "motorpool_gateway_remembered_results_flushes_total";

/// Counter: GetActionResult calls answered from remembered results.
pub const GATEWAY_REMEMBERED_RESULTS_SERVED_TOTAL: &str =
    "motorpool_gateway_remembered_results_served_total";

/// Counter: Action results not remembered because shard news arrived meanwhile.
pub const GATEWAY_REMEMBERED_RESULTS_SKIPPED_TOTAL: &str =
    "motorpool_gateway_remembered_results_skipped_total";

/// Histogram, labels `method`: Time to answer a gRPC call, by method.
pub const GATEWAY_REQUEST_DURATION_SECONDS: &str = "motorpool_gateway_request_duration_seconds";

/// Counter, labels `method`, `code`: gRPC calls, by method and status code.
pub const GATEWAY_REQUESTS_TOTAL: &str = "motorpool_gateway_requests_total";

/// Gauge: Shards the gateway has heard news from since it started.
pub const GATEWAY_SHARDS_HEARD: &str = "motorpool_gateway_shards_heard";

/// Gauge, labels `pool`, `lane`: Operations queued, by pool and lane, as the scheduler reports.
pub const QUEUE_DEPTH: &str = "motorpool_queue_depth";

/// Gauge: Workers registered, as the scheduler reports.
pub const WORKERS: &str = "motorpool_workers";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        BES_EVENTS_TOTAL,
        "Build events received from Bazel, by outcome."
    );
    metrics::describe_counter!(
        BES_INVOCATIONS_SWEPT_TOTAL,
        "Invocations removed by the retention sweep."
    );
    metrics::describe_gauge!(
        CAS_BLOBS,
        "Blobs each live shard reports, as the gateway heard it."
    );
    metrics::describe_gauge!(
        CAS_USED_BYTES,
        "Bytes each live shard reports in use, as the gateway heard it."
    );
    metrics::describe_gauge!(
        EXECUTING,
        "Operations executing on workers, as the scheduler reports."
    );
    metrics::describe_counter!(
        GATEWAY_ACTION_CACHE_TOTAL,
        "Action-cache lookups and updates, by outcome."
    );
    metrics::describe_counter!(
        GATEWAY_AUTH_REFUSED_TOTAL,
        "Calls refused for a missing or unknown API key or a missing role."
    );
    metrics::describe_counter!(
        GATEWAY_BYTESTREAM_READ_BYTES_TOTAL,
        "Bytes served by ByteStream Read."
    );
    metrics::describe_counter!(
        GATEWAY_BYTESTREAM_READS_FROM_MEMORY_TOTAL,
        "ByteStream Reads served from the gateway's memory of recent blobs."
    );
    metrics::describe_counter!(
        GATEWAY_BYTESTREAM_WRITTEN_BYTES_TOTAL,
        "Bytes received by ByteStream Write."
    );
    metrics::describe_gauge!(GATEWAY_CONNECTIONS, "Open client connections.");
    metrics::describe_counter!(
        GATEWAY_CONNECTIONS_REFUSED_TOTAL,
        "Client connections refused for being over the limit."
    );
    metrics::describe_counter!(
        GATEWAY_EXECUTIONS_TOTAL,
        "Execute calls, by lane and outcome (queued or cached)."
    );
    metrics::describe_counter!(
        GATEWAY_IDLE_REQUESTS_TOTAL,
        "Requests failed for sending nothing for the idle timeout."
    );
    metrics::describe_gauge!(
        GATEWAY_LIVE_SHARDS,
        "Shards the gateway currently counts as live."
    );
    metrics::describe_gauge!(
        GATEWAY_REMEMBERED_RESULTS,
        "Action results remembered as complete (served without checking the shards)."
    );
    metrics::describe_counter!(
        GATEWAY_REMEMBERED_RESULTS_DROPPED_TOTAL,
        "Remembered action results dropped because a blob they use went away."
    );
    metrics::describe_counter!(
        GATEWAY_REMEMBERED_RESULTS_FLUSHES_TOTAL,
        "Times the remembered results were forgotten at once, by reason."
    );
    metrics::describe_counter!(
        GATEWAY_REMEMBERED_RESULTS_SERVED_TOTAL,
        "GetActionResult calls answered from remembered results."
    );
    metrics::describe_counter!(
        GATEWAY_REMEMBERED_RESULTS_SKIPPED_TOTAL,
        "Action results not remembered because shard news arrived meanwhile."
    );
    metrics::describe_histogram!(
        GATEWAY_REQUEST_DURATION_SECONDS,
        "Time to answer a gRPC call, by method."
    );
    metrics::describe_counter!(
        GATEWAY_REQUESTS_TOTAL,
        "gRPC calls, by method and status code."
    );
    metrics::describe_gauge!(
        GATEWAY_SHARDS_HEARD,
        "Shards the gateway has heard news from since it started."
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        "Operations queued, by pool and lane, as the scheduler reports."
    );
    metrics::describe_gauge!(WORKERS, "Workers registered, as the scheduler reports.");
}
