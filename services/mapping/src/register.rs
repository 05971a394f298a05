//! Scan-to-map registration: each frame's painted-line lidar points are matched to the map built
//! from the frames before it, so frames are placed by what the lidar saw rather than by the
//! clip's odometry, which drifts and now and then jumps (ADR 0019).
//!
//! Parking lots are flat and clips carry planar poses, so registration is planar: x, y and
//! heading. What it matches is paint: bright returns on the ground (`PAINT_MIN_INTENSITY`,
//! within `PAINT_MAX_Z_M` of it), downsampled to one point per `SOURCE_CELL_M` cell. The map is a
//! hash grid of `MAP_CELL_M` cells, each holding the running moments of the paint points placed
//! in it; a cell whose points lie along a line (a painted edge) is that line. A frame is placed
//! by Gauss-Newton on point-to-line distances from its points to the nearest line cell, with a
//! Geman-McClure kernel (robust to paint the map has not seen yet) and a weak prior on the
//! prediction (a stretch of parallel lines fixes the pose across them, not along them).
//!
//! The prediction is the previous refined pose moved by the odometry's step, as long as that
//! step agrees with the motion so far (within `JUMP_M` and `JUMP_RAD` of a constant-velocity
//! step). A step that does not is a pose glitch starting or ending: it is recorded
//! (`odometry_jump`) and the constant-velocity step is used instead; registration then corrects
//! what remains. A frame with too little paint matched (`MIN_MATCHED`) keeps its prediction and
//! is recorded as not registered. The first frames, until the map holds `ANCHOR_LINE_CELLS` line
//! cells, anchor the map: placed by the prediction and recorded as anchors.
//!
//! KISS-ICP (Vizzo et al., 2023) is the model: constant-velocity prediction, a voxel hash map,
//! a robust kernel, point-to-point in 3D. Here the motion is planar and the features are lines on
//! the ground, so the residual is point-to-line and the prediction uses the odometry when it is
//! sane.

use motorpool_labeling::geom::{Pose, floor_i64};
use motorpool_labeling::poses::FramePose;
use rustc_hash::FxHashMap;

/// A ground return at least this bright is paint.
pub const PAINT_MIN_INTENSITY: f32 = 0.6;
/// Paint lies within this of the ground (the clip's z = 0), metres.
pub const PAINT_MAX_Z_M: f32 = 0.25;
/// One source point per cell of this size, ego frame, metres.
pub const SOURCE_CELL_M: f64 = 0.2;
/// Map cell, metres.
pub const MAP_CELL_M: f64 = 0.4;
/// A map cell stops taking points after this many (the first frames that saw it anchor it).
pub const MAP_CELL_CAP: u32 = 64;
/// Matched points a frame needs to be placed by registration.
pub const MIN_MATCHED: u32 = 40;
/// Until the map has this many line cells, frames are not registered but anchor it: placed by
/// the odometry's steps (jumps still caught), as the first frame is.
pub const ANCHOR_LINE_CELLS: usize = 50;
/// An odometry step this far (metres) or this much turn (radians) from the constant-velocity
/// step is a jump.
pub const JUMP_M: f64 = 0.25;
pub const JUMP_RAD: f64 = 0.03;
/// Correspondence gate: a point further than this from every line is not matched, metres.
const GATE_M: f64 = 0.5;
const ITERATIONS: usize = 20;
/// Prior weight on staying at the prediction (per m² and rad²), against one matched point's
/// weight of about 1 / kernel².
const PRIOR: f64 = 10.0;

/// The moments of the paint points in one map cell, and the line they make.
#[derive(Clone, Copy, Debug, Default)]
struct Cell {
    n: u32,
    sum: [f64; 2],
    /// Sums of xx, xy, yy about the cell's lower corner (kept small for precision).
    sq: [f64; 3],
    origin: [f64; 2],
    /// The fitted line: a point on it and its unit normal; `None` until the points are enough
    /// and lie along a line.
    line: Option<([f64; 2], [f64; 2])>,
}

