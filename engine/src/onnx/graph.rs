//! A small ONNX graph builder: values are named as they are made, constants become initializers, and every
//! value carries the shape known at export time (the batch is the only dimension left dynamic after the
//! in-graph resize, so each layer's padding is worked out here, as Loupe's own code works it out per call).

use super::proto::{
    attribute_type, data_type, AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TensorTypeProto, TypeProto,
    ValueInfoProto,
};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// ONNX operator set the graphs are written against (18: `Resize` with `antialias`, `ReduceMax` axes as input).
pub const OPSET: i64 = 18;
/// IR version 8 goes with opset 18.
pub const IR_VERSION: i64 = 8;

/// A value in the graph: its name and the size of each dimension, `None` where dynamic.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub name: String,
    pub shape: Vec<Option<usize>>,
}

impl Value {
    /// The absent optional input (ONNX's empty name).
    pub fn absent() -> Value {
        Value { name: String::new(), shape: Vec::new() }
    }

    /// Dimension `axis`, which must be known.
    pub fn dim(&self, axis: usize) -> usize {
        self.shape[axis].unwrap_or_else(|| panic!("dimension {axis} of `{}` is dynamic", self.name))
    }

    pub fn with_shape(mut self, shape: Vec<Option<usize>>) -> Value {
        self.shape = shape;
        self
    }
}

/// A dimension of a graph input or output: fixed, or named and dynamic.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(usize),
    Dynamic(&'static str),
}

#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    names: usize,
    /// Bytes of initializer data so far.
    pub weight_bytes: usize,
    /// Initializers by a hash of their type, shape and bytes: a constant recorded twice (a backbone run on
    /// three scales, the same shape vector) is stored once.
    by_content: HashMap<u64, Vec<usize>>,
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(size) => DimensionValue::DimValue(*size as i64),
                Dim::Dynamic(name) => DimensionValue::DimParam(name.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type, shape: Some(TensorShapeProto { dim }) }),
        }),
        doc_string: String::new(),
    }
}

impl Graph {
    fn fresh_name(&mut self, hint: &str) -> String {
        self.names += 1;
        format!("{hint}_{}", self.names)
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim], doc: &str) -> Value {
        let mut info = value_info(name, elem_type, dims);
        info.doc_string = doc.into();
        self.inputs.push(info);
        let shape = dims.iter().map(|d| if let Dim::Fixed(s) = d { Some(*s) } else { None }).collect();
        Value { name: name.into(), shape }
    }

    /// A float scalar input whose default (an initializer of the same name) is `default`: a runtime may feed
    /// another value without the graph being written again.
    pub fn scalar_input_with_default(&mut self, name: &str, default: f32, doc: &str) -> Value {
        let value = self.input(name, FLOAT, &[], doc);
        self.weight_bytes += 4;
        self.initializers.push(TensorProto {
            data_type: FLOAT,
            name: name.into(),
            raw_data: default.to_le_bytes().to_vec(),
            ..Default::default()
        });
        value
    }

    /// Declares `value` a graph output under `name`.
    pub fn output(&mut self, value: &Value, name: &str, elem_type: i32, dims: &[Dim], doc: &str) {
        self.op("Identity", &[value], vec![]).rename_into(self, name);
        let mut info = value_info(name, elem_type, dims);
        info.doc_string = doc.into();
        self.outputs.push(info);
    }

    /// A float constant of the given shape (an initializer).
    pub fn floats(&mut self, hint: &str, shape: &[usize], values: &[f32]) -> Value {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{hint}: values do not fill the shape");
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(hint, data_type::FLOAT, shape, raw)
    }

    /// An int64 constant of the given shape (shapes, axes, indices).
    pub fn ints(&mut self, hint: &str, shape: &[usize], values: &[i64]) -> Value {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{hint}: values do not fill the shape");
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(hint, data_type::INT64, shape, raw)
    }

    /// A float scalar constant.
    pub fn scalar(&mut self, hint: &str, value: f32) -> Value {
        self.floats(hint, &[], &[value])
    }

    fn initializer(&mut self, hint: &str, data_type: i32, shape: &[usize], raw_data: Vec<u8>) -> Value {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let shape = shape.iter().map(|&d| Some(d)).collect();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (data_type, &dims, &raw_data).hash(&mut hasher);
        let key = hasher.finish();
        let same = |t: &TensorProto| t.data_type == data_type && t.dims == dims && t.raw_data == raw_data;
        if let Some(&index) = self.by_content.get(&key).and_then(|v| v.iter().find(|&&i| same(&self.initializers[i]))) {
            return Value { name: self.initializers[index].name.clone(), shape };
        }
        let name = self.fresh_name(hint);
        self.weight_bytes += raw_data.len();
        self.by_content.entry(key).or_default().push(self.initializers.len());
        self.initializers.push(TensorProto { dims, data_type, name: name.clone(), raw_data, ..Default::default() });
        Value { name, shape }
    }

    /// One node with one output; the output's shape is left empty for the caller to set
    /// ([`Value::with_shape`]) where later layers need it.
    pub fn op(&mut self, op_type: &str, inputs: &[&Value], attributes: Vec<AttributeProto>) -> Value {
        let name = self.fresh_name(&op_type.to_ascii_lowercase());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|v| v.name.clone()).collect(),
            output: vec![name.clone()],
            name: name.clone(),
            op_type: op_type.into(),
            attribute: attributes,
            ..Default::default()
        });
        Value { name, shape: Vec::new() }
    }

    /// One node with `count` outputs (`TopK`'s values and indices).
    pub fn op_outputs(
        &mut self,
        op_type: &str,
        inputs: &[&Value],
        attributes: Vec<AttributeProto>,
        count: usize,
    ) -> Vec<Value> {
        let name = self.fresh_name(&op_type.to_ascii_lowercase());
        let outputs: Vec<String> = (0..count).map(|i| format!("{name}_{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|v| v.name.clone()).collect(),
            output: outputs.clone(),
            name,
            op_type: op_type.into(),
            attribute: attributes,
            ..Default::default()
        });
        outputs.into_iter().map(|name| Value { name, shape: Vec::new() }).collect()
    }

    /// The model: this graph, the opset, and `metadata` as `metadata_props`.
    pub fn into_model(self, name: &str, producer_version: &str, metadata: Vec<(String, String)>) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
            producer_name: "loupe".into(),
            producer_version: producer_version.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.into(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata.into_iter().map(|(key, value)| StringStringEntryProto { key, value }).collect(),
            ..Default::default()
        }
    }
}

impl Value {
    /// Renames the value (the output of the last node made) to `name`: graph outputs carry fixed names.
    fn rename_into(self, graph: &mut Graph, name: &str) {
        let node = graph.nodes.last_mut().expect("a node was just made");
        assert_eq!(node.output[0], self.name, "only the last node's output can be renamed");
        node.output[0] = name.into();
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INT, i: value, ..Default::default() }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INTS, ints: values.to_vec(), ..Default::default() }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::FLOAT, f: value, ..Default::default() }
}

pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::STRING,
        s: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// The scalar data types in names the rest of the code reads.
pub use data_type::{BOOL, FLOAT, INT64, UINT8};
