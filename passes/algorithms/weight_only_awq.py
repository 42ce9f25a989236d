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
(``BLOCKWISE_KEY``), like GPTQ's. Measured on SmolLM2-135M int4 block 128: AWQ with clipping 7.8% above plain
rounding's perplexity (27.6 vs 25.6, 8 windows), without clipping 11.8% above (30.9 vs 27.7, 16 windows): this
model's weights sit on GGUF Q4_1 grids that both steps break up.

Runs only with ``[weight-only] algorithm = "awq"`` and calibration data; layers whose bits are 8 (an int8 lm_head)
are left alone (nothing to gain). Skipped with a reason: a weight read by several groups, an activation that is a
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
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope, copy_type
from qcompiler.passes.algorithms._gptq_core import activation_absmax
from qcompiler.passes.lower._blockwise import BlockwiseWeight, codes_on_grid, grid, quantize_rtn, resolve_block_size
from qcompiler.passes.lower.weight_only import (
    BLOCKWISE_KEY,
    layer_bits,
    layer_weight,
    quantized_weight,
    transposed_constant,
)
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


def clipped_codes(weight: np.ndarray, x: np.ndarray, bits: int, block_size: int, symmetric: bool,
                  float_zero_point: bool, ternary: bool) -> tuple[BlockwiseWeight, float]:
    """Codes for ``W[K, N]`` whose block ranges are shrunk by the ratio (of :data:`CLIP_RATIOS`, per block and
    column) that minimises the block's share of the output error on the rows ``x[R, K]``:
    ``||x_b (W_b - Q(W_b))||^2``, ``b`` the block's rows of ``W`` (AWQ's clipping search; cross-block terms
    ignored, as there). Returns the codes and the summed error."""
    k, n = weight.shape
    blocks = packing.block_count(k, block_size)
    x64 = x.astype(np.float64)
    best = np.full((n, blocks), np.inf)
    scale = np.zeros((n, blocks), np.float32)
    zero = np.zeros((n, blocks), np.float32 if float_zero_point else np.uint8)
    for ratio in CLIP_RATIOS:
        s_r, z_r = grid_clipped(weight, bits, block_size, symmetric, float_zero_point, ternary, ratio)
        deq = BlockwiseWeight(codes_on_grid(weight, s_r, z_r, bits, block_size, ternary), s_r,
                              None if symmetric else z_r, bits, block_size).dequantize()
        diff = weight.astype(np.float64) - deq
        for b in range(blocks):
            rows = slice(b * block_size, min((b + 1) * block_size, k))
            part = x64[:, rows] @ diff[rows]
            error = np.einsum("rn,rn->n", part, part)
            better = error < best[:, b]
            best[better, b] = error[better]
            scale[better, b], zero[better, b] = s_r[better, b], z_r[better, b]
    codes = codes_on_grid(weight, scale, zero, bits, block_size, ternary)
    return BlockwiseWeight(codes, scale, None if symmetric else zero, bits, block_size), float(best.sum())


