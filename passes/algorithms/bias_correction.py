"""Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
section 4.2, the empirical form): cancel the mean output shift that rounding the weights causes.

For a layer ``y = W x + b`` whose weight is replaced by its dequantized int8 version ``Wq``, the expected output
moves by ``E[y] - E[yq] = (W - Wq) E[x]``. With the per-channel input means ``E[x]`` measured on the calibration
data, adding that shift to the bias makes the quantized layer right on average::

    b' = b + (W - Wq) . E[x]          (per output channel; summed over kernel taps and the channels of a group)

:class:`CollectInputMeansPass` (stage ``calibrate``) measures ``E[x]``: it exposes the activation input of every
node annotated for int8 (see :mod:`qcompiler.passes.annotate`) on a weight-sharing ONNX Runtime clone of the model
and accumulates, in float64, the sum over every axis but the channel axis (Conv: axis 1; MatMul: the last axis;
Gemm: axis 1, or 0 with ``transA``), batch by batch, keeping no activation. The means go into
``value.meta["qcompiler.channel_mean"]`` (metadata only: the pass preserves the float function).

:func:`mean_shift` computes ``(W - Wq) . E[x]`` for the lowering passes, which apply it when the input's mean is
present (``lower-int8-qdq``: ``bias_correction = true``, the default). Limits: the correction is exact in
expectation for MatMul/Gemm and for Conv away from the borders; zero padding makes border pixels see fewer
inputs, which the per-channel mean ignores. Values inside subgraphs are not measured.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.errors import CalibrationError
from qcompiler.pass_manager import QPass
from qcompiler.passes.annotate import is_weight_layer

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["CollectInputMeansPass", "CHANNEL_MEAN_KEY", "BIAS_SHIFT_KEY", "channel_axis", "get_channel_mean",
           "mean_shift"]

logger = logging.getLogger(__name__)

#: value metadata key of the per-channel mean of an activation (float64 numpy array)
CHANNEL_MEAN_KEY = "qcompiler.channel_mean"
#: node metadata key of a mean output shift an earlier pass caused and the lowering's bias correction adds
#: (e.g. GPTQ moves the float weight onto its grid: the lowering then sees no rounding of its own)
BIAS_SHIFT_KEY = "qcompiler.pending_bias_shift"


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def channel_axis(node: ir.Node, rank: int) -> int | None:
    """The axis of the node's activation input (input 0) that its weight contracts over, or None."""
    if node.op_type == "Conv":
        return 1 if rank >= 3 else None
    if node.op_type == "MatMul":
        return rank - 1 if rank >= 2 else None
    if node.op_type == "Gemm":
        return 0 if _int_attr(node, "transA", 0) else 1
    return None


def get_channel_mean(value: ir.Value | None) -> np.ndarray | None:
    """The per-channel mean measured on ``value``, or None."""
    if value is None:
        return None
    mean = value.meta.get(CHANNEL_MEAN_KEY)
    return mean if isinstance(mean, np.ndarray) else None


def mean_shift(node: ir.Node, weight: np.ndarray, dequantized: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """``(W - Wq) . E[x]`` per output channel (float64), or None when the shapes do not fit the op.

    Args:
        node: the Conv/MatMul/Gemm (its ``group`` or ``transB`` decide the layout of ``weight``).
        weight: the float weight ``W`` (after any folding the lowering did, e.g. Gemm's alpha).
        dequantized: ``Wq``, the dequantized quantized weight, same shape.
        mean: the per-channel mean of the activation input.
    """
    error = weight.astype(np.float64) - dequantized.astype(np.float64)
    if node.op_type == "Conv":
        groups = _int_attr(node, "group", 1)
        out_ch, per_group = error.shape[0], error.shape[1]
        if out_ch % groups or mean.shape != (groups * per_group,):
            return None
        taps = error.reshape(out_ch, per_group, -1).sum(axis=2)  # [M, C/g]
        group_mean = mean.reshape(groups, per_group)[np.arange(out_ch) // (out_ch // groups)]  # [M, C/g]
        return (taps * group_mean).sum(axis=1)
    if node.op_type == "Gemm" and _int_attr(node, "transB", 0):
        error = error.T
    if error.ndim != 2 or mean.shape != (error.shape[0],):
        return None
    return mean @ error


class CollectInputMeansPass(QPass):
    """Measure the per-channel mean of the activation input of each annotated Conv/MatMul/Gemm.

    Args:
        calibration_data: a :class:`~qcompiler.calibration.data.CalibrationData` (required when the pass runs).
        max_samples: use at most this many samples (None: all).
        batch_size: samples per ONNX Runtime call.
        intra_op_threads: ORT threads (None: ORT's default).
    """

    name = "collect-input-means"
    stage = "calibrate"
    preserves_float = True

    def __init__(self, *, calibration_data: Any = None, max_samples: int | None = None, batch_size: int = 16,
                 intra_op_threads: int | None = None) -> None:
        super().__init__()
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise CalibrationError(f"{self.name}: max_samples must be a positive integer, got {max_samples!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise CalibrationError(f"{self.name}: batch_size must be a positive integer, got {batch_size!r}")
        self.calibration_data = calibration_data
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.intra_op_threads = intra_op_threads

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> CollectInputMeansPass:
        """Take the data from the build context and ``[calibration]`` sample limits from the recipe."""
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None),
            "max_samples": recipe.calibration.max_samples,
            "batch_size": recipe.calibration.batch_size,
        }
        kwargs.update(options)
        return cls(**kwargs)

    def _targets(self, model: ir.Model) -> dict[ir.Value, ir.Node]:
        """The activation inputs to measure, each with the first annotated node that reads it."""
        targets: dict[ir.Value, ir.Node] = {}
        for node in model.graph:
            if not is_weight_layer(node) or not node.inputs or node.inputs[0] is None:
                continue
            x = node.inputs[0]
            if not x.name or x.const_value is not None:
                self.skip(node, "activation input is unnamed or constant")
                continue
            targets.setdefault(x, node)
        return targets

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.calibration_data is None:
            raise CalibrationError(f"pass '{self.name}' needs calibration data: pass --calib DATA")
        targets = self._targets(model)
        if not targets:
            return ir.passes.PassResult(model, False)
        values = list(targets)
        session = io.ort_session(model, extra_outputs=values, intra_op_threads=self.intra_op_threads)
        names = [v.name for v in values]
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = dict.fromkeys(names, 0)
        for feed in self.calibration_data.iter_batches(self.batch_size, self.max_samples):
            for value, array in zip(values, session.run(names, feed), strict=True):
                axis = channel_axis(targets[value], array.ndim)  # the rank is known for sure only at run time
                if axis is None:
                    continue
                reduce = tuple(i for i in range(array.ndim) if i != axis)
                total = np.sum(array, axis=reduce, dtype=np.float64)
                sums[value.name] = total if value.name not in sums else sums[value.name] + total
                counts[value.name] += array.size // max(array.shape[axis], 1)
        del session
        modified = False
        for value in values:
            name = value.name
            if not counts.get(name):
                continue
            mean = sums[name] / counts[name]
            if not np.all(np.isfinite(mean)):
                self.count("nonfinite_means")
                continue
            old = get_channel_mean(value)
            if old is None or old.shape != mean.shape or not np.array_equal(old, mean):
                value.meta[CHANNEL_MEAN_KEY] = mean
                modified = True
            self.count("means")
        return ir.passes.PassResult(model, modified)
