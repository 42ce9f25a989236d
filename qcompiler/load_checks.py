"""Refuse a malformed model at load with one line, and turn the valid-but-unusual forms into ones the IR keeps.

:func:`check_and_normalize` runs on the parsed ``ModelProto`` before onnx-ir sees it, so a malformed model is refused
before any pass runs (not by a pass halfway, nor by ONNX Runtime after an output was written):

1. Opset imports: each domain once; a version in the range the onnx package knows for its own domains (positive
   for others). IR version at most the onnx package's.
2. Every tensor (initializers, sparse tensors, node attributes, subgraphs, functions and their attribute defaults,
   training info): a known data type, no negative dimension, a byte size that fits in memory arithmetic, and its
   data present *exactly*: ``raw_data`` of the size the type and shape need (the ONNX checker only says "too
   small"), or the typed field with the right count; no ``raw_data`` for strings.
3. Graph inputs, outputs and value_info: no negative dimension.
4. Sparse initializers become dense ones, and so does a Constant's ``sparse_value`` (ONNX Runtime accepts them;
   onnx-ir would drop the first and cannot serialize the second): indices checked against the shape, the dense size
   bounded.
5. The ONNX checker with full checking, on a copy without weight bytes (initializers over 1 KiB and external ones
   become typed graph inputs, so a 2 GB model is not copied): topological order, values read before they are
   defined (or never), cycles, recursive functions, ops unknown at the declared opset, attributes, shape
   inference conflicts.

Limits: ops of domains the onnx package has no schemas for (``com.microsoft``, custom ones) are checked for
structure only; an external tensor in a node attribute is checked with zeros of its size in the checker's copy
(at most :data:`MAX_ATTRIBUTE_EXTERNAL_BYTES`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from qcompiler.errors import InputError
from qcompiler.runtime._external_data import CheckedFiles, tensor_nbytes

__all__ = ["MAX_DENSE_SPARSE_BYTES", "check_and_normalize", "tensor_data"]

logger = logging.getLogger(__name__)

#: A sparse initializer is made dense only up to this many bytes.
MAX_DENSE_SPARSE_BYTES = 1 << 31
#: An external tensor in a node attribute is given to the checker as zeros up to this size (else refused).
MAX_ATTRIBUTE_EXTERNAL_BYTES = 64 << 20
_STRIP_BYTES = 1024
_MAX_BYTES = 1 << 62

# The typed field each data type keeps its values in, and how many values per element (packed types: per byte).
_INT32_TYPES = {TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16, TensorProto.UINT8,
                TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN,
                TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ,
                TensorProto.FLOAT8E8M0}
_PACKED = {TensorProto.INT4: 2, TensorProto.UINT4: 2, TensorProto.FLOAT4E2M1: 2, TensorProto.INT2: 4,
           TensorProto.UINT2: 4}


def _fail(path: Path, message: str) -> InputError:
    return InputError(f"{path}: {message}")


# ---------------------------------------------------------------------------------------------------------------
# Walking the proto
# ---------------------------------------------------------------------------------------------------------------
def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[TensorProto, str]]:
    for tensor in graph.initializer:
        yield tensor, f"{where} initializer"
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"{where} sparse initializer (values)"
        yield sparse.indices, f"{where} sparse initializer (indices)"
    for node in graph.node:
        for attr in node.attribute:
            yield from _attribute_tensors(attr, f"{where} node {node.name or node.op_type!r} attribute {attr.name!r}")


def _attribute_tensors(attr: onnx.AttributeProto, where: str) -> Iterator[tuple[TensorProto, str]]:
    if attr.HasField("t"):
        yield attr.t, where
    for tensor in attr.tensors:
        yield tensor, where
    sparse_list = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
    for sparse in sparse_list:
        yield sparse.values, f"{where} (sparse values)"
        yield sparse.indices, f"{where} (sparse indices)"
    graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
    for sub in graphs:
        yield from _graph_tensors(sub, f"{where} subgraph")


def _all_tensors(proto: onnx.ModelProto) -> Iterator[tuple[TensorProto, str]]:
    """Every tensor of the model with where it sits (the places :mod:`qcompiler.runtime._external_data` walks)."""
    yield from _graph_tensors(proto.graph, "graph")
    for function in proto.functions:
        where = f"function {function.name!r}"
        for node in function.node:
            for attr in node.attribute:
                yield from _attribute_tensors(attr, f"{where} node {node.name or node.op_type!r} attribute "
                                                    f"{attr.name!r}")
        for attr in function.attribute_proto:
            yield from _attribute_tensors(attr, f"{where} attribute default {attr.name!r}")
    for info in proto.training_info:
        yield from _graph_tensors(info.initialization, "training info initialization")
        yield from _graph_tensors(info.algorithm, "training info algorithm")


def _graphs(proto: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    pending = [proto.graph]
    for function in proto.functions:
        pending.extend(sub for node in function.node for attr in node.attribute
                       for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
    while pending:
        graph = pending.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    pending.append(attr.g)
                pending.extend(attr.graphs)


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------
def _check_opsets(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ir_version > onnx.IR_VERSION:
        raise _fail(path, f"declares IR version {proto.ir_version}, newer than this onnx package reads "
                          f"({onnx.IR_VERSION})")
    known = onnx.defs.C.schema_version_map()
    seen: set[str] = set()
    imports = [*proto.opset_import, *(o for f in proto.functions for o in f.opset_import)]
    for i, opset in enumerate(imports):
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if i < len(proto.opset_import):
            if domain in seen:
                raise _fail(path, f"imports the opset of domain {domain or 'ai.onnx'!r} twice")
            seen.add(domain)
        low, high = known.get(domain, (1, 2**31 - 1))
        if not low <= opset.version <= high:
            raise _fail(path, f"declares opset {opset.version} of domain {domain or 'ai.onnx'!r}; the versions that "
                              f"exist are {low} to {high}" if domain in known else
                              f"declares opset {opset.version} of domain {domain!r}; a version is a positive integer")


def _check_tensor(tensor: TensorProto, where: str, path: Path) -> None:
    label = f"tensor {tensor.name!r} ({where})"
    if tensor.data_type == TensorProto.UNDEFINED or tensor.data_type not in TensorProto.DataType.values():
        raise _fail(path, f"{label} has an unknown data type {tensor.data_type}")
    dims = tuple(tensor.dims)
    if any(d < 0 for d in dims):
        raise _fail(path, f"{label} has a negative dimension {list(dims)}")
    count = math.prod(dims)
    nbytes = tensor_nbytes(tensor.data_type, dims)
    if nbytes is not None and nbytes > _MAX_BYTES:
        raise _fail(path, f"{label} declares {list(dims)} elements, more than any memory holds")
    if tensor.data_location == TensorProto.EXTERNAL:
        return  # checked against its file by qcompiler.runtime._external_data
    raw = len(tensor.raw_data) if tensor.HasField("raw_data") else None
    if tensor.data_type == TensorProto.STRING:
        if raw is not None:
            raise _fail(path, f"{label} is a string tensor with raw_data (strings go in string_data)")
        have, field = len(tensor.string_data), "string_data"
        need = count
    elif raw is not None:
        if raw != nbytes:
            raise _fail(path, f"{label} has {raw} bytes of raw_data; its type and shape {list(dims)} need {nbytes}")
        return
    else:
        field, need = _typed_field(tensor.data_type, count)
        have = len(getattr(tensor, field)) if field else 0
    if have != need:
        if have == 0 and need:
            raise _fail(path, f"{label} of shape {list(dims)} has no data")
        raise _fail(path, f"{label} has {have} values in {field}; its shape {list(dims)} needs {need}")


def _typed_field(data_type: int, count: int) -> tuple[str | None, int]:
    if data_type == TensorProto.FLOAT:
        return "float_data", count
    if data_type == TensorProto.COMPLEX64:
        return "float_data", 2 * count
    if data_type == TensorProto.DOUBLE:
        return "double_data", count
    if data_type == TensorProto.COMPLEX128:
        return "double_data", 2 * count
    if data_type == TensorProto.INT64:
        return "int64_data", count
    if data_type in (TensorProto.UINT32, TensorProto.UINT64):
        return "uint64_data", count
    if data_type in _INT32_TYPES:
        return "int32_data", count
    if data_type in _PACKED:
        per = _PACKED[data_type]
        return "int32_data", (count + per - 1) // per
    return None, 0  # a type without a typed field (e.g. 6-bit floats): only raw_data can hold it


def _check_value_infos(proto: onnx.ModelProto, path: Path) -> None:
    for graph in _graphs(proto):
        for info in (*graph.input, *graph.output, *graph.value_info):
            if not info.type.HasField("tensor_type"):
                continue
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    raise _fail(path, f"value {info.name!r} declares a negative dimension {dim.dim_value}")


# ---------------------------------------------------------------------------------------------------------------
# Sparse initializers
# ---------------------------------------------------------------------------------------------------------------
def tensor_data(tensor: TensorProto, files: CheckedFiles) -> np.ndarray:
    """The values of a (checked) tensor; external data read through the checked files only."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    fd = files.open(info["location"])
    try:
        nbytes = tensor_nbytes(tensor.data_type, tuple(tensor.dims)) or 0
        blob = os.pread(fd, int(info.get("length") or nbytes), int(info.get("offset") or 0))
    finally:
        os.close(fd)
    inline = TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = blob
    return onnx.numpy_helper.to_array(inline)


