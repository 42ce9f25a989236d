"""Calibration memory benchmark: does peak memory grow with the number of calibration samples?

EfficientNet-Lite0 (``model.onnx`` of the model cache, made by ``models/export_efficientnet.py`` when missing) is
compiled with calibration data of 100 and 1,000 samples, made from the cache's ``calib.npz`` (140 views of 10
photos, 3x224x224 float32): sample ``i`` is view ``i mod 140``, mirrored horizontally on odd repeats and, from the
second repeat on, perturbed by seeded Gaussian noise (clipped to ``[-1, 1]``). The samples are written as a temporary
*folder* of ``.npz`` files of 100 samples each (a valid ``--calib``; 1,000 samples in one array would be 600 MB),
so the data reader holds one file at a time.

Pipelines, each run for the calibrators ``minmax`` and ``entropy``, every compile in a fresh child process
(``run_job`` of ``bench/_common.py``):

- ``int8``: the whole ``int8`` recipe through ``compile_model`` (smooth-quant, calibrate, collect-input-means and
  gptq all read the data);
- ``calibrate only``: a recipe extending ``int8`` whose pipeline drops the other data passes (smooth-quant,
  collect-input-means, gptq, select-precision) and keeps calibrate, lower-int8-qdq and finalize.

Peak memory: the child's ``VmHWM`` over the whole job (interpreter and libraries included), and per pass: an
instrument added to ``compile_model``'s pipeline resets the high-water mark before each pass (``/proc/self/
clear_refs``, Linux) and reads it after, so "pass peak" is the most a pass held above the RSS it started from.
Without ``clear_refs`` (not Linux) only the whole-job peak is reported.

Run: ``python bench/bench_calib_memory.py`` (``--samples 100 1000``, ``--recipe-samples 100 1000``,
``--calibrators minmax entropy``; ``--help``). Prints markdown; writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_section, job_main, run_job  # noqa: E402 - the sibling module of a script

__all__ = ["make_calibration_folder", "main"]

REPO = Path(__file__).resolve().parent.parent
MODEL = "efficientnet-lite0"
PER_FILE = 100
DATA_PASSES = ("smooth-quant", "calibrate", "collect-input-means", "gptq", "select-precision")


# ---------------------------------------------------------------- child side: one compile job


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


class _PassPeaks:
    """Instrument: RSS before each pass and the high-water mark during it (reset before each pass)."""

    def __init__(self) -> None:
        self.passes: list[dict[str, Any]] = []
        self.resettable = True
        self.before_first = math.nan
        self._start = (math.nan, 0.0)

    def _reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def before_pass(self, qpass: Any, model: Any) -> None:
        if not self.passes and math.isnan(self.before_first):
            self.before_first = _status_mb("VmHWM")  # loading the model and opening the data
        if self.resettable:
            self._reset()
        self._start = (_status_mb("VmRSS"), time.perf_counter())

    def after_pass(self, qpass: Any, model: Any, record: Any, report: Any) -> None:
        rss, start = self._start
        peak = _status_mb("VmHWM")
        self.passes.append({"name": qpass.name, "rss_before_mb": rss, "peak_mb": peak,
                            "seconds": time.perf_counter() - start})


def _job(payload: dict[str, Any]) -> dict[str, Any]:
    import qcompiler.api as api

    probe = _PassPeaks()
    real_build = api.build_pipeline

    def build_with_probe(recipe: Any, context: Any, *, instruments: Any = ()) -> Any:
        return real_build(recipe, context, instruments=[*instruments, probe])

    api.build_pipeline = build_with_probe
    start = time.perf_counter()
    api.compile_model(payload["input"], payload["output"], recipe=payload["recipe"], calib=payload["calib"],
                      calibration={"calibrator": payload["calibrator"]})
    seconds = time.perf_counter() - start
    peaks = [probe.before_first, _status_mb("VmHWM"), *(p["peak_mb"] for p in probe.passes)]
    return {"seconds": seconds, "overall_peak_mb": max(peaks), "passes": probe.passes,
            "per_pass": probe.resettable}


# ---------------------------------------------------------------- parent side


def make_calibration_folder(base: np.ndarray, count: int, folder: Path, *, per_file: int = PER_FILE) -> Path:
    """Write ``count`` samples derived from ``base`` (see the module docstring) as ``.npz`` files of ``per_file``."""
    folder.mkdir(parents=True, exist_ok=True)
    for first in range(0, count, per_file):
        part = np.empty((min(per_file, count - first), *base.shape[1:]), dtype=np.float32)
        for j in range(part.shape[0]):
            i = first + j
            repeat, image = divmod(i, len(base))
            sample = base[image, :, :, ::-1] if repeat % 2 else base[image]
            if repeat:
                noise = np.random.default_rng(i).standard_normal(sample.shape, dtype=np.float32) * 0.02
                sample = np.clip(sample + noise, -1.0, 1.0)
            part[j] = sample
        np.savez(folder / f"part{first // per_file:04d}.npz", x=part)
    return folder


def _calibrate_only_recipe(folder: Path) -> Path:
    from qcompiler.config import load_recipe

    passes = [p for p in load_recipe("int8").passes if p not in DATA_PASSES or p == "calibrate"]
    path = folder / "calibrate-only.toml"
    listed = ", ".join(f'"{p}"' for p in passes)
    path.write_text(f'extends = "int8"\nname = "int8-calibrate-only"\npasses = [{listed}]\n')
    return path


def _ensure_model(cache: Path) -> Path:
    folder = cache / MODEL
    if not all((folder / f).is_file() for f in ("model.onnx", "calib.npz")):
        import subprocess

        print(f"[{MODEL}] not in the cache: running models/export_efficientnet.py", file=sys.stderr)
        subprocess.run([sys.executable, str(REPO / "models" / "export_efficientnet.py"), "--out-dir", str(folder)],
                       check=True)
    return folder


def _fmt(x: float, digits: int = 0) -> str:
    return "–" if x != x else f"{x:.{digits}f}"


def _tables(rows: list[dict[str, Any]]) -> str:
    lines = ["| pipeline | samples | calibrator | wall s | calibrate s | peak RSS MB | RSS above the 100-sample run MB |",
             "|---|---|---|---|---|---|---|"]
    smallest: dict[tuple[str, str], float] = {}
    for row in sorted(rows, key=lambda r: (r["pipeline"], r["calibrator"], r["samples"])):
        key = (row["pipeline"], row["calibrator"])
        if not row["ok"]:
            lines.append(f"| {row['pipeline']} | {row['samples']} | {row['calibrator']} | **failed**: "
                         f"{row['error'].replace('|', '/')} | | | |")
            continue
        smallest.setdefault(key, row["peak_mb"])
        calib_s = next((p["seconds"] for p in row["passes"] if p["name"] == "calibrate"), math.nan)
        lines.append(f"| {row['pipeline']} | {row['samples']} | {row['calibrator']} | {row['seconds']:.1f} "
                     f"| {_fmt(calib_s, 1)} | {row['peak_mb']:.0f} | {row['peak_mb'] - smallest[key]:+.0f} |")
    per_pass = [r for r in rows if r["ok"] and r.get("per_pass")]
    if not per_pass:
        return "\n".join(lines)
    lines += ["", "Per data pass: peak RSS during the pass minus the RSS it started from, MB (and seconds):", "",
              "| pipeline | calibrator | pass | " + " | ".join(f"{n} samples" for n in
                                                             sorted({r["samples"] for r in per_pass})) + " |",
              "|---|---|---|" + "---|" * len({r["samples"] for r in per_pass})]
    counts = sorted({r["samples"] for r in per_pass})
    for pipeline in sorted({r["pipeline"] for r in per_pass}):
        for calibrator in sorted({r["calibrator"] for r in per_pass}):
            by_n = {r["samples"]: r for r in per_pass if r["pipeline"] == pipeline and r["calibrator"] == calibrator}
            names = [p["name"] for p in next(iter(by_n.values()))["passes"]] if by_n else []
            for name in (n for n in names if n in DATA_PASSES):
                cells = []
                for n in counts:
                    found = next((p for p in by_n[n]["passes"] if p["name"] == name), None) if n in by_n else None
                    cells.append("–" if found is None else
                                 f"{found['peak_mb'] - found['rss_before_mb']:.0f} ({found['seconds']:.1f} s)")
                lines.append(f"| {pipeline} | {calibrator} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown section."""
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--job":
        return job_main(_job, sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", type=int, default=[100, 1000],
                        help="sample counts for the calibrate-only pipeline")
    parser.add_argument("--recipe-samples", nargs="+", type=int, default=[100, 1000],
                        help="sample counts for the whole int8 recipe (its gptq pass dominates: about 0.1 s per "
                             "sample on 2 idle cores; 0 to skip)")
    parser.add_argument("--calibrators", nargs="+", default=["minmax", "entropy"],
                        choices=["minmax", "percentile", "entropy", "mse"])
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $QCOMPILER_CACHE or "
                        "~/.cache/qcompiler/models)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile job")
    args = parser.parse_args(argv)
    if args.cache is None:
        sys.path.insert(0, str(REPO / "models"))
        from _cache import cache_dir  # type: ignore[import-not-found]

        args.cache = cache_dir()
    folder = _ensure_model(args.cache.resolve())
    with np.load(folder / "calib.npz", allow_pickle=False) as loaded:
        base = loaded["x"]
    work = Path(tempfile.mkdtemp(prefix="calib-memory-", dir=args.workdir))
    try:
        plan = [("calibrate only", str(_calibrate_only_recipe(work)), n) for n in args.samples]
        plan += [("int8", "int8", n) for n in args.recipe_samples if n > 0]
        data: dict[int, Path] = {}
        for n in sorted({n for _, _, n in plan}):
            data[n] = make_calibration_folder(base, n, work / f"calib-{n}")
        del base
        rows: list[dict[str, Any]] = []
        for pipeline, recipe, n in plan:
            for calibrator in args.calibrators:
                print(f"[{MODEL}] {pipeline}, {n} samples, {calibrator}", file=sys.stderr)
                scratch = work / "scratch"
                scratch.mkdir(exist_ok=True)
                payload = {"input": str(folder / "model.onnx"), "output": str(work / "out.onnx"), "recipe": recipe,
                           "calib": str(data[n]), "calibrator": calibrator}
                result = run_job(__file__, payload, cwd=scratch, timeout_s=args.timeout)
                shutil.rmtree(scratch, ignore_errors=True)
                rows.append({"pipeline": pipeline, "samples": n, "calibrator": calibrator, "ok": result.ok,
                             "error": result.error, "seconds": result.seconds,
                             "peak_mb": float(result.extra.get("overall_peak_mb", result.peak_rss_mb)),
                             "passes": result.extra.get("passes", []), "per_pass": result.extra.get("per_pass")})
                print(f"  {result.seconds:.1f} s, peak {rows[-1]['peak_mb']:.0f} MB"
                      + (f", FAILED: {result.error}" if not result.ok else ""), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join([f"## Calibration memory vs samples: {MODEL} (CPU)", "", environment_section(), "",
                     f"Calibration data: folders of .npz files of {PER_FILE} samples (see the script's docstring).",
                     "", _tables(rows), ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
