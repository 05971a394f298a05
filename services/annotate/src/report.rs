//! The picture of a clip: its BEV base map with the ego trajectory, every raw detection (faint
//! orange), the fused slots (green, numbered) and, for synthetic clips, the ground truth (dashed
//! blue); and a page around it with the statistics and the dropped frames.

use crate::{ClipStats, FrameVerdict};
use motorpool_labeling::clip::{Clip, GroundTruth};
use motorpool_labeling::geom::{Slot, centre};
use motorpool_labeling::raster::{Raster, png_bytes};
use motorpool_prelabel::fusion::FusedSlot;
use std::fmt::Write;

fn polygon(raster: &Raster, corners: &[[f64; 2]; 4]) -> String {
    corners
        .iter()
        .map(|p| {
            let q = raster.meta.to_pixel(*p);
            format!("{:.1},{:.1}", q[0], q[1])
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The SVG picture, pixel units of the BEV raster.
pub fn svg(
    clip: &Clip,
    raster: &Raster,
    labels: &[FusedSlot],
    detections: &[Option<Vec<Slot>>],
    truth: Option<&GroundTruth>,
) -> String {
    let (w, h) = (raster.meta.width, raster.meta.height);
    let intensity: Vec<u8> = raster
        .intensity
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    let png = png_bytes(w, h, &intensity);
    let mut s = String::with_capacity(png.len() * 4 / 3 + 64 * 1024);
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="sans-serif">
<title>Clip {id}: BEV map, raw detections, fused slots</title>
<rect width="{w}" height="{h}" fill="#000"/>
<image width="{w}" height="{h}" href="data:image/png;base64,{img}" style="image-rendering:pixelated"/>
"##,
        id = clip.id(),
        img = base64(&png),
    );
    // Raw detections, every frame, in the map frame.
    s.push_str(r##"<g fill="none" stroke="#ff9f1c" stroke-opacity="0.25" stroke-width="0.6">"##);
    for (f, dets) in clip.frames().iter().zip(detections) {
        for d in dets.iter().flatten() {
            let m = d.corners.map(|p| f.pose.to_map(p));
            let _ = write!(s, r#"<polygon points="{}"/>"#, polygon(raster, &m));
        }
    }
    s.push_str("</g>\n");
    if let Some(t) = truth {
        s.push_str(
            r##"<g fill="none" stroke="#4cc9f0" stroke-width="1.2" stroke-dasharray="4 3">"##,
        );
        for g in &t.slots {
            let _ = write!(s, r#"<polygon points="{}"/>"#, polygon(raster, &g.corners));
        }
        s.push_str("</g>\n");
    }
    s.push_str(r##"<g fill="#2ec4b6" fill-opacity="0.15" stroke="#2ec4b6" stroke-width="1.5">"##);
    for l in labels {
        let _ = write!(
            s,
            r#"<polygon points="{}"><title>slot {} score {:.2}, {} observations, frames {}-{}</title></polygon>"#,
            polygon(raster, &l.corners),
            l.id,
            l.score,
            l.hits,
            l.first_frame,
            l.last_frame
        );
    }
    s.push_str("</g>\n<g fill=\"#fff\" font-size=\"9\" text-anchor=\"middle\">");
    for l in labels {
        let c = raster.meta.to_pixel(centre(&l.corners));
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            c[0],
            c[1] + 3.0,
            l.id
        );
    }
    s.push_str("</g>\n");
    let path: Vec<String> = clip
        .frames()
        .iter()
        .map(|f| {
            let q = raster.meta.to_pixel([f.pose.x, f.pose.y]);
            format!("{:.1},{:.1}", q[0], q[1])
        })
        .collect();
    let _ = write!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#e71d36" stroke-width="1.5"/>
<g font-size="11" fill="#fff"><rect x="4" y="4" width="190" height="62" fill="#000" fill-opacity="0.6"/>
<text x="10" y="18" fill="#2ec4b6">fused slots ({})</text><text x="10" y="32" fill="#ff9f1c">raw detections</text>
<text x="10" y="46" fill="#4cc9f0">{}</text><text x="10" y="60" fill="#e71d36">ego trajectory</text></g>
</svg>
"##,
        path.join(" "),
        labels.len(),
        if truth.is_some() {
            "ground truth"
        } else {
            "(no ground truth)"
        },
    );
    s
}

/// The report page: statistics, dropped frames, the picture.
pub fn html(stats: &ClipStats, verdicts: &[FrameVerdict], svg: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Labels of clip {id}</title>
<style>body{{font-family:sans-serif;margin:1.5em;background:#fafafa}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}th{{background:#eee}}.pic{{overflow:auto;max-width:100%;border:1px solid #ccc}}</style>
</head><body><h1>Clip {id}</h1>
<p>Label files: <a href="coco_keypoints.json">COCO keypoints</a> and <a href="cvat_coco_keypoints.zip">its CVAT package</a>, <a href="label_studio.json">Label Studio tasks</a> with <a href="label_studio_config.xml">their labeling config</a>, <a href="stats.json">statistics</a>, <a href="dropped_frames.json">dropped frames</a>. Review images in <a href="frames/">frames/</a>, with the labels drawn in <a href="frames_labeled/">frames_labeled/</a>.</p>
<table><tr><th>frames</th><th>kept</th><th>dropped</th><th>fused slots</th><th>raw detections</th><th>tracks</th><th>confirmed</th><th>outliers</th><th>gap frames filled</th><th>AVM matched</th><th>AVM unmatched</th><th>labels written</th></tr>
<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>
"#,
        stats.frames,
        stats.frames_kept,
        stats.frames - stats.frames_kept,
        stats.slots,
        stats.detections,
        stats.tracks,
        stats.confirmed_tracks,
        stats.outliers,
        stats.filled,
        stats.avm_matches,
        stats.avm_unmatched,
        stats.label_instances,
        id = stats.clip_id,
    );
    s.push_str("<h2>The map</h2><div class=\"pic\">");
    s.push_str(svg);
    s.push_str(
        "</div><h2>Dropped frames</h2><table><tr><th>frame</th><th>reason</th><th>detail</th></tr>",
    );
    for v in verdicts.iter().filter(|v| v.dropped.is_some()) {
        let reason = v
            .dropped
            .map(|r| {
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let _ = write!(
            s,
            "<tr><td>{}</td><td style=\"text-align:left\">{reason}</td><td style=\"text-align:left\">{}</td></tr>",
            v.frame, v.detail
        );
    }
    s.push_str("</table></body></html>\n");
    s
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