impl Cell {
    fn add(&mut self, p: [f64; 2]) {
        let (x, y) = (p[0] - self.origin[0], p[1] - self.origin[1]);
        self.n += 1;
        self.sum[0] += x;
        self.sum[1] += y;
        self.sq[0] += x * x;
        self.sq[1] += x * y;
        self.sq[2] += y * y;
    }

    /// Fits the line through the cell's points: the normal is the covariance's minor axis; a
    /// cell whose points are not clearly elongated (a corner, a blob) has no line.
    fn fit(&mut self) {
        self.line = None;
        if self.n < 4 {
            return;
        }
        let n = self.n as f64;
        let m = [self.sum[0] / n, self.sum[1] / n];
        let cxx = self.sq[0] / n - m[0] * m[0];
        let cxy = self.sq[1] / n - m[0] * m[1];
        let cyy = self.sq[2] / n - m[1] * m[1];
        let tr = cxx + cyy;
        let det = cxx * cyy - cxy * cxy;
        let disc = (tr * tr / 4.0 - det).max(0.0).sqrt();
        let (major, minor) = (tr / 2.0 + disc, tr / 2.0 - disc);
        if major <= 0.0 || minor > 0.15 * major {
            return;
        }
        // Eigenvector of the minor eigenvalue.
        let v = if cxy.abs() > 1e-12 {
            [cxy, minor - cxx]
        } else if cxx < cyy {
            [1.0, 0.0]
        } else {
            [0.0, 1.0]
        };
        let len = v[0].hypot(v[1]);
        self.line = Some((
            [m[0] + self.origin[0], m[1] + self.origin[1]],
            [v[0] / len, v[1] / len],
        ));
    }
}

fn cell_of(p: [f64; 2], size: f64) -> (i32, i32) {
    (floor_i64(p[0] / size) as i32, floor_i64(p[1] / size) as i32)
}

/// The painted-line points of one frame's lidar returns, ego frame, one per `SOURCE_CELL_M`
/// cell (their centroid).
pub fn paint_points(points: &[[f32; 4]]) -> Vec<[f64; 2]> {
    let mut cells: FxHashMap<(i32, i32), ([f64; 2], u32)> = FxHashMap::default();
    for p in points {
        if p[3] >= PAINT_MIN_INTENSITY && p[2].abs() <= PAINT_MAX_Z_M {
            let q = [p[0] as f64, p[1] as f64];
            let c = cells.entry(cell_of(q, SOURCE_CELL_M)).or_default();
            c.0[0] += q[0];
            c.0[1] += q[1];
            c.1 += 1;
        }
    }
    let mut out: Vec<_> = cells
        .into_iter()
        .map(|(k, (s, n))| (k, [s[0] / n as f64, s[1] / n as f64]))
        .collect();
    // A deterministic order: the same clip gives the same poses.
    out.sort_unstable_by_key(|(k, _)| *k);
    out.into_iter().map(|(_, p)| p).collect()
}

/// `b` as seen from `a`: the step from pose `a` to pose `b`.
fn between(a: &Pose, b: &Pose) -> Pose {
    let [x, y] = a.to_ego([b.x, b.y]);
    Pose {
        x,
        y,
        z: b.z - a.z,
        yaw: wrap(b.yaw - a.yaw),
    }
}

/// Pose `a` moved by step `d` (in `a`'s frame).
fn compose(a: &Pose, d: &Pose) -> Pose {
    let [x, y] = a.to_map([d.x, d.y]);
    Pose {
        x,
        y,
        z: a.z + d.z,
        yaw: wrap(a.yaw + d.yaw),
    }
}

fn wrap(a: f64) -> f64 {
    let t = std::f64::consts::TAU;
    (a + std::f64::consts::PI).rem_euclid(t) - std::f64::consts::PI
}

