//! The annotate stage: fused labels become per-frame labels people can review.
//!
//! 1. **Project** every fused slot (map frame) into every frame (ego frame) and keep those whose
//!    centre lies in the visible square (`|x|, |y| <= visible_m`).
//!    Frames are placed by the mapping stage's refined poses (`poses.json`); a frame
//!    registration could not place, in a clip where it placed most, is dropped
//!    (`pose_unverified`).
//! 2. **Quality-filter** frames with the AVM check ([`avm_check`]): the AVM model's slots are
//!    matched to the frame's labels (Hungarian, cost = mean of the two closest corner pairs,
//!    gated at `avm_match_m`). A frame is dropped when no slot is visible, when AVM has no result
//!    for it, when fewer than `avm_min_matched` labels match, when more than
//!    `avm_max_unmatched_share` of the AVM slots have no label, or when more than that share of
//!    the labels inside the AVM's range (`avm_range_m`) have no AVM slot: shares, not counts, so
//!    that a frame where AVM sees one slot, elsewhere, fails too. Every dropped frame is recorded
//!    with its reason.
//! 3. **Write** labels in the formats reviewers use ([`formats`]): COCO keypoints (CVAT imports
//!    it) and Label Studio predictions with scores, over ego-centred BEV images of each kept frame
//!    (`frames/NNNNNN.png`); per-clip statistics; and a picture ([`report`]): `report.svg` and
//!    `report.html` with the BEV map, raw detections, fused slots and, for synthetic clips, the
//!    ground truth.

pub mod formats;
pub mod report;
pub mod review;

use motorpool_config::LabelConfig;
use motorpool_labeling::clip::{Clip, FrameMeta};
use motorpool_labeling::geom::{Slot, assign, centre, two_closest_corners};
use motorpool_labeling::raster::Raster;
use motorpool_labeling::store::InputHash;
use motorpool_labeling::{LabelError, Progress, StageWork};
use motorpool_messages::label::{LabelJob, LabelParams, Stage};
use motorpool_prelabel::fusion::FusedSlot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// No fused slot lies in the frame's visible range.
    NoVisibleSlots,
    /// Registration, which placed most of the clip's frames, could not place this one: its
    /// pose, and so where its labels fall, is a guess.
    PoseUnverified,
    /// The AVM model has no result (or found no slot) for the frame.
    AvmNoResult,
    /// Too many AVM slots have no BevSlots label, or too many labels where AVM sees everything
    /// have no AVM slot: the labels are not to be trusted here.
    AvmDisagrees,
}

/// One label in one frame, ego frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameLabel {
    /// The fused slot's id.
    pub slot: u32,
    pub corners: [[f64; 2]; 4],
    pub score: f64,
}

/// The verdict on one frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameVerdict {
    pub frame: u32,
    pub labels: Vec<FrameLabel>,
    pub avm_slots: usize,
    pub avm_matched: usize,
    /// `None`: kept.
    pub dropped: Option<DropReason>,
    /// Why, in words (for dropped frames).
    pub detail: String,
}

/// The fused slots visible from `frame`, ego frame.
pub fn project(frame: &FrameMeta, labels: &[FusedSlot], visible_m: f64) -> Vec<FrameLabel> {
    labels
        .iter()
        .filter_map(|l| {
            let corners = l.corners.map(|p| frame.pose.to_ego(p));
            let m = centre(&corners);
            (m[0].abs() <= visible_m && m[1].abs() <= visible_m).then_some(FrameLabel {
                slot: l.id,
                corners,
                score: l.score,
            })
        })
        .collect()
}

