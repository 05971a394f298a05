//! Planar geometry of parking slots: poses, corner sets, distances and assignment.
//!
//! A slot is four corners in order around its outline, the first two on the entrance line.
//! Detectors do not always agree on which corner comes first, nor which way round they go, so
//! every comparison aligns the corner order first ([`align`]: the cyclic shift, either way round,
//! with the smallest mean distance). A label's own order is canonical ([`canonical_order`]):
//! entrance left, entrance right, far right, far left, as seen from the aisle facing into the
//! slot; counter-clockwise in the map frame.

use serde::{Deserialize, Serialize};

/// A point in the plane, metres.
pub type P2 = [f64; 2];

/// A planar pose: where the ego vehicle is in the clip's local map frame. Parking lots are flat,
/// so roll and pitch are taken as zero; `z` only lifts the lidar points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pose {
    pub x: f64,
    pub y: f64,
    #[serde(default)]
    pub z: f64,
    /// Heading, radians, counter-clockwise from the map's x axis.
    pub yaw: f64,
}

impl Pose {
    /// An ego-frame point in the map frame.
    pub fn to_map(&self, p: P2) -> P2 {
        let (s, c) = self.yaw.sin_cos();
        [self.x + c * p[0] - s * p[1], self.y + s * p[0] + c * p[1]]
    }

    /// A map-frame point in the ego frame.
    pub fn to_ego(&self, p: P2) -> P2 {
        let (s, c) = self.yaw.sin_cos();
        let (dx, dy) = (p[0] - self.x, p[1] - self.y);
        [c * dx + s * dy, -s * dx + c * dy]
    }

    /// An ego-frame lidar point (x, y, z) in the map frame.
    pub fn to_map3(&self, p: [f32; 3]) -> [f32; 3] {
        let [x, y] = self.to_map([p[0] as f64, p[1] as f64]);
        [x as f32, y as f32, (p[2] as f64 + self.z) as f32]
    }

    pub fn is_finite(&self) -> bool {
        self.x.is_finite() && self.y.is_finite() && self.z.is_finite() && self.yaw.is_finite()
    }
}

/// `v.floor() as i64` without the call into libm the default x86-64 target makes for `floor`
/// (no SSE4.1): the mapping stage floors three coordinates of every lidar point, the review
/// images one of every pixel. Saturates like `as` for values out of range.
#[inline]
pub fn floor_i64(v: f64) -> i64 {
    let t = v as i64;
    if (t as f64) > v { t - 1 } else { t }
}

/// Four corners of a slot.
pub type Corners = [P2; 4];

/// A slot as a detector or a label gives it: corners and a confidence in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub corners: Corners,
    pub score: f64,
}

impl Slot {
    pub fn is_finite(&self) -> bool {
        self.score.is_finite() && self.corners.iter().flatten().all(|v| v.is_finite())
    }

    /// The same slot in another frame.
    pub fn map_corners(&self, f: impl Fn(P2) -> P2) -> Slot {
        Slot {
            corners: self.corners.map(f),
            score: self.score,
        }
    }
}

pub fn dist(a: P2, b: P2) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

pub fn centre(c: &Corners) -> P2 {
    [
        c.iter().map(|p| p[0]).sum::<f64>() / 4.0,
        c.iter().map(|p| p[1]).sum::<f64>() / 4.0,
    ]
}

/// `c` rotated so that its corner `shift` comes first.
pub fn rotate(c: &Corners, shift: usize) -> Corners {
    std::array::from_fn(|i| c[(i + shift) % 4])
}

/// The distances between corresponding corners of `a` and `b` (no alignment).
pub fn corner_dists(a: &Corners, b: &Corners) -> [f64; 4] {
    std::array::from_fn(|i| dist(a[i], b[i]))
}

/// `c` the other way round, keeping its first corner first.
pub fn reverse(c: &Corners) -> Corners {
    [c[0], c[3], c[2], c[1]]
}

/// Aligns `c` to `reference`: the order of `c` (a cyclic shift, either way round) with the
/// smallest mean corner distance, and that distance.
pub fn align(reference: &Corners, c: &Corners) -> (Corners, f64) {
    let mut best = (*c, f64::INFINITY);
    for order in [*c, reverse(c)] {
        for shift in 0..4 {
            let r = rotate(&order, shift);
            let d = corner_dists(reference, &r).iter().sum::<f64>() / 4.0;
            if d < best.1 {
                best = (r, d);
            }
        }
    }
    best
}

