"""``qcompile demo``: compile the shipped digits CNN with both int8 recipes and compare it with fp32.

The model (``qcompiler.models/digits_cnn.onnx``, made by ``models/make_digits_cnn.py``) is a small CNN trained on
the first 1,300 of scikit-learn's 8x8 handwritten digits; ``digits.npz`` holds 200 of those training digits for
calibration (``calib_x``) and the 497 held-out digits with their labels (``test_x``, ``test_y``), so calibration
and evaluation never overlap. The demo copies the model into a work folder, writes the calibration file, compiles it
with :func:`qcompiler.api.compile_model` (recipe ``int8-dynamic``, then ``int8`` with calibration twice: for batch 1,
the default, and for the whole test set, through ``select-speed``'s ``batch`` option), and runs the models in ONNX
Runtime on the CPU with 2 intra-op threads: accuracy on the held-out digits, top-1 agreement with fp32, size on disk,
median latency at batch 1 and over the whole test set (interleaved runs after warm-up, so the ratios are fair on a
noisy machine; absolute times are not comparable across machines), and compile time.

Why a row is or is not faster is said under the table: the kernels ONNX Runtime's optimised graph runs for it
(:mod:`qcompiler.ort_kernels`) and what ``select-speed`` kept in float and why. This CNN is tiny (23 K
multiply-adds per image in its convolutions, 7 us per digit at batch 1): ORT runs int8 convolutions in NHWC with a
cost per image that only pays off from about 3 M multiply-adds per image, and at batch 1 its fixed cost per kernel
(about 0.7 us) is most of the time, so the static recipe keeps the convolutions float, and at batch 1 everything.

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
_NOISE = 1.05  # a latency ratio above this is called slower in the notes
_MODEL = "digits_cnn.onnx"
_DATA = "digits.npz"
# (row label, recipe, needs calibration, select-speed's batch: None for the recipe's, 0 for the test set's size)
_RECIPES = (("int8-dynamic", "int8-dynamic", False, None), ("int8 (static, for batch 1)", "int8", True, 1),
            ("int8 (static, for batch {n})", "int8", True, 0))


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
    kernels: str = ""  # what ORT's optimised graph runs (qcompiler.ort_kernels), one line
    why: str = ""  # select-speed's decisions, one line


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
        lines.append("(ratios) are to fp32 in this run; latency is the median of interleaved runs (on a busy machine "
                     f"differences under {_NOISE - 1:.0%} are noise).")
        lines += ["", "Why (what ONNX Runtime runs; what select-speed kept float):"]
        for row in self.rows:
            if not row.error and (row.kernels or row.why):
                lines.append(f"- {row.name}: {row.kernels or '-'}" + (f"; {row.why}" if row.why else ""))
                slower = [f"batch {size}" for size, mine, theirs in ((1, row.latency_b1_s, base.latency_b1_s),
                          (self.n_test, row.latency_all_s, base.latency_all_s)) if mine > theirs * _NOISE]
                if slower and row is not base:
                    lines.append(f"  slower than fp32 at {' and '.join(slower)}: {_why_slower(row, base)}")
        if self.workdir is not None:
            lines.append(f"models kept in {self.workdir}")
        return "\n".join(lines)


def _why_slower(row: DemoRow, base: DemoRow) -> str:
    """One sentence on why ``row`` ran slower than fp32 (from the kernel lists; the demo's model is tiny)."""
    mine, theirs = _kernel_count(row.kernels), _kernel_count(base.kernels)
    if row.kernels == base.kernels:
        return "the same kernels as fp32: timing noise"
    if mine > theirs:
        return (f"ORT runs {mine} kernels against {theirs} for fp32, and at ~7 us per digit ORT's fixed cost per "
                "kernel (~0.7 us) outweighs what int8 saves (select-speed, deciding for batch 1, keeps them float)")
    return ("its integer kernels cost more than the float ones at this size: ORT's fixed cost per kernel dominates "
            "a model of ~7 us per digit")


def _kernel_count(line: str) -> int:
    return sum(int(part.split()[0]) for part in line.split(", ") if part and part.split()[0].isdigit())


def _speed_summary(result: Any) -> str:
    """``select-speed``'s decisions of a compile, one line: the float units with their reason."""
    for record in result.report.passes:
        if record.name != "select-speed":
            continue
        reasons: dict[str, list[str]] = {}
        for layer, figures in record.stats.layers.items():
            if figures.get("speed") == "float":
                reasons.setdefault(str(figures.get("speed_reason", "")), []).append(layer)
        kept = sum(len(v) for v in reasons.values())
        if not kept:
            return f"select-speed kept every layer int8 ({len(record.stats.layers)})"
        parts = [f"{', '.join(layers)}: {reason.split(':')[0]}: {reason.split(': ', 1)[-1].split(',')[0]}"
                 for reason, layers in reasons.items()]
        return f"select-speed kept {kept} of {len(record.stats.layers)} layers float ({'; '.join(parts)})"
    return ""


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
    """Info messages off when ``quiet``; the compile checks' warnings always (a row left all float on purpose would
    warn that nothing was quantized: the table says why instead)."""
    package, checks = logging.getLogger("qcompiler"), logging.getLogger("qcompiler._checks")
    previous = package.level, checks.level
    if quiet:
        package.setLevel(logging.WARNING)
    checks.setLevel(logging.ERROR)
    try:
        yield
    finally:
        package.setLevel(previous[0])
        checks.setLevel(previous[1])


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


def _recipe(name: str, batch: int | None, n_test: int) -> Any:
    """The recipe ``name``, with ``select-speed`` deciding for ``batch`` samples (0: ``n_test``) when given."""
    if batch is None:
        return name
    from types import MappingProxyType

    from qcompiler.config import load_recipe

    base = load_recipe(name)
    options = {k: dict(v) for k, v in base.pass_options.items()}
    options.setdefault("select-speed", {})["batch"] = batch or n_test
    options["select-speed"]["allow_all_float"] = True  # the demo shows what speed alone decides, even all float
    return dataclasses.replace(base, pass_options=MappingProxyType(
        {k: MappingProxyType(v) for k, v in options.items()}))


def _add_kernels(rows: list[dict[str, Any]]) -> None:
    """Each row's ``kernels``: what ORT's optimised graph runs (a model ORT refuses is left to the run below)."""
    from qcompiler import io
    from qcompiler.ort_kernels import inspect_kernels

    for row in rows:
        if row.get("path") is None:
            continue
        try:
            row["kernels"] = inspect_kernels(io.load_model(row["path"]), threads=INTRA_OP_THREADS).one_line()
        except Exception as exc:  # noqa: BLE001 - the row still runs; its error shows there
            logger.warning("demo: could not inspect %s: %s", row["path"], exc)


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
    for label, recipe, calibrated, batch in _RECIPES:
        label = label.format(n=len(test_y))
        suffix = "" if batch is None else f".b{batch or len(test_y)}"
        output = folder / f"digits_cnn.{recipe}{suffix}.q.onnx"
        row: dict[str, Any] = {"name": label, "recipe": recipe, "path": None}
        rows.append(row)
        start = time.perf_counter()
        try:
            with _quiet_logs(quiet):
                result = compile_model(model_path, output, recipe=_recipe(recipe, batch, len(test_y)),
                                       calib=calib_path if calibrated else None)
        except Exception as exc:  # noqa: BLE001 - shown in the table; the other recipes still run
            logger.warning("demo: recipe %s failed: %s", recipe, exc)
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            continue
        row.update(path=output, compile_s=time.perf_counter() - start, size_bytes=result.output_bytes,
                   why=_speed_summary(result))

    _add_kernels(rows)
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
    b1 = _median_times({name: (lambda s=s: s.run(None, {"x": one})) for name, s in sessions.items()}, runs=600,
                       rounds=12)
    full = _median_times({name: (lambda s=s: s.run(None, {"x": test_x})) for name, s in sessions.items()}, runs=96,
                         rounds=12)
    for row in rows:
        if row["name"] in sessions:
            row["latency_b1_s"], row["latency_all_s"] = b1[row["name"]], full[row["name"]]
        if not keep:
            row["path"] = None
    return DemoResult(tuple(DemoRow(**row) for row in rows), n_test=len(test_y), n_calib=len(calib_x),
                      workdir=folder if keep else None)
