"""Never slower than float: leave in float the int8-annotated layers that ONNX Runtime would run slower in int8.

The pass runs after ``select-precision`` (accuracy decides first) and before ``lower-int8-qdq``. It groups the
``int8-static`` layers into units (:mod:`._speed_cost`: conv regions, which ORT runs in NHWC with Transposes at
their borders, and standalone MatMul/Gemm layers) and decides each unit int8 or float:

- ``mode = "cost"`` (the default): by the cost model of :mod:`._speed_cost` (multiply-adds per image of a conv
  region, per run of a MatMul at ``batch``), calibrated on ORT 1.32. Deterministic: a function of the shapes only,
  so compiled outputs are reproducible byte for byte.
- ``mode = "measure"``: starting from the cost model's plan, one sweep over the units: the whole model is lowered
  twice (this unit int8, this unit float, the others as planned) and both are timed in ONNX Runtime on this
  machine (CPU, ``threads`` intra-op threads, a batch of ``batch`` calibration samples, interleaved rounds,
  medians); the unit stays int8 unless float is faster by more than ``margin``. Timings are cached on disk
  (``cache_dir``, default ``$QCOMPILER_CACHE/speed`` or ``~/.cache/qcompiler/speed``), keyed by the model's
  structure (op types, names, shapes; not the weights), the plan, the batch, the thread count, ORT's version and
  the CPU, so a rerun on the same machine decides the same without timing. Units left when ``time_budget_s`` is
  spent keep the cost model's decision (counted). A run is not reproducible across machines or loads by nature:
  pin a decision with the cache, or use the cost model.

A plan that would leave *every* unit float (a model too small for int8 to pay off anywhere, e.g. a tiny CNN at batch
1) is overruled: the layers stay int8, since the recipe asks for int8 and the weights get 4x smaller, with a warning
and the reason in the report; ``allow_all_float = true`` keeps such a model float.

Each annotated layer of a unit gets report figures ``speed`` (int8/float), ``speed_reason`` and, when measured,
``speed_int8_ms`` and ``speed_float_ms``; a unit left float is also counted as a skip with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.errors import ConfigError
from qcompiler.pass_manager import QPass
from qcompiler.passes._common import clone_with_meta
from qcompiler.passes.algorithms import _speed_cost
from qcompiler.passes.algorithms._speed_cost import SpeedUnit, cost_decision, find_units
from qcompiler.passes.annotate import clear_node_quant

if TYPE_CHECKING:
    from qcompiler.config import Recipe

__all__ = ["SelectSpeedPass", "MODES", "default_cache_dir"]

logger = logging.getLogger(__name__)

MODES = ("cost", "measure")
_LOWERING = "lower-int8-qdq"


def default_cache_dir() -> Path:
    """``$QCOMPILER_CACHE/speed``, else ``~/.cache/qcompiler/speed``."""
    root = os.environ.get("QCOMPILER_CACHE")
    return Path(root) / "speed" if root else Path.home() / ".cache" / "qcompiler" / "speed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _structure(model: ir.Model) -> str:
    """A digest of what the speed depends on: op types, names, attributes' names, shapes; not the weights."""
    digest = hashlib.sha256()
    for node in model.graph:
        digest.update(f"{node.domain}:{node.op_type}:{node.name}:{sorted(node.attributes)}".encode())
        for value in [*node.inputs, *node.outputs]:
            digest.update(b"|" if value is None else f"{value.name}{value.shape}{value.dtype}".encode())
    return digest.hexdigest()


