"""Fake quantization of one weight under a :class:`~qcompiler.formats.WeightSpec`: the forward pass computes the
dequantized weight the compiler will write (bit for bit, :mod:`.numerics`), the backward pass a straight-through
estimate.

Two ways to get the quantization parameters (scales, zero points, NF4 absmax):

- **derived** (default): recomputed from the current weight at every step with the format's own formulas, so the
  compiler, given the trained weight, would choose the same grid. The gradient is the straight-through estimator
  (identity: every weight lies inside its own grid's range).
- **learned** (``learn_scale=True``, LSQ, Esser et al. 2020): the parameters are ``nn.Parameter``s initialized from
  the derived ones and trained with LSQ's gradients (scaled by ``1 / sqrt(values_per_scale * q_max)``); weights
  outside the clipping range get no gradient. Learned zero points (asymmetric grids) are rounded to integer codes
  with a straight-through estimate when the format stores integer zero points.

:meth:`WeightFakeQuant.quantize` gives the exact codes and parameters (no gradient), which export carries into the
ONNX file and the parity report compares with the compiled model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from qcompiler.formats.base import WeightSpec
from qcompiler.qspec import MIN_SCALE
from qcompiler.torch import kernels, numerics

__all__ = ["QuantizedTensor", "WeightFakeQuant", "family_of", "straight_through"]


@dataclasses.dataclass
class QuantizedTensor:
    """Exact quantization of ``wt[N, K]``: ``codes`` (uint8 ``[N, K]``; FP8: the E4M3FN bit patterns), ``scale``
    (grid formats ``[N, n_blocks]``, NF4 absmax ``[n_blocks]``, FP8 ``[N]``), ``zero`` (grid formats' zero points
    ``[N, n_blocks]`` uint8 or float32; an empty uint8 tensor otherwise) and the dequantized ``weight`` (float32)."""

    spec: WeightSpec
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    weight: torch.Tensor


def family_of(spec: WeightSpec) -> str:
    """``"grid"`` (int2-int8, ternary), ``"nf4"`` or ``"fp8"``; ValueError for a format without a fake-quant."""
    if spec.format == "nf4":
        return "nf4"
    if spec.format == "fp8":
        return "fp8"
    if spec.format == "ternary" or (spec.format.startswith("int") and spec.format[3:].isdigit()):
        return "grid"
    raise ValueError(f"format {spec.format!r} has no fake quantization in qcompiler.torch (grid formats int2-int8 "
                     "and ternary, nf4 and fp8 have)")


def _derived(wt: torch.Tensor, spec: WeightSpec, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    if family == "grid":
        return numerics.grid(wt, spec)
    empty = torch.zeros(0, dtype=torch.uint8, device=wt.device)
    if family == "nf4":
        return numerics.nf4_absmax(wt, spec.block_for(wt.shape[1])), empty
    return numerics.fp8_scales(wt), empty


def _codes_and_weight(wt: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec,
                      family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized float32 weight) of ``wt`` on the given parameters."""
    if family == "grid":
        codes = numerics.codes_on_grid(wt, scale, zero, spec)
        return codes, numerics.dequantize_grid(codes, scale, zero, spec.block_for(wt.shape[1]))
    if family == "nf4":
        block = spec.block_for(wt.shape[1])
        codes = numerics.nf4_codes(wt, scale, block)
        return codes, numerics.nf4_dequantize(codes, scale, block)
    values = numerics.fp8_codes(wt, scale)
    return values.to(torch.float8_e4m3fn).view(torch.uint8), values * scale[:, None]


def _derived_weight(wt: torch.Tensor, spec: WeightSpec, family: str) -> torch.Tensor:
    """The dequantized weight of ``wt`` on its own derived grid (the derived mode's whole forward arithmetic)."""
    scale, zero = _derived(wt, spec, family)
    return _codes_and_weight(wt, scale, zero, spec, family)[1]


