//! Label quality against ground truth, frame by frame in the ego frame: corner error, and
//! precision and recall at a corner threshold.
//!
//! The rules, so that raw detections and fused labels are scored the same way:
//! - A frame is scored inside its visible square (`|x|, |y| <= visible_m` around the ego car, by
//!   slot centre). Ground-truth slots count only if the clip sees them (centre within the
//!   detector's range) in at least `min_seen` frames.
//! - A band of `margin_m` on either side of the square's edge is "don't care": a slot whose centre
//!   is in it is neither required nor held against a prediction.
//! - A prediction is a true positive when it is assigned (Hungarian, smallest mean corner
//!   distance) to a required slot with every corner within `threshold_m`.
//! - Corner error is measured per corner over pairs assigned within 1 m, so that it shows how
//!   far off the near-misses are too.

use crate::clip::GroundTruth;
use crate::geom::{Corners, Slot, align, assign, centre, corner_dists, dist, mean_corner_dist};
use crate::synth::DETECTION_RANGE_M;

/// How to score.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub visible_m: f64,
    pub margin_m: f64,
    pub threshold_m: f64,
    pub min_seen: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            visible_m: 10.0,
            margin_m: 0.5,
            threshold_m: 0.3,
            min_seen: 5,
        }
    }
}

/// Scores of one set of per-frame predictions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Quality {
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
    /// Per-corner errors of pairs assigned within 1 m, metres.
    pub corner_errors: Vec<f64>,
    /// True positives whose corners come in the truth's order (corner 0 the entrance-left one,
    /// counter-clockwise): what a reviewer's keypoint names rely on.
    pub in_order: usize,
}

