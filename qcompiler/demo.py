"""``qcompile demo``: compile the shipped digits CNN with both int8 recipes and compare it with fp32.

The model (``qcompiler.models/digits_cnn.onnx``, made by ``models/make_digits_cnn.py``) is a small CNN trained on
the first 1,300 of scikit-learn's 8x8 handwritten digits; ``digits.npz`` holds 200 of those training digits for
calibration (``calib_x``) and the 497 held-out digits with their labels (``test_x``, ``test_y``), so calibration
and evaluation never overlap. The demo copies the model into a work folder, writes the calibration file, compiles it
with :func:`qcompiler.api.compile_model` (recipe ``int8-dynamic``, then ``int8`` with calibration), and runs the
three models in ONNX Runtime on the CPU with 2 intra-op threads: accuracy on the held-out digits, top-1 agreement
with fp32, size on disk, median latency at batch 1 and over the whole test set (interleaved runs after warm-up, so
the ratios are fair on a noisy machine; absolute times are not comparable across machines), and compile time.

Needs only numpy and onnxruntime at run time (no torch, no scikit-learn). Prints nothing: the CLI prints
:meth:`DemoResult.to_table`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoRow", "DemoResult", "run_demo", "INTRA_OP_THREADS"]

logger = logging.getLogger(__name__)

INTRA_OP_THREADS = 2
_MODEL = "digits_cnn.onnx"
_DATA = "digits.npz"
# (row label, recipe, needs calibration)
_RECIPES = (("int8-dynamic", "int8-dynamic", False), ("int8 (static, calibrated)", "int8", True))


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One model of the demo. Latencies are medians in seconds; NaN where the model could not be made or run."""

    name: str
    recipe: str | None
    path: Path | None
    accuracy: float = float("nan")
    agreement: float = float("nan")
    size_bytes: int = 0
    latency_b1_s: float = float("nan")
    latency_all_s: float = float("nan")
    compile_s: float = float("nan")
    error: str = ""


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """The demo's rows (fp32 first), the test-set size, and the work folder (None when it was temporary)."""

    rows: tuple[DemoRow, ...]
    n_test: int
    n_calib: int
    workdir: Path | None

    @property
    def ok(self) -> bool:
        """True when every model compiled and ran."""
        return not any(row.error for row in self.rows)

    def row(self, name: str) -> DemoRow:
        """The row called ``name`` (``fp32``, ``int8-dynamic``, ``int8 (static, calibrated)``)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def to_table(self) -> str:
        """A markdown table (readable as plain text) with a title line and notes."""
        base = self.rows[0]
        lines = [
            f"qcompile demo: digits CNN (8x8 handwritten digits), {self.n_test} held-out digits, calibrated on "
            f"{self.n_calib} training digits; ONNX Runtime CPU, {INTRA_OP_THREADS} threads",
            "",
            f"| model | accuracy | agrees with fp32 | size | latency batch 1 | latency batch {self.n_test} "
            "| compile |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            if row.error:
                lines.append(f"| {row.name} | failed: {row.error.replace('|', '/')} | | | | | |")
                continue
            size = f"{row.size_bytes / 1e3:.1f} KB ({row.size_bytes / base.size_bytes:.2f}x)"
            b1 = f"{_fmt_time(row.latency_b1_s)} ({row.latency_b1_s / base.latency_b1_s:.2f}x)"
            full = f"{_fmt_time(row.latency_all_s)} ({row.latency_all_s / base.latency_all_s:.2f}x)"
            compiled = "–" if row.recipe is None else f"{row.compile_s:.2f} s"
            lines.append(f"| {row.name} | {row.accuracy:.2%} | {row.agreement:.2%} | {size} | {b1} | {full} "
                         f"| {compiled} |")
        lines.append("")
        lines.append("(ratios) are to fp32 in this run; latency is the median of interleaved runs.")
        if self.workdir is not None:
            lines.append(f"models kept in {self.workdir}")
        return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.2f} ms"


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = INTRA_OP_THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_times(runners: dict[str, Callable[[], Any]], *, runs: int, rounds: int = 5) -> dict[str, float]:
    """Median per-run time of each runner, warmed up, interleaved over ``rounds`` rounds of ``runs // rounds``."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        for _ in range(3):
            run()
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


