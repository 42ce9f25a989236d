"""AWQ for weight-only blockwise quantization: scale the input channels that carry the most activation before rounding.

Lin et al. 2024 ("AWQ: Activation-aware Weight Quantization"): for ``Y = X W`` and any positive per-input scale
``s[K]``, ``X W = (X / s) (s W)``. Quantizing ``s W`` instead of ``W`` gives the rows of the channels with large
activations a larger share of each block's grid, so the rounding that matters most shrinks. For every group of
MatMul/Gemm that read the same activation (Q/K/V, gate/up; one scale per group, since they share ``X / s``) the
pass streams the calibration data through ONNX Runtime and keeps each input channel's mean ``|x|`` and a bounded
sample of input rows (``sample_rows``, reservoir over all batches). It then searches ``s = mean|x|^alpha``
(normalised by ``sqrt(max * min)``) over ``alpha`` in ``0, 0.05, ..., 1`` for the smallest output error of the whole
group on the sampled rows, ``sum_layers ||X W - (X / s) Q(s W)||^2`` with ``Q`` the lowering's own round-to-nearest
grid (``alpha = 0`` is plain RTN, so the result is never worse on that measure), and applies the best one: the
weights become ``s W`` (float) and one ``Mul(X, 1 / s)`` node feeds the group, so the float function is unchanged
up to float rounding ("scales kept exact"; folding ``1 / s`` into a preceding RMSNorm weight is not done yet).

Then the clipping search (AWQ's second step, ``clip = True``): for every layer, each block's grid range is shrunk
by the ratio in ``1.0, 0.95, ..., 0.55`` that gives the block's part of the output error on the sampled rows,
``||x_b (W_b - Q(W_b))||^2``, its least value; those codes go to the lowering in node metadata
(``WEIGHT_CODES_KEY``), like GPTQ's. The error is always measured with the layer's own format (its
:meth:`~qcompiler.formats.WeightFormat.quantize`), so AWQ serves any format; the clipping step needs a format with a
grid (not NF4 or FP8: their layers get round to nearest on the scaled weights). Measured on SmolLM2-135M int4 block 128: AWQ with clipping 7.8% above plain
rounding's perplexity (27.6 vs 25.6, 8 windows), without clipping 11.8% above (30.9 vs 27.7, 16 windows): this
model's weights sit on GGUF Q4_1 grids that both steps break up.

The algorithm pass of ``algorithm = "awq"``; needs calibration data; int8 layers (an int8 lm_head) are left alone
(nothing to gain: round to nearest); FP8's 3-bit mantissa is coarse enough to gain. Skipped with a reason: a weight read by several groups, an activation that is a
graph input of another type, an activation that is zero on every sampled row (nothing to weigh the channels by).
Per layer it records the chosen ``awq_alpha`` and the group's output error before and after (dB, relative).

Range: the statistics and errors are float64, so calibration values whose squares overflow float32 (``1e19`` and
up) still compare; an activation holding NaN or Inf is refused (:class:`~qcompiler.errors.CalibrationError` naming
it), and a candidate ``alpha`` whose scaled weights ``s W`` or ``1 / s`` would overflow float32 is not considered.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.calibration.observers import fold_batches
from qcompiler.errors import CalibrationError
from qcompiler.formats import GridFormat, RoundToNearest, WeightFormat, WeightSpec, get_format
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope, copy_type
from qcompiler.passes._weight_layers import annotated_layers, layer_weight, quantized_weight, transposed_constant
from qcompiler.passes.algorithms._gptq_core import activation_absmax
from qcompiler.runtime import packing

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["WeightOnlyAWQPass"]

logger = logging.getLogger(__name__)

ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 21))


class _ChannelStats:
    """Per input channel mean ``|x|`` and a bounded uniform sample of rows (a ``fold_batches`` folder)."""

    def __init__(self, name: str, sample_rows: int, rng: np.random.Generator) -> None:
        self.name, self.sample_rows, self.rng = name, sample_rows, rng
        self.abs_sum: np.ndarray | None = None
        self.rows = 0
        self.sample: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        x = array.reshape(-1, array.shape[-1]).astype(np.float32)
        activation_absmax(x, self.name)  # NaN or Inf: CalibrationError naming the activation
        total = np.abs(x).sum(axis=0, dtype=np.float64)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.rows += x.shape[0]
        pick = x[self.rng.choice(x.shape[0], min(self.sample_rows, x.shape[0]), replace=False)]
        merged = pick if self.sample is None else np.concatenate([self.sample, pick])
        if merged.shape[0] > self.sample_rows:  # keep a bounded uniform subset
            merged = merged[self.rng.choice(merged.shape[0], self.sample_rows, replace=False)]
        self.sample = merged


#: AWQ's scales are clamped to ``[1 / SCALE_LIMIT, SCALE_LIMIT]``: a ratio of ``1e8`` between two input channels
#: weights is far beyond what real activations call for (massive LLM activations are ~1e4 times typical ones), and
#: a larger one only pushes ``x / s`` toward the float32 limit
SCALE_LIMIT = 1e4

CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(10))  # 1.0 down to 0.55


def clipped_codes(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, x: np.ndarray) -> tuple[Any, float]:
    """Codes for ``W[K, N]`` whose block ranges are shrunk by the ratio (of :data:`CLIP_RATIOS`, per block and
    column) that minimises the block's share of the output error on the rows ``x[R, K]``:
    ``||x_b (W_b - Q(W_b))||^2``, ``b`` the block's rows of ``W`` (AWQ's clipping search; cross-block terms
    ignored, as there). Returns the codes (the format's quantized weight) and the summed error."""
    k, n = weight.shape
    block_size = spec.block_for(k)
    blocks = packing.block_count(k, block_size)
    x64 = x.astype(np.float64)
    best = np.full((n, blocks), np.inf)
    scale = np.zeros((n, blocks), np.float32)
    zero = np.zeros((n, blocks), np.float32 if spec.float_zero_point else np.uint8)
    for ratio in CLIP_RATIOS:
        s_r, z_r = grid_clipped(fmt, spec, weight, ratio)
        deq = fmt.from_codes(fmt.codes_on_grid(weight, s_r, z_r, spec), s_r, z_r, spec, k).dequantize()
        diff = weight.astype(np.float64) - deq
        for b in range(blocks):
            rows = slice(b * block_size, min((b + 1) * block_size, k))
            part = x64[:, rows] @ diff[rows]
            error = np.einsum("rn,rn->n", part, part)
            better = error < best[:, b]
            best[better, b] = error[better]
            scale[better, b], zero[better, b] = s_r[better, b], z_r[better, b]
    codes = fmt.codes_on_grid(weight, scale, zero, spec)
    return fmt.from_codes(codes, scale, zero, spec, k), float(best.sum())


def grid_clipped(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The block grids of ``W`` with every block's range shrunk to ``ratio`` of its extremes."""
    if ratio == 1.0:
        return fmt.grid(weight, spec)
    block_size = spec.block_for(weight.shape[0])
    clipped = np.array(weight, dtype=np.float32, copy=True)
    for start in range(0, weight.shape[0], block_size):
        part = weight[start:start + block_size]
        clipped[start:start + block_size] = np.clip(part, part.min(axis=0) * ratio, part.max(axis=0) * ratio)
    return fmt.grid(clipped, spec)


def awq_scales(mean: np.ndarray, alpha: float) -> np.ndarray:
    """``s = mean^alpha`` normalised by ``sqrt(max(s) min(s))`` and clamped to ``[1e-4, 1e4]`` (float64)."""
    s = np.asarray(mean, dtype=np.float64) ** alpha
    s = s / math.sqrt(float(s.max() * s.min()))
    return np.clip(s, 1.0 / SCALE_LIMIT, SCALE_LIMIT)


def _fits_float32(s: np.ndarray, layers: list[tuple[ir.Node, np.ndarray, WeightSpec]]) -> bool:
    """Whether ``1 / s`` and every ``s W`` of the group are finite in float32."""
    with np.errstate(over="ignore", divide="ignore"):
        return bool(np.all(np.isfinite((1.0 / s).astype(np.float32)))) and all(
            np.all(np.isfinite((w * s[:, None]).astype(np.float32))) for _, w, _ in layers)


class WeightOnlyAWQPass(QPass):
    """Activation-aware per-channel scaling before weight-only rounding (see the module docstring).

    Args:
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData` (token ids for an LLM).
        max_samples, batch_size: calibration samples to use (None: all) and per ONNX Runtime call.
        sample_rows: input rows kept per activation (a uniform sample) to measure errors on.
        seed: the sample's random seed.
        clip: also search each block's clipping ratio (formats with a grid).
    """

    name = "weight-only-awq"
    stage = "calibrate"
    preserves_float = True
    needs = frozenset({"quantize"})

    def __init__(self, *, calibration_data: Any = None, max_samples: int | None = None, batch_size: int = 4,
                 sample_rows: int = 512, seed: int = 0, clip: bool = True) -> None:
        super().__init__()
        self.calibration_data = calibration_data
        self.max_samples, self.batch_size, self.sample_rows, self.seed = max_samples, batch_size, sample_rows, seed
        self.clip = bool(clip)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyAWQPass:
        """Data from the build context; sample limits from ``[calibration]``."""
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None),
            "max_samples": recipe.calibration.max_samples, "batch_size": recipe.calibration.batch_size,
        }
        kwargs.update(options)
        return cls(**kwargs)

    def requires(self, model: ir.Model) -> None:
        if self.calibration_data is None:
            raise CalibrationError("AWQ needs calibration data: pass --calib DATA (token ids for a language model)")

    def _groups(self, model: ir.Model) -> dict[ir.Value, list[tuple[ir.Node, np.ndarray, WeightSpec]]]:
        """Candidate layers (node, ``W``, spec) by the activation they read (plain constant weights read by one
        node, lowered below 8 bits); every annotated layer's codes start as round to nearest."""
        groups: dict[ir.Value, list[tuple[ir.Node, np.ndarray, WeightSpec]]] = {}
        for node, spec in annotated_layers(model):
            node.meta[WEIGHT_CODES_KEY] = RoundToNearest()
            found = layer_weight(model, node)
            if isinstance(found, str) or (spec.bits == 8 and isinstance(get_format(spec.format), GridFormat)):
                continue  # an int8 layer (an int8 lm_head): its grid is fine enough, nothing to gain
            if transposed_constant(node.inputs[1]) is not None or node.op_type == "Gemm":
                self.skip(node, "AWQ scales plain MatMul weights only (not a tied or transposed one)")
                continue
            if len(node.inputs[1].uses()) != 1:
                self.skip(node, "weight read by several nodes")
                continue
            groups.setdefault(node.inputs[0], []).append((node, quantized_weight(node, found[0]), spec))
        return groups

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self._groups(model)
        if not groups:
            return ir.passes.PassResult(model, any(True for _ in annotated_layers(model)))  # codes marked
        inputs = list(groups)
        rng = np.random.default_rng(self.seed)
        stats = {v.name: _ChannelStats(v.name, self.sample_rows, rng) for v in inputs}
        fold_batches(io.ort_session(model, extra_outputs=inputs), stats,
                     self.calibration_data.iter_batches(self.batch_size, self.max_samples))
        scope = NameScope(model)
        applied = 0
        for value in inputs:
            found = stats[value.name]
            mean = found.abs_sum / max(found.rows, 1)
            applied += self._apply(model, value, groups[value], mean, found.sample.astype(np.float64), scope)
        self.count("groups_scaled", applied)
        return ir.passes.PassResult(model, True)  # weights scaled and/or codes written

    def _error(self, x: np.ndarray, layers: list[tuple[ir.Node, np.ndarray, WeightSpec]], scale: np.ndarray) -> float:
        total = 0.0
        for _, weight, spec in layers:
            scaled = (weight * scale[:, None]).astype(np.float32)
            deq = get_format(spec.format).quantize(scaled, spec).dequantize()
            diff = x @ (weight - deq / scale[:, None])
            total += float(np.vdot(diff, diff))
        return total

    def _apply(self, model: ir.Model, value: ir.Value, layers: list[tuple[ir.Node, np.ndarray, WeightSpec]],
               mean: np.ndarray,
               x: np.ndarray, scope: NameScope) -> int:
        mean = np.maximum(mean, 1e-8)
        signal = sum(float(np.vdot(x @ w, x @ w)) for _, w, _ in layers)
        if not signal > 0:
            for node, _, _ in layers:
                self.skip(node, "AWQ: the layer's output is zero on every sampled calibration row")
            return 0
        best_alpha, best_error, base_error = 0.0, math.inf, math.inf
        for alpha in ALPHAS:
            s = awq_scales(mean, alpha)
            if not _fits_float32(s, layers):
                continue
            error = self._error(x, layers, s)
            if alpha == 0.0:
                base_error = error
            if error < best_error:
                best_alpha, best_error = alpha, error
        for node, _, _ in layers:
            self.record_layer(node, awq_alpha=best_alpha,
                              rtn_output_error_db=round(10 * math.log10(max(base_error, 1e-300) / signal), 3),
                              awq_output_error_db=round(10 * math.log10(max(best_error, 1e-300) / signal), 3))
        s = awq_scales(mean, best_alpha).astype(np.float32)
        if self.clip:
            for node, weight, spec in layers:
                fmt: WeightFormat = get_format(spec.format)
                if not isinstance(fmt, GridFormat):
                    self.count("clip_skipped_no_grid")
                    continue
                chosen, error = clipped_codes(fmt, spec, (weight * s[:, None]).astype(np.float32), x / s)
                node.meta[WEIGHT_CODES_KEY] = chosen
                w_signal = float(np.vdot(x @ weight, x @ weight))
                self.record_layer(node, awq_clip_output_error_db=round(
                    10 * math.log10(max(error, 1e-300) / max(w_signal, 1e-300)), 3))
        if best_alpha == 0.0:
            return 0
        graph = model.graph
        name = scope.fresh(f"{value.name or 'x'}_awq_inverse_scale")
        inverse = ir.Value(name=name, const_value=ir.tensor((1.0 / s).astype(np.float32), name=name))
        graph.register_initializer(inverse)
        mul = ir.node("Mul", [value, inverse], name=scope.fresh(f"{value.name or 'x'}_awq"))
        mul.outputs[0].name = scope.fresh(f"{value.name or 'x'}_awq_scaled")
        copy_type(mul.outputs[0], value)
        first = layers[0][0]
        graph.insert_before(first, [mul])
        for node, weight, _ in layers:
            node.replace_input_with(0, mul.outputs[0])
            w = node.inputs[1]
            w.const_value = ir.tensor((weight * s[:, None]).astype(np.float32), name=w.name)
        return 1