def grid_clipped(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, float_zero_point: bool,
                 ternary: bool, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The block grids of ``W`` with every block's range shrunk to ``ratio`` of its extremes."""
    if ratio == 1.0:
        return grid(weight, bits, block_size, symmetric, float_zero_point, ternary)
    clipped = np.array(weight, dtype=np.float32, copy=True)
    for start in range(0, weight.shape[0], block_size):
        part = weight[start:start + block_size]
        clipped[start:start + block_size] = np.clip(part, part.min(axis=0) * ratio, part.max(axis=0) * ratio)
    return grid(clipped, bits, block_size, symmetric, float_zero_point, ternary)


def awq_scales(mean: np.ndarray, alpha: float) -> np.ndarray:
    """``s = mean^alpha`` normalised by ``sqrt(max(s) min(s))`` and clamped to ``[1e-4, 1e4]`` (float64)."""
    s = np.asarray(mean, dtype=np.float64) ** alpha
    s = s / math.sqrt(float(s.max() * s.min()))
    return np.clip(s, 1.0 / SCALE_LIMIT, SCALE_LIMIT)


def _fits_float32(s: np.ndarray, layers: list[tuple[ir.Node, np.ndarray, int]]) -> bool:
    """Whether ``1 / s`` and every ``s W`` of the group are finite in float32."""
    with np.errstate(over="ignore", divide="ignore"):
        return bool(np.all(np.isfinite((1.0 / s).astype(np.float32)))) and all(
            np.all(np.isfinite((w * s[:, None]).astype(np.float32))) for _, w, _ in layers)


class WeightOnlyAWQPass(QPass):
    """Activation-aware per-channel scaling before weight-only rounding (see the module docstring)."""

    name = "weight-only-awq"
    stage = "calibrate"
    preserves_float = True

    def __init__(self, *, calibration_data: Any = None, enabled: bool = True, bits: int = 4, block_size: int = 32,
                 symmetric: bool = True, float_zero_point: bool = False, exclude_nodes: tuple[str, ...] = (),
                 lm_head: str = "same", ternary: bool = False, max_samples: int | None = None,
                 batch_size: int = 4, sample_rows: int = 512, seed: int = 0, clip: bool = True) -> None:
        super().__init__()
        self.calibration_data, self.enabled = calibration_data, bool(enabled)
        self.bits, self.block_size, self.symmetric = bits, block_size, bool(symmetric)
        self.float_zero_point = bool(float_zero_point) and not self.symmetric
        self.exclude_nodes, self.lm_head, self.ternary = frozenset(exclude_nodes), lm_head, bool(ternary)
        self.max_samples, self.batch_size, self.sample_rows, self.seed = max_samples, batch_size, sample_rows, seed
        self.clip = bool(clip)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyAWQPass:
        """Data from the build context; the grid from ``[weight-only]``; sample limits from ``[calibration]``."""
        w = recipe.weight_only
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None), "enabled": w.algorithm == "awq",
            "bits": w.bits, "block_size": w.block_size, "symmetric": w.symmetric,
            "float_zero_point": w.zero_point == "float", "exclude_nodes": w.exclude_nodes, "lm_head": w.lm_head,
            "ternary": w.ternary, "max_samples": recipe.calibration.max_samples, "batch_size": recipe.calibration.batch_size,
        }
        kwargs.update(options)
        return cls(**kwargs)

    def _groups(self, model: ir.Model) -> dict[ir.Value, list[tuple[ir.Node, np.ndarray, int]]]:
        """Candidate layers (node, ``W``, bits) by the activation they read (plain constant weights read by one
        node, lowered below 8 bits)."""
        groups: dict[ir.Value, list[tuple[ir.Node, np.ndarray, int]]] = {}
        for node in model.graph:
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            found = layer_weight(model, node, self.exclude_nodes)
            bits = layer_bits(node, self.bits, self.lm_head)
            if isinstance(found, str) or bits is None or bits == 8:
                continue
            if transposed_constant(node.inputs[1]) is not None or node.op_type == "Gemm":
                self.skip(node, "AWQ scales plain MatMul weights only (not a tied or transposed one)")
                continue
            if len(node.inputs[1].uses()) != 1:
                self.skip(node, "weight read by several nodes")
                continue
            groups.setdefault(node.inputs[0], []).append((node, quantized_weight(node, found[0]), bits))
        return groups

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.enabled:
            self.count("not_requested")
            return ir.passes.PassResult(model, False)
        if self.calibration_data is None:
            raise CalibrationError("AWQ needs calibration data: pass --calib DATA (token ids for a language model)")
        groups = self._groups(model)
        if not groups:
            return ir.passes.PassResult(model, False)
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
        return ir.passes.PassResult(model, applied > 0)

    def _error(self, x: np.ndarray, layers: list[tuple[ir.Node, np.ndarray, int]], scale: np.ndarray) -> float:
        total = 0.0
        for _, weight, bits in layers:
            block = resolve_block_size(self.block_size, weight.shape[0])
            scaled = (weight * scale[:, None]).astype(np.float32)
            deq = quantize_rtn(scaled, bits, block, self.symmetric, self.float_zero_point,
                               ternary=self.ternary and bits == 2).dequantize()
            diff = x @ (weight - deq / scale[:, None])
            total += float(np.vdot(diff, diff))
        return total

    def _apply(self, model: ir.Model, value: ir.Value, layers: list[tuple[ir.Node, np.ndarray, int]], mean: np.ndarray,
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
            for node, weight, bits in layers:
                block = resolve_block_size(self.block_size, weight.shape[0])
                chosen, error = clipped_codes((weight * s[:, None]).astype(np.float32), x / s, bits, block,
                                              self.symmetric, self.float_zero_point and bits != 8,
                                              self.ternary and bits == 2)
                node.meta[BLOCKWISE_KEY] = chosen
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
