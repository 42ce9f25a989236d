"""The standard ONNX operators of the GPU executor, written with PyTorch ops.

Each operator is a function ``fn(ctx, inputs, attrs) -> tensor | tuple`` registered with :func:`op` under its
(domain, type). ``inputs`` holds one tensor per ONNX input (None for an absent optional one). Inputs that ONNX uses
as shapes, axes or bounds (Reshape's shape, Slice's starts...) are listed as ``host`` inputs: the executor hands
those over on the CPU (they are usually computed from shapes alone and folded once per input-shape signature), so
reading them never waits for the GPU. ``ctx`` says where new tensors go and how many outputs the node has.

Semantics follow the ONNX operator specs at opset 13-21 (axes as inputs or, for older opsets, attributes), with
numpy-style broadcasting (torch's); integer Div truncates like ONNX Runtime's. Operators that are not here raise
:class:`UnsupportedOpError` when the executor loads the model, naming every missing one. The quantized contrib ops
(MatMulNBits, MatMulBnb4, GatherBlockQuantized) are in :mod:`qcompiler.runtime.cuda.contrib_ops`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from qcompiler.runtime.cuda.graph import torch_dtype

__all__ = ["OPS", "Ctx", "OpSpec", "UnsupportedOpError", "ints", "op"]


class UnsupportedOpError(ValueError):
    """The model uses operators the GPU executor does not implement."""


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Where a node's new tensors go, how many outputs it has, and the executor's per-model cache (weights
    prepared once, e.g. dequantized for the reference path)."""

    device: torch.device
    n_outputs: int
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict)