class _FakeQuant(torch.autograd.Function):
    """Forward: the exact dequantized weight. Backward: STE to the weight; LSQ gradients to learned parameters."""

    @staticmethod
    def forward(ctx: Any, wt: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec,
                family: str) -> torch.Tensor:
        codes, weight = kernels.kernel(_codes_and_weight, spec, family, device=wt.device)(
            wt.detach(), scale.detach(), zero.detach())
        ctx.spec, ctx.family = spec, family
        ctx.save_for_backward(wt, scale, zero, codes)
        return weight.to(wt.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        wt, scale, zero, codes = ctx.saved_tensors
        spec, family = ctx.spec, ctx.family
        learned_scale, learned_zero = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (learned_scale or learned_zero):
            return grad, None, None, None, None
        gradients = kernels.kernel(_lsq_gradients, spec, family, learned_zero, device=wt.device)
        return (*gradients(grad, wt, scale, zero, codes), None, None)


def _in_blocks(values: torch.Tensor, block: int, family: str) -> torch.Tensor:
    """``values[N, K]`` (float32) laid out so that each quantization parameter broadcasts over the last axis: grid
    ``[N, n_blocks, block]``, NF4 ``[n_blocks, block]`` (the flat weight, zero-padded), FP8 ``[N, K]``."""
    if family == "fp8":
        return values.to(torch.float32)
    if family == "nf4":
        return numerics._blocks(values.reshape(1, -1), block, 0.0, torch.float32)[0]
    return numerics._blocks(values, block, 0.0, torch.float32)


def _out_of_blocks(values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_in_blocks` (the padding dropped)."""
    n, k = shape
    if values.dim() == 2 and values.shape == (n, k):
        return values
    return values.reshape(-1)[:n * k].reshape(n, k) if values.dim() == 2 else values.reshape(n, -1)[:, :k]


def _lsq_gradients(grad: torch.Tensor, wt: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   codes: torch.Tensor, spec: WeightSpec, family: str,
                   learned_zero: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LSQ: ``d w_hat / d s = (q - z) - w / s`` inside the clipping range, ``q - z`` (the clipped code) outside;
    ``d w_hat / d z = -s`` outside, 0 inside; the weight gets the gradient only inside. Computed in the block layout
    of :func:`_in_blocks`, where the padding has a zero gradient and so adds nothing to the sums."""
    shape = (wt.shape[0], wt.shape[1])
    block = spec.block_for(wt.shape[1])
    s = scale.detach().to(torch.float32)[..., None]
    w = _in_blocks(wt.detach(), block, family)
    g = _in_blocks(grad, block, family)
    exact = w.to(torch.float64) / s.to(torch.float64)  # the clipping test divides in float64, as the forward does
    ratio = exact.to(torch.float32)
    if family == "grid":
        low, high = numerics.code_limits(spec)
        z = zero.detach().to(torch.float32)[..., None]
        position = exact + z.to(torch.float64)
        inside = (position >= low - 0.5) & (position <= high + 0.5)
        step = _in_blocks(codes, block, family) - z
        top = high - low
    elif family == "nf4":
        inside = exact.abs() <= 1.0
        step = _in_blocks(numerics.nf4_codebook(wt.device)[codes.long()], block, family)
        top = 1.0
    else:
        inside = exact.abs() <= numerics.FP8_MAX
        step = codes.view(torch.float8_e4m3fn).to(torch.float32)
        top = numerics.FP8_MAX
    norm = math.sqrt(wt.numel() / max(scale.numel(), 1) * top)
    grad_scale = (torch.where(inside, step - ratio, step) * g).sum(dim=-1) / norm
    grad_zero = None
    if learned_zero and family == "grid":
        grad_zero = (torch.where(inside, torch.zeros_like(g), -s * g)).sum(dim=-1) / norm
    grad_w = _out_of_blocks(torch.where(inside, g, torch.zeros_like(g)), shape).to(grad.dtype)
    return grad_w, grad_scale.to(scale.dtype), None if grad_zero is None else grad_zero.to(zero.dtype)


class WeightFakeQuant(nn.Module):
    """Fake quantization of a ``[N, K]`` weight under ``spec`` (see the module docstring).

    Args:
        spec: the layer's weight spec (what the compiler's annotation would give it).
        weight: the float weight, to size (and, with ``learn_scale``, initialize) the parameters.
        learn_scale: learn scales (and zero points of asymmetric grids) with LSQ instead of deriving them.
    """

    def __init__(self, spec: WeightSpec, weight: torch.Tensor, *, learn_scale: bool = False) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight-only fake quantization takes a 2-D weight, not shape {tuple(weight.shape)}")
        self.spec, self.family, self.learn_scale = spec, family_of(spec), bool(learn_scale)
        self.recipe = ""  # the recipe that chose the spec (prepare_qat sets it; export records it)
        self.scale: nn.Parameter | None = None
        self.zero: nn.Parameter | None = None
        if self.learn_scale:
            with torch.no_grad():
                scale, zero = _derived(weight.detach().float(), spec, self.family)
            self.scale = nn.Parameter(scale.clone())
            if self.family == "grid" and not spec.symmetric:
                self.zero = nn.Parameter(zero.to(torch.float32).clone())

    def extra_repr(self) -> str:
        return f"{self.spec.label()}, {'learned (LSQ)' if self.learn_scale else 'derived'} scales"

    def parameters_for(self, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) used for ``wt``: the learned ones (scales at least MIN_SCALE; integer zero points rounded
        and clamped with a straight-through estimate) or the derived ones (no gradient)."""
        if not self.learn_scale:
            with torch.no_grad():
                return _derived(wt.detach().float(), self.spec, self.family)
        assert self.scale is not None
        scale = straight_through(self.scale, self.scale.detach().abs().clamp_min(MIN_SCALE))
        if self.zero is None:
            if self.family != "grid":
                return scale, torch.zeros(0, dtype=torch.uint8, device=wt.device)
            middle = 2 if numerics.is_ternary(self.spec) else 1 << (self.spec.bits - 1)
            return scale, torch.full(self.scale.shape, middle, dtype=torch.uint8, device=wt.device)
        if self.spec.float_zero_point:
            return scale, self.zero
        high = numerics.code_limits(self.spec)[1]
        return scale, straight_through(self.zero, self.zero.detach().round().clamp(0, high))

    def forward(self, wt: torch.Tensor) -> torch.Tensor:
        if not self.learn_scale:  # derived grid: the whole arithmetic in one (compiled on the GPU) function, STE
            with torch.no_grad():
                weight = kernels.kernel(_derived_weight, self.spec, self.family, device=wt.device)(
                    wt.detach().float())
            return straight_through(wt, weight)
        scale, zero = self.parameters_for(wt)
        return _FakeQuant.apply(wt.float(), scale, zero, self.spec, self.family).to(wt.dtype)

    @torch.no_grad()
    def quantize(self, wt: torch.Tensor) -> QuantizedTensor:
        """The exact codes, parameters and dequantized weight for ``wt`` (what export writes)."""
        scale, zero = self.parameters_for(wt)
        scale, zero = scale.detach(), zero.detach()
        if self.family == "grid" and not self.spec.float_zero_point:
            zero = zero.to(torch.uint8)
        codes, weight = _codes_and_weight(wt.detach().float(), scale, zero, self.spec, self.family)
        return QuantizedTensor(self.spec, codes, scale.to(torch.float32), zero, weight)


class _StraightThrough(torch.autograd.Function):
    """``value`` in the forward pass, the gradient of ``source`` unchanged in the backward pass."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.to(source.dtype) if value.is_floating_point() else value.to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (computed from ``source`` without gradient) with ``source``'s gradient passed straight through."""
    return _StraightThrough.apply(source, value)
