"""AWQ for weight-only blockwise quantization: scale the input channels that carry the most activation before rounding.

Lin et al. 2024 ("AWQ: Activation-aware Weight Quantization"): for ``Y = X W`` and any positive per-input scale
``s[K]``, ``X W = (X / s) (s W)``. Quantizing ``s W`` instead of ``W`` gives the rows of the channels with large
activations a larger share of each block's grid, so the rounding that matters most shrinks. Layers are MatMul and
Gemm (a Gemm's bias is added after the product, so input-channel scales leave it alone). For every group of layers
that read the same activation (Q/K/V, gate/up; one scale per group, since they share ``X / s``) the pass keeps each
input channel's mean ``|x|`` and ``E[x^2]`` and a bounded sample of input rows (``sample_rows``, reservoir over all
batches), then (:mod:`._awq_search`):

1. searches ``s = mean|x|^alpha`` over ``alpha`` in ``0, 0.05, ..., 1`` for the smallest output error of the whole
   group on the sampled rows, ``sum_layers ||X W - (X / s) Q(s W)||^2`` with ``Q`` the layer format's round to
   nearest (``alpha = 0`` is plain RTN, so the result is never worse on that measure; ``scales = False`` skips it);
2. chooses each block's grid of ``s W`` (``clip``; formats with a grid): the range shrunk by a ratio in
   ``1.0, 0.95, ..., 0.55`` (AWQ's clipping) or, with ``weighted_grid``, the importance-weighted grid of
   ``E[(x / s)^2]`` (llama.cpp's imatrix), whichever gives the block's part of the output error on the sampled
   rows its least value; those codes go to the lowering in node metadata (``WEIGHT_CODES_KEY``), like GPTQ's.

With ``sequential`` (the default) the statistics of each group come from the model in which every group before it
is already quantized (:mod:`.sequential`: the layers AWQ scaled compute ``x Q(s W) / s``, the others their round to
nearest), so a group's scales and grids see the error upstream; memory is one group's statistics plus the live
values at one cut. Without it, every group's statistics come from the float model in one streamed pass.

The weights become ``s W`` (float) and the group reads ``X / s``: ``1 / s`` is folded into the operation that makes
``X`` where the graph allows (an RMSNorm or LayerNorm weight and bias read only by the group: :mod:`._awq_fold`),
else one ``Mul(X, 1 / s)`` node feeds the group. Either way the float function is unchanged up to float rounding.
The error is always measured with the layer's own format (its :meth:`~qcompiler.formats.WeightFormat.quantize`),
so AWQ serves any format; the grid step needs a format with a grid (NF4 and FP8 layers get round to nearest on the
scaled weights).

Measured on SmolLM2-135M int4 block 128 asymmetric (16 evaluation windows; perplexity, mean KL(fp32 || quantized)
per token, top-1 agreement with fp32): round to nearest 27.65 / 0.547 / 0.648; AWQ as it was (one pass, ``Mul``)
31.50 / 0.373 / 0.720; the defaults 30.48 / 0.347 / 0.725; with ``weighted_grid`` 31.84 / 0.381 / 0.726;
``scales = False, weighted_grid = True`` 25.33 / 0.351 / 0.727. So AWQ moves the model much closer to fp32 than
round to nearest does, and its scales lower every layer's output error on held-out text too (Q/K/V by 4-5 dB), yet
perplexity rises: half of these tokens get ``p < 0.1`` from fp32 itself, and there round to nearest's flatter output
(entropy 3.17 nats per token against fp32's 2.71) costs nothing while AWQ, as sharp as fp32 and less accurate,
loses 0.33 nats per token (47 % of its increase; on the tokens fp32 predicts it loses less than round to nearest).
The v_proj scales carry most of it. Layer objectives that weigh every token equally, drop the mean of the
activations, or add AutoAWQ's weight term all measured worse (KL 0.39 to 0.53). MiniLM (mean-pooled cosine to
fp32, int4 block 32): round to nearest 0.9725, AWQ as it was 0.9795, the defaults 0.9798, ``scales = False``
0.9741: the scales are what pays there.

The algorithm pass of ``algorithm = "awq"``; needs calibration data; int8 layers (an int8 lm_head) are left alone
(nothing to gain: round to nearest); FP8's 3-bit mantissa is coarse enough to gain. Skipped with a reason: a weight
read by several nodes (a tied lm_head), an activation that is zero on every sampled row (nothing to weigh the
channels by). Per layer it records the chosen ``awq_alpha``, the group's output error of round to nearest and of
the chosen scales (dB, relative), the layer's error after the grid step, and the share of its blocks that took the
weighted grid.

Range: the statistics and errors are float64, so calibration values whose squares overflow float32 (``1e19`` and
up) still compare; an activation holding NaN or Inf is refused (:class:`~qcompiler.errors.CalibrationError` naming
it), and a candidate ``alpha`` whose scaled weights ``s W`` or ``1 / s`` would overflow float32 is not considered.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.calibration.observers import fold_batches
from qcompiler.errors import CalibrationError
from qcompiler.formats import GridFormat, RoundToNearest, WeightSpec, get_format
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import NameScope
from qcompiler.passes._weight_layers import (
    annotated_layers,
    attribute,
    layer_weight,
    quantized_weight,
    transposed_constant,
)
from qcompiler.passes.algorithms._awq_fold import scale_input
from qcompiler.passes.algorithms._awq_search import (
    ALPHAS,
    CLIP_RATIOS,
    SCALE_LIMIT,
    awq_scales,
    best_codes,
    clipped_codes,
    grid_clipped,
)
from qcompiler.passes.algorithms._gptq_core import activation_absmax
from qcompiler.passes.algorithms.sequential import LayerGroup, layer_groups, run_sequentially
from qcompiler.progress import track

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["ALPHAS", "CLIP_RATIOS", "SCALE_LIMIT", "WeightOnlyAWQPass", "awq_scales", "clipped_codes",
           "grid_clipped"]

logger = logging.getLogger(__name__)

Layer = tuple[ir.Node, np.ndarray, WeightSpec]  # a node, its float ``W[K, N]`` and its spec


class _ChannelStats:
    """Per input channel ``sum |x|`` and ``sum x^2`` and a bounded uniform sample of rows (a ``fold_batches``
    folder)."""

    def __init__(self, name: str, sample_rows: int, rng: np.random.Generator) -> None:
        self.name, self.sample_rows, self.rng = name, sample_rows, rng
        self.abs_sum: np.ndarray | None = None
        self.sq_sum: np.ndarray | None = None
        self.rows = 0
        self.sample: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        x = array.reshape(-1, array.shape[-1]).astype(np.float32)
        activation_absmax(x, self.name)  # NaN or Inf: CalibrationError naming the activation
        total = np.abs(x).sum(axis=0, dtype=np.float64)
        square = np.einsum("rk,rk->k", x, x, dtype=np.float64)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.sq_sum = square if self.sq_sum is None else self.sq_sum + square
        self.rows += x.shape[0]
        pick = x[self.rng.choice(x.shape[0], min(self.sample_rows, x.shape[0]), replace=False)]
        merged = pick if self.sample is None else np.concatenate([self.sample, pick])
        if merged.shape[0] > self.sample_rows:  # keep a bounded uniform subset
            merged = merged[self.rng.choice(merged.shape[0], self.sample_rows, replace=False)]
        self.sample = merged


@dataclasses.dataclass
class _Fit:
    """A group's chosen scales (``s``: float32 values in float64; all ones for ``alpha = 0``)."""

    value: ir.Value
    layers: list[Layer]
    s: np.ndarray
    alpha: float


