"""Lower annotated MatMul/Gemm to dynamic int8: int8 weights, activations quantized at run time.

For ``Y = X W`` (MatMul, ``W`` constant ``[K, N]``) or ``Y = alpha X B' + beta C`` (Gemm, ``transA = 0``) the pass
emits exactly the pattern ONNX Runtime's optimizer fuses into ``DynamicQuantizeMatMul`` (or
``MatMulIntegerToFloat``), the same one ``onnxruntime.quantization.quantize_dynamic`` writes::

    x_q, x_s, x_z = DynamicQuantizeLinear(X)            # uint8, per tensor, computed at run time
    acc  = MatMulInteger(x_q, W_q, x_z, W_z)            # int32; W_q int8 [K, N], W_z int8 0
    Y    = Mul(Cast<float>(acc), Mul(x_s, w_s))         # w_s float32 [N] (per column) or a scalar
    Y    = Add(Y, beta C)                               # Gemm with a bias only

with ``w_s[n] = max_k |W[k, n]| / qmax`` (``qmax`` 63 or 127, see below; symmetric, zero point 0; alpha is folded into ``w_s``), so
``Y[.., n] ~ x_s w_s[n] sum_k (x_q - x_z)[.., k] W_q[k, n]``. One ``DynamicQuantizeLinear`` serves every lowered
consumer of the same activation; a weight used by several nodes is quantized once. Rank-3 activations
(``[B, S, K] x [K, N]``) work as they are (MatMulInteger broadcasts like MatMul).

Range of the weights: ``[-63, 63]`` with ``reduce_range=True`` (ORT's "reduce_range"), ``[-127, 127]`` with
``reduce_range=False``; the default ``"auto"`` picks by the compiling CPU (:mod:`qcompiler.formats.int8_range`). On x86 CPUs without VNNI (AVX2 only) ONNX Runtime's u8s8 kernels add pairs of
``uint8 * int8`` products in int16 with saturation (``vpmaddubsw``), so full-range weights make some outputs clip:
measured on an AVX2 EPYC, 3.5% of the outputs of a 256x1024 MatMul differ from exact integer arithmetic, and small
random MLPs/transformer blocks end 4-10% (relative L2) from fp32 instead of about 2% with 7-bit weights
(``quantize_dynamic``'s default behaves the same). 7-bit weights cannot saturate (``2 * 255 * 63 < 2^15``) and cost
6 dB of weight SQNR; on VNNI/AMX CPUs ``reduce_range=False`` gains those 6 dB back.

Embedding tables annotated by ``annotate-int8`` (a Gather of a constant table, and a tied ``MatMul(x, Transpose(E))``
that shares its codes and is written in the pattern above) are lowered by :mod:`._int8_embedding`.

Skipped with a counted reason: Conv (no dynamic int8 kernel in ORT), Gemm with ``transA = 1``, nodes without an
annotation, models whose default opset is below 11. A weight holding NaN or Inf is refused
(:class:`~qcompiler.errors.InvalidModelError`); the bias stays float and is not checked. Per-layer weight SQNR is recorded. The float function changes
(``preserves_float = False``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats.channelwise import QuantizedWeight, quantize_weight
from qcompiler.formats.int8_range import resolve_reduce_range
from qcompiler.pass_manager import QPass, iter_nodes
from qcompiler.passes._common import default_opset
from qcompiler.passes._finite import require_finite
from qcompiler.passes.annotate import is_weight_layer
from qcompiler.passes.lower._int8_embedding import lower_embeddings, plan_tables
from qcompiler.passes.lower._weights import Namer, add_constant, drop_if_unused, pinned_scale, take_over_output
from qcompiler.progress import track
from qcompiler.qspec import get_qspec

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["LowerInt8DynamicPass"]

logger = logging.getLogger(__name__)


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


class LowerInt8DynamicPass(QPass):
    """Rewrite annotated MatMul/Gemm nodes into the DynamicQuantizeLinear + MatMulInteger pattern.

    Args:
        reduce_range: 7-bit weights (``[-63, 63]``) that ORT's u8s8 kernels cannot saturate on AVX2 CPUs; "auto"
            decides by this CPU (see :mod:`qcompiler.formats.int8_range`).
    """

    name = "lower-int8-dynamic"
    stage = "lower"
    preserves_float = False

    def __init__(self, *, reduce_range: bool | str = "auto", progress: bool = False) -> None:
        super().__init__()
        self.progress = progress
        self.reduce_range = resolve_reduce_range(reduce_range, self.name)
        self.qmax = 63 if self.reduce_range else 127

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> LowerInt8DynamicPass:
        """Options: ``reduce_range`` (pass-options); the scheme comes from the annotations."""
        return cls(progress=bool(getattr(context, "progress", False)), **options)

    def _why_not(self, node: ir.Node) -> str | None:
        if node.op_type == "Conv":
            return "Conv has no dynamic int8 kernel (use the static int8 recipe)"
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return "Gemm with transA=1"
        w = node.inputs[1]
        if w is None or w.const_value is None or get_qspec(w) is None:
            return "weight lost its constant value or spec"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        candidates = [n for n in iter_nodes(model)
                      if is_weight_layer(n) and n.graph is graph]
        opset_ok = default_opset(model) >= 11
        tables = plan_tables(graph, "int8-dynamic", lambda head: None if opset_ok else "default opset below 11")
        if not candidates and not tables:
            return ir.passes.PassResult(model, False)
        if not opset_ok:
            for node in candidates:
                self.skip(node, "default opset below 11 (DynamicQuantizeLinear)")
            candidates = []
        namer = Namer(graph)
        dynamic_q: dict[ir.Value, ir.Node] = {}
        weights: dict[tuple[ir.Value, bool], tuple[ir.Value, ir.Value, ir.Value, QuantizedWeight]] = {}
        old_weights: list[ir.Value] = []
        modified = False
        for node in track(candidates, enabled=self.progress and len(candidates) > 8, desc="quantize weights",
                          unit="tensor"):
            reason = self._why_not(node)
            if reason is not None:
                self.skip(node, reason)
                continue
            self._lower(graph, node, namer, dynamic_q, weights)
            old_weights.extend(v for v in node.inputs[1:] if v is not None)
            graph.remove(node, safe=True)
            modified = True
            self.count(f"lowered_{node.op_type}")
        for value in old_weights:
            if drop_if_unused(graph, value):
                self.count("float_weights_removed")

        def write_head(head: ir.Node, weight: ir.Value, scale: ir.Value, codes: QuantizedWeight) -> None:
            """A tied projection: the table's codes (transposed) and row scales are its weight and column scales."""
            zero = add_constant(graph, namer(f"{weight.name}_zero_point"), np.zeros((), dtype=np.int8))
            weights[(head.inputs[1], False)] = (weight, zero, scale, codes)
            self._lower(graph, head, namer, dynamic_q, weights)
            graph.remove(head, safe=True)

        modified |= lower_embeddings(self, model, namer, tables, self.qmax, write_head) > 0
        return ir.passes.PassResult(model, modified)

    def _lower(self, graph: ir.Graph, node: ir.Node, namer: Namer, dynamic_q: dict[ir.Value, ir.Node],
               weights: dict[tuple[ir.Value, bool], tuple[ir.Value, ir.Value, ir.Value, QuantizedWeight]]) -> None:
        x, w = node.inputs[0], node.inputs[1]
        base = node.name or w.name or "matmul"
        transposed = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
        spec = get_qspec(w)
        key = (w, transposed)
        if key not in weights:
            array = require_finite(w.const_value.numpy(), w.name, node.name)
            axis = spec.axis if spec.granularity == "per_channel" else None
            qw = quantize_weight(array, axis, scale=pinned_scale(w, array, axis), qmax=self.qmax)
            q = np.ascontiguousarray(qw.q.T) if transposed else qw.q
            wq = add_constant(graph, namer(f"{w.name}_quantized"), q)
            wz = add_constant(graph, namer(f"{w.name}_zero_point"), np.zeros((), dtype=np.int8))
            ws = add_constant(graph, namer(f"{w.name}_scale"), qw.scale)
            weights[key] = (wq, wz, ws, qw)
        wq, wz, ws, qw = weights[key]
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        if alpha != 1.0:
            scaled = require_finite((qw.scale.astype(np.float64) * alpha).astype(np.float32), w.name, node.name,
                                    what="scale of the weight times the Gemm's alpha")
            ws = add_constant(graph, namer(f"{base}_alpha_scale"), scaled)
        new_nodes: list[ir.Node] = []
        dql = dynamic_q.get(x)
        if dql is None:
            dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=namer(f"{x.name or base}_dynamic_quant"))
            names = (f"{x.name or base}_quantized", f"{x.name or base}_scale", f"{x.name or base}_zero_point")
            for out, out_name in zip(dql.outputs, names, strict=True):
                out.name = namer(out_name)
            dql.outputs[0].dtype = ir.DataType.UINT8
            dql.outputs[1].dtype = ir.DataType.FLOAT
            dql.outputs[2].dtype = ir.DataType.UINT8
            graph.insert_before(node, dql)
            dynamic_q[x] = dql
        x_q, x_s, x_z = dql.outputs
        mmi = ir.node("MatMulInteger", [x_q, wq, x_z, wz], name=namer(f"{base}_matmul_integer"))
        cast = ir.node("Cast", [mmi.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=namer(f"{base}_cast"))
        scales = ir.node("Mul", [x_s, ws], name=namer(f"{base}_scales_mul"))
        out = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=namer(f"{base}_output_scale_mul"))
        mmi.outputs[0].name = namer(f"{base}_matmul_integer_out")
        mmi.outputs[0].dtype = ir.DataType.INT32
        cast.outputs[0].name = namer(f"{base}_cast_out")
        scales.outputs[0].name = namer(f"{base}_scales")
        out.outputs[0].name = namer(f"{base}_scaled")
        for v in (cast.outputs[0], scales.outputs[0], out.outputs[0]):
            v.dtype = ir.DataType.FLOAT
        new_nodes += [mmi, cast, scales, out]
        result = out.outputs[0]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            beta = float(_attr(node, "beta", 1.0))
            c = node.inputs[2]
            if beta != 1.0:
                c = add_constant(graph, namer(f"{base}_bias"),
                                 (c.const_value.numpy().astype(np.float64) * beta).astype(np.float32))
            add = ir.node("Add", [result, c], name=namer(f"{base}_bias_add"))
            add.outputs[0].name = namer(f"{base}_biased")
            add.outputs[0].dtype = ir.DataType.FLOAT
            new_nodes.append(add)
            result = add.outputs[0]
        result.shape = node.outputs[0].shape
        graph.insert_before(node, new_nodes)
        old_name = node.outputs[0].name
        take_over_output(graph, node.outputs[0], result)
        if not result.is_graph_output() and old_name:
            node.outputs[0].name, result.name = result.name, old_name
        self.record_layer(node, weight_sqnr_db=round(qw.sqnr_db, 3), scheme="int8-dynamic",
                          weight_shape=list(qw.q.shape), per_channel=qw.axis is not None)
