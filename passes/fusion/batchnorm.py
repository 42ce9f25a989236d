"""Fold an inference-mode BatchNormalization into the Conv, Gemm or MatMul that feeds it.

BatchNormalization computes, per channel ``c`` (axis 1 of its input),
``y = s[c] * (x - mean[c]) + beta[c]`` with ``s = gamma / sqrt(var + epsilon)``. When ``x = W * u + b`` is linear in
its input with one output channel per row/column of ``W``, the pair is the same linear map with

* ``W'`` = ``W`` scaled by ``s`` along the output-channel axis (Conv: axis 0 of ``[M, C/group, k...]``, so grouped
  and depthwise Conv work unchanged; Gemm: axis 0 if ``transB`` else axis 1; MatMul: axis 1 of a 2-D ``W``);
* ``b'`` = ``(b - mean) * s + beta`` where ``b`` is the Conv bias, Gemm's ``beta * C`` (``beta`` is then dropped;
  ``alpha`` is untouched since it scales ``A * B`` only), the constant ``c`` of ``Add(MatMul(u, W), c)`` (any
  shape broadcasting to ``[M, N]``, as for Gemm, so the fold does not depend on whether ``fuse-matmul-add`` ran
  first), or 0. A bias of shape ``[M, N]`` or ``[M, 1]`` gives a ``[M, N]`` fused bias.

New tensors are computed in float64 and cast back to the weight's dtype. A folded Conv/Gemm keeps its name; a
float/double MatMul becomes ``Gemm(u, W', b')`` under its name (valid since ``u`` is known to be 2-D), so a chain
of BatchNormalizations folds in one run; a float16/bfloat16 MatMul (no Gemm kernel in ONNX Runtime's CPU provider)
becomes ``MatMul(u, W')`` followed by ``Add(b')``.

Shared weights: the scaled weight is always a new initializer (named after the old one), so a weight that other
nodes also read is copied, never changed under them (counted as ``weights_copied``); the old one is removed when
nothing reads it any more.

Skipped, with a counted reason: BatchNormalization in training mode (``training_mode=1`` or more than one
output) or ``spatial=0``; a producer output read by another node or returned by the graph; non-constant or
graph-input parameters, weight or bias; non-float weights; parameter shapes that are not ``[channels]``; a MatMul
whose input is not known to be rank 2 or whose weight is not 2-D. A BatchNormalization after any other op (or
after an Add that is not ``MatMul + c``) is not a candidate and not counted.
Not handled: ConvTranspose, and BatchNormalization preceding (rather than following) the linear op.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope, const_array, paused_gc
from qcompiler.passes.fusion._apply import NOT_A_CANDIDATE, apply_rule, as_rule

__all__ = ["FuseConvBatchNormPass"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})
_PRODUCERS = ("Conv", "Gemm", "MatMul", "Add")


@dataclasses.dataclass
class _Plan:
    producer: ir.Node  # the weight-bearing node (for Add(MatMul, c): the MatMul)
    absorbed: list[ir.Node]  # the nodes the fused node replaces (besides the BatchNormalization)
    weight: np.ndarray
    bias: np.ndarray | None
    axis: int  # output-channel axis of the weight
    scale: np.ndarray  # float64 gamma / sqrt(var + eps)
    shift: np.ndarray  # float64 beta - mean * scale


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.as_float()


def _matmul_plus(add: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """``(matmul, c)`` if ``add`` is ``Add(MatMul(...), c)`` or ``Add(c, MatMul(...))``, else None."""
    for side, other in ((0, 1), (1, 0)):
        value, bias = (add.inputs[side], add.inputs[other]) if len(add.inputs) == 2 else (None, None)
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "MatMul" and producer.domain in ("", "ai.onnx") \
                and producer.graph is add.graph and bias is not None:
            return producer, bias
    return None


class _FoldBatchNorm(RewriteRuleClassBase):
    """``BatchNormalization(Conv|Gemm|MatMul(u, W, b))`` → the producer with scaled weights and bias."""

    def __init__(self, names: NameScope, on_copy: Any) -> None:
        super().__init__(name="FoldBatchNorm")
        self._names = names
        self._on_copy = on_copy
        #: the plan of each BatchNormalization that passed the check (read by the pass after the rewrite)
        self.plans: dict[ir.Node, _Plan] = {}

    def pattern(self, op, x, scale, bias, mean, var):
        return op.BatchNormalization(x, scale, bias, mean, var, _outputs=["bn_out"])

    def check(self, context, x: ir.Value, scale: ir.Value, bias: ir.Value, mean: ir.Value, var: ir.Value,
              bn_out: ir.Value, **_: Any) -> MatchResult:
        del context
        result = MatchResult()
        bn = bn_out.producer()
        producer = x.producer()
        if producer is None or producer.op_type not in _PRODUCERS or producer.domain not in ("", "ai.onnx"):
            return result.fail(NOT_A_CANDIDATE)
        if producer.graph is not bn.graph:
            return result.fail("producer is in another graph")
        absorbed = [producer]
        add_bias: np.ndarray | None = None
        if producer.op_type == "Add":  # Add(MatMul(u, W), c): a MatMul bias not yet made a Gemm
            found = _matmul_plus(producer)
            if found is None:
                return result.fail(NOT_A_CANDIDATE)
            producer, bias_input = found
            absorbed.append(producer)
            if len(producer.outputs[0].uses()) != 1 or producer.outputs[0].is_graph_output():
                return result.fail("MatMul output has other consumers")
            add_bias = const_array(bias_input)
            if add_bias is None:
                return result.fail("Add bias is not constant")
        if len(bn.outputs) > 1 or _int_attr(bn, "training_mode", 0) != 0:
            return result.fail("BatchNormalization in training mode")
        if _int_attr(bn, "spatial", 1) != 1:
            return result.fail("BatchNormalization with spatial=0")
        if len(x.producer().outputs) != 1 or len(x.uses()) != 1 or x.is_graph_output():
            return result.fail(f"{x.producer().op_type} output has other consumers")
        params = [const_array(v) for v in (scale, bias, mean, var)]
        if any(p is None for p in params):
            return result.fail("BatchNormalization parameters are not constant")
        gamma, beta, mean_a, var_a = (p.astype(np.float64) for p in params)
        weight = const_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
        if weight is None:
            return result.fail(f"{producer.op_type} weight is not constant")
        if ir.DataType.from_numpy(weight.dtype) not in _FLOAT_TYPES:
            return result.fail(f"{producer.op_type} weight is not float")
        bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
        conv_bias = const_array(bias_value) if bias_value is not None else None
        if bias_value is not None and conv_bias is None:
            return result.fail(f"{producer.op_type} bias is not constant")

        if producer.op_type == "Conv":
            axis, channels = 0, weight.shape[0] if weight.ndim >= 1 else -1
        elif producer.op_type == "Gemm":
            if weight.ndim != 2:
                return result.fail("Gemm weight is not 2-D")
            axis = 0 if _int_attr(producer, "transB", 0) else 1
            channels = weight.shape[axis]
            if conv_bias is not None:
                conv_bias = _float_attr(producer, "beta", 1.0) * conv_bias.astype(np.float64)
        else:  # MatMul: y[m, n] = sum_k u[m, k] W[k, n]; BatchNormalization's axis 1 is n only for a 2-D y
            if producer.inputs[0] is None or producer.inputs[0].shape is None:
                return result.fail("MatMul input rank is unknown")
            if producer.inputs[0].shape.rank() != 2:
                return result.fail(f"MatMul input is rank {producer.inputs[0].shape.rank()}, not 2")
            if weight.ndim != 2:
                return result.fail("MatMul weight is not 2-D")
            axis, channels = 1, weight.shape[1]
            if add_bias is not None:
                if add_bias.ndim > 2 or (add_bias.ndim and add_bias.shape[-1] not in (1, channels)):
                    return result.fail("Add bias does not broadcast to [M, N]")
                conv_bias = add_bias.astype(np.float64)
        if any(p.shape != (channels,) for p in (gamma, beta, mean_a, var_a)):
            return result.fail("BatchNormalization parameter shapes do not match the output channels")
        if conv_bias is not None and producer.op_type == "Conv" and conv_bias.shape != (channels,):
            return result.fail("Conv bias shape does not match the output channels")
        s = gamma / np.sqrt(var_a + _float_attr(bn, "epsilon", 1e-5))
        self.plans[bn] = _Plan(producer, absorbed, weight, conv_bias, axis, s, beta - mean_a * s)
        return result

    def rewrite(self, op, x: ir.Value, bn_out: ir.Value, **_: Any):
        plan = self.plans[bn_out.producer()]
        producer = plan.producer
        dtype = plan.weight.dtype
        shape = [1] * plan.weight.ndim
        shape[plan.axis] = -1
        new_weight = (plan.weight.astype(np.float64) * plan.scale.reshape(shape)).astype(dtype)
        old_bias = np.zeros_like(plan.scale) if plan.bias is None else plan.bias.astype(np.float64)
        new_bias = (old_bias * plan.scale + plan.shift).astype(dtype)
        old_w = producer.inputs[1]
        if len(old_w.uses()) > 1:
            self._on_copy()
        w_value = op.initializer(ir.tensor(new_weight), name=self._names.fresh(f"{old_w.name or 'weight'}_bn"))
        b_value = op.initializer(ir.tensor(new_bias), name=self._names.fresh(f"{old_w.name or 'weight'}_bn_bias"))
        u = producer.inputs[0]
        if producer.op_type == "MatMul" and dtype in (np.float32, np.float64):
            # a Gemm (u is known to be 2-D), so that a second BatchNormalization can fold in the same run
            return op.Gemm(u, w_value, b_value, _name=producer.name)
        if producer.op_type == "MatMul":  # no Gemm kernel for this type
            y = op.MatMul(u, w_value, _name=producer.name)
            return op.Add(y, b_value, _name=f"{producer.name}_bias" if producer.name else None)
        attributes = dict(producer.attributes)
        attributes.pop("beta", None)  # Gemm: beta * C is folded into the new bias
        return op.op(producer.op_type, u, w_value, b_value, _name=producer.name, **attributes)


class FuseConvBatchNormPass(QPass):
    """Fold inference-mode BatchNormalization into a preceding Conv, Gemm or 2-D MatMul with constant weights."""

    name = "fuse-conv-bn"
    stage = "fuse"
    preserves_float = True

    _ROOTS: ClassVar[tuple[str, ...]] = ("BatchNormalization",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rule = _FoldBatchNorm(NameScope(model), lambda: self.count("weights_copied"))

        def absorbed(bn: ir.Node) -> list[ir.Node]:
            return rule.plans[bn].absorbed

        with paused_gc():
            folded = apply_rule(model, as_rule(rule), root_op_types=self._ROOTS, on_skip=self.skip,
                                absorbed=absorbed)
        self.count("folded", folded)
        return ir.passes.PassResult(model, folded > 0)
