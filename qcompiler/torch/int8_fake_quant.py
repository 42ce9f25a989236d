"""Fake quantization for the static int8 recipes: per-channel symmetric int8 weights and per-tensor activations.

- :class:`Int8WeightFakeQuant`: ``s[c] = max(max|w[c]| / qmax, MIN_SCALE)`` along the output-channel axis (or one
  scale), ``q = clip(rint(w / s), -qmax, qmax)``, dequantized ``q * s`` in float32: the int8 lowering's numerics
  (:mod:`qcompiler.formats.channelwise`), ``qmax`` 127 or 63 as the recipe resolves ``reduce_range`` (127 for a
  depthwise convolution, as the lowering does), or ``2^(b-1) - 1`` for ``b``-bit weights (``weight_bits`` 2-6: the
  codes of a low-bit grid, held in int8 by the QDQ model; only training can give a layer such a range, the
  compiler keeps it). Straight-through gradient.
- :class:`ActivationFakeQuant`: the range of the tensor is observed while training (the first batch's min/max,
  then an exponential moving average, ``momentum``), or learned (LSQ: scale and zero point as parameters,
  initialized from the observed range at the first batch); the scale and zero point are the compiler's
  (:func:`~qcompiler.torch.numerics.activation_qparams`) and the codes ONNX Runtime's ``QuantizeLinear`` (float32
  division, half to even). Gradient: straight through inside the representable range, zero outside (and LSQ's
  gradients to learned parameters). In eval mode the range is frozen. The trained scale and zero point are what
  export writes and the compiled model uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qcompiler.errors import ConfigError
from qcompiler.qspec import MIN_SCALE
from qcompiler.torch import numerics
from qcompiler.torch.fake_quant import straight_through

__all__ = ["ActivationFakeQuant", "Int8WeightFakeQuant", "activation_limits"]

#: the weight ranges: 127 and 63 (8 and 7 bits, see reduce_range) and 2^(b-1) - 1 for b = 2..6 bits held in int8
WEIGHT_QMAX = (1, 3, 7, 15, 31, 63, 127)
_LIMITS = {("uint8", False): (0, 255), ("int8", False): (-128, 127), ("int8", True): (-127, 127)}


def activation_limits(dtype: str, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of the activation codes (the compiler's :func:`~qcompiler.qspec.qrange`)."""
    try:
        return _LIMITS[(dtype, symmetric)]
    except KeyError:
        raise ConfigError(f"QAT activations: {'symmetric ' if symmetric else ''}{dtype} is not trainable here "
                          "(uint8, int8, symmetric int8)") from None


