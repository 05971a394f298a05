//! The BEV base map: a top-down raster of the local map (height and intensity), the picture both
//! automatic and manual labeling work on.
//!
//! On disk (the mapping stage's output):
//! - `bev.json`: origin (map-frame coordinates of the top-left corner), resolution, size;
//! - `bev_height.png`: 16-bit grayscale, millimetres above `height_base_m` (0 = no return);
//! - `bev_intensity.png`: 8-bit grayscale, mean intensity of the cell's points.
//!
//! Pixel (u, v) covers map x in `[origin_x + u res, origin_x + (u+1) res)` and map y in
//! `[origin_y - (v+1) res, origin_y - v res)`: rows go down as y decreases, as a picture of the
//! map seen from above with x to the right and y up.

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const META: &str = "bev.json";
pub const HEIGHT_PNG: &str = "bev_height.png";
pub const INTENSITY_PNG: &str = "bev_intensity.png";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RasterMeta {
    pub origin_x: f64,
    pub origin_y: f64,
    pub resolution_m: f64,
    pub width: u32,
    pub height: u32,
    /// Height 0 in `bev_height.png` is this many metres in the map frame.
    pub height_base_m: f64,
}

/// Both layers in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Raster {
    pub meta: RasterMeta,
    /// Metres above `height_base_m` (max of the cell), NaN where no point fell.
    pub height: Vec<f32>,
    /// Mean intensity in [0, 1], 0 where no point fell.
    pub intensity: Vec<f32>,
}

