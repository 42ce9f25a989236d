"""Round to nearest: the codes of every annotated weight-only layer are its format's own quantizer's, on the min/max
grid, or, when calibration data is given, on the importance-weighted grid (llama.cpp's RTN with an imatrix).

The algorithm pass of ``algorithm = "rtn"``. Without calibration data it only marks each layer's codes as
:class:`~qcompiler.formats.RoundToNearest`; ``lower-weight-only`` applies the format's ``quantize`` when it reads
the weight, one layer at a time, so a large model never holds every layer's codes at once.

With calibration data (``--calib``) and a format that has a grid (the integer formats and ternary), each layer's
scales and zero points are searched for the error weighted by its inputs' ``E[x_k^2]``
(:meth:`~qcompiler.formats.GridFormat.weighted_grid`, :mod:`qcompiler.formats.weighted_grid`; the min/max grid is
a candidate, so the weighted error is never above plain rounding's), and the codes, still round to nearest on that
grid, go into the node's metadata (``WEIGHT_CODES_KEY``) for the lowering, as GPTQ's do: every such layer's codes
are held until the lowering (one byte per weight). The statistics come group by group from the partly quantized
model (``sequential = True``, the default, :mod:`._importance`), or from one streamed ONNX Runtime pass over the
float model (``sequential = False``). Measured on SmolLM2-135M (int4 b128/b32, int3 b32) and all-MiniLM-L6-v2 the
two give the same quality within noise; the sequential run's compile peaks at 1.4 GB RSS against 3.1 GB for the
one-pass session on SmolLM2 (int4 b128), for about 1.2-1.5x its time. Formats without a grid
(NF4, FP8, a plugin's codebook) stay plain round to nearest and read no data. A weight that several MatMul/Gemm read
gets the codes its first reader's importance chose. Per layer it records the weighted output error of the chosen and
of the min/max grid (``imatrix_weighted_error_db`` / ``rtn_weighted_error_db``, dB, lower is better).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import ConfigError
from qcompiler.formats import GridFormat, RoundToNearest, WeightSpec, get_format
from qcompiler.formats.blockwise import column_chunks
from qcompiler.formats.weighted_grid import bounded_importance
from qcompiler.metadata import WEIGHT_CODES_KEY, WEIGHT_SPEC_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._weight_layers import annotated_layers, layer_weight, quantized_weight, transposed_constant
from qcompiler.passes.algorithms import _importance
from qcompiler.progress import track

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["WeightOnlyRTNPass", "imatrix_quantize"]

logger = logging.getLogger(__name__)


def imatrix_quantize(fmt: GridFormat, spec: WeightSpec, weight: np.ndarray, importance: np.ndarray,
                     errors: dict[str, float] | None = None) -> Any:
    """Round to nearest of ``W[K, N]`` on the grid searched for the error weighted by ``importance[K]``; columns in
    bounded slices. ``errors``, when given, receives the weighted squared errors of these codes (``"imatrix"``) and
    of plain round to nearest (``"rtn"``) and the weighted energy of ``W`` (``"signal"``), slice by slice."""
    bounded = bounded_importance(importance) if errors is not None else None
    parts = []
    for cols in column_chunks(weight.shape):
        part = weight[:, cols]
        scale, zero = fmt.weighted_grid(part, spec, importance)
        codes = fmt.codes_on_grid(part, scale, zero, spec)
        parts.append((codes, scale, zero))
        if errors is not None:
            w = part.astype(np.float64)
            chosen = fmt.from_codes(codes, scale, zero, spec, weight.shape[0]).dequantize()
            plain = fmt.quantize(part, spec).dequantize()
            for key, value in (("imatrix", (w - chosen) ** 2), ("rtn", (w - plain) ** 2), ("signal", w * w)):
                errors[key] = errors.get(key, 0.0) + float(bounded @ value.sum(axis=1))
    codes, scale, zero = (np.concatenate(x, axis=0) for x in zip(*parts, strict=True))
    return fmt.from_codes(codes, scale, zero, spec, weight.shape[0])


def _db(noise: float, signal: float) -> float:
    return 0.0 if signal <= 0 else round(10 * math.log10(max(noise, 1e-300) / signal), 3)


def _same_codes(old: Any, new: Any) -> bool:
    """Whether two quantized weights hold the same arrays (a rerun that changes nothing is not ``modified``)."""
    if type(old) is not type(new) or not dataclasses.is_dataclass(new):
        return False
    for field in dataclasses.fields(new):
        a, b = getattr(old, field.name), getattr(new, field.name)
        if isinstance(b, np.ndarray) or isinstance(a, np.ndarray):
            if a is None or b is None or a.dtype != b.dtype or not np.array_equal(a, b):
                return False
        elif a != b:
            return False
    return True


class WeightOnlyRTNPass(QPass):
    """Round every annotated weight-only layer to the nearest value of its format (see the module docstring).

    Args:
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData`, or None (the min/max grid).
        weighted_grid: with calibration data, search the grid for the importance-weighted error (False: the data
            is not read).
        sequential: take each layer's importance from the model with the layers before it quantized (False: from
            the float model in one pass).
        max_samples, batch_size: calibration samples to use (None: all) and per ONNX Runtime call.
        progress: show progress bars.
    """

    name = "weight-only-rtn"
    stage = "calibrate"
    preserves_float = True
    #: what the format must offer (see qcompiler.formats.ALGORITHM_NEEDS)
    needs = frozenset({"quantize"})

    def __init__(self, *, calibration_data: Any = None, weighted_grid: bool = True, sequential: bool = True,
                 max_samples: int | None = None, batch_size: int = 4, progress: bool = False) -> None:
        super().__init__()
        for option, value in (("weighted_grid", weighted_grid), ("sequential", sequential)):
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name}: {option} must be true or false, got {value!r}")
        self.calibration_data = calibration_data
        self.weighted_grid, self.sequential = weighted_grid, sequential
        self.max_samples, self.batch_size, self.progress = max_samples, batch_size, bool(progress)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyRTNPass:
        """Data and progress from the build context; sample limits from ``[calibration]``."""
        return cls(**_importance.calibrated_pass_options(recipe, context, options))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        marker = RoundToNearest()
        modified = False
        grid_layers = []
        for node, spec in annotated_layers(model):
            if self.calibration_data is not None and self.weighted_grid and \
                    isinstance(get_format(spec.format), GridFormat) and not isinstance(layer_weight(model, node), str):
                grid_layers.append(node)
                continue
            modified |= not isinstance(node.meta.get(WEIGHT_CODES_KEY), RoundToNearest)
            node.meta[WEIGHT_CODES_KEY] = marker
            self.count("layers")
        if grid_layers:
            modified |= self._imatrix(model, grid_layers)
        return ir.passes.PassResult(model, modified)

    def _imatrix(self, model: ir.Model, grid_layers: list[ir.Node]) -> bool:
        """Codes on the importance-weighted grid for ``grid_layers`` (into their metadata); whether any changed."""
        data = self.calibration_data
        batches = data.iter_batches(self.batch_size, self.max_samples)
        total = -(-min(data.num_samples, self.max_samples or data.num_samples) // self.batch_size)
        batches = track(batches, enabled=self.progress, desc="RTN importance", total=total, unit="batch")
        mine = {id(node) for node in grid_layers}
        done: dict[tuple[int, WeightSpec], Any] = {}
        changed = False

        def choose(node: ir.Node, importance: np.ndarray | None) -> Any:
            nonlocal changed
            spec = node.meta[WEIGHT_SPEC_KEY]
            weight = quantized_weight(node, layer_weight(model, node)[0])  # type: ignore[index]
            fmt = get_format(spec.format)
            if id(node) not in mine:  # sequential only: a layer left to the lowering's rounding, quantized here too
                return fmt.quantize(weight, spec)
            key = (id(transposed_constant(node.inputs[1]) or node.inputs[1]), spec)
            if key in done:
                self.count("weights_shared")
                chosen = done[key]
            elif importance is None:  # no calibration row reached it
                chosen = done[key] = fmt.quantize(weight, spec)
                self.skip(node, "no calibration rows reached its input: min/max grid")
            else:
                errors: dict[str, float] = {}
                chosen = done[key] = imatrix_quantize(fmt, spec, weight, importance, errors)
                self.record_layer(node, imatrix_weighted_error_db=_db(errors["imatrix"], errors["signal"]),
                                  rtn_weighted_error_db=_db(errors["rtn"], errors["signal"]))
                self.count("imatrix_layers")
            changed |= not _same_codes(node.meta.get(WEIGHT_CODES_KEY), chosen)
            node.meta[WEIGHT_CODES_KEY] = chosen
            self.count("layers")
            return chosen

        if self.sequential:
            nodes = [n for n, _ in annotated_layers(model) if not isinstance(layer_weight(model, n), str)]
            _importance.sequential(model, nodes, batches, choose, progress=self.progress)
        else:
            _importance.one_pass(model, grid_layers, batches, choose)
        return changed