/// Twice the signed area of the outline: positive when the corners go counter-clockwise.
pub fn signed_area2(c: &[P2]) -> f64 {
    (0..c.len())
        .map(|i| {
            let (a, b) = (c[i], c[(i + 1) % c.len()]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum()
}

/// The area of a slot's outline, m^2.
pub fn area(c: &Corners) -> f64 {
    signed_area2(c).abs() / 2.0
}

/// The area two slots share, m^2 (each taken as a convex outline: Sutherland-Hodgman clipping).
pub fn overlap_area(a: &Corners, b: &Corners) -> f64 {
    let ccw = |c: &Corners| {
        if signed_area2(c) < 0.0 {
            reverse(c)
        } else {
            *c
        }
    };
    let (a, b) = (ccw(a), ccw(b));
    let mut poly: Vec<P2> = a.to_vec();
    for i in 0..4 {
        let (p, q) = (b[i], b[(i + 1) % 4]);
        // Left of the edge p->q (inside, for a counter-clockwise outline).
        let side = |x: P2| (q[0] - p[0]) * (x[1] - p[1]) - (q[1] - p[1]) * (x[0] - p[0]);
        let input = std::mem::take(&mut poly);
        for j in 0..input.len() {
            let (cur, next) = (input[j], input[(j + 1) % input.len()]);
            let (sc, sn) = (side(cur), side(next));
            if sc >= 0.0 {
                poly.push(cur);
            }
            if (sc >= 0.0) != (sn >= 0.0) {
                let t = sc / (sc - sn);
                poly.push([
                    cur[0] + t * (next[0] - cur[0]),
                    cur[1] + t * (next[1] - cur[1]),
                ]);
            }
        }
        if poly.len() < 3 {
            return 0.0;
        }
    }
    signed_area2(&poly).abs() / 2.0
}

/// The slot's corners in canonical order: counter-clockwise, and starting with the entrance
/// corner on the left as seen from the aisle facing into the slot. The entrance is the edge that
/// faces the aisle, found from `seen_from`, the ego poses the slot was observed from (map frame):
/// each of the five poses closest to the slot votes. A pose stands on the aisle and heads along
/// it, so the point of the aisle in front of the slot is the foot of the slot's centre on the
/// line through the pose along its heading, and the pose votes for the edge whose outward normal
/// points most directly at that point. This holds where the car passed in front of the slot and
/// where it only saw it from down the aisle. With no pose, only the winding is fixed.
pub fn canonical_order(c: &Corners, seen_from: &[Pose]) -> Corners {
    const VOTERS: usize = 5;
    let c = if signed_area2(c) < 0.0 {
        reverse(c)
    } else {
        *c
    };
    if seen_from.is_empty() {
        return c;
    }
    let m = centre(&c);
    let mut near: Vec<&Pose> = seen_from.iter().collect();
    near.sort_by(|a, b| dist([a.x, a.y], m).total_cmp(&dist([b.x, b.y], m)));
    near.truncate(VOTERS);
    // Edge k's outward unit normal (right of a -> b on a counter-clockwise outline).
    let normal = |k: usize| {
        let (a, b) = (c[k], c[(k + 1) % 4]);
        let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
        let len = (dx * dx + dy * dy).sqrt().max(1e-9);
        [dy / len, -dx / len]
    };
    let mut votes = [0u32; 4];
    for pose in near {
        let (h, p) = ([pose.yaw.cos(), pose.yaw.sin()], [pose.x, pose.y]);
        let along = (m[0] - p[0]) * h[0] + (m[1] - p[1]) * h[1];
        let aisle = [p[0] + along * h[0], p[1] + along * h[1]];
        // A car standing in the slot's line of sight along its own heading: face the car.
        let towards = if dist(aisle, m) > 0.5 { aisle } else { p };
        let v = [towards[0] - m[0], towards[1] - m[1]];
        let edge = (0..4)
            .max_by(|&i, &j| {
                let (ni, nj) = (normal(i), normal(j));
                (ni[0] * v[0] + ni[1] * v[1]).total_cmp(&(nj[0] * v[0] + nj[1] * v[1]))
            })
            .unwrap_or(0);
        votes[edge] += 1;
    }
    // The first of the most voted edges: its first corner, counter-clockwise, is the entrance's
    // left one (the outline runs left to right along the entrance seen from outside).
    let entrance = (0..4)
        .max_by_key(|&i| (votes[i], std::cmp::Reverse(i)))
        .unwrap_or(0);
    rotate(&c, entrance)
}

/// Mean corner distance after alignment.
pub fn mean_corner_dist(a: &Corners, b: &Corners) -> f64 {
    align(a, b).1
}

/// Largest corner distance after alignment.
pub fn max_corner_dist(a: &Corners, b: &Corners) -> f64 {
    let (b, _) = align(a, b);
    corner_dists(a, &b).into_iter().fold(0.0, f64::max)
}

/// The mean of the two smallest corner distances after alignment: the AVM check's measure (an
/// AVM model sees the entrance corners near the car well and the far ones poorly).
pub fn two_closest_corners(a: &Corners, b: &Corners) -> f64 {
    let (b, _) = align(a, b);
    let mut d = corner_dists(a, &b);
    d.sort_by(f64::total_cmp);
    (d[0] + d[1]) / 2.0
}

/// Minimum-cost assignment of rows to columns by the Hungarian algorithm, keeping only pairs
/// whose cost is at most `gate`. Costs are compared in micrometres.
pub fn assign(
    rows: usize,
    cols: usize,
    cost: impl Fn(usize, usize) -> f64,
    gate: f64,
) -> Vec<(usize, usize, f64)> {
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    // Pairs beyond the gate get a cost no gated pair set can reach, so they are only chosen when
    // nothing else is left; they are then dropped.
    let big = ((gate * 1e6) as u64 + 1).saturating_mul((rows.max(cols) as u64) + 1);
    let mut costs = Vec::with_capacity(rows * cols);
    let mut raw = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let v = cost(r, c);
            raw.push(v);
            costs.push(if v.is_finite() && v <= gate {
                (v * 1e6) as u64
            } else {
                big
            });
        }
    }
    // The crate wants at least as many columns as rows.
    let (h, w, transposed) = if rows <= cols {
        (rows, cols, false)
    } else {
        (cols, rows, true)
    };
    let matrix: Vec<u64> = if transposed {
        (0..h)
            .flat_map(|c| (0..w).map(move |r| (r, c)))
            .map(|(r, c)| costs[r * cols + c])
            .collect()
    } else {
        costs
    };
    let result = hungarian::minimize(&matrix, h, w);
    let mut pairs = Vec::new();
    for (i, j) in result.into_iter().enumerate() {
        let Some(j) = j else { continue };
        let (r, c) = if transposed { (j, i) } else { (i, j) };
        let v = raw[r * cols + c];
        if v.is_finite() && v <= gate {
            pairs.push((r, c, v));
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_i64_is_floor() {
        for v in [
            -2.5,
            -2.0,
            -1e-9,
            -0.0,
            0.0,
            1e-9,
            0.999,
            1.0,
            7.5,
            123456.789,
            -123456.789,
        ] {
            assert_eq!(floor_i64(v), v.floor() as i64, "{v}");
        }
    }

    fn sq(x: f64, y: f64) -> Corners {
        [[x, y], [x + 2.5, y], [x + 2.5, y + 5.0], [x, y + 5.0]]
    }

    #[test]
    fn poses_round_trip() {
        let pose = Pose {
            x: 3.0,
            y: -2.0,
            z: 0.5,
            yaw: 0.7,
        };
        let p = [1.25, -4.0];
        let back = pose.to_ego(pose.to_map(p));
        assert!(dist(p, back) < 1e-12);
        let ahead = Pose {
            x: 0.0,
            y: 0.0,
            z: 0.0,
            yaw: std::f64::consts::FRAC_PI_2,
        }
        .to_map([1.0, 0.0]);
        assert!(
            dist(ahead, [0.0, 1.0]) < 1e-12,
            "x ahead of a car facing +y is +y"
        );
    }

    #[test]
    fn alignment_undoes_a_corner_shift() {
        let a = sq(0.0, 0.0);
        let b = rotate(&a, 2);
        assert!(corner_dists(&a, &b).iter().any(|d| *d > 1.0));
        assert!(mean_corner_dist(&a, &b) < 1e-12);
        let mut c = a;
        c[3][0] += 0.3;
        c[2][1] -= 0.1;
        assert!((max_corner_dist(&a, &c) - 0.3).abs() < 1e-12);
        assert!(two_closest_corners(&a, &c) < 1e-12);
    }

    #[test]
    fn alignment_undoes_a_reversed_winding_too() {
        let a = sq(0.0, 0.0);
        let b = reverse(&rotate(&a, 1));
        assert!(mean_corner_dist(&a, &b) < 1e-12);
        assert_eq!(align(&a, &b).0, a);
    }

    #[test]
    fn overlap_is_the_shared_area_whatever_the_winding() {
        let a = sq(0.0, 0.0);
        assert!((area(&a) - 12.5).abs() < 1e-12);
        assert!((overlap_area(&a, &a) - 12.5).abs() < 1e-9);
        // Shifted 1.2 m sideways: 1.3 m x 5 m shared, either way round.
        let b = reverse(&sq(1.2, 0.0));
        assert!((overlap_area(&a, &b) - 6.5).abs() < 1e-9);
        assert!((overlap_area(&b, &a) - 6.5).abs() < 1e-9);
        // Neighbours share an edge, no area; a slot far away shares nothing.
        assert!(overlap_area(&a, &sq(2.5, 0.0)).abs() < 1e-9);
        assert_eq!(overlap_area(&a, &sq(20.0, 0.0)), 0.0);
        // A slot rotated 45 degrees about its centre.
        let (s, c) = std::f64::consts::FRAC_PI_4.sin_cos();
        let m = centre(&a);
        let r = a.map(|p| {
            let (x, y) = (p[0] - m[0], p[1] - m[1]);
            [m[0] + c * x - s * y, m[1] + s * x + c * y]
        });
        let shared = overlap_area(&a, &r);
        assert!(shared > 5.0 && shared < 12.5, "{shared}");
    }

    #[test]
    fn the_canonical_order_starts_at_the_entrance_left_corner_seen_from_the_aisle() {
        // Slots on both sides of an aisle along x (y = 0): left ones open towards -y, right
        // ones towards +y. The car drives along the aisle.
        let drive: Vec<Pose> = (0..100)
            .map(|i| Pose {
                x: -10.0 + 0.3 * i as f64,
                ..Default::default()
            })
            .collect();
        let left = [[0.0, 3.5], [2.5, 3.5], [2.5, 8.8], [0.0, 8.8]];
        let right = [[2.5, -3.5], [0.0, -3.5], [0.0, -8.8], [2.5, -8.8]];
        for truth in [left, right] {
            for shift in 0..4 {
                for detected in [rotate(&truth, shift), reverse(&rotate(&truth, shift))] {
                    let c = canonical_order(&detected, &drive);
                    assert_eq!(c, truth, "from {detected:?}");
                }
            }
        }
        // A parallel slot: its long side is on the aisle.
        let parallel = [[6.0, -3.0], [0.0, -3.0], [0.0, -5.5], [6.0, -5.5]];
        assert!(signed_area2(&parallel) > 0.0);
        for shift in 0..4 {
            assert_eq!(canonical_order(&rotate(&parallel, shift), &drive), parallel);
        }
        // Seen only from far down the aisle (the car stopped 15 m before it), still the aisle side.
        let far: Vec<Pose> = (0..20)
            .map(|i| Pose {
                x: -25.0 + 0.3 * i as f64,
                ..Default::default()
            })
            .collect();
        assert_eq!(canonical_order(&rotate(&left, 1), &far), left);
        assert_eq!(canonical_order(&reverse(&right), &far), right);
        // Without positions, only the winding is fixed.
        assert!(signed_area2(&canonical_order(&reverse(&left), &[])) > 0.0);
    }

    #[test]
    fn assignment_is_optimal_and_gated() {
        let rows = [sq(0.0, 0.0), sq(3.0, 0.0), sq(30.0, 0.0)];
        let cols = [sq(3.1, 0.0), sq(0.1, 0.0)];
        let pairs = assign(3, 2, |r, c| mean_corner_dist(&rows[r], &cols[c]), 1.0);
        let mut got: Vec<_> = pairs.iter().map(|p| (p.0, p.1)).collect();
        got.sort();
        assert_eq!(got, [(0, 1), (1, 0)]);
        // Everything beyond the gate: no pairs at all.
        assert!(assign(1, 1, |_, _| 5.0, 1.0).is_empty());
        assert!(assign(0, 4, |_, _| 0.0, 1.0).is_empty());
    }
}
