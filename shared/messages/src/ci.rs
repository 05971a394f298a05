//! Messages of CI: jobs that forge events (merge requests, pushes, tags) or API clients create,
//! and their statuses. Kind ids live in 600..700.
//!
//! A job is queued on its lane's JetStream queue (`mp.v1.ci.job.run.<lane>`); its status lives
//! in the KV bucket `mp_v1_ci_jobs` under the job id, written first by the webhook service
//! (`Queued`, `Superseded`) and then by the runner that takes it.

use crate::exec::Lane;
use crate::message;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a project lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forge {
    Gitlab,
    Github,
}

impl Forge {
    pub fn name(self) -> &'static str {
        match self {
            Forge::Gitlab => "gitlab",
            Forge::Github => "github",
        }
    }
}

impl fmt::Display for Forge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a job does. Each kind has its lane (release > build > test > lint) unless the trigger
/// earned another (a merge request's priority label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Release,
    Build,
    Test,
    Lint,
}

impl JobKind {
    pub const ALL: [JobKind; 4] = [
        JobKind::Release,
        JobKind::Build,
        JobKind::Test,
        JobKind::Lint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobKind::Release => "release",
            JobKind::Build => "build",
            JobKind::Test => "test",
            JobKind::Lint => "lint",
        }
    }

    /// The lane a job of this kind rides when its trigger says nothing else.
    pub fn lane(self) -> Lane {
        match self {
            JobKind::Release => Lane::Release,
            JobKind::Build => Lane::Build,
            JobKind::Test => Lane::Test,
            JobKind::Lint => Lane::Lint,
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What made a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// A merge request (GitLab) or pull request (GitHub) got new commits or was opened.
    MergeRequest {
        /// The MR's number in its project (GitLab `iid`, GitHub `number`).
        number: u64,
        source_branch: String,
        target_branch: String,
        labels: Vec<String>,
    },
    /// Commits pushed to a branch.
    Push { branch: String },
    /// A tag pushed.
    Tag { tag: String },
    /// An API client's request.
    Api { client: String },
}

impl Trigger {
    pub fn name(&self) -> &'static str {
        match self {
            Trigger::MergeRequest { .. } => "merge_request",
            Trigger::Push { .. } => "push",
            Trigger::Tag { .. } => "tag",
            Trigger::Api { .. } => "api",
        }
    }
}

/// One CI job: check `commit` of `clone_url` out and run `bazel <command> <flags> <targets>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiJob {
    /// 32 lower-case hex characters, derived from the delivery that made it (a redelivery makes
    /// the same ids).
    pub job_id: String,
    /// The project's name as configured (GitLab `path_with_namespace`, GitHub `full_name`).
    pub project: String,
    pub forge: Forge,
    /// Where the runner fetches from: the project's configured URL, else the event's.
    pub clone_url: String,
    /// The commit to build (40 hex digits).
    pub commit: String,
    /// The ref the commit was reached by (`refs/heads/main`, `refs/tags/v1.2`,
    /// `refs/merge-requests/7/head`, `refs/pull/7/head`).
    pub git_ref: String,
    pub kind: JobKind,
    /// The lane this job rides: the one its trigger earned, never one a client asked for.
    pub lane: Lane,
    /// The Bazel command (`build`, `test`).
    pub command: String,
    pub targets: Vec<String>,
    pub flags: Vec<String>,
    pub trigger: Trigger,
    /// Who caused it: the forge user, or the API client.
    pub requested_by: String,
    /// Whether its results may go into the shared action cache: pushes to protected branches,
    /// tags and release jobs; never a merge request's code, which nobody has reviewed yet.
    pub trusted: bool,
    /// The forge's delivery id (or a hash of the body when the forge sends none).
    pub delivery: String,
    pub queued_ms: u64,
}
message!(CiJob, 600, 1);

/// Where a job is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    /// A newer push to the same merge request made this job moot before it started.
    Superseded {
        by_commit: String,
    },
    Running {
        step: String,
    },
    Succeeded,
    Failed {
        reason: String,
    },
    Canceled {
        reason: String,
    },
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Superseded { .. } => "superseded",
            JobState::Running { .. } => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed { .. } => "failed",
            JobState::Canceled { .. } => "canceled",
        }
    }
}

/// One finished step of a job's run (`checkout`, `build`, `report`) and how long it took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTime {
    pub name: String,
    pub ms: u64,
}

/// A job and where it is (KV bucket `mp_v1_ci_jobs`, key = job id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job: CiJob,
    pub state: JobState,
    pub updated_ms: u64,
    /// The runner working on it (empty while queued).
    pub runner: String,
    /// The workspace it runs in, and whether that workspace was warm (used before for the
    /// same repository).
    pub workspace: String,
    pub warm: bool,
    /// 1 for the first run; a runner lost or an infrastructure failure makes another.
    pub attempt: u32,
    /// Steps finished so far, in order.
    pub steps: Vec<StepTime>,
}
message!(JobStatus, 601, 1);

impl JobStatus {
    /// A job just queued.
    pub fn queued(job: CiJob, now_ms: u64) -> JobStatus {
        JobStatus {
            job,
            state: JobState::Queued,
            updated_ms: now_ms,
            runner: String::new(),
            workspace: String::new(),
            warm: false,
            attempt: 0,
            steps: Vec::new(),
        }
    }
}

/// One workspace of a runner pool (KV bucket `mp_v1_ci_workspaces`, key `<pool>.<name>`): a
/// checkout with its LFS objects and a Bazel output base, kept between jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    pub pool: String,
    pub name: String,
    /// The repository it holds (clone URL), empty when new.
    pub repo: String,
    /// The commit of its last job.
    pub commit: String,
    /// The job holding it, if any, and until when (ms since the epoch) unless renewed.
    pub holder: Option<Lease>,
    /// A job started in it and did not finish cleanly (failed checkout, killed runner): it is
    /// reset before anyone uses it again.
    pub dirty: bool,
    /// It ran code nobody reviewed (a merge request's, an API client's job): a trusted job
    /// (which holds the key that may write the action cache) gets it only wiped.
    pub tainted: bool,
    /// Bytes on disk when last measured.
    pub bytes: u64,
    /// Jobs it has run.
    pub jobs: u64,
    pub updated_ms: u64,
}
message!(Workspace, 604, 1);

/// Who holds a workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub runner: String,
    pub job_id: String,
    pub expires_ms: u64,
}

/// What a delivery made (KV bucket `mp_v1_ci_deliveries`, key = a hash of forge and delivery
/// id): claimed before its jobs are queued, so a redelivery makes nothing new.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub job_ids: Vec<String>,
    /// False between the claim and the last job being queued: a redelivery then queues the
    /// same jobs again (JetStream drops the copies by their message ids).
    pub queued: bool,
    pub received_ms: u64,
}
message!(DeliveryRecord, 602, 1);

/// The jobs of a merge request's newest commit (KV bucket `mp_v1_ci_merge_requests`): what a
/// newer push supersedes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRequestJobs {
    pub commit: String,
    pub job_ids: Vec<String>,
}
message!(MergeRequestJobs, 603, 1);
