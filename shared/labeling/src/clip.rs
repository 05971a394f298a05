//! The clip format, and reading it with checks that name the clip and the frame.
//!
//! ```text
//! <clip>/clip.json                 format "motorpool.clip.v1": clip id, frames (index, time,
//!                                  ego pose in the local map frame, points file)
//! <clip>/points/000000.bin         lidar returns in the ego frame, KITTI layout: little-endian
//!                                  f32 x, y, z, intensity per point
//! <clip>/detections/bevslots.json  per-frame BevSlots model outputs, format "motorpool.slots.v1",
//!                                  corners in the ego frame (metres)
//! <clip>/detections/avm.json       per-frame AVM model outputs, same format
//! <clip>/ground_truth.json         synthetic clips only: true slots and true poses
//! ```
//!
//! Frames are numbered 0, 1, 2, ... without gaps and their timestamps strictly increase. A
//! slots file may leave a frame out (the model had no result for it) but may not name a frame
//! the clip does not have. A detection's four corners go around the slot in either direction,
//! starting anywhere (models disagree on both): the pipeline aligns them, and its labels come in
//! the canonical order (`geom::canonical_order`). Ground truth is in the canonical order.

use crate::geom::{Pose, Slot};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const CLIP_FORMAT: &str = "motorpool.clip.v1";
pub const SLOTS_FORMAT: &str = "motorpool.slots.v1";
pub const GROUND_TRUTH_FORMAT: &str = "motorpool.ground-truth.v1";

/// `clip.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipManifest {
    pub format: String,
    pub clip_id: String,
    pub frames: Vec<FrameMeta>,
}

/// One frame of a clip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameMeta {
    pub index: u32,
    /// Capture time, microseconds (any epoch; only differences matter).
    pub t_us: u64,
    pub pose: Pose,
    /// Points file, relative to the clip directory.
    pub points: String,
}

/// A slots file: one model's per-frame outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotsFile {
    pub format: String,
    /// Which model produced it (`bevslots`, `avm`, ...).
    pub source: String,
    pub frames: Vec<FrameSlots>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameSlots {
    pub index: u32,
    pub slots: Vec<Slot>,
}

/// A slots file as read, before the checks: a corner or score may be null (how many tools write
/// NaN), so the error can name the frame instead of a line and column.
#[derive(Deserialize)]
struct RawSlotsFile {
    frames: Vec<RawFrameSlots>,
}

#[derive(Deserialize)]
struct RawFrameSlots {
    index: u32,
    slots: Vec<RawSlot>,
}

#[derive(Deserialize)]
struct RawSlot {
    corners: [[Option<f64>; 2]; 4],
    score: Option<f64>,
}

/// `ground_truth.json` of a synthetic clip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub format: String,
    /// True slots in the map frame (the frame of the true poses).
    pub slots: Vec<Slot>,
    /// True pose of every frame (the clip's poses carry odometry drift).
    pub poses: Vec<Pose>,
}

/// Why a clip cannot be used. Every variant names the clip; frame problems name the frame.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("clip {clip}: cannot read {path}: {source}")]
    Io {
        clip: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("clip {clip}: {path} is not valid: {message}")]
    Json {
        clip: String,
        path: PathBuf,
        message: String,
    },
    #[error("clip {clip}: {path} has format {found:?}; this build reads {expected:?}")]
    Format {
        clip: String,
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error("clip {clip}, frame {frame}: {reason}")]
    Frame {
        clip: String,
        frame: u32,
        reason: String,
    },
    #[error("clip {clip}: {reason}")]
    Clip { clip: String, reason: String },
}

