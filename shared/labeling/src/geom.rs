//! Planar geometry of parking slots: poses, corner sets, distances and assignment.
//!
//! A slot is four corners in order around its outline, the first two on the entrance line.
//! Detectors do not always agree on which corner comes first, so every comparison aligns the
//! corner order first ([`align`]: the cyclic shift with the smallest mean distance).

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

/// Aligns `c` to `reference`: the cyclic shift of `c` with the smallest mean corner distance,
/// and that distance.
pub fn align(reference: &Corners, c: &Corners) -> (Corners, f64) {
    let mut best = (*c, f64::INFINITY);
    for shift in 0..4 {
        let r = rotate(c, shift);
        let d = corner_dists(reference, &r).iter().sum::<f64>() / 4.0;
        if d < best.1 {
            best = (r, d);
        }
    }
    best
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