/// Why a raster could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RasterError {
    #[error("{path}: {message}")]
    Bad { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl RasterMeta {
    /// The pixel holding map point `p`, if inside.
    pub fn pixel(&self, p: [f64; 2]) -> Option<(u32, u32)> {
        let u = ((p[0] - self.origin_x) / self.resolution_m).floor();
        // Rows counted up from the bottom edge, so a cell is [lo, lo + res) in y as in x.
        let bottom = self.origin_y - self.height as f64 * self.resolution_m;
        let b = ((p[1] - bottom) / self.resolution_m).floor();
        (u >= 0.0 && b >= 0.0 && u < self.width as f64 && b < self.height as f64)
            .then(|| (u as u32, self.height - 1 - b as u32))
    }

    /// Continuous pixel coordinates of map point `p` (for drawing).
    pub fn to_pixel(&self, p: [f64; 2]) -> [f64; 2] {
        [
            (p[0] - self.origin_x) / self.resolution_m,
            (self.origin_y - p[1]) / self.resolution_m,
        ]
    }
}

impl Raster {
    /// Rasterises map-frame points `(x, y, z, intensity)` at `resolution_m`.
    pub fn from_points(points: &[[f32; 4]], resolution_m: f64) -> Raster {
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        for p in points {
            for k in 0..3 {
                lo[k] = lo[k].min(p[k] as f64);
                hi[k] = hi[k].max(p[k] as f64);
            }
        }
        if points.is_empty() {
            lo = [0.0; 3];
            hi = [0.0; 3];
        }
        let res = resolution_m;
        let width = (((hi[0] - lo[0]) / res).floor() as u32 + 1).min(1 << 15);
        let height = (((hi[1] - lo[1]) / res).floor() as u32 + 1).min(1 << 15);
        let meta = RasterMeta {
            origin_x: lo[0],
            origin_y: lo[1] + height as f64 * res,
            resolution_m: res,
            width,
            height,
            height_base_m: lo[2],
        };
        let n = (width as usize) * (height as usize);
        let mut h = vec![f32::NAN; n];
        let mut sum = vec![0f32; n];
        let mut count = vec![0u32; n];
        for p in points {
            if let Some((u, v)) = meta.pixel([p[0] as f64, p[1] as f64]) {
                let i = v as usize * width as usize + u as usize;
                let z = (p[2] as f64 - lo[2]) as f32;
                h[i] = if h[i].is_nan() { z } else { h[i].max(z) };
                sum[i] += p[3];
                count[i] += 1;
            }
        }
        let intensity = sum
            .iter()
            .zip(&count)
            .map(|(s, c)| {
                if *c == 0 {
                    0.0
                } else {
                    (s / *c as f32).clamp(0.0, 1.0)
                }
            })
            .collect();
        Raster {
            meta,
            height: h,
            intensity,
        }
    }

    /// Writes `bev.json` and the two PNGs into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), RasterError> {
        let meta_path = dir.join(META);
        std::fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&self.meta).unwrap_or_default(),
        )
        .map_err(|source| RasterError::Io {
            path: meta_path.display().to_string(),
            source,
        })?;
        let heights: Vec<u8> = self
            .height
            .iter()
            .flat_map(|h| {
                let mm = if h.is_nan() {
                    0
                } else {
                    ((h * 1000.0).round() as u32 + 1).min(65535) as u16
                };
                mm.to_be_bytes()
            })
            .collect();
        write_png(
            &dir.join(HEIGHT_PNG),
            self.meta.width,
            self.meta.height,
            png::BitDepth::Sixteen,
            &heights,
        )?;
        let intensity: Vec<u8> = self
            .intensity
            .iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        write_png(
            &dir.join(INTENSITY_PNG),
            self.meta.width,
            self.meta.height,
            png::BitDepth::Eight,
            &intensity,
        )
    }

    /// Reads what [`Raster::write`] wrote.
    pub fn read(dir: &Path) -> Result<Raster, RasterError> {
        let meta_path = dir.join(META);
        let bytes = std::fs::read(&meta_path).map_err(|source| RasterError::Io {
            path: meta_path.display().to_string(),
            source,
        })?;
        let meta: RasterMeta = serde_json::from_slice(&bytes).map_err(|e| RasterError::Bad {
            path: meta_path.display().to_string(),
            message: e.to_string(),
        })?;
        let (w, h, hb) = read_png(&dir.join(HEIGHT_PNG))?;
        let (w2, h2, ib) = read_png(&dir.join(INTENSITY_PNG))?;
        if (w, h) != (meta.width, meta.height) || (w2, h2) != (w, h) {
            return Err(RasterError::Bad {
                path: dir.display().to_string(),
                message: format!(
                    "raster sizes disagree: bev.json {}x{}, height {w}x{h}, intensity {w2}x{h2}",
                    meta.width, meta.height
                ),
            });
        }
        let height = hb
            .chunks_exact(2)
            .map(|c| match u16::from_be_bytes([c[0], c[1]]) {
                0 => f32::NAN,
                mm => (mm - 1) as f32 / 1000.0,
            })
            .collect();
        let intensity = ib.iter().map(|v| *v as f32 / 255.0).collect();
        Ok(Raster {
            meta,
            height,
            intensity,
        })
    }

    /// Bilinear-free nearest sample of the intensity at a map point (0 outside).
    pub fn intensity_at(&self, p: [f64; 2]) -> f32 {
        self.meta
            .pixel(p)
            .map(|(u, v)| self.intensity[v as usize * self.meta.width as usize + u as usize])
            .unwrap_or(0.0)
    }

    /// The share of a closed outline's length (map frame) along which the raster shows paint:
    /// sampled every half cell, a sample is painted when some cell within `tolerance_m` of it is
    /// at least `min_intensity` bright. A parking slot's painted lines show along most of its
    /// outline (all but an open entrance); a detector's ghost, in the aisle or across slots,
    /// along little of it.
    pub fn painted_share(&self, outline: &[[f64; 2]], tolerance_m: f64, min_intensity: f32) -> f64 {
        let res = self.meta.resolution_m;
        let reach = (tolerance_m / res).ceil() as i64;
        let w = self.meta.width as i64;
        let h = self.meta.height as i64;
        let (mut samples, mut painted) = (0usize, 0usize);
        for (i, a) in outline.iter().enumerate() {
            let b = outline[(i + 1) % outline.len()];
            let steps = ((b[0] - a[0]).hypot(b[1] - a[1]) / (res / 2.0))
                .ceil()
                .max(1.0) as usize;
            for k in 0..steps {
                let t = (k as f64 + 0.5) / steps as f64;
                let p = [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])];
                let [u, v] = self.meta.to_pixel(p).map(|c| c.floor() as i64);
                samples += 1;
                let bright = (-reach..=reach).any(|dv| {
                    (-reach..=reach).any(|du| {
                        let (x, y) = (u + du, v + dv);
                        x >= 0
                            && y >= 0
                            && x < w
                            && y < h
                            && self.intensity[(y * w + x) as usize] >= min_intensity
                    })
                });
                painted += usize::from(bright);
            }
        }
        if samples == 0 {
            0.0
        } else {
            painted as f64 / samples as f64
        }
    }

    /// Nearest sample of the height at a map point (0 where there is none).
    pub fn height_at(&self, p: [f64; 2]) -> f32 {
        self.meta
            .pixel(p)
            .map(|(u, v)| self.height[v as usize * self.meta.width as usize + u as usize])
            .filter(|h| !h.is_nan())
            .unwrap_or(0.0)
    }
}

