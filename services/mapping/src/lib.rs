//! The mapping stage: a clip's lidar frames, placed by their ego poses, accumulated into one local
//! map (the clip's map frame), voxel-downsampled, and rendered as the BEV base-map raster (height
//! and intensity) that the prelabel model, the annotate pictures and people labeling by hand all
//! work on.
//!
//! Output (`<store>/<clip>/mapping/v1-<key>/`):
//! - `map.bin`: the downsampled map, one point per occupied voxel (centroid, mean intensity), in
//!   the clip's points layout (little-endian f32 x, y, z, intensity), map frame;
//! - `bev.json`, `bev_height.png`, `bev_intensity.png`: the raster
//!   ([`motorpool_labeling::raster`]);
//! - `poses.json`: where scan-to-map registration ([`register`]) placed each frame, beside the
//!   clip's own pose ([`motorpool_labeling::poses`]); the map is built with these poses, and
//!   prelabel and annotate use them too. With `register` off, the clip's poses as they are;
//! - `mapping.json`: counts (frames, points in, voxels out, frames registered, odometry jumps,
//!   corrections) and the map's extent.

pub mod register;

use motorpool_config::LabelConfig;
use motorpool_labeling::clip::{Clip, write_points};
use motorpool_labeling::geom::floor_i64;
use motorpool_labeling::poses::{FramePose, POSES_FORMAT, RefinedPoses};
use motorpool_labeling::raster::Raster;
use motorpool_labeling::store::InputHash;
use motorpool_labeling::{LabelError, Progress, StageWork};
use motorpool_messages::label::{LabelJob, Stage};
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// The mapping stage's work.
#[derive(Debug, Default)]
pub struct Mapping;

/// What `mapping.json` says.
#[derive(Debug, Serialize)]
pub struct MappingStats {
    pub frames: usize,
    pub points_in: u64,
    pub voxels: usize,
    pub voxel_m: f64,
    pub raster_m: f64,
    pub raster_width: u32,
    pub raster_height: u32,
    /// Whether the frames were placed by registration (`register`).
    pub register: bool,
    /// Frames registration placed (the rest keep their predicted pose).
    pub registered: usize,
    /// The first frames, which started the map (placed by the odometry's steps).
    pub anchors: usize,
    /// Frames whose odometry step jumped (a pose glitch starting or ending).
    pub odometry_jumps: usize,
    /// How far registration moved frames from the clip's poses: median and largest, metres.
    pub correction_median_m: f64,
    pub correction_max_m: f64,
    /// Median point-to-line residual of the registered frames, metres.
    pub residual_median_m: f64,
}

impl StageWork for Mapping {
    const STAGE: Stage = Stage::Mapping;
    /// 2: frames placed by scan-to-map registration, `poses.json`.
    const VERSION: u32 = 2;

    fn input_key(&self, job: &LabelJob) -> Result<String, LabelError> {
        let dir = Path::new(&job.clip_dir);
        let clip = Clip::open(dir)?;
        let mut h = InputHash::new(Stage::Mapping, Self::VERSION);
        h.value("voxel_m", &job.params.voxel_m)
            .value("raster_m", &job.params.raster_m)
            .value("register", &job.params.register);
        h.file(dir, "clip.json")
            .map_err(|e| LabelError::io("hash clip.json", e))?;
        for f in clip.frames() {
            h.file(dir, &f.points)
                .map_err(|e| clip.frame_error(f.index, format!("points file {}: {e}", f.points)))?;
        }
        Ok(h.finish())
    }

    fn run(
        &self,
        job: &LabelJob,
        out: &Path,
        _dir: &Path,
        progress: &Progress,
    ) -> Result<(), LabelError> {
        let p = &job.params;
        if !(p.voxel_m > 0.0 && p.raster_m > 0.0) {
            return Err(LabelError::Input(format!(
                "voxel_m ({}) and raster_m ({}) must be positive",
                p.voxel_m, p.raster_m
            )));
        }
        let clip = Clip::open(Path::new(&job.clip_dir))?;
        let built = build_map(&clip, p.voxel_m, p.register, progress)?;
        let map = &built.map;
        write_points(&out.join("map.bin"), map).map_err(|e| LabelError::io("write map.bin", e))?;
        built
            .poses
            .write(out)
            .map_err(|e| LabelError::io("write poses.json", e))?;
        let raster = Raster::from_points(map, p.raster_m);
        raster
            .write(out)
            .map_err(|e| LabelError::Input(format!("clip {}: {e}", clip.id())))?;
        let frames = &built.poses.frames;
        let registered: Vec<&FramePose> = frames.iter().filter(|f| f.registered).collect();
        let mut corrections: Vec<f64> = frames.iter().map(FramePose::correction_m).collect();
        let mut residuals: Vec<f64> = registered.iter().map(|f| f.rms_m).collect();
        let stats = MappingStats {
            frames: clip.frames().len(),
            points_in: built.points_in,
            voxels: map.len(),
            voxel_m: p.voxel_m,
            raster_m: p.raster_m,
            raster_width: raster.meta.width,
            raster_height: raster.meta.height,
            register: p.register,
            registered: registered.len(),
            anchors: frames.iter().filter(|f| f.anchor).count(),
            odometry_jumps: frames.iter().filter(|f| f.odometry_jump).count(),
            correction_median_m: median(&mut corrections),
            correction_max_m: corrections.iter().copied().fold(0.0, f64::max),
            residual_median_m: median(&mut residuals),
        };
        std::fs::write(
            out.join("mapping.json"),
            serde_json::to_vec_pretty(&stats).unwrap_or_default(),
        )
        .map_err(|e| LabelError::io("write mapping.json", e))
    }
}

