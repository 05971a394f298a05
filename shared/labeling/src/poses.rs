//! Refined poses: where the mapping stage's scan-to-map registration placed each frame, and what
//! it thought of the clip's own (odometry) pose. Written by mapping as `poses.json` beside the
//! map; prelabel and annotate place detections and labels with these poses, not the clip's.
//!
//! ```text
//! { "format": "motorpool.poses.v1", "clip_id": "...", "registered": true,
//!   "frames": [ { "index": 0, "pose": {x, y, z, yaw}, "odometry": {x, y, z, yaw},
//!                 "matched": 812, "rms_m": 0.031, "odometry_jump": false,
//!                 "registered": true, "anchor": false }, ... ] }
//! ```

use crate::clip::{Clip, ClipError, FrameMeta};
use crate::geom::Pose;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const POSES_FORMAT: &str = "motorpool.poses.v1";
pub const POSES_FILE: &str = "poses.json";

/// What registration made of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FramePose {
    pub index: u32,
    /// The refined pose, map frame (the frame of the clip's first pose).
    pub pose: Pose,
    /// The clip's own pose of the frame.
    pub odometry: Pose,
    /// Painted-line points matched to the map in the last iteration.
    pub matched: u32,
    /// Root mean square point-to-line distance of the matched points, metres.
    pub rms_m: f64,
    /// The odometry's step into this frame disagreed with the motion so far (a pose glitch
    /// starting or ending here): the step was not used.
    pub odometry_jump: bool,
    /// Registration placed the frame; false: too little paint matched (or the frame is an
    /// anchor), the pose is the prediction from the motion so far.
    pub registered: bool,
    /// One of the first frames, which start the map: placed by the odometry's steps, as there is
    /// not yet a map to register against.
    #[serde(default)]
    pub anchor: bool,
}

impl FramePose {
    /// `frame` where the clip puts it: registration off.
    pub fn as_given(frame: &FrameMeta) -> FramePose {
        FramePose {
            index: frame.index,
            pose: frame.pose,
            odometry: frame.pose,
            matched: 0,
            rms_m: 0.0,
            odometry_jump: false,
            registered: false,
            anchor: false,
        }
    }

    /// How far the refined pose is from the clip's, metres.
    pub fn correction_m(&self) -> f64 {
        (self.pose.x - self.odometry.x).hypot(self.pose.y - self.odometry.y)
    }
}

/// `poses.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefinedPoses {
    pub format: String,
    pub clip_id: String,
    /// Whether registration ran (`LabelParams::register`); when not, every pose is the clip's.
    pub registered: bool,
    pub frames: Vec<FramePose>,
}

impl RefinedPoses {
    /// Reads `poses.json` from a mapping output directory and checks it against `clip`.
    pub fn read(dir: &Path, clip: &Clip) -> Result<RefinedPoses, ClipError> {
        let path = dir.join(POSES_FILE);
        let bad = |message: String| ClipError::Json {
            clip: clip.id().to_string(),
            path: path.clone(),
            message,
        };
        let bytes = std::fs::read(&path).map_err(|source| ClipError::Io {
            clip: clip.id().to_string(),
            path: path.clone(),
            source,
        })?;
        let poses: RefinedPoses = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if poses.format != POSES_FORMAT {
            return Err(ClipError::Format {
                clip: clip.id().to_string(),
                path,
                found: poses.format,
                expected: POSES_FORMAT,
            });
        }
        if poses.frames.len() != clip.frames().len()
            || poses
                .frames
                .iter()
                .enumerate()
                .any(|(i, f)| f.index as usize != i || !f.pose.is_finite())
        {
            return Err(bad(format!(
                "holds {} frames, not the clip's {} in order with finite poses",
                poses.frames.len(),
                clip.frames().len()
            )));
        }
        Ok(poses)
    }

    /// Writes `poses.json` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(
            dir.join(POSES_FILE),
            serde_json::to_vec_pretty(self).unwrap_or_default(),
        )
    }

    /// Frames registration could not place although it placed most of the clip's others (the
    /// anchors aside): their pose is a guess where the rest are measured.
    pub fn unverified(&self) -> Vec<bool> {
        let tried = self.frames.iter().filter(|f| !f.anchor).count();
        let placed = self.frames.iter().filter(|f| f.registered).count();
        let trusted = self.registered && placed * 2 > tried;
        self.frames
            .iter()
            .map(|f| trusted && !f.registered && !f.anchor)
            .collect()
    }
}

impl Clip {
    /// This clip with its frames placed by `poses` (the mapping stage's refined poses).
    pub fn with_poses(mut self, poses: &RefinedPoses) -> Clip {
        for (f, p) in self.manifest.frames.iter_mut().zip(&poses.frames) {
            f.pose = p.pose;
        }
        self
    }

    /// This clip placed by the refined poses in the mapping output `mapping`, and those poses.
    pub fn placed(self, mapping: &Path) -> Result<(Clip, RefinedPoses), ClipError> {
        let poses = RefinedPoses::read(mapping, &self)?;
        Ok((self.with_poses(&poses), poses))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthOptions, generate};

    fn frame(index: u32, registered: bool) -> FramePose {
        FramePose {
            index,
            pose: Pose {
                x: index as f64,
                ..Pose::default()
            },
            odometry: Pose::default(),
            matched: 0,
            rms_m: 0.0,
            odometry_jump: false,
            registered,
            anchor: index == 0,
        }
    }

    #[test]
    fn poses_place_the_clip_and_bad_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        generate(&SynthOptions {
            frames: 4,
            points: 100,
            ..Default::default()
        })
        .write(dir.path())
        .unwrap();
        let clip = Clip::open(dir.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut poses = RefinedPoses {
            format: POSES_FORMAT.into(),
            clip_id: clip.id().into(),
            registered: true,
            frames: (0..4).map(|i| frame(i, i != 0 && i != 2)).collect(),
        };
        poses.write(out.path()).unwrap();
        let (placed, read) = clip.clone().placed(out.path()).unwrap();
        assert_eq!(read, poses);
        assert_eq!(placed.frames()[3].pose.x, 3.0);
        // An anchor, two registered, one not: that one is unverified.
        assert_eq!(read.unverified(), [false, false, true, false]);
        // Registration off: nothing is unverified.
        poses.registered = false;
        assert!(poses.unverified().iter().all(|u| !u));

        poses.frames.pop();
        poses.write(out.path()).unwrap();
        let e = clip.clone().placed(out.path()).unwrap_err().to_string();
        assert!(e.contains("holds 3 frames, not the clip's 4"), "{e}");
        poses.format = "motorpool.poses.v0".into();
        poses.write(out.path()).unwrap();
        let e = clip.placed(out.path()).unwrap_err().to_string();
        assert!(e.contains("motorpool.poses.v0"), "{e}");
    }
}
