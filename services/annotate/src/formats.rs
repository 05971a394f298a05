//! Label files reviewers load, over one ego-centred BEV image per kept frame.
//!
//! Images: `frames/NNNNNN.png`, 8-bit intensity of the BEV base map at [`REVIEW_UPSCALE`] pixels
//! a raster cell (`px_m` metres a pixel), `S = 2 * visible_m / px_m` pixels square (800 for the
//! default 10 m at 0.1 m), the car in the centre facing up (ego x up, ego y left). An ego point
//! (x, y) is at pixel `u = S/2 - y / px_m`, `v = S/2 - x / px_m`. `frames_labeled/NNNNNN.png`
//! is the same picture with the labels drawn: each slot's edges, its entrance edge (corner 0 to
//! corner 1) in yellow and corner 0 (entrance left) as a red square.
//!
//! - `coco_keypoints.json`: COCO keypoints (CVAT's "COCO Keypoints 1.0" import): one image per
//!   kept frame, one `parking_slot` annotation per visible slot with its four corners as
//!   keypoints (entrance left, entrance right, far right, far left), polygon, bbox and the slot's
//!   fused id and score as attributes. `cvat_coco_keypoints.zip` packs it for CVAT with the
//!   images: `annotations/person_keypoints_default.json` and `images/NNNNNN.png`.
//! - `label_studio.json`: Label Studio tasks with predictions: one polygon per slot, clipped to
//!   the image (points in percent), with the slot's score and the frame's mean score; images by
//!   Label Studio's local-files URL relative to the label store
//!   (`LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`), and by absolute path. `label_studio_config.xml`
//!   is the labeling interface they go with.

use crate::FrameVerdict;
use motorpool_labeling::clip::Clip;
use motorpool_labeling::geom::floor_i64;
use motorpool_labeling::raster::Raster;
use motorpool_labeling::{LabelError, Progress};
use serde_json::json;
use std::io::Write;
use std::path::Path;

/// Model version written into Label Studio predictions.
pub const MODEL_VERSION: &str = "bevslots-fusion-v2";

/// Review images have this many pixels a side per BEV raster cell.
pub const REVIEW_UPSCALE: f64 = 4.0;

/// The largest review image side, pixels.
const MAX_IMAGE_PX: f64 = 4096.0;

/// The labeling interface of `label_studio.json`'s tasks.
pub const LABEL_STUDIO_CONFIG: &str = r##"<View>
  <Header value="Clip $clip_id, frame $frame: move the corners onto the painted lines; delete slots that are not there, draw missed ones (entrance left first, then around)"/>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <PolygonLabels name="slot" toName="image" strokeWidth="2" pointSize="small" opacity="0.3">
    <Label value="parking_slot" background="#2ecc71"/>
  </PolygonLabels>
</View>
"##;

/// Where review images' pixels lie: `size` pixels square, `px_m` metres a pixel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageGeometry {
    pub size: u32,
    pub px_m: f64,
}

impl ImageGeometry {
    /// The review images of a raster of `raster_m` metres a cell showing `visible_m` around the
    /// car: [`REVIEW_UPSCALE`] pixels a cell, at most 4096 pixels a side.
    pub fn review(visible_m: f64, raster_m: f64) -> ImageGeometry {
        let px_m = (raster_m / REVIEW_UPSCALE).max(2.0 * visible_m / MAX_IMAGE_PX);
        ImageGeometry::new(visible_m, px_m)
    }

    pub fn new(visible_m: f64, px_m: f64) -> ImageGeometry {
        ImageGeometry {
            size: ((2.0 * visible_m / px_m).round() as u32).max(1),
            px_m,
        }
    }

    /// The pixel of an ego-frame point.
    pub fn to_pixel(&self, p: [f64; 2]) -> [f64; 2] {
        let half = self.size as f64 / 2.0;
        [half - p[1] / self.px_m, half - p[0] / self.px_m]
    }

    /// The ego-frame point of a pixel.
    pub fn to_ego(&self, px: [f64; 2]) -> [f64; 2] {
        let half = self.size as f64 / 2.0;
        [(half - px[1]) * self.px_m, (half - px[0]) * self.px_m]
    }
}

fn image_name(frame: u32) -> String {
    format!("frames/{frame:06}.png")
}

/// Palette of the labeled copies: 252 greys, then the drawing colours.
const GREYS: u8 = 252;
const EDGE: u8 = 252;
const ENTRANCE: u8 = 253;
const CORNER0: u8 = 254;

