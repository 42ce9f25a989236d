"""Pair Conv/Gemm/MatMul with the Relu or Clip that follows it, for quantization lowering.

ONNX Runtime fuses ``Conv + Relu`` and friends itself, so the graph is left as it is. What matters for quantization
is that no QuantizeLinear/DequantizeLinear pair is put between the two: the activation's output is quantized
instead, which both saves a rounding step and lets the quantized range start at the activation's floor (0 for
Relu, ``min`` for Clip). This pass records the pairing in the nodes' in-memory metadata::

    producer.meta["qcompiler.fused_activation"] = activation
    activation.meta["qcompiler.fused_into"] = producer

and the lowering asks :func:`fused_activation` / :func:`fused_into`. Metadata is not serialized: the pairing lives
as long as the in-memory model. ``modified`` is True only when a pairing is added, changed, or a stale one removed
(so a second run reports False).

A pair is recorded only when the producer (default domain) has a single output, read only by the activation, and
not returned by the graph; Clip's ``min``/``max`` must be constants (inputs since opset 11, or attributes).
Other Relu/Clip fed by Conv/Gemm/MatMul are counted as skips with the reason. Activations other than Relu and
Clip (LeakyRelu, Sigmoid, HardSwish...) are not paired.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qcompiler.metadata import FUSED_ACTIVATION_KEY, FUSED_INTO_KEY
from qcompiler.pass_manager import QPass, iter_nodes
from qcompiler.passes._common import const_array, paused_gc, peek_meta

__all__ = ["FuseConvActivationPass", "fused_activation", "fused_into"]

logger = logging.getLogger(__name__)


_PRODUCERS = frozenset({"Conv", "Gemm", "MatMul"})
_ACTIVATIONS = frozenset({"Relu", "Clip"})
_ABSENT = object()


def _paired(producer: ir.Node, activation: ir.Node) -> bool:
    """Whether the two nodes (still) form a valid pair: same graph, the activation the producer's only reader."""
    if producer.graph is None or activation.graph is not producer.graph or len(producer.outputs) != 1:
        return False
    out = producer.outputs[0]
    return (not activation.inputs or activation.inputs[0] is out) and not out.is_graph_output() and \
        [user for user, _ in out.uses()] == [activation]


def fused_activation(node: ir.Node) -> ir.Node | None:
    """The Relu/Clip that ``fuse-conv-activation`` paired with this Conv/Gemm/MatMul, if the pairing still holds."""
    activation = node.meta.get(FUSED_ACTIVATION_KEY)
    return activation if isinstance(activation, ir.Node) and _paired(node, activation) else None


def fused_into(node: ir.Node) -> ir.Node | None:
    """The Conv/Gemm/MatMul this Relu/Clip was paired with, if the pairing still holds."""
    producer = node.meta.get(FUSED_INTO_KEY)
    return producer if isinstance(producer, ir.Node) and _paired(producer, node) else None


class FuseConvActivationPass(QPass):
    """Record Conv/Gemm/MatMul + Relu/Clip pairs in node metadata (the graph itself is not changed)."""

    name = "fuse-conv-activation"
    stage = "fuse"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with paused_gc():
            changed = self._pair_all(model)
        return ir.passes.PassResult(model, changed > 0)

    def _pair_all(self, model: ir.Model) -> int:
        changed = 0
        nodes = list(iter_nodes(model))
        for node in nodes:  # drop pairings that later rewrites made stale
            if node.op_type not in _PRODUCERS and node.op_type not in _ACTIVATIONS:
                continue  # (reading .meta creates the store: only look where a pairing can be)
            for key, getter in ((FUSED_ACTIVATION_KEY, fused_activation), (FUSED_INTO_KEY, fused_into)):
                if peek_meta(node, key, _ABSENT) is not _ABSENT and getter(node) is None:
                    del node.meta[key]
                    self.count("stale_removed")
                    changed += 1
        for act in nodes:
            if act.op_type not in _ACTIVATIONS or act.domain not in ("", "ai.onnx") or not act.inputs:
                continue
            x = act.inputs[0]
            producer = x.producer() if x is not None else None
            if producer is None or producer.op_type not in _PRODUCERS or producer.domain not in ("", "ai.onnx"):
                continue
            reason = self._reason(producer, act)
            if reason is not None:
                self.skip(act, reason)
                continue
            self.count("pairs")
            if producer.meta.get(FUSED_ACTIVATION_KEY) is not act or act.meta.get(FUSED_INTO_KEY) is not producer:
                producer.meta[FUSED_ACTIVATION_KEY] = act
                act.meta[FUSED_INTO_KEY] = producer
                changed += 1
        return changed

    @staticmethod
    def _reason(producer: ir.Node, act: ir.Node) -> str | None:
        if not _paired(producer, act):
            return f"{producer.op_type} output has other consumers"
        if act.op_type == "Clip":
            for bound in act.inputs[1:]:
                if bound is not None and const_array(bound) is None:
                    return "Clip bounds are not constant"
        return None
