//! Label files reviewers load, over one ego-centred BEV image per kept frame.
//!
//! Images: `frames/NNNNNN.png`, 8-bit intensity of the BEV base map, `S = 2 * visible_m / res`
//! pixels square, the car in the centre facing up (ego x up, ego y left). An ego point (x, y) is
//! at pixel `u = S/2 - y / res`, `v = S/2 - x / res`.
//!
//! - `coco_keypoints.json`: COCO keypoints (CVAT's "COCO Keypoints 1.0" import): one image per
//!   kept frame, one `parking_slot` annotation per visible slot with its four corners as
//!   keypoints (entrance left, entrance right, far right, far left), polygon, bbox and the slot's
//!   fused id and score as attributes.
//! - `label_studio.json`: Label Studio tasks with predictions: one polygon per slot (points in
//!   percent of the image), with the slot's score and the frame's mean score.

use crate::FrameVerdict;
use motorpool_labeling::clip::Clip;
use motorpool_labeling::raster::{Raster, png_bytes};
use motorpool_labeling::{LabelError, Progress};
use serde_json::json;
use std::path::Path;

/// Model version written into Label Studio predictions.
pub const MODEL_VERSION: &str = "bevslots-fusion-v1";

fn image_size(visible_m: f64, res: f64) -> u32 {
    ((2.0 * visible_m / res).round() as u32).max(1)
}

fn to_pixel(p: [f64; 2], size: u32, res: f64) -> [f64; 2] {
    let half = size as f64 / 2.0;
    [half - p[1] / res, half - p[0] / res]
}

fn image_name(frame: u32) -> String {
    format!("frames/{frame:06}.png")
}

/// Renders the BEV image of every kept frame.
pub fn write_frames(
    clip: &Clip,
    raster: &Raster,
    verdicts: &[FrameVerdict],
    visible_m: f64,
    out: &Path,
    progress: &Progress,
) -> Result<(), LabelError> {
    let res = raster.meta.resolution_m;
    let size = image_size(visible_m, res);
    std::fs::create_dir_all(out.join("frames")).map_err(|e| LabelError::io("create frames/", e))?;
    let mut pixels = vec![0u8; (size * size) as usize];
    for v in verdicts {
        progress.advance(1);
        if v.dropped.is_some() {
            continue;
        }
        let pose = clip.frames()[v.frame as usize].pose;
        let half = size as f64 / 2.0;
        for r in 0..size {
            for c in 0..size {
                let ego = [(half - r as f64 - 0.5) * res, (half - c as f64 - 0.5) * res];
                let i = raster.intensity_at(pose.to_map(ego));
                pixels[(r * size + c) as usize] = (i * 255.0).round() as u8;
            }
        }
        let name = image_name(v.frame);
        std::fs::write(out.join(&name), png_bytes(size, size, &pixels))
            .map_err(|e| LabelError::io(format!("write {name}"), e))?;
    }
    Ok(())
}

