"""QAT layers of the static int8 recipes (``int8``, ``int8-qop``, TOML recipes built on them).

Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` becomes :class:`QATConvInt8` / :class:`QATLinearInt8`: its input goes
through an :class:`~qcompiler.torch.int8_fake_quant.ActivationFakeQuant` (the recipe's ``activation_dtype``, per
tensor) and its weight through an :class:`~qcompiler.torch.int8_fake_quant.Int8WeightFakeQuant` (per output
channel unless ``per_channel = false``; ``qmax`` 63 or 127 as the recipe's ``reduce_range`` resolves on this
machine, 127 for depthwise convolutions, like ``lower-int8-qdq``). The compiler quantizes exactly these tensors
with exactly the trained scales (``import-qat``), a convolution's output with the scale of the next trained input
it reaches through Relu/MaxPool/reshapes.

BatchNorm: the compiler folds a BatchNorm into the convolution before it, which would change the trained weights;
:func:`fold_batchnorm` folds every Conv -> BatchNorm pair of an ``nn.Sequential`` (running statistics, as in eval)
first, and ``prepare_qat`` refuses a model that still has a BatchNorm after that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from qcompiler.torch.int8_fake_quant import ActivationFakeQuant, Int8WeightFakeQuant

__all__ = ["QATConvInt8", "QATLinearInt8", "fold_batchnorm", "int8_layer"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` (its running statistics) into ``conv`` in place: ``w' = w g / sqrt(v + e)``,
    ``b' = (b - m) g / sqrt(v + e) + beta``."""
    assert bn.running_var is not None and bn.running_mean is not None
    factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shape = [-1] + [1] * (conv.weight.dim() - 1)
    conv.weight.mul_(factor.reshape(shape))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = (bias - bn.running_mean) * factor + (bn.bias if bn.affine else 0.0)
    conv.bias = nn.Parameter(folded.to(conv.weight.dtype))


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a Conv/Linear in an ``nn.Sequential`` of ``module`` (in place; the
    BatchNorm becomes ``nn.Identity``); return how many were folded."""
    folded = 0
    for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for before, after in zip(names, names[1:], strict=False):
            layer, norm = sequential._modules[before], sequential._modules[after]
            if isinstance(layer, (*_CONVS, nn.Linear)) and isinstance(norm, nn.modules.batchnorm._BatchNorm) and \
                    norm.track_running_stats and norm.running_var is not None:
                _fold(layer, norm)
                sequential._modules[after] = nn.Identity()
                folded += 1
    return folded


class _Int8Layer:
    """What the int8 QAT layers share: input and weight fake quantization, and the export hook."""

    input_fake_quant: ActivationFakeQuant
    weight_fake_quant: Int8WeightFakeQuant
    weight: nn.Parameter

    bias: nn.Parameter | None

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(quantized input, quantized weight, bias on its int32 grid): the export form when frozen."""
        frozen = getattr(self, "_qat_export", None)
        if frozen is not None:
            return (*frozen(x), self.bias)  # the compiler puts the float bias on the same int32 grid
        xq = self.input_fake_quant(x)
        codes, w_scale = self.weight_fake_quant.quantize(self.weight)
        w = self.weight_fake_quant(self.weight)
        if self.bias is None:
            return xq, w, None
        x_scale = self.input_fake_quant.qparams()[0].detach().to(torch.float32)
        return xq, w, int32_bias(self.bias, x_scale, w_scale)


_INT32_LIMIT = 2**31 - 1


class _BiasSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def int32_bias(bias: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The bias on the int32 grid ``s_x s_w`` (float32 product, float64 division, half to even, int32 clip), as
    ``lower-int8-qdq`` writes it, with a straight-through gradient."""
    with torch.no_grad():
        scale = (x_scale.to(torch.float32) * w_scale.to(torch.float32)).to(torch.float32)
        codes = (bias.detach().to(torch.float64) / scale.to(torch.float64)).round().clamp(-_INT32_LIMIT, _INT32_LIMIT)
        quantized = (codes.to(torch.float32) * scale).to(bias.dtype)
    return _BiasSTE.apply(bias, quantized)


def int8_layer(layer: nn.Module, *, qmax: int, per_channel: bool, dtype: str, symmetric: bool,
               learn: bool, low_bits: bool = False) -> nn.Module:
    """The QAT replacement of a Conv or Linear (sharing its parameters)."""
    cls: Any = QATLinearInt8 if isinstance(layer, nn.Linear) else QATConvInt8
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._modules = dict(layer._modules)
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    depthwise = isinstance(layer, _CONVS) and layer.groups > 1 and layer.groups == layer.out_channels and \
        layer.weight.shape[1] == 1
    new.input_fake_quant = ActivationFakeQuant(dtype, symmetric, learn=learn)
    new.weight_fake_quant = Int8WeightFakeQuant(0 if per_channel else None,
                                                127 if depthwise and not low_bits else qmax, learn_scale=learn,
                                                weight=layer.weight)
    return new


class QATConvInt8(_Int8Layer, nn.Conv2d):
    """A Conv1d/2d/3d with int8 fake quantization of its input and weight (``conv_forward`` of its own kind)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, bias = self._inputs(x)
        convolve = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
        if self.padding_mode != "zeros":
            raise NotImplementedError("QAT convolutions with padding_mode other than 'zeros'")
        return convolve(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QATLinearInt8(_Int8Layer, nn.Linear):
    """An ``nn.Linear`` with int8 fake quantization of its input and weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, bias = self._inputs(x)
        return F.linear(x, w, bias)
