"""``nf4-dq``: NF4 with double quantization: the per-block absmax values are themselves stored in 8 bits.

QLoRA's double quantization saves about 0.37 bits a weight at block 64 (a float32 absmax a block becomes a byte).
qcompiler's second level is its own, chosen so that ONNX Runtime rebuilds the absmax with plain float32 operations
that numpy and torch compute bit for bit (no lookup map, no fused multiply-add):

- the absmax of the blocks (:func:`qcompiler.formats.nf4.quantize_nf4`) go in groups of :data:`GROUP` consecutive
  blocks; a group stores ``offset = min`` and ``step = (max - min) / 255**2`` (float32; ``1`` when all are equal)
  and a code ``q`` (uint8) per block: the nearest of the grid below;
- the absmax a layer computes with is ``float32(q) * float32(q) * step + offset`` in float32 (the square is exact;
  a product, then a sum, each rounded): never below the group's smallest absmax. The grid is quadratic, dense near
  the group's smallest values where a block's relative error matters most: a group whose absmax spread 10x is
  served within 1.2% of each value (a linear grid: 5.6% on SmolLM2-135M), and the error is at most half the gap
  ``(2q + 1) * step`` around the chosen code;
- the NF4 codes are then the nearest codebook values of ``w / that absmax`` (the absmax it is served with).

ONNX form: the absmax input of ``MatMulBnb4`` is computed at load time from the stored bytes::

    c = Cast(q[G, 256], float)
    absmax = Slice(Reshape(Add(Mul(Mul(c, c), step[G, 1]), offset[G, 1]), [-1]), 0, n_blocks)
    Y = com.microsoft.MatMulBnb4(A, B_packed, absmax; K, N, block_size, quant_type = 1)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats.base import EmitContext, Emitted, WeightSpec
from qcompiler.formats.nf4 import Nf4Format, Nf4Weight, nearest_nf4_codes, nf4_absmax
from qcompiler.runtime import packing

__all__ = ["GROUP", "NF4_DQ", "Nf4DqFormat", "Nf4DqWeight", "double_quantize_absmax", "served_absmax"]

#: absmax values per second-level group (QLoRA's choice)
GROUP = 256


def served_absmax(codes: np.ndarray, step: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float32 ``q * q * step + offset`` (codes ``[G, GROUP]``, step and offset ``[G]``), each operation rounded in
    float32 as ONNX Runtime's Mul and Add are."""
    squared = codes.astype(np.float32) * codes.astype(np.float32)  # exact: at most 255**2
    return squared * step[:, None] + offset[:, None]


