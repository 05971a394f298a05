//! Reviewers' corrections back in: a new label version beside the machine's, and the difference
//! slot by slot, so the team can measure the auto-labeler against human review.
//!
//! Input: a machine output of the annotate stage (its `coco_keypoints.json` gives every kept
//! frame's labels and the review images' geometry) and an export of the reviewed labels:
//! - [`Source::LabelStudio`]: Label Studio's JSON export of a project made from
//!   `label_studio.json`. A task's newest annotation that was not cancelled is its review; a task
//!   without one was not reviewed. Shapes are compared as they were shown: the machine's polygon
//!   cut at the image border, like the prediction the reviewer corrected.
//! - [`Source::Coco`]: a COCO keypoints export (CVAT's "COCO Keypoints 1.0", as a `.json` or the
//!   `.zip` CVAT writes) of a task made from `cvat_coco_keypoints.zip`. Every image in it was
//!   reviewed. A slot's four keypoints are its corners (its polygon where it has no four).
//!
//! Output: `<label store>/<clip>/review/r-<hash>/` (the hash covers the export's bytes and the
//! machine output's key: importing the same export again finds it) with `labels.json` (the
//! reviewed labels, per frame, in the ego frame, metres), `diff.json` (per frame and slot:
//! unchanged, moved and by how far, corner order changed, added, deleted) and `review.json` (what
//! was compared, and the summary).

use crate::formats::{ImageGeometry, clip_to_square};
use motorpool_labeling::geom::{P2, assign, dist};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where the reviewed labels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    LabelStudio,
    Coco,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::LabelStudio => "Label Studio",
            Source::Coco => "COCO keypoints",
        }
    }
}

/// A reviewed or machine slot shape that moved less than this (and one review-image pixel) is
/// unchanged: exports round coordinates.
const UNCHANGED_M: f64 = 0.01;

/// A reviewed slot further than this from every machine slot is a new one.
const MATCH_GATE_M: f64 = 1.5;

pub const LABELS_FORMAT: &str = "motorpool.reviewed-labels.v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Unchanged,
    Moved,
    Added,
    Deleted,
}

/// One slot of a reviewed frame.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlotDiff {
    pub change: Change,
    /// The machine's slot (fused id), unless added.
    pub slot_id: Option<u32>,
    /// Mean distance between the machine's and the reviewer's points, metres (matched slots).
    pub moved_m: Option<f64>,
    /// The reviewer's corners are the machine's in another order (a different entrance-left
    /// corner or winding).
    pub reordered: bool,
    /// The reviewer's shape, ego frame, metres (empty when deleted).
    pub corners: Vec<P2>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrameDiff {
    pub frame: u32,
    pub slots: Vec<SlotDiff>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub frames_reviewed: usize,
    pub frames_not_reviewed: usize,
    pub unchanged: usize,
    pub moved: usize,
    pub reordered: usize,
    pub added: usize,
    pub deleted: usize,
    /// Shapes in the export with fewer than three points, left out.
    pub ignored: usize,
    pub moved_mean_m: f64,
    pub moved_p95_m: f64,
    pub moved_max_m: f64,
}

/// An imported review.
#[derive(Debug)]
pub struct Review {
    pub clip_id: String,
    pub dir: PathBuf,
    /// This export had been imported already: the version found.
    pub cached: bool,
    pub summary: Summary,
}

/// The machine's labels of one kept frame: (fused slot id, its four corners in the ego frame).
type MachineFrame = Vec<(u32, [P2; 4])>;

/// The machine output's clip, image geometry and kept frames.
struct Machine {
    clip_id: String,
    geometry: ImageGeometry,
    frames: BTreeMap<u32, MachineFrame>,
}

fn read_json(path: &Path) -> Result<(Vec<u8>, Value), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
    Ok((bytes, v))
}

/// The frame a COCO image stands for: its `frame`, or the number its file is named by.
fn image_frame(image: &Value) -> Option<u32> {
    if let Some(f) = image["frame"].as_u64() {
        return u32::try_from(f).ok();
    }
    let name = image["file_name"].as_str()?;
    let stem = Path::new(name).file_stem()?.to_str()?;
    stem.parse().ok()
}

fn points(flat: &[Value]) -> Option<Vec<P2>> {
    let v: Option<Vec<f64>> = flat.iter().map(Value::as_f64).collect();
    let v = v?;
    (v.len() % 2 == 0 && v.iter().all(|x| x.is_finite()))
        .then(|| v.chunks(2).map(|c| [c[0], c[1]]).collect())
}

