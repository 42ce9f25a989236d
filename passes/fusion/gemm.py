"""Fuse ``Add(MatMul(x, W), c)`` into ``Gemm(x, W, c)``.

``Gemm(A, B, C) = alpha * A @ B + beta * C`` with ``alpha = beta = 1`` and no transposes equals the pair exactly,
but only where Gemm's stricter contract holds, so the pass fuses only when all of this is known:

* ``x`` has rank 2 (``[M, K]``); a MatMul of rank > 2 (batched, e.g. transformer activations ``[B, S, K]``) stays
  a MatMul (skip reason ``MatMul input is rank R, not 2``);
* ``W`` is a constant 2-D ``[K, N]`` tensor (initializer or Constant, not a graph input);
* ``c`` has a known shape that broadcasts to ``[M, N]`` without growing the result: ``[]``, ``[1]``, ``[N]``,
  ``[1, N]``, ``[M, 1]``, ``[M, N]`` (``M`` may be symbolic if both sides name the same dimension);
* the element type is float or double (ONNX Runtime's CPU Gemm kernels) and ``c`` has the same type;
* the MatMul output is read by the Add only and is not a graph output.

The Add may have the MatMul on either side. The Gemm keeps the MatMul's name (the weight-bearing node that
quantization options refer to) and the Add's output value. Other Add/MatMul pairs are counted as skips with reason.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from qcompiler.pass_manager import QPass
from qcompiler.passes._common import const_array, paused_gc
from qcompiler.passes.fusion._apply import NOT_A_CANDIDATE, apply_rule, as_rule

__all__ = ["FuseMatMulAddPass"]

logger = logging.getLogger(__name__)

_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})


def _same_dim(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _bias_fits(bias: ir.Shape, m: int | ir.SymbolicDim, n: int) -> bool:
    dims = list(bias)
    if len(dims) > 2:
        return False
    if dims and not (dims[-1] == 1 or dims[-1] == n):
        return False
    return len(dims) < 2 or dims[0] == 1 or _same_dim(dims[0], m)


class _MatMulAddToGemm(RewriteRuleClassBase):
    """``Add(MatMul(x, W), c)`` or ``Add(c, MatMul(x, W))`` → ``Gemm(x, W, c)``."""

    def __init__(self) -> None:
        super().__init__(name="MatMulAddToGemm")
        #: the MatMul and bias chosen for each Add that passed the check (read by the pass after the rewrite)
        self.chosen: dict[ir.Node, tuple[ir.Node, ir.Value]] = {}

    def pattern(self, op, a, b):
        return op.Add(a, b, _outputs=["add_out"])

    def _reason(self, matmul: ir.Node, add: ir.Node, bias: ir.Value) -> str | None:
        """Why this MatMul/Add pair cannot become a Gemm, or None if it can."""
        mm_out = matmul.outputs[0]
        if matmul.graph is not add.graph:
            return "MatMul is in another graph"
        if len(mm_out.uses()) != 1 or mm_out.is_graph_output():
            return "MatMul output has other consumers"
        x = matmul.inputs[0]
        if x is None or x.shape is None:
            return "MatMul input rank is unknown"
        if x.shape.rank() != 2:
            return f"MatMul input is rank {x.shape.rank()}, not 2"
        weight = const_array(matmul.inputs[1])
        if weight is None or weight.ndim != 2:
            return "MatMul weight is not a constant 2-D tensor"
        dtype = ir.DataType.from_numpy(weight.dtype)
        if dtype not in _GEMM_TYPES:
            return f"element type {dtype.name} has no Gemm kernel"
        if bias.shape is None:
            return "bias shape is unknown"
        if bias.dtype is not None and bias.dtype != dtype:
            return "bias type differs from the weight type"
        if not _bias_fits(bias.shape, x.shape[0], weight.shape[1]):
            return f"bias shape {list(bias.shape)} does not broadcast to [M, N]"
        return None

    def check(self, context, a: ir.Value, b: ir.Value, add_out: ir.Value, **_: Any) -> MatchResult:
        del context
        result = MatchResult()
        add = add_out.producer()
        first_reason = None
        for mm_value, bias in ((a, b), (b, a)):
            matmul = mm_value.producer()
            if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
                continue
            reason = self._reason(matmul, add, bias)
            if reason is None:
                self.chosen[add] = (matmul, bias)
                return result
            first_reason = first_reason or reason
        return result.fail(first_reason or NOT_A_CANDIDATE)

    def rewrite(self, op, add_out: ir.Value, **_: Any):
        matmul, bias = self.chosen[add_out.producer()]
        return op.Gemm(matmul.inputs[0], matmul.inputs[1], bias, _name=matmul.name or None)


def _reads_a_matmul(add: ir.Node) -> bool:
    """The rule's first test (an input produced by a default-domain MatMul), before any pattern matching."""
    return any(v is not None and (p := v.producer()) is not None and p.op_type == "MatMul"
               and p.domain in ("", "ai.onnx") for v in add.inputs)


class FuseMatMulAddPass(QPass):
    """Turn ``MatMul(x, W) + c`` into ``Gemm(x, W, c)`` where Gemm's rank-2 contract is known to hold."""

    name = "fuse-matmul-add"
    stage = "fuse"
    preserves_float = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rule = _MatMulAddToGemm()

        def absorbed(add: ir.Node) -> list[ir.Node]:
            return [rule.chosen[add][0]]

        with paused_gc():
            fused = apply_rule(model, as_rule(rule), root_op_types=("Add",), on_skip=self.skip, absorbed=absorbed,
                               candidate=_reads_a_matmul)
        self.count("fused", fused)
        return ir.passes.PassResult(model, fused > 0)