/// Registration of a clip's frames, one after another.
#[derive(Debug, Default)]
pub struct Registration {
    map: FxHashMap<(i32, i32), Cell>,
    /// Cells of `map` with a line.
    lines: usize,
    frames: Vec<FramePose>,
    /// Each frame's capture time, microseconds.
    times: Vec<u64>,
}

impl Registration {
    pub fn new() -> Registration {
        Registration::default()
    }

    /// Places the next frame, given its capture time, its odometry pose and its lidar returns
    /// (ego frame), and adds its paint to the map. Frames must come in order of time.
    pub fn add(&mut self, index: u32, t_us: u64, odometry: Pose, points: &[[f32; 4]]) -> FramePose {
        let paint = paint_points(points);
        let n = self.frames.len();
        let (prediction, jump) = match n {
            0 => (odometry, false),
            _ => {
                let last = &self.frames[n - 1];
                let step = between(&last.odometry, &odometry);
                let steady = match n {
                    1 => step,
                    // The last step, stretched to this frame's interval (a frame may be missing).
                    _ => {
                        let s = between(&self.frames[n - 2].pose, &last.pose);
                        let k = t_us.saturating_sub(self.times[n - 1]) as f64
                            / self.times[n - 1].saturating_sub(self.times[n - 2]).max(1) as f64;
                        Pose {
                            x: s.x * k,
                            y: s.y * k,
                            z: s.z * k,
                            yaw: s.yaw * k,
                        }
                    }
                };
                let jump = (step.x - steady.x).hypot(step.y - steady.y) > JUMP_M
                    || wrap(step.yaw - steady.yaw).abs() > JUMP_RAD;
                (
                    compose(&last.pose, if jump { &steady } else { &step }),
                    jump,
                )
            }
        };
        // The first frames anchor the map: they are where the odometry puts them, by definition.
        let anchoring = self.lines < ANCHOR_LINE_CELLS;
        let (pose, matched, rms_m) = if anchoring {
            (prediction, 0, 0.0)
        } else {
            self.align(&paint, prediction)
        };
        let registered = !anchoring && matched >= MIN_MATCHED;
        let frame = FramePose {
            index,
            pose: if registered { pose } else { prediction },
            odometry,
            matched,
            rms_m,
            odometry_jump: jump,
            registered,
            anchor: anchoring,
        };
        // A frame registration could not place still adds its paint where it was predicted
        // (as KISS-ICP does): the map must grow through a stretch with little paint.
        self.insert(&paint, &frame.pose);
        self.frames.push(frame);
        self.times.push(t_us);
        frame
    }

    /// Every frame placed so far.
    pub fn frames(&self) -> &[FramePose] {
        &self.frames
    }

    pub fn into_frames(self) -> Vec<FramePose> {
        self.frames
    }

