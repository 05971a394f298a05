//! Temporal fusion: many noisy per-frame observations of each slot become one label.
//!
//! A tracker walks the frames in time order. Each frame's observations (four corners and a
//! confidence, in the map frame) are assigned to the live tracks by the Hungarian algorithm on
//! the mean corner distance, gated at `gate_m`. An observation that no track takes starts a new
//! one; a track unmatched for more than `max_missed` consecutive frames ends. Each track keeps a
//! Kalman filter of its corners (constant position: a slot does not move, but odometry drifts,
//! so the variance grows with time between observations); the filter's estimate is what new
//! observations are compared with. An established track (3 or more observations) treats an
//! observation further than `outlier_m` from its estimate as an outlier: recorded, not fused.
//! A gap of missed frames inside a track is filled by interpolating the observations on either
//! side (recorded as `Filled` points; they inform reviewers, they are not fused).
//!
//! When a track ends, every observation is judged again against the median of all of them
//! (further than `outlier_m`: an outlier), and the inliers are fused: a weighted mean of the
//! corners with weight `confidence * exp(-(t_newest - t) / recency_tau)`. A track becomes a label
//! when it has `min_hits` inliers, their mean confidence is at least `min_score`, and at least
//! `min_observed_share` of its frames are real observations rather than filled-in gaps (a few
//! unrelated bad detections strung together by fill-ins are not a slot). Labels within 0.5 m of
//! each other (a slot seen again after the car came back) are merged; of two labels that still
//! overlap by more than `max_overlap` of the smaller one's area, the one with fewer observations
//! is dropped (`suppressed`): two slots cannot share the ground.
//!
//! Each label's corners are then put in canonical order ([`canonical_order`]): the entrance is
//! the edge facing where the car was when it saw the slot, decided by a vote over the whole track
//! rather than by whichever corner one detection listed first.

use motorpool_labeling::geom::{
    Corners, Pose, Slot, align, area, assign, canonical_order, mean_corner_dist, overlap_area,
};
use motorpool_labeling::raster::Raster;
use motorpool_messages::label::LabelParams;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One frame's observations, map frame.
#[derive(Clone, Debug)]
pub struct FrameObservations {
    pub frame: u32,
    /// Seconds since the clip's first frame.
    pub t_s: f64,
    /// Where the ego vehicle was and where it headed, map frame.
    pub ego: Pose,
    pub slots: Vec<Slot>,
}

/// How a point of a track came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    Observed,
    Outlier,
    Filled,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackPoint {
    pub frame: u32,
    pub t_s: f64,
    pub corners: Corners,
    pub score: f64,
    pub kind: PointKind,
}

/// A track, as `tracks.json` records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Track {
    pub id: u32,
    pub points: Vec<TrackPoint>,
    /// The label this track became (after merging), if any.
    pub label: Option<u32>,
}

/// A fused slot: a label, map frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedSlot {
    pub id: u32,
    pub corners: Corners,
    /// Mean confidence of the fused observations.
    pub score: f64,
    pub hits: u32,
    pub outliers: u32,
    pub filled: u32,
    pub first_frame: u32,
    pub last_frame: u32,
    /// Tracks merged into this label.
    pub tracks: Vec<u32>,
    /// The share of its outline along which the BEV raster shows painted lines; absent when
    /// not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paint: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FusionStats {
    pub frames: usize,
    pub observations: usize,
    pub tracks: usize,
    pub confirmed_tracks: usize,
    pub labels: usize,
    pub outliers: usize,
    pub filled: usize,
    pub merged: usize,
    /// Tracks with enough observations that were mostly filled-in gaps.
    #[serde(default)]
    pub sparse: usize,
    /// Labels dropped for overlapping a better-supported one.
    #[serde(default)]
    pub suppressed: usize,
    /// Labels dropped because the BEV raster shows painted lines along too little of their
    /// outline (`min_paint_share`): a detector's ghost, not a slot.
    #[serde(default)]
    pub unpainted: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fusion {
    pub labels: Vec<FusedSlot>,
    pub tracks: Vec<Track>,
    pub stats: FusionStats,
}