def _densify(sparse: onnx.SparseTensorProto, files: CheckedFiles, path: Path) -> TensorProto:
    name = sparse.values.name
    dims = tuple(sparse.dims)
    label = f"sparse tensor {name!r}"
    if any(d < 0 for d in dims):
        raise _fail(path, f"{label} has a negative dimension {list(dims)}")
    nbytes = tensor_nbytes(sparse.values.data_type, dims)
    if nbytes is None or sparse.values.data_type == TensorProto.STRING:
        raise _fail(path, f"{label} has values of a type without a fixed size")
    if nbytes > MAX_DENSE_SPARSE_BYTES:
        raise _fail(path, f"{label} would take {nbytes} bytes dense, more than {MAX_DENSE_SPARSE_BYTES}")
    values = tensor_data(sparse.values, files).reshape(-1)
    indices = tensor_data(sparse.indices, files).astype(np.int64, copy=False)
    count = math.prod(dims)
    if indices.ndim == 2 and indices.shape == (values.size, len(dims)):
        if values.size and ((indices < 0) | (indices >= np.asarray(dims, np.int64))).any():
            raise _fail(path, f"{label} has an index outside its shape {list(dims)}")
        flat = np.ravel_multi_index(indices.T, dims) if values.size else np.zeros(0, np.int64)
    elif indices.reshape(-1).size == values.size and indices.ndim <= 1:
        flat = indices.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= count):
            raise _fail(path, f"{label} has an index outside its {count} elements")
    else:
        raise _fail(path, f"{label} has indices of shape {list(indices.shape)} for {values.size} values of a "
                          f"{len(dims)}-D tensor")
    dense = np.zeros(count, dtype=values.dtype)
    dense[flat] = values
    tensor = onnx.numpy_helper.from_array(dense.reshape(dims), name)
    if tensor.data_type != sparse.values.data_type:  # bfloat16/float8 arrays come back as their storage type
        tensor.data_type = sparse.values.data_type
    return tensor