fn palette() -> Vec<u8> {
    let mut p: Vec<u8> = (0..GREYS as u32)
        .flat_map(|i| {
            let g = (i * 255 / (GREYS as u32 - 1)) as u8;
            [g, g, g]
        })
        .collect();
    p.extend_from_slice(&[46, 204, 113]); // EDGE: green
    p.extend_from_slice(&[241, 196, 15]); // ENTRANCE: yellow
    p.extend_from_slice(&[231, 76, 60]); // CORNER0: red
    p.extend_from_slice(&[0, 0, 0]);
    p
}

fn png(size: u32, pixels: &[u8], palette: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, size, size);
        match palette {
            Some(p) => {
                enc.set_color(png::ColorType::Indexed);
                enc.set_palette(p.to_vec());
            }
            None => enc.set_color(png::ColorType::Grayscale),
        }
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        if let Ok(mut writer) = enc.write_header() {
            let _ = writer.write_image_data(pixels);
        }
    }
    out
}

/// Draws a line of `width` pixels from `a` to `b` (pixel coordinates, clipped to the image).
fn line(pixels: &mut [u8], size: u32, a: [f64; 2], b: [f64; 2], colour: u8, width: i64) {
    let steps = (a[0] - b[0])
        .abs()
        .max((a[1] - b[1]).abs())
        .ceil()
        .min(4.0 * size as f64) as i64;
    for i in 0..=steps.max(1) {
        let t = i as f64 / steps.max(1) as f64;
        let (u, v) = (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t);
        dot(pixels, size, [u, v], colour, width);
    }
}

fn dot(pixels: &mut [u8], size: u32, p: [f64; 2], colour: u8, width: i64) {
    let (cu, cv) = (p[0].floor() as i64, p[1].floor() as i64);
    let r0 = -(width - 1) / 2;
    for dv in r0..r0 + width {
        for du in r0..r0 + width {
            let (u, v) = (cu + du, cv + dv);
            if (0..size as i64).contains(&u) && (0..size as i64).contains(&v) {
                pixels[(v * size as i64 + u) as usize] = colour;
            }
        }
    }
}

/// Renders the review image of every kept frame and its copy with the labels drawn.
pub fn write_frames(
    clip: &Clip,
    raster: &Raster,
    verdicts: &[FrameVerdict],
    geometry: ImageGeometry,
    out: &Path,
    progress: &Progress,
) -> Result<(), LabelError> {
    let ImageGeometry { size, px_m } = geometry;
    for dir in ["frames", "frames_labeled"] {
        std::fs::create_dir_all(out.join(dir))
            .map_err(|e| LabelError::io(format!("create {dir}/"), e))?;
    }
    let palette = palette();
    let mut pixels = vec![0u8; (size * size) as usize];
    let mut labeled = vec![0u8; (size * size) as usize];
    let half = size as f64 / 2.0;
    // Each raster cell's grey, for the picture and for the palette of its labeled copy, once.
    let grey: Vec<u8> = raster
        .intensity
        .iter()
        .map(|i| (i * 255.0).round() as u8)
        .collect();
    let grey_indexed: Vec<u8> = raster
        .intensity
        .iter()
        .map(|i| (i * (GREYS - 1) as f32).round() as u8)
        .collect();
    let meta = &raster.meta;
    let (w, h) = (meta.width as i64, meta.height as i64);
    let bottom = meta.origin_y - meta.height as f64 * meta.resolution_m;
    // A map point in raster cells: column from the left edge, row from the bottom edge.
    let cells = |p: [f64; 2]| {
        [
            (p[0] - meta.origin_x) / meta.resolution_m,
            (p[1] - bottom) / meta.resolution_m,
        ]
    };
    for v in verdicts {
        progress.advance(1);
        if v.dropped.is_some() {
            continue;
        }
        let pose = clip.frames()[v.frame as usize].pose;
        // Pixel (c, r) is ego point ((half - r - 0.5) px_m, (half - c - 0.5) px_m): in raster
        // cells it moves by a fixed step along a row and down the rows.
        let (sin, cos) = pose.yaw.sin_cos();
        let scale = px_m / meta.resolution_m;
        let origin = cells(pose.to_map([(half - 0.5) * px_m, (half - 0.5) * px_m]));
        let (col_step, row_step) = ([sin * scale, -cos * scale], [-cos * scale, -sin * scale]);
        for r in 0..size {
            let mut p = [
                origin[0] + row_step[0] * r as f64,
                origin[1] + row_step[1] * r as f64,
            ];
            let base = (r * size) as usize;
            for c in 0..size as usize {
                let (u, b) = (floor_i64(p[0]), floor_i64(p[1]));
                let (g, gi) = if (0..w).contains(&u) && (0..h).contains(&b) {
                    let i = ((h - 1 - b) * w + u) as usize;
                    (grey[i], grey_indexed[i])
                } else {
                    (0, 0)
                };
                pixels[base + c] = g;
                labeled[base + c] = gi;
                p[0] += col_step[0];
                p[1] += col_step[1];
            }
        }
        let width = ((size as f64 / 400.0).round() as i64).max(1) + 1;
        for l in &v.labels {
            let px: Vec<[f64; 2]> = l.corners.iter().map(|p| geometry.to_pixel(*p)).collect();
            for k in 1..4 {
                line(&mut labeled, size, px[k], px[(k + 1) % 4], EDGE, width);
            }
            line(&mut labeled, size, px[0], px[1], ENTRANCE, width);
            dot(&mut labeled, size, px[0], CORNER0, 3 * width);
        }
        let name = image_name(v.frame);
        std::fs::write(out.join(&name), png(size, &pixels, None))
            .map_err(|e| LabelError::io(format!("write {name}"), e))?;
        let name = format!("frames_labeled/{:06}.png", v.frame);
        std::fs::write(out.join(&name), png(size, &labeled, Some(&palette)))
            .map_err(|e| LabelError::io(format!("write {name}"), e))?;
    }
    Ok(())
}

