//! The prelabel stage: slot detection per frame, then temporal fusion into labels.
//!
//! Detection sits behind [`SlotSource`], with two backends for each model (BevSlots and AVM):
//! per-frame outputs produced elsewhere (a slots file in the clip), or an ONNX model run here on
//! each frame's crop of the BEV base map ([`onnx`]). Fusion is in [`fusion`].
//!
//! Output (`<store>/<clip>/prelabel/v1-<key>/`):
//! - `detections_bevslots.json`, `detections_avm.json`: what each model saw per frame, ego frame
//!   (format `motorpool.slots.v1`; a frame without a result is absent);
//! - `fused.json`: the labels, map frame, with the fusion statistics;
//! - `tracks.json`: every track's points (observed, outlier, filled), for debugging and review.

pub mod fusion;
pub mod onnx;

use fusion::{FrameObservations, Fusion, fuse};
use motorpool_config::LabelConfig;
use motorpool_labeling::clip::{Clip, FrameSlots, SLOTS_FORMAT, SlotsFile};
use motorpool_labeling::geom::Slot;
use motorpool_labeling::raster::Raster;
use motorpool_labeling::store::InputHash;
use motorpool_labeling::{LabelError, Progress, StageWork};
use motorpool_messages::label::{DetectorSource, LabelJob, Stage};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokio_util::sync::CancellationToken;

pub const FUSED_FORMAT: &str = "motorpool.fused.v1";

/// `fused.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedFile {
    pub format: String,
    pub clip_id: String,
    #[serde(flatten)]
    pub fusion: Fusion,
}

/// Where one model's per-frame slots come from.
pub enum SlotSource {
    /// Read from a slots file: `None` for frames without a result.
    File(Vec<Option<Vec<Slot>>>),
    Onnx(Box<onnx::OnnxDetector>),
}

impl SlotSource {
    /// Opens the source a job asks for; a model sees the mapping stage's BEV `raster`.
    pub fn open(
        clip: &Clip,
        source: &DetectorSource,
        raster: &Raster,
    ) -> Result<SlotSource, LabelError> {
        match source {
            DetectorSource::File(rel) => Ok(SlotSource::File(clip.slots(rel)?)),
            DetectorSource::Onnx {
                model,
                score_threshold,
            } => {
                let path = model_path(clip, model);
                Ok(SlotSource::Onnx(Box::new(onnx::OnnxDetector::load(
                    &path,
                    raster.clone(),
                    *score_threshold,
                )?)))
            }
        }
    }

    /// The slots of frame `index`, ego frame (`None`: no result).
    pub fn detect(&self, clip: &Clip, index: u32) -> Result<Option<Vec<Slot>>, LabelError> {
        match self {
            SlotSource::File(frames) => Ok(frames[index as usize].clone()),
            SlotSource::Onnx(d) => {
                let pose = clip.frames()[index as usize].pose;
                d.detect(clip.id(), index, &pose).map(Some)
            }
        }
    }
}

/// A model path: absolute, or relative to the clip directory.
fn model_path(clip: &Clip, model: &str) -> std::path::PathBuf {
    let p = Path::new(model);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        clip.dir.join(p)
    }
}

/// The prelabel stage's work.
#[derive(Debug, Default)]
pub struct Prelabel;