/// Measurement noise of a confident observation, metres (one sigma per coordinate).
const OBS_SIGMA_M: f64 = 0.12;
/// Process noise: odometry drift, m^2 per second.
const DRIFT_M2_PER_S: f64 = 0.0004;

struct Live {
    id: u32,
    estimate: Corners,
    variance: f64,
    last_t: f64,
    last_frame: u32,
    missed: u32,
    inliers: u32,
    points: Vec<TrackPoint>,
}

impl Live {
    fn predict(&mut self, t: f64) {
        self.variance += DRIFT_M2_PER_S * (t - self.last_t).max(0.0);
    }

    fn update(&mut self, corners: &Corners, score: f64) {
        let r = (OBS_SIGMA_M / score.max(0.05)).powi(2);
        let k = self.variance / (self.variance + r);
        for (e, z) in self.estimate.iter_mut().zip(corners) {
            e[0] += k * (z[0] - e[0]);
            e[1] += k * (z[1] - e[1]);
        }
        self.variance *= 1.0 - k;
    }
}

/// How far from a label's outline paint may lie and still count as its line, metres.
pub const PAINT_TOLERANCE_M: f64 = 0.2;
/// A raster cell at least this bright is paint.
pub const PAINT_MIN_INTENSITY: f32 = 0.5;