fn clip_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn read_json<T: serde::de::DeserializeOwned>(
    clip: &str,
    path: &Path,
    expected: &'static str,
) -> Result<T, ClipError> {
    let bytes = std::fs::read(path).map_err(|source| ClipError::Io {
        clip: clip.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    // Check the format tag first, so an unknown version says so instead of a field error.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
        && let Some(found) = v.get("format").and_then(|f| f.as_str())
        && found != expected
    {
        return Err(ClipError::Format {
            clip: clip.to_string(),
            path: path.to_path_buf(),
            found: found.to_string(),
            expected,
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ClipError::Json {
        clip: clip.to_string(),
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A clip whose manifest passed the checks. Points are read frame by frame ([`Clip::points`]).
#[derive(Clone, Debug)]
pub struct Clip {
    pub dir: PathBuf,
    pub manifest: ClipManifest,
}

impl Clip {
    /// Reads and checks `clip.json`: format, contiguous frame indices, increasing timestamps,
    /// finite poses, points files that exist and hold whole points.
    pub fn open(dir: &Path) -> Result<Clip, ClipError> {
        let name = clip_name(dir);
        let manifest: ClipManifest = read_json(&name, &dir.join("clip.json"), CLIP_FORMAT)?;
        let clip = manifest.clip_id.clone();
        if !valid_clip_id(&clip) {
            return Err(ClipError::Clip {
                clip: name,
                reason: format!(
                    "clip id {clip:?} must be 1-128 letters, digits, '.', '-' or '_' (it names directories)"
                ),
            });
        }
        if manifest.frames.is_empty() {
            return Err(ClipError::Clip {
                clip,
                reason: "has no frames".into(),
            });
        }
        for (i, f) in manifest.frames.iter().enumerate() {
            let want = i as u32;
            if f.index != want {
                let reason = if f.index > want {
                    format!(
                        "frame {want} is missing (frames jump from {} to {})",
                        want as i64 - 1,
                        f.index
                    )
                } else {
                    format!(
                        "frames are out of order or repeated (frame {} after frame {})",
                        f.index,
                        want as i64 - 1
                    )
                };
                return Err(ClipError::Frame {
                    clip,
                    frame: want,
                    reason,
                });
            }
            if i > 0 && f.t_us <= manifest.frames[i - 1].t_us {
                return Err(ClipError::Frame {
                    clip,
                    frame: f.index,
                    reason: format!(
                        "timestamp {} us is not after frame {}'s {} us (timestamps must increase)",
                        f.t_us,
                        f.index - 1,
                        manifest.frames[i - 1].t_us
                    ),
                });
            }
            if !f.pose.is_finite() {
                return Err(ClipError::Frame {
                    clip,
                    frame: f.index,
                    reason: format!("pose {:?} is not finite", f.pose),
                });
            }
            if f.points.contains("..") || Path::new(&f.points).is_absolute() {
                return Err(ClipError::Frame {
                    clip,
                    frame: f.index,
                    reason: format!("points path {:?} leaves the clip directory", f.points),
                });
            }
            let path = dir.join(&f.points);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() % 16 == 0 => {}
                Ok(m) => {
                    return Err(ClipError::Frame {
                        clip,
                        frame: f.index,
                        reason: format!(
                            "points file {} is truncated ({} bytes is not a whole number of 16-byte points)",
                            f.points,
                            m.len()
                        ),
                    });
                }
                Err(e) => {
                    return Err(ClipError::Frame {
                        clip,
                        frame: f.index,
                        reason: format!("points file {}: {e}", f.points),
                    });
                }
            }
        }
        Ok(Clip {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn id(&self) -> &str {
        &self.manifest.clip_id
    }

    pub fn frames(&self) -> &[FrameMeta] {
        &self.manifest.frames
    }

    /// The lidar points of frame `index`, ego frame: (x, y, z, intensity).
    pub fn points(&self, index: u32) -> Result<Vec<[f32; 4]>, ClipError> {
        let mut pts = Vec::new();
        self.points_into(index, &mut Vec::new(), &mut pts)?;
        Ok(pts)
    }

    /// [`Clip::points`] into `pts`, reading through `buf`: a caller going through every frame
    /// reuses both instead of allocating (and faulting in) a megabyte or two a frame.
    pub fn points_into(
        &self,
        index: u32,
        buf: &mut Vec<u8>,
        pts: &mut Vec<[f32; 4]>,
    ) -> Result<(), ClipError> {
        use std::io::Read;
        let f = &self.manifest.frames[index as usize];
        let path = self.dir.join(&f.points);
        let io = |source| ClipError::Io {
            clip: self.id().to_string(),
            path: path.clone(),
            source,
        };
        buf.clear();
        std::fs::File::open(&path)
            .and_then(|mut file| file.read_to_end(buf))
            .map_err(io)?;
        if !buf.len().is_multiple_of(16) {
            return Err(self.frame_error(index, format!("points file {} is truncated", f.points)));
        }
        pts.clear();
        pts.extend(buf.chunks_exact(16).map(|c| {
            std::array::from_fn(|i| {
                f32::from_le_bytes([c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]])
            })
        }));
        if let Some(bad) = pts.iter().position(|p| p.iter().any(|v| !v.is_finite())) {
            return Err(
                self.frame_error(index, format!("point {bad} of {} is not finite", f.points))
            );
        }
        Ok(())
    }

    /// Reads a slots file (relative to the clip) and checks it against the clip: known format,
    /// known frames in increasing order, finite corners and scores in [0, 1]. Returns one entry
    /// per clip frame: `None` where the model had no result.
    pub fn slots(&self, rel: &str) -> Result<Vec<Option<Vec<Slot>>>, ClipError> {
        if rel.contains("..") || Path::new(rel).is_absolute() {
            return Err(ClipError::Clip {
                clip: self.id().to_string(),
                reason: format!("slots path {rel:?} leaves the clip directory"),
            });
        }
        let file: RawSlotsFile = read_json(self.id(), &self.dir.join(rel), SLOTS_FORMAT)?;
        let mut out: Vec<Option<Vec<Slot>>> = vec![None; self.frames().len()];
        let mut last: Option<u32> = None;
        for fs in file.frames {
            if fs.index as usize >= out.len() {
                return Err(self.frame_error(
                    fs.index,
                    format!(
                        "{rel} has results for a frame the clip does not have ({} frames)",
                        out.len()
                    ),
                ));
            }
            if last.is_some_and(|l| fs.index <= l) {
                return Err(self.frame_error(
                    fs.index,
                    format!("{rel} lists frames out of order or twice"),
                ));
            }
            last = Some(fs.index);
            let mut slots = Vec::with_capacity(fs.slots.len());
            for (k, raw) in fs.slots.iter().enumerate() {
                let s = Slot {
                    corners: raw.corners.map(|p| p.map(|v| v.unwrap_or(f64::NAN))),
                    score: raw.score.unwrap_or(f64::NAN),
                };
                if !s.is_finite() {
                    return Err(self.frame_error(
                        fs.index,
                        format!("{rel}: slot {k} has a NaN, missing or infinite corner or score"),
                    ));
                }
                if !(0.0..=1.0).contains(&s.score) {
                    return Err(self.frame_error(
                        fs.index,
                        format!("{rel}: slot {k} has score {} outside [0, 1]", s.score),
                    ));
                }
                slots.push(s);
            }
            out[fs.index as usize] = Some(slots);
        }
        Ok(out)
    }

    /// The ground truth of a synthetic clip, if it has one.
    pub fn ground_truth(&self) -> Result<Option<GroundTruth>, ClipError> {
        let path = self.dir.join("ground_truth.json");
        if !path.exists() {
            return Ok(None);
        }
        read_json(self.id(), &path, GROUND_TRUTH_FORMAT).map(Some)
    }

    pub fn frame_error(&self, frame: u32, reason: String) -> ClipError {
        ClipError::Frame {
            clip: self.id().to_string(),
            frame,
            reason,
        }
    }
}

/// True for a clip id that is safe as a directory name.
pub fn valid_clip_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Writes points in the clip's layout.
pub fn write_points(path: &Path, pts: &[[f32; 4]]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(pts.len() * 16);
    for p in pts {
        for v in p {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthOptions, generate};

    fn clip_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        generate(&SynthOptions {
            frames: 8,
            points: 100,
            ..Default::default()
        })
        .write(dir.path())
        .unwrap();
        dir
    }

    fn edit(dir: &Path, file: &str, f: impl FnOnce(&mut serde_json::Value)) {
        let path = dir.join(file);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    }

    fn rewrite(dir: &Path, file: &str, v: &serde_json::Value) {
        std::fs::write(dir.join(file), serde_json::to_vec(v).unwrap()).unwrap();
    }

    fn slots_err(clip: &Clip) -> String {
        clip.slots("detections/bevslots.json")
            .unwrap_err()
            .to_string()
    }

    fn open_err(dir: &Path) -> String {
        Clip::open(dir).unwrap_err().to_string()
    }

    #[test]
    fn a_good_clip_opens_and_reads() {
        let dir = clip_dir();
        let clip = Clip::open(dir.path()).unwrap();
        assert_eq!(clip.frames().len(), 8);
        assert!(!clip.points(3).unwrap().is_empty());
        let slots = clip.slots("detections/bevslots.json").unwrap();
        assert_eq!(slots.len(), 8);
        assert!(clip.ground_truth().unwrap().is_some());
    }

    #[test]
    fn a_missing_frame_is_named() {
        let dir = clip_dir();
        edit(dir.path(), "clip.json", |v| {
            v["frames"].as_array_mut().unwrap().remove(4);
        });
        let e = open_err(dir.path());
        assert!(
            e.contains("clip synth-perpendicular-s1, frame 4: frame 4 is missing"),
            "{e}"
        );
    }

    #[test]
    fn unordered_timestamps_are_named() {
        let dir = clip_dir();
        edit(dir.path(), "clip.json", |v| {
            v["frames"][5]["t_us"] = v["frames"][3]["t_us"].clone();
        });
        let e = open_err(dir.path());
        assert!(
            e.contains("frame 5: timestamp") && e.contains("must increase"),
            "{e}"
        );
    }

    #[test]
    fn unknown_format_versions_are_refused() {
        let dir = clip_dir();
        edit(dir.path(), "clip.json", |v| {
            v["format"] = "motorpool.clip.v9".into()
        });
        let e = open_err(dir.path());
        assert!(
            e.contains("motorpool.clip.v9") && e.contains(CLIP_FORMAT),
            "{e}"
        );
        let dir = clip_dir();
        edit(dir.path(), "detections/avm.json", |v| {
            v["format"] = "motorpool.slots.v0".into()
        });
        let e = Clip::open(dir.path())
            .unwrap()
            .slots("detections/avm.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("clip synth-perpendicular-s1") && e.contains("motorpool.slots.v0"),
            "{e}"
        );
    }

    #[test]
    fn nan_corners_and_bad_scores_are_named_with_their_frame() {
        let dir = clip_dir();
        let clip = Clip::open(dir.path()).unwrap();
        // JSON has no NaN: many tools write it as null.
        let raw = std::fs::read_to_string(dir.path().join("detections/bevslots.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&raw).unwrap();
        let frame = v["frames"]
            .as_array()
            .unwrap()
            .iter()
            .position(|f| !f["slots"].as_array().unwrap().is_empty())
            .unwrap();
        v["frames"][frame]["slots"][0]["corners"][1][0] = serde_json::Value::Null;
        rewrite(dir.path(), "detections/bevslots.json", &v);
        let e = slots_err(&clip);
        assert!(
            e.contains(&format!("clip synth-perpendicular-s1, frame {frame}")) && e.contains("NaN"),
            "{e}"
        );

        v["frames"][frame]["slots"][0]["corners"][1][0] = 1.0.into();
        v["frames"][frame]["slots"][0]["score"] = 1.5.into();
        rewrite(dir.path(), "detections/bevslots.json", &v);
        let e = slots_err(&clip);
        assert!(
            e.contains(&format!("frame {frame}")) && e.contains("outside [0, 1]"),
            "{e}"
        );
    }

    #[test]
    fn truncated_points_and_escaping_paths_are_refused() {
        let dir = clip_dir();
        let p = dir.path().join("points/000002.bin");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let e = open_err(dir.path());
        assert!(e.contains("frame 2") && e.contains("truncated"), "{e}");

        let dir = clip_dir();
        edit(dir.path(), "clip.json", |v| {
            v["frames"][1]["points"] = "../../etc/passwd".into()
        });
        let e = open_err(dir.path());
        assert!(
            e.contains("frame 1") && e.contains("leaves the clip directory"),
            "{e}"
        );
    }

    #[test]
    fn detections_for_frames_the_clip_lacks_are_refused() {
        let dir = clip_dir();
        edit(dir.path(), "detections/bevslots.json", |v| {
            v["frames"][7]["index"] = 99.into();
        });
        let e = Clip::open(dir.path())
            .unwrap()
            .slots("detections/bevslots.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("frame 99") && e.contains("does not have"), "{e}");
    }
}