fn hash_source(
    h: &mut InputHash,
    clip: &Clip,
    label: &str,
    source: &DetectorSource,
) -> Result<(), LabelError> {
    h.value(label, source);
    match source {
        DetectorSource::File(rel) => {
            if rel.contains("..") || Path::new(rel).is_absolute() {
                return Err(LabelError::Input(format!(
                    "clip {}: slots path {rel:?} leaves the clip directory",
                    clip.id()
                )));
            }
            h.file(&clip.dir, rel)
                .map_err(|e| LabelError::Input(format!("clip {}: {rel}: {e}", clip.id())))?;
        }
        DetectorSource::Onnx { model, .. } => {
            let path = model_path(clip, model);
            let (dir, name) = (
                path.parent().unwrap_or(Path::new("/")),
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            h.file(dir, &name).map_err(|e| {
                LabelError::Input(format!("clip {}: model {}: {e}", clip.id(), path.display()))
            })?;
        }
    }
    Ok(())
}

fn mapping_dir(job: &LabelJob) -> Result<&str, LabelError> {
    job.output(Stage::Mapping)
        .map(|o| o.dir.as_str())
        .ok_or_else(|| {
            LabelError::Input(format!(
                "clip {}: the mapping stage's output is missing",
                job.clip_id
            ))
        })
}

impl StageWork for Prelabel {
    const STAGE: Stage = Stage::Prelabel;
    /// 2: canonical corner order, sparse tracks and overlapping labels dropped. 3: detections
    /// placed by the refined poses, unpainted labels dropped.
    const VERSION: u32 = 3;

    fn input_key(&self, job: &LabelJob) -> Result<String, LabelError> {
        let clip = Clip::open(Path::new(&job.clip_dir))?;
        let mapping = job.output(Stage::Mapping).ok_or_else(|| {
            LabelError::Input(format!(
                "clip {}: the mapping stage's output is missing",
                job.clip_id
            ))
        })?;
        let p = &job.params;
        let mut h = InputHash::new(Stage::Prelabel, Self::VERSION);
        h.value("mapping", &mapping.key).value(
            "fusion",
            &(
                p.gate_m,
                p.max_missed,
                p.min_hits,
                p.min_score,
                p.outlier_m,
                p.recency_tau_s,
                p.min_observed_share,
                p.max_overlap,
                p.min_paint_share,
            ),
        );
        h.file(&clip.dir, "clip.json")
            .map_err(|e| LabelError::io("hash clip.json", e))?;
        hash_source(&mut h, &clip, "bevslots", &p.bevslots)?;
        hash_source(&mut h, &clip, "avm", &p.avm)?;
        Ok(h.finish())
    }

    fn run(
        &self,
        job: &LabelJob,
        out: &Path,
        _dir: &Path,
        progress: &Progress,
    ) -> Result<(), LabelError> {
        let mapping = Path::new(mapping_dir(job)?);
        // Detections are placed by the mapping stage's refined poses.
        let (clip, _) = Clip::open(Path::new(&job.clip_dir))?.placed(mapping)?;
        let n = clip.frames().len();
        progress.set_total(2 * n as u64 + 1);
        // Read once: the models see it, and fusion checks each label's paint on it.
        let raster = Raster::read(mapping)
            .map_err(|e| LabelError::Input(format!("clip {}: BEV raster: {e}", clip.id())))?;
        let bevslots = SlotSource::open(&clip, &job.params.bevslots, &raster)?;
        let avm = SlotSource::open(&clip, &job.params.avm, &raster)?;
        let mut bev_frames = Vec::with_capacity(n);
        let mut avm_frames = Vec::with_capacity(n);
        for f in clip.frames() {
            if let Some(slots) = bevslots.detect(&clip, f.index)? {
                bev_frames.push(FrameSlots {
                    index: f.index,
                    slots,
                });
            }
            progress.advance(1);
            if let Some(slots) = avm.detect(&clip, f.index)? {
                avm_frames.push(FrameSlots {
                    index: f.index,
                    slots,
                });
            }
            progress.advance(1);
        }
        let fusion = fuse(
            &observations(&clip, &bev_frames),
            &job.params,
            Some(&raster),
        );
        progress.advance(1);
        let write = |name: &str, v: &dyn ErasedJson| {
            std::fs::write(out.join(name), v.json())
                .map_err(|e| LabelError::io(format!("write {name}"), e))
        };
        write(
            "detections_bevslots.json",
            &SlotsFile {
                format: SLOTS_FORMAT.into(),
                source: "bevslots".into(),
                frames: bev_frames,
            },
        )?;
        write(
            "detections_avm.json",
            &SlotsFile {
                format: SLOTS_FORMAT.into(),
                source: "avm".into(),
                frames: avm_frames,
            },
        )?;
        write("tracks.json", &fusion.tracks)?;
        write(
            "fused.json",
            &FusedFile {
                format: FUSED_FORMAT.into(),
                clip_id: clip.id().to_string(),
                fusion: Fusion {
                    tracks: vec![],
                    ..fusion
                },
            },
        )
    }
}

trait ErasedJson {
    fn json(&self) -> Vec<u8>;
}
impl<T: Serialize> ErasedJson for T {
    fn json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Per-frame detections (ego frame) as map-frame observations in time order.
pub fn observations(clip: &Clip, frames: &[FrameSlots]) -> Vec<FrameObservations> {
    let t0 = clip.frames()[0].t_us;
    frames
        .iter()
        .map(|fs| {
            let f = &clip.frames()[fs.index as usize];
            FrameObservations {
                frame: fs.index,
                t_s: (f.t_us - t0) as f64 / 1e6,
                ego: f.pose,
                slots: fs
                    .slots
                    .iter()
                    .map(|s| s.map_corners(|p| f.pose.to_map(p)))
                    .collect(),
            }
        })
        .collect()
}

/// Reads a prelabel output's `fused.json`.
pub fn read_fused(dir: &Path) -> Result<FusedFile, LabelError> {
    let path = dir.join("fused.json");
    let bytes =
        std::fs::read(&path).map_err(|e| LabelError::io(format!("read {}", path.display()), e))?;
    let f: FusedFile = serde_json::from_slice(&bytes)
        .map_err(|e| LabelError::Input(format!("{}: {e}", path.display())))?;
    if f.format != FUSED_FORMAT {
        return Err(LabelError::Input(format!(
            "{}: format {:?}, this build reads {FUSED_FORMAT:?}",
            path.display(),
            f.format
        )));
    }
    Ok(f)
}

/// `motorpool prelabel`: serves the prelabel stage until `shutdown`.
pub async fn run(config: LabelConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    Ok(motorpool_labeling::run_service(Prelabel, config, shutdown).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_labeling::geom::Pose;

    #[test]
    fn an_onnx_model_sees_the_bev_crop_and_its_slots_come_back_in_the_ego_frame() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("bevslots.onnx");
        let corners = [[2.0f32, 3.0], [4.5, 3.0], [4.5, 8.3], [2.0, 8.3]];
        std::fs::write(
            &model,
            onnx::testing::fixed_slots_model(64, &[(corners, 0.3), (corners, 0.0)]),
        )
        .unwrap();
        // A bright map around the origin: the crop's mean intensity raises the score.
        let pts: Vec<[f32; 4]> = (0..200)
            .flat_map(|i| {
                (0..200).map(move |j| [i as f32 * 0.05 - 5.0, j as f32 * 0.05 - 5.0, 0.0, 1.0])
            })
            .collect();
        let raster = Raster::from_points(&pts, 0.1);
        let det = onnx::OnnxDetector::load(&model, raster, 0.6).unwrap();
        // The crop (6.4 m square) lies inside the bright map: channel means 0 and 1, so the
        // input's mean, 0.5, is added to each score.
        let near = det.detect("c", 0, &Pose::default()).unwrap();
        assert_eq!(near.len(), 1, "0.0 + 0.5 is under the threshold");
        assert_eq!(near[0].corners[2], [4.5, 8.3f32 as f64]);
        assert!(
            (near[0].score - 0.8).abs() < 1e-5,
            "score {}",
            near[0].score
        );
        let far = det
            .detect(
                "c",
                1,
                &Pose {
                    x: 500.0,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(far.is_empty(), "an empty crop adds nothing: {far:?}");
    }

    #[test]
    fn a_model_that_breaks_the_contract_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.onnx");
        std::fs::write(&junk, b"not a model").unwrap();
        let raster = Raster::from_points(&[[0.0; 4]], 0.1);
        let e = onnx::OnnxDetector::load(&junk, raster, 0.5).unwrap_err();
        assert!(e.to_string().contains("junk.onnx"), "{e}");
    }
}
