"""Where AWQ's ``1 / s`` goes: into the constants of the operation that makes the group's input, or a ``Mul``.

AWQ feeds a group of layers ``x / s`` instead of ``x`` (``s[K]``, one factor per input channel, the last axis) and
scales their weights by ``s``. When ``x`` comes out of an operation that is affine per channel of its last axis
with constant coefficients, dividing those coefficients by ``s`` makes it produce ``x / s`` with no extra node:

- ``Mul(y, c)`` (either order), ``c`` a float32 constant of shape ``[K]`` or ``[1, ..., 1, K]``: ``c / s``. This is
  RMSNorm's weight as exporters write it (``Pow / ReduceMean / Add / Sqrt / Div`` or ``Reciprocal, Mul``, then
  ``Mul`` by the weight) and a written-out LayerNorm's ``gamma``;
- ``Add(y, c)`` the same, when ``y`` folds too (``y / s + c / s``): the ``beta`` of a written-out LayerNorm;
- ``LayerNormalization``, ``SimplifiedLayerNormalization``, ``RMSNormalization`` and ONNX Runtime's
  ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (their first output) with a constant ``[K]``
  scale, and bias where present: both divided;
- ``Reshape`` whose input and output both end in a static ``K``: the fold goes on to its input (GPT-2's ``Gemm``
  reads a 2-D view of the LayerNorm output); a flattening that keeps the last axis keeps every channel's index.

Only where each value on the way is read by nothing but the next step (the group's layers at the end) and is no
graph output: the fold changes the value for every reader. A constant that another node also reads gets a copy
(the other reader keeps the old one). Elsewhere a ``Mul(x, 1 / s)`` feeds the group's layers, and any other reader
of ``x`` keeps reading ``x``. Either way the float function is unchanged up to float32 rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from qcompiler.passes._common import NameScope, const_array, copy_type

__all__ = ["fold_plan", "scale_input"]

logger = logging.getLogger(__name__)

#: (domain, op type) -> (index of the scale input, index of the bias input or None), first output only
NORMS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("", "LayerNormalization"): (1, 2),
    ("", "SimplifiedLayerNormalization"): (1, None),
    ("", "RMSNormalization"): (1, None),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2, None),
}

Site = tuple[ir.Node, int]  # a node and the index of its constant input to divide by s


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _per_channel(value: ir.Value | None, k: int) -> bool:
    """``value`` is a float32 constant of shape ``[K]`` or ``[1, ..., 1, K]`` (that is not a graph input)."""
    array = const_array(value)
    return array is not None and array.dtype == np.float32 and array.ndim >= 1 and array.shape[-1] == k and \
        array.size == k


def _last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() == 0:
        return None
    last = shape[-1]
    return last if isinstance(last, int) else None


def _read_only_by(value: ir.Value, readers: Collection[int]) -> bool:
    """Every use of ``value`` is by one of the nodes ``readers`` (ids), at least one is, and it is no graph output."""
    if value.is_graph_output() or value.is_graph_input():
        return False
    users = {id(node) for node, _ in value.uses()}
    return bool(users) and users <= set(readers)


def fold_plan(value: ir.Value, readers: Collection[int], k: int) -> list[Site] | None:
    """The constant inputs to divide by ``s`` so that ``value`` becomes ``value / s`` (see the module docstring), or
    None when the graph does not allow it; ``readers``: the ids of the nodes that are to read ``value / s``."""
    if not _read_only_by(value, readers):
        return None
    node = value.producer()
    if node is None or node.graph is None or any(v is None for v in node.inputs[:2]) or len(node.inputs) < 2:
        return None
    key = (_domain(node), node.op_type)
    if key in NORMS:
        scale, bias = NORMS[key]
        if value is not node.outputs[0] or len(node.inputs) <= scale or not _per_channel(node.inputs[scale], k):
            return None
        sites: list[Site] = [(node, scale)]
        if bias is not None and len(node.inputs) > bias and node.inputs[bias] is not None:
            if not _per_channel(node.inputs[bias], k):
                return None
            sites.append((node, bias))
        return sites
    if key[0] != "" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    assert a is not None and b is not None
    if node.op_type == "Mul":
        if _per_channel(b, k) and const_array(a) is None:
            return [(node, 1)]
        if _per_channel(a, k) and const_array(b) is None:
            return [(node, 0)]
        return None
    if node.op_type == "Add":
        index = 1 if _per_channel(b, k) else 0 if _per_channel(a, k) else None
        if index is None:
            return None
        rest = fold_plan(node.inputs[1 - index], [id(node)], k)  # type: ignore[arg-type]
        return None if rest is None else [*rest, (node, index)]
    if node.op_type == "Reshape" and _last_dim(value) == k and _last_dim(a) == k:
        return fold_plan(a, [id(node)], k)
    return None


def _divide(model: ir.Model, node: ir.Node, index: int, s: np.ndarray, scope: NameScope) -> None:
    """Divide ``node``'s constant input ``index`` by ``s`` (broadcast on its last axis): in place when nothing else
    reads it, else through a copy that only ``node`` reads."""
    value = node.inputs[index]
    assert value is not None
    array = const_array(value)
    assert array is not None
    divided = (array.astype(np.float64) / s.reshape(array.shape)).astype(np.float32)
    only_here = [(user, i) for user, i in value.uses()] == [(node, index)]
    if only_here and value.is_initializer():
        value.const_value = ir.tensor(divided, name=value.name)
        return
    name = scope.fresh(f"{value.name or node.name or 'awq'}_awq")
    copy = ir.Value(name=name, const_value=ir.tensor(divided, name=name))
    model.graph.register_initializer(copy)
    node.replace_input_with(index, copy)


def scale_input(model: ir.Model, value: ir.Value, layers: list[ir.Node], s: np.ndarray, scope: NameScope,
                fold: bool = True) -> str:
    """Make ``layers`` (readers of ``value``) read ``value / s``: folded (see the module docstring) where the graph
    allows and ``fold``, else through a new ``Mul``. Returns ``"folded"`` or ``"mul"``. ``s``: float64 ``[K]``."""
    k = s.shape[0]
    sites = fold_plan(value, [id(node) for node in layers], k) if fold else None
    if sites is not None:
        for node, index in sites:
            _divide(model, node, index, s, scope)
        return "folded"
    name = scope.fresh(f"{value.name or 'x'}_awq_inverse_scale")
    inverse = ir.Value(name=name, const_value=ir.tensor((1.0 / s).astype(np.float32), name=name))
    model.graph.register_initializer(inverse)
    mul = ir.node("Mul", [value, inverse], name=scope.fresh(f"{value.name or 'x'}_awq"))
    mul.outputs[0].name = scope.fresh(f"{value.name or 'x'}_awq_scaled")
    copy_type(mul.outputs[0], value)
    model.graph.insert_before(layers[0], [mul])
    for node in layers:
        node.replace_input_with(0, mul.outputs[0])
    return "mul"