/// A COCO annotation's shape in pixels: its four keypoints when it has them, else its polygon.
fn coco_shape(a: &Value) -> Option<Vec<P2>> {
    if let Some(k) = a["keypoints"].as_array()
        && k.len() == 12
        && k.chunks(3).all(|c| c[2].as_f64().is_some_and(|v| v > 0.0))
    {
        let flat: Vec<Value> = k
            .chunks(3)
            .flat_map(|c| [c[0].clone(), c[1].clone()])
            .collect();
        return points(&flat);
    }
    points(a["segmentation"].get(0)?.as_array()?)
}

fn read_machine(annotate_dir: &Path) -> Result<Machine, String> {
    let (_, coco) = read_json(&annotate_dir.join("coco_keypoints.json"))?;
    let images = coco["images"]
        .as_array()
        .ok_or("coco_keypoints.json has no images")?;
    let first = images
        .first()
        .ok_or("the machine output has no kept frame: nothing was reviewed")?;
    let px_m = first["px_m"].as_f64().ok_or(
        "the machine output predates review images (no px_m): run `motorpool label run` on the clip again",
    )?;
    let size = first["width"].as_u64().unwrap_or(0) as u32;
    let geometry = ImageGeometry { size, px_m };
    let clip_id = first["clip_id"].as_str().unwrap_or_default().to_string();
    let mut by_image = BTreeMap::new();
    let mut frames = BTreeMap::new();
    for image in images {
        let frame = image_frame(image).ok_or("an image of coco_keypoints.json names no frame")?;
        by_image.insert(image["id"].as_u64().unwrap_or(0), frame);
        frames.insert(frame, Vec::new());
    }
    for a in coco["annotations"].as_array().into_iter().flatten() {
        let frame = by_image
            .get(&a["image_id"].as_u64().unwrap_or(0))
            .ok_or("an annotation of coco_keypoints.json has no image")?;
        let shape = coco_shape(a)
            .filter(|s| s.len() == 4)
            .ok_or_else(|| format!("frame {frame}: a machine label without its four corners"))?;
        let slot = a["attributes"]["slot_id"].as_u64().unwrap_or(0) as u32;
        let corners = [0, 1, 2, 3].map(|i| geometry.to_ego(shape[i]));
        frames.get_mut(frame).expect("listed").push((slot, corners));
    }
    Ok(Machine {
        clip_id,
        geometry,
        frames,
    })
}

/// A reviewed frame: its shapes in pixels, and how many were left out.
struct Reviewed {
    shapes: Vec<Vec<P2>>,
    ignored: usize,
}

fn read_label_studio(export: &Value, machine: &Machine) -> Result<BTreeMap<u32, Reviewed>, String> {
    let tasks = export
        .as_array()
        .ok_or("not a Label Studio JSON export (a list of tasks)")?;
    let mut out = BTreeMap::new();
    for task in tasks {
        let data = &task["data"];
        let clip = data["clip_id"].as_str().unwrap_or_default();
        if clip != machine.clip_id {
            return Err(format!(
                "the export has tasks of clip {clip:?}; these machine labels are of clip {:?}",
                machine.clip_id
            ));
        }
        let frame = data["frame"]
            .as_u64()
            .and_then(|f| u32::try_from(f).ok())
            .ok_or("a task names no frame (data.frame): not a task of label_studio.json")?;
        if !machine.frames.contains_key(&frame) {
            return Err(format!(
                "a task is of frame {frame}, which the machine labels do not keep"
            ));
        }
        // The newest review that was not cancelled (annotations are numbered in order).
        let Some(annotation) = task["annotations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| !a["was_cancelled"].as_bool().unwrap_or(false))
            .max_by_key(|a| a["id"].as_u64().unwrap_or(0))
        else {
            continue;
        };
        let mut reviewed = Reviewed {
            shapes: Vec::new(),
            ignored: 0,
        };
        for r in annotation["result"].as_array().into_iter().flatten() {
            if !matches!(r["type"].as_str(), Some("polygonlabels" | "polygon")) {
                continue;
            }
            let w = r["original_width"]
                .as_f64()
                .unwrap_or(machine.geometry.size as f64);
            let h = r["original_height"]
                .as_f64()
                .unwrap_or(machine.geometry.size as f64);
            let pct: Option<Vec<P2>> = r["value"]["points"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .map(|xy| Some([xy.get(0)?.as_f64()?, xy.get(1)?.as_f64()?]))
                        .collect()
                })
                .unwrap_or(None);
            match pct {
                Some(p) if p.len() >= 3 => reviewed.shapes.push(
                    p.iter()
                        .map(|q| [q[0] / 100.0 * w, q[1] / 100.0 * h])
                        .collect(),
                ),
                _ => reviewed.ignored += 1,
            }
        }
        out.insert(frame, reviewed);
    }
    Ok(out)
}