/// Runs the tracker over `frames` (in time order) and fuses the tracks.
/// The knobs are the job's [`LabelParams`] (`gate_m`, `max_missed`, `min_hits`, `min_score`,
/// `outlier_m`, `recency_tau_s`, `min_observed_share`, `max_overlap`, `min_paint_share`). With
/// the BEV raster (`paint`), a label whose outline shows paint along less than `min_paint_share`
/// of its length is dropped before overlaps are settled, so a well-observed ghost cannot push a
/// real slot out.
pub fn fuse(frames: &[FrameObservations], params: &LabelParams, paint: Option<&Raster>) -> Fusion {
    let mut live: Vec<Live> = Vec::new();
    let mut ended: Vec<Live> = Vec::new();
    let mut next_id = 0u32;
    let mut stats = FusionStats {
        frames: frames.len(),
        ..Default::default()
    };
    for f in frames {
        stats.observations += f.slots.len();
        for t in live.iter_mut() {
            t.predict(f.t_s);
        }
        let pairs = assign(
            live.len(),
            f.slots.len(),
            |t, o| mean_corner_dist(&live[t].estimate, &f.slots[o].corners),
            params.gate_m,
        );
        let mut taken = vec![false; f.slots.len()];
        let mut matched = vec![false; live.len()];
        for (t, o, _) in pairs {
            taken[o] = true;
            matched[t] = true;
            let track = &mut live[t];
            let obs = &f.slots[o];
            let (corners, _) = align(&track.estimate, &obs.corners);
            fill_gap(track, f.frame, f.t_s, &corners, params.max_missed);
            // Outliers are judged against the median of the track's observations so far: a bad
            // early observation cannot drag the reference along and make every later good one
            // look wrong.
            let outlier = track
                .points
                .iter()
                .filter(|p| p.kind != PointKind::Filled)
                .count()
                >= 3
                && mean_corner_dist(&median_corners(&track.points), &corners) > params.outlier_m;
            track.points.push(TrackPoint {
                frame: f.frame,
                t_s: f.t_s,
                corners,
                score: obs.score,
                kind: if outlier {
                    PointKind::Outlier
                } else {
                    PointKind::Observed
                },
            });
            if !outlier {
                track.update(&corners, obs.score);
                track.inliers += 1;
            }
            track.last_t = f.t_s;
            track.last_frame = f.frame;
            track.missed = 0;
        }
        for (t, m) in matched.iter().enumerate().rev() {
            if !m {
                live[t].missed += 1;
                if live[t].missed > params.max_missed {
                    ended.push(live.swap_remove(t));
                }
            }
        }
        for (o, obs) in f.slots.iter().enumerate() {
            if taken[o] {
                continue;
            }
            live.push(Live {
                id: next_id,
                estimate: obs.corners,
                variance: (OBS_SIGMA_M / obs.score.max(0.05)).powi(2),
                last_t: f.t_s,
                last_frame: f.frame,
                missed: 0,
                inliers: 1,
                points: vec![TrackPoint {
                    frame: f.frame,
                    t_s: f.t_s,
                    corners: obs.corners,
                    score: obs.score,
                    kind: PointKind::Observed,
                }],
            });
            next_id += 1;
        }
    }
    ended.append(&mut live);
    ended.sort_by_key(|t| t.id);
    stats.tracks = ended.len();

    let mut tracks: Vec<Track> = Vec::with_capacity(ended.len());
    let mut candidates: Vec<FusedSlot> = Vec::new();
    for t in ended {
        let mut points = t.points;
        let fused = fuse_track(&mut points, params);
        stats.outliers += points
            .iter()
            .filter(|p| p.kind == PointKind::Outlier)
            .count();
        stats.filled += points
            .iter()
            .filter(|p| p.kind == PointKind::Filled)
            .count();
        match fused {
            Some(slot)
                if (slot.hits as f64)
                    < params.min_observed_share * (slot.hits + slot.filled) as f64 =>
            {
                stats.sparse += 1;
            }
            Some(mut slot) => {
                slot.id = t.id;
                slot.tracks = vec![t.id];
                candidates.push(slot);
            }
            None => {}
        }
        tracks.push(Track {
            id: t.id,
            points,
            label: None,
        });
    }
    stats.confirmed_tracks = candidates.len();
    let mut merged = merge(candidates, &mut stats);
    if let Some(raster) = paint {
        for l in merged.iter_mut() {
            l.paint =
                Some(raster.painted_share(&l.corners, PAINT_TOLERANCE_M, PAINT_MIN_INTENSITY));
        }
        let before = merged.len();
        merged.retain(|l| l.paint.is_none_or(|p| p >= params.min_paint_share));
        stats.unpainted = before - merged.len();
    }
    let labels = suppress_overlaps(merged, params.max_overlap, &mut stats);
    // Where the car was whenever a label's tracks observed it.
    let ego: HashMap<u32, Pose> = frames.iter().map(|f| (f.frame, f.ego)).collect();
    let labels: Vec<FusedSlot> = labels
        .into_iter()
        .map(|mut l| {
            let seen_from: Vec<Pose> = tracks
                .iter()
                .filter(|t| l.tracks.contains(&t.id))
                .flat_map(|t| &t.points)
                .filter(|p| p.kind == PointKind::Observed)
                .filter_map(|p| ego.get(&p.frame).copied())
                .collect();
            l.corners = canonical_order(&l.corners, &seen_from);
            l
        })
        .collect();
    for (i, l) in labels.iter().enumerate() {
        for tid in &l.tracks {
            if let Some(t) = tracks.iter_mut().find(|t| t.id == *tid) {
                t.label = Some(i as u32);
            }
        }
    }
    let labels: Vec<FusedSlot> = labels
        .into_iter()
        .enumerate()
        .map(|(i, mut l)| {
            l.id = i as u32;
            l
        })
        .collect();
    stats.labels = labels.len();
    Fusion {
        labels,
        tracks,
        stats,
    }
}

/// Interpolated points for the frames a track missed between its last observation and this one.
fn fill_gap(track: &mut Live, frame: u32, t_s: f64, corners: &Corners, max_missed: u32) {
    let Some(prev) = track
        .points
        .iter()
        .rev()
        .find(|p| p.kind != PointKind::Filled)
        .cloned()
    else {
        return;
    };
    let gap = frame.saturating_sub(prev.frame);
    if gap <= 1 || gap > max_missed + 1 {
        return;
    }
    for k in 1..gap {
        let a = k as f64 / gap as f64;
        track.points.push(TrackPoint {
            frame: prev.frame + k,
            t_s: prev.t_s + a * (t_s - prev.t_s),
            corners: std::array::from_fn(|i| {
                [
                    prev.corners[i][0] + a * (corners[i][0] - prev.corners[i][0]),
                    prev.corners[i][1] + a * (corners[i][1] - prev.corners[i][1]),
                ]
            }),
            score: prev.score.min(track.points.last().map_or(1.0, |p| p.score)),
            kind: PointKind::Filled,
        });
    }
}

