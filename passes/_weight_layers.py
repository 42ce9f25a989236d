"""The weight-only layers of a model: which MatMul/Gemm (and Gather) nodes have a weight that can be quantized, and
that weight as ``W[K, N]``.

Shared by ``annotate-weight-only`` (which decides), the algorithm passes and ``lower-weight-only`` (which read the
layers the annotation chose: every node with a :class:`~qcompiler.formats.WeightSpec` in its metadata), so none of
them imports another.

For ``Y = A @ W`` (MatMul with a constant float32 ``W[K, N]``) or ``Y = A @ B' + C`` (Gemm with ``transA = 0``,
``alpha = beta = 1``, ``B' = B`` or ``B^T``, an optional constant 1-D bias ``C[N]``). Tied embeddings: exporters
write a tied lm_head as ``MatMul(x, Transpose(E))`` with ``E[vocab, hidden]`` the token embedding a Gather also
reads; its weight is ``E^T``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats import WeightSpec
from qcompiler.metadata import TRAINED_KEY, WEIGHT_SPEC_KEY
from qcompiler.passes._common import const_array
from qcompiler.passes._finite import require_finite

__all__ = ["annotated_layers", "attribute", "embedding_table", "is_lm_head", "layer_weight", "quantized_weight",
           "transposed_constant"]


def attribute(node: ir.Node, name: str, default: Any) -> Any:
    """The value of the node's attribute ``name``, or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def transposed_constant(value: ir.Value) -> ir.Value | None:
    """The constant 2-D float32 ``E`` when ``value = Transpose(E, perm=[1, 0])`` (a tied lm_head), else None."""
    node = value.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    perm = node.attributes.get("perm")
    source = node.inputs[0]
    array = const_array(source)
    if array is None or array.ndim != 2 or array.dtype != np.float32 or source.is_graph_input():
        return None
    return source if perm is None or tuple(perm.as_ints()) == (1, 0) else None


def is_lm_head(node: ir.Node) -> bool:
    """The output projection: its output is a graph output, or its weight is a tied embedding (Transpose(E), E
    read by a Gather)."""
    if any(out.is_graph_output() for out in node.outputs):
        return True
    source = transposed_constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return source is not None and any(user.op_type == "Gather" for user, _ in source.uses())


def layer_weight(model: ir.Model, node: ir.Node,
                 exclude_nodes: frozenset[str] = frozenset()) -> tuple[np.ndarray, ir.Value | None] | str:
    """(``W[K, N]`` float32 of a MatMul/Gemm, its bias value or None), or the reason the node cannot be lowered."""
    if node.graph is not model.graph:
        return "inside a subgraph"
    if node.name in exclude_nodes:
        return "excluded by name"
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return "missing input"
    x, w = node.inputs[0], node.inputs[1]
    if w.is_graph_input():
        return "weight is a graph input (overridable initializer)"
    array = const_array(w)
    source = transposed_constant(w)
    if array is None and source is not None:  # a tied lm_head: MatMul(x, Transpose(embedding))
        array = const_array(source).T
    if array is None:
        return "non-constant weight"
    if array.dtype != np.float32 or (x.dtype is not None and x.dtype != ir.DataType.FLOAT):
        return "unsupported dtype (float32 only)"
    if array.ndim != 2:
        return f"weight of rank {array.ndim} (2-D only)"
    if array.size == 0:
        return "empty weight (0 elements)"
    if x.shape is not None and x.shape.rank() < 2:
        return "1-D activation"
    bias = None
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return "Gemm with transA=1"
        if float(attribute(node, "alpha", 1.0)) != 1.0 or float(attribute(node, "beta", 1.0)) != 1.0:
            return "Gemm with alpha or beta other than 1"
        if attribute(node, "transB", 0):
            array = array.T
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
            b = const_array(bias)
            if b is None or b.shape != (array.shape[1],) or b.dtype != np.float32:
                return "Gemm bias is not a constant float32 [N]"
    return np.ascontiguousarray(array), bias


def quantized_weight(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """``weight`` (``W[K, N]`` of ``node``, as :func:`layer_weight` found it) if it is finite, else
    :class:`~qcompiler.errors.InvalidModelError` naming the weight (a tied lm_head's embedding table) and the node.

    Every pass that quantizes (or measures the quantization of) a layer's weight calls it first."""
    stored = transposed_constant(node.inputs[1]) or node.inputs[1]
    array = const_array(stored)  # the stored orientation, so that the index in the message is the file's
    require_finite(weight if array is None else array, stored.name, node.name)
    return weight


def embedding_table(node: ir.Node) -> np.ndarray | None:
    """The constant float32 ``E[rows, cols]`` of ``Gather(E, ids)`` over axis 0 (a token embedding), else None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    table = node.inputs[0]
    array = const_array(table) if table is not None and not table.is_graph_input() else None
    if array is None or array.dtype != np.float32 or array.ndim != 2 or int(attribute(node, "axis", 0)) != 0:
        return None
    return array


def annotated_layers(model: ir.Model, *, trained: bool = False) -> Iterator[tuple[ir.Node, WeightSpec]]:
    """The main graph's MatMul/Gemm nodes that carry a weight spec, with it, in graph order.

    Layers whose codes came trained from QAT (``import-qat``) are left out unless ``trained``: the algorithms and
    mixed precision must not re-choose them; the lowering writes them."""
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
            spec = node.meta.get(WEIGHT_SPEC_KEY)
            if isinstance(spec, WeightSpec) and (trained or not node.meta.get(TRAINED_KEY)):
                yield node, spec