def _densify_sparse_initializers(proto: onnx.ModelProto, files: CheckedFiles, path: Path) -> None:
    """Sparse initializers become dense initializers, and a Constant's ``sparse_value`` its dense ``value``."""
    for graph in _graphs(proto):
        if len(graph.sparse_initializer):
            dense = [_densify(sparse, files, path) for sparse in graph.sparse_initializer]
            del graph.sparse_initializer[:]
            graph.initializer.extend(dense)
            logger.info("%s: %d sparse initializer(s) made dense", path, len(dense))
        _densify_constants(graph.node, files, path)
    for function in proto.functions:
        _densify_constants(function.node, files, path)


def _densify_constants(nodes, files: CheckedFiles, path: Path) -> None:
    for node in nodes:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for i, attr in enumerate(node.attribute):
            if attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
                tensor = _densify(attr.sparse_tensor, files, path)
                node.attribute[i].CopyFrom(onnx.helper.make_attribute("value", tensor))


# ---------------------------------------------------------------------------------------------------------------
# The ONNX checker, without the weights
# ---------------------------------------------------------------------------------------------------------------
def _stub_external(tensor: TensorProto, path: Path, where: str) -> TensorProto:
    nbytes = tensor_nbytes(tensor.data_type, tuple(tensor.dims)) or 0
    if nbytes > MAX_ATTRIBUTE_EXTERNAL_BYTES:
        raise _fail(path, f"tensor {tensor.name!r} ({where}) keeps {nbytes} bytes of a node attribute in external "
                          "data; not supported")
    stub = TensorProto()
    stub.CopyFrom(tensor)
    del stub.external_data[:]
    stub.data_location = TensorProto.DEFAULT
    stub.raw_data = b"\0" * nbytes
    return stub


