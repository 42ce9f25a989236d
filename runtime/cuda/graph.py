"""An ONNX model as the GPU executor needs it: nodes in order, attributes as Python values, weights as torch tensors.

Loaded with ``onnx`` (external data included, read from the model's folder) once, then held as plain Python: each
:class:`Node` keeps its op type, domain, input/output names (``""`` for an absent optional input) and attributes
(ints, floats, strings, lists of them, tensors as numpy arrays). Initializers move to the target device one at a
time, each released from the protobuf once moved, so the host holds about one copy of the weights at a time.

Limits: the main graph only (a node with a subgraph attribute, If/Loop/Scan, is refused by the executor); tensor
inputs and outputs only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

__all__ = ["Node", "TensorSpec", "LoadedGraph", "load_graph", "torch_dtype", "ONNX_TO_TORCH"]

#: ONNX element types the executor computes with (float8 weights are read through DequantizeLinear)
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
}


def torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type (ValueError when the executor has none)."""
    try:
        return ONNX_TO_TORCH[elem_type]
    except KeyError:
        raise ValueError(f"element type {onnx.TensorProto.DataType.Name(elem_type)} is not supported by the GPU "
                         f"executor") from None


@dataclasses.dataclass(frozen=True)
class Node:
    """One ONNX node: ``domain`` is ``""`` for the default domain (``ai.onnx`` is normalised to it)."""

    op_type: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: dims are ints when fixed, str (symbolic) or None when dynamic."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str | None, ...] | None


@dataclasses.dataclass
class LoadedGraph:
    """The executor's view of a model: nodes in topological order, weights on the device, opsets, metadata."""

    nodes: list[Node]
    initializers: dict[str, torch.Tensor]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opsets: dict[str, int]
    metadata: dict[str, str]


def _attribute(attr: onnx.AttributeProto) -> Any:
    kind = attr.type
    if kind in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise ValueError(f"attribute {attr.name!r} is a subgraph: control flow (If/Loop/Scan) is not supported by "
                         f"the GPU executor")
    if kind == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if kind == onnx.AttributeProto.TENSORS:
        return [numpy_helper.to_array(t) for t in attr.tensors]
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


def _spec(info: onnx.ValueInfoProto) -> TensorSpec:
    tensor = info.type.tensor_type
    if not info.type.HasField("tensor_type"):
        raise ValueError(f"graph input/output {info.name!r} is not a tensor: the GPU executor takes tensors only")
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return TensorSpec(info.name, torch_dtype(tensor.elem_type), shape)


def _tensor(proto: onnx.TensorProto, device: torch.device) -> torch.Tensor:
    array = numpy_helper.to_array(proto)
    if array.dtype.name.startswith("float8"):  # ml_dtypes' float8 arrays: carry the bytes, view them in torch
        raw = torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())
        return raw.view(torch_dtype(proto.data_type)).to(device)
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # numpy_helper may return a view of the protobuf's bytes
        array = array.copy()
    return torch.from_numpy(array).to(device)


def load_graph(path: str | os.PathLike[str], device: torch.device | str) -> LoadedGraph:
    """Read ``path`` (and its external data) into a :class:`LoadedGraph` with the weights on ``device``."""
    device = torch.device(device)
    model = onnx.load(str(Path(path)))
    graph = model.graph
    initializers: dict[str, torch.Tensor] = {}
    while graph.initializer:  # move one weight at a time and drop its protobuf copy
        proto = graph.initializer.pop()
        initializers[proto.name] = _tensor(proto, device)
    nodes = [Node(n.op_type, "" if n.domain == "ai.onnx" else n.domain, n.name, tuple(n.input), tuple(n.output),
                  {a.name: _attribute(a) for a in n.attribute}) for n in graph.node]
    inputs = [_spec(i) for i in graph.input if i.name not in initializers]
    outputs = [_spec(o) for o in graph.output]
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    metadata = {p.key: p.value for p in model.metadata_props}
    return LoadedGraph(nodes, initializers, inputs, outputs, opsets, metadata)
