"""Shared helpers for the benchmark scripts: environment header, ONNX Runtime sessions, latency, sizes, op counts,
and compile jobs run in a child process (so that their wall time and peak memory are measured in isolation).

Latency method: every model gets ``warmup`` runs, then ``rounds`` rounds in which each model in turn runs ``per_round``
times; each run is timed alone (``time.perf_counter``) and the median of all runs is reported. Interleaving the models
round by round spreads the machine's noise over all of them, so the ratios taken in one run are fair; absolute
times are not comparable across runs or machines.

Peak memory of a job is the child's own high-water mark (``VmHWM``), so it includes the Python interpreter and the
libraries the job imported, not only the work itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BENCH_DIR", "OUT_DIR", "INTRA_OP_THREADS", "environment_section", "cpu_model", "make_session",
    "LatencyResult", "measure_latency", "model_bytes", "quantized_op_count", "JobResult", "run_job",
    "job_main", "peak_rss_mb", "fmt_bytes", "fmt_ratio",
]

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
INTRA_OP_THREADS = 2
_JOB_MARK = "@@BENCH_JOB_RESULT@@"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        imported = __import__(module)
        return str(getattr(imported, "__version__", "?"))
    except Exception:  # noqa: BLE001 - a missing optional package is reported, not raised
        return "not installed"


def environment_section(argv: Sequence[str] | None = None) -> str:
    """Markdown lines: command, date, versions and machine."""
    argv = list(sys.argv if argv is None else argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(argv[0], BENCH_DIR.parent), *argv[1:]])
    try:
        from qcompiler import __version__ as qversion
    except Exception:  # noqa: BLE001
        qversion = "?"
    git = "?"
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR.parent, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=BENCH_DIR.parent, capture_output=True,
                               text=True, check=True).stdout.strip()
        git += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        pass
    lines = [
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- qcompiler {qversion}, git {git}",
        f"- python {platform.python_version()}, onnx {_version('onnx')}, onnxruntime {_version('onnxruntime')}, "
        f"numpy {np.__version__}, onnx-ir {_version('onnx_ir')}, torch {_version('torch')}",
        f"- machine: {cpu_model()}, nproc {os.cpu_count()}, {platform.system()} {platform.machine()}; "
        f"ONNX Runtime CPU, {INTRA_OP_THREADS} intra-op threads",
    ]
    return "\n".join(lines)


def make_session(path: str | os.PathLike[str], *, threads: int = INTRA_OP_THREADS) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads, one inter-op thread, all optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if _uses_custom_ops(path):  # int3 MatMulIntN / fused FP8: qcompiler's ops through onnxruntime-extensions
        from qcompiler.runtime import custom_ops

        custom_ops.register(options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _uses_custom_ops(path: str | os.PathLike[str]) -> bool:
    """Whether the model imports qcompiler's op domain (read without its external data)."""
    import onnx

    from qcompiler.runtime.custom_ops import DOMAIN

    model = onnx.load(str(path), load_external_data=False)
    return any(op.domain == DOMAIN for op in model.opset_import)


@dataclasses.dataclass
class LatencyResult:
    """Per-run times of one model, in seconds."""

    times: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times, 90)) if self.times else float("nan")


def measure_latency(runners: Mapping[str, Callable[[], Any]], *, warmup: int = 5, rounds: int = 10,
                    per_round: int = 10, budget_s: float | None = None) -> dict[str, LatencyResult]:
    """Time each runner, interleaved round by round (see the module docstring).

    ``budget_s`` caps the total time: rounds stop early (after at least 3) once it is spent.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    results = {name: LatencyResult([]) for name in runners}
    start = time.perf_counter()
    for index in range(rounds):
        for name, run in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                run()
                results[name].times.append(time.perf_counter() - t0)
        if budget_s is not None and index >= 2 and time.perf_counter() - start > budget_s:
            break
    return results


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model file plus the external-data files it references."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    for location in locations:
        data = path.parent / location
        if data.is_file():
            total += data.stat().st_size
    return total


_COMPUTE = {"Conv", "MatMul", "Gemm"}
_INTEGER = {"MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul",
            "QGemm", "MatMulIntegerToFloat"}


def quantized_op_count(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(quantized, total) compute ops in the main graph.

    Compute ops are Conv/MatMul/Gemm and their integer forms; a float Conv/MatMul/Gemm counts as quantized when one
    of its inputs comes from a DequantizeLinear (the QDQ form that ONNX Runtime fuses into an integer kernel).
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    quantized = total = 0
    for node in graph.node:
        if node.op_type in _INTEGER:
            quantized += 1
            total += 1
        elif node.op_type in _COMPUTE:
            total += 1
            if any(producer.get(name) == "DequantizeLinear" for name in node.input[:2]):
                quantized += 1
    return quantized, total


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this address space only (``ru_maxrss`` would be
    wrong in a child: Linux carries the parent's peak over fork and exec). Elsewhere ``ru_maxrss`` (macOS: bytes).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@dataclasses.dataclass
class JobResult:
    """What a child job reported: ok, its own wall time, peak RSS, an error line, and any extra fields."""

    ok: bool
    seconds: float = float("nan")
    peak_rss_mb: float = float("nan")
    error: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_job(script: str | os.PathLike[str], payload: Mapping[str, Any], *, cwd: str | os.PathLike[str] | None = None,
            timeout_s: float = 1800) -> JobResult:
    """Run ``python SCRIPT --job JSON`` in a child process (in folder ``cwd``) and return what it reported.

    Run it in a scratch folder: some tools (ONNX Runtime's quantizers) leave temporary files in the current folder.
    The script must call :func:`job_main` for ``--job``. A crash, a timeout or a missing report becomes a failed
    :class:`JobResult` with the error's last line; nothing is raised.
    """
    command = [sys.executable, str(Path(script).resolve()), "--job", json.dumps(dict(payload))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired:
        return JobResult(False, error=f"timed out after {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_JOB_MARK):
            data = json.loads(line[len(_JOB_MARK):])
            return JobResult(bool(data.pop("ok")), float(data.pop("seconds", "nan")),
                             float(data.pop("peak_rss_mb", "nan")), str(data.pop("error", "")), data)
    tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
    return JobResult(False, error=f"exit code {proc.returncode}: {tail}")


def job_main(work: Callable[[dict[str, Any]], dict[str, Any] | None], payload_json: str) -> int:
    """Child side of :func:`run_job`: time ``work(payload)`` and print the report line; never raises.

    ``work`` may return a dict of extra fields; a ``seconds`` field there replaces the measured time (to leave
    imports and file cleanup out of it).
    """
    payload = json.loads(payload_json)
    report: dict[str, Any]
    start = time.perf_counter()
    try:
        extra = work(payload) or {}
        report = {"ok": True, "seconds": time.perf_counter() - start, **extra}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a failed job
        message = " ".join(str(exc).split())[:300]
        report = {"ok": False, "seconds": time.perf_counter() - start, "error": f"{type(exc).__name__}: {message}"}
    report["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.flush()
    print(_JOB_MARK + json.dumps(report), flush=True)
    return 0


def fmt_bytes(n: float) -> str:
    """A byte count in KB/MB (decimal units)."""
    if n != n:  # NaN
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} KB"


def fmt_ratio(x: float) -> str:
    """A ratio as ``0.27x`` (``–`` for NaN)."""
    return "–" if x != x else f"{x:.2f}x"