/// The component-wise median of a track's observed corners (outliers included, filled points
/// not): a reference that up to half of the observations can be wrong about.
fn median_corners(points: &[TrackPoint]) -> Corners {
    let obs: Vec<&TrackPoint> = points
        .iter()
        .filter(|p| p.kind != PointKind::Filled)
        .collect();
    let mut buf = Vec::with_capacity(obs.len());
    std::array::from_fn(|i| {
        std::array::from_fn(|k| {
            buf.clear();
            buf.extend(obs.iter().map(|p| p.corners[i][k]));
            buf.sort_by(f64::total_cmp);
            buf.get(buf.len() / 2).copied().unwrap_or(0.0)
        })
    })
}

fn weighted_mean(points: &[TrackPoint], newest: f64, tau: f64) -> Option<(Corners, f64)> {
    let mut acc = [[0.0; 2]; 4];
    let mut total = 0.0;
    for p in points.iter().filter(|p| p.kind == PointKind::Observed) {
        let w = p.score * (-(newest - p.t_s) / tau.max(1e-3)).exp();
        for (a, c) in acc.iter_mut().zip(&p.corners) {
            a[0] += w * c[0];
            a[1] += w * c[1];
        }
        total += w;
    }
    (total > 0.0).then(|| (acc.map(|a| [a[0] / total, a[1] / total]), total))
}