/// Writes `coco_keypoints.json` and `label_studio.json` for the kept frames.
pub fn write_labels(
    clip: &Clip,
    verdicts: &[FrameVerdict],
    visible_m: f64,
    res: f64,
    out: &Path,
) -> Result<(), LabelError> {
    let size = image_size(visible_m, res);
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    let mut tasks = Vec::new();
    for v in verdicts.iter().filter(|v| v.dropped.is_none()) {
        let image_id = v.frame as u64 + 1;
        let file_name = image_name(v.frame);
        images.push(json!({
            "id": image_id,
            "file_name": file_name,
            "width": size,
            "height": size,
            "frame": v.frame,
            "clip_id": clip.id(),
        }));
        let mut results = Vec::new();
        for l in &v.labels {
            let px: Vec<[f64; 2]> = l.corners.iter().map(|p| to_pixel(*p, size, res)).collect();
            let (min_u, max_u) = px
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                    (a.min(p[0]), b.max(p[0]))
                });
            let (min_v, max_v) = px
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                    (a.min(p[1]), b.max(p[1]))
                });
            // A corner outside the image is labeled but not visible (COCO visibility 1).
            let keypoints: Vec<f64> = px
                .iter()
                .flat_map(|p| {
                    let inside =
                        (0.0..=size as f64).contains(&p[0]) && (0.0..=size as f64).contains(&p[1]);
                    [round2(p[0]), round2(p[1]), if inside { 2.0 } else { 1.0 }]
                })
                .collect();
            let area = polygon_area(&px);
            annotations.push(json!({
                "id": annotations.len() + 1,
                "image_id": image_id,
                "category_id": 1,
                "keypoints": keypoints,
                "num_keypoints": 4,
                "segmentation": [px.iter().flat_map(|p| [round2(p[0]), round2(p[1])]).collect::<Vec<_>>()],
                "bbox": [round2(min_u), round2(min_v), round2(max_u - min_u), round2(max_v - min_v)],
                "area": round2(area),
                "iscrowd": 0,
                "attributes": { "slot_id": l.slot, "score": round3(l.score) },
            }));
            results.push(json!({
                "id": format!("f{}-s{}", v.frame, l.slot),
                "from_name": "slot",
                "to_name": "image",
                "type": "polygonlabels",
                "original_width": size,
                "original_height": size,
                "image_rotation": 0,
                "score": round3(l.score),
                "value": {
                    "points": px.iter().map(|p| [round3(100.0 * p[0] / size as f64), round3(100.0 * p[1] / size as f64)]).collect::<Vec<_>>(),
                    "closed": true,
                    "polygonlabels": ["parking_slot"],
                },
            }));
        }
        let mean = if v.labels.is_empty() {
            0.0
        } else {
            v.labels.iter().map(|l| l.score).sum::<f64>() / v.labels.len() as f64
        };
        tasks.push(json!({
            "data": { "image": file_name, "clip_id": clip.id(), "frame": v.frame },
            "predictions": [{ "model_version": MODEL_VERSION, "score": round3(mean), "result": results }],
        }));
    }
    let coco = json!({
        "info": { "description": format!("Motorpool BevSlots labels of clip {}", clip.id()), "version": MODEL_VERSION },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{
            "id": 1,
            "name": "parking_slot",
            "supercategory": "parking",
            "keypoints": ["entrance_left", "entrance_right", "far_right", "far_left"],
            "skeleton": [[1, 2], [2, 3], [3, 4], [4, 1]],
        }],
    });
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(out.join(name), serde_json::to_vec(v).unwrap_or_default())
            .map_err(|e| LabelError::io(format!("write {name}"), e))
    };
    write("coco_keypoints.json", &coco)?;
    write("label_studio.json", &serde_json::Value::Array(tasks))
}

fn polygon_area(p: &[[f64; 2]]) -> f64 {
    let n = p.len();
    (0..n)
        .map(|i| p[i][0] * p[(i + 1) % n][1] - p[(i + 1) % n][0] * p[i][1])
        .sum::<f64>()
        .abs()
        / 2.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ego_points_land_where_the_picture_shows_them() {
        // 10 m visible at 0.1 m: 200 px, the car at (100, 100) facing up.
        assert_eq!(image_size(10.0, 0.1), 200);
        assert_eq!(to_pixel([0.0, 0.0], 200, 0.1), [100.0, 100.0]);
        let ahead = to_pixel([5.0, 0.0], 200, 0.1);
        assert!(
            (ahead[0] - 100.0).abs() < 1e-9 && (ahead[1] - 50.0).abs() < 1e-9,
            "ahead is up"
        );
        let left = to_pixel([0.0, 5.0], 200, 0.1);
        assert!(
            (left[0] - 50.0).abs() < 1e-9 && (left[1] - 100.0).abs() < 1e-9,
            "left is left"
        );
        assert!(
            (polygon_area(&[[0.0, 0.0], [2.0, 0.0], [2.0, 3.0], [0.0, 3.0]]) - 6.0).abs() < 1e-12
        );
    }
}
