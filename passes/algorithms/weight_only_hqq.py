"""HQQ for weight-only blockwise quantization: each block's grid optimised for a robust weight-error norm, weighted
by the activations when calibration data is given.

Badri & Shaji 2023 ("Half-Quadratic Quantization of Large Machine Learning Models"): with the scale ``s`` of a
block fixed, find the zero point ``z`` that minimises ``||W - s (Q - z)||_p^p`` for ``p < 1`` (default 0.7: a
sparsity-promoting norm, so a few outliers do not drag the whole block's grid), where ``Q = clip(round(W / s + z))``.
Half-quadratic splitting adds an auxiliary error ``W_e`` and alternates two closed-form steps::

    W_e = shrink_p(W - s (Q - z), beta)          generalized soft-thresholding: sign(x) max(|x| - |x|^(p-1) / beta, 0)
    z   = mean(Q - (W - W_e) / s)                over the block's values
    Q   = clip(round(W / s + z)), beta *= kappa

Our extensions: per-block bookkeeping (each block keeps its best grid by the ``l1`` error the paper stops on,
instead of one early stop for the whole tensor, so a block never ends worse than the grid it starts from); with
uint8 zero points the optimised ``z`` is rounded to a code and the scale refitted to it (rounding alone undoes the
paper's step); symmetric grids (no zero point, and the ternary grid) optimise the scale alone,
``s = sum((W - W_e)(Q - z)) / sum((Q - z)^2)``.

**With calibration data** (``--calib``) each value ``j`` of a block weighs ``I_j = E[x_j^2]`` of its input channel
(:mod:`._importance`, bounded as :mod:`qcompiler.formats.weighted_grid` bounds it): the objective becomes
``sum_j I_j |e_j|^p`` with the quadratic coupling weighted alike, so the shrinkage step is unchanged and the zero
point (or scale) steps and the ``l1`` bookkeeping become ``I``-weighted means and sums; and the search starts from
the importance-weighted grid (``start = "weighted"``) instead of the min/max one. Measured on SmolLM2-135M
(one-pass statistics, 16 held-out windows; perplexity / mean KL to fp32 / top-1 agreement; fp32 21.74): int4
b128 asym data-free 29.51 / 0.603 / 63.6% -> weighted 25.97 / 0.377 / 70.7% (RTN 27.65 / 0.547, RTN on the
weighted grid 26.41 / 0.383); int4 b32 27.12 / 0.415 -> 24.37 / 0.223; int3 b32 46.93 / 1.082 -> 31.01 / 0.711. Only the objective weighted
(``start = "plain"``): perplexity 24.13 (b128) and 22.18 (b32) but KL 0.446 and 0.276 (further from fp32), int3
34.25 / 0.850; only the start weighted: 32.45 / 0.586 (b128). With the sequential statistics (the default): b128
25.96 / 0.369, b32 24.14 / 0.218, int3 30.88 / 0.707. all-MiniLM-L6-v2 (1 - mean cosine of the pooled
embeddings to fp32): b128 0.0453 -> 0.0382, b32 0.0263 -> 0.0233. Data-free (no ``--calib``) the codes are the
paper's as before; measured there, uint8 zero points with plain rounding beat HQQ on SmolLM2 (as ONNX Runtime's own
HQQ is beaten by its RTN).

The algorithm pass of ``algorithm = "hqq"``; it needs a format with a grid (the integer formats and ternary). The
importance comes group by group from the partly quantized model (``sequential = True``, the default, as RTN's) or
from the float model in one pass. It writes each annotated layer's codes into node metadata (``WEIGHT_CODES_KEY``)
for ``lower-weight-only`` and records the weight SQNR of HQQ and of round-to-nearest per layer (and, with data, their
weighted errors in dB). Weights that several MatMul/Gemm read get one set of codes (the first reader's).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.formats import GridFormat, RoundToNearest, WeightSpec, get_format
from qcompiler.formats.blockwise import BlockwiseWeight, column_chunks
from qcompiler.formats.channelwise import sqnr_from_energies
from qcompiler.formats.weighted_grid import bounded_importance
from qcompiler.metadata import WEIGHT_CODES_KEY, WEIGHT_SPEC_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._weight_layers import annotated_layers, layer_weight, quantized_weight
from qcompiler.passes.algorithms import _importance
from qcompiler.passes.algorithms._importance import calibrated_pass_options, weighted_error_db
from qcompiler.progress import track
from qcompiler.runtime import packing

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["WeightOnlyHQQPass", "quantize_hqq"]

logger = logging.getLogger(__name__)



def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The proximal step of ``|x|^p`` (generalized soft-thresholding)."""
    magnitude = np.abs(x)
    return np.sign(x) * np.maximum(magnitude - np.power(np.maximum(magnitude, 1e-12), p - 1) / beta, 0.0)


