"""int8 benchmark: qcompile's int8 recipes against ONNX Runtime's own quantizers, side by side in one run.

Models (made into the model cache by ``models/export_efficientnet.py`` and ``models/export_minilm.py``, which this
script runs when the cache lacks them):

- EfficientNet-Lite0 (CNN, 224x224): accuracy = top-1 agreement with fp32 and mean KL(fp32 || int8) of the
  softmax over the evaluation images (140 views of 10 photos; calibration uses 140 views of 10 other photos).
- all-MiniLM-L6-v2 (BERT encoder): accuracy = cosine similarity of the mask-weighted mean-pooled embeddings to fp32
  over 157 evaluation sentences (calibration: 251 other sentences), mean and minimum.

Variants (each compile job runs in its own child process: wall time of the quantization call and peak RSS):

- ``fp32``: the exported model.
- ``qcompile int8-dynamic``: ``compile_model(recipe="int8-dynamic")``; its peer ``ORT quantize_dynamic``:
  ``quant_pre_process`` then ``quantize_dynamic(per_channel=True, weight_type=QInt8, op_types=[MatMul, Gemm])``.
- ``qcompile int8-dynamic --calib``: the same recipe given the calibration data (SmoothQuant and GPTQ run).
- ``qcompile int8 --calibrator mse`` (MSE activation ranges) and ``... --max-accuracy-drop 0`` (the most
  sensitive layers left float until no calibration sample's top-1 changes; ``select-precision``).
- ``qcompile int8``: ``compile_model(recipe="int8", calib=calib.npz)``; its peer ``ORT quantize_static``:
  ``quant_pre_process`` then ``quantize_static(QDQ, per_channel=True, activation_type=QUInt8,
  weight_type=QInt8, MinMax, op_types=[Conv, MatMul, Gemm])`` on the same calibration data.
- ``ORT quantize_static (all ops)``: the same with ONNX Runtime's default op list (what a user gets by default),
  also with ONNX Runtime's Entropy and Percentile calibrators (its best calibrator is the one to beat).

Latency: batch 1 (the first evaluation image; one sentence padded to 128 tokens), 2 intra-op threads, median of
interleaved runs after warm-up (see ``bench/_common.py``); ratios to fp32 and to the ORT peer of the same kind.
A benchmark, not a test: it reports and never fails on numbers; a failed compile is reported in its row.

Run: ``python bench/bench_int8.py`` (``--models efficientnet-lite0``, ``--rounds N``; ``--help``). Writes the
markdown section to stdout and to ``bench/out/int8.md`` (raw numbers in ``bench/out/int8.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402 - the sibling module of a script
    OUT_DIR,
    environment_section,
    fmt_bytes,
    fmt_ratio,
    job_main,
    make_session,
    measure_latency,
    model_bytes,
    quantized_op_count,
    run_job,
)

__all__ = ["MODELS", "VARIANTS", "main"]

REPO = Path(__file__).resolve().parent.parent
MODELS: dict[str, dict[str, Any]] = {
    "efficientnet-lite0": {"kind": "cnn", "script": "models/export_efficientnet.py", "batch": 20},
    "minilm-l6-v2": {"kind": "encoder", "script": "models/export_minilm.py", "batch": 16},
}
# name -> (job payload without paths, peer name or None)
VARIANTS: dict[str, tuple[dict[str, Any] | None, str | None]] = {
    "fp32": (None, None),
    "qcompile int8-dynamic": ({"tool": "qcompile", "recipe": "int8-dynamic"}, "ORT quantize_dynamic"),
    "qcompile int8-dynamic --calib": ({"tool": "qcompile", "recipe": "int8-dynamic", "calib": True},
                                      "ORT quantize_dynamic"),
    "ORT quantize_dynamic": ({"tool": "ort-dynamic", "ops": ["MatMul", "Gemm"]}, None),
    "qcompile int8": ({"tool": "qcompile", "recipe": "int8", "calib": True}, "ORT quantize_static"),
    "qcompile int8 --calibrator mse": ({"tool": "qcompile", "recipe": "int8", "calib": True,
                                        "calibration": {"calibrator": "mse"}}, "ORT quantize_static"),
    "qcompile int8 --calibrator mse --max-accuracy-drop 0": (
        {"tool": "qcompile", "recipe": "int8", "calib": True, "calibration": {"calibrator": "mse"},
         "quantization": {"max_accuracy_drop": 0.0}}, "ORT quantize_static"),
    "ORT quantize_static": ({"tool": "ort-static", "ops": ["Conv", "MatMul", "Gemm"], "calib": True}, None),
    "ORT quantize_static (all ops)": ({"tool": "ort-static", "ops": None, "calib": True}, None),
    "ORT quantize_static (all ops, Entropy)": ({"tool": "ort-static", "ops": None, "calib": True,
                                                "method": "Entropy"}, None),
    "ORT quantize_static (all ops, Percentile)": ({"tool": "ort-static", "ops": None, "calib": True,
                                                   "method": "Percentile"}, None),
}


# ---------------------------------------------------------------- child side: one compile job


def _ort_reader(calib_path: str, batch: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class NpzReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            with np.load(calib_path, allow_pickle=False) as data:
                self.arrays = {key: data[key] for key in data.files}
            self.count = len(next(iter(self.arrays.values())))
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= self.count:
                return None
            feed = {key: value[self.start:self.start + batch] for key, value in self.arrays.items()}
            self.start += batch
            return feed

    return NpzReader()


def _job(payload: dict[str, Any]) -> dict[str, Any]:
    src, dst, tool = payload["input"], payload["output"], payload["tool"]
    if tool == "qcompile":
        from qcompiler.api import compile_model

        start = time.perf_counter()
        compile_model(src, dst, recipe=payload["recipe"], calib=payload.get("calib"),
                      calibration=payload.get("calibration"), quantization=payload.get("quantization"))
        return {"seconds": time.perf_counter() - start}
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod

    start = time.perf_counter()
    pre = str(Path(dst).with_suffix(".pre.onnx"))
    extra: dict[str, Any] = {}
    try:
        quant_pre_process(src, pre)
    except Exception as exc:  # noqa: BLE001 - ORT's symbolic shape inference fails on some exports
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        extra["note"] = (f"quant_pre_process failed ({type(exc).__name__}: {' '.join(str(exc).split())[:80]}); "
                         "ran it again with skip_symbolic_shape=True")
    if tool == "ort-dynamic":
        quantize_dynamic(pre, dst, op_types_to_quantize=payload["ops"], per_channel=True, weight_type=QuantType.QInt8)
    elif tool == "ort-static":
        quantize_static(pre, dst, _ort_reader(payload["calib"], payload["batch"]), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=payload["ops"], per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, payload.get("method", "MinMax")))
    else:
        raise ValueError(f"unknown tool {tool!r}")
    extra["seconds"] = time.perf_counter() - start
    Path(pre).unlink(missing_ok=True)
    return extra


# ---------------------------------------------------------------- parent side


@dataclasses.dataclass
class Row:
    """One variant of one model."""

    variant: str
    path: Path | None = None
    error: str = ""
    compile_s: float = math.nan
    peak_rss_mb: float = math.nan
    size: float = math.nan
    qops: tuple[int, int] | None = None
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_s: float = math.nan
    latency_p90_s: float = math.nan
    note: str = ""
    session: Any = None


def _ensure_model(name: str, cache: Path) -> Path:
    folder = cache / name
    if not all((folder / f).is_file() for f in ("model.onnx", "calib.npz", "eval.npz")):
        print(f"[{name}] not in the cache: running {MODELS[name]['script']}", file=sys.stderr)
        subprocess.run([sys.executable, str(REPO / MODELS[name]["script"]), "--out-dir", str(folder)], check=True)
    return folder


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted.astype(np.float64))
    return e / e.sum(axis=1, keepdims=True)


def _outputs(session: Any, data: dict[str, np.ndarray], batch: int) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    count = len(data[names[0]])
    return np.concatenate([session.run(None, {n: data[n][s:s + batch] for n in names})[0]
                           for s in range(0, count, batch)])


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[:, :, None].astype(np.float64)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _accuracy(kind: str, ref: np.ndarray, out: np.ndarray, data: dict[str, np.ndarray]) -> dict[str, float]:
    if kind == "cnn":
        p, q = _softmax(ref), _softmax(out)
        kl = (p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))).sum(axis=1)
        return {"top1_agree": float((ref.argmax(1) == out.argmax(1)).mean()), "kl": float(kl.mean())}
    a, b = _pooled(ref, data["attention_mask"]), _pooled(out, data["attention_mask"])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def _bench_model(name: str, cache: Path, work: Path, args: argparse.Namespace) -> list[Row]:
    spec = MODELS[name]
    folder = _ensure_model(name, cache)
    src, calib = folder / "model.onnx", folder / "calib.npz"
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for variant, (job, _peer) in VARIANTS.items():
        if variant not in args.variants:
            continue
        row = Row(variant)
        rows.append(row)
        if job is None:
            row.path = src
            continue
        dst = out / (variant.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        for stale in (dst, dst.with_suffix(".onnx.data")):
            stale.unlink(missing_ok=True)
        payload = {**job, "input": str(src), "output": str(dst), "batch": spec["batch"],
                   "calib": str(calib) if job.get("calib") else None}
        print(f"[{name}] {variant}: compiling", file=sys.stderr)
        scratch = out / "scratch"
        scratch.mkdir(exist_ok=True)
        result = run_job(__file__, payload, cwd=scratch, timeout_s=args.compile_timeout)
        shutil.rmtree(scratch, ignore_errors=True)
        row.compile_s, row.peak_rss_mb = result.seconds, result.peak_rss_mb
        row.note = str(result.extra.get("note", ""))
        if not result.ok:
            row.error = result.error
            print(f"[{name}] {variant}: FAILED: {result.error}", file=sys.stderr)
            continue
        row.path = dst

    with np.load(folder / "eval.npz", allow_pickle=False) as loaded:
        data = {key: loaded[key] for key in loaded.files}
    reference: np.ndarray | None = None
    for row in rows:
        if row.path is None:
            continue
        try:
            row.size = model_bytes(row.path)
            row.qops = quantized_op_count(row.path)
            row.session = make_session(row.path)
            outputs = _outputs(row.session, data, spec["batch"])
        except Exception as exc:  # noqa: BLE001 - a broken output model is a result, not a crash
            row.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            row.session = None
            continue
        if reference is None:
            reference = outputs
        row.accuracy = _accuracy(spec["kind"], reference, outputs, data)

    live = [row for row in rows if row.session is not None]
    if live:
        names = [i.name for i in live[0].session.get_inputs()]
        feed = {n: data[n][:1] for n in names}
        print(f"[{name}] timing {len(live)} models", file=sys.stderr)
        timings = measure_latency({row.variant: (lambda s=row.session: s.run(None, feed)) for row in live},
                                  warmup=args.warmup, rounds=args.rounds, per_round=args.per_round,
                                  budget_s=args.budget)
        for row in live:
            row.latency_s, row.latency_p90_s = timings[row.variant].median, timings[row.variant].p90
            row.session = None
    return rows


def _table(name: str, rows: list[Row]) -> str:
    kind = MODELS[name]["kind"]
    by_name = {row.variant: row for row in rows}
    fp32 = by_name.get("fp32")
    acc_head = "top-1 agree | mean KL" if kind == "cnn" else "cos mean | cos min"
    lines = [f"| variant | {acc_head} | size | size/fp32 | int8 ops | latency ms (p90) | /fp32 | /ORT peer "
             "| compile s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.error and not row.accuracy:
            lines.append(f"| {row.variant} | **failed**: {row.error.replace('|', '/')} | | | | | | | | "
                         f"{row.compile_s:.1f} | {row.peak_rss_mb:.0f} |")
            continue
        acc = row.accuracy
        if kind == "cnn":
            acc_cells = f"{acc.get('top1_agree', math.nan):.3f} | {acc.get('kl', math.nan):.4f}"
        else:
            acc_cells = f"{acc.get('cos_mean', math.nan):.4f} | {acc.get('cos_min', math.nan):.4f}"
        peer_name = VARIANTS[row.variant][1]
        peer = by_name.get(peer_name) if peer_name else None
        to_fp32 = row.latency_s / fp32.latency_s if fp32 else math.nan
        to_peer = row.latency_s / peer.latency_s if peer else math.nan
        qops = f"{row.qops[0]}/{row.qops[1]}" if row.qops else "–"
        compile_cells = "–" if math.isnan(row.compile_s) else f"{row.compile_s:.1f}"
        rss = "–" if math.isnan(row.peak_rss_mb) else f"{row.peak_rss_mb:.0f}"
        lines.append(
            f"| {row.variant} | {acc_cells} | {fmt_bytes(row.size)} | {fmt_ratio(row.size / fp32.size if fp32 else math.nan)} "
            f"| {qops} | {row.latency_s * 1e3:.2f} ({row.latency_p90_s * 1e3:.2f}) | {fmt_ratio(to_fp32)} "
            f"| {fmt_ratio(to_peer) if peer else '–'} | {compile_cells} | {rss} |")
    notes = [f"- {row.variant}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + ([""] + notes if notes else []))


_NOTES = """\
Notes:
- accuracy is measured against the fp32 model on evaluation data that calibration never sees (EfficientNet-Lite0:
  140 views of 10 photos, calibrated on 140 views of 10 other photos; MiniLM: 157 sentences of Artistic/BSD/GPL-2,
  calibrated on 251 sentences of MPL-2.0/LGPL-2.1, padded to 128 tokens, embeddings mean-pooled with the mask).
