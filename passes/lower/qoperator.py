"""Rewrite a static int8 QDQ model (``lower-int8-qdq``) into the QOperator form: explicit integer operators.

A QDQ model computes ``y = op(DQ(x_q), DQ(W_q), DQ(b_q))`` in float, with ``DQ(v) = (v - z) s``; runtimes that do
not fuse QDQ at load time want the integer operators themselves. With per-tensor ``x_s, x_z``, weights ``W_q`` int8
with scales ``w_s`` per tensor or per output channel and ``w_z`` (0 from our lowering)::

    DQ(x), DQ(W) [, DQ(b_q int32)] -> Conv [-> Relu/Clip] -> Q(y_s, y_z)
        => QLinearConv(x_q, x_s, x_z, W_q, w_s, w_z, y_s, y_z, b_q)
    DQ(x), DQ(W) -> MatMul [-> Relu/Clip] -> Q(y_s, y_z)
        => QLinearMatMul(x_q, x_s, x_z, W_q, w_s, w_z, y_s, y_z)
    DQ(x), DQ(W) [, DQ(b_q)] -> MatMul | Gemm | Conv   (float output)
        => Cast<float>(MatMulInteger | ConvInteger(x_q, W_q, x_z, w_z)) * (x_s w_s) [+ b]
    DQ(a), DQ(b) -> Add -> Q(c_s, c_z)  => com.microsoft.QLinearAdd(a_q, a_s, a_z, b_q, b_s, b_z, c_s, c_z)

Both forms compute the same integers: the accumulator ``sum (x_q - x_z)(W_q - w_z)`` is exact in int32, and
``x_s w_s`` is the float32 product the QDQ bias was quantized with. The int32 bias of QLinearConv is the QDQ bias
itself when its scale is ``x_s w_s`` (always so after our lowering), else it is requantized to that scale
(counted); a float bias is quantized to it. On the float path the bias is dequantized at compile time,
``float32(b_q - b_z) b_s`` as DequantizeLinear computes it; a Gemm's ``alpha`` multiplies the scale and its
``beta`` the bias, and ``transB = 1`` transposes the int8 weight at compile time.

A Relu/Clip between the node and its QuantizeLinear (``qcompiler.fused_activation``, or found by structure) is
dropped only when the output quantization already clips exactly: ``f(v) = sat(rint(v / y_s) + y_z)`` is
non-decreasing, so ``f(clip(v, lo, hi)) = clip(f(v), f(lo), f(hi))``, which equals ``f(v)`` for every ``v`` if and
only if ``f(lo) = q_min`` and ``f(hi) = q_max``. For a Relu (``lo = 0``) that is ``y_z = q_min``: zero point 0 for
uint8 (0.0 maps to 0) or -128 for int8. Otherwise a Conv is skipped (with the reason) and a MatMul takes the float
path, which keeps the activation and its QuantizeLinear. A Gemm always takes the float path (QLinearMatMul has no
bias input); a Relu/Clip and QuantizeLinear behind it stay.

Afterwards DequantizeLinear nodes, Constant nodes and initializers that nothing reads are removed, so a
QuantizeLinear whose DequantizeLinears were all consumed feeds the integer operators directly and the activations
between converted nodes stay 8-bit. A ``Shape`` of a dequantized tensor reads the quantized one (same shape).
Graph inputs and outputs keep their names and float types: the QuantizeLinear where the float world is entered and
a DequantizeLinear where it is left remain.

Skipped with a counted reason (left in QDQ form): a Conv/MatMul/Gemm whose input is not a per-tensor
DequantizeLinear with constant parameters, or whose weight is not a constant DequantizeLinear per tensor or per
output channel; a Gemm with ``transA = 1``; a non-constant bias; a Conv whose Relu/Clip is not exact to absorb;
an Add of two DequantizeLinears without a QuantizeLinear behind it, of mixed integer types, or any Add when
``contrib_ops`` is off. Only the main graph is rewritten; the default opset must be at least 10.

The pass rewrites an already lowered model and keeps its function (the same integers; float outputs up to float32
rounding of the epilogue), so it keeps ``preserves_float = True``: ``--verify-each`` compares its outputs with the
QDQ model's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import const_array, default_opset, drop_unused_initializers
from qcompiler.passes.lower._weights import Namer, add_constant, take_over_output

__all__ = ["ConvertQDQToQOperatorPass"]

logger = logging.getLogger(__name__)

_QRANGE = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127)}
_MS_DOMAIN = "com.microsoft"


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


@dataclasses.dataclass(frozen=True)
class _Quant:
    """The constant parameters of one DequantizeLinear (or QuantizeLinear) node."""

    node: ir.Node
    data: ir.Value  # the integer tensor (DQ) or the float tensor (Q)
    scale: ir.Value
    zero_point: ir.Value
    s: np.ndarray
    z: np.ndarray
    dtype: ir.DataType
    axis: int | None  # the axis of a 1-D scale (normalized when the rank is known), None per tensor


def _params(node: ir.Node | None, op_type: str) -> _Quant | None:
    """The node's constant scale/zero point when it is a plain ``op_type`` (Q or DQ) node, else None."""
    if node is None or node.op_type != op_type or node.domain != "" or len(node.inputs) != 3:
        return None
    data, scale, zero_point = node.inputs
    s, z = const_array(scale), const_array(zero_point)
    if data is None or s is None or z is None or s.shape != z.shape or s.ndim > 1 or _attr(node, "block_size", 0):
        return None
    if not (np.all(s > 0) and np.all(np.isfinite(s))):
        return None
    dtype = ir.DataType.from_numpy(z.dtype)
    if dtype not in _QRANGE and not (op_type == "DequantizeLinear" and dtype == ir.DataType.INT32):
        return None
    axis = None
    if s.ndim == 1:
        axis = int(_attr(node, "axis", 1))
        const = const_array(data)
        rank = const.ndim if const is not None else (len(data.shape) if data.shape is not None else None)
        if axis < 0 and rank is not None:
            axis += rank
    return _Quant(node, data, scale, zero_point, s, z, dtype, axis)