def _optimise(w: np.ndarray, valid: np.ndarray, scale: np.ndarray, zero: np.ndarray, lo: int, hi: int,
              mode: str, p: float, beta: float, kappa: float, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, zero) per block of ``w[N, blocks, size]``, each value weighing ``valid`` (0: padding).

    ``mode``: "zero" (the paper: the zero point only) or "scale" (the zero point fixed)."""
    count = valid.sum(axis=2)
    count = np.where(count > 0, count, np.float32(1))  # a block all of whose values weigh 0: any grid will do

    best_s, best_z = scale.copy(), zero.copy()
    best_error = _l1(w, valid, scale, zero, lo, hi)
    s, z = scale.copy(), zero.copy()
    for _ in range(iterations):
        q = np.clip(np.rint(w / s[..., None] + z[..., None]), lo, hi)
        w_e = _shrink(w - s[..., None] * (q - z[..., None]), beta, p)
        target = w - w_e
        if mode == "zero":  # the (weighted) least-squares zero point, then scale, of the quadratic step
            z = ((q - target / s[..., None]) * valid).sum(axis=2) / count
        else:
            centred = q - z[..., None]
            energy = (valid * centred ** 2).sum(axis=2)
            s = np.where(energy > 0, (valid * target * centred).sum(axis=2) / np.maximum(energy, 1e-30), s)
        s = np.where(s > 0, s, best_s)
        beta *= kappa
        current = _l1(w, valid, s, z, lo, hi)
        better = current < best_error
        best_error = np.where(better, current, best_error)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s, best_z


def _column_blocks(weight: np.ndarray, cols: slice, block_size: int,
                   importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Columns ``cols`` of ``W[K, N]`` as float32 blocks ``[n, blocks, size]`` (zero padding) and the weight of
    each value in the objective: 1 (or ``importance[k]``) for a real value, 0 for padding (float32 halves the
    memory traffic of the iterations; the grids are float32 in the model anyway)."""
    k = weight.shape[0]
    blocks = packing.block_count(k, block_size)
    padded = np.zeros((cols.stop - cols.start, blocks * block_size), np.float32)
    padded[:, :k] = weight[:, cols].T
    valid = np.zeros(blocks * block_size, np.float32)
    valid[:k] = 1.0 if importance is None else importance
    w = padded.reshape(-1, blocks, block_size)
    return w, np.broadcast_to(valid.reshape(1, blocks, block_size), w.shape)