def _checker_graph(graph: onnx.GraphProto, path: Path, where: str, main: bool) -> onnx.GraphProto:
    """A copy of ``graph`` for the checker: big or external main-graph initializers become inputs; external
    tensors elsewhere become zeros (the checker would look for their files relative to the working directory)."""
    copy = onnx.GraphProto()
    copy.name = graph.name
    copy.input.extend(graph.input)
    copy.output.extend(graph.output)
    copy.value_info.extend(graph.value_info)
    input_names = {i.name for i in graph.input}
    for tensor in graph.initializer:
        external = tensor.data_location == TensorProto.EXTERNAL
        big = external or (tensor.ByteSize() > _STRIP_BYTES and tensor.data_type != TensorProto.STRING)
        if main and big:
            if tensor.name not in input_names:
                copy.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        elif external:
            copy.initializer.append(_stub_external(tensor, path, f"{where} initializer"))
        else:
            copy.initializer.append(tensor)
    for node in graph.node:
        copy.node.append(_checker_node(node, path, where))
    return copy


def _checker_node(node: onnx.NodeProto, path: Path, where: str) -> onnx.NodeProto:
    if not any(a.HasField("t") or a.HasField("g") or len(a.graphs) or len(a.tensors) for a in node.attribute):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    label = f"{where} node {node.name or node.op_type!r}"
    for attr in copy.attribute:
        if attr.HasField("t") and attr.t.data_location == TensorProto.EXTERNAL:
            attr.t.CopyFrom(_stub_external(attr.t, path, label))
        for i, tensor in enumerate(attr.tensors):
            if tensor.data_location == TensorProto.EXTERNAL:
                attr.tensors[i].CopyFrom(_stub_external(tensor, path, label))
        if attr.HasField("g"):
            attr.g.CopyFrom(_checker_graph(attr.g, path, f"{label} subgraph", main=False))
        for sub in attr.graphs:
            sub.CopyFrom(_checker_graph(sub, path, f"{label} subgraph", main=False))
    return copy


def _run_checker(proto: onnx.ModelProto, path: Path) -> None:
    copy = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if proto.HasField(field):
            setattr(copy, field, getattr(proto, field))
    copy.opset_import.extend(proto.opset_import)
    copy.metadata_props.extend(proto.metadata_props)
    copy.graph.CopyFrom(_checker_graph(proto.graph, path, "graph", main=True))
    for function in proto.functions:
        fcopy = copy.functions.add()
        fcopy.CopyFrom(function)
        for i, node in enumerate(function.node):
            fcopy.node[i].CopyFrom(_checker_node(node, path, f"function {function.name!r}"))
        for attr in fcopy.attribute_proto:
            if attr.HasField("t") and attr.t.data_location == TensorProto.EXTERNAL:
                attr.t.CopyFrom(_stub_external(attr.t, path, f"function {function.name!r} attribute default"))
    try:
        onnx.checker.check_model(copy, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise _fail(path, f"is not a valid ONNX model: {_first_line(exc)}") from None
    except Exception as exc:  # the checker's own failures on odd input (e.g. ValueError for an unknown type)
        raise _fail(path, f"is not a valid ONNX model: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def check_and_normalize(proto: onnx.ModelProto, path: str | os.PathLike[str], files: CheckedFiles) -> None:
    """Check ``proto`` (read from ``path``; its external files already checked as ``files``) and make its sparse
    initializers dense, in place.

    Raises:
        InputError: the first malformation found, in one line naming the tensor, value, node or opset.
    """
    path = Path(path)
    _check_opsets(proto, path)
    for tensor, where in _all_tensors(proto):
        _check_tensor(tensor, where, path)
    _check_value_infos(proto, path)
    _densify_sparse_initializers(proto, files, path)
    _run_checker(proto, path)
