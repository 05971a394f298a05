//! The BevSlots labeling pipeline's shared parts: what the mapping, prelabel and annotate
//! services (and `motorpool label`) all need.
//!
//! Layout:
//! - [`clip`]: the clip format (frames, poses, lidar points, per-frame slot detections) and
//!   reading it with checks whose errors name the clip and the frame.
//! - [`geom`]: poses, slot corners, corner alignment and distances, Hungarian assignment.
//! - [`poses`]: the mapping stage's refined poses (`poses.json`) and placing a clip by them.
//! - [`raster`]: the BEV base map (height and intensity rasters, PNG on disk).
//! - [`synth`]: synthetic clips (lot layouts, trajectories, lidar returns, noisy detections).
//! - [`eval`]: label quality against ground truth (corner error, precision and recall).
//! - [`store`]: versioned stage outputs keyed by stage version and input hash.
//! - [`actor`]: the stage actor every labeling service runs; `submit` and `watch` for clients.

pub mod actor;
pub mod clip;
pub mod eval;
pub mod geom;
pub mod metric_names;
pub mod poses;
pub mod raster;
pub mod store;
pub mod synth;

pub use actor::{
    Progress, StageOptions, StageWork, run_once, run_service, serve_stage, submit, watch,
};
pub use clip::{Clip, ClipError};

use motorpool_messages::label::Stage;

/// Why a stage could not label a clip.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// The clip (or a detections file, a model) is malformed: final, re-running will not help.
    #[error(transparent)]
    Clip(#[from] ClipError),
    /// The job cannot be done as asked (a missing earlier output, a bad parameter): final.
    #[error("{0}")]
    Input(String),
    /// A file system failure: retried.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bus: {0}")]
    Bus(String),
    #[error("{stage} failed: {reason}")]
    Failed { stage: Stage, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl LabelError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> LabelError {
        LabelError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LabelError::Io { .. } | LabelError::Bus(_))
    }
}
