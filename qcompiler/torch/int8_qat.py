"""QAT layers of the static int8 recipes (``int8``, ``int8-qop``, TOML recipes built on them).

Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` becomes :class:`QATConvInt8` / :class:`QATLinearInt8`: its input goes
through an :class:`~qcompiler.torch.int8_fake_quant.ActivationFakeQuant` (the recipe's ``activation_dtype``, per
tensor) and its weight through an :class:`~qcompiler.torch.int8_fake_quant.Int8WeightFakeQuant` (per output
channel unless ``per_channel = false``; ``qmax`` 63 or 127 as the recipe's ``reduce_range`` resolves on this
machine, 127 for depthwise convolutions, like ``lower-int8-qdq``). The compiler quantizes exactly these tensors
with exactly the trained scales (``import-qat``), a convolution's output with the scale of the next trained input
it reaches through Relu/MaxPool/reshapes. The bias is trained on its int32 grid ``s_x s_w``; a channel whose bias
would overflow int32 there gets the wider weight scale the lowering gives it (:class:`_BiasSafeWeightFakeQuant`).

BatchNorm: the compiler folds a BatchNorm into the convolution before it, which would change the trained weights;
:func:`fold_batchnorm` folds them first (running statistics, as in eval): every Conv -> BatchNorm pair that
``torch.fx`` tracing of the model finds (a Conv module whose output only a BatchNorm module reads, e.g. attributes
``self._conv_stem`` / ``self._bn0`` used one after the other in ``forward``), and every Conv/Linear -> BatchNorm
pair of an ``nn.Sequential`` (all that is looked at when the model cannot be traced). ``prepare_qat`` refuses a
model that still has a BatchNorm after that.

Convolution subclasses that override ``forward`` are refused (their forward cannot be reproduced), except the
TF-"same" convolutions of efficientnet-pytorch and its Lite fork (a ``static_padding`` zero-padding or identity
module applied before ``F.conv2d``): the QAT layer quantizes its input, then pads it with zeros (0 is exact on the
activation grid, which always contains it), so the exported ``Pad`` lands after the input's quantization, where
``fuse-pad-conv`` folds it into the Conv.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F  # noqa: N812

from qcompiler.errors import ConfigError
from qcompiler.qspec import MIN_SCALE
from qcompiler.torch import numerics
from qcompiler.torch.fake_quant import straight_through
from qcompiler.torch.int8_fake_quant import ActivationFakeQuant, Int8WeightFakeQuant

__all__ = ["QATConvInt8", "QATLinearInt8", "fold_batchnorm", "int8_layer"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
logger = logging.getLogger(__name__)


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


class _LeafTracer(torch.fx.Tracer):
    """Keeps every convolution and BatchNorm a ``call_module`` node, subclasses from other packages included."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, (*_CONVS, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(m, qualified_name)


def _foldable(norm: nn.Module) -> bool:
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats and \
        norm.running_var is not None


def _fold_traced(module: nn.Module) -> int:
    """Fold the Conv -> BatchNorm pairs of ``module``'s traced graph: the Conv's only reader is the BatchNorm, and
    each module is called once (a shared module would fold into its other uses too)."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the nn.Sequential scan only
        logger.debug("fold_batchnorm: torch.fx cannot trace %s (%s); folding nn.Sequential pairs only",
                     type(module).__name__, exc)
        return 0
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        users = list(node.users)
        if node.op != "call_module" or len(users) != 1 or users[0].op != "call_module" or \
                users[0].args[:1] != (node,) or calls[node.target] != 1 or calls[users[0].target] != 1:
            continue
        conv, norm = module.get_submodule(node.target), module.get_submodule(users[0].target)
        if isinstance(conv, _CONVS) and _foldable(norm) and norm.num_features == conv.out_channels:
            _fold(conv, norm)
            parent, _, name = users[0].target.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, name, nn.Identity())
            folded += 1
    return folded


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a Conv in ``module``'s traced forward, or a Conv/Linear in an
    ``nn.Sequential`` (in place; the BatchNorm becomes ``nn.Identity``); return how many were folded."""
    folded = _fold_traced(module)
    for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for before, after in zip(names, names[1:], strict=False):
            layer, norm = sequential._modules[before], sequential._modules[after]
            if isinstance(layer, (*_CONVS, nn.Linear)) and _foldable(norm):
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
        w, w_scale = self.weight_fake_quant.quantized(self.weight)
        if self.bias is None:
            return xq, w, None
        x_scale = self.input_fake_quant.qparams()[0].detach().to(torch.float32)
        return xq, w, int32_bias(self.bias, x_scale, w_scale)


_INT32_LIMIT = 2**31 - 1