    fn insert(&mut self, paint: &[[f64; 2]], pose: &Pose) {
        let mut touched = Vec::new();
        for p in paint {
            let w = pose.to_map(*p);
            let key = cell_of(w, MAP_CELL_M);
            let cell = self.map.entry(key).or_insert_with(|| Cell {
                origin: [key.0 as f64 * MAP_CELL_M, key.1 as f64 * MAP_CELL_M],
                ..Cell::default()
            });
            if cell.n < MAP_CELL_CAP {
                cell.add(w);
                touched.push(key);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for key in touched {
            if let Some(c) = self.map.get_mut(&key) {
                let had = c.line.is_some();
                c.fit();
                match (had, c.line.is_some()) {
                    (false, true) => self.lines += 1,
                    (true, false) => self.lines -= 1,
                    _ => {}
                }
            }
        }
    }

    /// The line nearest `w` among the cells around it: (signed distance, normal).
    fn nearest_line(&self, w: [f64; 2]) -> Option<(f64, [f64; 2])> {
        let (cx, cy) = cell_of(w, MAP_CELL_M);
        let mut best: Option<(f64, [f64; 2])> = None;
        for dx in -1..=1 {
            for dy in -1..=1 {
                let Some(Cell {
                    line: Some((m, nrm)),
                    ..
                }) = self.map.get(&(cx + dx, cy + dy))
                else {
                    continue;
                };
                let d = [w[0] - m[0], w[1] - m[1]];
                let r = nrm[0] * d[0] + nrm[1] * d[1];
                // Along the line, stay near the cell the line was fitted in.
                let along = (-nrm[1] * d[0] + nrm[0] * d[1]).abs();
                if along > MAP_CELL_M || r.abs() > GATE_M {
                    continue;
                }
                if best.is_none_or(|b| r.abs() < b.0.abs()) {
                    best = Some((r, *nrm));
                }
            }
        }
        best
    }

    /// Gauss-Newton on the point-to-line distances from `prediction`: (pose, matched, rms).
    fn align(&self, paint: &[[f64; 2]], prediction: Pose) -> (Pose, u32, f64) {
        let mut pose = prediction;
        let (mut matched, mut rms) = (0u32, 0.0);
        for iteration in 0..ITERATIONS {
            // The kernel narrows as the pose settles.
            let kernel = if iteration < 3 { 0.2 } else { 0.08 };
            let k2 = kernel * kernel;
            let (s, c) = pose.yaw.sin_cos();
            let mut h = [[0.0f64; 3]; 3];
            let mut g = [0.0f64; 3];
            let (mut n, mut sse) = (0u32, 0.0);
            for p in paint {
                let w = [pose.x + c * p[0] - s * p[1], pose.y + s * p[0] + c * p[1]];
                let Some((r, nrm)) = self.nearest_line(w) else {
                    continue;
                };
                // Turning about the car's position.
                let j = [
                    nrm[0],
                    nrm[1],
                    nrm[0] * -(w[1] - pose.y) + nrm[1] * (w[0] - pose.x),
                ];
                let wt = k2 / (k2 + r * r).powi(2) * k2;
                for a in 0..3 {
                    g[a] += wt * j[a] * r;
                    for b in 0..3 {
                        h[a][b] += wt * j[a] * j[b];
                    }
                }
                n += 1;
                sse += r * r;
            }
            matched = n;
            rms = if n > 0 { (sse / n as f64).sqrt() } else { 0.0 };
            if n < MIN_MATCHED {
                return (prediction, n, rms);
            }
            // The prior pulls toward the prediction: g gains PRIOR * (pose - prediction).
            let off = [
                pose.x - prediction.x,
                pose.y - prediction.y,
                wrap(pose.yaw - prediction.yaw),
            ];
            for a in 0..3 {
                h[a][a] += PRIOR;
                g[a] += PRIOR * off[a];
            }
            let Some(delta) = solve3(&h, &[-g[0], -g[1], -g[2]]) else {
                return (prediction, 0, rms);
            };
            pose.x += delta[0];
            pose.y += delta[1];
            pose.yaw = wrap(pose.yaw + delta[2]);
            if delta[0].hypot(delta[1]) < 1e-4 && delta[2].abs() < 1e-5 {
                break;
            }
        }
        (pose, matched, rms)
    }
}

/// Solves a 3x3 system by Cramer's rule; `None` when singular.
fn solve3(a: &[[f64; 3]; 3], b: &[f64; 3]) -> Option<[f64; 3]> {
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(a);
    if d.abs() < 1e-12 {
        return None;
    }
    let mut x = [0.0; 3];
    for (k, xk) in x.iter_mut().enumerate() {
        let mut m = *a;
        for r in 0..3 {
            m[r][k] = b[r];
        }
        *xk = det(&m) / d;
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_labeling::synth::{Hardships, SynthOptions, generate};

    fn error(a: &Pose, b: &Pose) -> f64 {
        (a.x - b.x).hypot(a.y - b.y)
    }

    #[test]
    fn registration_undoes_drift_and_glitches_that_odometry_has() {
        let synth = generate(&SynthOptions {
            seed: 3,
            points: 6000,
            hard: Hardships::all(),
            ..Default::default()
        });
        let mut reg = Registration::new();
        for (f, pts) in synth.manifest.frames.iter().zip(&synth.points) {
            reg.add(f.index, f.t_us, f.pose, pts);
        }
        let frames = reg.into_frames();
        let truth = &synth.truth.poses;
        // The refined trajectory keeps its first pose, and every pose is near the truth
        // (which differs from the first clip pose by a step of drift at most).
        let odo: Vec<f64> = frames
            .iter()
            .zip(truth)
            .map(|(f, t)| error(&f.odometry, t))
            .collect();
        let refined: Vec<f64> = frames
            .iter()
            .zip(truth)
            .map(|(f, t)| error(&f.pose, t))
            .collect();
        let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        assert!(
            worst(&odo) > 0.6,
            "odometry off by {} at worst",
            worst(&odo)
        );
        assert!(
            worst(&refined) < 0.15,
            "refined off by {} at worst (odometry {})",
            worst(&refined),
            worst(&odo)
        );
        // The glitches' edges are seen as jumps, and every frame after the first few anchoring
        // the map is placed by registration.
        let jumps = frames.iter().filter(|f| f.odometry_jump).count();
        assert!((4..=8).contains(&jumps), "{jumps} jumps");
        let anchors = frames.iter().take_while(|f| f.anchor).count();
        assert!((1..=5).contains(&anchors), "{anchors} anchoring frames");
        assert!(frames[anchors..].iter().all(|f| f.registered && !f.anchor));
    }

    #[test]
    fn a_sparse_lidar_still_builds_a_map_and_places_every_frame_after_the_anchors() {
        // 2,500 returns a frame: one frame's paint fits almost no line of the map.
        let synth = generate(&SynthOptions {
            seed: 7,
            frames: 60,
            points: 2500,
            ..Default::default()
        });
        let mut reg = Registration::new();
        for (f, pts) in synth.manifest.frames.iter().zip(&synth.points) {
            reg.add(f.index, f.t_us, f.pose, pts);
        }
        let f = reg.frames();
        let anchors = f.iter().take_while(|f| f.anchor).count();
        assert!((2..=6).contains(&anchors), "{anchors} anchors");
        let placed = f.iter().filter(|f| f.registered).count();
        assert_eq!(
            placed,
            60 - anchors,
            "{:?}",
            f.iter().map(|f| f.matched).collect::<Vec<_>>()
        );
    }

    #[test]
    fn without_paint_frames_keep_the_odometry_but_not_its_jumps() {
        // Ground only: nothing bright.
        let pts: Vec<[f32; 4]> = (0..2000)
            .map(|i| {
                [
                    (i % 40) as f32 * 0.5 - 10.0,
                    (i / 40) as f32 * 0.4 - 10.0,
                    0.0,
                    0.1,
                ]
            })
            .collect();
        let mut reg = Registration::new();
        let mut odometry: Vec<Pose> = (0..20)
            .map(|i| Pose {
                x: 0.5 * i as f64,
                ..Pose::default()
            })
            .collect();
        // A one-frame glitch of a metre sideways at frame 10.
        odometry[10].y += 1.0;
        // Frame 15 is missing: the step into 16 is twice as long, and no jump.
        for (i, o) in odometry.iter().enumerate().filter(|(i, _)| *i != 15) {
            reg.add(i as u32, i as u64 * 100_000, *o, &pts);
        }
        let f = reg.frames();
        // No paint, no map: every frame stays an anchor, placed by the odometry.
        assert!(f.iter().all(|f| !f.registered && f.anchor));
        assert!(f[10].odometry_jump && f[11].odometry_jump);
        assert!(f.iter().filter(|f| f.odometry_jump).count() == 2);
        // The glitch is gone from the trajectory; the rest follows the odometry.
        assert!(f[10].pose.y.abs() < 1e-9, "{:?}", f[10].pose);
        assert!(
            (f.last().unwrap().pose.x - 9.5).abs() < 1e-9,
            "{:?}",
            f.last()
        );
    }
}