fn read_coco(export: &Value, machine: &Machine) -> Result<BTreeMap<u32, Reviewed>, String> {
    let images = export["images"]
        .as_array()
        .ok_or("not a COCO export (no images)")?;
    let mut by_image = BTreeMap::new();
    let mut out = BTreeMap::new();
    for image in images {
        let frame = image_frame(image).ok_or_else(|| {
            format!(
                "image {} names no frame (file names are NNNNNN.png)",
                image["file_name"]
            )
        })?;
        if !machine.frames.contains_key(&frame) {
            return Err(format!(
                "image {} is frame {frame}, which the machine labels do not keep",
                image["file_name"]
            ));
        }
        by_image.insert(image["id"].as_u64().unwrap_or(0), frame);
        out.insert(
            frame,
            Reviewed {
                shapes: Vec::new(),
                ignored: 0,
            },
        );
    }
    for a in export["annotations"].as_array().into_iter().flatten() {
        let Some(frame) = by_image.get(&a["image_id"].as_u64().unwrap_or(0)) else {
            return Err(format!("annotation {} has no image", a["id"]));
        };
        let reviewed = out.get_mut(frame).expect("listed");
        match coco_shape(a) {
            Some(s) if s.len() >= 3 => reviewed.shapes.push(s),
            _ => reviewed.ignored += 1,
        }
    }
    Ok(out)
}

/// The export's JSON: the file itself, or the `annotations/*.json` of a CVAT `.zip`.
fn export_json(path: &Path) -> Result<(Vec<u8>, Value), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !bytes.starts_with(b"PK") {
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
        return Ok((bytes, v));
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&bytes))
        .map_err(|e| format!("{} is not a readable zip: {e}", path.display()))?;
    let name = zip
        .file_names()
        .filter_map(Result::ok)
        .filter(|n| n.starts_with("annotations/") && n.ends_with(".json"))
        .min()
        .map(|n| n.to_string())
        .ok_or_else(|| format!("{} holds no annotations/*.json", path.display()))?;
    let mut text = Vec::new();
    zip.by_name(&name)
        .and_then(|mut f| f.read_to_end(&mut text).map_err(Into::into))
        .map_err(|e| format!("{}: {name}: {e}", path.display()))?;
    let v = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: {name} is not valid JSON: {e}", path.display()))?;
    Ok((bytes, v))
}

/// The mean distance between two shapes' points in the cyclic order (either way round) that
/// fits best, and whether that order is not the first's own; shapes with different numbers of
/// points compare by their centroids.
pub fn shape_distance(machine: &[P2], reviewed: &[P2]) -> (f64, bool) {
    let n = machine.len();
    if n != reviewed.len() || n == 0 {
        let c = |s: &[P2]| {
            let k = s.len().max(1) as f64;
            [
                s.iter().map(|p| p[0]).sum::<f64>() / k,
                s.iter().map(|p| p[1]).sum::<f64>() / k,
            ]
        };
        return (dist(c(machine), c(reviewed)), false);
    }
    let mut best = (f64::INFINITY, false);
    for reversed in [false, true] {
        for shift in 0..n {
            let d = (0..n)
                .map(|i| {
                    let j = if reversed {
                        (shift + n - i) % n
                    } else {
                        (shift + i) % n
                    };
                    dist(machine[i], reviewed[j])
                })
                .sum::<f64>()
                / n as f64;
            if d < best.0 - 1e-12 {
                best = (d, reversed || shift != 0);
            }
        }
    }
    best
}

