"""Frozen quantized weights: a layer's codes and parameters held as the compiler writes them, dequantized on the fly.

QLoRA trains adapters against a base that never changes, so the base is quantized once (by the same numerics as
every QAT layer, :mod:`.numerics`, i.e. the codes ``qcompile`` writes for that float weight) and only its codes
are kept: two 4-bit codes a byte (NF4, int4, int3, int2, ternary), one byte otherwise, with the scales / absmax /
zero points. The float weight is rebuilt for each matrix product and dropped after it: the backward pass rebuilds
it again instead of keeping it (what bitsandbytes' 4-bit layers do), so a 4-bit base costs about half a byte a
weight in training, not four.

- :class:`FrozenWeight`: the codes of one ``[N, K]`` weight; :meth:`FrozenWeight.quantize` gives them back as a
  :class:`~qcompiler.torch.fake_quant.QuantizedTensor` (what export writes into the ``ai.qcompiler.qat`` marker and
  what the parity report compares), :meth:`FrozenWeight.dequantize` the float32 weight.
- :class:`FrozenLinear`, :class:`FrozenEmbedding`: ``nn.Linear`` / ``nn.Embedding`` stand-ins over a frozen weight
  (no trainable parameter; a frozen bias stays a buffer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.formats.base import WeightSpec
from qcompiler.torch import kernels, numerics
from qcompiler.torch.fake_quant import QuantizedTensor, family_of

__all__ = ["FrozenEmbedding", "FrozenLinear", "FrozenWeight", "dequantize", "is_frozen_layer", "weight_source"]


def _family(spec: WeightSpec) -> str:
    """:func:`~qcompiler.torch.fake_quant.family_of`, and ``nf4`` for ``nf4-dq`` (frozen only: its ``scale`` holds
    the served absmax, which dequantize like NF4's)."""
    return "nf4" if spec.format == "nf4-dq" else family_of(spec)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """The float32 ``[N, K]`` weight of ``codes`` (uint8 ``[N, K]``; FP8 bit patterns) under ``spec``."""
    family = _family(spec)
    block = spec.block_for(codes.shape[1])
    if family == "grid":
        return numerics.dequantize_grid(codes, scale, zero, block)
    if family == "nf4":
        return numerics.nf4_dequantize(codes, scale, block)
    return codes.view(torch.float8_e4m3fn).to(torch.float32) * scale[:, None]


def _packs(spec: WeightSpec) -> bool:
    """Whether codes of ``spec`` fit in 4 bits (two a byte)."""
    return _family(spec) != "fp8" and spec.bits <= 4


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, flattened, two a byte (the even index in the low nibble; an odd count padded with 0)."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of :func:`_pack`: uint8 ``[n, k]``."""
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n * k].reshape(n, k)


def _rebuild(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WeightSpec, n: int, k: int,
             packs: bool) -> torch.Tensor:
    return dequantize(_unpack(packed, n, k) if packs else packed, scale, zero, spec)


class FrozenWeight(nn.Module):
    """The codes of one quantized ``[N, K]`` weight, held as buffers (saved in ``state_dict``, never trained).

    Args:
        quantized: the exact quantization (codes, scales, zero points) of the float weight.
        recipe: the recipe that chose the spec (export records it).
    """

    def __init__(self, quantized: QuantizedTensor, recipe: str = "") -> None:
        super().__init__()
        self.spec, self.recipe = quantized.spec, recipe
        self.learn_scale = False
        self.shape = (int(quantized.codes.shape[0]), int(quantized.codes.shape[1]))
        self.packs = _packs(self.spec)
        codes = quantized.codes.to(torch.uint8)
        self.register_buffer("codes", _pack(codes) if self.packs else codes.clone())
        self.register_buffer("scale", quantized.scale.detach().clone())
        self.register_buffer("zero", quantized.zero.detach().clone())

    def extra_repr(self) -> str:
        return f"{self.spec.label()}, {self.shape[0]}x{self.shape[1]}, frozen"

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 ``[N, K]`` codes."""
        return _unpack(self.codes, *self.shape) if self.packs else self.codes

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` weight (compiled on the GPU, :mod:`.kernels`)."""
        rebuild = kernels.kernel(_rebuild, self.spec, *self.shape, self.packs, device=self.codes.device)
        return rebuild(self.codes, self.scale, self.zero)

    def quantize(self, _: Any = None) -> QuantizedTensor:
        """The codes and parameters (the QAT layers' interface: the argument, their float weight, is not needed)."""
        return QuantizedTensor(self.spec, self.unpacked_codes(), self.scale.to(torch.float32), self.zero,
                               self.dequantize())


class _FrozenMatMul(torch.autograd.Function):
    """``x @ W^T`` with ``W`` rebuilt from the codes in the forward pass and again in the backward pass (only the
    codes are kept between them)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, frozen: FrozenWeight) -> torch.Tensor:
        ctx.frozen = frozen
        return F.linear(x, frozen.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.frozen.dequantize().to(grad.dtype), None


class _FrozenLayer(nn.Module):
    """What frozen layers share: the weight read back from the codes (or, while exporting, from the marker)."""

    weight_fake_quant: FrozenWeight

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight the layer computes with (rebuilt from the codes; for readers such as ``.dtype``)."""
        return self.weight_fake_quant.dequantize()

    def exporting(self) -> bool:
        return getattr(self, "_qat_export", None) is not None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (the exported graph's weight when frozen for export)."""
        return self._qat_export() if self.exporting() else self.weight_fake_quant.dequantize()


class FrozenLinear(_FrozenLayer):
    """``nn.Linear`` over a :class:`FrozenWeight` (its bias a frozen buffer)."""

    def __init__(self, frozen: FrozenWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = frozen.shape
        self.weight_fake_quant = frozen
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's output."""
        y = F.linear(x, self.quantized_weight().to(x.dtype)) if self.exporting() else \
            _FrozenMatMul.apply(x, self.weight_fake_quant)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)


class FrozenEmbedding(_FrozenLayer):
    """``nn.Embedding`` over a :class:`FrozenWeight`: grid formats (blocks along each row) rebuild only the rows
    looked up."""

    def __init__(self, frozen: FrozenWeight, embedding: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = frozen.shape
        self.padding_idx = embedding.padding_idx
        self.weight_fake_quant = frozen

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fw = self.weight_fake_quant
        if self.exporting() or _family(fw.spec) != "grid" or fw.packs:
            return F.embedding(ids, self.quantized_weight(), self.padding_idx)
        flat = ids.reshape(-1)
        rows = dequantize(fw.codes[flat], fw.scale[flat], fw.zero[flat], fw.spec)
        return rows.reshape(*ids.shape, self.embedding_dim)


def is_frozen_layer(module: nn.Module) -> bool:
    return isinstance(module, (FrozenLinear, FrozenEmbedding))


def weight_source(layer: nn.Module) -> Any:
    """What a layer's ``weight_fake_quant.quantize`` takes, and what identifies a shared (tied) weight: the float
    weight of a QAT layer, the frozen codes of a frozen one."""
    return layer.weight_fake_quant if is_frozen_layer(layer) else layer.weight
