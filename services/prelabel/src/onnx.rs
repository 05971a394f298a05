//! The BevSlots model backend: an ONNX model run on a pure-Rust runtime (tract), so a trained
//! model file drops in without a Python or CUDA install.
//!
//! The contract a model must meet:
//! - **Input** `[1, 2, S, S]` float32 (S fixed in the model): an ego-centred crop of the BEV base
//!   map at the map's resolution, channel 0 the height above the map's lowest point (metres),
//!   channel 1 the intensity in [0, 1]. Row `r`, column `c` is the ego-frame point
//!   `x = (S/2 - r - 0.5) * res` (ahead), `y = (S/2 - c - 0.5) * res` (left).
//! - **Output** `[1, N, 9]` (or `[N, 9]`) float32: per proposal the four corners in the ego frame,
//!   metres (`x0 y0 x1 y1 x2 y2 x3 y3`, entrance corners first), then the confidence. Proposals
//!   under the score threshold are ignored.
//!
//! No trained BevSlots weights exist here; the tests build a small ONNX graph that meets the
//! contract (its slots are constants, its confidence reads the input) and run it through this
//! very code.

use motorpool_labeling::LabelError;
use motorpool_labeling::geom::{Pose, Slot};
use motorpool_labeling::raster::Raster;
use std::path::Path;
use tract_onnx::prelude::*;

pub struct OnnxDetector {
    plan: std::sync::Arc<TypedSimplePlan>,
    size: usize,
    raster: Raster,
    threshold: f64,
    model: String,
}

impl std::fmt::Debug for OnnxDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxDetector")
            .field("model", &self.model)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl OnnxDetector {
    /// Loads and optimises the model; checks its input against the contract.
    pub fn load(path: &Path, raster: Raster, threshold: f64) -> Result<OnnxDetector, LabelError> {
        let name = path.display().to_string();
        let bad = |what: String| LabelError::Input(format!("model {name}: {what}"));
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| bad(format!("cannot load: {e:#}")))?
            .into_typed()
            .map_err(|e| bad(format!("cannot type the graph: {e:#}")))?;
        let fact = model
            .input_fact(0)
            .map_err(|e| bad(format!("no input: {e:#}")))?;
        let shape: Vec<usize> = fact
            .shape
            .as_concrete()
            .map(|s| s.to_vec())
            .ok_or_else(|| bad(format!("input shape {:?} is not fixed", fact.shape)))?;
        let size = match shape.as_slice() {
            [1, 2, h, w] if h == w && *h > 0 => *h,
            other => {
                return Err(bad(format!("input shape {other:?} is not [1, 2, S, S]")));
            }
        };
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| bad(format!("cannot prepare: {e:#}")))?;
        Ok(OnnxDetector {
            plan,
            size,
            raster,
            threshold,
            model: name,
        })
    }

    /// The model's input for a car at `pose`: `[2, S, S]` values, channel-major.
    pub fn crop(&self, pose: &Pose) -> Vec<f32> {
        let s = self.size;
        let res = self.raster.meta.resolution_m;
        let mut data = vec![0f32; 2 * s * s];
        let half = s as f64 / 2.0;
        for r in 0..s {
            for c in 0..s {
                let ego = [(half - r as f64 - 0.5) * res, (half - c as f64 - 0.5) * res];
                let m = pose.to_map(ego);
                data[r * s + c] = self.raster.height_at(m);
                data[s * s + r * s + c] = self.raster.intensity_at(m);
            }
        }
        data
    }

    /// The slots the model sees from `pose`, ego frame.
    pub fn detect(&self, clip: &str, frame: u32, pose: &Pose) -> Result<Vec<Slot>, LabelError> {
        let s = self.size;
        let err = |what: String| {
            LabelError::Input(format!(
                "clip {clip}, frame {frame}: model {}: {what}",
                self.model
            ))
        };
        let input = tract_ndarray::Array4::from_shape_vec((1, 2, s, s), self.crop(pose))
            .map_err(|e| err(e.to_string()))?;
        let out = self
            .plan
            .run(tvec!(Tensor::from(input).into()))
            .map_err(|e| err(format!("{e:#}")))?;
        let view = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| err(format!("output is not float32: {e:#}")))?;
        let shape = view.shape().to_vec();
        let rows = match shape.as_slice() {
            [1, n, 9] | [n, 9] => *n,
            other => return Err(err(format!("output shape {other:?} is not [1, N, 9]"))),
        };
        let flat: Vec<f32> = view.iter().copied().collect();
        let mut slots = Vec::new();
        for row in flat.chunks_exact(9).take(rows) {
            if row.iter().any(|v| !v.is_finite()) {
                return Err(err("a proposal is not finite".into()));
            }
            let score = row[8] as f64;
            if score < self.threshold {
                continue;
            }
            slots.push(Slot {
                corners: std::array::from_fn(|i| [row[2 * i] as f64, row[2 * i + 1] as f64]),
                score: score.clamp(0.0, 1.0),
            });
        }
        Ok(slots)
    }
}

/// Builds ONNX models that meet the contract, for tests and demos (no trained weights exist
/// here).
pub mod testing {
    use prost::Message;
    use tract_onnx::pb;

    fn dims(d: &[i64]) -> Option<pb::TypeProto> {
        Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: d
                        .iter()
                        .map(|v| pb::tensor_shape_proto::Dimension {
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(*v)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        })
    }

    fn tensor(name: &str, d: &[i64], data: Vec<f32>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: d.to_vec(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: data,
            ..Default::default()
        }
    }

    fn node(
        op: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<pb::AttributeProto>,
    ) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            name: output.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        }
    }

    /// A model with input `[1, 2, size, size]` whose output is `slots` (ego-frame corners and a
    /// base score each) with the mean of the input added to every score: the slots are fixed,
    /// the confidence shows the crop reached the model.
    pub fn fixed_slots_model(size: i64, slots: &[([[f32; 2]; 4], f32)]) -> Vec<u8> {
        let n = slots.len() as i64;
        let base: Vec<f32> = slots
            .iter()
            .flat_map(|(c, s)| c.iter().flatten().copied().chain([*s]).collect::<Vec<_>>())
            .collect();
        let mask: Vec<f32> = slots
            .iter()
            .flat_map(|_| [0.0f32; 8].into_iter().chain([1.0]))
            .collect();
        let graph = pb::GraphProto {
            name: "fixed-slots".into(),
            node: vec![
                node(
                    "ReduceMean",
                    &["bev"],
                    "mean",
                    vec![pb::AttributeProto {
                        name: "keepdims".into(),
                        r#type: pb::attribute_proto::AttributeType::Int as i32,
                        i: 0,
                        ..Default::default()
                    }],
                ),
                node("Mul", &["mean", "mask"], "bump", vec![]),
                node("Add", &["base", "bump"], "slots", vec![]),
            ],
            initializer: vec![
                tensor("base", &[1, n, 9], base),
                tensor("mask", &[1, n, 9], mask),
            ],
            input: vec![pb::ValueInfoProto {
                name: "bev".into(),
                r#type: dims(&[1, 2, size, size]),
                ..Default::default()
            }],
            output: vec![pb::ValueInfoProto {
                name: "slots".into(),
                r#type: dims(&[1, n, 9]),
                ..Default::default()
            }],
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 7,
            producer_name: "motorpool-tests".into(),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }
}