/// Clips a polygon to the square `0..=side` (Sutherland-Hodgman).
pub fn clip_to_square(poly: &[[f64; 2]], side: f64) -> Vec<[f64; 2]> {
    let mut out = poly.to_vec();
    // Each edge of the square: inside when `f(p) >= 0`.
    let edges: [fn([f64; 2], f64) -> f64; 4] =
        [|p, _| p[0], |p, s| s - p[0], |p, _| p[1], |p, s| s - p[1]];
    for f in edges {
        let input = std::mem::take(&mut out);
        let n = input.len();
        for i in 0..n {
            let (a, b) = (input[i], input[(i + 1) % n]);
            let (fa, fb) = (f(a, side), f(b, side));
            if fa >= 0.0 {
                out.push(a);
            }
            if (fa >= 0.0) != (fb >= 0.0) {
                let t = fa / (fa - fb);
                out.push([a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t]);
            }
        }
        if out.is_empty() {
            break;
        }
    }
    out
}

/// Where the outputs go: the final output directory and its path under the label store.
pub struct Placement<'a> {
    pub dir: &'a Path,
    pub rel: &'a str,
}

/// Writes `coco_keypoints.json`, `label_studio.json` with `label_studio_config.xml`, and
/// `cvat_coco_keypoints.zip` for the kept frames (their images already written).
pub fn write_labels(
    clip: &Clip,
    verdicts: &[FrameVerdict],
    geometry: ImageGeometry,
    place: &Placement,
    out: &Path,
) -> Result<(), LabelError> {
    let size = geometry.size;
    let side = size as f64;
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
            "px_m": geometry.px_m,
        }));
        let mut results = Vec::new();
        for l in &v.labels {
            let px: Vec<[f64; 2]> = l.corners.iter().map(|p| geometry.to_pixel(*p)).collect();
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
                    let inside = (0.0..=side).contains(&p[0]) && (0.0..=side).contains(&p[1]);
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
            // Label Studio draws what lies in the image: the polygon cut at its border.
            let inside = clip_to_square(&px, side);
            if inside.len() < 3 {
                continue;
            }
            results.push(json!({
                "id": format!("f{}-s{}", v.frame, l.slot),
                "from_name": "slot",
                "to_name": "image",
                "type": "polygonlabels",
                "original_width": size,
                "original_height": size,
                "image_rotation": 0,
                "score": round3(l.score),
                "meta": { "slot_id": l.slot, "clipped": inside.len() != 4 || inside.iter().zip(&px).any(|(a, b)| a != b) },
                "value": {
                    "points": inside.iter().map(|p| [round3(100.0 * p[0] / side), round3(100.0 * p[1] / side)]).collect::<Vec<_>>(),
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
            "data": {
                "image": format!("/data/local-files/?d={}/{file_name}", place.rel),
                "image_path": place.dir.join(&file_name).display().to_string(),
                "clip_id": clip.id(),
                "frame": v.frame,
                "px_m": geometry.px_m,
            },
            "predictions": [{ "model_version": MODEL_VERSION, "score": round3(mean), "result": results }],
        }));
    }
    let categories = json!([{
        "id": 1,
        "name": "parking_slot",
        "supercategory": "parking",
        "keypoints": ["entrance_left", "entrance_right", "far_right", "far_left"],
        "skeleton": [[1, 2], [2, 3], [3, 4], [4, 1]],
    }]);
    let info = json!({ "description": format!("Motorpool BevSlots labels of clip {}", clip.id()), "version": MODEL_VERSION });
    let coco = json!({
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    });
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes)
            .map_err(|e| LabelError::io(format!("write {name}"), e))
    };
    write(
        "coco_keypoints.json",
        &serde_json::to_vec(&coco).unwrap_or_default(),
    )?;
    write(
        "label_studio.json",
        &serde_json::to_vec(&serde_json::Value::Array(tasks)).unwrap_or_default(),
    )?;
    write("label_studio_config.xml", LABEL_STUDIO_CONFIG.as_bytes())?;
    // CVAT: the same annotations, the images beside them under their bare names.
    let mut cvat = coco;
    for image in cvat["images"].as_array_mut().into_iter().flatten() {
        let name = image["file_name"]
            .as_str()
            .unwrap_or("")
            .replace("frames/", "");
        image["file_name"] = json!(name);
    }
    cvat_package(&cvat, out).map_err(|e| LabelError::io("write cvat_coco_keypoints.zip", e))
}