/// The AVM check of one frame's labels.
pub fn avm_check(
    frame: u32,
    labels: Vec<FrameLabel>,
    avm: Option<&[Slot]>,
    params: &LabelParams,
) -> FrameVerdict {
    let mut v = FrameVerdict {
        frame,
        avm_slots: avm.map_or(0, |a| a.len()),
        avm_matched: 0,
        labels,
        dropped: None,
        detail: String::new(),
    };
    if v.labels.is_empty() {
        v.dropped = Some(DropReason::NoVisibleSlots);
        v.detail = format!("no fused slot within {} m", params.visible_m);
        return v;
    }
    let avm = match avm {
        None => {
            v.dropped = Some(DropReason::AvmNoResult);
            v.detail = "the AVM model has no result for this frame".into();
            return v;
        }
        Some([]) => {
            v.dropped = Some(DropReason::AvmNoResult);
            v.detail = "the AVM model found no slot in this frame".into();
            return v;
        }
        Some(a) => a,
    };
    let pairs = assign(
        avm.len(),
        v.labels.len(),
        |a, l| two_closest_corners(&v.labels[l].corners, &avm[a].corners),
        params.avm_match_m,
    );
    v.avm_matched = pairs.len();
    let share = params.avm_max_unmatched_share;
    let unmatched = avm.len() - pairs.len();
    // Labels where the AVM model sees every slot, and those of them it did not see.
    let in_range: Vec<usize> = (0..v.labels.len())
        .filter(|&l| {
            let m = centre(&v.labels[l].corners);
            m[0].abs() <= params.avm_range_m && m[1].abs() <= params.avm_range_m
        })
        .collect();
    let unseen = in_range
        .iter()
        .filter(|&&l| !pairs.iter().any(|p| p.1 == l))
        .count();
    let why = if pairs.len() < params.avm_min_matched as usize {
        Some(format!(
            "{} of {} labels match an AVM slot within {} m (at least {} must)",
            pairs.len(),
            v.labels.len(),
            params.avm_match_m,
            params.avm_min_matched
        ))
    } else if unmatched as f64 > share * avm.len() as f64 {
        Some(format!(
            "{unmatched} of {} AVM slots match no label within {} m (at most {:.0}% may)",
            avm.len(),
            params.avm_match_m,
            share * 100.0
        ))
    } else if unseen as f64 > share * in_range.len() as f64 {
        Some(format!(
            "{unseen} of {} labels within {} m of the car match no AVM slot (at most {:.0}% may)",
            in_range.len(),
            params.avm_range_m,
            share * 100.0
        ))
    } else {
        None
    };
    if let Some(why) = why {
        v.dropped = Some(DropReason::AvmDisagrees);
        v.detail = why;
    }
    v
}

/// Projects and checks every frame of `clip` (placed by the refined poses); frames
/// `unverified` names (by index) are dropped whatever AVM says.
pub fn annotate(
    clip: &Clip,
    labels: &[FusedSlot],
    avm: &[Option<Vec<Slot>>],
    unverified: &[bool],
    params: &LabelParams,
) -> Vec<FrameVerdict> {
    clip.frames()
        .iter()
        .map(|f| {
            let visible = project(f, labels, params.visible_m);
            let mut v = avm_check(
                f.index,
                visible,
                avm.get(f.index as usize).and_then(|a| a.as_deref()),
                params,
            );
            if unverified.get(f.index as usize) == Some(&true)
                && v.dropped != Some(DropReason::NoVisibleSlots)
            {
                v.dropped = Some(DropReason::PoseUnverified);
                v.detail = "registration could not place this frame (too little paint matched the map); its pose is the odometry's guess".into();
            }
            v
        })
        .collect()
}

/// Per-clip statistics (`stats.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClipStats {
    pub clip_id: String,
    pub frames: usize,
    pub frames_kept: usize,
    pub frames_dropped: BTreeMap<DropReason, usize>,
    /// Fused slots (labels).
    pub slots: usize,
    /// Raw BevSlots detections over all frames.
    pub detections: usize,
    pub avm_detections: usize,
    pub tracks: usize,
    pub confirmed_tracks: usize,
    pub outliers: usize,
    pub filled: usize,
    pub merged: usize,
    /// AVM slots matched to a label / not matched, over frames that had a result.
    pub avm_matches: usize,
    pub avm_unmatched: usize,
    /// Labels written (one per slot per kept frame).
    pub label_instances: usize,
}