/// Fuses one track's inliers into a label, marking late-found outliers; `None` when the track is
/// not good enough to be a label.
fn fuse_track(points: &mut [TrackPoint], params: &LabelParams) -> Option<FusedSlot> {
    let newest = points
        .iter()
        .filter(|p| p.kind == PointKind::Observed)
        .map(|p| p.t_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let (first, _) = weighted_mean(points, newest, params.recency_tau_s)?;
    for p in points.iter_mut() {
        if p.kind == PointKind::Observed && mean_corner_dist(&first, &p.corners) > params.outlier_m
        {
            p.kind = PointKind::Outlier;
        }
    }
    let (corners, _) = weighted_mean(points, newest, params.recency_tau_s)?;
    let inliers: Vec<&TrackPoint> = points
        .iter()
        .filter(|p| p.kind == PointKind::Observed)
        .collect();
    let hits = inliers.len() as u32;
    let score = inliers.iter().map(|p| p.score).sum::<f64>() / hits.max(1) as f64;
    if hits < params.min_hits || score < params.min_score {
        return None;
    }
    Some(FusedSlot {
        id: 0,
        corners,
        score,
        hits,
        outliers: points
            .iter()
            .filter(|p| p.kind == PointKind::Outlier)
            .count() as u32,
        filled: points
            .iter()
            .filter(|p| p.kind == PointKind::Filled)
            .count() as u32,
        first_frame: points.iter().map(|p| p.frame).min().unwrap_or(0),
        last_frame: points.iter().map(|p| p.frame).max().unwrap_or(0),
        tracks: vec![],
        paint: None,
    })
}

/// Drops every label that overlaps a better-supported one (more observations) by more than
/// `max_overlap` of the smaller one's area.
fn suppress_overlaps(
    mut labels: Vec<FusedSlot>,
    max_overlap: f64,
    stats: &mut FusionStats,
) -> Vec<FusedSlot> {
    labels.sort_by(|a, b| b.hits.cmp(&a.hits).then(b.score.total_cmp(&a.score)));
    let mut kept: Vec<FusedSlot> = Vec::with_capacity(labels.len());
    for l in labels {
        let clashes = kept.iter().any(|k| {
            let smaller = area(&k.corners).min(area(&l.corners));
            smaller > 0.0 && overlap_area(&k.corners, &l.corners) > max_overlap * smaller
        });
        if clashes {
            stats.suppressed += 1;
        } else {
            kept.push(l);
        }
    }
    kept.sort_by(|a, b| a.first_frame.cmp(&b.first_frame).then(a.id.cmp(&b.id)));
    kept
}

/// Merges labels closer than 0.5 m (the same slot tracked twice), weighting by hits.
fn merge(mut candidates: Vec<FusedSlot>, stats: &mut FusionStats) -> Vec<FusedSlot> {
    const MERGE_M: f64 = 0.5;
    let mut out: Vec<FusedSlot> = Vec::new();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.hits));
    'next: for c in candidates {
        for o in out.iter_mut() {
            let (aligned, d) = align(&o.corners, &c.corners);
            if d < MERGE_M {
                let (wa, wb) = (o.hits as f64, c.hits as f64);
                o.corners = std::array::from_fn(|i| {
                    [
                        (wa * o.corners[i][0] + wb * aligned[i][0]) / (wa + wb),
                        (wa * o.corners[i][1] + wb * aligned[i][1]) / (wa + wb),
                    ]
                });
                o.score = (wa * o.score + wb * c.score) / (wa + wb);
                o.hits += c.hits;
                o.outliers += c.outliers;
                o.filled += c.filled;
                o.first_frame = o.first_frame.min(c.first_frame);
                o.last_frame = o.last_frame.max(c.last_frame);
                o.tracks.extend(c.tracks);
                stats.merged += 1;
                continue 'next;
            }
        }
        out.push(c);
    }
    out.sort_by(|a, b| a.first_frame.cmp(&b.first_frame).then(a.id.cmp(&b.id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_labeling::geom::rotate;

    fn params() -> LabelParams {
        LabelParams::default()
    }

    fn slot(x: f64, y: f64, score: f64) -> Slot {
        Slot {
            corners: [[x, y], [x + 2.5, y], [x + 2.5, y + 5.0], [x, y + 5.0]],
            score,
        }
    }

    fn frames(obs: Vec<Vec<Slot>>) -> Vec<FrameObservations> {
        obs.into_iter()
            .enumerate()
            .map(|(i, slots)| FrameObservations {
                frame: i as u32,
                t_s: i as f64 / 10.0,
                // Driving along the slots' entrances (y = 0), 3 m in front of them.
                ego: Pose {
                    x: -3.0 + 0.3 * i as f64,
                    y: -3.0,
                    ..Default::default()
                },
                slots,
            })
            .collect()
    }

    #[test]
    fn noisy_observations_of_two_slots_fuse_into_two_labels() {
        let mut obs = Vec::new();
        for i in 0..20 {
            let e = if i % 2 == 0 { 0.1 } else { -0.1 };
            let mut a = slot(0.0 + e, 0.0 - e, 0.9);
            if i == 7 {
                a.corners = rotate(&a.corners, 2); // the detector swapped the corner order
            }
            obs.push(vec![a, slot(2.5 - e, 0.0 + e, 0.8)]);
        }
        let f = fuse(&frames(obs), &params(), None);
        assert_eq!(f.labels.len(), 2, "{:?}", f.stats);
        let truth = [slot(0.0, 0.0, 1.0), slot(2.5, 0.0, 1.0)];
        for t in truth {
            let best = f
                .labels
                .iter()
                .map(|l| mean_corner_dist(&t.corners, &l.corners))
                .fold(f64::INFINITY, f64::min);
            assert!(best < 0.02, "fused error {best}");
        }
        assert_eq!(f.labels.iter().map(|l| l.hits).sum::<u32>(), 40);
    }

    #[test]
    fn outliers_are_rejected_gaps_filled_and_tracks_end() {
        let p = params();
        let mut obs: Vec<Vec<Slot>> = (0..12).map(|_| vec![slot(0.0, 0.0, 0.9)]).collect();
        obs[5] = vec![slot(0.7, 0.0, 0.9)]; // within the gate, beyond outlier_m
        obs[8] = vec![];
        obs[9] = vec![]; // a gap of two frames
        // Then nothing for longer than max_missed, then the slot again: a second track, merged.
        obs.extend((0..(p.max_missed + 2)).map(|_| vec![]));
        obs.extend((0..4).map(|_| vec![slot(0.05, 0.0, 0.9)]));
        let f = fuse(&frames(obs), &p, None);
        assert_eq!(f.stats.tracks, 2);
        assert_eq!(f.stats.outliers, 1);
        assert_eq!(f.stats.filled, 2);
        assert_eq!(f.stats.merged, 1);
        assert_eq!(f.labels.len(), 1);
        assert!(mean_corner_dist(&f.labels[0].corners, &slot(0.0, 0.0, 1.0).corners) < 0.03);
        let filled: Vec<u32> = f.tracks[0]
            .points
            .iter()
            .filter(|q| q.kind == PointKind::Filled)
            .map(|q| q.frame)
            .collect();
        assert_eq!(filled, [8, 9]);
    }

    #[test]
    fn a_bad_early_observation_does_not_turn_the_good_ones_into_outliers() {
        let mut obs: Vec<Vec<Slot>> = (0..30).map(|_| vec![slot(0.0, 0.0, 0.9)]).collect();
        obs[1] = vec![slot(0.8, 0.0, 0.9)]; // within the gate, accepted before the track is established
        let f = fuse(&frames(obs), &params(), None);
        assert_eq!(f.labels.len(), 1);
        assert_eq!(f.stats.outliers, 1, "{:?}", f.stats);
        assert_eq!(f.labels[0].hits, 29);
        assert!(mean_corner_dist(&f.labels[0].corners, &slot(0.0, 0.0, 1.0).corners) < 1e-9);
    }

    #[test]
    fn a_track_strung_from_a_few_bad_detections_by_fill_ins_is_no_label() {
        // One slot seen throughout; three unrelated detections 1.2 m beside it, four frames
        // apart, joined into a track by interpolated fill-ins (8 of its 11 frames).
        let mut obs: Vec<Vec<Slot>> = (0..30).map(|_| vec![slot(0.0, 0.0, 0.9)]).collect();
        for i in [10, 14, 18] {
            obs[i].push(slot(1.2, 0.0, 0.8));
        }
        let f = fuse(&frames(obs), &params(), None);
        assert_eq!(f.labels.len(), 1, "{:?}", f.labels);
        assert_eq!(f.stats.sparse, 1, "{:?}", f.stats);
        assert!(mean_corner_dist(&f.labels[0].corners, &slot(0.0, 0.0, 1.0).corners) < 1e-9);
    }

    #[test]
    fn of_two_overlapping_labels_the_better_supported_one_stays() {
        // A real slot seen 30 times, and a persistent ghost 1.2 m beside it seen 12 times in a
        // row (a track of its own: beyond the merge distance, within the gate of nothing).
        let mut obs: Vec<Vec<Slot>> = (0..30).map(|_| vec![slot(0.0, 0.0, 0.9)]).collect();
        for o in obs.iter_mut().skip(5).take(12) {
            o.push(slot(1.2, 0.0, 0.7));
        }
        // A neighbour sharing only an edge stays.
        for o in obs.iter_mut() {
            o.push(slot(2.5, 0.0, 0.9));
        }
        let f = fuse(&frames(obs), &params(), None);
        assert_eq!(f.stats.suppressed, 1, "{:?}", f.stats);
        assert_eq!(f.labels.len(), 2, "{:?}", f.labels);
        for truth in [slot(0.0, 0.0, 1.0), slot(2.5, 0.0, 1.0)] {
            assert!(
                f.labels
                    .iter()
                    .any(|l| mean_corner_dist(&l.corners, &truth.corners) < 1e-9),
                "{truth:?} missing"
            );
        }
        // The ghost's track is kept for review, with no label.
        assert!(
            f.tracks
                .iter()
                .any(|t| t.label.is_none() && t.points.len() >= 12)
        );
    }

    #[test]
    fn a_ghost_without_paint_is_dropped_even_when_seen_more_than_the_slot_it_overlaps() {
        // Paint along the real slot's sides and far end (x = 0 and 2.5 from y = 0 to 5, and
        // y = 5), dull ground around, as the mapping stage's raster shows it.
        let mut pts = Vec::new();
        for i in -20..=60 {
            for j in -20..=80 {
                let (x, y) = (i as f64 * 0.05, j as f64 * 0.05);
                let on_side =
                    (x.abs() < 0.06 || (x - 2.5).abs() < 0.06) && (0.0..=5.0).contains(&y);
                let on_end = (y - 5.0).abs() < 0.06 && (0.0..=2.5).contains(&x);
                let i = if on_side || on_end { 0.9 } else { 0.1 };
                pts.push([x as f32, y as f32, 0.0, i]);
            }
        }
        let raster = Raster::from_points(&pts, 0.1);
        // The ghost, 1.2 m over, is seen in every frame; the slot in two of three.
        let obs: Vec<Vec<Slot>> = (0..30)
            .map(|i| {
                let mut o = vec![slot(1.2, 0.0, 0.9)];
                if i % 3 != 0 {
                    o.push(slot(0.0, 0.0, 0.8));
                }
                o
            })
            .collect();
        let without = fuse(&frames(obs.clone()), &params(), None);
        assert_eq!(without.labels.len(), 1);
        assert!(
            mean_corner_dist(&without.labels[0].corners, &slot(1.2, 0.0, 1.0).corners) < 1e-9,
            "without the raster the better-seen ghost wins"
        );
        let with = fuse(&frames(obs.clone()), &params(), Some(&raster));
        assert_eq!(with.stats.unpainted, 1, "{:?}", with.stats);
        assert_eq!(with.stats.suppressed, 0, "{:?}", with.stats);
        assert_eq!(with.labels.len(), 1);
        let real = &with.labels[0];
        assert!(mean_corner_dist(&real.corners, &slot(0.0, 0.0, 1.0).corners) < 1e-9);
        assert!(real.paint.is_some_and(|p| p > 0.6), "{:?}", real.paint);
        // 0 turns the check off.
        let off = LabelParams {
            min_paint_share: 0.0,
            ..params()
        };
        assert_eq!(fuse(&frames(obs), &off, Some(&raster)).stats.unpainted, 0);
    }

    #[test]
    fn a_label_starts_at_its_entrance_left_corner_whatever_its_first_detection_said() {
        use motorpool_labeling::geom::reverse;
        // The car drives along y = -3, in front of the slot's entrance (y = 0). The first
        // detections list the corners rotated, and reversed; most later ones are right.
        let truth = slot(0.0, 0.0, 1.0).corners;
        let mut obs: Vec<Vec<Slot>> = (0..20).map(|_| vec![slot(0.0, 0.0, 0.9)]).collect();
        obs[0][0].corners = rotate(&truth, 2);
        obs[1][0].corners = reverse(&rotate(&truth, 1));
        obs[2][0].corners = rotate(&truth, 3);
        let f = fuse(&frames(obs), &params(), None);
        assert_eq!(f.labels.len(), 1);
        let c = f.labels[0].corners;
        for (got, want) in c.iter().zip(&truth) {
            assert!(
                motorpool_labeling::geom::dist(*got, *want) < 1e-9,
                "{c:?} is not in the order {truth:?}"
            );
        }
    }

    #[test]
    fn one_off_and_unconfident_detections_do_not_become_labels() {
        let mut obs: Vec<Vec<Slot>> = (0..10).map(|_| vec![slot(0.0, 0.0, 0.3)]).collect();
        obs[4].push(slot(20.0, 20.0, 0.9)); // a false positive seen once
        let f = fuse(&frames(obs), &params(), None);
        assert!(f.labels.is_empty(), "{:?}", f.labels);
        assert_eq!(f.stats.tracks, 2);
    }
}
