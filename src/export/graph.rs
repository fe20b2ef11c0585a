//! A small builder for ONNX graphs: nodes with generated value names, initializers written
//! inline or to an external data file, typed graph inputs and outputs.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytes::Bytes;
use prost::Message;

use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto, tensor_shape_proto,
    type_proto,
};

/// ONNX element types we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    U8,
    I8,
    I64,
}

impl Elem {
    /// The ONNX `DataType` code (what a `Cast` node's `to` takes).
    pub fn code(self) -> i32 {
        use tensor_proto::DataType as D;
        (match self {
            Elem::F32 => D::Float,
            Elem::F16 => D::Float16,
            Elem::U8 => D::Uint8,
            Elem::I8 => D::Int8,
            Elem::I64 => D::Int64,
        }) as i32
    }
}

/// One axis of a graph input or output: fixed, or named and dynamic.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(usize),
    Named(&'static str),
}

/// The standard ONNX domain.
pub const ONNX_DOMAIN: &str = "";
/// ONNX Runtime's contrib operators.
pub const MS_DOMAIN: &str = "com.microsoft";
/// Opset of the standard domain we target (LayerNormalization needs 17).
pub const OPSET: i64 = 17;
/// IR version matching [`OPSET`].
const IR_VERSION: i64 = 8;
/// Initializers at least this large go to the external data file when one is used.
const EXTERNAL_MIN_BYTES: usize = 1024;
/// External data offsets are aligned so ONNX Runtime can map them directly.
const EXTERNAL_ALIGN: u64 = 4096;

/// An attribute value.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

struct ExternalData {
    location: String,
    writer: BufWriter<File>,
    offset: u64,
}

/// Builds one graph; [`GraphBuilder::finish`] writes the model file.
pub struct GraphBuilder {
    graph: GraphProto,
    uses_ms_domain: bool,
    counter: usize,
    external: Option<ExternalData>,
    /// The type of float initializers and constants: `F32`, or `F16` for a GPU graph.
    float: Elem,
}

impl GraphBuilder {
    /// A builder whose large initializers go to `external_data` (a path beside the model) when
    /// given, or inline otherwise.
    pub fn new(name: &str, external_data: Option<&Path>) -> Result<Self> {
        let external = match external_data {
            Some(path) => {
                let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
                let location = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .context("external data file name is not UTF-8")?
                    .to_string();
                Some(ExternalData {
                    location,
                    writer: BufWriter::with_capacity(1 << 22, file),
                    offset: 0,
                })
            }
            None => None,
        };
        Ok(Self {
            graph: GraphProto {
                name: name.to_string(),
                ..Default::default()
            },
            uses_ms_domain: false,
            counter: 0,
            external,
            float: Elem::F32,
        })
    }

    /// Writes float initializers and constants as `float` (`F32` or `F16`) from now on.
    pub fn set_float(&mut self, float: Elem) {
        self.float = float;
    }

    /// The type float initializers and constants are written in.
    pub fn float(&self) -> Elem {
        self.float
    }