/// The annotate stage's work.
#[derive(Debug, Default)]
pub struct Annotate;

fn stage_dir(job: &LabelJob, stage: Stage) -> Result<&Path, LabelError> {
    job.output(stage)
        .map(|o| Path::new(o.dir.as_str()))
        .ok_or_else(|| {
            LabelError::Input(format!(
                "clip {}: the {stage} stage's output is missing",
                job.clip_id
            ))
        })
}

impl StageWork for Annotate {
    const STAGE: Stage = Stage::Annotate;
    /// 3: the AVM check in shares, both ways. 4: labels placed by the refined poses; frames
    /// registration could not place dropped.
    const VERSION: u32 = 4;

    fn input_key(&self, job: &LabelJob) -> Result<String, LabelError> {
        let clip = Clip::open(Path::new(&job.clip_dir))?;
        let key = |s: Stage| {
            job.output(s).map(|o| o.key.clone()).ok_or_else(|| {
                LabelError::Input(format!(
                    "clip {}: the {s} stage's output is missing",
                    job.clip_id
                ))
            })
        };
        let p = &job.params;
        let mut h = InputHash::new(Stage::Annotate, Self::VERSION);
        h.value("mapping", &key(Stage::Mapping)?)
            .value("prelabel", &key(Stage::Prelabel)?)
            .value(
                "avm",
                &(
                    p.visible_m,
                    p.avm_match_m,
                    p.avm_max_unmatched_share,
                    p.avm_min_matched,
                    p.avm_range_m,
                ),
            );
        h.file(&clip.dir, "clip.json")
            .map_err(|e| LabelError::io("hash clip.json", e))?;
        if clip.dir.join("ground_truth.json").exists() {
            h.file(&clip.dir, "ground_truth.json")
                .map_err(|e| LabelError::io("hash ground_truth.json", e))?;
        }
        Ok(h.finish())
    }

    fn run(
        &self,
        job: &LabelJob,
        out: &Path,
        dir: &Path,
        progress: &Progress,
    ) -> Result<(), LabelError> {
        let mapping = stage_dir(job, Stage::Mapping)?;
        let prelabel = stage_dir(job, Stage::Prelabel)?;
        // Labels go into each frame by the mapping stage's refined poses.
        let (clip, poses) = Clip::open(Path::new(&job.clip_dir))?.placed(mapping)?;
        let n = clip.frames().len();
        progress.set_total(n as u64 + 2);
        let fused = motorpool_prelabel::read_fused(prelabel)?;
        let read_slots = |name: &str| -> Result<Vec<Option<Vec<Slot>>>, LabelError> {
            let path = prelabel.join(name);
            let bytes = std::fs::read(&path)
                .map_err(|e| LabelError::io(format!("read {}", path.display()), e))?;
            let file: motorpool_labeling::clip::SlotsFile = serde_json::from_slice(&bytes)
                .map_err(|e| LabelError::Input(format!("{}: {e}", path.display())))?;
            let mut frames = vec![None; n];
            for f in file.frames {
                if let Some(slot) = frames.get_mut(f.index as usize) {
                    *slot = Some(f.slots);
                }
            }
            Ok(frames)
        };
        let bevslots = read_slots("detections_bevslots.json")?;
        let avm = read_slots("detections_avm.json")?;
        let verdicts = annotate(
            &clip,
            &fused.fusion.labels,
            &avm,
            &poses.unverified(),
            &job.params,
        );
        progress.advance(1);
        let raster = Raster::read(mapping)
            .map_err(|e| LabelError::Input(format!("clip {}: BEV raster: {e}", clip.id())))?;

        let stats = stats(&clip, &fused.fusion, &bevslots, &avm, &verdicts);
        let geometry =
            formats::ImageGeometry::review(job.params.visible_m, raster.meta.resolution_m);
        formats::write_frames(&clip, &raster, &verdicts, geometry, out, progress)?;
        // Label Studio's tasks name images where this output will be, not in `out` (a temporary
        // sibling renamed into place when the stage commits).
        let version = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let rel = format!("{}/{}/{version}", clip.id(), Stage::Annotate.name());
        let place = formats::Placement { dir, rel: &rel };
        formats::write_labels(&clip, &verdicts, geometry, &place, out)?;
        let dropped: Vec<&FrameVerdict> = verdicts.iter().filter(|v| v.dropped.is_some()).collect();
        let write = |name: &str, bytes: Vec<u8>| {
            std::fs::write(out.join(name), bytes)
                .map_err(|e| LabelError::io(format!("write {name}"), e))
        };
        write(
            "stats.json",
            serde_json::to_vec_pretty(&stats).unwrap_or_default(),
        )?;
        write(
            "dropped_frames.json",
            serde_json::to_vec_pretty(&dropped).unwrap_or_default(),
        )?;
        let truth = clip.ground_truth()?;
        let svg = report::svg(
            &clip,
            &raster,
            &fused.fusion.labels,
            &bevslots,
            truth.as_ref(),
        );
        write("report.svg", svg.clone().into_bytes())?;
        write(
            "report.html",
            report::html(&stats, &verdicts, &svg).into_bytes(),
        )?;
        progress.advance(1);
        Ok(())
    }
}