OpFn = Callable[[Ctx, list[torch.Tensor | None], dict[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An operator: its function, its host (shape-like) inputs, and what its output depends on.

    ``shape_only``: the outputs depend on the inputs' shapes alone (Shape, Size). ``data_shape``: the output's
    shape depends on input values (NonZero-like), so nothing after it can be reused across runs.
    """

    fn: OpFn
    host_inputs: frozenset[int] = frozenset()
    shape_only: bool = False
    data_shape: bool = False


OPS: dict[tuple[str, str], OpSpec] = {}


def op(*names: str, domain: str = "", host: Sequence[int] = (), shape_only: bool = False,
       data_shape: bool = False) -> Callable[[OpFn], OpFn]:
    """Register ``fn`` for each ONNX op type in ``names``."""
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[(domain, name)] = OpSpec(fn, frozenset(host), shape_only, data_shape)
        return fn
    return register


def ints(t: torch.Tensor | None) -> list[int]:
    """A host tensor's values as Python ints (a 0-d tensor gives one)."""
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(ctx_inputs: list[torch.Tensor | None], index: int, attrs: dict[str, Any]) -> list[int] | None:
    """Axes from input ``index`` (opset >= 13/18) or the ``axes`` attribute (older), None when neither is given."""
    if len(ctx_inputs) > index and ctx_inputs[index] is not None:
        return ints(ctx_inputs[index])
    return list(attrs["axes"]) if "axes" in attrs else None


# -- elementwise ----------------------------------------------------------------------------------------------------
def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda ctx, x, attrs: fn(x[0], x[1])


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
                   "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
                   "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor}.items():
    op(_name)(_binary(_fn))

for _name, _fn in {"Neg": torch.neg, "Abs": torch.abs, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal,
                   "Exp": torch.exp, "Log": torch.log, "Sin": torch.sin, "Cos": torch.cos, "Tanh": torch.tanh,
                   "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf, "Floor": torch.floor,
                   "Ceil": torch.ceil, "Round": torch.round, "Not": torch.logical_not, "IsNaN": torch.isnan,
                   "Sign": torch.sign, "Softplus": torch.nn.functional.softplus}.items():
    op(_name)(lambda ctx, x, attrs, _fn=_fn: _fn(x[0]))


@op("Identity", "Dropout")
def _identity(ctx: Ctx, x: list, attrs: dict) -> Any:
    if ctx.n_outputs > 1:  # Dropout's mask: all ones at inference
        return x[0], torch.ones_like(x[0], dtype=torch.bool)
    return x[0]


@op("Div")
def _div(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    if x[0].dtype.is_floating_point:
        return torch.div(x[0], x[1])
    return torch.div(x[0], x[1], rounding_mode="trunc")


@op("Mod")
def _mod(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.fmod(x[0], x[1]) if attrs.get("fmod", 0) else torch.remainder(x[0], x[1])


@op("Pow")
def _pow(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.pow(x[0], x[1]).to(x[0].dtype)


def _fold(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mean: bool = False) -> OpFn:
    def run(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
        out = x[0]
        for other in x[1:]:
            out = fn(out, other)
        return out / len(x) if mean else out
    return run


op("Max")(_fold(torch.maximum))
op("Min")(_fold(torch.minimum))
op("Sum")(_fold(torch.add))
op("Mean")(_fold(torch.add, mean=True))


@op("Clip")
def _clip(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    low = x[1] if len(x) > 1 and x[1] is not None else attrs.get("min")
    high = x[2] if len(x) > 2 and x[2] is not None else attrs.get("max")
    out = x[0]
    for bound, pick in ((low, torch.maximum), (high, torch.minimum)):
        if isinstance(bound, torch.Tensor):
            out = pick(out, bound.to(out.dtype))
        elif bound is not None:  # an attribute (opset < 11): a Python number, no host-to-device copy
            out = torch.clamp(out, min=bound) if pick is torch.maximum else torch.clamp(out, max=bound)
    return out


@op("Where")
def _where(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.where(x[0], x[1], x[2])


@op("LeakyRelu")
def _leaky_relu(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.nn.functional.leaky_relu(x[0], attrs.get("alpha", 0.01))


@op("Elu")
def _elu(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.nn.functional.elu(x[0], attrs.get("alpha", 1.0))


@op("HardSigmoid")
def _hard_sigmoid(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.clamp(x[0] * attrs.get("alpha", 0.2) + attrs.get("beta", 0.5), 0.0, 1.0)


@op("HardSwish")
def _hard_swish(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0] * torch.clamp(x[0] / 6.0 + 0.5, 0.0, 1.0)


@op("Gelu")
def _gelu(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.nn.functional.gelu(x[0], approximate=attrs.get("approximate", "none"))


@op("Cast")
def _cast(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0].to(torch_dtype(int(attrs["to"])))


@op("CastLike")
def _cast_like(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0].to(x[1].dtype)


# -- shapes ---------------------------------------------------------------------------------------------------------
@op("Shape", shape_only=True)
def _shape(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    dims = list(x[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end")
    return torch.tensor(dims[start:end], dtype=torch.int64, device=ctx.device)


@op("Size", shape_only=True)
def _size(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.tensor(x[0].numel(), dtype=torch.int64, device=ctx.device)


@op("Reshape", host=(1,))
def _reshape(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    shape = ints(x[1])
    if not attrs.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x[0].reshape(shape)


@op("Flatten")
def _flatten(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    axis = _axis(attrs.get("axis", 1), x[0].dim())
    return x[0].reshape(math.prod(x[0].shape[:axis]), -1)


@op("Transpose")
def _transpose(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    perm = attrs.get("perm") or list(reversed(range(x[0].dim())))
    return x[0].permute(*perm)


@op("Unsqueeze", host=(1,))
def _unsqueeze(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    axes = _axes(x, 1, attrs) or []
    rank = x[0].dim() + len(axes)
    out = x[0]
    for axis in sorted(_axis(a, rank) for a in axes):
        out = out.unsqueeze(axis)
    return out


@op("Squeeze", host=(1,))
def _squeeze(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    axes = _axes(x, 1, attrs)
    if axes is None:
        return x[0].squeeze()
    axes = [_axis(a, x[0].dim()) for a in axes]
    shape = [d for i, d in enumerate(x[0].shape) if i not in axes]
    return x[0].reshape(shape)


@op("Concat")
def _concat(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.cat([t for t in x if t is not None], dim=attrs["axis"])


@op("Split", host=(1,))
def _split(ctx: Ctx, x: list, attrs: dict) -> tuple[torch.Tensor, ...]:
    axis = attrs.get("axis", 0)
    sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else attrs.get("split")
    if not sizes:
        length, parts = x[0].shape[axis], attrs.get("num_outputs", ctx.n_outputs)
        step = -(-length // parts)
        sizes = [min(step, length - i * step) for i in range(parts)]
    return tuple(torch.split(x[0], list(sizes), dim=axis))


@op("Slice", host=(1, 2, 3, 4))
def _slice(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data = x[0]
    starts, ends = ints(x[1]), ints(x[2])
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, data.dim())
        begin, stop, stride = slice(start, end, step).indices(data.shape[axis])
        if stride > 0:
            index[axis] = slice(begin, stop, stride)
        else:  # torch has no negative strides: take the positions explicitly
            positions = torch.arange(begin, stop, stride, device=data.device)
            flips.append((axis, positions))
    out = data[tuple(index)]
    for axis, positions in flips:
        out = out.index_select(axis, positions)
    return out


@op("Expand", host=(1,))
def _expand(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(ints(x[1])))
    return x[0].expand(shape)


@op("Tile", host=(1,))
def _tile(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0].repeat(*ints(x[1]))


@op("Range", host=(0, 1, 2))
def _range(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    start, limit, delta = (t.item() for t in x[:3])
    return torch.arange(start, limit, delta, dtype=x[0].dtype, device=ctx.device)


@op("ConstantOfShape", host=(0,))
def _constant_of_shape(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = attrs.get("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return torch.full(ints(x[0]), fill[0].item(), dtype=torch.from_numpy(fill.copy()).dtype, device=ctx.device)


@op("Constant")
def _constant(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in attrs:
            array = np.asarray(attrs[key])
            if key in ("value_float", "value_floats"):
                array = array.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                array = array.astype(np.int64)
            return torch.from_numpy(np.ascontiguousarray(array).copy()).to(ctx.device)
    raise ValueError(f"Constant with attributes {sorted(attrs)} is not supported")


@op("Gather")
def _gather(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data, indices = x
    axis = _axis(attrs.get("axis", 0), data.dim())
    idx = torch.where(indices < 0, indices + data.shape[axis], indices).to(torch.int64)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1:])


@op("GatherElements")
def _gather_elements(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data, indices = x
    axis = _axis(attrs.get("axis", 0), data.dim())
    return torch.gather(data, axis, torch.where(indices < 0, indices + data.shape[axis], indices).to(torch.int64))


@op("GatherND")
def _gather_nd(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data, indices = x
    batch = attrs.get("batch_dims", 0)
    depth = indices.shape[-1]
    lead = data.shape[:batch]
    flat_data = data.reshape(math.prod(lead), *data.shape[batch:])
    idx = indices.reshape(math.prod(lead), -1, depth).to(torch.int64)
    coords = [torch.where(c < 0, c + dim, c) for c, dim in zip(idx.unbind(-1), data.shape[batch:batch + depth],
                                                                strict=True)]
    rows = torch.arange(flat_data.shape[0], device=idx.device).view(-1, 1).expand(-1, idx.shape[1])
    picked = flat_data[(rows, *coords)]
    return picked.reshape(*indices.shape[:-1], *data.shape[batch + depth:])


@op("CumSum", host=(1,))
def _cumsum(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data = x[0]
    axis = _axis(ints(x[1])[0], data.dim())
    if attrs.get("reverse", 0):
        data = data.flip(axis)
    out = torch.cumsum(data, dim=axis).to(data.dtype)
    if attrs.get("exclusive", 0):
        out = out - data
    return out.flip(axis) if attrs.get("reverse", 0) else out


@op("Trilu", host=(1,))
def _trilu(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    k = ints(x[1])[0] if len(x) > 1 and x[1] is not None else 0
    return torch.triu(x[0], k) if attrs.get("upper", 1) else torch.tril(x[0], k)


@op("Pad", host=(1, 2, 3))
def _pad(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data = x[0]
    pads = ints(x[1])
    rank = data.dim()
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(rank))
    axes = [_axis(a, rank) for a in axes]
    value = x[2].item() if len(x) > 2 and x[2] is not None else 0.0
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        spec = [0] * (2 * rank)  # torch wants (last axis begin, end, previous axis begin, end, ...)
        for i, axis in enumerate(axes):
            spec[2 * (rank - 1 - axis)] = pads[i]
            spec[2 * (rank - 1 - axis) + 1] = pads[i + len(axes)]
        return torch.nn.functional.pad(data, spec, value=value)
    out = data  # edge / reflect / wrap: gather the source position of every output position, axis by axis
    for i, axis in enumerate(axes):
        size, begin, end = out.shape[axis], pads[i], pads[i + len(axes)]
        positions = torch.arange(-begin, size + end, device=data.device)
        if mode == "edge":
            positions = positions.clamp(0, size - 1)
        elif mode == "reflect":
            period = 2 * (size - 1)
            positions = positions.remainder(period) if period else positions.clamp(0, 0)
            positions = torch.where(positions >= size, period - positions, positions)
        elif mode == "wrap":
            positions = positions.remainder(size)
        else:
            raise ValueError(f"Pad mode {mode!r} is not supported")
        out = out.index_select(axis, positions)
    return out


@op("NonZero", data_shape=True)
def _nonzero(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.nonzero(x[0]).t().contiguous()


# -- reductions and normalisation -----------------------------------------------------------------------------------
def _reduce(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
        axes = _axes(x, 1, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        return fn(x[0], dim=[_axis(a, x[0].dim()) for a in axes], keepdim=keep)
    return run


op("ReduceMean", host=(1,))(_reduce(torch.mean))
op("ReduceSum", host=(1,))(_reduce(torch.sum))
op("ReduceMax", host=(1,))(_reduce(torch.amax))
op("ReduceMin", host=(1,))(_reduce(torch.amin))
op("ReduceProd", host=(1,))(_reduce(lambda t, dim, keepdim: _prod(t, dim, keepdim)))
op("ReduceL2", host=(1,))(_reduce(lambda t, dim, keepdim: torch.linalg.vector_norm(t, 2, dim, keepdim)))
op("ReduceSumSquare", host=(1,))(_reduce(lambda t, dim, keepdim: torch.sum(t * t, dim=dim, keepdim=keepdim)))


def _prod(t: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for axis in sorted(dims, reverse=True):
        t = torch.prod(t, dim=axis, keepdim=keepdim)
    return t


def _argfn(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
        axis = _axis(attrs.get("axis", 0), x[0].dim())
        data = x[0].flip(axis) if attrs.get("select_last_index", 0) else x[0]
        out = fn(data, dim=axis, keepdim=bool(attrs.get("keepdims", 1)))
        return x[0].shape[axis] - 1 - out if attrs.get("select_last_index", 0) else out
    return run


op("ArgMax")(_argfn(torch.argmax))
op("ArgMin")(_argfn(torch.argmin))


@op("Softmax")
def _softmax(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.softmax(x[0], dim=attrs.get("axis", -1))


@op("LogSoftmax")
def _log_softmax(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.log_softmax(x[0], dim=attrs.get("axis", -1))


@op("LayerNormalization")
def _layer_norm(ctx: Ctx, x: list, attrs: dict) -> Any:
    data = x[0]
    axis = _axis(attrs.get("axis", -1), data.dim())
    shape = data.shape[axis:]
    out = torch.nn.functional.layer_norm(data, shape, x[1], x[2] if len(x) > 2 else None, attrs.get("epsilon", 1e-5))
    if ctx.n_outputs == 1:
        return out
    dims = list(range(axis, data.dim()))
    mean = data.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(data.var(dim=dims, keepdim=True, unbiased=False) + attrs.get("epsilon", 1e-5))
    return (out, mean, inv_std)[:ctx.n_outputs]


# -- matrix products ------------------------------------------------------------------------------------------------
@op("MatMul")
def _matmul(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.matmul(x[0], x[1])


@op("Gemm")
def _gemm(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    a = x[0].t() if attrs.get("transA", 0) else x[0]
    b = x[1].t() if attrs.get("transB", 0) else x[1]
    out = torch.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        out = out * alpha
    if len(x) > 2 and x[2] is not None:
        out = out + (x[2] * beta if beta != 1.0 else x[2])
    return out


@op("DequantizeLinear")
def _dequantize_linear(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    data, scale = x[0], x[1]
    zero = x[2] if len(x) > 2 and x[2] is not None else None
    axis = _axis(attrs.get("axis", 1), data.dim())
    if scale.dim() == 1 and scale.numel() > 1:
        shape = [1] * data.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero is not None else None
    values = data.to(torch.float32)
    if zero is not None:
        values = values - zero.to(torch.float32)
    return (values * scale.to(torch.float32)).to(scale.dtype)