class SelectSpeedPass(QPass):
    """Leave in float the int8 units that would run slower than float in ONNX Runtime (see the module docstring).

    Args:
        mode: ``"cost"`` (the cost model) or ``"measure"`` (time the model in ORT, cached).
        batch: the batch the decision is for: a symbolic batch dimension counts as this many rows (cost model), and
            measurement runs batches of this many samples.
        min_conv_macs: multiply-adds per image from which a conv region runs int8 (cost model; None:
            ``_speed_cost.DEFAULT_MIN_CONV_MACS``, read when the pass is built).
        min_matmul_macs: multiply-adds per run from which a MatMul/Gemm runs int8 (cost model; None:
            ``_speed_cost.DEFAULT_MIN_MATMUL_MACS``).
        time_budget_s: the most seconds measurement may take; the remaining units keep the cost model's choice.
        threads: ORT intra-op threads while measuring (None: ORT's default).
        margin: float is chosen only when faster than int8 by more than this fraction (timing noise).
        cache_dir: the timing cache folder (None: :func:`default_cache_dir`).
        calibration_data: the samples measurement runs on (``mode = "measure"`` only).
        lowering_options: the options of ``lower-int8-qdq`` (the pipeline's own), for the measured variants.
    """

    name = "select-speed"
    stage = "calibrate"  # listed among the calibrate passes, before GPTQ: no codes are made for float layers
    preserves_float = True

    def __init__(self, *, mode: str = "cost", batch: int = 1, min_conv_macs: int | None = None,
                 min_matmul_macs: int | None = None, time_budget_s: float = 60.0,
                 threads: int | None = None, margin: float = 0.03, cache_dir: str | None = None,
                 allow_all_float: bool = False, calibration_data: Any = None,
                 lowering_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(allow_all_float, bool):
            raise ConfigError(f"{self.name}: allow_all_float must be true or false, got {allow_all_float!r}")
        self.allow_all_float = allow_all_float
        min_conv_macs = _speed_cost.DEFAULT_MIN_CONV_MACS if min_conv_macs is None else min_conv_macs
        min_matmul_macs = _speed_cost.DEFAULT_MIN_MATMUL_MACS if min_matmul_macs is None else min_matmul_macs
        if mode not in MODES:
            raise ConfigError(f"{self.name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        for key, value, low in (("batch", batch, 1), ("min_conv_macs", min_conv_macs, 0),
                                ("min_matmul_macs", min_matmul_macs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{self.name}: {key} must be an integer of at least {low}, got {value!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"{self.name}: threads must be a positive integer, got {threads!r}")
        for key, value, high in (("time_budget_s", time_budget_s, 1e6), ("margin", margin, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise ConfigError(f"{self.name}: {key} must be a number in [0, {high:g}], got {value!r}")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise ConfigError(f"{self.name}: cache_dir must be a folder path, got {cache_dir!r}")
        self.mode, self.batch, self.threads = mode, batch, threads
        self.min_conv_macs, self.min_matmul_macs = min_conv_macs, min_matmul_macs
        self.time_budget_s, self.margin = float(time_budget_s), float(margin)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.calibration_data = calibration_data
        self.lowering_options = dict(lowering_options or {})

    @classmethod
    def from_recipe(cls, recipe: Recipe, context: Any, **options: Any) -> SelectSpeedPass:
        """The data and the lowering's options are read only for ``mode = "measure"``."""
        if options.get("mode") == "measure":
            options.setdefault("calibration_data", getattr(context, "calibration_data", None))
            options.setdefault("lowering_options", recipe.options_for(_LOWERING))
        return cls(**options)

    # -- the pass ---------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        units = find_units(model, batch=self.batch)
        if not units:
            return ir.passes.PassResult(model, False)
        plan = [cost_decision(u, min_conv_macs=self.min_conv_macs, min_matmul_macs=self.min_matmul_macs,
                              batch=self.batch) for u in units]
        timings: list[tuple[float, float] | None] = [None] * len(units)
        if self.mode == "measure":
            if self.calibration_data is None:
                logger.warning("select-speed: mode 'measure' needs calibration data; the cost model decides")
            else:
                self._measure(model, units, plan, timings)
        if not self.allow_all_float and not any(int8 for int8, _ in plan):
            logger.warning("select-speed: ONNX Runtime would run every int8 layer of this model slower than float; "
                           "they stay int8 because the recipe asks for int8 (smaller weights). "
                           "[pass-options.select-speed] allow_all_float = true keeps such a model float")
            plan = [(True, f"int8 although slower here ({reason}): every layer would stay float, and the recipe "
                           "asks for int8 (allow_all_float = true keeps them float)") for _, reason in plan]
            self.count("all_float_overruled")
        modified = False
        for unit, (int8, reason), timed in zip(units, plan, timings, strict=True):
            figures: dict[str, Any] = {"speed": "int8" if int8 else "float", "speed_reason": reason}
            if timed is not None:
                figures.update(speed_int8_ms=round(timed[0] * 1e3, 4), speed_float_ms=round(timed[1] * 1e3, 4))
            for node in unit.nodes:
                self.record_layer(node, **figures)
                if not int8:
                    modified |= clear_node_quant(node)
                    self.skip(node, "left in float: int8 would run slower in ONNX Runtime (speed_reason in the layers)")
        kept = [u for u, (int8, _) in zip(units, plan, strict=True) if not int8]
        self.count("units", len(units))
        self.count("units_kept_float", len(kept))
        self.count("layers_kept_float", sum(len(u.nodes) for u in kept))
        logger.info("select-speed (%s, batch %d): %d of %d units left in float", self.mode, self.batch, len(kept),
                    len(units))
        return ir.passes.PassResult(model, modified)

    # -- measuring --------------------------------------------------------------------------------------------
    def _feeds(self) -> dict[str, np.ndarray]:
        feed = next(iter(self.calibration_data.iter_batches(self.batch, self.batch)))
        out = {}
        for name, array in feed.items():
            if array.ndim and array.shape[0] < self.batch and not self.calibration_data.fixed_batch:
                reps = -(-self.batch // array.shape[0])
                array = np.concatenate([array] * reps)[: self.batch]
            out[name] = array
        return out

    def _measure(self, model: ir.Model, units: list[SpeedUnit], plan: list[tuple[bool, str]],
                 timings: list[tuple[float, float] | None]) -> None:
        start = time.perf_counter()
        feeds = self._feeds()
        folder = self.cache_dir or default_cache_dir()
        base_key = {"structure": _structure(model), "batch": self.batch, "threads": self.threads,
                    "ort": _ort_version(), "cpu": _cpu_name(), "lowering": sorted(self.lowering_options.items()),
                    "feeds": sorted((k, list(v.shape), str(v.dtype)) for k, v in feeds.items())}
        for i, unit in enumerate(units):
            if time.perf_counter() - start > self.time_budget_s:
                self.count("units_not_measured", len(units) - i)
                for j in range(i, len(units)):
                    plan[j] = (plan[j][0], plan[j][1] + " (not measured: time budget spent)")
                break
            chosen = [int8 for int8, _ in plan]
            key = hashlib.sha256(json.dumps({**base_key, "plan": chosen, "unit": i}, default=str).encode()).hexdigest()
            cached = _read_cache(folder / f"{key}.json")
            if cached is None:
                int8_plan, float_plan = list(chosen), list(chosen)
                int8_plan[i], float_plan[i] = True, False
                t_int8, t_float = time_variants(self._variant(model, units, int8_plan),
                                                self._variant(model, units, float_plan), feeds, threads=self.threads)
                _write_cache(folder / f"{key}.json", t_int8, t_float)
                self.count("units_measured")
            else:
                t_int8, t_float = cached
                self.count("units_from_cache")
            timings[i] = (t_int8, t_float)
            int8 = t_float * (1 + self.margin) >= t_int8
            plan[i] = (int8, f"measured {unit.label}: int8 {t_int8 * 1e3:.3f} ms, float {t_float * 1e3:.3f} ms "
                             f"for the whole model at batch {self.batch}"
                             + ("" if int8 else f": float faster by more than {self.margin:.0%}"))
        self.count("measure_ms", round((time.perf_counter() - start) * 1e3))

    def _variant(self, model: ir.Model, units: list[SpeedUnit], chosen: list[bool]) -> ir.Model:
        """A lowered weight-sharing clone in which only the units chosen int8 are quantized."""
        from qcompiler.plugins import load_pass_class

        clone = clone_with_meta(model)
        index = {node: i for i, node in enumerate(model.graph)}
        clone_nodes = list(clone.graph)
        for unit, int8 in zip(units, chosen, strict=True):
            if not int8:
                for node in unit.nodes:
                    clear_node_quant(clone_nodes[index[node]])
        load_pass_class(_LOWERING)(**self.lowering_options)(clone)
        return clone


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def time_variants(model_a: ir.Model, model_b: ir.Model, feeds: dict[str, np.ndarray], *, threads: int | None,
                  rounds: int = 7, round_s: float = 0.05) -> tuple[float, float]:
    """Median seconds per run of two models in ORT on ``feeds``: warmed up, then ``rounds`` interleaved rounds of
    about ``round_s`` seconds each."""
    sessions = [io.ort_session(m, intra_op_threads=threads) for m in (model_a, model_b)]
    for session in sessions:
        for _ in range(3):
            session.run(None, feeds)
    once = time.perf_counter()
    sessions[0].run(None, feeds)
    per_round = max(1, min(200, int(round_s / max(time.perf_counter() - once, 1e-6))))
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for which, session in enumerate(sessions):
            for _ in range(per_round):
                begin = time.perf_counter()
                session.run(None, feeds)
                times[which].append(time.perf_counter() - begin)
    return float(np.median(times[0])), float(np.median(times[1]))


def _read_cache(path: Path) -> tuple[float, float] | None:
    from qcompiler.runtime._safe_files import opened_regular

    try:
        with opened_regular(path, "r", what="speed cache entry") as file:
            data = json.load(file)
        return float(data["int8_s"]), float(data["float_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, t_int8: float, t_float: float) -> None:
    from qcompiler.errors import QCompileError
    from qcompiler.io_write import write_bytes_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps({"int8_s": t_int8, "float_s": t_float}).encode(), what="speed cache")
    except (OSError, QCompileError) as exc:
        logger.warning("select-speed: timing not cached (%s)", exc)
