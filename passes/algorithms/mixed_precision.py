"""Automatic mixed precision: measure how much each quantized layer hurts the model's output, and leave the fewest
layers in float that meet an accuracy budget.

Sensitivity of a layer ``L``: the signal-to-quantization-noise ratio of the model's outputs when *only* ``L`` is
quantized, measured on evaluation samples (the first ``eval_samples`` of the calibration data)::

    SQNR(L) = 10 log10( sum y^2 / sum (y - y_L)^2 )     (dB; y: fp32 outputs, y_L: outputs with only L quantized)

summed over every float output and sample. Each measurement lowers a weight-sharing clone of the annotated,
calibrated model with the pipeline's own lowering pass (same options) after removing the annotation of every other
node, and runs it in ONNX Runtime, so it measures exactly what the compiled model will run.

Budget, one or both: ``min_sqnr_db`` (the SQNR of the fully lowered model's outputs must reach it) and
``max_accuracy_drop`` (the fraction of evaluation samples whose top-1 class, the argmax over the last axis of the
first output, differs from fp32, must not exceed it). The layers are ranked from the most sensitive; the pass finds
by bisection the smallest ``k`` such that leaving the first ``k`` in float meets the budget (it assumes that taking
more layers out never hurts; the chosen set is measured again to confirm), then removes those nodes' annotation so
the lowering leaves them in float. Without a budget the pass changes nothing and measures nothing.

Activation-only ops (Add, Softmax, LayerNormalization, ... annotated by ``annotate-int8``, see
:mod:`qcompiler.passes.annotate`) are screened even without a budget: with every weight layer quantized as the
pass found it (the base), each op is measured *in context* (the base plus that op) and the ops are added from the
least harmful while the model-output SQNR stays within ``activation_tolerance_db`` (default 0.5 dB, about 12% more
noise power) of the base; the rest stay in float. So a Softmax over attention probabilities or a LayerNorm input
with outlier channels stays float because it measured expensive on this model, not because of its type. In
context, an op whose inputs and output are already quantized by its neighbours (a residual Add between two Convs)
costs nothing and is kept. With a budget, the activation-only ops are ranked and chosen with the layers instead.

A float model whose own outputs hold NaN or Inf on the evaluation samples cannot be measured against: the pass
then raises :class:`~qcompiler.errors.CalibrationError`.

Cost: one lowering and one ORT session per quantized layer plus about ``log2(layers)`` full evaluations. Limits:
the evaluation samples are calibration samples (no separate held-out set); the top-1 metric only makes sense for
classifier-like outputs; layers are chosen whole (no per-layer bit widths other than int8 or float).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.errors import CalibrationError, ConfigError
from qcompiler.formats.channelwise import SQNR_CAP_DB, sqnr_from_energies
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import clone_with_meta
from qcompiler.passes._finite import require_finite
from qcompiler.passes._int8_layers import mask_bias_reason
from qcompiler.passes.annotate import clear_node_quant, is_activation_op, node_scheme

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["SelectPrecisionPass", "output_sqnr_db", "top1_disagreement"]

logger = logging.getLogger(__name__)

_LOWERINGS = {"int8-static": "lower-int8-qdq", "int8-dynamic": "lower-int8-dynamic"}


def output_sqnr_db(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """SQNR in dB of ``actual`` against ``reference`` over every float array (capped for an exact match)."""
    signal = noise = 0.0
    for ref, out in zip(reference, actual, strict=True):
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        r = ref.astype(np.float64)
        signal += float(np.vdot(r, r))
        diff = r - out.astype(np.float64)
        noise += float(np.vdot(diff, diff))
    return sqnr_from_energies(signal, noise)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """One output's batches as one array: stacked along the batch axis when their shapes agree past it, else as
    rows of the last axis (samples cut to their real lengths: :mod:`qcompiler.calibration.lengths`), else flat."""
    if len(parts) == 1 or all(p.ndim >= 1 and p.shape[1:] == parts[0].shape[1:] for p in parts):
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    if all(p.ndim >= 1 and p.shape[-1] == parts[0].shape[-1] for p in parts):
        return np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts])
    return np.concatenate([p.ravel() for p in parts])


def top1_disagreement(reference: np.ndarray, actual: np.ndarray) -> float:
    """The fraction of rows whose argmax over the last axis differs."""
    ref = reference.reshape(-1, reference.shape[-1]) if reference.ndim > 1 else reference.reshape(1, -1)
    out = actual.reshape(ref.shape)
    return float(np.mean(ref.argmax(axis=1) != out.argmax(axis=1)))


class SelectPrecisionPass(QPass):
    """Leave the most sensitive annotated layers in float until an accuracy budget is met.

    Args:
        calibration_data: the :class:`~qcompiler.calibration.data.CalibrationData` whose first samples evaluate;
            with a budget, its ``held_out`` samples when it has them (:mod:`qcompiler.calibration.holdout`: samples
            that set no range).
        min_sqnr_db: the model-output SQNR (dB) the lowered model must reach, or None.
        max_accuracy_drop: the largest allowed fraction of top-1 changes (0..1), or None.
        eval_samples: how many samples evaluate each candidate.
        batch_size: samples per ONNX Runtime call.
        lowering_options: options of each lowering pass by its name (the pipeline's own).
        activation_tolerance_db: how far (dB) the activation-only ops may lower the model-output SQNR below
            that of the weight layers alone, when no budget is given.
        screen_samples: how many samples evaluate each candidate of that screening (fewer than ``eval_samples``:
            it runs on every compile of a recipe with activation-only ops).
    """

    name = "select-precision"
    stage = "lower"
    preserves_float = True

    def __init__(self, *, calibration_data: Any = None, min_sqnr_db: float | None = None,
                 max_accuracy_drop: float | None = None, eval_samples: int = 64, batch_size: int = 16,
                 lowering_options: dict[str, dict[str, Any]] | None = None,
                 activation_tolerance_db: float = 0.5, screen_samples: int = 16) -> None:
        super().__init__()
        if isinstance(activation_tolerance_db, bool) or not isinstance(activation_tolerance_db, (int, float)) \
                or not 0 <= activation_tolerance_db < 100:
            raise ConfigError(f"{self.name}: activation_tolerance_db must be a number of dB in [0, 100), got "
                              f"{activation_tolerance_db!r}")
        self.activation_tolerance_db = float(activation_tolerance_db)
        if min_sqnr_db is not None and (isinstance(min_sqnr_db, bool) or not isinstance(min_sqnr_db, (int, float))
                                        or not math.isfinite(min_sqnr_db)):
            raise ConfigError(f"{self.name}: min_sqnr_db must be a number of dB, got {min_sqnr_db!r}")
        if max_accuracy_drop is not None and (isinstance(max_accuracy_drop, bool)
                                              or not isinstance(max_accuracy_drop, (int, float))
                                              or not 0.0 <= max_accuracy_drop < 1.0):
            raise ConfigError(f"{self.name}: max_accuracy_drop must be a fraction in [0, 1), got "
                              f"{max_accuracy_drop!r}")
        for key, value in (("eval_samples", eval_samples), ("batch_size", batch_size),
                           ("screen_samples", screen_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        self.calibration_data = calibration_data
        self.min_sqnr_db = None if min_sqnr_db is None else float(min_sqnr_db)
        self.max_accuracy_drop = None if max_accuracy_drop is None else float(max_accuracy_drop)
        self.eval_samples = eval_samples
        self.screen_samples = screen_samples
        self.batch_size = batch_size
        self.lowering_options = dict(lowering_options or {})

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> SelectPrecisionPass:
        """Data from the build context; the budget from ``[quantization]``; the lowerings' options from the recipe."""
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None),
            "lowering_options": {name: recipe.options_for(name) for name in _LOWERINGS.values()},
            "min_sqnr_db": recipe.quantization.min_sqnr_db,
            "max_accuracy_drop": recipe.quantization.max_accuracy_drop,
        }
        kwargs.update(options)
        return cls(**kwargs)

    @property
    def has_budget(self) -> bool:
        return self.min_sqnr_db is not None or self.max_accuracy_drop is not None

    # -- measuring --------------------------------------------------------------------------------------------
    def _lowering(self, scheme: str) -> QPass:
        from qcompiler.plugins import load_pass_class

        name = _LOWERINGS[scheme]
        return load_pass_class(name)(**self.lowering_options.get(name, {}))

    def _run(self, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        session = io.ort_session(model)
        batches = [session.run(None, feed) for feed in feeds]
        return [_join([b[i] for b in batches]) for i in range(len(batches[0]))]

    def _float_reference(self, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """The float model's outputs on the evaluation samples; a CalibrationError if a float output is not finite
        (no SQNR can be measured against Inf or NaN)."""
        reference = self._run(model, feeds)
        for array, value in zip(reference, model.graph.outputs, strict=True):
            if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                raise CalibrationError(f"pass '{self.name}': the float model's output {value.name!r} holds NaN or Inf "
                                       "on the calibration samples, so the accuracy of quantized layers cannot be "
                                       "measured (check the calibration data and the model's weights)")
        return reference

    def _quantized_outputs(self, model: ir.Model, quantized: set[int], feeds: list[dict[str, np.ndarray]]
                           ) -> list[np.ndarray]:
        """The outputs of a clone of ``model`` in which only the nodes at the positions ``quantized`` are lowered."""
        clone = clone_with_meta(model)  # same node order and metadata, shared weights
        schemes = set()
        for index, node in enumerate(clone.graph):
            scheme = node_scheme(node)
            if scheme is None:
                continue
            if index in quantized:
                schemes.add(scheme)
            else:
                clear_node_quant(node)
        for scheme in sorted(schemes):
            self._lowering(scheme)(clone)
        return self._run(clone, feeds)

    def _meets(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[bool, float, float]:
        sqnr = output_sqnr_db(reference, outputs)
        drop = top1_disagreement(reference[0], outputs[0])
        ok = (self.min_sqnr_db is None or sqnr >= self.min_sqnr_db) and \
             (self.max_accuracy_drop is None or drop <= self.max_accuracy_drop)
        return ok, sqnr, drop

    # -- the pass ---------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        candidates = [n for n in model.graph if node_scheme(n) in _LOWERINGS]
        activation_ops = [n for n in candidates if is_activation_op(n)]
        if not self.has_budget and not activation_ops:
            return ir.passes.PassResult(model, False)
        if self.calibration_data is None:
            what = "the accuracy budget" if self.has_budget else "the activation-only ops"
            raise CalibrationError(f"pass '{self.name}' needs calibration data to measure {what}")
        if not candidates:
            return ir.passes.PassResult(model, False)
        for node in candidates:  # a NaN weight is named here, before it turns every measured output into NaN
            if not is_activation_op(node) and len(node.inputs) > 1 and node.inputs[1] is not None and \
                    node.inputs[1].const_value is not None:
                require_finite(node.inputs[1].const_value.numpy(), node.inputs[1].name, node.name)
                if node_scheme(node) == "int8-static":
                    mask_bias_reason(node)  # a NaN bias (an int32 one) raises by name; a +-inf one stays float
        position = {node: i for i, node in enumerate(model.graph)}
        if not self.has_budget:
            feeds = list(self.calibration_data.iter_batches(self.batch_size, self.screen_samples))
            return self._screen_activation_ops(model, candidates, activation_ops, position, feeds)
        judge = getattr(self.calibration_data, "held_out", None) or self.calibration_data  # not the range setters
        feeds = list(judge.iter_batches(self.batch_size, self.eval_samples))
        reference = self._float_reference(model, feeds)
        sensitivity = {node: output_sqnr_db(reference, self._quantized_outputs(model, {position[node]}, feeds))
                       for node in candidates}
        ranked = sorted(candidates, key=lambda n: (sensitivity[n], position[n]))

        measured: dict[int, tuple[bool, float, float]] = {}

        def measure(k: int) -> tuple[bool, float, float]:
            if k not in measured:
                kept = {position[n] for n in ranked[k:]}
                measured[k] = self._meets(reference, self._quantized_outputs(model, kept, feeds))
            return measured[k]

        measured[len(ranked)] = (True, SQNR_CAP_DB, 0.0)  # leaving all in float always meets the budget
        k = _first_true(lambda i: measure(i)[0], 0, len(ranked))
        kept_float = set(ranked[:k])
        ok, sqnr, drop = measure(k)
        for node in candidates:
            self.record_layer(node, sensitivity_sqnr_db=round(sensitivity[node], 3),
                              sensitivity_rank=ranked.index(node) + 1, kept_float=node in kept_float)
            if node in kept_float:
                clear_node_quant(node)
                self.skip(node, "left in float to meet the accuracy budget")
        self.count("layers_measured", len(candidates))
        self.count("layers_kept_float", len(kept_float))
        self.count("evaluations", len(measured) - 1 + len(candidates))
        samples = sum(len(next(iter(feed.values()))) for feed in feeds)
        self.stats.layers["(whole model)"] = {
            "op_type": "model", "output_sqnr_db": round(sqnr, 3), "top1_disagreement": round(drop, 4),
            "all_quantized_sqnr_db": round(measure(0)[1], 3), "eval_samples": samples,
            "held_out": judge is not self.calibration_data}
        logger.info("select-precision: %d of %d layers left in float; output SQNR %.2f dB, top-1 changes %.3f",
                    len(kept_float), len(candidates), sqnr, drop)
        return ir.passes.PassResult(model, bool(kept_float))

    def _screen_activation_ops(self, model: ir.Model, candidates: list[ir.Node], activation_ops: list[ir.Node],
                               position: dict[ir.Node, int], feeds: list[dict[str, np.ndarray]]
                               ) -> ir.passes.PassResult:
        """Keep the activation-only ops that, added to the weight layers, cost at most the tolerance (no budget)."""
        reference = self._float_reference(model, feeds)
        base = {position[n] for n in candidates if not is_activation_op(n)}
        base_sqnr = output_sqnr_db(reference, self._quantized_outputs(model, base, feeds)) if base else SQNR_CAP_DB
        in_context = {n: output_sqnr_db(reference, self._quantized_outputs(model, base | {position[n]}, feeds))
                      for n in activation_ops}
        ranked = sorted(activation_ops, key=lambda n: (-in_context[n], position[n]))  # least harmful first
        floor = base_sqnr - self.activation_tolerance_db
        measured: dict[int, float] = {0: base_sqnr}

        def sqnr_with(k: int) -> float:
            if k not in measured:
                chosen = base | {position[n] for n in ranked[:k]}
                measured[k] = output_sqnr_db(reference, self._quantized_outputs(model, chosen, feeds))
            return measured[k]

        # the largest k whose first k ops stay above the floor (the ops are added from the least harmful)
        k = len(ranked) - _first_true(lambda i: sqnr_with(len(ranked) - i) >= floor, 0, len(ranked))
        kept = set(ranked[:k])
        for node in activation_ops:
            self.record_layer(node, sensitivity_sqnr_db=round(in_context[node], 3),
                              sensitivity_rank=len(ranked) - ranked.index(node), kept_float=node not in kept,
                              role="activations")
            if node not in kept:
                clear_node_quant(node)
                self.skip(node, f"activation-only op left in float: costs more than "
                                f"{self.activation_tolerance_db:g} dB of output SQNR")
        self.count("activation_ops_measured", len(activation_ops))
        self.count("activation_ops_kept_float", len(activation_ops) - len(kept))
        self.count("evaluations", len(measured) + len(activation_ops) - (0 if base else 1))
        samples = sum(len(next(iter(feed.values()))) for feed in feeds)
        self.stats.layers["(whole model)"] = {
            "op_type": "model", "output_sqnr_db": round(sqnr_with(k), 3), "weight_layers_sqnr_db": round(base_sqnr, 3),
            "eval_samples": samples}
        logger.info("select-precision: %d of %d activation-only ops left in float; output SQNR %.2f dB "
                    "(weight layers alone %.2f dB)", len(activation_ops) - len(kept), len(activation_ops),
                    sqnr_with(k), base_sqnr)
        return ir.passes.PassResult(model, len(kept) < len(activation_ops))


def _first_true(predicate: Any, low: int, high: int) -> int:
    """The smallest ``i`` in ``[low, high]`` with ``predicate(i)``, assuming it is monotone and true at ``high``."""
    if predicate(low):
        return low
    while high - low > 1:
        mid = (low + high) // 2
        if predicate(mid):
            high = mid
        else:
            low = mid
    return high