/// Counts for `stats.json`.
pub fn stats(
    clip: &Clip,
    fusion: &motorpool_prelabel::fusion::Fusion,
    bevslots: &[Option<Vec<Slot>>],
    avm: &[Option<Vec<Slot>>],
    verdicts: &[FrameVerdict],
) -> ClipStats {
    let mut s = ClipStats {
        clip_id: clip.id().to_string(),
        frames: verdicts.len(),
        slots: fusion.labels.len(),
        detections: bevslots.iter().flatten().map(Vec::len).sum(),
        avm_detections: avm.iter().flatten().map(Vec::len).sum(),
        tracks: fusion.stats.tracks,
        confirmed_tracks: fusion.stats.confirmed_tracks,
        outliers: fusion.stats.outliers,
        filled: fusion.stats.filled,
        merged: fusion.stats.merged,
        ..Default::default()
    };
    for v in verdicts {
        s.avm_matches += v.avm_matched;
        s.avm_unmatched += v.avm_slots - v.avm_matched;
        match v.dropped {
            None => {
                s.frames_kept += 1;
                s.label_instances += v.labels.len();
            }
            Some(r) => *s.frames_dropped.entry(r).or_default() += 1,
        }
    }
    s
}

/// `motorpool annotate`: serves the annotate stage until `shutdown`.
pub async fn run(config: LabelConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    Ok(motorpool_labeling::run_service(Annotate, config, shutdown).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(x: f64, y: f64) -> Slot {
        Slot {
            corners: [[x, y], [x + 2.5, y], [x + 2.5, y + 5.0], [x, y + 5.0]],
            score: 0.9,
        }
    }

    fn label(id: u32, x: f64, y: f64) -> FrameLabel {
        FrameLabel {
            slot: id,
            corners: slot(x, y).corners,
            score: 0.9,
        }
    }

    #[test]
    fn a_frame_registration_could_not_place_is_dropped_whatever_avm_says() {
        use motorpool_labeling::clip::{ClipManifest, FrameMeta};
        use motorpool_labeling::geom::Pose;
        let frame = |i: u32| FrameMeta {
            index: i,
            t_us: i as u64,
            pose: Pose::default(),
            points: String::new(),
        };
        let clip = Clip {
            dir: std::path::PathBuf::new(),
            manifest: ClipManifest {
                format: motorpool_labeling::clip::CLIP_FORMAT.into(),
                clip_id: "c".into(),
                frames: (0..3).map(frame).collect(),
            },
        };
        let fused = FusedSlot {
            id: 0,
            corners: slot(0.0, 3.0).corners,
            score: 0.9,
            hits: 9,
            outliers: 0,
            filled: 0,
            first_frame: 0,
            last_frame: 2,
            tracks: vec![0],
            paint: None,
        };
        // AVM agrees in every frame; frame 1's pose is unverified.
        let avm = vec![Some(vec![slot(0.0, 3.0)]); 3];
        let v = annotate(
            &clip,
            &[fused],
            &avm,
            &[false, true, false],
            &LabelParams::default(),
        );
        let dropped: Vec<_> = v.iter().map(|v| v.dropped).collect();
        assert_eq!(dropped, [None, Some(DropReason::PoseUnverified), None]);
        assert!(v[1].detail.contains("registration"), "{}", v[1].detail);
    }

    #[test]
    fn every_drop_reason_and_a_kept_frame() {
        let p = LabelParams::default();
        let labels = || vec![label(0, 0.0, 3.0), label(1, 2.5, 3.0)];

        let v = avm_check(1, vec![], Some(&[slot(0.0, 3.0)]), &p);
        assert_eq!(v.dropped, Some(DropReason::NoVisibleSlots));

        let v = avm_check(2, labels(), None, &p);
        assert_eq!(v.dropped, Some(DropReason::AvmNoResult));
        assert!(v.detail.contains("no result"), "{}", v.detail);
        let v = avm_check(3, labels(), Some(&[]), &p);
        assert_eq!(v.dropped, Some(DropReason::AvmNoResult));

        // Two AVM slots far from every label: more than one unmatched.
        let v = avm_check(
            4,
            labels(),
            Some(&[slot(0.0, 3.0), slot(10.0, -8.0), slot(-7.0, -8.0)]),
            &p,
        );
        assert_eq!(v.dropped, Some(DropReason::AvmDisagrees));
        assert_eq!((v.avm_slots, v.avm_matched), (3, 1));
        assert!(v.detail.contains("2 of 3"), "{}", v.detail);

        // Near-agreement: the far corners are off (AVM sees them poorly), the entrance agrees.
        let mut sloppy = slot(2.5, 3.0);
        sloppy.corners[2][1] += 0.8;
        sloppy.corners[3][1] += 0.8;
        let v = avm_check(
            5,
            labels(),
            Some(&[slot(0.05, 3.0), sloppy, slot(30.0, 30.0)]),
            &p,
        );
        assert_eq!(v.dropped, None, "{}", v.detail);
        assert_eq!(v.avm_matched, 2);
    }

    #[test]
    fn the_avm_rule_counts_shares_both_ways() {
        let p = LabelParams::default();
        // AVM sees one slot, and it is not the label's (a pose glitch put the label 1 m off):
        // one unmatched of one is all of them.
        let v = avm_check(1, vec![label(0, 1.0, 3.0)], Some(&[slot(0.0, 3.0)]), &p);
        assert_eq!(v.dropped, Some(DropReason::AvmDisagrees), "{}", v.detail);
        assert_eq!(v.avm_matched, 0);
        assert!(v.detail.contains("0 of 1 labels match"), "{}", v.detail);
        // AVM agrees on one label but misses two others right beside the car: 2 of 3 labels in
        // its range unseen.
        let near = || vec![label(0, 0.0, 1.0), label(1, 2.5, 1.0), label(2, -2.5, 1.0)];
        let v = avm_check(2, near(), Some(&[slot(0.0, 1.0)]), &p);
        assert_eq!(v.dropped, Some(DropReason::AvmDisagrees));
        assert!(
            v.detail.contains("2 of 3 labels within 5 m"),
            "{}",
            v.detail
        );
        // Seeing two of them is enough (1 of 3 unseen), and so is one of several AVM slots
        // without a label (1 of 3).
        let v = avm_check(3, near(), Some(&[slot(0.0, 1.0), slot(2.5, 1.0)]), &p);
        assert_eq!(v.dropped, None, "{}", v.detail);
        let v = avm_check(
            4,
            near(),
            Some(&[slot(0.0, 1.0), slot(2.5, 1.0), slot(-3.0, -6.0)]),
            &p,
        );
        assert_eq!(v.dropped, None, "{}", v.detail);
        // Labels beyond the AVM's range are not held against it.
        let v = avm_check(
            5,
            vec![label(0, 0.0, 1.0), label(1, 0.0, 7.0), label(2, 2.5, 7.0)],
            Some(&[slot(0.0, 1.0)]),
            &p,
        );
        assert_eq!(v.dropped, None, "{}", v.detail);
    }

    /// The quality goals, on one synthetic clip per layout: fused corner error at most
    /// half the raw detections', fused precision and recall at least 0.98 (every slot is seen in
    /// 5 or more frames).
    #[test]
    fn fused_labels_beat_raw_detections_on_synthetic_clips() {
        use motorpool_labeling::eval::{EvalOptions, evaluate};
        use motorpool_labeling::synth::{Layout, SynthOptions, generate};
        use motorpool_prelabel::fusion::fuse;
        for layout in Layout::ALL {
            let dir = tempfile::tempdir().unwrap();
            let synth = generate(&SynthOptions {
                seed: 11,
                layout,
                points: 50,
                ..Default::default()
            });
            synth.write(dir.path()).unwrap();
            let clip = Clip::open(dir.path()).unwrap();
            let raw: Vec<Vec<Slot>> = clip
                .slots("detections/bevslots.json")
                .unwrap()
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect();
            let frames: Vec<motorpool_labeling::clip::FrameSlots> = raw
                .iter()
                .enumerate()
                .map(|(i, s)| motorpool_labeling::clip::FrameSlots {
                    index: i as u32,
                    slots: s.clone(),
                })
                .collect();
            let params = LabelParams::default();
            let fusion = fuse(
                &motorpool_prelabel::observations(&clip, &frames),
                &params,
                None,
            );
            let avm = clip.slots("detections/avm.json").unwrap();
            let verdicts = annotate(&clip, &fusion.labels, &avm, &[], &params);
            let fused: Vec<Vec<Slot>> = verdicts
                .iter()
                .map(|v| {
                    v.labels
                        .iter()
                        .map(|l| Slot {
                            corners: l.corners,
                            score: l.score,
                        })
                        .collect()
                })
                .collect();
            let truth = clip.ground_truth().unwrap().unwrap();
            let (r, f) = (
                evaluate(&truth, &raw, &EvalOptions::default()),
                evaluate(&truth, &fused, &EvalOptions::default()),
            );
            assert!(
                f.mean_error() <= 0.5 * r.mean_error(),
                "{layout:?}: fused {} vs raw {}",
                f.mean_error(),
                r.mean_error()
            );
            assert!(
                f.precision() >= 0.98 && f.recall() >= 0.98,
                "{layout:?}: P {} R {}",
                f.precision(),
                f.recall()
            );
            assert!(
                r.precision() < 0.95,
                "the raw detections are noisy enough to matter"
            );
            // Keypoint 0 is the entrance-left corner, although 8% of the detections list the
            // corners from another one.
            assert!(
                f.order_share() >= 0.99,
                "{layout:?}: {:.3} of the labels in order",
                f.order_share()
            );
        }
    }

    #[test]
    fn projection_keeps_only_the_visible_square() {
        let f = FrameMeta {
            index: 0,
            t_us: 0,
            pose: motorpool_labeling::geom::Pose {
                x: 100.0,
                y: 0.0,
                z: 0.0,
                yaw: std::f64::consts::PI,
            },
            points: String::new(),
        };
        let fused = |id, x| FusedSlot {
            id,
            corners: slot(x, 2.0).corners,
            score: 0.8,
            hits: 5,
            outliers: 0,
            filled: 0,
            first_frame: 0,
            last_frame: 0,
            tracks: vec![id],
            paint: None,
        };
        let v = project(&f, &[fused(0, 95.0), fused(1, 120.0)], 10.0);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].slot, 0);
        // Facing -x: a slot at map x 95-97.5 is ahead (ego x 2.5-5), map y 2-7 is to the right.
        let m = centre(&v[0].corners);
        assert!(
            (m[0] - 3.75).abs() < 1e-9 && (m[1] + 4.5).abs() < 1e-9,
            "{m:?}"
        );
    }
}
