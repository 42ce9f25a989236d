"""GPTQ for weight-only blockwise quantization: codes that minimise each layer's output error on calibration data.

For every layer ``annotate-weight-only`` gave a spec (:func:`~qcompiler.passes._weight_layers.annotated_layers`), the pass
accumulates ``H = sum x x^T`` over the rows of each distinct input (Q/K/V projections, or gate/up, share one
``H``: one ``[K, K]`` float64 per distinct input, 2.6 MB for ``K = 576``). By default the statistics are
**true-sequential** (:mod:`.sequential`): the calibration data go through the model one segment at a time, and each
group of layers that reads one input sees that input as the model computes it once every layer before it is
quantized (their chosen codes, dequantized), so each layer corrects the error upstream of it; memory is one
group's ``H`` and the values live between segments. ``sequential = False``: every ``H`` from the float model, in
one streamed pass (the behaviour before; ONNX Runtime's GPTQ does the same).

``gptaq = true`` (``[pass-options.weight-only-gptq]``; Li et al. 2025, "GPTAQ"/"GPTQv2") runs the float model beside
the quantized one, segment by segment, and fits each layer's quantized output on its drifted input ``x_q`` to the
float model's output ``x_f W`` instead of to ``x_q W``: GPTQ on the least-squares target ``W + alpha H^-1 D W``,
``D = sum x_q^T (x_f - x_q)`` (:func:`~._gptq_core.asymmetric_target`; ``gptaq_alpha``, default 0.25 as the paper's
code). It costs a second forward of every segment and a second copy of the values live between segments.

The grid (scales, zero points) is then searched for the error weighted by each input's energy ``diag(H) / rows``
(``weighted_grid``, :mod:`qcompiler.formats.weighted_grid`; llama.cpp's imatrix idea; ``False``: the min/max grid
round to nearest would use), and GPTQ (:mod:`._gptq_core`; columns in order of decreasing ``diag(H)`` with
``act_order``, each column on the grid of its own block, "static groups"; damping ``damp * mean(diag H)``, more on a
failed Cholesky) chooses the codes on it, column slices of a bounded size at a time. On SmolLM2-135M int4 block
128 asymmetric (held-out text, fp32 21.74): one-pass GPTQ 26.06, sequential 25.33, sequential on the weighted grid
22.40. The codes go into the node's
metadata (``WEIGHT_CODES_KEY``), where the lowering takes them; float weights are not touched, so a weight that a
Gather also reads (a tied embedding) stays exact for the Gather. Formats without a grid (a plugin's codebook) get
round to nearest (counted); the recipe check refuses GPTQ on a built-in format without one.

Per layer it records the output error ``tr((W - W_q)^T H (W - W_q)) / tr(W^T H W)`` of GPTQ and of round to nearest
on the same grid (``gptq_output_error_db`` / ``rtn_output_error_db``, in dB: lower is better; a layer wider than
one column slice is measured on at most three of its slices, each ``H @ E`` being ``O(K^2)`` a column). It is the algorithm pass of
``algorithm = "gptq"`` and needs calibration data. Skipped with a reason (their codes: round to nearest): weights
read by several MatMul/Gemm (one set of codes could not fit two Hessians), and layers whose
Hessian cannot be factorised even with more damping (round-to-nearest, counted ``rtn_fallback``). ``H`` is summed in
float64 (:func:`~._gptq_core.second_moment`), so calibration values whose squares overflow float32 still give
finite statistics; an activation holding NaN or Inf is refused with a :class:`~qcompiler.errors.CalibrationError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.calibration.observers import fold_batches
from qcompiler.errors import CalibrationError, ConfigError
from qcompiler.formats import GridFormat, RoundToNearest, WeightSpec, get_format
from qcompiler.formats.blockwise import column_chunks
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import release_external
from qcompiler.passes._weight_layers import annotated_layers, layer_weight, quantized_weight, transposed_constant
from qcompiler.passes.algorithms._gptq_core import (
    CholeskyError,
    asymmetric_target,
    gptq_factor,
    gptq_round,
    second_moment,
)
from qcompiler.passes.algorithms.sequential import LayerGroup, layer_groups, run_sequentially
from qcompiler.progress import track

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["WeightOnlyGPTQPass"]

logger = logging.getLogger(__name__)


class _Hessian:
    """``sum x x^T`` (float64) over the rows of every batch of the activation ``name`` (a ``fold_batches`` folder);
    an activation holding NaN or Inf raises :class:`~qcompiler.errors.CalibrationError` naming it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sum: np.ndarray | None = None
        self.rows = 0
        self.drift: _Drift | None = None  # GPTAQ's statistic of the same input, when asked for
        self._factor: tuple[np.ndarray, np.ndarray] | None = None

    def factor(self, damp: float, act_order: bool) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~._gptq_core.gptq_factor` of the sum, computed once for every layer that reads this input (Q/K/V
        share it; ``O(K^3)``)."""
        assert self.sum is not None
        if self._factor is None:
            self._factor = gptq_factor(self.sum, damp, act_order)
        return self._factor

    def update(self, array: np.ndarray) -> None:
        x = array.reshape(-1, array.shape[-1])
        h = second_moment(x, self.name)
        self.sum = h if self.sum is None else self.sum + h
        self.rows += x.shape[0]


class WeightOnlyGPTQPass(QPass):
    """Choose weight-only codes with GPTQ (see the module docstring).

    Args:
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData` (token ids for an LLM).
        damp: Hessian damping, a fraction of its mean diagonal.
        act_order: round the inputs with the largest ``diag(H)`` first.
        sequential: take each layer's ``H`` from the model with every layer before it already quantized
            (:mod:`.sequential`); False: from the float model, all layers in one pass.
        gptaq: the asymmetric objective of GPTAQ (needs ``sequential``): fit each layer's quantized output on the
            partly quantized model's input to the float model's output, not to its own float output.
        gptaq_alpha: the share of GPTAQ's least-squares correction applied (0: plain GPTQ, 1: all of it).
        weighted_grid: the grid (scales, zero points) searched for the error weighted by ``diag(H)``
            (:mod:`qcompiler.formats.weighted_grid`); False: the min/max grid of round to nearest.
        max_samples, batch_size: calibration samples to use (None: all) and per ONNX Runtime call.
        progress: show progress bars.
    """

    name = "weight-only-gptq"
    stage = "calibrate"
    preserves_float = True  # it writes codes into metadata: the float function is unchanged until the lowering
    needs = frozenset({"grid"})

    def __init__(self, *, calibration_data: Any = None, damp: float = 0.01, act_order: bool = True,
                 sequential: bool = True, weighted_grid: bool = True, gptaq: bool = False,
                 gptaq_alpha: float = 0.25, max_samples: int | None = None, batch_size: int = 4,
                 progress: bool = False) -> None:
        super().__init__()
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 < damp < 1.0:
            raise ConfigError(f"{self.name}: damp must be a fraction in (0, 1), got {damp!r}")
        self.calibration_data = calibration_data
        self.damp, self.act_order, self.sequential = float(damp), bool(act_order), bool(sequential)
        self.weighted_grid = bool(weighted_grid)
        if gptaq and not sequential:
            raise ConfigError(f"{self.name}: gptaq needs sequential = true (the quantized model's inputs)")
        if isinstance(gptaq_alpha, bool) or not isinstance(gptaq_alpha, (int, float)) or \
                not 0.0 <= gptaq_alpha <= 1.0:
            raise ConfigError(f"{self.name}: gptaq_alpha must be a fraction in [0, 1], got {gptaq_alpha!r}")
        self.gptaq, self.gptaq_alpha = bool(gptaq), float(gptaq_alpha)
        self.max_samples, self.batch_size, self.progress = max_samples, batch_size, bool(progress)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> WeightOnlyGPTQPass:
        """Data and progress from the build context; sample limits from ``[calibration]``."""
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None),
            "max_samples": recipe.calibration.max_samples, "batch_size": recipe.calibration.batch_size,
            "progress": bool(getattr(context, "progress", False)),
        }
        kwargs.update(options)
        return cls(**kwargs)

    def requires(self, model: ir.Model) -> None:
        if self.calibration_data is None:
            raise CalibrationError("GPTQ needs calibration data: pass --calib DATA (token ids for a language model)")

    def _layers(self, model: ir.Model) -> list[tuple[ir.Node, WeightSpec]]:
        """The layers GPTQ chooses codes for; each weight is checked (finite) here but read again only when its
        group is quantized, so an external-data model is never resident all at once."""
        readers: dict[int, int] = {}
        found: list[tuple[ir.Node, WeightSpec, ir.Value]] = []
        for node, spec in annotated_layers(model):
            if _read_weight(model, node) is None:
                continue
            _release(node)
            source = transposed_constant(node.inputs[1]) or node.inputs[1]
            readers[id(source)] = readers.get(id(source), 0) + 1
            found.append((node, spec, source))
        layers = []
        for node, spec, source in found:
            node.meta[WEIGHT_CODES_KEY] = RoundToNearest()  # until GPTQ chooses better ones
            if readers[id(source)] > 1:
                self.skip(node, "weight read by several MatMul/Gemm (rounded to nearest)")
            elif not isinstance(get_format(spec.format), GridFormat):
                self.skip(node, f"format {spec.format!r} has no grid (rounded to nearest)")
            else:
                layers.append((node, spec))
        return layers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = self._layers(model)
        if not layers:
            return ir.passes.PassResult(model, any(True for _ in annotated_layers(model)))  # codes marked
        batches = self.calibration_data.iter_batches(self.batch_size, self.max_samples)
        total = -(-min(self.calibration_data.num_samples, self.max_samples or self.calibration_data.num_samples)
                  // self.batch_size)
        batches = track(batches, enabled=self.progress, desc="GPTQ statistics", total=total, unit="batch")
        if self.sequential:
            chosen = self._sequential(model, layers, batches)
        else:
            chosen = self._one_pass(model, layers, batches)
        self.count("layers", chosen)
        return ir.passes.PassResult(model, True)  # codes written (metadata the lowering reads)

    def _one_pass(self, model: ir.Model, layers: list[tuple[ir.Node, WeightSpec]],
                  batches: Iterable[dict[str, np.ndarray]]) -> int:
        """Every layer's ``H`` from the float model, one streamed pass; the number of layers GPTQ chose."""
        inputs = list(dict.fromkeys(node.inputs[0] for node, _ in layers))
        hessians = {v.name: _Hessian(v.name) for v in inputs}
        fold_batches(io.ort_session(model, extra_outputs=inputs), hessians, batches)
        chosen = 0
        for node, spec in track(layers, enabled=self.progress, desc="GPTQ", unit="layer"):
            h = hessians[node.inputs[0].name]
            weight = _read_weight(model, node)
            assert weight is not None
            chosen += self._choose_or_round(node, weight, spec, h) is not None
            del weight
            _release(node)
        return chosen

    def _sequential(self, model: ir.Model, layers: list[tuple[ir.Node, WeightSpec]],
                    batches: Iterable[dict[str, np.ndarray]]) -> int:
        """Group by group, each ``H`` from the partly quantized model; the number of layers GPTQ chose. The layers
        GPTQ does not choose (rounded to nearest) are quantized in the model the later groups see too."""
        mine = {id(node): spec for node, spec in layers}
        rounded = {id(node): spec for node, spec in self._rounded_layers(model, mine)}
        groups = layer_groups(model, [n for n, _ in annotated_layers(model) if id(n) in mine or id(n) in rounded])
        hessians: dict[int, _Hessian] = {}
        drifts: dict[int, _Drift] = {}
        chosen = 0

        def observe(group: LayerGroup, activation: np.ndarray) -> None:
            hessians.setdefault(id(group.source), _Hessian(group.source.name or "activation")).update(activation)

        def observe_float(group: LayerGroup, activation: np.ndarray, reference: np.ndarray) -> None:
            drifts.setdefault(id(group.source), _Drift(group.source.name or "activation")).update(activation,
                                                                                                 reference)

        def quantize(group: LayerGroup) -> dict[ir.Node, np.ndarray]:
            nonlocal chosen
            h = hessians.pop(id(group.source))
            h.drift = drifts.pop(id(group.source), None)
            weights = {}
            for node in group.nodes:
                weight = _read_weight(model, node)
                assert weight is not None
                if id(node) in mine:
                    spec = mine[id(node)]
                    picked = self._choose_or_round(node, weight, spec, h)
                    chosen += picked is not None
                    weights[node] = picked if picked is not None else _rounded(weight, spec)
                else:
                    weights[node] = _rounded(weight, rounded[id(node)])
                del weight
                _release(node)
            return weights

        run_sequentially(model, groups, batches, observe, quantize, progress=self.progress,
                         observe_float=observe_float if self.gptaq else None)
        return chosen

    @staticmethod
    def _rounded_layers(model: ir.Model, mine: dict[int, Any]) -> list[tuple[ir.Node, WeightSpec]]:
        """The annotated layers GPTQ leaves to round to nearest but the lowering quantizes (shared weights, formats
        without a grid)."""
        return [(node, spec) for node, spec in annotated_layers(model)
                if id(node) not in mine and not isinstance(layer_weight(model, node), str)]

    def _choose_or_round(self, node: ir.Node, weight: np.ndarray, spec: WeightSpec, h: _Hessian) -> np.ndarray | None:
        """GPTQ's codes for ``node`` (dequantized ``W[K, N]``), or None when its Hessian cannot be factorised (the
        codes stay round to nearest, counted)."""
        try:
            if h.drift is not None and self.gptaq_alpha > 0:
                weight = self._asymmetric_target(node, weight, h)
            return self._choose(node, weight, spec, h)
        except CholeskyError as exc:  # the codes stay round to nearest
            self.skip(node, f"GPTQ failed ({exc}): rounded to nearest")
            self.count("rtn_fallback")
            return None

    def _asymmetric_target(self, node: ir.Node, weight: np.ndarray, h: _Hessian) -> np.ndarray:
        """GPTAQ's target weights for ``node`` (:func:`~._gptq_core.asymmetric_target`); records the correction's
        size relative to the weights (dB)."""
        assert h.sum is not None and h.drift is not None and h.drift.sum is not None
        target = asymmetric_target(weight, h.sum, h.drift.sum, self.gptaq_alpha, damp=self.damp)
        self.record_layer(node, gptaq_shift_db=_db(float(np.sum((target - weight).astype(np.float64) ** 2)),
                                                   float(np.sum(weight.astype(np.float64) ** 2))))
        return target

    def _choose(self, node: ir.Node, weight: np.ndarray, spec: WeightSpec, h: _Hessian) -> np.ndarray:
        """GPTQ's codes for ``node`` into its metadata; returns them dequantized (``W[K, N]``). Columns go in
        bounded slices (GPTQ treats each output column alone given ``H``): a tied 576 x 49,152 lm_head never
        holds more than a few float64 copies of one slice."""
        fmt = get_format(spec.format)
        assert isinstance(fmt, GridFormat)
        k = weight.shape[0]
        block = spec.block_for(k)
        hessian, rows = h.sum, h.rows
        assert hessian is not None
        importance = np.diag(hessian) / max(rows, 1) if self.weighted_grid else None
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        dequantized = np.empty(weight.shape, np.float32)
        energy = {"gptq": 0.0, "rtn": 0.0, "signal": 0.0}
        factor = h.factor(self.damp, self.act_order)
        chunks = column_chunks(weight.shape)
        measured = set(range(0, len(chunks), max(1, len(chunks) // 2)))  # the error figures: at most 3 slices
        for index, cols in enumerate(chunks):
            part = weight[:, cols]
            scale, zero = fmt.grid(part, spec) if importance is None else fmt.weighted_grid(part, spec, importance)
            per_column_scale = np.repeat(scale, block, axis=1)[:, :k]  # [n, K]: each column's block grid
            per_column_zero = np.repeat(zero, block, axis=1)[:, :k].astype(np.float64)
            q = gptq_round(part.T, hessian, per_column_scale, *fmt.code_limits(spec), per_column_zero,
                           damp=self.damp, act_order=self.act_order, factor=factor).astype(np.uint8)
            parts.append((q, scale, zero))
            dequantized[:, cols] = fmt.from_codes(q, scale, zero, spec, k).dequantize()
            if index not in measured:
                continue
            rtn = fmt.from_codes(fmt.codes_on_grid(part, scale, zero, spec), scale, zero, spec, k).dequantize()
            for name, error in (("gptq", part - dequantized[:, cols]), ("rtn", part - rtn), ("signal", part)):
                e = error.astype(np.float64)
                energy[name] += float(np.sum(e * (hessian @ e)))  # tr(E^T H E), one BLAS product
        codes, scale, zero = (np.concatenate(x, axis=0) for x in zip(*parts, strict=True))
        node.meta[WEIGHT_CODES_KEY] = fmt.from_codes(codes, scale, zero, spec, k)
        self.record_layer(node, gptq_output_error_db=_db(energy["gptq"], energy["signal"]),
                          rtn_output_error_db=_db(energy["rtn"], energy["signal"]), gptq_rows=rows)
        return dequantized


class _Drift:
    """``D = sum x_q^T (x_f - x_q)`` (float64 ``[K, K]``) over the rows of every batch: how the partly quantized
    model's input ``x_q`` of a group has drifted from the float model's ``x_f`` (GPTAQ's asymmetric statistic)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sum: np.ndarray | None = None

    def update(self, activation: np.ndarray, reference: np.ndarray) -> None:
        x = activation.reshape(-1, activation.shape[-1]).astype(np.float64)
        delta = reference.reshape(-1, reference.shape[-1]).astype(np.float64) - x
        if not np.all(np.isfinite(delta)):
            raise CalibrationError(f"calibration data makes activation {self.name!r} NaN or Inf in the float or "
                                   "the quantized model: no finite statistics can be built from it")
        d = x.T @ delta
        self.sum = d if self.sum is None else self.sum + d


def _db(noise: float, signal: float) -> float:
    """``10 log10(noise / signal)`` rounded to 0.001 dB (0 for a silent layer)."""
    return round(10 * math.log10(max(noise, 1e-300) / signal), 3) if signal > 0 else 0.0


def _read_weight(model: ir.Model, node: ir.Node) -> np.ndarray | None:
    """``W[K, N]`` of a layer (checked finite), None when it has no constant float weight."""
    found = layer_weight(model, node)
    return None if isinstance(found, str) else quantized_weight(node, found[0])


def _release(node: ir.Node) -> None:
    """Unmap the layer's external weight bytes (read again from the file if needed): one weight resident at a time."""
    release_external(node.inputs[1])
    release_external(transposed_constant(node.inputs[1]))


def _rounded(weight: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """``W[K, N]`` as round to nearest in ``spec``'s format gives it back (what the lowering writes)."""
    return get_format(spec.format).quantize(weight, spec).dequantize()
