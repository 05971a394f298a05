//! Messages of the Build Event Service: what Bazel streams to the gateway, and the platform's
//! own record of each action an invocation executed remotely. Kind ids live in 700..800.

use crate::message;
use serde::{Deserialize, Serialize};

/// One build event as Bazel sent it (stream `MP_V1_BES`, subject per invocation): the
/// `google.devtools.build.v1.BuildEvent`'s protobuf bytes, kept as received so that a later
/// reader can decode more of it than today's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BesEvent {
    pub invocation_id: String,
    pub build_id: String,
    /// `StreamId.component`: 1 the controller (lifecycle events), 3 the tool (Bazel's BEP).
    pub component: i32,
    pub sequence: i64,
    pub event: Vec<u8>,
    pub received_ms: u64,
}
message!(BesEvent, 700, 1);

/// An action an invocation had the platform execute (or found in its cache through Execute),
/// with where and how long each stage took: REAPI's `ExecutedActionMetadata`, as the gateway
/// saw the operation finish. Milliseconds since the epoch; 0 when a stage did not happen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAction {
    pub invocation_id: String,
    /// The key's id that asked.
    pub owner: String,
    pub operation: String,
    /// `<hash>/<size>` of the Action.
    pub action: String,
    /// The client's mnemonic (`RequestMetadata.action_mnemonic`: `CppCompile`, `TestRunner`,
    /// ...), or when it sent none the kind read off the command (`Compiling`, ...).
    pub mnemonic: String,
    /// What the action did, as Bazel's progress messages say it: `Compiling lib/a.cc`,
    /// `Linking lib/a_test`, `Testing lib/a_test` (read off the command).
    pub description: String,
    pub lane: String,
    pub pool: String,
    pub worker: String,
    pub cached: bool,
    pub exit_code: i32,
    /// Attempts the platform made (more than 1: a worker was lost and it ran again).
    pub attempts: u32,
    pub queued_ms: u64,
    pub worker_start_ms: u64,
    pub fetch_start_ms: u64,
    pub fetch_end_ms: u64,
    pub exec_start_ms: u64,
    pub exec_end_ms: u64,
    pub upload_start_ms: u64,
    pub upload_end_ms: u64,
    pub done_ms: u64,
    /// Bytes of the action's outputs.
    pub output_bytes: u64,
    /// Why it failed, when the platform could not run it.
    pub error: String,
}
message!(RemoteAction, 701, 1);

/// What the invocations list shows of one invocation (KV bucket `mp_v1_bes_invocations`, key =
/// the invocation id): kept up to date while the build streams, final once it finished.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationSummary {
    pub invocation_id: String,
    pub build_id: String,
    /// The API key's id that streamed it: who may see it (and admins).
    pub owner: String,
    pub command: String,
    pub patterns: Vec<String>,
    pub user: String,
    pub host: String,
    pub branch: String,
    pub commit: String,
    /// The CI job that ran the build, and its merge request (`--build_metadata=CI_JOB=...`,
    /// `CI_MERGE_REQUEST=...`, as Motorpool's runners set them).
    pub ci_job: String,
    pub merge_request: String,
    /// `running`, `succeeded`, `failed`, `interrupted`, ... (Bazel's exit code's name, lower case).
    pub status: String,
    pub exit_code: i32,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub targets: u32,
    pub targets_failed: u32,
    pub tests: u32,
    pub tests_failed: u32,
    pub tests_flaky: u32,
    pub events: u64,
    /// Events past the invocation's cap were acknowledged but not kept.
    pub truncated: bool,
    pub updated_ms: u64,
}
message!(InvocationSummary, 702, 1);