def _dequantized(value: ir.Value | None) -> _Quant | None:
    return _params(value.producer(), "DequantizeLinear") if value is not None else None


def _per_tensor(q: _Quant | None) -> bool:
    return q is not None and q.s.size == 1 and q.dtype in _QRANGE


def _float_value(q: _Quant) -> np.ndarray:
    """What DequantizeLinear computes for a constant input: ``float32(v - z) * s``."""
    v = const_array(q.data).astype(np.int64)
    shape = [1] * v.ndim
    if q.axis is not None and v.ndim:
        shape[q.axis] = -1
    diff = (v - q.z.astype(np.int64).reshape(shape)).astype(np.float32)
    return diff * q.s.astype(np.float32).reshape(shape)


def _activation_bounds(node: ir.Node) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, np.inf
    lo = hi = None
    if len(node.inputs) > 1 or not node.attributes:  # opset 11+: min/max inputs
        lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else -np.inf
        hi = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.inf
    else:
        lo, hi = _attr(node, "min", -np.inf), _attr(node, "max", np.inf)
    if lo is None or hi is None or np.size(lo) != 1 or np.size(hi) != 1:
        return None
    return float(np.asarray(lo).reshape(())), float(np.asarray(hi).reshape(()))


def _absorb_reason(act: ir.Node, out: _Quant) -> str | None:
    """None when ``Q(act(v)) == Q(v)`` for every ``v`` (see the module docstring), else why not."""
    bounds = _activation_bounds(act)
    if bounds is None:
        return f"{act.op_type} with non-constant bounds behind it"
    qmin, qmax = _QRANGE[out.dtype]

    def f(v: float) -> int:
        if np.isinf(v):
            return qmin if v < 0 else qmax
        q = np.rint(np.float32(v) / np.float32(out.s.reshape(()))) + int(out.z.reshape(()))
        return int(np.clip(q, qmin, qmax))

    lo, hi = (f(b) for b in bounds)
    if (lo, hi) != (qmin, qmax):
        return (f"{act.op_type} is not absorbed exactly by the output quantization "
                f"(its bounds quantize to [{lo}, {hi}], not [{qmin}, {qmax}])")
    return None


