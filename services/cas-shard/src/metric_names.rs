//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Gauge: Open connections on the shard's blob data port.
pub const CAS_DATA_OPEN_CONNECTIONS: &str = "motorpool_cas_data_open_connections";

/// Counter: Connections the data port refused for being over its limit.
pub const CAS_DATA_REFUSED_CONNECTIONS_TOTAL: &str = "motorpool_cas_data_refused_connections_total";

/// Counter: Connections to the data port refused without a valid token.
pub const CAS_DATA_UNAUTHENTICATED_TOTAL: &str = "motorpool_cas_data_unauthenticated_total";

/// Gauge: Bytes the shard's action-cache entries take, counted in its capacity.
pub const CAS_SHARD_ACTION_CACHE_BYTES: &str = "motorpool_cas_shard_action_cache_bytes";

/// Gauge: The most the action cache may take (its share of the capacity).
pub const CAS_SHARD_ACTION_CACHE_CAPACITY_BYTES: &str =
    "motorpool_cas_shard_action_cache_capacity_bytes";

/// Gauge: Action-cache entries on the shard.
pub const CAS_SHARD_ACTION_CACHE_ENTRIES: &str = "motorpool_cas_shard_action_cache_entries";

/// Counter: Action-cache entries evicted.
pub const CAS_SHARD_ACTION_CACHE_EVICTIONS_TOTAL: &str =
    "motorpool_cas_shard_action_cache_evictions_total";

/// Gauge: Blobs the shard holds.
pub const CAS_SHARD_BLOBS: &str = "motorpool_cas_shard_blobs";

/// Counter: Blobs written to the shard.
pub const CAS_SHARD_BLOBS_WRITTEN_TOTAL: &str = "motorpool_cas_shard_blobs_written_total";

/// Gauge: The shard's capacity.
pub const CAS_SHARD_CAPACITY_BYTES: &str = "motorpool_cas_shard_capacity_bytes";

/// Counter: Blobs found not to match their digest, removed.
pub const CAS_SHARD_CORRUPT_BLOBS_TOTAL: &str = "motorpool_cas_shard_corrupt_blobs_total";

/// Counter: Blobs evicted to stay within the capacity.
pub const CAS_SHARD_EVICTIONS_TOTAL: &str = "motorpool_cas_shard_evictions_total";

/// Counter: Blob bytes read from the shard.
pub const CAS_SHARD_READ_BYTES_TOTAL: &str = "motorpool_cas_shard_read_bytes_total";

/// Gauge: Bytes the shard uses (blobs, packs and action-cache entries).
pub const CAS_SHARD_USED_BYTES: &str = "motorpool_cas_shard_used_bytes";

/// Counter: Bytes re-hashed by the shard's background verification.
pub const CAS_SHARD_VERIFIED_BYTES_TOTAL: &str = "motorpool_cas_shard_verified_bytes_total";

/// Counter: Blob bytes written to the shard.
pub const CAS_SHARD_WRITTEN_BYTES_TOTAL: &str = "motorpool_cas_shard_written_bytes_total";

/// Counter: Blobs read from the object store that did not match their digest.
pub const CAS_TIER_CORRUPT_BLOBS_TOTAL: &str = "motorpool_cas_tier_corrupt_blobs_total";

/// Gauge: Blobs waiting to be written behind to the object store.
pub const CAS_TIER_PENDING_BLOBS: &str = "motorpool_cas_tier_pending_blobs";

/// Counter: Bytes read from the object store.
pub const CAS_TIER_READ_BYTES_TOTAL: &str = "motorpool_cas_tier_read_bytes_total";

/// Counter, labels `result`: Object-store reads, by result.
pub const CAS_TIER_READS_TOTAL: &str = "motorpool_cas_tier_reads_total";

/// Counter, labels `result`: Object-store writes, by result.
pub const CAS_TIER_WRITES_TOTAL: &str = "motorpool_cas_tier_writes_total";

/// Counter: Bytes written to the object store.
pub const CAS_TIER_WRITTEN_BYTES_TOTAL: &str = "motorpool_cas_tier_written_bytes_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_gauge!(
        CAS_DATA_OPEN_CONNECTIONS,
        "Open connections on the shard's blob data port."
    );
    metrics::describe_counter!(
        CAS_DATA_REFUSED_CONNECTIONS_TOTAL,
        "Connections the data port refused for being over its limit."
    );
    metrics::describe_counter!(
        CAS_DATA_UNAUTHENTICATED_TOTAL,
        "Connections to the data port refused without a valid token."
    );
    metrics::describe_gauge!(
        CAS_SHARD_ACTION_CACHE_BYTES,
        "Bytes the shard's action-cache entries take, counted in its capacity."
    );
    metrics::describe_gauge!(
        CAS_SHARD_ACTION_CACHE_CAPACITY_BYTES,
        "The most the action cache may take (its share of the capacity)."
    );
    metrics::describe_gauge!(
        CAS_SHARD_ACTION_CACHE_ENTRIES,
        "Action-cache entries on the shard."
    );
    metrics::describe_counter!(
        CAS_SHARD_ACTION_CACHE_EVICTIONS_TOTAL,
        "Action-cache entries evicted."
    );
    metrics::describe_gauge!(CAS_SHARD_BLOBS, "Blobs the shard holds.");
    metrics::describe_counter!(CAS_SHARD_BLOBS_WRITTEN_TOTAL, "Blobs written to the shard.");
    metrics::describe_gauge!(CAS_SHARD_CAPACITY_BYTES, "The shard's capacity.");
    metrics::describe_counter!(
        CAS_SHARD_CORRUPT_BLOBS_TOTAL,
        "Blobs found not to match their digest, removed."
    );
    metrics::describe_counter!(
        CAS_SHARD_EVICTIONS_TOTAL,
        "Blobs evicted to stay within the capacity."
    );
    metrics::describe_counter!(
        CAS_SHARD_READ_BYTES_TOTAL,
        "Blob bytes read from the shard."
    );
    metrics::describe_gauge!(
        CAS_SHARD_USED_BYTES,
        "Bytes the shard uses (blobs, packs and action-cache entries)."
    );
    metrics::describe_counter!(
        CAS_SHARD_VERIFIED_BYTES_TOTAL,
        "Bytes re-hashed by the shard's background verification."
    );
    metrics::describe_counter!(
        CAS_SHARD_WRITTEN_BYTES_TOTAL,
        "Blob bytes written to the shard."
    );
    metrics::describe_counter!(
        CAS_TIER_CORRUPT_BLOBS_TOTAL,
        "Blobs read from the object store that did not match their digest."
    );
    metrics::describe_gauge!(
        CAS_TIER_PENDING_BLOBS,
        "Blobs waiting to be written behind to the object store."
    );
    metrics::describe_counter!(
        CAS_TIER_READ_BYTES_TOTAL,
        "Bytes read from the object store."
    );
    metrics::describe_counter!(CAS_TIER_READS_TOTAL, "Object-store reads, by result.");
    metrics::describe_counter!(CAS_TIER_WRITES_TOTAL, "Object-store writes, by result.");
    metrics::describe_counter!(
        CAS_TIER_WRITTEN_BYTES_TOTAL,
        "Bytes written to the object store."
    );
}