fn write_png(
    path: &Path,
    w: u32,
    h: u32,
    depth: png::BitDepth,
    data: &[u8],
) -> Result<(), RasterError> {
    let err = |message: String| RasterError::Bad {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::create(path).map_err(|source| RasterError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(depth);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
    writer
        .write_image_data(data)
        .map_err(|e| err(e.to_string()))?;
    writer.finish().map_err(|e| err(e.to_string()))
}

/// Encodes an 8-bit grayscale image as PNG bytes.
pub fn png_bytes(w: u32, h: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        if let Ok(mut writer) = enc.write_header() {
            let _ = writer.write_image_data(data);
        }
    }
    out
}

fn read_png(path: &Path) -> Result<(u32, u32, Vec<u8>), RasterError> {
    let err = |message: String| RasterError::Bad {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| RasterError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let dec = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = dec.read_info().map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| err(e.to_string()))?;
    buf.truncate(info.buffer_size());
    Ok((info.width, info.height, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raster_round_trips_through_png() {
        let pts = [
            [0.0, 0.0, 0.0, 0.5],
            [1.0, 2.0, 1.5, 1.0],
            [1.04, 2.01, 0.5, 0.0f32],
        ];
        let r = Raster::from_points(&pts, 0.1);
        assert_eq!((r.meta.width, r.meta.height), (11, 21));
        assert_eq!(
            r.meta.pixel([1.0, 2.0]),
            Some((10, 0)),
            "top row is the largest y"
        );
        assert_eq!(r.meta.pixel([0.0, 0.0]), Some((0, 20)));
        assert!(
            (r.height_at([1.0, 2.0]) - 1.5).abs() < 1e-6,
            "max height of the cell"
        );
        assert!(
            (r.intensity_at([1.0, 2.0]) - 0.5).abs() < 1e-6,
            "mean intensity of the cell"
        );
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
        let back = Raster::read(dir.path()).unwrap();
        assert_eq!(back.meta, r.meta);
        assert!((back.height_at([1.0, 2.0]) - 1.5).abs() < 1e-3);
        assert!((back.intensity_at([0.0, 0.0]) - 0.5).abs() < 0.01);
        assert!(back.height[5].is_nan(), "no return stays no return");
    }

    #[test]
    fn an_outline_along_painted_lines_shows_paint_and_one_off_them_does_not() {
        // Paint along y = 0 and x = 0 from 0 to 4 m, dull ground elsewhere in a 5 m square.
        let mut pts = Vec::new();
        for i in 0..=50 {
            for j in 0..=50 {
                let (x, y) = (i as f32 * 0.1, j as f32 * 0.1);
                let paint = (j == 0 || i == 0) && x <= 4.0 && y <= 4.0;
                pts.push([x, y, 0.0, if paint { 0.9 } else { 0.1 }]);
            }
        }
        let r = Raster::from_points(&pts, 0.1);
        let square = |o: f64| [[o, o], [o + 4.0, o], [o + 4.0, o + 4.0], [o, o + 4.0]];
        let on = r.painted_share(&square(0.0), 0.1, 0.5);
        assert!(
            (0.45..0.55).contains(&on),
            "two of four edges painted: {on}"
        );
        let off = r.painted_share(&square(-1.0), 0.1, 0.5);
        assert!(off < 0.1, "crossing the lines only: {off}");
    }
}