@dataclasses.dataclass
class _Rewrite:
    """The state of one run: fresh names and what the rewrites left possibly unused."""

    graph: ir.Graph
    namer: Namer
    dequantize: list[ir.Node] = dataclasses.field(default_factory=list)
    values: list[ir.Value] = dataclasses.field(default_factory=list)

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        return add_constant(self.graph, self.namer(base), array)

    def replace(self, node: ir.Node, new_nodes: list[ir.Node], old: ir.Value, doomed: list[ir.Node]) -> None:
        """Insert ``new_nodes`` before ``node``; the last one's output stands in for ``old``, then drop ``doomed``."""
        result = new_nodes[-1].outputs[0]
        if result.shape is None:
            result.shape = old.shape
        self.graph.insert_before(node, new_nodes)
        name = old.name
        take_over_output(self.graph, old, result)
        if not result.is_graph_output():  # the new value keeps the old name (graph outputs: done above)
            old.name, result.name = result.name, name
        self.values.extend(v for n in doomed for v in n.inputs if v is not None)  # read before remove() clears them
        self.graph.remove(doomed, safe=True)


class ConvertQDQToQOperatorPass(QPass):
    """Turn DQ -> Conv/MatMul/Gemm/Add -> Q chains into QLinearConv/QLinearMatMul/MatMulInteger/QLinearAdd.

    Args:
        contrib_ops: also convert ``DQ -> Add <- DQ -> Q`` into ``com.microsoft.QLinearAdd`` (ONNX Runtime's
            contrib domain); off keeps every operator in the default ONNX domain.
    """

    name = "convert-qdq-to-qoperator"
    stage = "lower"
    preserves_float = True  # of the QDQ model it rewrites: the verifier compares before and after

    def __init__(self, *, contrib_ops: bool = True) -> None:
        super().__init__()
        if not isinstance(contrib_ops, bool):
            raise ConfigError(f"{self.name}: contrib_ops must be true or false, got {contrib_ops!r}")
        self.contrib_ops = contrib_ops

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if default_opset(model) < 10:
            for node in graph:
                if node.op_type in ("Conv", "MatMul", "Gemm") and node.domain == "":
                    self.skip(node, "default opset below 10 (no integer operators)")
            return ir.passes.PassResult(model, False)
        run = _Rewrite(graph, Namer(graph))
        modified = False
        for node in list(graph):
            if node.graph is not graph or node.domain != "":
                continue
            if node.op_type in ("Conv", "MatMul", "Gemm"):
                reason = self._convert_layer(run, node)
            elif node.op_type == "Add" and _dequantized(node.inputs[0]) and _dequantized(node.inputs[1]):
                reason = self._convert_add(model, run, node)
            elif node.op_type == "Shape" and _dequantized(node.inputs[0]) is not None:
                run.dequantize.append(node.inputs[0].producer())
                node.replace_input_with(0, node.inputs[0].producer().inputs[0])
                self.count("shape_reads_quantized")
                reason = None
            else:
                continue
            if reason is None:
                modified = True
            else:
                self.skip(node, reason)
        self._clean(run)
        logger.debug("%s: %s, skipped %s", self.name, dict(self.stats.counters), self.stats.skip_reasons())
        return ir.passes.PassResult(model, modified)

    # -- Conv / MatMul / Gemm ---------------------------------------------------------------------------------
    def _convert_layer(self, run: _Rewrite, node: ir.Node) -> str | None:
        op = node.op_type
        x = _dequantized(node.inputs[0])
        w = _dequantized(node.inputs[1]) if len(node.inputs) > 1 else None
        if not _per_tensor(x):
            return "input is not a per-tensor DequantizeLinear"
        weight = const_array(w.data) if w is not None and w.dtype in _QRANGE else None
        if weight is None:
            return "weight is not a constant DequantizeLinear"
        if op == "Gemm" and _attr(node, "transA", 0):
            return "Gemm with transA=1"
        trans_b = op == "Gemm" and bool(_attr(node, "transB", 0))
        out_axis = 0 if op == "Conv" or trans_b else 1
        if (op == "Conv" and weight.ndim < 3) or (op != "Conv" and weight.ndim != 2):
            return f"{op} weight of rank {weight.ndim}"
        if w.s.ndim == 1 and not (w.axis == out_axis and w.s.size == weight.shape[out_axis]):
            return "weight is not quantized per tensor or per output channel"
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias_q = _dequantized(bias_value)
        if bias_q is not None and (bias_q.dtype != ir.DataType.INT32 or const_array(bias_q.data) is None):
            bias_q = None
        bias = _float_value(bias_q) if bias_q is not None else const_array(bias_value)
        if bias_value is not None and bias is None:
            return "bias is neither a constant nor a constant int32 DequantizeLinear"
        act, out, reason = self._output_chain(node)
        if reason is not None and op == "Conv":
            return reason
        if op == "Gemm" or reason is not None:  # the float path keeps the activation and the Q behind it
            if out is not None:
                self.count("gemm_output_quantize_kept")
            elif act is not None:
                self.count(f"{act.op_type.lower()}_kept")
            act, out = None, None
        accum_scale = (np.float32(x.s.reshape(())) * w.s.astype(np.float32)).astype(np.float32)
        run.dequantize += [x.node, w.node] + ([bias_q.node] if bias_q is not None else [])
        if op == "Conv" and out is not None:
            self._qlinear_conv(run, node, x, w, out, act, bias_q, bias, accum_scale)
        elif op == "MatMul" and out is not None:
            ins = [x.data, x.scale, x.zero_point, w.data, w.scale, w.zero_point, out.scale, out.zero_point]
            new = ir.node("QLinearMatMul", ins, name=node.name)
            new.outputs[0].dtype = out.dtype
            run.replace(node, [new], out.node.outputs[0], [node, *([act] if act else []), out.node])
            self.count("QLinearMatMul")
        else:
            if op == "Gemm":
                accum_scale = (accum_scale.astype(np.float64) * float(_attr(node, "alpha", 1.0))).astype(np.float32)
                if bias is not None:
                    bias = (bias.astype(np.float64) * float(_attr(node, "beta", 1.0))).astype(np.float32)
            self._integer_to_float(run, node, x, w, trans_b, accum_scale, bias)
        if act is not None:
            self.count(f"{act.op_type.lower()}_absorbed")
        return None

    @staticmethod
    def _output_chain(node: ir.Node) -> tuple[ir.Node | None, _Quant | None, str | None]:
        """``(activation or None, output Q, None)`` for ``node [-> Relu/Clip] -> Q``; ``(None, None, None)`` for a
        float output; ``(activation, None, reason)`` when the activation is not exact to absorb."""
        value, act = node.outputs[0], None
        for _ in range(2):
            uses = list(value.uses())
            if value.is_graph_output() or len(uses) != 1 or uses[0][1] != 0:
                return None, None, None
            user = uses[0][0]
            if act is None and user.op_type in ("Relu", "Clip") and user.domain == "":
                act, value = user, user.outputs[0]
                continue
            q = _params(user, "QuantizeLinear")
            if not _per_tensor(q):
                return None, None, None
            reason = _absorb_reason(act, q) if act is not None else None
            return (act, None, reason) if reason is not None else (act, q, None)
        return None, None, None

    def _qlinear_conv(self, run: _Rewrite, node: ir.Node, x: _Quant, w: _Quant, out: _Quant, act: ir.Node | None,
                      bias_q: _Quant | None, bias: np.ndarray | None, accum_scale: np.ndarray) -> None:
        ins = [x.data, x.scale, x.zero_point, w.data, w.scale, w.zero_point, out.scale, out.zero_point]
        if bias is not None:
            if (bias_q is not None and not np.any(bias_q.z) and bias_q.s.shape in ((), accum_scale.shape)
                    and np.allclose(bias_q.s, accum_scale, rtol=1e-6, atol=0.0)):
                ins.append(bias_q.data)  # the QDQ bias was quantized with x_s * w_s: QLinearConv's own bias scale
            else:
                scaled = np.rint(bias.astype(np.float64) / accum_scale.astype(np.float64))
                base = node.inputs[2].name or node.name or "conv"
                ins.append(run.constant(f"{base}_int32", np.clip(scaled, -(2**31), 2**31 - 1).astype(np.int32)))
                self.count("bias_requantized" if bias_q is not None else "bias_quantized")
        attrs = {k: a.value for k, a in node.attributes.items()}
        new = ir.node("QLinearConv", ins, attributes=attrs, name=node.name)
        new.outputs[0].dtype = out.dtype
        run.replace(node, [new], out.node.outputs[0], [node, *([act] if act else []), out.node])
        self.count("QLinearConv")

    def _integer_to_float(self, run: _Rewrite, node: ir.Node, x: _Quant, w: _Quant, trans_b: bool,
                          accum_scale: np.ndarray, bias: np.ndarray | None) -> None:
        """``Cast<float>(MatMulInteger | ConvInteger) * (x_s w_s) [+ bias]`` in place of a float-output layer."""
        base = node.name or node.op_type
        w_zero = w.zero_point
        if w.z.ndim and np.all(w.z == w.z.reshape(-1)[0]):  # one zero point: a scalar works for every runtime
            w_zero = run.constant(f"{base}_weight_zero_point", w.z.reshape(-1)[0].copy())
        w_data = w.data
        if trans_b:  # Gemm B' = B^T: transpose the int8 weight once, here
            w_data = run.constant(f"{w.data.name}_transposed", np.ascontiguousarray(const_array(w.data).T))
        ins = [x.data, w_data, x.zero_point, w_zero]
        if node.op_type == "Conv":
            core = ir.node("ConvInteger", ins, attributes={k: a.value for k, a in node.attributes.items()},
                           name=node.name)
            channels = [1, -1] + [1] * (len(const_array(w.data).shape) - 2)  # [1, M, 1, ...]
            accum_scale = accum_scale.reshape(channels) if accum_scale.ndim else accum_scale
            bias = bias.reshape(channels) if bias is not None else None
        else:
            core = ir.node("MatMulInteger", ins, name=node.name)
        core.outputs[0].name, core.outputs[0].dtype = run.namer(f"{base}_int32"), ir.DataType.INT32
        cast = ir.node("Cast", core.outputs, attributes={"to": ir.DataType.FLOAT}, name=run.namer(f"{base}_cast"))
        scale = run.constant(f"{base}_output_scale", accum_scale)
        new_nodes = [core, cast, ir.node("Mul", [cast.outputs[0], scale], name=run.namer(f"{base}_rescale"))]
        if bias is not None:
            bias_value = run.constant(f"{base}_bias_float", bias.astype(np.float32))
            new_nodes.append(ir.node("Add", [new_nodes[-1].outputs[0], bias_value], name=run.namer(f"{base}_bias")))
        for n in new_nodes[1:]:
            n.outputs[0].name, n.outputs[0].dtype = run.namer(f"{n.name}_out"), ir.DataType.FLOAT
        run.replace(node, new_nodes, node.outputs[0], [node])
        self.count(core.op_type)

    # -- Add --------------------------------------------------------------------------------------------------
    def _convert_add(self, model: ir.Model, run: _Rewrite, node: ir.Node) -> str | None:
        if not self.contrib_ops:
            return "Add of DequantizeLinears needs com.microsoft.QLinearAdd (contrib_ops is off)"
        a, b = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
        if not (_per_tensor(a) and _per_tensor(b)):
            return "Add input is not a per-tensor DequantizeLinear"
        out = node.outputs[0]
        uses = list(out.uses())
        q = _params(uses[0][0], "QuantizeLinear") if len(uses) == 1 and not out.is_graph_output() else None
        if not _per_tensor(q):
            return "Add output is not only quantized per tensor"
        if not a.dtype == b.dtype == q.dtype:
            return "Add of mixed integer types"
        ins = [a.data, a.scale, a.zero_point, b.data, b.scale, b.zero_point, q.scale, q.zero_point]
        new = ir.node("QLinearAdd", ins, domain=_MS_DOMAIN, name=node.name)
        new.outputs[0].dtype = q.dtype
        model.opset_imports.setdefault(_MS_DOMAIN, 1)
        run.dequantize += [a.node, b.node]
        run.replace(node, [new], q.node.outputs[0], [node, q.node])
        self.count("QLinearAdd")
        return None

    # -- cleanup ----------------------------------------------------------------------------------------------
    def _clean(self, run: _Rewrite) -> None:
        """Remove the DequantizeLinear and Constant nodes, then the initializers, that nothing reads any more."""
        graph, values = run.graph, list(run.values)
        for dq in dict.fromkeys(run.dequantize):
            if dq.graph is graph and not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                values.extend(v for v in dq.inputs if v is not None)
                graph.remove(dq, safe=True)
                self.count("dequantize_removed")
        values = list(dict.fromkeys(values))
        for value in values:
            producer = value.producer()
            if (producer is not None and producer.op_type == "Constant" and producer.graph is graph
                    and not value.uses() and not value.is_graph_output()):
                graph.remove(producer, safe=True)
                self.count("constants_removed")
        removed = drop_unused_initializers(values)
        if removed:
            self.count("initializers_removed", removed)