/// `cvat_coco_keypoints.zip`: `annotations/person_keypoints_default.json` (CVAT's COCO Keypoints
/// 1.0 layout) and `images/NNNNNN.png`.
fn cvat_package(coco: &serde_json::Value, out: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(out.join("cvat_coco_keypoints.zip"))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    // PNGs are compressed already.
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("annotations/person_keypoints_default.json", deflated)?;
    zip.write_all(&serde_json::to_vec(coco).unwrap_or_default())?;
    for image in coco["images"].as_array().into_iter().flatten() {
        let name = image["file_name"].as_str().unwrap_or("");
        zip.start_file(format!("images/{name}"), stored)?;
        zip.write_all(&std::fs::read(out.join("frames").join(name))?)?;
    }
    zip.finish()?.flush()
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
        let g = ImageGeometry::new(10.0, 0.1);
        assert_eq!(g.size, 200);
        assert_eq!(g.to_pixel([0.0, 0.0]), [100.0, 100.0]);
        let ahead = g.to_pixel([5.0, 0.0]);
        assert!(
            (ahead[0] - 100.0).abs() < 1e-9 && (ahead[1] - 50.0).abs() < 1e-9,
            "ahead is up"
        );
        let left = g.to_pixel([0.0, 5.0]);
        assert!(
            (left[0] - 50.0).abs() < 1e-9 && (left[1] - 100.0).abs() < 1e-9,
            "left is left"
        );
        assert!(
            (polygon_area(&[[0.0, 0.0], [2.0, 0.0], [2.0, 3.0], [0.0, 3.0]]) - 6.0).abs() < 1e-12
        );
        let back = g.to_ego(g.to_pixel([3.25, -1.5]));
        assert!((back[0] - 3.25).abs() < 1e-9 && (back[1] + 1.5).abs() < 1e-9);
        // Review images: 4 pixels a raster cell, 800 px for the default 10 m at 0.1 m; at most
        // 4096 px a side.
        assert_eq!(ImageGeometry::review(10.0, 0.1).size, 800);
        assert_eq!(ImageGeometry::review(200.0, 0.1).size, 4096);
    }

    #[test]
    fn polygons_are_cut_at_the_image_border() {
        // Inside: unchanged.
        let inside = [[10.0, 10.0], [20.0, 10.0], [20.0, 30.0], [10.0, 30.0]];
        assert_eq!(clip_to_square(&inside, 100.0), inside.to_vec());
        // Half out on the right: cut at u = 100, same area as the part inside.
        let out = clip_to_square(
            &[[90.0, 10.0], [110.0, 10.0], [110.0, 30.0], [90.0, 30.0]],
            100.0,
        );
        assert!(
            out.iter()
                .all(|p| (0.0..=100.0).contains(&p[0]) && (0.0..=100.0).contains(&p[1]))
        );
        assert!((polygon_area(&out) - 200.0).abs() < 1e-9, "{out:?}");
        // Over a corner: five points, all inside.
        let corner = clip_to_square(
            &[[90.0, 90.0], [110.0, 95.0], [105.0, 110.0], [85.0, 105.0]],
            100.0,
        );
        assert!(corner.len() >= 4, "{corner:?}");
        assert!(
            corner
                .iter()
                .all(|p| (0.0..=100.0).contains(&p[0]) && (0.0..=100.0).contains(&p[1]))
        );
        // Wholly outside: nothing.
        assert!(clip_to_square(&[[110.0, 10.0], [120.0, 10.0], [120.0, 20.0]], 100.0).is_empty());
    }
}
