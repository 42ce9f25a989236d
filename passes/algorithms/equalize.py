"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019) for chains of Conv or Gemm/MatMul layers.

For a pair ``y = W2 * f(W1 * x + b1) + b2`` where ``f`` is positively homogeneous (``f(x / s) = f(x) / s`` for
``s > 0``: Relu, LeakyRelu, Clip with min 0 and no max, or no activation at all), scaling output channel ``i`` of
the first layer by ``1 / s_i`` and input channel ``i`` of the second by ``s_i`` leaves the function unchanged::

    W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i,   s_i = sqrt(r1_i * r2_i) / r2_i  (= sqrt(r1_i / r2_i))

with ``r1_i = max |W1[i]|`` (output channel ``i``) and ``r2_i = max |W2[:, i]|`` (every weight that reads input
channel ``i``: for a depthwise Conv, its channel ``i``; for a grouped Conv, the matching slice of its group).
After scaling both ranges equal ``sqrt(r1_i * r2_i)``, which makes the per-channel ranges of each tensor far more
alike (what per-tensor weight quantization needs). A chain ``A -> B -> C`` couples its pairs through ``B``, so the
pass sweeps the chain in rounds until every scale is within ``tolerance`` of 1 (or ``max_rounds`` is reached).
Scales are computed in float64, clamped per round to ``[1 / max_scale, max_scale]`` and set to 1 where either
range is 0 (or not finite: a NaN or Inf stays in its own channel, for the quantizing passes to refuse); the new
weights are cast back to their dtype, so the model is the same up to float rounding, and a chain whose rescaled
tensors would overflow that dtype is left as it is (skipped with a reason).

Pairs: Conv -> Conv (any ``group`` on either side, including depthwise -> pointwise) and Gemm/MatMul -> Gemm/MatMul
with 2-D constant weights (Gemm's ``transB`` on either side; the second Gemm must have ``transA=0``). Skipped with
a counted reason: Clip with a finite max (ReLU6: ``clip(x / s, 0, 6) != clip(x, 0, 6) / s``) or a nonzero min;
outputs read by more than one node or returned by the graph; weights or biases that are not initializers, are
shared with another node, or are not float; channel counts that do not match; a bias that is not per-channel.
Not handled: Conv -> Gemm across Flatten/pooling, ConvTranspose, PRelu, high-bias absorption and bias correction.
Only tensor values change: node metadata (e.g. the pairings of ``fuse-conv-activation``) stays valid.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass, iter_nodes
from qcompiler.passes._common import const_array, paused_gc

__all__ = ["EqualizeCrossLayerPass"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})
_CONV = frozenset({"Conv"})
_DENSE = frozenset({"Gemm", "MatMul"})
_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip"})
_NOT_A_CANDIDATE = ""


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.as_int()


def _family(node: ir.Node) -> frozenset[str] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in _CONV:
        return _CONV
    if node.op_type in _DENSE:
        return _DENSE
    return None