def int32_bias(bias: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The bias on the int32 grid ``s_x s_w`` (float32 product, float64 division, half to even, int32 clip), as
    ``lower-int8-qdq`` writes it, with a straight-through gradient."""
    with torch.no_grad():
        scale = (x_scale.to(torch.float32) * w_scale.to(torch.float32)).to(torch.float32)
        codes = (bias.detach().to(torch.float64) / scale.to(torch.float64)).round().clamp(-_INT32_LIMIT, _INT32_LIMIT)
        quantized = (codes.to(torch.float32) * scale).to(bias.dtype)
    return straight_through(bias, quantized)


_PLAIN_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward)


def _zero_padding(layer: nn.Module) -> bool:
    """Whether ``layer`` is a TF-"same" convolution padding its input with ``layer.static_padding`` (zeros or
    nothing) before ``F.conv2d`` (efficientnet-pytorch's ``Conv2dStaticSamePadding``)."""
    pad = getattr(layer, "static_padding", None)
    if isinstance(pad, nn.modules.padding._ConstantPadNd):
        return pad.value == 0
    return isinstance(pad, nn.Module) and type(pad).__name__ == "Identity" and not list(pad.parameters()) and \
        not list(pad.buffers()) and not pad._modules


class _BiasSafeWeightFakeQuant(Int8WeightFakeQuant):
    """The per-channel weight fake quantization of a layer with a bias: where the int32 bias ``b / (s_x s_w)`` would
    overflow, the channel's scale becomes ``nextafter(float32(|b| / (s_x (2^31 - 1))))``, as ``lower-int8-qdq``
    widens it (a channel BatchNorm folding made nearly zero: a dead channel with a real bias), so training, export
    and the compiled model agree and the bias stays exact instead of clipped."""

    def _widened(self, scale: torch.Tensor) -> torch.Tensor | None:
        layer = self.__dict__.get("_qat_layer")  # the owning layer, not registered (no module cycle)
        if layer is None or layer.bias is None or self.axis is None or not bool(layer.input_fake_quant.observed):
            return None
        x_scale = float(layer.input_fake_quant.qparams()[0].detach())
        needed = layer.bias.detach().to(torch.float64).abs() / (x_scale * _INT32_LIMIT)
        wider = torch.isfinite(needed) & (needed > scale.to(torch.float64))
        if not bool(wider.any()):
            return None
        return torch.where(wider, torch.nextafter(needed.to(torch.float32), torch.tensor(float("inf"))), scale)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scale = super().quantize(w)
        widened = self._widened(scale)
        if widened is None:
            return codes, scale
        return numerics.int8_codes(w.detach(), widened, self.axis, self.qmax), widened

    def quantized(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, scale = super().quantized(w)  # quantize() already widens
        if self.scale is None:
            return out, scale
        codes = numerics.int8_codes(w.detach(), scale, self.axis, self.qmax)  # LSQ: widened channels below
        learned = self.scale.detach().abs().clamp_min(MIN_SCALE).to(torch.float32)
        mask = (scale != learned).reshape(self._shape(w))
        return torch.where(mask, straight_through(w, self.dequantize(codes, scale).to(w.dtype)), out), scale


def int8_layer(layer: nn.Module, *, qmax: int, per_channel: bool, dtype: str, symmetric: bool,
               learn: bool, low_bits: bool = False) -> nn.Module:
    """The QAT replacement of a Conv or Linear (sharing its parameters)."""
    pad_first = type(layer).forward not in _PLAIN_FORWARDS
    if pad_first and not (isinstance(layer, _CONVS) and _zero_padding(layer)):
        raise ConfigError(f"prepare_qat: {type(layer).__name__} overrides the forward of "
                          f"{'nn.Linear' if isinstance(layer, nn.Linear) else 'its convolution'}, which QAT cannot "
                          "reproduce: use the plain torch.nn layer (or exclude it)")
    cls: Any = QATLinearInt8 if isinstance(layer, nn.Linear) else QATConvInt8
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._modules = dict(layer._modules)
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    depthwise = isinstance(layer, _CONVS) and layer.groups > 1 and layer.groups == layer.out_channels and \
        layer.weight.shape[1] == 1
    new.input_fake_quant = ActivationFakeQuant(dtype, symmetric, learn=learn)
    new.weight_fake_quant = _BiasSafeWeightFakeQuant(0 if per_channel else None,
                                                     127 if depthwise and not low_bits else qmax, learn_scale=learn,
                                                     weight=layer.weight)
    object.__setattr__(new.weight_fake_quant, "_qat_layer", new)
    new._pad_first = pad_first
    return new


class QATConvInt8(_Int8Layer, nn.Conv2d):
    """A Conv1d/2d/3d with int8 fake quantization of its input and weight (``conv_forward`` of its own kind)."""

    _pad_first = False  # TF-"same" padding module applied to the quantized input (see the module docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, bias = self._inputs(x)
        if self._pad_first:
            x = self.static_padding(x)
        convolve = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
        if self.padding_mode != "zeros":
            raise NotImplementedError("QAT convolutions with padding_mode other than 'zeros'")
        return convolve(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class QATLinearInt8(_Int8Layer, nn.Linear):
    """An ``nn.Linear`` with int8 fake quantization of its input and weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, bias = self._inputs(x)
        return F.linear(x, w, bias)