    /// A value name not used before in this graph.
    pub fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// Adds a node with explicit output names in `domain`.
    pub fn node_in(&mut self, domain: &str, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        if domain == MS_DOMAIN {
            self.uses_ms_domain = true;
        }
        let name = self.fresh(op);
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name,
            op_type: op.to_string(),
            domain: domain.to_string(),
            attribute: attrs.into_iter().map(|(n, a)| attribute(n, a)).collect(),
            ..Default::default()
        });
    }

    /// Adds a standard-domain node with one generated output name, returned.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.op_in(ONNX_DOMAIN, op, inputs, attrs)
    }

    /// Adds a node in `domain` with one generated output name, returned.
    pub fn op_in(&mut self, domain: &str, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.node_in(domain, op, inputs, &[&out], attrs);
        out
    }

    /// Adds an initializer from raw little-endian bytes and returns its name.
    pub fn initializer(&mut self, name: &str, elem: Elem, dims: &[usize], raw: Vec<u8>) -> Result<String> {
        let mut tensor = TensorProto {
            name: name.to_string(),
            data_type: elem.code(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        match &mut self.external {
            Some(ext) if raw.len() >= EXTERNAL_MIN_BYTES => {
                let pad = ext.offset.next_multiple_of(EXTERNAL_ALIGN) - ext.offset;
                ext.writer.write_all(&vec![0u8; pad as usize])?;
                ext.offset += pad;
                ext.writer.write_all(&raw)?;
                let entry = |k: &str, v: String| StringStringEntryProto {
                    key: k.into(),
                    value: v,
                };
                tensor.external_data = vec![
                    entry("location", ext.location.clone()),
                    entry("offset", ext.offset.to_string()),
                    entry("length", raw.len().to_string()),
                ];
                tensor.data_location = tensor_proto::DataLocation::External as i32;
                ext.offset += raw.len() as u64;
            }
            _ => tensor.raw_data = Bytes::from(raw),
        }
        self.graph.initializer.push(tensor);
        Ok(name.to_string())
    }

    /// A float initializer, in the builder's float type.
    pub fn float_init(&mut self, name: &str, dims: &[usize], values: &[f32]) -> Result<String> {
        let raw = float_bytes(self.float, values);
        self.initializer(name, self.float, dims, raw)
    }

    /// An `i64` 1-D constant with a generated name.
    pub fn i64s(&mut self, values: &[i64]) -> String {
        let name = self.fresh("const");
        self.graph.initializer.push(TensorProto {
            name: name.clone(),
            data_type: Elem::I64.code(),
            dims: vec![values.len() as i64],
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    /// A scalar constant with a generated name.
    pub fn scalar_i64(&mut self, value: i64) -> String {
        let name = self.fresh("const");
        self.graph.initializer.push(TensorProto {
            name: name.clone(),
            data_type: Elem::I64.code(),
            int64_data: vec![value],
            ..Default::default()
        });
        name
    }

    /// A scalar float constant with a generated name, in the builder's float type.
    pub fn scalar_float(&mut self, value: f32) -> String {
        let name = self.fresh("const");
        self.graph.initializer.push(TensorProto {
            name: name.clone(),
            data_type: self.float.code(),
            raw_data: Bytes::from(float_bytes(self.float, &[value])),
            ..Default::default()
        });
        name
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim]) {
        self.graph.input.push(value_info(name, elem, dims));
    }

    /// Declares a graph output.
    pub fn output(&mut self, name: &str, elem: Elem, dims: &[Dim]) {
        self.graph.output.push(value_info(name, elem, dims));
    }

    /// Writes the model to `path` (and flushes the external data file) and returns the paths
    /// written.
    pub fn finish(self, path: &Path, metadata: &[(&str, String)]) -> Result<Vec<PathBuf>> {
        let mut written = vec![path.to_path_buf()];
        if let Some(ext) = self.external {
            let file = ext.writer.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            written.push(path.with_file_name(&ext.location));
        }
        let mut opset_import = vec![OperatorSetIdProto {
            domain: ONNX_DOMAIN.into(),
            version: OPSET,
        }];
        if self.uses_ms_domain {
            opset_import.push(OperatorSetIdProto {
                domain: MS_DOMAIN.into(),
                version: 1,
            });
        }
        let model = ModelProto {
            ir_version: IR_VERSION,
            producer_name: "distill-serve".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            opset_import,
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: k.to_string(),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        };
        std::fs::write(path, model.encode_to_vec()).with_context(|| format!("writing {}", path.display()))?;
        Ok(written)
    }
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    match value {
        Attr::Int(i) => {
            a.i = i;
            a.r#type = AttributeType::Int as i32;
        }
        Attr::Ints(v) => {
            a.ints = v;
            a.r#type = AttributeType::Ints as i32;
        }
        Attr::Float(f) => {
            a.f = f;
            a.r#type = AttributeType::Float as i32;
        }
    }
    a
}

fn value_info(name: &str, elem: Elem, dims: &[Dim]) -> ValueInfoProto {
    use tensor_shape_proto::{Dimension, dimension::Value};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => Value::DimValue(*n as i64),
                Dim::Named(s) => Value::DimParam(s.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem.code(),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        ..Default::default()
    }
}

/// `values` as little-endian `F32` or `F16` (rounded to nearest) bytes.
fn float_bytes(float: Elem, values: &[f32]) -> Vec<u8> {
    match float {
        Elem::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}