def _l1(w: np.ndarray, valid: np.ndarray, s: np.ndarray, z: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per-block ``sum |w - s (q - z)|`` with round-to-nearest ``q`` on the grid ``(s, z)``."""
    q = np.clip(np.rint(w / s[..., None] + z[..., None]), lo, hi)
    return (np.abs(w - s[..., None] * (q - z[..., None])) * valid).sum(axis=2)


def quantize_hqq(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, *, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, iterations: int = 20, importance: np.ndarray | None = None,
                 start: str = "weighted", objective: str = "weighted") -> BlockwiseWeight:
    """HQQ codes for ``W[K, N]`` on the blocks of ``spec`` (see the module docstring), on ``fmt``'s grid.

    ``importance`` (``[K]``, ``E[x_k^2]`` of the layer's inputs, or None): with ``start = "weighted"`` the search
    starts from the importance-weighted grid instead of the min/max one; with ``objective = "weighted"`` every
    block's error is weighted by it (``sum_j I_j |e_j|^p``)."""
    k, n = weight.shape
    block_size = spec.block_for(k)
    lo, hi = fmt.code_limits(spec)
    shape = (n, packing.block_count(k, block_size))
    scales = np.empty(shape, np.float32)
    zeros = np.empty(shape, np.float32 if spec.float_zero_point else np.uint8)
    codes = np.empty((n, k), np.uint8)
    weights = None
    if importance is not None and objective == "weighted":
        bounded = bounded_importance(importance)
        mean = float(bounded.mean())
        weights = (bounded / mean if mean > 0 else np.ones(k)).astype(np.float32)
    for cols in column_chunks(weight.shape):  # bounded temporaries, the starting grids too
        w, valid = _column_blocks(weight, cols, block_size, weights)
        part = weight[:, cols]
        grid = fmt.grid(part, spec) if importance is None or start != "weighted" else \
            fmt.weighted_grid(part, spec, importance)
        s0, z0 = (g.astype(np.float32) for g in grid)
        mode = "scale" if spec.symmetric else "zero"
        s, z = _optimise(w, valid, s0, z0, lo, hi, mode, p, beta, kappa, iterations)
        if not spec.symmetric and not spec.float_zero_point:  # a uint8 zero point: round it, refit the scale to it
            z = np.clip(np.rint(z), lo, hi)
            s, z = _optimise(w, valid, s, z, lo, hi, "scale", p, beta, kappa, iterations)
            worse = _l1(w, valid, s, z, lo, hi) > _l1(w, valid, s0, z0, lo, hi)
            s, z = np.where(worse, s0, s), np.where(worse, z0, z)
        scales[cols], zeros[cols] = s, z
        q = np.clip(np.rint(w / scales[cols, :, None] + zeros[cols, :, None].astype(np.float32)), lo, hi)
        codes[cols] = q.reshape(q.shape[0], -1)[:, :k]
    return fmt.from_codes(codes, scales, zeros, spec, k)


class WeightOnlyHQQPass(QPass):
    """Choose blockwise codes with HQQ (see the module docstring); metadata only.

    Args:
        p, beta, kappa, iterations: HQQ's norm, initial and growth of the splitting weight, and steps.
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData`, or None (data-free).
        weighted_grid: with calibration data, weigh every block's error by the inputs' ``E[x_k^2]`` and start from
            the weighted grid (False: the data is not read).
        sequential: take each layer's importance from the model with the layers before it quantized (False: from
            the float model in one pass).
        start: with importance, "weighted" (start from the weighted grid) or "plain" (from the min/max grid).
        max_samples, batch_size: calibration samples to use (None: all) and per ONNX Runtime call.
        progress: show progress bars.
    """

    name = "weight-only-hqq"
    stage = "calibrate"
    preserves_float = True
    needs = frozenset({"grid"})

    def __init__(self, *, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iterations: int = 20,
                 calibration_data: Any = None, weighted_grid: bool = True, sequential: bool = True,
                 start: str = "weighted", max_samples: int | None = None, batch_size: int = 4,
                 progress: bool = False) -> None:
        super().__init__()
        for option, value in (("weighted_grid", weighted_grid), ("sequential", sequential)):
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name}: {option} must be true or false, got {value!r}")
        if start not in ("weighted", "plain"):
            raise ConfigError(f"{self.name}: start must be 'weighted' or 'plain', got {start!r}")
        self.start = start
        self.p, self.beta, self.kappa, self.iterations = float(p), float(beta), float(kappa), int(iterations)
        self.calibration_data, self.weighted_grid, self.sequential = calibration_data, weighted_grid, sequential
        self.max_samples, self.batch_size, self.progress = max_samples, batch_size, bool(progress)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyHQQPass:
        """Data and progress from the build context; sample limits from ``[calibration]``."""
        return cls(**calibrated_pass_options(recipe, context, options))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        mine: list[ir.Node] = []
        for node, spec in annotated_layers(model):
            modified = True  # every annotated layer gets codes
            node.meta[WEIGHT_CODES_KEY] = RoundToNearest()
            if not isinstance(layer_weight(model, node), str) and isinstance(get_format(spec.format), GridFormat):
                mine.append(node)
        done: dict[int, BlockwiseWeight] = {}
        chosen_ids = {id(node) for node in mine}

        def choose(node: ir.Node, importance: np.ndarray | None) -> Any:
            spec = node.meta[WEIGHT_SPEC_KEY]
            fmt = get_format(spec.format)
            weight = quantized_weight(node, layer_weight(model, node)[0])  # type: ignore[index]
            if id(node) not in chosen_ids:  # sequential only: a layer the lowering rounds, quantized here too
                return fmt.quantize(weight, spec)
            if id(node.inputs[1]) in done:  # a shared weight: the lowering packs it once, from the first reader
                node.meta[WEIGHT_CODES_KEY] = done[id(node.inputs[1])]
                return done[id(node.inputs[1])]
            chosen = quantize_hqq(fmt, spec, weight, p=self.p, beta=self.beta, kappa=self.kappa,
                                  iterations=self.iterations, importance=importance, start=self.start)
            rtn = fmt.quantize(weight, spec)
            done[id(node.inputs[1])] = chosen
            node.meta[WEIGHT_CODES_KEY] = chosen
            figures: dict[str, Any] = {
                "hqq_weight_sqnr_db": round(sqnr_from_energies(*chosen.error_energies(weight)), 3),
                "rtn_weight_sqnr_db": round(sqnr_from_energies(*rtn.error_energies(weight)), 3)}
            if importance is not None:
                figures["hqq_weighted_error_db"] = round(weighted_error_db(weight, chosen.dequantize(), importance), 3)
                figures["rtn_weighted_error_db"] = round(weighted_error_db(weight, rtn.dequantize(), importance), 3)
                self.count("weighted_layers")
            self.record_layer(node, **figures)
            self.count("layers")
            return chosen

        data = self.calibration_data
        if data is None or not self.weighted_grid or not mine:
            for node in mine:
                choose(node, None)
            return ir.passes.PassResult(model, modified)
        batches = track(data.iter_batches(self.batch_size, self.max_samples), enabled=self.progress,
                        desc="HQQ importance", unit="batch")
        if self.sequential:
            nodes = [n for n, _ in annotated_layers(model) if not isinstance(layer_weight(model, n), str)]
            _importance.sequential(model, nodes, batches, choose, progress=self.progress)
        else:
            _importance.one_pass(model, mine, batches, choose)
        return ir.passes.PassResult(model, modified)