def double_quantize_absmax(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 ``[G * GROUP]`` (padding 0), step float32 ``[G]``, offset float32 ``[G]``, the served absmax
    float32 ``[n]``) of float32 ``absmax`` ``[n]`` (see the module docstring)."""
    n = absmax.size
    groups = -(-n // GROUP)
    exact = np.asarray(absmax, np.float32).astype(np.float64)
    padded = np.full(groups * GROUP, np.nan)
    padded[:n] = exact
    grid = padded.reshape(groups, GROUP)
    low, high = np.nanmin(grid, axis=1), np.nanmax(grid, axis=1)
    step = ((high - low) / 255**2).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
    offset = low.astype(np.float32)
    position = np.nan_to_num((grid - offset.astype(np.float64)[:, None]) / step.astype(np.float64)[:, None])
    guess = np.rint(np.sqrt(np.clip(position, 0, 255**2)))
    best_codes = np.zeros(grid.shape, np.uint8)
    best_error = np.full(grid.shape, np.inf)
    for shift in (-1, 0, 1):  # the nearest served value is the guess or a neighbour of it
        codes = np.clip(guess + shift, 0, 255).astype(np.uint8)
        error = np.nan_to_num(np.abs(served_absmax(codes, step, offset).astype(np.float64) - grid), nan=0.0)
        better = error < best_error
        best_codes = np.where(better, codes, best_codes)
        best_error = np.where(better, error, best_error)
    served = served_absmax(best_codes, step, offset)
    return best_codes.reshape(-1), step, offset, served.reshape(-1)[:n].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Nf4DqWeight(Nf4Weight):
    """:class:`Nf4Weight` whose ``absmax`` are the served values, with their 8-bit codes, steps and offsets."""

    absmax_codes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    step: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    offset: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))


def quantize_nf4_dq(weight: np.ndarray, block_size: int) -> Nf4DqWeight:
    """The ``nf4-dq`` codes of ``W[K, N]``."""
    exact = nf4_absmax(weight, block_size)
    absmax_codes, step, offset, served = double_quantize_absmax(exact)
    codes = nearest_nf4_codes(weight, served, block_size)
    return Nf4DqWeight(codes, served, block_size, absmax_codes=absmax_codes, step=step, offset=offset)


class Nf4DqFormat(Nf4Format):
    """``nf4-dq`` (see the module docstring)."""

    name = "nf4-dq"

    def quantize(self, weight: np.ndarray, spec: WeightSpec) -> Nf4DqWeight:
        return quantize_nf4_dq(weight, spec.block_for(weight.shape[0]))

    def fits(self, quantized: Any, weight: np.ndarray, spec: WeightSpec) -> bool:
        return isinstance(quantized, Nf4DqWeight) and super().fits(quantized, weight, spec)

    def constants(self, ctx: EmitContext, base: str, quantized: Nf4DqWeight, spec: WeightSpec,
                  weight_shape: tuple[int, int]) -> list[ir.Value | None]:
        groups = quantized.step.size
        return ctx.constants(base, [
            ("nf4", packing.pack_bnb4(quantized.codes)),
            ("absmax_q", quantized.absmax_codes.reshape(groups, -1)),
            ("absmax_step", quantized.step.reshape(groups, 1)),
            ("absmax_offset", quantized.offset.reshape(groups, 1)),
        ])

    def layer(self, ctx: EmitContext, node: ir.Node, base: str, activation: ir.Value,
              constants: list[ir.Value | None], quantized: Nf4DqWeight, spec: WeightSpec,
              weight_shape: tuple[int, int], bias: ir.Value | None) -> Emitted:
        packed, codes, step, offset = constants
        flat, start, end = ctx.constants(f"{base}_absmax", [("flat", np.array([-1], np.int64)),
                                                          ("start", np.array([0], np.int64)),
                                                          ("end", np.array([quantized.absmax.size], np.int64))])
        cast = ir.node("Cast", [codes], attributes={"to": ir.DataType.FLOAT}, name=ctx.fresh(f"{base}_absmax_cast"))
        squared = ir.node("Mul", [cast.outputs[0], cast.outputs[0]], name=ctx.fresh(f"{base}_absmax_square"))
        scaled = ir.node("Mul", [squared.outputs[0], step], name=ctx.fresh(f"{base}_absmax_scale"))
        shifted = ir.node("Add", [scaled.outputs[0], offset], name=ctx.fresh(f"{base}_absmax_offset"))
        flattened = ir.node("Reshape", [shifted.outputs[0], flat], name=ctx.fresh(f"{base}_absmax_flat"))
        served = ir.node("Slice", [flattened.outputs[0], start, end], name=ctx.fresh(f"{base}_absmax"))
        nodes = [cast, squared, scaled, shifted, flattened, served]
        for made in nodes:
            made.outputs[0].name = made.name
        served.outputs[0].dtype = ir.DataType.FLOAT
        served.outputs[0].shape = ir.Shape([quantized.absmax.size])
        emitted = super().layer(ctx, node, base, activation, [packed, served.outputs[0]], quantized, spec,
                                weight_shape, bias)
        return Emitted([*nodes, *emitted.nodes], emitted.kind.replace("_nf4", "_nf4_dq"))


NF4_DQ = Nf4DqFormat()
