"""``nf4``: QLoRA's 4-bit NormalFloat, one absmax per block of ``W^T`` flattened, as ``com.microsoft.MatMulBnb4``.

Each value is divided by its block's largest magnitude and rounded to the nearest of the 16 NF4 values
(:data:`qcompiler.runtime.packing.NF4_CODEBOOK`, nearest by the midpoints); an all-zero block gets ``absmax = 1``.
Blocks run along ``W^T`` flattened (MatMulBnb4's layout: ``[N, K]`` row-major), so a block may span two output
columns when ``K`` is not a multiple of the block size. Symmetric only; a fixed codebook, not a grid (GPTQ and
HQQ choose codes on grids, so they do not apply; AWQ's channel scaling does). ONNX form: ::

    Y = com.microsoft.MatMulBnb4(A, B_packed, absmax; K, N, block_size, quant_type = 1)

``MatMulBnb4`` has no bias input: a Gemm's bias becomes an ``Add`` after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.formats.base import EmitContext, Emitted, WeightFormat, WeightSpec, copy_output_type
from qcompiler.runtime import packing

__all__ = ["NF4", "Nf4Format", "Nf4Weight", "nearest_nf4_codes", "nf4_absmax", "quantize_nf4"]

CONTRIB = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class Nf4Weight:
    """NF4 codes ``[N, K]`` and one float32 absmax per block of ``W^T`` flattened."""

    codes: np.ndarray
    absmax: np.ndarray
    block_size: int
    bits: int = 4

    def dequantize(self) -> np.ndarray:
        """The float32 ``W[K, N]`` the codes stand for."""
        n, k = self.codes.shape
        flat = packing.NF4_CODEBOOK[self.codes.reshape(-1)]
        scale = np.repeat(np.asarray(self.absmax, np.float32), self.block_size)[:n * k]
        return np.ascontiguousarray((flat * scale).reshape(n, k).T)

    def error_energies(self, weight: np.ndarray) -> tuple[float, float]:
        w = weight.astype(np.float64)
        diff = w - self.dequantize()
        return float(np.vdot(w, w)), float(np.vdot(diff, diff))


def _blocks_of(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``W^T`` flattened into float64 blocks ``[n_blocks, block_size]`` (the last one zero-padded)."""
    flat = np.ascontiguousarray(weight.T, dtype=np.float64).reshape(-1)
    blocks = -(-flat.size // block_size)
    padded = np.zeros(blocks * block_size)
    padded[:flat.size] = flat
    return padded.reshape(blocks, block_size)


def nf4_absmax(weight: np.ndarray, block_size: int) -> np.ndarray:
    """float32 ``absmax`` per block of ``W^T`` flattened (an all-zero block: 1)."""
    absmax = np.abs(_blocks_of(weight, block_size)).max(axis=1)
    return np.where(absmax > 0, absmax, 1.0).astype(np.float32)


def nearest_nf4_codes(weight: np.ndarray, absmax: np.ndarray, block_size: int) -> np.ndarray:
    """NF4 codes ``[N, K]`` of ``W[K, N]`` for the given float32 absmax per block: ``w / absmax`` (float64) to the
    nearest codebook value by the midpoints."""
    k, n = weight.shape
    normed = (_blocks_of(weight, block_size) / np.asarray(absmax, np.float32).astype(np.float64)[:, None])
    book = packing.NF4_CODEBOOK.astype(np.float64)
    edges = (book[1:] + book[:-1]) / 2  # nearest codebook value by its midpoints
    return np.searchsorted(edges, normed.reshape(-1)[:k * n]).astype(np.uint8).reshape(n, k)


def quantize_nf4(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """NF4 codes ``[N, K]`` and ``absmax`` per block of ``W^T`` flattened (MatMulBnb4's layout, see packing).

    Each value is divided by its block's largest magnitude and rounded to the nearest of the 16 NF4 values; an
    all-zero block gets ``absmax = 1`` (its values are the codebook's exact 0)."""
    absmax = nf4_absmax(weight, block_size)
    return nearest_nf4_codes(weight, absmax, block_size), absmax


class Nf4Format(WeightFormat):
    """``nf4`` (see the module docstring)."""

    name = "nf4"
    bits = 4

    def quantize(self, weight: np.ndarray, spec: WeightSpec) -> Nf4Weight:
        block = spec.block_for(weight.shape[0])
        codes, absmax = quantize_nf4(weight, block)
        return Nf4Weight(codes, absmax, block)

    def fits(self, quantized: Any, weight: np.ndarray, spec: WeightSpec) -> bool:
        return isinstance(quantized, Nf4Weight) and quantized.codes.shape == weight.shape[::-1] and \
            quantized.block_size == spec.block_for(weight.shape[0])

    def kernels(self, spec: WeightSpec) -> tuple[str, ...]:
        return (f"{CONTRIB}.MatMulBnb4",)

    def constants(self, ctx: EmitContext, base: str, quantized: Nf4Weight, spec: WeightSpec,
                  weight_shape: tuple[int, int]) -> list[ir.Value | None]:
        return ctx.constants(base, [("nf4", packing.pack_bnb4(quantized.codes)), ("absmax", quantized.absmax)])

    def layer(self, ctx: EmitContext, node: ir.Node, base: str, activation: ir.Value,
              constants: list[ir.Value | None],
              quantized: Nf4Weight, spec: WeightSpec, weight_shape: tuple[int, int],
              bias: ir.Value | None) -> Emitted:
        k, n = weight_shape
        matmul = ir.node("MatMulBnb4", [activation, *constants], domain=CONTRIB, name=node.name,
                         attributes={"K": k, "N": n, "block_size": quantized.block_size, "quant_type": 1})
        copy_output_type(matmul.outputs[0], node.outputs[0])
        if bias is None:
            return Emitted([matmul], f"{node.op_type}_nf4")
        matmul.outputs[0].name = ctx.fresh(f"{node.name or 'gemm'}_nf4")  # no bias input: an Add after it
        add = ir.node("Add", [matmul.outputs[0], bias], name=ctx.fresh(f"{node.name}_bias"))
        copy_output_type(add.outputs[0], node.outputs[0])
        return Emitted([matmul, add], f"{node.op_type}_nf4")


NF4 = Nf4Format()