- int8 ops: Conv/MatMul/Gemm running in int8 (fed by a DequantizeLinear, or an integer op) / all of them.
- latency: batch 1 (MiniLM: one sentence padded to 128 tokens), 2 intra-op threads, median (and p90) of interleaved
  runs; `/ORT peer` compares qcompile int8-dynamic with ORT quantize_dynamic and qcompile int8 with ORT
  quantize_static (same op types, both per-channel int8 weights; static: uint8 activations, MinMax).
- ORT peers run `quant_pre_process` first (as ONNX Runtime recommends; included in their compile time). Compile
  time is the quantization call alone; peak RSS is the child process's (interpreter and libraries included)."""


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown section and write it to bench/out/int8.md."""
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--job":
        return job_main(_job, sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $QCOMPILER_CACHE or "
                        "~/.cache/qcompiler/models)")
    parser.add_argument("--workdir", type=Path, default=OUT_DIR / "int8", help="where compiled models go")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--budget", type=float, default=120.0, help="latency seconds per model at most")
    parser.add_argument("--compile-timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args.cache is None:
        sys.path.insert(0, str(REPO / "models"))
        from _cache import cache_dir  # type: ignore[import-not-found]

        args.cache = cache_dir()
    args.cache, args.workdir = args.cache.resolve(), args.workdir.resolve()  # the jobs run in another folder

    sections = ["## int8: qcompile vs ONNX Runtime quantizers (CPU)", "", environment_section(), ""]
    raw: dict[str, Any] = {}
    for name in args.models:
        rows = _bench_model(name, args.cache, args.workdir, args)
        sections += [f"### {name}", "", _table(name, rows), ""]
        raw[name] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(row).items()
                      if k != "session"} for row in rows]
    sections.append(_NOTES)
    text = "\n".join(sections) + "\n"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "int8.md").write_text(text)
    (OUT_DIR / "int8.json").write_text(json.dumps(raw, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
