"""HQQ for weight-only blockwise quantization: each block's grid optimised for a robust weight-error norm, no data.

Badri & Shaji 2023 ("Half-Quadratic Quantization of Large Machine Learning Models"): with the scale ``s`` of a
block fixed, find the zero point ``z`` that minimises ``||W - s (Q - z)||_p^p`` for ``p < 1`` (default 0.7: a
sparsity-promoting norm, so a few outliers do not drag the whole block's grid), where ``Q = clip(round(W / s + z))``.
Half-quadratic splitting adds an auxiliary error ``W_e`` and alternates two closed-form steps::

    W_e = shrink_p(W - s (Q - z), beta)          generalized soft-thresholding: sign(x) max(|x| - |x|^(p-1) / beta, 0)
    z   = mean(Q - (W - W_e) / s)                over the block's values
    Q   = clip(round(W / s + z)), beta *= kappa

Our extensions: per-block bookkeeping (each block keeps its best grid by the ``l1`` error the paper stops on,
instead of one early stop for the whole tensor, so a block never ends worse than round-to-nearest); with uint8 zero
points the optimised ``z`` is rounded to a code and the scale refitted to it (rounding alone undoes the paper's
step); symmetric grids (no zero point, and the ternary grid) optimise the scale alone,
``s = sum((W - W_e)(Q - z)) / sum((Q - z)^2)``.

Measured on SmolLM2-135M (int4 block 128, bench/RESULTS.md): HQQ lowers the weights' error (SQNR +0.5-0.7 dB,
``l1`` -7 to -10%) and, with float zero points, the perplexity against round-to-nearest with float zero points;
but uint8 zero points with plain rounding beat both there, as ONNX Runtime's own HQQ is beaten by its RTN.

The algorithm pass of ``algorithm = "hqq"``; it needs no calibration data and a format with a grid (the integer
formats and ternary). It writes each annotated layer's codes into node metadata (``WEIGHT_CODES_KEY``) for
``lower-weight-only`` and records the weight SQNR of HQQ and of round-to-nearest per layer. Weights that several
MatMul/Gemm read get one set of codes (the first reader's).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats import GridFormat, RoundToNearest, WeightSpec, get_format
from qcompiler.formats.blockwise import BlockwiseWeight, column_chunks
from qcompiler.formats.channelwise import sqnr_from_energies
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._weight_layers import annotated_layers, layer_weight, quantized_weight
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
    """Best (scale, zero) per block of ``w[N, blocks, size]`` (padding masked out by ``valid``).

    ``mode``: "zero" (the paper: the zero point only) or "scale" (the zero point fixed)."""
    count = np.maximum(valid.sum(axis=2), 1)

    best_s, best_z = scale.copy(), zero.copy()
    best_error = _l1(w, valid, scale, zero, lo, hi)
    s, z = scale.copy(), zero.copy()
    for _ in range(iterations):
        q = np.clip(np.rint(w / s[..., None] + z[..., None]), lo, hi)
        w_e = _shrink(w - s[..., None] * (q - z[..., None]), beta, p)
        target = (w - w_e) * valid
        if mode == "zero":
            z = ((q - target / s[..., None]) * valid).sum(axis=2) / count
        else:
            centred = (q - z[..., None]) * valid
            energy = (centred ** 2).sum(axis=2)
            s = np.where(energy > 0, (target * centred).sum(axis=2) / np.maximum(energy, 1e-30), s)
        s = np.where(s > 0, s, best_s)
        beta *= kappa
        current = _l1(w, valid, s, z, lo, hi)
        better = current < best_error
        best_error = np.where(better, current, best_error)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s, best_z


def _column_blocks(weight: np.ndarray, cols: slice, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns ``cols`` of ``W[K, N]`` as float32 blocks ``[n, blocks, size]`` (zero padding) and the valid mask
    (float32 halves the memory traffic of the iterations; the grids are float32 in the model anyway)."""
    k = weight.shape[0]
    blocks = packing.block_count(k, block_size)
    padded = np.zeros((cols.stop - cols.start, blocks * block_size), np.float32)
    padded[:, :k] = weight[:, cols].T
    valid = np.zeros(blocks * block_size, np.float32)
    valid[:k] = 1.0
    w = padded.reshape(-1, blocks, block_size)
    return w, np.broadcast_to(valid.reshape(1, blocks, block_size), w.shape)


def _l1(w: np.ndarray, valid: np.ndarray, s: np.ndarray, z: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per-block ``sum |w - s (q - z)|`` with round-to-nearest ``q`` on the grid ``(s, z)``."""
    q = np.clip(np.rint(w / s[..., None] + z[..., None]), lo, hi)
    return (np.abs(w - s[..., None] * (q - z[..., None])) * valid).sum(axis=2)


def quantize_hqq(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, *, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, iterations: int = 20) -> BlockwiseWeight:
    """HQQ codes for ``W[K, N]`` on the blocks of ``spec`` (see the module docstring), on ``fmt``'s grid."""
    k, n = weight.shape
    block_size = spec.block_for(k)
    lo, hi = fmt.code_limits(spec)
    shape = (n, packing.block_count(k, block_size))
    scales = np.empty(shape, np.float32)
    zeros = np.empty(shape, np.float32 if spec.float_zero_point else np.uint8)
    codes = np.empty((n, k), np.uint8)
    for cols in column_chunks(weight.shape):  # bounded temporaries, the starting grids too
        w, valid = _column_blocks(weight, cols, block_size)
        s0, z0 = (g.astype(np.float32) for g in fmt.grid(weight[:, cols], spec))
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
    """Choose blockwise codes with HQQ (see the module docstring); data-free, metadata only.

    Args:
        p, beta, kappa, iterations: HQQ's norm, initial and growth of the splitting weight, and steps.
    """

    name = "weight-only-hqq"
    stage = "calibrate"
    preserves_float = True
    needs = frozenset({"grid"})

    def __init__(self, *, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iterations: int = 20) -> None:
        super().__init__()
        self.p, self.beta, self.kappa, self.iterations = float(p), float(beta), float(kappa), int(iterations)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyHQQPass:
        return cls(**options)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        done: dict[int, BlockwiseWeight] = {}
        modified = False
        for node, spec in annotated_layers(model):
            modified = True  # every annotated layer gets codes
            node.meta[WEIGHT_CODES_KEY] = RoundToNearest()
            found = layer_weight(model, node)
            fmt = get_format(spec.format)
            if isinstance(found, str) or not isinstance(fmt, GridFormat):
                continue
            if id(node.inputs[1]) in done:  # a shared weight: the lowering packs it once, from the first reader
                node.meta[WEIGHT_CODES_KEY] = done[id(node.inputs[1])]
                continue
            weight = quantized_weight(node, found[0])
            chosen = quantize_hqq(fmt, spec, weight, p=self.p, beta=self.beta, kappa=self.kappa,
                                  iterations=self.iterations)
            rtn = fmt.quantize(weight, spec)
            done[id(node.inputs[1])] = chosen
            node.meta[WEIGHT_CODES_KEY] = chosen
            self.record_layer(node, hqq_weight_sqnr_db=round(sqnr_from_energies(*chosen.error_energies(weight)), 3),
                              rtn_weight_sqnr_db=round(sqnr_from_energies(*rtn.error_energies(weight)), 3))
            self.count("layers")
        return ir.passes.PassResult(model, modified)