impl Quality {
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    pub fn mean_error(&self) -> f64 {
        if self.corner_errors.is_empty() {
            return f64::NAN;
        }
        self.corner_errors.iter().sum::<f64>() / self.corner_errors.len() as f64
    }
    pub fn p95_error(&self) -> f64 {
        percentile(&self.corner_errors, 0.95)
    }
    /// The share of true positives in the truth's corner order.
    pub fn order_share(&self) -> f64 {
        ratio(self.in_order, self.tp)
    }
    pub fn merge(&mut self, other: &Quality) {
        self.in_order += other.in_order;
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
        self.corner_errors.extend_from_slice(&other.corner_errors);
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

/// The `q` quantile (nearest rank) of `v`.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

fn inside(c: &Corners, half: f64) -> bool {
    let m = centre(c);
    m[0].abs() <= half && m[1].abs() <= half
}

/// Ground-truth slots the clip sees in at least `min_seen` frames.
pub fn seen_slots(truth: &GroundTruth, min_seen: usize) -> Vec<bool> {
    truth
        .slots
        .iter()
        .map(|s| {
            truth
                .poses
                .iter()
                .filter(|p| dist(p.to_ego(centre(&s.corners)), [0.0, 0.0]) <= DETECTION_RANGE_M)
                .count()
                >= min_seen
        })
        .collect()
}

/// Scores `predictions[i]` (ego frame of frame `i`) against the truth.
pub fn evaluate(truth: &GroundTruth, predictions: &[Vec<Slot>], opts: &EvalOptions) -> Quality {
    evaluate_frames(truth, predictions, opts, |_| true)
}

/// [`evaluate`] over the frames `scored` picks (the frames a labeler kept, say).
pub fn evaluate_frames(
    truth: &GroundTruth,
    predictions: &[Vec<Slot>],
    opts: &EvalOptions,
    scored: impl Fn(usize) -> bool,
) -> Quality {
    let seen = seen_slots(truth, opts.min_seen);
    let mut q = Quality::default();
    for (i, preds) in predictions.iter().enumerate() {
        let Some(pose) = truth.poses.get(i) else {
            break;
        };
        if !scored(i) {
            continue;
        }
        // (corners, required)
        let gt: Vec<(Corners, bool)> = truth
            .slots
            .iter()
            .zip(&seen)
            .map(|(s, seen)| (s.corners.map(|p| pose.to_ego(p)), *seen))
            .filter(|(c, _)| inside(c, opts.visible_m + opts.margin_m))
            .map(|(c, seen)| (c, seen && inside(&c, opts.visible_m - opts.margin_m)))
            .collect();
        let preds: Vec<&Slot> = preds
            .iter()
            .filter(|p| inside(&p.corners, opts.visible_m + opts.margin_m))
            .collect();
        // Precision and recall at the corner threshold.
        let pairs = assign(
            preds.len(),
            gt.len(),
            |p, g| match_cost(&gt[g].0, &preds[p].corners, opts.threshold_m),
            opts.threshold_m,
        );
        let mut pred_matched = vec![false; preds.len()];
        let mut gt_matched = vec![false; gt.len()];
        for (p, g, _) in &pairs {
            pred_matched[*p] = true;
            gt_matched[*g] = true;
            if gt[*g].1 {
                q.tp += 1;
                if align(&gt[*g].0, &preds[*p].corners).0 == preds[*p].corners {
                    q.in_order += 1;
                }
            }
        }
        for (p, m) in pred_matched.iter().enumerate() {
            // An unmatched prediction in the don't-care band is not held against anyone.
            if !m && inside(&preds[p].corners, opts.visible_m - opts.margin_m) {
                q.fp += 1;
            }
        }
        q.fn_ += gt
            .iter()
            .zip(&gt_matched)
            .filter(|((_, req), m)| *req && !**m)
            .count();
        // Corner errors of near and not-so-near misses.
        let loose = assign(
            preds.len(),
            gt.len(),
            |p, g| mean_corner_dist(&gt[g].0, &preds[p].corners),
            1.0,
        );
        for (p, g, _) in loose {
            if gt[g].1 {
                let (a, _) = align(&gt[g].0, &preds[p].corners);
                q.corner_errors.extend(corner_dists(&gt[g].0, &a));
            }
        }
    }
    q
}

/// `label` against `truth` with its corners in the best order: (mean corner distance, largest
/// corner distance), metres.
fn aligned_distances(truth: &Corners, label: &Corners) -> (f64, f64) {
    let (a, mean) = align(truth, label);
    let worst = corner_dists(truth, &a).into_iter().fold(0.0, f64::max);
    (mean, worst)
}

/// The cost of pairing `label` with `truth` in an assignment: their mean corner distance when
/// every corner is within `threshold_m`, else no pairing.
fn match_cost(truth: &Corners, label: &Corners, threshold_m: f64) -> f64 {
    match aligned_distances(truth, label) {
        (mean, worst) if worst <= threshold_m => mean,
        _ => f64::INFINITY,
    }
}

/// How far a label is from the nearest true slot: the largest corner distance after putting
/// its corners in the best order, metres.
fn worst_corner_to_truth(label: &Corners, truth: &[Corners]) -> f64 {
    truth
        .iter()
        .map(|t| aligned_distances(t, label).1)
        .fold(f64::INFINITY, f64::min)
}

/// What is wrong with one frame's labels (ego frame of frame `i`), against every true slot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FrameFaults {
    /// Labels with no true slot within 1 m at every corner.
    pub phantoms: usize,
    /// Labels off their nearest true slot by more than 0.5 m at some corner (phantoms included).
    pub off: usize,
}

/// [`FrameFaults`] of frame `i`'s labels.
pub fn frame_faults(truth: &GroundTruth, i: usize, labels: &[Slot]) -> FrameFaults {
    let Some(pose) = truth.poses.get(i) else {
        return FrameFaults::default();
    };
    let near: Vec<Corners> = truth
        .slots
        .iter()
        .map(|s| s.corners.map(|p| pose.to_ego(p)))
        .filter(|c| dist(centre(c), [0.0, 0.0]) < 30.0)
        .collect();
    let mut f = FrameFaults::default();
    for l in labels {
        let d = worst_corner_to_truth(&l.corners, &near);
        if d > 1.0 {
            f.phantoms += 1;
        }
        if d > 0.5 {
            f.off += 1;
        }
    }
    f
}

/// Map-level precision and recall: labels in the world frame (a clip's fused labels, whose
/// frame is the first pose's) against the true slots the clip sees in at least `min_seen`
/// frames, each true positive within `threshold_m` at every corner. `(tp, fp, fn)`; a label
/// matching a slot seen too rarely counts neither way.
pub fn map_quality(
    truth: &GroundTruth,
    labels: &[Slot],
    opts: &EvalOptions,
) -> (usize, usize, usize) {
    let seen = seen_slots(truth, opts.min_seen);
    let gt: Vec<&Corners> = truth.slots.iter().map(|s| &s.corners).collect();
    let pairs = assign(
        labels.len(),
        gt.len(),
        |l, g| match_cost(gt[g], &labels[l].corners, opts.threshold_m),
        opts.threshold_m,
    );
    let mut matched_label = vec![false; labels.len()];
    let mut matched_gt = vec![false; gt.len()];
    let mut tp = 0;
    for (l, g, _) in &pairs {
        matched_label[*l] = true;
        matched_gt[*g] = true;
        if seen[*g] {
            tp += 1;
        }
    }
    let fp = matched_label.iter().filter(|m| !**m).count();
    let fn_ = seen
        .iter()
        .zip(&matched_gt)
        .filter(|(s, m)| **s && !**m)
        .count();
    (tp, fp, fn_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geom::Pose;

    fn truth() -> GroundTruth {
        GroundTruth {
            format: crate::clip::GROUND_TRUTH_FORMAT.into(),
            slots: vec![Slot {
                corners: [[2.0, 3.0], [4.5, 3.0], [4.5, 8.0], [2.0, 8.0]],
                score: 1.0,
            }],
            poses: vec![Pose::default(); 6],
        }
    }

    #[test]
    fn perfect_noisy_missed_and_false_predictions_score_as_they_should() {
        let t = truth();
        let exact = t.slots[0];
        let off = exact.map_corners(|p| [p[0] + 0.2, p[1]]);
        let far_off = exact.map_corners(|p| [p[0] + 0.5, p[1]]);
        let fp = exact.map_corners(|p| [p[0] - 7.0, p[1] - 9.0]);
        let preds = vec![
            vec![exact],
            vec![off],
            vec![far_off],
            vec![],
            vec![exact, fp],
            vec![exact],
        ];
        let q = evaluate(&t, &preds, &EvalOptions::default());
        assert_eq!((q.tp, q.fp, q.fn_), (4, 2, 2), "{q:?}");
        // Errors: 3 exact frames of zeros, one at 0.2, one at 0.5 (4 corners each).
        assert_eq!(q.corner_errors.len(), 20);
        assert!((q.mean_error() - (4.0 * 0.2 + 4.0 * 0.5) / 20.0).abs() < 1e-9);
        assert!((q.p95_error() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn phantoms_and_labels_off_their_slot_are_counted_per_frame_and_on_the_map() {
        let t = truth();
        let exact = t.slots[0];
        let off = exact.map_corners(|p| [p[0] + 0.7, p[1]]);
        let phantom = exact.map_corners(|p| [p[0] - 7.0, p[1] - 9.0]);
        let f = frame_faults(&t, 0, &[exact, off, phantom]);
        assert_eq!(
            f,
            FrameFaults {
                phantoms: 1,
                off: 2
            }
        );
        let rotated = Slot {
            corners: crate::geom::rotate(&exact.corners, 1),
            score: 1.0,
        };
        assert_eq!(frame_faults(&t, 0, &[rotated]), FrameFaults::default());
        let o = EvalOptions::default();
        assert_eq!(map_quality(&t, &[exact], &o), (1, 0, 0));
        assert_eq!(map_quality(&t, &[off, phantom], &o), (0, 2, 1));
        assert_eq!(map_quality(&t, &[], &o), (0, 0, 1));
    }

    #[test]
    fn slots_seen_too_rarely_are_not_required() {
        let mut t = truth();
        t.poses.truncate(4);
        let q = evaluate(&t, &vec![vec![]; 4], &EvalOptions::default());
        assert_eq!((q.tp, q.fp, q.fn_), (0, 0, 0));
    }
}