class _WeightLSQ(torch.autograd.Function):
    """``q * s`` with LSQ's gradients: the weight straight through inside ``[-qmax, qmax]``, the scale
    ``(q - w / s)`` inside and ``q`` outside, summed per channel and scaled by ``1 / sqrt(values * qmax)``."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor, shape: list[int],
                qmax: int) -> torch.Tensor:
        effective = scale.detach().abs().clamp_min(MIN_SCALE).to(torch.float32)  # what quantize() uses
        s = effective.reshape(shape)
        ctx.save_for_backward(w, s, codes, torch.sign(scale.detach()))
        ctx.qmax, ctx.scale_shape = qmax, scale.shape
        return (codes.to(torch.float32) * s).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        w, s, codes, sign = ctx.saved_tensors
        ratio = w.detach().to(torch.float32) / s
        inside = ratio.abs() <= ctx.qmax + 0.5
        q = codes.to(torch.float32)
        d_scale = torch.where(inside, q - ratio, q) * grad.to(torch.float32)
        dims = [d for d in range(w.dim()) if s.shape[d] == 1]
        per = w.numel() / max(s.numel(), 1)
        grad_s = d_scale.sum(dim=dims).reshape(ctx.scale_shape) / math.sqrt(per * ctx.qmax) * sign
        return torch.where(inside, grad, torch.zeros_like(grad)), grad_s, None, None, None


class Int8WeightFakeQuant(nn.Module):
    """Per-channel (``axis``) or per-tensor (``axis=None``) symmetric int8 fake quantization of a weight; with
    ``learn_scale`` the scales are LSQ parameters (initialized ``2 mean|w| / sqrt(qmax)``, LSQ's start) instead of
    ``max|w| / qmax``; either way export carries the scales used."""

    def __init__(self, axis: int | None, qmax: int, *, learn_scale: bool = False,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if qmax not in WEIGHT_QMAX:
            raise ConfigError(f"int8-held weights have qmax {', '.join(map(str, WEIGHT_QMAX))}, not {qmax}")
        self.axis, self.qmax = axis, qmax
        self.learn_scale = bool(learn_scale)
        self.scale: nn.Parameter | None = None
        if self.learn_scale:
            if weight is None:
                raise ValueError("learned weight scales need the weight to start from")
            w = weight.detach().to(torch.float32).abs()
            dims = [d for d in range(w.dim()) if d != axis] if axis is not None else list(range(w.dim()))
            start = 2 * w.mean(dim=dims) / math.sqrt(qmax)
            self.scale = nn.Parameter(torch.where(start > 0, start, torch.ones_like(start)))
        self.recipe = ""  # the recipe that chose the layer (prepare_qat sets it; export records it)

    def extra_repr(self) -> str:
        return f"int8 symmetric, axis={self.axis}, qmax={self.qmax}"

    def _shape(self, w: torch.Tensor) -> list[int]:
        shape = [1] * w.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        return shape

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes, float32 scales: ``[C]`` along ``axis`` or a 0-d tensor)."""
        if self.scale is not None:
            scale = self.scale.detach().abs().clamp_min(MIN_SCALE).to(torch.float32)
            s = scale.reshape(self._shape(w)).to(torch.float64)
            codes = (w.detach().to(torch.float64) / s).round().clamp(-self.qmax, self.qmax).to(torch.int8)
            return codes, scale
        if self.axis is None:
            flat = w.detach().reshape(1, -1)
            scale = numerics.int8_scales(flat, 0, self.qmax).reshape(())
            return numerics.int8_codes(flat, scale.reshape(1), 0, self.qmax).reshape(w.shape), scale
        scale = numerics.int8_scales(w.detach(), self.axis, self.qmax)
        return numerics.int8_codes(w.detach(), scale, self.axis, self.qmax), scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return codes.to(torch.float32) * scale
        shape = [1] * codes.dim()
        shape[self.axis] = -1
        return codes.to(torch.float32) * scale.reshape(shape)

    def quantized(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the fake-quantized weight with its gradient path, the float32 scales it used): one quantization, for a
        caller that needs the scales too (the int32 bias grid)."""
        codes, scale = self.quantize(w)
        if self.scale is not None:
            return _WeightLSQ.apply(w, self.scale, codes, self._shape(w), self.qmax), scale
        return straight_through(w, self.dequantize(codes, scale).to(w.dtype)), scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantized(w)[0]


class _ActivationFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int,
                qmax: int) -> torch.Tensor:
        s, z = scale.detach().to(torch.float32), zero.detach().to(torch.float32)
        q = numerics.quantize_activation(x.detach(), s, z, qmin, qmax)
        ctx.qmin, ctx.qmax = qmin, qmax
        ctx.save_for_backward(x, s, z, q)
        return ((q - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, s, z, q = ctx.saved_tensors
        ratio = x.to(torch.float32) / s
        position = ratio + z
        inside = (position >= ctx.qmin - 0.5) & (position <= ctx.qmax + 0.5)
        grad_x = torch.where(inside, grad, torch.zeros_like(grad))
        grad_s = grad_z = None
        g = grad.to(torch.float32)
        norm = 1.0 / math.sqrt(max(x.numel(), 1) * (ctx.qmax - ctx.qmin))
        if ctx.needs_input_grad[1]:
            grad_s = (torch.where(inside, (q - z) - ratio, q - z) * g).sum().reshape(s.shape) * norm
        if ctx.needs_input_grad[2]:
            grad_z = (torch.where(inside, torch.zeros_like(g), -s * g)).sum().reshape(z.shape) * norm
        return grad_x, grad_s, grad_z, None, None


class ActivationFakeQuant(nn.Module):
    """Observed (or learned) per-tensor quantization of an activation (see the module docstring).

    Args:
        dtype: ``"uint8"`` (asymmetric) or ``"int8"``.
        symmetric: a zero point of 0 (``int8`` only).
        momentum: the weight of each new batch's min/max in the moving average.
        learn: learn the scale and zero point (LSQ) after the first batch initializes them.
    """

    def __init__(self, dtype: str = "uint8", symmetric: bool = False, *, momentum: float = 0.01,
                 learn: bool = False) -> None:
        super().__init__()
        self.dtype, self.symmetric, self.momentum, self.learn = dtype, bool(symmetric), float(momentum), bool(learn)
        self.qmin, self.qmax = activation_limits(dtype, self.symmetric)
        self.register_buffer("running_min", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running_max", torch.zeros((), dtype=torch.float64))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.scale = nn.Parameter(torch.ones(())) if self.learn else None
        self.zero = nn.Parameter(torch.zeros(())) if self.learn and not self.symmetric else None

    def extra_repr(self) -> str:
        return f"{'symmetric ' if self.symmetric else ''}{self.dtype}, {'learned' if self.learn else 'observed'}"

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        low, high = x.detach().min().to(torch.float64), x.detach().max().to(torch.float64)
        if not bool(self.observed):
            self.running_min.copy_(low)
            self.running_max.copy_(high)
            self.observed.fill_(True)
            if self.learn:
                scale, zero = numerics.activation_qparams(low, high, self.qmin, self.qmax, self.symmetric)
                self.scale.copy_(scale)
                if self.zero is not None:
                    self.zero.copy_(zero)
            return
        self.running_min.mul_(1 - self.momentum).add_(low * self.momentum)
        self.running_max.mul_(1 - self.momentum).add_(high * self.momentum)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale (float32) and zero point (float32 holding an integer) in use."""
        if not bool(self.observed):
            raise RuntimeError("ActivationFakeQuant has observed no batch yet: train (or run in train mode) first")
        if not self.learn:
            return numerics.activation_qparams(self.running_min, self.running_max, self.qmin, self.qmax,
                                               self.symmetric)
        scale = straight_through(self.scale, self.scale.detach().abs().clamp_min(MIN_SCALE))
        if self.zero is None:
            return scale, torch.zeros((), device=scale.device)
        return scale, straight_through(self.zero, self.zero.detach().round().clamp(self.qmin, self.qmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._observe(x)
        scale, zero = self.qparams()
        return _ActivationFakeQuant.apply(x, scale, zero, self.qmin, self.qmax)