@contextlib.contextmanager
def _quiet_logs(quiet: bool) -> Iterator[None]:
    package = logging.getLogger("qcompiler")
    previous = package.level
    if quiet:
        package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package.setLevel(previous)


def run_demo(workdir: Path | None = None, *, quiet: bool = False) -> DemoResult:
    """Compile the shipped digits CNN with ``int8-dynamic`` and ``int8`` and compare both with fp32.

    Args:
        workdir: folder where the copied model, the calibration file and the compiled models are kept (created if
            missing); ``None`` uses a temporary folder that is removed afterwards.
        quiet: silence qcompiler's info-level log messages while compiling.

    Returns:
        A :class:`DemoResult`; a recipe that fails to compile or run is reported in its row (``error``) rather than
        raised, so the other rows still show.
    """
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return _run(workdir, quiet=quiet, keep=True)
    with tempfile.TemporaryDirectory(prefix="qcompile-demo-") as tmp:
        return _run(Path(tmp), quiet=quiet, keep=False)


def _run(folder: Path, *, quiet: bool, keep: bool) -> DemoResult:
    from qcompiler.api import compile_model

    shipped = importlib.resources.files("qcompiler.models")
    model_path = folder / _MODEL
    with importlib.resources.as_file(shipped / _MODEL) as source:
        shutil.copyfile(source, model_path)
    with importlib.resources.as_file(shipped / _DATA) as source, np.load(source, allow_pickle=False) as data:
        calib_x = np.asarray(data["calib_x"], dtype=np.float32)
        test_x = np.asarray(data["test_x"], dtype=np.float32)
        test_y = np.asarray(data["test_y"])
    calib_path = folder / "digits_calib.npz"
    np.savez(calib_path, x=calib_x)

    rows: list[dict[str, Any]] = [{"name": "fp32", "recipe": None, "path": model_path,
                                   "size_bytes": model_path.stat().st_size}]
    for label, recipe, calibrated in _RECIPES:
        output = folder / f"digits_cnn.{recipe}.q.onnx"
        row: dict[str, Any] = {"name": label, "recipe": recipe, "path": None}
        rows.append(row)
        start = time.perf_counter()
        try:
            with _quiet_logs(quiet):
                result = compile_model(model_path, output, recipe=recipe, calib=calib_path if calibrated else None)
        except Exception as exc:  # noqa: BLE001 - shown in the table; the other recipes still run
            logger.warning("demo: recipe %s failed: %s", recipe, exc)
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            continue
        row.update(path=output, compile_s=time.perf_counter() - start, size_bytes=result.output_bytes)

    sessions: dict[str, Any] = {}
    reference: np.ndarray | None = None
    for row in rows:
        if row.get("path") is None:
            continue
        try:
            session = _session(row["path"])
            logits = session.run(None, {"x": test_x})[0]
        except Exception as exc:  # noqa: BLE001 - a model ONNX Runtime refuses is a result too
            row["error"] = f"onnxruntime: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            continue
        predicted = logits.argmax(axis=1)
        if reference is None:
            reference = predicted
        row["accuracy"] = float((predicted == test_y).mean())
        row["agreement"] = float((predicted == reference).mean())
        sessions[row["name"]] = session

    one = test_x[:1]
    b1 = _median_times({name: (lambda s=s: s.run(None, {"x": one})) for name, s in sessions.items()}, runs=300)
    full = _median_times({name: (lambda s=s: s.run(None, {"x": test_x})) for name, s in sessions.items()}, runs=40)
    for row in rows:
        if row["name"] in sessions:
            row["latency_b1_s"], row["latency_all_s"] = b1[row["name"]], full[row["name"]]
        if not keep:
            row["path"] = None
    return DemoResult(tuple(DemoRow(**row) for row in rows), n_test=len(test_y), n_calib=len(calib_x),
                      workdir=folder if keep else None)