/// The median of `v` (0 when empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// What [`build_map`] makes of a clip.
#[derive(Debug)]
pub struct BuiltMap {
    /// One point per occupied voxel, map frame.
    pub map: Vec<[f32; 4]>,
    /// Points read.
    pub points_in: u64,
    /// Every frame's pose: refined by registration, or the clip's (`poses.json`).
    pub poses: RefinedPoses,
}

/// Places every frame (by scan-to-map registration when `register`, else by the clip's poses),
/// accumulates its points into the map frame and keeps one point per voxel: the centroid of the
/// voxel's points with their mean intensity. Each frame is read once.
pub fn build_map(
    clip: &Clip,
    voxel_m: f64,
    register: bool,
    progress: &Progress,
) -> Result<BuiltMap, LabelError> {
    #[derive(Default, Clone, Copy)]
    struct Acc {
        sum: [f64; 4],
        n: u32,
    }
    let inv = 1.0 / voxel_m;
    let mut voxels: FxHashMap<(i32, i32, i32), Acc> = FxHashMap::default();
    let mut points_in = 0u64;
    let mut registration = register::Registration::new();
    let mut poses = Vec::with_capacity(clip.frames().len());
    progress.set_total(clip.frames().len() as u64);
    let (mut buf, mut pts) = (Vec::new(), Vec::new());
    for f in clip.frames() {
        clip.points_into(f.index, &mut buf, &mut pts)?;
        points_in += pts.len() as u64;
        let placed = if register {
            registration.add(f.index, f.t_us, f.pose, &pts)
        } else {
            FramePose::as_given(f)
        };
        let pose = placed.pose;
        poses.push(placed);
        for p in &pts {
            let m = pose.to_map3([p[0], p[1], p[2]]);
            let key = (
                floor_i64(m[0] as f64 * inv) as i32,
                floor_i64(m[1] as f64 * inv) as i32,
                floor_i64(m[2] as f64 * inv) as i32,
            );
            let a = voxels.entry(key).or_default();
            a.sum[0] += m[0] as f64;
            a.sum[1] += m[1] as f64;
            a.sum[2] += m[2] as f64;
            a.sum[3] += p[3] as f64;
            a.n += 1;
        }
        progress.advance(1);
    }
    let mut cells: Vec<((i32, i32, i32), Acc)> = voxels.into_iter().collect();
    // A deterministic order, so the same clip gives the same bytes.
    cells.sort_unstable_by_key(|c| c.0);
    let map = cells
        .iter()
        .map(|(_, a)| {
            let n = a.n as f64;
            [
                (a.sum[0] / n) as f32,
                (a.sum[1] / n) as f32,
                (a.sum[2] / n) as f32,
                (a.sum[3] / n) as f32,
            ]
        })
        .collect();
    Ok(BuiltMap {
        map,
        points_in,
        poses: RefinedPoses {
            format: POSES_FORMAT.into(),
            clip_id: clip.id().to_string(),
            registered: register,
            frames: poses,
        },
    })
}

/// `motorpool mapping`: serves the mapping stage until `shutdown`.
pub async fn run(config: LabelConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    Ok(motorpool_labeling::run_service(Mapping, config, shutdown).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_labeling::synth::{SynthOptions, generate};

    #[test]
    fn the_map_is_downsampled_and_lines_are_bright_in_the_raster() {
        let dir = tempfile::tempdir().unwrap();
        let synth = generate(&SynthOptions {
            frames: 30,
            points: 3000,
            ..Default::default()
        });
        synth.write(dir.path()).unwrap();
        let clip = Clip::open(dir.path()).unwrap();
        let BuiltMap { map, points_in, .. } =
            build_map(&clip, 0.1, false, &Progress::default()).unwrap();
        assert_eq!(
            points_in,
            synth.points.iter().map(|p| p.len() as u64).sum::<u64>()
        );
        assert!(
            map.len() < points_in as usize,
            "{} voxels of {points_in} points",
            map.len()
        );
        let coarse = build_map(&clip, 1.0, false, &Progress::default())
            .unwrap()
            .map;
        assert!(
            coarse.len() < points_in as usize / 10,
            "{} 1 m voxels",
            coarse.len()
        );
        let r = Raster::from_points(&map, 0.1);
        // The far painted line of a slot is bright, the middle of the aisle is not.
        let slot = synth.truth.slots[2].corners;
        let line = [
            (slot[2][0] + slot[3][0]) / 2.0,
            (slot[2][1] + slot[3][1]) / 2.0,
        ];
        let bright = (-1..=1)
            .flat_map(|dx| (-1..=1).map(move |dy| (dx, dy)))
            .map(|(dx, dy)| r.intensity_at([line[0] + dx as f64 * 0.1, line[1] + dy as f64 * 0.1]))
            .fold(0f32, f32::max);
        assert!(bright > 0.6, "line intensity {bright}");
        assert!(r.intensity_at([3.0, 0.0]) < 0.3);
    }
}
