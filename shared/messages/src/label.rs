//! Messages of the BevSlots auto-labeling pipeline (mapping -> prelabel -> annotate). Kind ids
//! live in 300..400.
//!
//! One [`LabelJob`] travels the pipeline: it is queued (JetStream) for the mapping stage in its
//! lane, and each stage, when done, appends its [`StageOutput`] and queues the job for the next
//! stage in the same lane. Every stage records a [`StageStatus`] per job in a KV bucket, so a
//! failed clip can be found, debugged and re-run.

use crate::exec::Lane;
use crate::message;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The stages, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Stage {
    /// Local map and BEV base-map raster from the clip's frames.
    Mapping,
    /// Slot detection (BevSlots and AVM backends) and temporal fusion.
    Prelabel,
    /// Projection into frames, AVM quality filter, label files and statistics.
    Annotate,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Mapping, Stage::Prelabel, Stage::Annotate];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Mapping => "mapping",
            Stage::Prelabel => "prelabel",
            Stage::Annotate => "annotate",
        }
    }

    /// The stage after this one.
    pub fn next(self) -> Option<Stage> {
        match self {
            Stage::Mapping => Some(Stage::Prelabel),
            Stage::Prelabel => Some(Stage::Annotate),
            Stage::Annotate => None,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where slot detections come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DetectorSource {
    /// Per-frame model outputs produced elsewhere: a slots file (format `motorpool.slots.v1`),
    /// a path relative to the clip directory.
    File(String),
    /// An ONNX model run on each frame's ego-centred BEV crop (see the prelabel crate for the
    /// input and output contract).
    Onnx { model: String, score_threshold: f64 },
}

/// The knobs of one pipeline run. Part of every stage's input hash, so changing one re-runs the
/// stages it affects and nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelParams {
    /// Voxel edge for downsampling the local map, metres. Default 0.1.
    pub voxel_m: f64,
    /// BEV raster resolution, metres per pixel. Default 0.1.
    pub raster_m: f64,
    /// Place each frame by scan-to-map registration of its painted-line lidar points, the clip's
    /// poses only predicting; off: the clip's poses as they are. Default true.
    #[serde(default = "yes")]
    pub register: bool,
    /// BevSlots detections. Default: the file `detections/bevslots.json`.
    pub bevslots: DetectorSource,
    /// AVM detections. Default: the file `detections/avm.json`.
    pub avm: DetectorSource,
    /// Largest mean corner distance for an observation to join a track, metres. Default 1.0.
    pub gate_m: f64,
    /// Consecutive frames without a match that end a track. Default 5.
    pub max_missed: u32,
    /// Observations a track needs to become a label. Default 3.
    pub min_hits: u32,
    /// The share of a track's frames (observed and filled-in gaps) that must be real
    /// observations for it to become a label. Default 0.5.
    pub min_observed_share: f64,
    /// Two labels overlapping by more than this share of the smaller one's area are one slot:
    /// the one with fewer observations is dropped. Default 0.25.
    pub max_overlap: f64,
    /// Mean confidence a track needs to become a label. Default 0.5.
    pub min_score: f64,
    /// A label must show painted lines in the BEV raster along at least this share of its
    /// outline, or it is dropped as a detector's ghost; 0 turns the check off (lots without
    /// paint, lidars without intensity). Default 0.4.
    #[serde(default = "default_min_paint_share")]
    pub min_paint_share: f64,
    /// An observation further than this from its track's estimate is an outlier, metres.
    /// Default 0.45.
    pub outlier_m: f64,
    /// Time constant of the recency weight, seconds: an observation `tau` older than the track's
    /// newest weighs 1/e as much. Default 20.
    pub recency_tau_s: f64,
    /// Half-width of the square around the ego vehicle whose slots are labeled in a frame,
    /// metres. Default 10.
    pub visible_m: f64,
    /// AVM and BevSlots slots match when the mean of their two closest corner pairs is under
    /// this, metres. Default 0.5.
    pub avm_match_m: f64,
    /// A frame is dropped when more than this share of its AVM slots match no label, or more
    /// than this share of its labels inside `avm_range_m` match no AVM slot. Default 0.35.
    pub avm_max_unmatched_share: f64,
    /// A frame is dropped unless at least this many of its labels match an AVM slot. Default 1.
    pub avm_min_matched: u32,
    /// Half-width of the square around the ego vehicle in which the AVM model sees every slot,
    /// metres: a label there that AVM does not see is suspect. Default 5.
    pub avm_range_m: f64,
}

fn yes() -> bool {
    true
}

fn default_min_paint_share() -> f64 {
    LabelParams::default().min_paint_share
}

impl Default for LabelParams {
    fn default() -> Self {
        LabelParams {
            voxel_m: 0.1,
            raster_m: 0.1,
            register: true,
            bevslots: DetectorSource::File("detections/bevslots.json".into()),
            avm: DetectorSource::File("detections/avm.json".into()),
            gate_m: 1.0,
            max_missed: 5,
            min_hits: 3,
            min_observed_share: 0.5,
            max_overlap: 0.25,
            min_score: 0.5,
            min_paint_share: 0.4,
            outlier_m: 0.45,
            recency_tau_s: 20.0,
            visible_m: 10.0,
            avm_match_m: 0.5,
            avm_max_unmatched_share: 0.35,
            avm_min_matched: 1,
            avm_range_m: 5.0,
        }
    }
}

impl LabelParams {
    /// Why these settings cannot label anything, naming the first one out of range: lengths and
    /// times are finite and positive, shares lie in 0..=1, counts are at least 1 (`avm_min_matched`
    /// may be 0: no AVM match required).
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("voxel_m", self.voxel_m),
            ("raster_m", self.raster_m),
            ("gate_m", self.gate_m),
            ("outlier_m", self.outlier_m),
            ("recency_tau_s", self.recency_tau_s),
            ("visible_m", self.visible_m),
            ("avm_match_m", self.avm_match_m),
            ("avm_range_m", self.avm_range_m),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "{name} must be a positive number of metres or seconds, not {v}"
                ));
            }
        }
        let shares = [
            ("min_observed_share", self.min_observed_share),
            ("max_overlap", self.max_overlap),
            ("min_score", self.min_score),
            ("min_paint_share", self.min_paint_share),
            ("avm_max_unmatched_share", self.avm_max_unmatched_share),
        ];
        for (name, v) in shares {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} is a share and must lie in 0..=1, not {v}"));
            }
        }
        for (name, v) in [("max_missed", self.max_missed), ("min_hits", self.min_hits)] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        // A raster of more than 16k pixels a side, or a voxel grid finer than the raster's
        // hundredth, is a typo, not a setting: it would take the stage's memory.
        if self.visible_m / self.raster_m > 8192.0 {
            return Err(format!(
                "visible_m / raster_m = {} pixels a side is too many (at most 8192)",
                self.visible_m / self.raster_m
            ));
        }
        if self.voxel_m < self.raster_m / 100.0 {
            return Err(format!(
                "voxel_m {} is under a hundredth of raster_m {}",
                self.voxel_m, self.raster_m
            ));
        }
        if let DetectorSource::Onnx {
            score_threshold, ..
        } = &self.bevslots
            && !(0.0..=1.0).contains(score_threshold)
        {
            return Err(format!(
                "the model's score threshold must lie in 0..=1, not {score_threshold}"
            ));
        }
        Ok(())
    }
}

