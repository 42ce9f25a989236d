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
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qcompiler.runtime._model_file import ModelFile, ModelFileError, open_model_file

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
    overridable: list[TensorSpec] = dataclasses.field(default_factory=list)  # graph inputs with an initializer


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


def _read_checked(source: str | os.PathLike[str] | ModelFile) -> onnx.ModelProto:
    """The model with its external data read in from the checked files (never opened again by path)."""
    model_file = source if isinstance(source, ModelFile) else open_model_file(source)
    model = onnx.ModelProto.FromString(model_file.blob)
    if not model_file.refs:
        return model
    filled = 0
    with model_file.external_files() as buffers:
        for tensor in _all_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            filled += 1
            info = {e.key: e.value for e in tensor.external_data}
            data = buffers[info["location"]]
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") else len(data) - offset
            tensor.raw_data = bytes(data[offset:offset + length])
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    if filled != len(model_file.refs):  # the checked walk and this one must agree on every tensor
        raise ModelFileError(f"{model_file.path}: {len(model_file.refs)} tensors name external data, the GPU executor "
                             f"reads {filled} of them; refusing to load")
    return model


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            yield from _attribute_tensors(attr)


def _attribute_tensors(attr: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    for sparse in [attr.sparse_tensor] * attr.HasField("sparse_tensor") + list(attr.sparse_tensors):
        yield sparse.values
        yield sparse.indices
    for sub in [attr.g] * attr.HasField("g") + list(attr.graphs):
        yield from _graph_tensors(sub)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model, in the places :mod:`qcompiler.runtime._external_data` walks."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                yield from _attribute_tensors(attr)
        for attr in function.attribute_proto:
            yield from _attribute_tensors(attr)
    for info in model.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)


def load_graph(path: str | os.PathLike[str] | ModelFile, device: torch.device | str) -> LoadedGraph:
    """Read ``path`` (and its external data, checked as :class:`qcompiler.runtime.Session` checks it) into a
    :class:`LoadedGraph` with the weights on ``device``."""
    device = torch.device(device)
    model = _read_checked(path)
    graph = model.graph
    initializers: dict[str, torch.Tensor] = {}
    while graph.initializer:  # move one weight at a time and drop its protobuf copy
        proto = graph.initializer.pop()
        initializers[proto.name] = _tensor(proto, device)
    nodes = [Node(n.op_type, "" if n.domain == "ai.onnx" else n.domain, n.name, tuple(n.input), tuple(n.output),
                  {a.name: _attribute(a) for a in n.attribute}) for n in graph.node]
    inputs = [_spec(i) for i in graph.input if i.name not in initializers]
    overridable = [_spec(i) for i in graph.input if i.name in initializers]
    outputs = [_spec(o) for o in graph.output]
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    metadata = {p.key: p.value for p in model.metadata_props}
    return LoadedGraph(nodes, initializers, inputs, outputs, opsets, metadata, overridable)
