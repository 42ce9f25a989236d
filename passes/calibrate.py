"""Calibrate: measure the ranges of the annotated activations on calibration data (metadata only).

Every main-graph value whose :class:`~qcompiler.qspec.QuantSpec` names an observer is exposed as an extra output of
a weight-sharing clone (see :mod:`qcompiler.passes.observe`); ONNX Runtime runs the clone over
``CalibrationData.iter_batches(batch_size, max_samples)`` and a running observer per value folds each batch in, so
no activation is kept: MinMax keeps the exact ``min``/``max`` over all samples; "percentile", "entropy" and "mse"
keep a bounded histogram and choose a clipping range inside ``[min, max]`` for the value's spec (its dtype and
symmetric flag; see :mod:`qcompiler.calibration.estimators`). The result is written as a
:class:`~qcompiler.qspec.ValueRange` into ``value.meta["qcompiler.range"]``. A histogram observer that had to fall
back to the MinMax range (a constant tensor, too few distinct values) is counted (``minmax_fallback_<reason>``).

Constant activations (``min == max``) are stored as they are; scale computation widens every range to include 0
and floors the scale, so no NaN scale can come out. A value that never produced a finite element gets no range and
is reported (``no_finite_values``); lowering then leaves its consumers in float. ``modified`` is True when a range
was added or changed. Without calibration data the pass raises :class:`~qcompiler.errors.CalibrationError`.

With ``cache_dir`` (``[calibration] cache_dir``, ``--calib-cache DIR``) the raw statistics of every observed value
(exact min/max *and* a histogram, whatever the calibrator, so that any calibrator can be served later) are stored in
that folder under a key over the graph, the weights, the calibration batches and the observed names (see
:mod:`qcompiler.calibration.cache`). A later run with the same key loads them instead of running ONNX Runtime
(counted ``cache_hits``; a run that had to compute them counts ``cache_misses``); its ranges are bit-identical to a
fresh run's with the same calibrator. An unusable cache file is recomputed with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from qcompiler.calibration import cache
from qcompiler.errors import CalibrationError
from qcompiler.pass_manager import QPass
from qcompiler.passes.observe import observer_session, run_observers, values_to_observe
from qcompiler.qspec import ObserverSpec, get_qspec, set_range

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["CalibratePass"]

logger = logging.getLogger(__name__)


class CalibratePass(QPass):
    """Run the model on calibration data and store each observed activation's range.

    Args:
        calibration_data: a :class:`~qcompiler.calibration.data.CalibrationData` (required when the pass runs).
        max_samples: use at most this many samples (None: all).
        batch_size: samples per ONNX Runtime call.
        progress: show a tqdm progress bar over samples.
        intra_op_threads: ORT threads (None: ORT's default).
        cache_dir: a folder for cached calibration statistics (created when missing), or None for no cache.
    """

    name = "calibrate"
    stage = "calibrate"
    preserves_float = True

    def __init__(self, *, calibration_data: Any = None, max_samples: int | None = None, batch_size: int = 16,
                 progress: bool = False, intra_op_threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise CalibrationError(f"calibrate: max_samples must be a positive integer, got {max_samples!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise CalibrationError(f"calibrate: batch_size must be a positive integer, got {batch_size!r}")
        if cache_dir is not None and (not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir)):
            raise CalibrationError(f"calibrate: cache_dir must be a folder path, got {cache_dir!r}")
        self.calibration_data = calibration_data
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.progress = progress
        self.intra_op_threads = intra_op_threads
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> CalibratePass:
        """Take the data and progress flag from the build context and ``[calibration]`` from the recipe."""
        kwargs: dict[str, Any] = {
            "calibration_data": getattr(context, "calibration_data", None),
            "max_samples": recipe.calibration.max_samples,
            "batch_size": recipe.calibration.batch_size,
            "cache_dir": recipe.calibration.cache_dir,
            "progress": bool(getattr(context, "progress", False)),
        }
        kwargs.update(options)
        return cls(**kwargs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.calibration_data is None:
            raise CalibrationError("pass 'calibrate' needs calibration data: pass --calib DATA (an .npz keyed by "
                                   "the model's input names)")
        values = values_to_observe(model)
        unnamed = [v for v in values if not v.name]
        for value in unnamed:
            self.count("unnamed_value")
            logger.warning("calibrate: cannot observe an unnamed value produced by %s", value.producer())
        values = [v for v in values if v.name]
        if not values:
            logger.info("calibrate: no annotated activation needs a range")
            return ir.passes.PassResult(model, False)
        data = self.calibration_data
        total = data.num_samples if self.max_samples is None else min(self.max_samples, data.num_samples)
        names = [v.name for v in values]
        kinds = [get_qspec(v).observer for v in values]
        if self.cache_dir is None:
            fold = functools.partial(run_observers, observer=kinds)
            observers = self._observe(model, values, total, fold)
        else:
            observers = self._observe_cached(model, values, names, kinds, total)
        modified = False
        for value, name in zip(values, names, strict=True):
            observer = observers[name]
            found = observer.range(get_qspec(value))
            if found is None:
                self.count("no_finite_values")
                logger.warning("calibrate: value '%s' produced no finite element; it gets no range", name)
                continue
            found = dataclasses.replace(found, num_samples=total)
            if getattr(observer, "saw_nonfinite", False):
                self.count("nonfinite_values_clamped")
            if getattr(observer, "fallback", None):
                self.count(f"minmax_fallback_{observer.fallback}")
            if found.min == found.max:
                self.count("constant_ranges")
            modified |= set_range(value, found)
            self.count("ranges")
        self.count("samples", total)
        self._record_coverage()
        return ir.passes.PassResult(model, modified)

    def _record_coverage(self) -> None:
        """The real lengths of a text model's samples (:mod:`qcompiler.calibration.lengths`) into the report, and a
        warning when they cover one length only."""
        coverage = getattr(self.calibration_data, "coverage", None)
        summary = coverage.summary() if coverage is not None else {}
        if not summary:
            return
        for key in ("min_tokens", "max_tokens", "padding_tokens_removed", "crops", "samples_not_cut"):
            if key in summary:
                self.count(f"sample_{key}", int(summary[key]))
        warning = coverage.warning()
        if warning:
            logger.warning("calibrate: %s", warning)

    def _observe(self, model: ir.Model, values: list[ir.Value], total: int, fold: Callable[..., Any]) -> Any:
        """Run ONNX Runtime over the calibration batches and fold the observed outputs in.

        ``fold(session, output_names, batches, on_batch=...)`` is :func:`run_observers` or
        :func:`~qcompiler.calibration.cache.collect_statistics`.
        """
        session, names = observer_session(model, values, intra_op_threads=self.intra_op_threads)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="calibrate", unit="sample", leave=False)
        try:
            return fold(session, names, self.calibration_data.iter_batches(self.batch_size, self.max_samples),
                        on_batch=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
            del session

    def _observe_cached(self, model: ir.Model, values: list[ir.Value], names: list[str], kinds: list[ObserverSpec],
                        total: int) -> dict[str, Any]:
        """The observers from the cache when it holds this run's statistics, else from a run that fills it."""
        folder = cache.open_cache_dir(self.cache_dir)
        key, manifest = cache.cache_key(model, names, self.calibration_data, batch_size=self.batch_size,
                                        max_samples=self.max_samples)
        stats = cache.load_statistics(folder, key, names)
        if stats is None:
            self.count("cache_misses")
            logger.info("calibrate: no cached statistics for key %s; running ONNX Runtime", key[:16])
            stats = self._observe(model, values, total, cache.collect_statistics)
            cache.save_statistics(folder, key, names, stats, manifest)
        else:
            self.count("cache_hits")
        return {name: stats[name].observer(kind) for name, kind in zip(names, kinds, strict=True)}
