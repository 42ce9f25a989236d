"""Lower annotated Conv/MatMul/Gemm to static int8 QDQ, the format ONNX Runtime fuses into integer kernels.

For each node annotated ``int8-static`` (see :mod:`qcompiler.passes.annotate`)::

    X --Q(x_s, x_z)--DQ--> op(., DQ(W_q, w_s, 0, axis), DQ(b_q, x_s*w_s, 0)) [--> fused Relu/Clip] --Q--DQ--> Y

- activations: per tensor, ``activation_dtype`` (uint8 by default) asymmetric, scale/zero point from the calibrated
  range (:func:`qcompiler.qspec.scale_zero_point`: ``s = (max' - min') / 255``, ``z = round(-min' / s)`` with the
  range widened to contain 0). One Q/DQ pair per tensor however many consumers it has, so a tensor has one scale
  everywhere; every use of the tensor (graph outputs included, which keep their names) reads the DQ output.
- weights: int8 symmetric initializers (``s = max|w| / qmax``, ``qmax`` 63 or 127, see below), per channel (``axis`` of the spec) or per tensor, with a ``DequantizeLinear``.
- bias (Conv input 2; Gemm ``C`` when 1-D of length N): int32 ``b_q = round(b / (x_s w_s))`` with scale
  ``x_s w_s`` and zero point 0. Where ``|b| / (x_s w_s)`` would overflow int32 (a nearly-zero weight channel with a
  real bias) the channel's weight scale is widened to ``|b| / (x_s (2^31 - 1))``, counted as
  ``weight_scale_widened_for_bias``; a bias whose scale underflows float32 stays float (counted).
- non-finite values: a weight holding NaN or Inf, or a bias holding NaN, is refused
  (:class:`~qcompiler.errors.InvalidModelError` naming it); a layer whose bias holds ``+-inf`` (a logits mask folded
  into a Gemm) stays float (:func:`mask_bias_reason`); a bias correction that would overflow float32 is skipped.
- Gemm ``alpha`` is folded into the weight and ``beta`` into ``C`` before quantization (exact in float).
- the output Q/DQ sits on the node's output, or on the output of the Relu/Clip fused behind it
  (``node.meta["qcompiler.fused_activation"]``), so nothing is quantized between the pair and ORT fuses the
  activation into QLinearConv/QLinearMatMul.

Range of the weights: ``[-63, 63]`` with ``reduce_range=True`` (ORT's "reduce_range"), ``[-127, 127]`` with
``reduce_range=False``; the default ``"auto"`` picks by the compiling CPU (:mod:`qcompiler.formats.int8_range`). On x86 CPUs without VNNI (AVX2 only) ONNX Runtime's u8s8 kernels add pairs of
``uint8 * int8`` products in int16 with saturation (``vpmaddubsw``), so full-range weights make some outputs clip:
measured on an AVX2 EPYC, 3.5% of the outputs of a 256x1024 MatMul differ from exact integer arithmetic, and small
random MLPs/transformer blocks end 4-10% (relative L2) from fp32 instead of about 2% with 7-bit weights
(``quantize_dynamic``'s default behaves the same). 7-bit weights cannot saturate (``2 * 255 * 63 < 2^15``) and cost
6 dB of weight SQNR; on VNNI/AMX CPUs ``reduce_range=False`` gains those 6 dB back.
Depthwise Conv (``group == C_out`` and one input channel per group, weight ``[C, 1, k...]``) always gets
``[-127, 127]`` weights (counted as ``depthwise_full_range``): ORT runs it with its own depthwise kernel
(``MlasConvDepthwise``), which widens both operands to int16 and accumulates in int32 (no ``vpmaddubsw`` pair
sums), so it cannot saturate, and 7-bit steps are what hurt most there: a few-tap kernel with large taps that nearly cancel
(BN folded in) loses its DC gain to rounding. Measured on EfficientNet-Lite0 (AVX2 EPYC): 7-bit weights in its first
depthwise conv alone take top-1 agreement with fp32 to 69% (KL 0.17); 8-bit depthwise weights lift the whole model
from 55% to 74%, and ORT's fused kernels match the float emulation of the same QDQ model.

A layer left in float (excluded, or skipped) reads the float tensor, not a DequantizeLinear, also through
data-movement ops (Pad, Reshape, Transpose, ...): ONNX Runtime would otherwise turn DQ -> float Conv -> Q into a
QLinearConv with per-tensor weights of its own. A quantized layer whose output feeds only such float layers then
gets no output Q/DQ (it runs as float Conv over dequantized weights).

Other element types (``activation_dtype``/``weight_dtype`` of the annotations):

- A16W8 (``uint16`` asymmetric ``s = (max' - min') / 65535``, or ``int16`` symmetric ``s = max|r| / 32767``
  activations, int8 weights): 16-bit QuantizeLinear/DequantizeLinear exist from opset 21; a node of a model whose
  default opset is below 21 stays float (counted). The int32 bias keeps the scale ``x_s w_s``; since ``x_s`` is
  about 257 times smaller than with 8 bits, ``|b| / (x_s w_s)`` is 257 times larger and the widening guard above
  fires sooner (still counted as ``weight_scale_widened_for_bias``). ONNX Runtime has no 16-bit integer Conv/MatMul
  kernel: it runs DQ -> op -> Q in float (the model is an accuracy emulation, not faster), which is expected.
- FP8 E4M3FN (``float8e4m3fn``, weights and/or activations): symmetric, zero point the FP8 zero, ``s = max|x| / 448``
  (activations per tensor from the calibrated range, which the histogram calibrators may have clipped; weights per
  channel or per tensor, :func:`~qcompiler.passes.lower._weights.quantize_weight_fp8`), stored as FLOAT8E4M3FN
  initializers feeding DequantizeLinear (opset 19 or newer, else the node stays float, counted). Rounding is
  QuantizeLinear's ``saturate=1``: nearest even FP8 value, saturating to +-448. There is no integer bias: when the
  weights or activations are FP8 the bias stays a float input (bias correction still adds its float mean shift).
  FP8 weights ignore scales pinned by GPTQ (an integer grid), counted as ``pinned_scale_ignored_fp8``; the depthwise
  and ``reduce_range`` weight-range rules apply to int8 weights only. An FP8 output Q/DQ with a fused Relu goes
  before the Relu (exactly equivalent for FP8): ONNX Runtime's ``ReluQuantFusion`` removes a Relu feeding an FP8
  QuantizeLinear with zero point 0 as if the type were unsigned (ORT 1.2x/1.32), which breaks the model.

Activation-only ops (``node.meta["qcompiler.quant_role"] == "activations"``: Add, Mul, Softmax, LayerNormalization,
a MatMul of two activations, ...; see :mod:`qcompiler.passes.annotate`) get a Q/DQ pair on each activation input
and on the output (a MatMul's output only with ``matmul_outputs``), 8-bit types only; ORT fuses ``DQ -> op -> Q``
into QLinearAdd/QLinearMul/QLinearConcat/QLinearSigmoid/QLinearSoftmax/QLinear(Global)AveragePool/QLinearMatMul,
and runs LayerNormalization in float between the pair.

Embedding tables annotated by ``annotate-int8`` (a Gather of a constant table) are lowered by
:mod:`._int8_embedding`; a tied ``MatMul(x, Transpose(E))`` reads ``DQ(Transpose(E_q), s, 0, axis=1)`` (the table's
int8 codes and per-row scales) with the Q/DQ pair on ``x``, and no output Q/DQ.

Nodes left in float are counted with their reason: no calibrated range, default opset below 13 (per-axis
DequantizeLinear), below 21 (16-bit types) or below 19 (FP8), missing constant weight. Per-layer weight SQNR is recorded. ``preserves_float = False``.
A QAT-trained layer (``import-qat``) is lowered with its trained parameters even where its output has none (it
reaches a float residual Add or a pooling, not a trained input): that output stays float, as in training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import CalibrationError, ConfigError, InvalidModelError
from qcompiler.formats.channelwise import (
    QuantizedWeight,
    broadcast_scale,
    quantize_weight,
    quantize_weight_fp8,
    symmetric_scales,
)
from qcompiler.formats.int8_range import resolve_reduce_range
from qcompiler.metadata import PINNED_QPARAMS_KEY, TRAINED_KEY, TRAINED_QMAX_KEY
from qcompiler.pass_manager import QPass, iter_nodes
from qcompiler.passes._common import default_opset
from qcompiler.passes._finite import require_finite
from qcompiler.passes._int8_layers import layer_qmax, mask_bias_reason
from qcompiler.passes.algorithms.bias_correction import BIAS_SHIFT_KEY, get_channel_mean, mean_shift
from qcompiler.passes.annotate import (
    activation_inputs,
    is_activation_op,
    is_embedding,
    is_weight_layer,
    node_scheme,
    quantized_output,
)
from qcompiler.passes.lower._int8_embedding import lower_embeddings, plan_tables
from qcompiler.passes.lower._weights import Namer, add_constant, drop_if_unused, pinned_scale, take_over_output
from qcompiler.qspec import (
    QuantSpec,
    get_qspec,
    get_range,
    is_float_dtype,
    numpy_dtype,
    onnx_dtype,
    scale_zero_point,
)

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["LowerInt8QDQPass"]

logger = logging.getLogger(__name__)

_INT32_LIMIT = float(2**31 - 1)
#: the first default opset whose QuantizeLinear/DequantizeLinear accept each non-8-bit type
_MIN_OPSET = {"int16": 21, "uint16": 21, "float8e4m3fn": 19}


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


#: ops that only move or select activation values: a float layer behind them still reads float
_PASS_THROUGH = frozenset({"Pad", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool"})
_LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def _feeds_only_float_layers(node: ir.Node, lowered: set[ir.Node], depth: int = 0) -> bool:
    """True if ``node`` is a layer left in float, or only moves data into such layers.

    Such a consumer must read the float tensor, not a DequantizeLinear: ONNX Runtime turns DQ -> float Conv -> Q
    into a QLinearConv with per-tensor weights of its own, so an excluded layer would silently run in int8.
    """
    if node.op_type in _LAYERS:
        return node not in lowered
    if node.op_type not in _PASS_THROUGH or depth > 8 or any(out.is_graph_output() for out in node.outputs):
        return False
    users = [user for out in node.outputs for user, _ in out.uses()]
    return bool(users) and all(_feeds_only_float_layers(user, lowered, depth + 1) for user in users)


class LowerInt8QDQPass(QPass):
    """Insert QuantizeLinear/DequantizeLinear around annotated Conv/MatMul/Gemm from calibrated ranges.

    Args:
        reduce_range: 7-bit weights (``[-63, 63]``) that ORT's u8s8 kernels cannot saturate on AVX2 CPUs
            (depthwise Conv keeps ``[-127, 127]``: its kernel cannot saturate); "auto" decides by this CPU
            (see :mod:`qcompiler.formats.int8_range`).
        matmul_outputs: also quantize the outputs of MatMul/Gemm (ORT then runs ``QLinearMatMul``/``QGemm`` with
            an int8 output). Off by default: ORT runs ``DQ -> MatMul`` as ``MatMulIntegerToFloat`` (``QGemm`` with a
            float output) at the same speed, and a consumer that is quantized quantizes its own input anyway; on a
            BERT encoder, quantizing those outputs (the FFN's residual outliers) costs most of the accuracy.
        bias_correction: add the mean output shift of weight rounding to the bias where the input's channel
            means were measured (``collect-input-means``); see :mod:`qcompiler.passes.algorithms.bias_correction`.
    """

    name = "lower-int8-qdq"
    stage = "lower"
    preserves_float = False

    def __init__(self, *, reduce_range: bool | str = "auto", bias_correction: bool = True,
                 matmul_outputs: bool = False) -> None:
        super().__init__()
        self._lowered: set[ir.Node] = set()
        self._opset = 0
        for key, value in (("bias_correction", bias_correction), ("matmul_outputs", matmul_outputs)):
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name}: {key} must be true or false, got {value!r}")
        self.bias_correction = bias_correction
        self.matmul_outputs = matmul_outputs
        self.reduce_range = resolve_reduce_range(reduce_range, self.name)
        self.qmax = 63 if self.reduce_range else 127

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> LowerInt8QDQPass:
        """Options: ``reduce_range`` (pass-options); dtypes and granularity come from the annotations."""
        return cls(**options)

    # -- activations -----------------------------------------------------------------------------------------
    def _act_params(self, value: ir.Value) -> tuple[np.ndarray, np.ndarray, QuantSpec] | None:
        spec, found = get_qspec(value), get_range(value)
        pinned = value.meta.get(PINNED_QPARAMS_KEY)
        if spec is not None and not spec.dynamic and pinned is not None:  # trained by QAT: as they are
            scale, zp = pinned
            if np.dtype(zp.dtype) != numpy_dtype(spec.dtype):
                raise InvalidModelError(f"{self.name}: the trained zero point of {value.name!r} is {zp.dtype}, the "
                                        f"recipe quantizes it to {spec.dtype}")
            return np.asarray(scale, np.float32), np.asarray(zp), spec
        if spec is None or found is None or spec.dynamic:
            return None
        scale, zp = scale_zero_point(found.min, found.max, spec.dtype, spec.symmetric)
        return scale, zp, spec

    def _qdq(self, graph: ir.Graph, value: ir.Value, namer: Namer, done: dict[ir.Value, ir.Value],
             params: tuple[np.ndarray, np.ndarray, QuantSpec] | None = None) -> ir.Value:
        """The dequantized stand-in of an activation (created once per tensor; ``params`` default to its own)."""
        if value in done:
            return done[value]
        if value in done.values():  # already the dequantized stand-in of a tensor
            return value
        def keeps_float(user: ir.Node) -> bool:
            return _feeds_only_float_layers(user, self._lowered)

        if not value.is_graph_output() and all(keeps_float(user) for user, _ in value.uses()):
            self.count("activation_left_float_for_float_layers")
            return value
        params = params if params is not None else self._act_params(value)
        scale, zp, spec = params
        producer = value.producer()
        if is_float_dtype(spec.dtype) and producer is not None and producer.op_type == "Relu":
            before = producer.inputs[0]
            if (before is not None and before not in done and len(before.uses()) == 1
                    and not before.is_graph_output()):
                # fp8(relu(x) / s) == relu(fp8(x / s)) exactly (sign-symmetric rounding and saturation), so the
                # pair goes before the Relu: ORT's ReluQuantFusion drops a Relu in front of an FP8 QuantizeLinear
                # with zero point 0 as if the type were unsigned (measured: rel. L2 0.04 -> 0.72 on a CNN).
                self._qdq(graph, before, namer, done, params)
                done[value] = value  # the Relu of a dequantized FP8 tensor is already on the FP8 grid
                self.count("fp8_qdq_before_relu")
                return value
        base = value.name or "activation"
        s = add_constant(graph, namer(f"{base}_scale"), scale)
        z = add_constant(graph, namer(f"{base}_zero_point"), zp)
        q = ir.node("QuantizeLinear", [value, s, z], name=namer(f"{base}_QuantizeLinear"))
        q.outputs[0].name = namer(f"{base}_quantized")
        q.outputs[0].dtype = onnx_dtype(spec.dtype)
        q.outputs[0].shape = value.shape
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=namer(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = namer(f"{base}_dequantized")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = value.shape
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        elif len(graph):
            graph.insert_before(graph[0], [q, dq])
        else:
            graph.extend([q, dq])
        take_over_output(graph, value, dq.outputs[0], skip=q, keep=keeps_float)
        done[value] = dq.outputs[0]
        self.count("activation_qdq")
        return dq.outputs[0]

    def _why_not_activation_op(self, node: ir.Node) -> str | None:
        values = [node.inputs[i] for i in activation_inputs(node)]
        if self._quantizes_activation_op_output(node):
            values.append(node.outputs[0])
        for value in values:
            if value is None or self._act_params(value) is None:
                return f"no calibrated range for '{getattr(value, 'name', None)}'"
            spec = get_qspec(value)
            if spec.dtype not in ("uint8", "int8"):
                return f"activation-only op with {spec.dtype} activations (8-bit only)"
        return None

    def _quantizes_activation_op_output(self, node: ir.Node) -> bool:
        """Every activation-only op quantizes its output, except a MatMul (the same rule as MatMul layers)."""
        return node.op_type != "MatMul" or self.matmul_outputs

    def _lower_activation_op(self, graph: ir.Graph, node: ir.Node, namer: Namer,
                             done: dict[ir.Value, ir.Value]) -> None:
        """Q/DQ on each activation input and on the output: ORT fuses DQ -> op -> Q into its QLinear kernel."""
        for i in activation_inputs(node):
            node.replace_input_with(i, self._qdq(graph, node.inputs[i], namer, done))
        if self._quantizes_activation_op_output(node):
            self._qdq(graph, node.outputs[0], namer, done)
        self.record_layer(node, scheme="int8-static", role="activations")

    def _why_not(self, node: ir.Node) -> str | None:
        if is_activation_op(node):
            return self._why_not_activation_op(node)
        w = node.inputs[1]
        if w is None or w.const_value is None or get_qspec(w) is None:
            return "weight lost its constant value or spec"
        if self._act_params(node.inputs[0]) is None:
            return f"no calibrated range for input '{node.inputs[0].name}'"
        reason = mask_bias_reason(node)
        if reason is not None:
            return reason
        out = quantized_output(node)
        # a trained layer whose output reaches no trained input (a residual Add, a pooling) keeps a float output
        if self._quantizes_output(node) and self._act_params(out) is None and not node.meta.get(TRAINED_KEY):
            return f"no calibrated range for output '{out.name}'"
        specs = [get_qspec(w), get_qspec(node.inputs[0])]
        if self._quantizes_output(node):
            specs.append(get_qspec(out))
        for spec in specs:
            need = _MIN_OPSET.get(spec.dtype, 13) if spec is not None else 13
            if self._opset < need:
                return f"default opset below {need} ({spec.dtype} QuantizeLinear/DequantizeLinear)"
        return None

    def requires(self, model: ir.Model) -> None:
        """Static activations need calibrated ranges: annotated layers and not one range means no calibration ran
        (a single unobserved value is a counted skip instead)."""
        layers = [n for n in iter_nodes(model) if node_scheme(n) == "int8-static" and not is_embedding(n)]
        if layers and not any(get_range(v) is not None or v.meta.get(PINNED_QPARAMS_KEY) is not None
                              for n in layers for v in (*n.inputs, *n.outputs) if v is not None):
            raise CalibrationError(f"{self.name}: {len(layers)} layer(s) are annotated for static int8 but no "
                                   "activation has a calibrated range (is the 'calibrate' pass disabled?)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        candidates = [n for n in iter_nodes(model) if node_scheme(n) == "int8-static" and n.graph is graph
                      and (is_weight_layer(n) or is_activation_op(n))]
        self._opset = default_opset(model)
        tables = plan_tables(graph, "int8-static", self._why_not_tied_head)
        if not candidates and not tables:
            return ir.passes.PassResult(model, False)
        if self._opset < 13:
            for node in candidates:
                self.skip(node, "default opset below 13 (per-axis DequantizeLinear)")
            candidates = []
        namer = Namer(graph)
        done: dict[ir.Value, ir.Value] = {}
        lowered = [n for n in candidates if self._keep(n)]
        heads = [head for _, readers, reason in tables if reason is None for head in readers.heads]
        self._lowered = set(lowered) | set(heads)  # read by _qdq; valid for this run only
        old_values: list[ir.Value] = []
        try:
            for node in lowered:
                if is_activation_op(node):
                    self._lower_activation_op(graph, node, namer, done)
                    self.count(f"lowered_activation_{node.op_type}")
                    continue
                old_values.extend(v for v in node.inputs[1:] if v is not None)
                self._lower(graph, node, namer, done)
                self.count(f"lowered_{node.op_type}")

            def write_head(head: ir.Node, weight: ir.Value, scale: ir.Value, codes: QuantizedWeight) -> None:
                self._lower_tied_head(graph, head, weight, scale, codes, namer, done)

            embeddings = lower_embeddings(self, model, namer, tables, self.qmax, write_head)
        finally:
            self._lowered = set()
        for value in old_values:
            if drop_if_unused(graph, value):
                self.count("float_weights_removed")
        return ir.passes.PassResult(model, bool(lowered) or embeddings > 0)

    def _why_not_tied_head(self, head: ir.Node) -> str | None:
        """Why a tied projection (``MatMul(x, Transpose(E))``, see :mod:`._int8_embedding`) stays float, or None."""
        if self._opset < 13:
            return "default opset below 13 (per-axis DequantizeLinear)"
        params = self._act_params(head.inputs[0])
        if params is None:
            return f"no calibrated range for input '{head.inputs[0].name}'"
        if params[2].dtype not in ("uint8", "int8"):
            return f"{params[2].dtype} activations (8-bit only)"
        return None

    def _lower_tied_head(self, graph: ir.Graph, head: ir.Node, weight: ir.Value, scale: ir.Value,
                         codes: QuantizedWeight, namer: Namer, done: dict[ir.Value, ir.Value]) -> None:
        """``MatMul(Q/DQ(x), DQ(Transpose(E_q), s, 0, axis=1))``: the table's int8 codes, per-row scales per column."""
        zero = add_constant(graph, namer(f"{weight.name}_zero_point"), np.zeros(codes.scale.shape, dtype=np.int8))
        dq = ir.node("DequantizeLinear", [weight, scale, zero], attributes={"axis": 1},
                     name=namer(f"{head.name or 'tied_head'}_weight_dq"))
        dq.outputs[0].name = namer(f"{weight.name}_dequantized")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(codes.q.shape[::-1])
        graph.insert_before(head, dq)
        head.replace_input_with(1, dq.outputs[0])
        x = next((k for k, v in done.items() if v is head.inputs[0]), head.inputs[0])
        head.replace_input_with(0, self._qdq(graph, x, namer, done))
        self.record_layer(head, weight_sqnr_db=round(codes.sqnr_db, 3), scheme="int8-static", weight_dtype="int8",
                          weight_shape=list(codes.q.shape), per_channel=True)

    def _corrected_bias(self, graph: ir.Graph, node: ir.Node, x: ir.Value, weight: np.ndarray,
                        qw: QuantizedWeight, bias: np.ndarray | None, int_bias: bool,
                        namer: Namer) -> tuple[np.ndarray, ir.Value, bool] | None:
        """The bias plus the weight-rounding mean shift (see bias_correction), or None when not applicable.

        A Conv or Gemm without a bias gets one; a MatMul without one is counted and left alone.
        """
        mean = get_channel_mean(x)
        if mean is None:
            return None
        dequantized = qw.q.astype(np.float32) * broadcast_scale(qw.scale, weight.ndim, qw.axis)
        shift = mean_shift(node, weight, dequantized, mean)
        if shift is None:
            self.skip(node, "bias correction: channel mean does not fit the weight")
            return None
        earlier = node.meta.get(BIAS_SHIFT_KEY)  # the shift of an earlier rounding pass (GPTQ) on this weight
        if isinstance(earlier, np.ndarray) and earlier.shape == shift.shape:
            shift = shift + earlier
        if not np.all(np.isfinite(shift.astype(np.float32))):
            self.skip(node, "bias correction: the mean shift overflows float32 (calibration means too large)")
            return None
        if bias is None:
            if node.op_type == "MatMul":
                self.count("bias_correction_no_bias")
                return None
            new_bias = shift.astype(np.float32)
            value = add_constant(graph, namer(f"{node.name or node.op_type}_bias"), new_bias)
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, value)
            self.count("bias_correction_bias_added")
            return new_bias, value, True
        if not int_bias:
            self.skip(node, "bias correction: bias is not per output channel")
            return None
        corrected = (bias.astype(np.float64) + shift).astype(np.float32)
        if not np.all(np.isfinite(corrected)):
            self.skip(node, "bias correction: the corrected bias overflows float32 (calibration means too large)")
            return None
        self.count("bias_corrected")
        return corrected, node.inputs[2], True

    def _quantizes_output(self, node: ir.Node) -> bool:
        """Conv outputs always (ORT needs the Q to run QLinearConv); MatMul/Gemm outputs only on request."""
        return node.op_type == "Conv" or self.matmul_outputs

    def _keep(self, node: ir.Node) -> bool:
        reason = self._why_not(node)
        if reason is not None:
            self.skip(node, reason)
            return False
        return True

    def _lower(self, graph: ir.Graph, node: ir.Node, namer: Namer, done: dict[ir.Value, ir.Value]) -> None:
        w = node.inputs[1]
        x = next((k for k, v in done.items() if v is node.inputs[0]), node.inputs[0])
        base = node.name or w.name or node.op_type
        wspec = get_qspec(w)
        axis = wspec.axis if wspec.granularity == "per_channel" else None
        x_params = self._act_params(x)
        x_scale = float(x_params[0])
        fp8_weight = is_float_dtype(wspec.dtype)
        float_bias = fp8_weight or is_float_dtype(x_params[2].dtype)  # no integer grid: keep the bias float
        weight = require_finite(w.const_value.numpy(), w.name, node.name)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = None if bias_value is None else bias_value.const_value.numpy()
        bias_changed = False
        if node.op_type == "Gemm":
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            if alpha != 1.0:
                weight = (weight.astype(np.float64) * alpha).astype(np.float32)
                require_finite(weight, w.name, node.name, what="weight times the Gemm's alpha")
                node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
                self.count("gemm_alpha_folded")
            if bias is not None and beta != 1.0:
                bias = (bias.astype(np.float64) * beta).astype(np.float32)
                bias_changed = True
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                self.count("gemm_beta_folded")
        n_out = weight.shape[axis] if axis is not None else None
        int_bias = bias is not None and bias.ndim == 1 and (n_out is None or bias.shape[0] == n_out)
        if bias is not None and not int_bias:
            self.skip(node, "bias left float (not 1-D per output channel)")
        if int_bias and not float_bias:  # int32 needs a finite bias (+-inf ones were left float by _why_not)
            require_finite(bias, bias_value.name, node.name,
                           what="bias times the Gemm's beta" if bias_changed else "bias")
        if fp8_weight:
            qw, bias, bias_value, bias_changed = self._fp8_weight(graph, node, x, w, weight, axis, bias, bias_value,
                                                                  int_bias, bias_changed, namer)
            int_bias = False
            wz_dtype = onnx_dtype(wspec.dtype)
        else:
            qw, bias, bias_value, int_bias, bias_changed = self._int8_weight(
                graph, node, x, w, weight, axis, x_scale, bias, bias_value, int_bias, bias_changed, namer)
            if float_bias:
                int_bias = False
                self.count("bias_left_float_fp8")
            wz_dtype = ir.DataType.INT8
        self._emit(graph, node, x, w, weight, axis, qw, bias, bias_value, int_bias, bias_changed, x_scale,
                   wz_dtype, base, namer, done)

    def _fp8_weight(self, graph: ir.Graph, node: ir.Node, x: ir.Value, w: ir.Value, weight: np.ndarray,
                    axis: int | None, bias: np.ndarray | None, bias_value: ir.Value | None, per_channel_bias: bool,
                    bias_changed: bool, namer: Namer) -> tuple[QuantizedWeight, Any, Any, bool]:
        """FP8 weight scales and values (pinned integer-grid scales ignored) and the float bias correction."""
        if pinned_scale(w, weight, axis) is not None:
            self.count("pinned_scale_ignored_fp8")
        qw = quantize_weight_fp8(weight, axis)
        if bias is not None:
            self.count("bias_left_float_fp8")
        if self.bias_correction:
            corrected = self._corrected_bias(graph, node, x, weight, qw, bias, per_channel_bias, namer)
            if corrected is not None:
                bias, bias_value, _ = corrected
                bias_changed = True
        return qw, bias, bias_value, bias_changed

    def _int8_weight(self, graph: ir.Graph, node: ir.Node, x: ir.Value, w: ir.Value, weight: np.ndarray,
                     axis: int | None, x_scale: float, bias: np.ndarray | None, bias_value: ir.Value | None,
                     int_bias: bool, bias_changed: bool,
                     namer: Namer) -> tuple[QuantizedWeight, Any, Any, bool, bool]:
        """Int8 weight scales (depthwise/reduce-range rule, pinned scales, bias widening) and bias correction."""
        qmax = node.meta.get(TRAINED_QMAX_KEY) or layer_qmax(node, weight, self.qmax)
        if qmax != self.qmax:
            self.count("trained_weight_range" if node.meta.get(TRAINED_QMAX_KEY) else "depthwise_full_range")
        scale = pinned_scale(w, weight, axis)
        if scale is None:
            scale = symmetric_scales(weight, axis, qmax)
        else:
            self.count("pinned_weight_scales")
        if int_bias:
            needed = np.abs(bias.astype(np.float64)) / (x_scale * _INT32_LIMIT)
            wider = np.isfinite(needed) & (needed > scale.astype(np.float64))  # a non-finite bias stays float
            if np.any(wider):
                scale = np.where(wider, np.nextafter(needed.astype(np.float32), np.float32(np.inf)), scale)
                scale = scale.astype(np.float32)
                self.count("weight_scale_widened_for_bias", int(np.count_nonzero(wider)))
        qw = quantize_weight(weight, axis, scale=scale, qmax=qmax)
        if self.bias_correction and not node.meta.get(TRAINED_KEY):
            corrected = self._corrected_bias(graph, node, x, weight, qw, bias, int_bias, namer)
            if corrected is not None:
                bias, bias_value, int_bias = corrected
                bias_changed = True
        return qw, bias, bias_value, int_bias, bias_changed

    def _emit(self, graph: ir.Graph, node: ir.Node, x: ir.Value, w: ir.Value, weight: np.ndarray,
              axis: int | None, qw: QuantizedWeight, bias: np.ndarray | None, bias_value: ir.Value | None,
              int_bias: bool, bias_changed: bool, x_scale: float, wz_dtype: ir.DataType, base: str, namer: Namer,
              done: dict[ir.Value, ir.Value]) -> None:
        """Write the weight (and bias) DequantizeLinear and the activation Q/DQ pairs around ``node``."""
        wq = add_constant(graph, namer(f"{w.name}_quantized"), qw.q)
        ws = add_constant(graph, namer(f"{w.name}_scale"), qw.scale)
        wz = add_constant(graph, namer(f"{w.name}_zero_point"),
                          np.zeros(qw.scale.shape, dtype=ir.DataType(wz_dtype).numpy()))
        attrs = {"axis": axis} if axis is not None else {}
        wdq = ir.node("DequantizeLinear", [wq, ws, wz], attributes=attrs, name=namer(f"{base}_weight_dq"))
        wdq.outputs[0].name = namer(f"{w.name}_dequantized")
        wdq.outputs[0].dtype = ir.DataType.FLOAT
        wdq.outputs[0].shape = ir.Shape(weight.shape)
        new_nodes = [wdq]
        node.replace_input_with(1, wdq.outputs[0])
        if bias is not None:
            bias_scale = (np.float32(x_scale) * qw.scale).astype(np.float32)
            if int_bias and np.all(bias_scale > 0) and np.all(np.isfinite(bias_scale)):
                bq = np.clip(np.rint(bias.astype(np.float64) / bias_scale.astype(np.float64)),
                             -_INT32_LIMIT, _INT32_LIMIT).astype(np.int32)
                bq_v = add_constant(graph, namer(f"{bias_value.name}_quantized"), bq)
                bs_v = add_constant(graph, namer(f"{bias_value.name}_scale"), bias_scale)
                bz_v = add_constant(graph, namer(f"{bias_value.name}_zero_point"),
                                    np.zeros(bias_scale.shape, dtype=np.int32))
                battrs = {"axis": 0} if bias_scale.ndim else {}
                bdq = ir.node("DequantizeLinear", [bq_v, bs_v, bz_v], attributes=battrs,
                              name=namer(f"{base}_bias_dq"))
                bdq.outputs[0].name = namer(f"{bias_value.name}_dequantized")
                bdq.outputs[0].dtype = ir.DataType.FLOAT
                bdq.outputs[0].shape = ir.Shape(bias.shape)
                new_nodes.append(bdq)
                node.replace_input_with(2, bdq.outputs[0])
                if drop_if_unused(graph, bias_value):  # e.g. a bias the correction made: read by nothing else
                    self.count("float_weights_removed")
                self.count("int32_bias")
            else:
                if int_bias:
                    self.skip(node, "bias left float (bias scale underflows float32)")
                if bias_changed:
                    node.replace_input_with(2, add_constant(graph, namer(f"{bias_value.name}_scaled"), bias))
                    if drop_if_unused(graph, bias_value):  # e.g. a bias the correction made
                        self.count("float_weights_removed")
        graph.insert_before(node, new_nodes)
        node.replace_input_with(0, self._qdq(graph, x, namer, done))
        if node.meta.get(TRAINED_KEY) and self._act_params(quantized_output(node)) is None:
            self.count("trained_output_left_float")  # it reaches no trained input: training kept it float
        elif self._quantizes_output(node):
            self._qdq(graph, quantized_output(node), namer, done)
        else:
            self.count("matmul_output_left_float")
        self.record_layer(node, weight_sqnr_db=round(qw.sqnr_db, 3), scheme="int8-static",
                          weight_dtype=str(wz_dtype.name).lower(),
                          weight_shape=list(weight.shape), per_channel=axis is not None)