def _fits_float32(s: np.ndarray, layers: list[Layer]) -> bool:
    """Whether ``1 / s`` and every ``s W`` of the group are finite in float32."""
    with np.errstate(over="ignore", divide="ignore"):
        return bool(np.all(np.isfinite((1.0 / s).astype(np.float32)))) and all(
            np.all(np.isfinite((w * s[:, None]).astype(np.float32))) for _, w, _ in layers)


def _rounded(weight: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """``W[K, N]`` as round to nearest in ``spec``'s format gives it back (what the lowering writes)."""
    return get_format(spec.format).quantize(weight, spec).dequantize()


class WeightOnlyAWQPass(QPass):
    """Activation-aware per-channel scaling before weight-only rounding (see the module docstring).

    Args:
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData` (token ids for an LLM).
        max_samples, batch_size: calibration samples to use (None: all) and per ONNX Runtime call.
        sample_rows: input rows kept per activation (a uniform sample) to measure errors on.
        seed: the sample's random seed.
        scales: search the per-channel scales (AWQ's first step); False: the grid step alone.
        clip: search each block's clipping ratio (formats with a grid).
        weighted_grid: offer each block the importance-weighted grid too (formats with a grid).
        sequential: statistics from the partly quantized model, group by group; False: from the float model.
        fold: fold ``1 / s`` into a preceding normalization where the graph allows; False: always a ``Mul``.
        progress: show progress bars.
    """

    name = "weight-only-awq"
    stage = "calibrate"
    preserves_float = True
    needs = frozenset({"quantize"})

    def __init__(self, *, calibration_data: Any = None, max_samples: int | None = None, batch_size: int = 4,
                 sample_rows: int = 512, seed: int = 0, scales: bool = True, clip: bool = True,
                 weighted_grid: bool = False, sequential: bool = True, fold: bool = True,
                 progress: bool = False) -> None:
        super().__init__()
        self.calibration_data = calibration_data
        self.max_samples, self.batch_size, self.sample_rows, self.seed = max_samples, batch_size, sample_rows, seed
        self.scales, self.clip, self.weighted_grid = bool(scales), bool(clip), bool(weighted_grid)
        self.sequential, self.fold, self.progress = bool(sequential), bool(fold), bool(progress)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyAWQPass:
        """Data and progress from the build context; sample limits from ``[calibration]``."""
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None),
            "max_samples": recipe.calibration.max_samples, "batch_size": recipe.calibration.batch_size,
            "progress": bool(getattr(context, "progress", False)),
        }
        kwargs.update(options)
        return cls(**kwargs)

    def requires(self, model: ir.Model) -> None:
        if self.calibration_data is None:
            raise CalibrationError("AWQ needs calibration data: pass --calib DATA (token ids for a language model)")

    def _layers(self, model: ir.Model) -> tuple[list[Layer], list[Layer]]:
        """(the layers AWQ scales, the other lowered layers: round to nearest); every annotated layer's codes start
        as round to nearest."""
        mine: list[Layer] = []
        rounded: list[Layer] = []
        for node, spec in annotated_layers(model):
            node.meta[WEIGHT_CODES_KEY] = RoundToNearest()
            found = layer_weight(model, node)
            if isinstance(found, str):
                continue
            if spec.bits == 8 and isinstance(get_format(spec.format), GridFormat):
                rounded.append((node, found[0], spec))  # an int8 layer (an int8 lm_head): nothing to gain
            elif transposed_constant(node.inputs[1]) is not None:
                self.skip(node, "AWQ does not scale a tied weight (the Transpose of an embedding table)")
                rounded.append((node, found[0], spec))
            elif len(node.inputs[1].uses()) != 1:
                self.skip(node, "weight read by several nodes")
                rounded.append((node, found[0], spec))
            else:
                mine.append((node, quantized_weight(node, found[0]), spec))
        return mine, rounded

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        mine, rounded = self._layers(model)
        if not mine:
            return ir.passes.PassResult(model, any(True for _ in annotated_layers(model)))  # codes marked
        rng = np.random.default_rng(self.seed)
        batches = self.calibration_data.iter_batches(self.batch_size, self.max_samples)
        if self.sequential:
            fits = self._sequential(model, mine, rounded, batches, rng)
        else:
            fits = self._one_pass(model, mine, batches, rng)
        scope = NameScope(model)
        for fit in fits:
            if fit.alpha == 0.0:
                continue  # s = 1: nothing to rewrite
            for node, weight, _ in fit.layers:
                w = node.inputs[1]
                scaled = (weight * fit.s[:, None]).astype(np.float32)
                transposed = node.op_type == "Gemm" and attribute(node, "transB", 0)
                w.const_value = ir.tensor(np.ascontiguousarray(scaled.T if transposed else scaled), name=w.name)
            how = scale_input(model, fit.value, [node for node, _, _ in fit.layers], fit.s, scope, self.fold)
            self.count(f"scales_{how}")  # scales_folded or scales_mul
            self.count("groups_scaled")
        return ir.passes.PassResult(model, True)  # weights scaled and/or codes written

    def _one_pass(self, model: ir.Model, mine: list[Layer], batches: Iterable[dict[str, np.ndarray]],
                  rng: np.random.Generator) -> list[_Fit]:
        """Every group's statistics from the float model, one streamed pass."""
        groups: dict[ir.Value, list[Layer]] = {}
        for layer in mine:
            groups.setdefault(layer[0].inputs[0], []).append(layer)  # type: ignore[arg-type]
        inputs = list(groups)
        stats = {v.name: _ChannelStats(v.name, self.sample_rows, rng) for v in inputs}
        fold_batches(io.ort_session(model, extra_outputs=inputs), stats, batches)
        fits = [self._fit(value, groups[value], stats[value.name])
                for value in track(inputs, enabled=self.progress, desc="AWQ", unit="group")]
        return [fit for fit in fits if fit is not None]

    def _sequential(self, model: ir.Model, mine: list[Layer], rounded: list[Layer],
                    batches: Iterable[dict[str, np.ndarray]], rng: np.random.Generator) -> list[_Fit]:
        """Group by group, each group's statistics from the partly quantized model (see the module docstring)."""
        scaled = {id(layer[0]): layer for layer in mine}
        plain = {id(node): (weight, spec) for node, weight, spec in rounded}
        groups = layer_groups(model, [layer[0] for layer in mine + rounded])
        stats: dict[int, _ChannelStats] = {}
        fits: list[_Fit] = []

        def observe(group: LayerGroup, activation: np.ndarray) -> None:
            if any(id(node) in scaled for node in group.nodes):
                name = group.source.name or "activation"
                stats.setdefault(id(group.source), _ChannelStats(name, self.sample_rows, rng)).update(activation)

        def quantize(group: LayerGroup) -> dict[ir.Node, np.ndarray]:
            weights: dict[ir.Node, np.ndarray] = {}
            layers = [scaled[id(node)] for node in group.nodes if id(node) in scaled]
            if layers:
                fit = self._fit(group.source, layers, stats.pop(id(group.source)))
                if fit is not None:
                    fits.append(fit)
                for node, weight, spec in layers:
                    weights[node] = self._dequantized(node, weight, spec, fit)
            if group is not groups[-1]:  # the last group's weights feed nothing that is still to be calibrated
                for node in group.nodes:
                    if node not in weights:
                        weights[node] = _rounded(*plain[id(node)])
            return weights

        run_sequentially(model, groups, batches, observe, quantize, progress=self.progress)
        return fits

    @staticmethod
    def _dequantized(node: ir.Node, weight: np.ndarray, spec: WeightSpec, fit: _Fit | None) -> np.ndarray:
        """What the lowered layer computes, as a ``W[K, N]`` of the unscaled graph: ``Q(s W) / s``."""
        s = np.ones(weight.shape[0]) if fit is None else fit.s
        chosen = node.meta.get(WEIGHT_CODES_KEY)
        if isinstance(chosen, RoundToNearest) or chosen is None:
            deq = _rounded((weight * s[:, None]).astype(np.float32), spec)
        else:
            deq = chosen.dequantize()
        return (deq / s[:, None]).astype(np.float32)

    def _group_error(self, x: np.ndarray, layers: list[Layer], scale: np.ndarray) -> float:
        total = 0.0
        for _, weight, spec in layers:
            deq = _rounded((weight * scale[:, None]).astype(np.float32), spec)
            diff = x @ (weight - deq / scale[:, None])
            total += float(np.vdot(diff, diff))
        return total

    def _fit(self, value: ir.Value, layers: list[Layer], found: _ChannelStats) -> _Fit | None:
        """The group's scales (searched) and its layers' codes (into their metadata); None when the sampled rows
        give every layer a zero output (codes: round to nearest)."""
        assert found.sample is not None and found.abs_sum is not None and found.sq_sum is not None
        x = found.sample.astype(np.float64)
        mean = np.maximum(found.abs_sum / max(found.rows, 1), 1e-8)
        signal = sum(float(np.vdot(x @ w, x @ w)) for _, w, _ in layers)
        if not signal > 0:
            for node, _, _ in layers:
                self.skip(node, "AWQ: the layer's output is zero on every sampled calibration row")
            return None
        best_alpha, best_error, base_error = 0.0, math.inf, math.inf
        for alpha in ALPHAS if self.scales else (0.0,):
            s = awq_scales(mean, alpha)
            if not _fits_float32(s, layers):
                continue
            error = self._group_error(x, layers, s.astype(np.float32).astype(np.float64))
            if alpha == 0.0:
                base_error = error
            if error < best_error:
                best_alpha, best_error = alpha, error
        s = awq_scales(mean, best_alpha).astype(np.float32).astype(np.float64)
        importance = found.sq_sum / max(found.rows, 1) / (s * s) if self.weighted_grid else None
        for node, weight, spec in layers:
            self.record_layer(node, awq_alpha=best_alpha,
                              rtn_output_error_db=round(10 * math.log10(max(base_error, 1e-300) / signal), 3),
                              awq_output_error_db=round(10 * math.log10(max(best_error, 1e-300) / signal), 3))
            fmt = get_format(spec.format)
            if not (self.clip or importance is not None):
                continue
            if not isinstance(fmt, GridFormat):
                self.count("clip_skipped_no_grid")
                continue
            chosen, error, share = best_codes(fmt, spec, (weight * s[:, None]).astype(np.float32), x / s,
                                              importance, CLIP_RATIOS if self.clip else (1.0,))
            node.meta[WEIGHT_CODES_KEY] = chosen  # (x / s) (s W - Q) = x (W - Q / s): the same error
            w_signal = float(np.vdot(x @ weight, x @ weight))
            self.record_layer(node, awq_clip_output_error_db=round(
                10 * math.log10(max(error, 1e-300) / max(w_signal, 1e-300)), 3), awq_weighted_grid_share=round(share, 3))
        return _Fit(value, layers, s, best_alpha)