/// What a stage produced: a versioned directory keyed by the stage's version and input hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOutput {
    pub stage: Stage,
    /// `v<stage version>-<input hash>`: a re-run of another version or other inputs gets another
    /// key, so it never overwrites these labels.
    pub key: String,
    /// Absolute path of the output directory.
    pub dir: String,
    /// True when the output already existed for this key and nothing was recomputed.
    pub cached: bool,
    pub elapsed_ms: u64,
}

/// A clip on its way through the pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelJob {
    /// 32 lower-case hex characters.
    pub job_id: String,
    pub clip_id: String,
    /// Absolute path of the clip directory, readable by every stage.
    pub clip_dir: String,
    pub lane: Lane,
    pub submitted_ms: u64,
    pub params: LabelParams,
    /// Outputs of the stages done so far, in order.
    pub outputs: Vec<StageOutput>,
}
message!(LabelJob, 300, 3);

impl LabelJob {
    /// The output of an earlier stage.
    pub fn output(&self, stage: Stage) -> Option<&StageOutput> {
        self.outputs.iter().find(|o| o.stage == stage)
    }
}

/// Where a job is in one stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageState {
    Queued,
    /// Working; `done` of `total` units (frames) so far.
    Running {
        done: u64,
        total: u64,
    },
    Done(StageOutput),
    /// Failed; the reason names the clip and, where there is one, the frame.
    Failed {
        reason: String,
    },
}

/// The status of one job in one stage (KV bucket `mp_v1_label_status`, key
/// `<job id>.<stage>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStatus {
    pub job_id: String,
    pub clip_id: String,
    pub stage: Stage,
    pub lane: Lane,
    pub state: StageState,
    /// The stage's worker that holds it.
    pub worker: String,
    pub queued_ms: u64,
    pub started_ms: u64,
    pub updated_ms: u64,
}
message!(StageStatus, 301, 1);

impl StageStatus {
    pub fn is_final(&self) -> bool {
        matches!(self.state, StageState::Done(_) | StageState::Failed { .. })
    }
}