/// Compares one frame: the machine's slots against the reviewer's shapes (ego frame).
fn diff_frame(machine: &[(u32, Vec<P2>)], reviewed: &[Vec<P2>], unchanged_m: f64) -> Vec<SlotDiff> {
    let pairs = assign(
        machine.len(),
        reviewed.len(),
        |i, j| shape_distance(&machine[i].1, &reviewed[j]).0,
        MATCH_GATE_M,
    );
    let mut out = Vec::new();
    let mut matched_m = vec![false; machine.len()];
    let mut matched_r = vec![false; reviewed.len()];
    for (i, j, _) in pairs {
        matched_m[i] = true;
        matched_r[j] = true;
        let (d, reordered) = shape_distance(&machine[i].1, &reviewed[j]);
        let change = if d <= unchanged_m && !reordered {
            Change::Unchanged
        } else {
            Change::Moved
        };
        out.push(SlotDiff {
            change,
            slot_id: Some(machine[i].0),
            moved_m: Some((d * 1e4).round() / 1e4),
            reordered,
            corners: rounded(&reviewed[j]),
        });
    }
    for (i, (slot, _)) in machine.iter().enumerate() {
        if !matched_m[i] {
            out.push(SlotDiff {
                change: Change::Deleted,
                slot_id: Some(*slot),
                moved_m: None,
                reordered: false,
                corners: Vec::new(),
            });
        }
    }
    for (j, shape) in reviewed.iter().enumerate() {
        if !matched_r[j] {
            out.push(SlotDiff {
                change: Change::Added,
                slot_id: None,
                moved_m: None,
                reordered: false,
                corners: rounded(shape),
            });
        }
    }
    out.sort_by_key(|s| (s.slot_id.is_none(), s.slot_id));
    out
}

fn summarize(frames: &[FrameDiff], kept: usize, ignored: usize) -> Summary {
    let mut s = Summary {
        frames_reviewed: frames.len(),
        frames_not_reviewed: kept - frames.len(),
        ignored,
        ..Default::default()
    };
    let mut moved = Vec::new();
    for slot in frames.iter().flat_map(|f| &f.slots) {
        match slot.change {
            Change::Unchanged => s.unchanged += 1,
            Change::Moved => {
                s.moved += 1;
                moved.push(slot.moved_m.unwrap_or(0.0));
            }
            Change::Added => s.added += 1,
            Change::Deleted => s.deleted += 1,
        }
        s.reordered += slot.reordered as usize;
    }
    if !moved.is_empty() {
        moved.sort_by(f64::total_cmp);
        let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
        s.moved_mean_m = r3(moved.iter().sum::<f64>() / moved.len() as f64);
        s.moved_p95_m =
            r3(moved[((moved.len() as f64 * 0.95).ceil() as usize).clamp(1, moved.len()) - 1]);
        s.moved_max_m = r3(moved[moved.len() - 1]);
    }
    s
}

