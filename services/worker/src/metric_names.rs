//! The Prometheus metrics this crate records: each name once, with the help text `/metrics`
//! shows ([`describe`]). Names follow `motorpool_<subsystem>_<name>[_<unit>]`, counters end
//! in `_total`, times are in seconds; labels take a few values each.

/// Counter: Input blobs fetched that did not match their digest.
pub const WORKER_CORRUPT_INPUTS_TOTAL: &str = "motorpool_worker_corrupt_inputs_total";

/// Counter: Jobs that failed for platform reasons on this worker.
pub const WORKER_INFRASTRUCTURE_FAILURES_TOTAL: &str =
    "motorpool_worker_infrastructure_failures_total";

/// Counter: Input files and directories reused in place from the previous job's tree.
pub const WORKER_INPUT_ENTRIES_KEPT_TOTAL: &str = "motorpool_worker_input_entries_kept_total";

/// Counter: Input files and directories created for a job.
pub const WORKER_INPUT_ENTRIES_MADE_TOTAL: &str = "motorpool_worker_input_entries_made_total";

/// Counter: Input blobs fetched from the CAS.
pub const WORKER_INPUT_FETCHED_TOTAL: &str = "motorpool_worker_input_fetched_total";

/// Counter: Input files materialised.
pub const WORKER_INPUT_FILES_TOTAL: &str = "motorpool_worker_input_files_total";

/// Counter, labels `result`: Jobs ended on this worker, by result.
pub const WORKER_JOBS_TOTAL: &str = "motorpool_worker_jobs_total";

/// Counter: Output blobs uploaded.
pub const WORKER_UPLOADED_BLOBS_TOTAL: &str = "motorpool_worker_uploaded_blobs_total";

/// Counter: Output bytes uploaded.
pub const WORKER_UPLOADED_BYTES_TOTAL: &str = "motorpool_worker_uploaded_bytes_total";

/// Registers the help text of every metric above with the process's recorder.
pub fn describe() {
    metrics::describe_counter!(
        WORKER_CORRUPT_INPUTS_TOTAL,
        "Input blobs fetched that did not match their digest."
    );
    metrics::describe_counter!(
        WORKER_INFRASTRUCTURE_FAILURES_TOTAL,
        "Jobs that failed for platform reasons on this worker."
    );
    metrics::describe_counter!(
        WORKER_INPUT_ENTRIES_KEPT_TOTAL,
        "Input files and directories reused in place from the previous job's tree."
    );
    metrics::describe_counter!(
        WORKER_INPUT_ENTRIES_MADE_TOTAL,
        "Input files and directories created for a job."
    );
    metrics::describe_counter!(
        WORKER_INPUT_FETCHED_TOTAL,
        "Input blobs fetched from the CAS."
    );
    metrics::describe_counter!(WORKER_INPUT_FILES_TOTAL, "Input files materialised.");
    metrics::describe_counter!(WORKER_JOBS_TOTAL, "Jobs ended on this worker, by result.");
    metrics::describe_counter!(WORKER_UPLOADED_BLOBS_TOTAL, "Output blobs uploaded.");
    metrics::describe_counter!(WORKER_UPLOADED_BYTES_TOTAL, "Output bytes uploaded.");
}