def _single_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` (once), or None if it has other readers or is a graph output."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _clip_reason(clip: ir.Node) -> str:
    """Why a Clip does not commute with positive channel scaling ("" when it does)."""
    bounds: list[float | None] = []
    for index, attr_name in ((1, "min"), (2, "max")):
        if len(clip.inputs) > index and clip.inputs[index] is not None:
            array = const_array(clip.inputs[index])
            if array is None or array.size != 1:
                return "Clip bound is not a constant scalar"
            bounds.append(float(array.reshape(())))
        elif attr_name in clip.attributes and not clip.attributes[attr_name].is_ref():
            bounds.append(clip.attributes[attr_name].as_float())
        else:
            bounds.append(None)
    low, high = bounds
    if high is not None and not (math.isinf(high) and high > 0):
        return "Clip with a finite max (e.g. ReLU6) does not commute with channel scaling"
    if low is not None and low != 0.0 and not (math.isinf(low) and low < 0):
        return "Clip with a nonzero min does not commute with channel scaling"
    return ""


@dataclasses.dataclass
class _Layer:
    """A weight-bearing node and where its channels live in its weight."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None

    def out_axis(self) -> int:
        """Axis of the weight that indexes output channels."""
        if self.node.op_type == "Conv":
            return 0
        if self.node.op_type == "Gemm":
            return 0 if _int_attr(self.node, "transB", 0) else 1
        return 1


def _in_view(node: ir.Node, w: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """``w`` rearranged to ``[input_channels, -1]`` and the shape that maps it back (a Conv's groups included)."""
    if node.op_type == "Conv":
        groups = _int_attr(node, "group", 1)
        out_ch, per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, out_ch // groups, per_group, -1)  # [g, M/g, C/g, k]
        return grouped.transpose(0, 2, 1, 3).reshape(groups * per_group, -1), grouped.transpose(0, 2, 1, 3).shape
    if node.op_type == "Gemm" and _int_attr(node, "transB", 0):
        return w.T, w.T.shape
    return w, w.shape


def _from_in_view(node: ir.Node, view: np.ndarray, shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return view.reshape(shape).transpose(0, 2, 1, 3).reshape(like.shape)
    if node.op_type == "Gemm" and _int_attr(node, "transB", 0):
        return view.T
    return view


class EqualizeCrossLayerPass(QPass):
    """Rescale the channels of Conv->Conv and Gemm/MatMul->Gemm/MatMul pairs so that their weight ranges match.

    Args:
        max_rounds: sweeps over each chain at most (a chain of two layers converges in one).
        tolerance: a round that would move no scale further than this from 1 ends the iteration.
        max_scale: each round's scales are clamped to ``[1 / max_scale, max_scale]``.
    """

    name = "equalize-cross-layer"
    stage = "fuse"
    preserves_float = True

    def __init__(self, *, max_rounds: int = 20, tolerance: float = 1e-3, max_scale: float = 1e3) -> None:
        super().__init__()
        if not isinstance(max_rounds, int) or max_rounds < 1:
            raise ConfigError(f"equalize-cross-layer: max_rounds must be a positive integer, got {max_rounds!r}")
        if not 0 < tolerance < 1:
            raise ConfigError(f"equalize-cross-layer: tolerance must be in (0, 1), got {tolerance!r}")
        if not max_scale > 1:
            raise ConfigError(f"equalize-cross-layer: max_scale must be > 1, got {max_scale!r}")
        self.max_rounds = max_rounds
        self.tolerance = float(tolerance)
        self.max_scale = float(max_scale)

    # -- finding pairs ----------------------------------------------------------------------------------------
    def _layer(self, node: ir.Node, role: str) -> _Layer | str:
        """The node as a :class:`_Layer`, or the reason it cannot be one."""
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or not weight.is_initializer() or weight.is_graph_input() or weight.const_value is None:
            return f"{role} weight is not an initializer"
        if weight.dtype not in _FLOAT_TYPES:
            return f"{role} weight is not float"
        if len(weight.uses()) != 1:
            return f"{role} weight is shared with another node"
        shape = weight.shape
        if node.op_type in _DENSE and (shape is None or shape.rank() != 2):
            return f"{role} weight is not 2-D"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if role == "first" and bias is not None:
            if not bias.is_initializer() or bias.is_graph_input() or bias.const_value is None:
                return "first bias is not an initializer"
            if len(bias.uses()) != 1:
                return "first bias is shared with another node"
        return _Layer(node, weight, bias if role == "first" else None)

    def _pair(self, first: ir.Node) -> tuple[_Layer, _Layer] | str:
        """The pair that starts at ``first``, or a reason ("" when it is not a candidate at all)."""
        family = _family(first)
        if family is None or len(first.outputs) != 1:
            return _NOT_A_CANDIDATE
        reader = _single_reader(first.outputs[0])
        if reader is None:
            return _NOT_A_CANDIDATE
        second: ir.Node | None = reader
        activation: ir.Node | None = None
        if reader.op_type in _ACTIVATIONS and reader.domain in ("", "ai.onnx"):
            activation = reader
            second = _single_reader(reader.outputs[0]) if len(reader.outputs) == 1 else None
        if second is None or _family(second) is not family or second.inputs[0] is not \
                (activation or first).outputs[0]:
            return _NOT_A_CANDIDATE
        if activation is not None and activation.op_type == "Clip":
            reason = _clip_reason(activation)
            if reason:
                return reason
        if second.op_type == "Gemm" and _int_attr(second, "transA", 0):
            return "second Gemm has transA=1"
        if second.graph is not first.graph:
            return "pair spans two graphs"
        layers = (self._layer(first, "first"), self._layer(second, "second"))
        for layer in layers:
            if isinstance(layer, str):
                return layer
        return layers  # type: ignore[return-value]

    # -- the pass ---------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        next_pair: dict[ir.Node, tuple[_Layer, _Layer]] = {}
        for node in iter_nodes(model):
            found = self._pair(node)
            if isinstance(found, str):
                if found:
                    self.skip(node, found)
                continue
            next_pair[node] = found
        starts = [n for n in next_pair if not any(p[1].node is n for p in next_pair.values())]
        changed = False
        with paused_gc():
            for start in starts:
                chain: list[tuple[_Layer, _Layer]] = []
                node: ir.Node | None = start
                while node in next_pair:
                    chain.append(next_pair[node])
                    node = next_pair[node][1].node
                changed |= self._equalize_chain(chain)
        return ir.passes.PassResult(model, changed)

    def _equalize_chain(self, chain: list[tuple[_Layer, _Layer]]) -> bool:
        """Equalize one chain of pairs in float64 rounds; write back the changed tensors. True if any changed."""
        arrays: dict[ir.Value, np.ndarray] = {}

        def get(value: ir.Value) -> np.ndarray:
            if value not in arrays:
                arrays[value] = value.const_value.numpy().astype(np.float64)
            return arrays[value]

        plans = []
        for first, second in chain:
            w1, w2 = get(first.weight), get(second.weight)
            channels = w1.shape[first.out_axis()]
            in_view, _ = _in_view(second.node, w2)
            if in_view.shape[0] != channels:
                self.skip(first.node, "channel counts of the pair do not match")
                continue
            if first.bias is not None:
                b = get(first.bias)
                if b.size != channels or b.shape[-1:] != (channels,):
                    self.skip(first.node, "first bias is not per-channel")
                    continue
            plans.append((first, second))

        scaled: set[ir.Value] = set()
        rounds = 0
        for _ in range(self.max_rounds):
            moved = False
            for first, second in plans:
                axis = first.out_axis()
                w1 = arrays[first.weight]
                w2 = arrays[second.weight]
                r1 = np.max(np.abs(np.moveaxis(w1, axis, 0).reshape(w1.shape[axis], -1)), axis=1)
                view, shape = _in_view(second.node, w2)
                r2 = np.max(np.abs(view), axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    s = np.sqrt(r1 / r2)
                s = np.where((r1 > 0) & (r2 > 0) & np.isfinite(s), s, 1.0)
                s = np.clip(s, 1.0 / self.max_scale, self.max_scale)
                if float(np.max(np.abs(s - 1.0))) <= self.tolerance:
                    continue
                moved = True
                shape1 = [1] * w1.ndim
                shape1[axis] = -1
                arrays[first.weight] = w1 / s.reshape(shape1)
                arrays[second.weight] = _from_in_view(second.node, view * s[:, None], shape, w2)
                scaled.update((first.weight, second.weight))
                if first.bias is not None:
                    bias = arrays[first.bias]
                    arrays[first.bias] = (bias.reshape(-1) / s).reshape(bias.shape)
                    scaled.add(first.bias)
            if not moved:
                break
            rounds += 1
        if not scaled:
            return False
        cast = {}
        with np.errstate(over="ignore"):
            for value in scaled:
                dtype = value.const_value.numpy().dtype
                cast[value] = arrays[value].astype(dtype)
                if np.all(np.isfinite(arrays[value])) and not np.all(np.isfinite(cast[value])):
                    self.skip(chain[0][0].node, f"equalized tensor {value.name!r} would overflow {dtype}: chain left "
                                                "as it is")
                    return False
        for value in scaled:
            value.const_value = ir.tensor(cast[value], name=value.name)
        self.count("pairs_equalized", len(plans))
        self.count("chains_equalized")
        self.count("rounds", rounds)
        if rounds == self.max_rounds:
            self.count("chains_not_converged")
        logger.debug("equalized a chain of %d pairs in %d rounds", len(plans), rounds)
        return True
