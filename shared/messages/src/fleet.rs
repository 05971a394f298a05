//! Messages of fleet image deployment: image builds and drive states. Kind ids live in 400..500.

use crate::exec::Lane;
use crate::message;
use serde::{Deserialize, Serialize};

/// True for an image id or channel: it fits a GPT partition name as `mp:<id>`, and it names
/// directories of the image store, so `.`, `..` and hidden names are refused.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 27
        && id != "empty"
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// What to build: a git repository with a Dockerfile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// A git URL or path.
    pub repo: String,
    /// Branch, tag or commit.
    pub git_ref: String,
    /// The Dockerfile, relative to the repository root.
    pub dockerfile: String,
    /// The build context, relative to the repository root.
    pub context: String,
    pub build_args: Vec<(String, String)>,
    /// Release channel (`stable`, `beta`, ...): retention counts per channel.
    pub channel: String,
    /// Image id; default `<channel>-<short commit>`.
    pub image_id: Option<String>,
}

/// A build queued in its lane (release by default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBuildJob {
    /// 32 lower-case hex characters.
    pub job_id: String,
    pub request: BuildRequest,
    pub lane: Lane,
    pub submitted_ms: u64,
}
message!(ImageBuildJob, 400, 1);

/// Where a build is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildState {
    Queued,
    Running {
        step: String,
    },
    Done {
        image_id: String,
        dir: String,
        blake3: String,
    },
    Failed {
        reason: String,
    },
}

impl BuildState {
    /// `queued`, `running`, `done` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running { .. } => "running",
            BuildState::Done { .. } => "done",
            BuildState::Failed { .. } => "failed",
        }
    }

    /// The step a running build is at, or why it failed; empty otherwise.
    pub fn detail(&self) -> &str {
        match self {
            BuildState::Running { step } => step,
            BuildState::Failed { reason } => reason,
            BuildState::Queued | BuildState::Done { .. } => "",
        }
    }
}

/// A build's status (KV bucket `mp_v1_fleet_builds`, key = job id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildStatus {
    pub job_id: String,
    pub state: BuildState,
    pub updated_ms: u64,
}
message!(BuildStatus, 401, 1);

/// What a drive is doing, as the burner reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DriveKind {
    Inserted,
    /// Not a Motorpool drive: left untouched.
    Refused,
    Burning,
    Verifying,
    Ready,
    Failed,
    Removed,
}

impl DriveKind {
    pub const ALL: [DriveKind; 7] = [
        DriveKind::Inserted,
        DriveKind::Refused,
        DriveKind::Burning,
        DriveKind::Verifying,
        DriveKind::Ready,
        DriveKind::Failed,
        DriveKind::Removed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DriveKind::Inserted => "inserted",
            DriveKind::Refused => "refused",
            DriveKind::Burning => "burning",
            DriveKind::Verifying => "verifying",
            DriveKind::Ready => "ready",
            DriveKind::Failed => "failed",
            DriveKind::Removed => "removed",
        }
    }
}

/// One drive's state (KV bucket `mp_v1_fleet_drives`, key `<burner>.<drive>`, and the subject
/// `mp.v1.fleet.drive.state.<burner>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveStatus {
    pub burner: String,
    /// The drive's path on the burner host.
    pub drive: String,
    pub kind: DriveKind,
    /// The image being burned or verified, or the last one made ready.
    pub image: String,
    pub slot: u32,
    pub done: u64,
    pub total: u64,
    /// Why it was refused or failed.
    pub reason: String,
    pub updated_ms: u64,
    /// The images the drive holds, by slot, as last read from it (empty for a drive that is not
    /// ours or is gone).
    pub images: Vec<DriveImage>,
}
message!(DriveStatus, 402, 2);

/// An image a drive holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveImage {
    pub slot: u32,
    pub image: String,
    /// The boot menu's default.
    pub default: bool,
}
