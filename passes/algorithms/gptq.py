"""GPTQ for the int8 lowerings: round each annotated Conv/MatMul/Gemm weight so that the layer's *output* error on
the calibration data is smallest, not each weight's own error (see :mod:`._gptq_core` for the algorithm).

For every node annotated for int8 (weight spec per channel or per tensor, symmetric) the pass measures the second
moment of the layer's input patches on the calibration data, streamed through ONNX Runtime batch by batch:

- MatMul / Gemm (``transA = 0``): ``H = sum x x^T`` over the rows of the activation (``x[..., K]``);
- Conv (2-D): ``H_g = sum p p^T`` over every output position, ``p`` the zero-padded input patch
  ``[C/g * kh * kw]`` of group ``g`` (strides and dilations as the Conv has them), one ``H`` per group, so a
  depthwise convolution gets one small ``H`` per channel.

It then fixes the grid the lowering would use (``s = max|w| / qmax`` per output channel, ``qmax`` of
:func:`~qcompiler.passes.lower.int8_qdq.layer_qmax` under the recipe's ``reduce_range``), runs GPTQ, and writes the
dequantized result ``s * q`` back as the float weight, with the scales pinned in the weight's metadata
(``PINNED_SCALE_KEY``) so the lowering reproduces exactly ``q``. Because the weight now sits on its grid, the
lowering's bias correction would see no rounding; the pass records the mean output shift it caused
(``(W - s q) . E[x]``, with the input means of ``collect-input-means``) as ``BIAS_SHIFT_KEY`` for the lowering to add.

The float function changes (``preserves_float = False``): it is the quantized weights' function moved earlier.
Skipped with a reason: Conv other than 2-D, ``auto_pad``, Gemm with ``transA`` or ``alpha != 1``, a weight shared
by several nodes, asymmetric or block specs. Memory: one ``H`` per layer (``K^2`` float64; 18 MB for ``K = 1536``).

Range: ``H`` is accumulated in float64 (each batch's ``x^T x`` in float32 only where it cannot overflow, see
:func:`~._gptq_core.second_moment`); an activation holding NaN or Inf on the calibration data is refused
(:class:`~qcompiler.errors.CalibrationError` naming it), a weight holding NaN or Inf too
(:class:`~qcompiler.errors.InvalidModelError`). A layer whose Hessian cannot be factorised even with more damping
keeps its weight (the lowering rounds it to nearest), skipped with a reason and counted (``rtn_fallback``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.errors import ConfigError
from qcompiler.formats.channelwise import sqnr_db, symmetric_scales
from qcompiler.formats.int8_range import recipe_reduce_range, resolve_reduce_range
from qcompiler.metadata import PINNED_SCALE_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._finite import require_finite
from qcompiler.passes._int8_layers import layer_qmax, mask_bias_reason
from qcompiler.passes.algorithms._gptq_core import (
    CholeskyError,
    activation_absmax,
    fits_float32,
    gptq_round,
    second_moment,
)
from qcompiler.passes.algorithms.bias_correction import BIAS_SHIFT_KEY, get_channel_mean, mean_shift
from qcompiler.passes.annotate import is_weight_layer
from qcompiler.qspec import get_qspec

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["GPTQPass", "conv_patches"]

logger = logging.getLogger(__name__)

#: the most bytes of conv input patches built at once (several images per BLAS call)
_PATCH_BYTES = 64 << 20


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return default if attr is None else [int(v) for v in attr.as_ints()]


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def conv_patches(x: np.ndarray, kernel: tuple[int, int], pads: list[int], strides: list[int],
                 dilations: list[int]) -> np.ndarray:
    """Input patches of a 2-D convolution of one image ``x[C, H, W]``: ``[C, kh * kw, OH * OW]``."""
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (padded.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (padded.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    taps = []
    for i in range(kh):
        for j in range(kw):
            r, c = i * dilations[0], j * dilations[1]
            taps.append(padded[:, r:r + strides[0] * (out_h - 1) + 1:strides[0],
                               c:c + strides[1] * (out_w - 1) + 1:strides[1]])
    return np.stack(taps, axis=1).reshape(x.shape[0], kh * kw, out_h * out_w)


class _Layer:
    """One weight-bearing node: how to read its input patches and its weight as rows ``[M, K]``."""

    def __init__(self, node: ir.Node) -> None:
        self.node = node
        self.weight = require_finite(node.inputs[1].const_value.numpy(), node.inputs[1].name, node.name)
        self.hessian: np.ndarray | None = None
        self.rows_seen = 0
        if node.op_type == "Conv":
            self.groups = _int(node, "group", 1)
            m, cg, kh, kw = self.weight.shape
            self.kernel = (kh, kw)
            self.pads = _ints(node, "pads", [0, 0, 0, 0])
            self.strides = _ints(node, "strides", [1, 1])
            self.dilations = _ints(node, "dilations", [1, 1])
        else:
            self.groups = 1

    def rows(self) -> np.ndarray:
        """The weight as ``[M, K]`` rows, one per output channel."""
        w = self.weight
        if self.node.op_type == "Conv":
            return w.reshape(w.shape[0], -1)
        if self.node.op_type == "Gemm" and _int(self.node, "transB", 0):
            return w
        return w.T

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.node.op_type == "Conv":
            return rows.reshape(self.weight.shape)
        if self.node.op_type == "Gemm" and _int(self.node, "transB", 0):
            return rows
        return np.ascontiguousarray(rows.T)

    def accumulate(self, x: np.ndarray) -> None:
        """Add one batch of the layer's input to its Hessian(s)."""
        tensor = self.node.inputs[0].name
        if self.node.op_type != "Conv":
            rows = x.reshape(-1, x.shape[-1])
            h = second_moment(rows, tensor, self.node.name)
            self.rows_seen += rows.shape[0]
        else:
            c = x.shape[1]
            cg = c // self.groups
            h = 0.0
            absmax = activation_absmax(x, tensor, self.node.name)
            taps = self.kernel[0] * self.kernel[1]
            # float32 patches unless a sum over every output position (at most 4x the padded-free pixel count) of
            # the batch could overflow float32
            positions = x.shape[0] * int(np.prod(x.shape[2:])) * 4
            x = x.astype(np.float32 if fits_float32(absmax, positions) else np.float64)
            per_image = max(1, x[0].size * taps * x.itemsize)
            step = max(1, _PATCH_BYTES // per_image)  # images per matmul: few large BLAS calls, bounded memory
            for start in range(0, x.shape[0], step):
                chunk = [conv_patches(image, self.kernel, self.pads, self.strides, self.dilations)
                         for image in x[start:start + step]]  # each [C, T, P]
                p = np.concatenate(chunk, axis=2) if len(chunk) > 1 else chunk[0]
                p = p.reshape(self.groups, cg * p.shape[1], p.shape[2])  # [g, K, P * images]
                h = h + np.matmul(p, np.swapaxes(p, 1, 2)).astype(np.float64)
                self.rows_seen += p.shape[2]
        self.hessian = h if self.hessian is None else self.hessian + h


class GPTQPass(QPass):
    """Round the annotated int8 weights with GPTQ on the calibration data (weights moved onto their grid).

    Args:
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData` (none: the pass does nothing,
            counted, so the dynamic recipe stays data-free without ``--calib``).
        damp: Hessian damping, a fraction of its mean diagonal.
        act_order: round the inputs with the largest ``diag(H)`` first.
        max_samples: calibration samples to use (None: all).
        batch_size: samples per ONNX Runtime call.
        reduce_range: the lowering's weight range (true, false or "auto"); from the recipe's lowering options.
    """

    name = "gptq"
    stage = "calibrate"
    preserves_float = False

    def __init__(self, *, calibration_data: Any = None, damp: float = 0.01, act_order: bool = True,
                 max_samples: int | None = None, batch_size: int = 16, reduce_range: bool | str = "auto") -> None:
        super().__init__()
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 < damp < 1.0:
            raise ConfigError(f"{self.name}: damp must be a fraction in (0, 1), got {damp!r}")
        if not isinstance(act_order, bool):
            raise ConfigError(f"{self.name}: act_order must be true or false, got {act_order!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be a positive integer, got {batch_size!r}")
        self.calibration_data = calibration_data
        self.damp = float(damp)
        self.act_order = act_order
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.qmax = 63 if resolve_reduce_range(reduce_range, self.name) else 127

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> GPTQPass:
        """Data from the build context, sample limits from ``[calibration]``, ``reduce_range`` from the lowering."""
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None),
            "max_samples": recipe.calibration.max_samples,
            "batch_size": recipe.calibration.batch_size,
            "reduce_range": recipe_reduce_range(recipe, cls.name),
        }
        kwargs.update(options)
        return cls(**kwargs)

    def _reason(self, node: ir.Node) -> str | None:
        spec = get_qspec(node.inputs[1])
        if spec is None or not spec.symmetric or spec.granularity == "block":
            return "weight spec is not symmetric per channel or per tensor"
        if spec.dtype != "int8":
            return f"weight dtype {spec.dtype} has no integer grid (GPTQ here rounds onto int8)"
        if len(node.inputs[1].uses()) != 1:
            return "weight is shared by several nodes"
        act = get_qspec(node.inputs[0])
        if act is not None and not act.dynamic:  # the static lowering leaves it float (NaN: refused by name)
            reason = mask_bias_reason(node)
            if reason is not None:
                return reason
        if node.op_type == "Conv":
            if node.inputs[1].const_value.numpy().ndim != 4:
                return "only 2-D Conv"
            auto_pad = node.attributes.get("auto_pad")
            if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
                return "Conv uses auto_pad"
        elif node.op_type == "Gemm":
            if _int(node, "transA", 0):
                return "Gemm with transA"
            alpha = node.attributes.get("alpha")
            if alpha is not None and alpha.as_float() != 1.0:
                return "Gemm with alpha != 1"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.calibration_data is None:  # the dynamic recipe rounds data-free (nearest) without --calib
            self.count("no_calibration_data")
            return ir.passes.PassResult(model, False)
        layers: list[_Layer] = []
        for node in model.graph:
            if not is_weight_layer(node):
                continue
            reason = self._reason(node)
            if reason is not None:
                self.skip(node, reason)
                continue
            layers.append(_Layer(node))
        if not layers:
            return ir.passes.PassResult(model, False)
        inputs = list(dict.fromkeys(layer.node.inputs[0] for layer in layers))
        session = io.ort_session(model, extra_outputs=inputs)
        names = [v.name for v in inputs]
        readers = {v.name: [layer for layer in layers if layer.node.inputs[0] is v] for v in inputs}
        for feed in self.calibration_data.iter_batches(self.batch_size, self.max_samples):
            for name, array in zip(names, session.run(names, feed), strict=True):
                for layer in readers[name]:
                    layer.accumulate(array)
        del session
        rounded = 0
        for layer in layers:
            try:
                self._round(layer)
                rounded += 1
            except CholeskyError as exc:  # the weight stays as it is: the lowering rounds it to nearest
                self.skip(layer.node, f"GPTQ failed ({exc}): rounded to nearest")
                self.count("rtn_fallback")
        self.count("layers", rounded)
        return ir.passes.PassResult(model, rounded > 0)

    def _round(self, layer: _Layer) -> None:
        node, value = layer.node, layer.node.inputs[1]
        spec = get_qspec(value)
        rows = layer.rows().astype(np.float64)
        qmax = layer_qmax(node, layer.weight, self.qmax)
        per_channel = spec.granularity == "per_channel"
        row_scale = symmetric_scales(rows, 0 if per_channel else None, qmax)
        scale_rows = np.broadcast_to(row_scale.astype(np.float64), (rows.shape[0],))
        h = layer.hessian
        if h.ndim == 3 and h.shape[0] > 1:  # grouped: H per group, expanded to the rows of each group
            per_group = rows.shape[0] // h.shape[0]
            if h.shape[-1] <= 64:
                q = gptq_round(rows, h[np.arange(rows.shape[0]) // per_group], scale_rows, -qmax, qmax,
                               damp=self.damp, act_order=False)
            else:
                q = np.concatenate([gptq_round(rows[g * per_group:(g + 1) * per_group], h[g],
                                               scale_rows[g * per_group:(g + 1) * per_group], -qmax, qmax,
                                               damp=self.damp, act_order=self.act_order)
                                    for g in range(h.shape[0])])
        else:
            q = gptq_round(rows, h.reshape(h.shape[-2:]), scale_rows, -qmax, qmax, damp=self.damp,
                           act_order=self.act_order)
        grid = (q * scale_rows[:, None]).astype(np.float32)
        new_weight = layer.from_rows(grid)
        before = sqnr_db(rows, np.clip(np.rint(rows / scale_rows[:, None]), -qmax, qmax), scale_rows, 0)
        after = sqnr_db(rows, q, scale_rows, 0)
        mean = get_channel_mean(node.inputs[0])
        if mean is not None:
            shift = mean_shift(node, layer.weight, new_weight, mean)
            if shift is not None:
                node.meta[BIAS_SHIFT_KEY] = shift
        value.const_value = ir.tensor(new_weight, name=value.name)
        axis = spec.axis if per_channel else None
        pinned = row_scale if axis is not None else row_scale.reshape(())
        value.meta[PINNED_SCALE_KEY] = np.asarray(pinned, dtype=np.float32)
        self.record_layer(node, gptq_weight_sqnr_db=round(after, 3), rtn_weight_sqnr_db=round(before, 3),
                          gptq_rows=layer.rows_seen)