/// Imports the review in `export` of the machine labels in `annotate_dir` as a new version.
pub fn import(annotate_dir: &Path, export: &Path, source: Source) -> Result<Review, String> {
    let annotate_dir = std::fs::canonicalize(annotate_dir)
        .map_err(|e| format!("the machine labels {}: {e}", annotate_dir.display()))?;
    let machine = read_machine(&annotate_dir)?;
    let (bytes, doc) = export_json(export)?;
    let reviewed = match source {
        Source::LabelStudio => read_label_studio(&doc, &machine)?,
        Source::Coco => read_coco(&doc, &machine)?,
    };
    if reviewed.is_empty() {
        return Err(format!(
            "the export reviews none of the {} kept frames of clip {}",
            machine.frames.len(),
            machine.clip_id
        ));
    }
    let g = machine.geometry;
    let side = g.size as f64;
    let unchanged_m = UNCHANGED_M.max(g.px_m);
    let mut frames = Vec::new();
    let mut ignored = 0;
    for (frame, r) in &reviewed {
        ignored += r.ignored;
        let labels = &machine.frames[frame];
        // What the reviewer saw of each machine slot: Label Studio showed it cut at the border.
        let shown: Vec<(u32, Vec<P2>)> = labels
            .iter()
            .map(|(slot, corners)| {
                let px: Vec<P2> = corners.iter().map(|c| g.to_pixel(*c)).collect();
                let px = match source {
                    Source::LabelStudio => clip_to_square(&px, side),
                    Source::Coco => px,
                };
                (*slot, px.iter().map(|p| g.to_ego(*p)).collect::<Vec<_>>())
            })
            .filter(|(_, s)| s.len() >= 3)
            .collect();
        let shapes: Vec<Vec<P2>> = r
            .shapes
            .iter()
            .map(|s| s.iter().map(|p| g.to_ego(*p)).collect())
            .collect();
        frames.push(FrameDiff {
            frame: *frame,
            slots: diff_frame(&shown, &shapes, unchanged_m),
        });
    }
    let summary = summarize(&frames, machine.frames.len(), ignored);

    let machine_key = annotate_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(machine_key.as_bytes());
    h.update(&bytes);
    let hash = h.finalize().to_hex();
    let clip_dir = annotate_dir
        .parent()
        .and_then(Path::parent)
        .ok_or("the machine labels are not in a label store (<store>/<clip>/annotate/<version>)")?;
    let dir = clip_dir.join("review").join(format!("r-{}", &hash[..16]));
    let done = |cached| Review {
        clip_id: machine.clip_id.clone(),
        dir: dir.clone(),
        cached,
        summary: summary.clone(),
    };
    if dir.join("review.json").is_file() {
        return Ok(done(true));
    }
    let labels = json!({
        "format": LABELS_FORMAT,
        "clip_id": machine.clip_id,
        "machine": machine_key,
        "frames": frames.iter().map(|f| json!({
            "frame": f.frame,
            "slots": f.slots.iter().filter(|s| s.change != Change::Deleted).map(|s| json!({
                "corners": s.corners,
                "slot_id": s.slot_id,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let review = json!({
        "clip_id": machine.clip_id,
        "machine_output": annotate_dir.display().to_string(),
        "source": source,
        "export": std::fs::canonicalize(export).unwrap_or(export.to_path_buf()).display().to_string(),
        "export_blake3": blake3::hash(&bytes).to_hex().as_str(),
        "created_ms": motorpool_messages::now_ms(),
        "unchanged_within_m": unchanged_m,
        "summary": summary,
    });
    let tmp = dir.with_file_name(format!(".tmp-{}-{}", &hash[..16], std::process::id()));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(tmp.join("labels.json"), serde_json::to_vec_pretty(&labels)?)?;
        std::fs::write(
            tmp.join("diff.json"),
            serde_json::to_vec_pretty(&json!({ "summary": summary, "frames": frames }))?,
        )?;
        // Written last: a version with review.json is complete.
        std::fs::write(tmp.join("review.json"), serde_json::to_vec_pretty(&review)?)?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            // Another import of the same export finished first: theirs stands.
            Err(_) if dir.join("review.json").is_file() => std::fs::remove_dir_all(&tmp),
            Err(e) => Err(e),
        }
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!("cannot write the review {}: {e}", dir.display()));
    }
    Ok(done(false))
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn rounded(shape: &[P2]) -> Vec<P2> {
    shape.iter().map(|p| [round3(p[0]), round3(p[1])]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_compare_in_the_order_that_fits_and_say_when_it_changed() {
        let a = [[0.0, 0.0], [2.5, 0.0], [2.5, 5.0], [0.0, 5.0]];
        assert_eq!(shape_distance(&a, &a), (0.0, false));
        let moved: Vec<P2> = a.iter().map(|p| [p[0] + 0.2, p[1]]).collect();
        let (d, reordered) = shape_distance(&a, &moved);
        assert!((d - 0.2).abs() < 1e-12 && !reordered);
        // The same corners starting at the far side, or wound the other way: order changed.
        let rotated = [a[2], a[3], a[0], a[1]];
        assert_eq!(shape_distance(&a, &rotated), (0.0, true));
        let reversed = [a[0], a[3], a[2], a[1]];
        assert_eq!(shape_distance(&a, &reversed), (0.0, true));
        // A shape of other points: its centroid.
        let tri = [[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]];
        let (d, _) = shape_distance(&a, &tri);
        assert!((d - dist([1.25, 2.5], [1.0, 1.0])).abs() < 1e-12);
    }

    #[test]
    fn a_frame_diff_finds_moved_deleted_and_added_slots() {
        let slot = |x: f64| vec![[x, 2.0], [x + 2.5, 2.0], [x + 2.5, 7.0], [x, 7.0]];
        let machine = vec![(1, slot(0.0)), (2, slot(3.0)), (3, slot(6.0))];
        let mut shifted = slot(3.0);
        for p in &mut shifted {
            p[1] += 0.3;
        }
        // Slot 1 kept, slot 2 moved 0.3 m, slot 3 deleted, one added 10 m away.
        let reviewed = vec![shifted, slot(0.0), slot(20.0)];
        let d = diff_frame(&machine, &reviewed, 0.025);
        let changes: Vec<(Change, Option<u32>)> = d.iter().map(|s| (s.change, s.slot_id)).collect();
        assert_eq!(
            changes,
            [
                (Change::Unchanged, Some(1)),
                (Change::Moved, Some(2)),
                (Change::Deleted, Some(3)),
                (Change::Added, None)
            ]
        );
        assert!((d[1].moved_m.unwrap() - 0.3).abs() < 1e-9);
        let s = summarize(&[FrameDiff { frame: 0, slots: d }], 5, 0);
        assert_eq!((s.frames_reviewed, s.frames_not_reviewed), (1, 4));
        assert_eq!((s.unchanged, s.moved, s.deleted, s.added), (1, 1, 1, 1));
        assert_eq!(s.moved_max_m, 0.3);
    }
}
