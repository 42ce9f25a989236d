"""Fold a zero ``Pad`` into the ``Conv`` that reads it: ``Conv(Pad(x, p, 0), W) == Conv(x, W, pads += p)``.

Exporters write explicit padding as a separate ``Pad`` (TensorFlow-style "same" padding, EfficientNet's
``static_padding``). A Conv pads with zeros itself, so a constant-zero Pad on the spatial axes only is the same
function when its amounts are added to the Conv's ``pads`` (ONNX order ``[x1_begin, x2_begin.., x1_end, x2_end..]``).
Exact in float. Why it matters for quantization: a Pad between two quantized convs sits between a
DequantizeLinear and a QuantizeLinear, which ONNX Runtime does not fuse, so every such Pad costs a float round trip;
folded, the int8 chain stays unbroken (and the float model saves a copy of the activation too).

Folded only when all of this holds (otherwise a counted skip with the reason): the Pad is in the default domain,
``mode`` is ``constant``; its pads are constant (input since opset 11, attribute before), non-negative and zero on
the batch and channel axes; the padding value is absent or a constant 0; ``axes`` (opset 18), if given, is constant;
the Pad's output is read only by Conv nodes as their data input (input 0) and is not a graph output; each Conv has
``auto_pad`` NOTSET and spatial rank equal to the Pad's. Every graph of the model is visited.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.pass_manager import QPass
from qcompiler.passes._common import const_array, drop_unused_initializers, paused_gc

__all__ = ["FusePadConvPass"]

logger = logging.getLogger(__name__)


def _pad_amounts(pad: ir.Node, rank: int | None) -> np.ndarray | str:
    """The Pad's amounts as an int64 array ``[2 * rank]`` (begin..., end...), or the reason it cannot be folded."""
    mode = pad.attributes.get("mode")
    if mode is not None and (mode.is_ref() or mode.as_string() != "constant"):
        return "Pad mode is not constant"
    if "pads" in pad.attributes:  # opset < 11
        attr = pad.attributes["pads"]
        if attr.is_ref():
            return "Pad amounts are a reference attribute"
        pads = np.asarray(attr.as_ints(), dtype=np.int64)
        value_attr = pad.attributes.get("value")
        if value_attr is not None and (value_attr.is_ref() or value_attr.as_float() != 0.0):
            return "Pad value is not 0"
        return pads
    pads_value = pad.inputs[1] if len(pad.inputs) > 1 else None
    pads = const_array(pads_value)
    if pads is None:
        return "Pad amounts are not constant"
    pads = pads.astype(np.int64).reshape(-1)
    if len(pad.inputs) > 2 and pad.inputs[2] is not None:
        fill = const_array(pad.inputs[2])
        if fill is None or fill.size != 1 or float(fill.reshape(())) != 0.0:
            return "Pad value is not a constant 0"
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        axes = const_array(pad.inputs[3])
        if axes is None:
            return "Pad axes are not constant"
        if rank is None:
            return "Pad axes given but the input rank is unknown"
        axes = [int(a) + rank if a < 0 else int(a) for a in axes.reshape(-1)]
        if len(pads) != 2 * len(axes) or any(not 0 <= a < rank for a in axes):
            return "Pad axes do not match its amounts"
        full = np.zeros(2 * rank, dtype=np.int64)
        for i, axis in enumerate(axes):
            full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
        pads = full
    return pads


def _conv_reason(conv: ir.Node, index: int, spatial: int) -> str | None:
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or index != 0:
        return "Pad output is read by something other than a Conv's data input"
    auto_pad = conv.attributes.get("auto_pad")
    if auto_pad is not None and (auto_pad.is_ref() or auto_pad.as_string() not in ("NOTSET", "")):
        return "Conv uses auto_pad"
    pads = conv.attributes.get("pads")
    if pads is not None and (pads.is_ref() or len(pads.as_ints()) != 2 * spatial):
        return "Conv pads do not match the Pad's spatial rank"
    return None


class FusePadConvPass(QPass):
    """Fold constant-zero spatial ``Pad`` nodes into the ``pads`` of the Conv nodes that read them."""

    name = "fuse-pad-conv"
    stage = "fuse"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        with paused_gc():
            for graph in list(model.graphs()):
                for node in list(graph):
                    if node.op_type == "Pad" and node.domain in ("", "ai.onnx") and self._fold(graph, node):
                        folded += 1
        self.count("folded", folded)
        return ir.passes.PassResult(model, folded > 0)

    def _fold(self, graph: ir.Graph, pad: ir.Node) -> bool:
        x, out = pad.inputs[0], pad.outputs[0]
        uses = list(out.uses())
        if x is None or not uses or out.is_graph_output():
            return False
        if any(user.op_type != "Conv" for user, _ in uses):
            return False  # not about convolutions: not a candidate, not a skip
        rank = x.shape.rank() if x.shape is not None else None
        pads = _pad_amounts(pad, rank)
        if isinstance(pads, str):
            self.skip(pad, pads)
            return False
        if pads.size % 2 or pads.size < 6:
            self.skip(pad, "Pad amounts do not describe a batch, a channel and a spatial axis")
            return False
        r = pads.size // 2
        spatial = r - 2
        if np.any(pads < 0):
            self.skip(pad, "negative Pad amounts (cropping)")
            return False
        if pads[0] or pads[1] or pads[r] or pads[r + 1]:
            self.skip(pad, "Pad pads the batch or channel axis")
            return False
        for user, index in uses:
            reason = _conv_reason(user, index, spatial)
            if reason is not None:
                self.skip(pad, reason)
                return False
        begin, end = pads[2:r], pads[r + 2:]
        for user, _ in uses:
            old = user.attributes.get("pads")
            conv_pads = np.asarray(old.as_ints() if old is not None else [0] * (2 * spatial), dtype=np.int64)
            new = np.concatenate([conv_pads[:spatial] + begin, conv_pads[spatial:] + end])
            user.attributes["pads"] = ir.AttrInt64s("pads", [int(v) for v in new])
            user.replace_input_with(0, x)
        constants = [v for v in pad.inputs[1:] if v is not None]
        graph.remove(pad, safe=True)
        drop_unused_initializers(constants)
        for value in constants:  # Constant nodes that fed only the Pad (exporters write the fill value that way)
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant" and not value.uses() \
                    and not value.is_graph_output() and producer.graph is graph:
                graph.remove(producer, safe=True)
        return True
