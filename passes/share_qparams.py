"""Share quantization parameters across ops that only move values, so ONNX Runtime needs no requantization there.

ONNX Runtime runs ``DQ(s, z) -> MaxPool -> Q(s, z)`` directly on uint8 data, drops ``DQ -> Reshape -> Q`` pairs and
turns ``DQ... -> Concat -> Q`` into ``QLinearConcat`` without rescaling, but only when the scale and zero point on
both sides are *the same*. Calibration measures each tensor's own range, so the output of a MaxPool or the inputs
of a Concat get their own parameters, and every such op costs a float round trip (dequantize, op, quantize).

This pass joins the calibrated ranges (``qcompiler.range`` metadata) of values linked through such ops into one
group (union-find) and gives every member the union of the group's ranges:

- data-movement ops, input 0 with output 0: MaxPool, GlobalMaxPool, Reshape, Flatten, Squeeze, Unsqueeze,
  Transpose, Identity, DepthToSpace, SpaceToDepth, Slice, Gather (data), Split (every output), Resize with
  ``mode="nearest"``; their output values are a subset of the input's, so the union is the input's range;
- Concat: every input and the output.

Only values that already carry a range take part (the ones the annotation asked to quantize); a member without
one breaks nothing, it is simply not linked. Metadata only: the float function is unchanged. Limits: main graph
only; a Concat of very different ranges gets the widest (which is what ``QLinearConcat`` without rescaling means).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qcompiler.pass_manager import QPass
from qcompiler.qspec import ValueRange, get_range, set_range

__all__ = ["ShareQuantParamsPass", "SHARING_OPS"]

logger = logging.getLogger(__name__)

#: ops whose outputs hold only values of their first input
SHARING_OPS = frozenset({"MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                         "Identity", "DepthToSpace", "SpaceToDepth", "Slice", "Gather", "Split", "Resize"})


class _Groups:
    """Union-find over IR values."""

    def __init__(self) -> None:
        self._parent: dict[ir.Value, ir.Value] = {}

    def find(self, value: ir.Value) -> ir.Value:
        root = value
        while self._parent.get(root, root) is not root:
            root = self._parent[root]
        while value is not root:  # path compression
            self._parent[value], value = root, self._parent.get(value, value)
        return root

    def union(self, a: ir.Value, b: ir.Value) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[rb] = ra

    def members(self) -> dict[ir.Value, list[ir.Value]]:
        groups: dict[ir.Value, list[ir.Value]] = {}
        for value in list(self._parent):
            groups.setdefault(self.find(value), []).append(value)
        for root in list(groups):
            if root not in groups[root]:
                groups[root].append(root)
        return groups


def _links(node: ir.Node) -> list[tuple[ir.Value, ir.Value]]:
    """The (a, b) value pairs that ``node`` requires to share parameters."""
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "Concat":
        values = [v for v in node.inputs if v is not None] + list(node.outputs[:1])
        return [(values[0], v) for v in values[1:]]
    if node.op_type not in SHARING_OPS or not node.inputs or node.inputs[0] is None:
        return []
    if node.op_type == "Resize":
        mode = node.attributes.get("mode")
        if mode is None or mode.as_string() != "nearest":
            return []
    outputs = node.outputs if node.op_type == "Split" else node.outputs[:1]
    return [(node.inputs[0], out) for out in outputs]


class ShareQuantParamsPass(QPass):
    """Give values linked through data-movement ops and Concat one common calibrated range."""

    name = "share-qparams"
    stage = "calibrate"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = _Groups()
        linked = 0
        for node in model.graph:
            for a, b in _links(node):
                if get_range(a) is not None and get_range(b) is not None:
                    groups.union(a, b)
                    linked += 1
        modified = False
        for members in groups.members().values():
            if len(members) < 2:
                continue
            ranges = [get_range(v) for v in members]
            union = ValueRange(min(r.min for r in ranges), max(r.max for r in ranges),
                               max(r.num_samples for r in ranges))
            changed = sum(set_range(v, union) for v in members)
            modified |= changed > 0
            self.count("groups")
            self.count("values_widened", changed)
        self.count("links", linked)
        return ir.passes.PassResult(model, modified)
