"""Weight-only LLM quantization: qcompile's recipes against ONNX Runtime's ``matmul_nbits_quantizer``, same run.

Model: SmolLM2-135M-Instruct exported by ``models/export_smollm2.py`` (no KV cache; the script runs it when the
cache lacks the model). For each variant: perplexity on the evaluation windows (``eval.npz``: non-overlapping
windows of 256 tokens of license texts that calibration never sees; the NLL of every token after the first of a
window, averaged over all windows, then exponentiated), the mean KL divergence KL(fp32 || variant) of the
next-token distribution (nats) and the share of positions whose top-1 token is fp32's (``qcompiler.quality``, on the
same windows), the size on disk (with external data) and as a ratio to fp32, latency of one forward over 8 and over
256 tokens (batch 1, 2 intra-op threads, interleaved rounds, medians), compile time and the compile process's peak
RSS.

Run: ``python bench/bench_llm.py`` (all variants) or ``--variants fp32 'qcompile int4 b32' ...``; it prints a
markdown section and writes it to ``bench/out/llm.md``. Nothing here is committed except the script.
"""

from __future__ import annotations

import argparse
import contextlib
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
    run_job,
)

__all__ = ["VARIANTS", "main", "perplexity"]

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"


def _qc(recipe: str, *, calib: bool = False, pass_options: dict[str, dict[str, Any]] | None = None,
        **weight_only: Any) -> dict[str, Any]:
    """A qcompile job; ``calib``: hand it the calibration data even for RTN/HQQ (the importance-weighted grid);
    ``pass_options``: a recipe's ``[pass-options.NAME]`` tables."""
    return {"tool": "qcompile", "recipe": recipe, "weight_only": weight_only, "use_calib": calib,
            "pass_options": pass_options or {}}


def _ort(bits: int, block: int, symmetric: bool, algo: str = "rtn", accuracy_level: int | None = None
         ) -> dict[str, Any]:
    return {"tool": "ort", "bits": bits, "block": block, "symmetric": symmetric, "algo": algo,
            "accuracy_level": accuracy_level}


#: variant name -> compile job (None: the fp32 model itself)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "qcompile int8-weight b32": _qc("int8-weight", block_size=32),
    "qcompile int8-weight b32 imatrix": _qc("int8-weight", calib=True, block_size=32),
    "qcompile int4 b32 asym": _qc("int4", block_size=32, symmetric=False),
    "qcompile int4 b32 asym float-zp": _qc("int4", block_size=32, symmetric=False, zero_point="float"),
    "qcompile int4 b32 asym gptq": _qc("int4", block_size=32, symmetric=False, algorithm="gptq"),
    "qcompile int4 b128 asym": _qc("int4", block_size=128, symmetric=False),
    "qcompile int4 b128 sym": _qc("int4", block_size=128, symmetric=True),
    "qcompile int4 b128 asym gptq": _qc("int4", block_size=128, symmetric=False, algorithm="gptq"),
    "qcompile int4 b128 asym awq": _qc("int4", block_size=128, symmetric=False, algorithm="awq"),
    "qcompile int4 b128 asym gptaq": _qc("int4", block_size=128, symmetric=False, algorithm="gptq",
                                         pass_options={"weight-only-gptq": {"gptaq": True}}),
    "qcompile int4 b64 asym gptq": _qc("int4", block_size=64, symmetric=False, algorithm="gptq"),
    "qcompile int3 b32 asym gptq": _qc("int3", block_size=32, symmetric=False, algorithm="gptq"),
    "qcompile int4 b128 asym gptq mixed 4.25": _qc("int4", block_size=128, symmetric=False, algorithm="gptq",
                                                   target_bits=4.25),
    "qcompile int4 b128 asym gptq one-pass": _qc("int4", block_size=128, symmetric=False, algorithm="gptq",
                                                 pass_options={"weight-only-gptq": {"sequential": False}}),
    "qcompile int4 b128 asym imatrix": _qc("int4", calib=True, block_size=128, symmetric=False),
    "qcompile int4 b128 asym imatrix one-pass": _qc("int4", calib=True, block_size=128, symmetric=False,
                                                    pass_options={"weight-only-rtn": {"sequential": False}}),
    "qcompile int4 b32 asym imatrix": _qc("int4", calib=True, block_size=32, symmetric=False),
    "qcompile nf4 b64": _qc("nf4", block_size=64),
    "qcompile int4 b64 sym": _qc("int4", block_size=64, symmetric=True),
    "qcompile int4 b64 asym": _qc("int4", block_size=64, symmetric=False),
    "qcompile int4 b128 asym hqq": _qc("int4", block_size=128, symmetric=False, algorithm="hqq"),
    "qcompile int4 b128 asym float-zp hqq": _qc("int4", block_size=128, symmetric=False, zero_point="float",
                                                algorithm="hqq"),
    "qcompile int4 b32 asym hqq": _qc("int4", block_size=32, symmetric=False, algorithm="hqq"),
    "qcompile int2 b32 asym gptq": _qc("int2", block_size=32, symmetric=False, algorithm="gptq"),
    "qcompile int2 b32 asym hqq": _qc("int2", block_size=32, symmetric=False, algorithm="hqq"),
    "qcompile ternary b32": _qc("ternary", block_size=32),
    "qcompile ternary b32 gptq": _qc("ternary", block_size=32, algorithm="gptq"),
    "qcompile ternary b32 hqq": _qc("ternary", block_size=32, algorithm="hqq"),
    "qcompile fp8-weight": _qc("fp8-weight"),
    "qcompile int4 b128 asym mixed 3.5": _qc("int4", block_size=128, symmetric=False, target_bits=3.5),
    "qcompile int4 b128 asym gptq mixed 3.5": _qc("int4", block_size=128, symmetric=False, algorithm="gptq",
                                                  target_bits=3.5),
    "qcompile int2 b32 asym gptq mixed 3": _qc("int2", block_size=32, symmetric=False, algorithm="gptq",
                                               target_bits=3.0),
    "qcompile ternary b32 gptq mixed 3": _qc("ternary", block_size=32, algorithm="gptq", target_bits=3.0),
    "ORT int8 RTN b32 sym": _ort(8, 32, True),
    "ORT int4 RTN b32 asym": _ort(4, 32, False),
    "ORT int4 RTN b32 sym": _ort(4, 32, True),
    "ORT int4 RTN b128 asym": _ort(4, 128, False),
    "ORT int4 RTN b128 sym": _ort(4, 128, True),
    "ORT int4 RTN b128 asym acc4": _ort(4, 128, False, accuracy_level=4),
    "ORT int4 HQQ b32": _ort(4, 32, False, "hqq"),
    "ORT int4 HQQ b128": _ort(4, 128, False, "hqq"),
    "ORT int4 GPTQ b32 asym": _ort(4, 32, False, "gptq"),
    "ORT int4 GPTQ b128 asym": _ort(4, 128, False, "gptq"),
}


# ---------------------------------------------------------------- child side: one compile job


def _job(payload: dict[str, Any]) -> dict[str, Any]:
    src, dst = payload["input"], payload["output"]
    start = time.perf_counter()
    if payload["tool"] == "qcompile":
        from qcompiler.api import compile_model

        options = payload["weight_only"]
        calib = payload["calib"] if options.get("algorithm") in ("gptq", "awq") or options.get("target_bits") \
            or payload.get("use_calib") else None
        recipe: Any = payload["recipe"]
        if payload.get("pass_options"):  # the named recipe with [pass-options.NAME] tables
            import dataclasses

            from qcompiler.config import load_recipe

            recipe = load_recipe(recipe)
            recipe = dataclasses.replace(recipe, pass_options={**recipe.pass_options, **payload["pass_options"]})
        calibration = {"max_samples": payload["calib_samples"]} if payload.get("calib_samples") and calib else None
        compile_model(src, dst, recipe=recipe, weight_only=payload["weight_only"], calib=calib,
                      calibration=calibration)
        return {"seconds": time.perf_counter() - start}
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model = onnx.load(src)
    if payload["algo"] == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=payload["block"], bits=payload["bits"])
    elif payload["algo"] == "gptq":  # Intel Neural Compressor's GPTQ inside ORT; its defaults but the data
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_IdsReader(payload["calib"],
                                                                                 payload.get("calib_samples")))
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=payload["block"], is_symmetric=payload["symmetric"],
                                                  bits=payload["bits"], accuracy_level=payload["accuracy_level"])
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=payload["bits"], block_size=payload["block"],
                                         is_symmetric=payload["symmetric"], accuracy_level=payload["accuracy_level"],
                                         algo_config=config)
    with contextlib.redirect_stdout(sys.stderr):  # GPTQ's progress bar ends no line: the job's report would join it
        quantizer.process()
    quantizer.model.save_model_to_file(dst, use_external_data_format=False)
    return {"seconds": time.perf_counter() - start}


class _IdsReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over the calibration windows qcompile's GPTQ rows use (the
    same ``calib.npz``, one window of ``input_ids`` per sample; at most ``limit``). ORT deep-copies it and iterates."""

    def __init__(self, path: str, limit: int | None = None) -> None:
        with np.load(path, allow_pickle=False) as data:
            self.ids = data["input_ids"][:limit]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.ids):
            return None
        self.index += 1
        return {"input_ids": self.ids[self.index - 1:self.index]}

    def __iter__(self) -> _IdsReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        found = self.get_next()
        if found is None:
            raise StopIteration
        return found


# ---------------------------------------------------------------- parent side


def perplexity(session: Any, windows: np.ndarray) -> float:
    """exp(mean NLL) of every token after the first of each window, given the tokens before it."""
    total, count = 0.0, 0
    for window in windows:
        logits = session.run(None, {"input_ids": window[None, :]})[0][0].astype(np.float64)  # [S, V]
        shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        picked = shifted[np.arange(len(window) - 1), window[1:]]
        total += float((log_norm - picked).sum())
        count += len(window) - 1
    return math.exp(total / count)


def _quality(rows: list[dict[str, Any]], sessions: dict[str, Any], fp32: Any, windows: np.ndarray) -> None:
    """Perplexity, mean KL(fp32 || variant) in nats and top-1 agreement of every row, window by window: the fp32
    model runs once per window, each variant against it (one window's logits of each in memory)."""
    from qcompiler.quality import QualityStats, WindowReference

    stats = {name: QualityStats() for name in sessions}
    for index, window in enumerate(windows):
        print(f"[{MODEL}] quality: window {index + 1}/{len(windows)}", file=sys.stderr)
        ref_logits = fp32.run(None, {"input_ids": window[None, :]})[0][0]
        ref = WindowReference.from_logits(ref_logits, window)
        for name, session in sessions.items():
            stats[name].add(ref, ref_logits if session is fp32 else
                            session.run(None, {"input_ids": window[None, :]})[0][0])
    for row in rows:
        if row["variant"] in stats:
            summary = stats[row["variant"]].summary()
            row.update(ppl=summary["ppl_quant"], ppl_fp32=summary["ppl_float"], kl=summary["kl_mean"],
                       ppl_se=summary["log_ppl_ratio_se"], top1=summary["top1_agreement"], size=model_bytes(row["path"]))


def _ensure_model(cache: Path) -> Path:
    folder = cache / MODEL
    if not all((folder / f).is_file() for f in ("model.onnx", "calib.npz", "eval.npz")):
        print(f"[{MODEL}] not in the cache: running models/export_smollm2.py", file=sys.stderr)
        subprocess.run([sys.executable, str(REPO / "models" / "export_smollm2.py"), "--out-dir", str(folder)],
                       check=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown section and write it to bench/out/llm.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $QCOMPILER_CACHE or "
                                                                 "~/.cache/qcompiler/models)")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of 256 tokens")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compile-timeout", type=float, default=3600.0)
    parser.add_argument("--calib-samples", type=int, default=None,
                        help="calibration windows the data-driven variants use (default: all; a quick check)")
    args = parser.parse_args(argv)
    if args.job:
        return job_main(_job, args.job)
    from qcompiler.models._cache import cache_dir

    folder = _ensure_model(args.cache or cache_dir())
    work = OUT_DIR / "llm"
    work.mkdir(parents=True, exist_ok=True)
    src = folder / "model.onnx"
    rows: list[dict[str, Any]] = []
    for name in args.variants:
        job = VARIANTS[name]
        row: dict[str, Any] = {"variant": name, "path": src, "compile_s": math.nan, "rss": math.nan, "error": ""}
        rows.append(row)
        if job is None:
            continue
        dst = work / (name.replace(" ", "_") + ".onnx")
        for stale in (dst, Path(f"{dst}.data")):
            stale.unlink(missing_ok=True)
        print(f"[{MODEL}] {name}: compiling", file=sys.stderr)
        scratch = work / "scratch"
        scratch.mkdir(exist_ok=True)
        result = run_job(__file__, {**job, "input": str(src), "output": str(dst),
                                    "calib": str(folder / "calib.npz"), "calib_samples": args.calib_samples},
                         cwd=scratch, timeout_s=args.compile_timeout)
        shutil.rmtree(scratch, ignore_errors=True)
        row.update(compile_s=result.seconds, rss=result.peak_rss_mb, path=dst if result.ok else None,
                   error="" if result.ok else result.error)
    with np.load(folder / "eval.npz", allow_pickle=False) as data:
        windows = data["input_ids"][:args.eval_windows]
    fp32_size = model_bytes(src)
    sessions = {row["variant"]: make_session(row["path"]) for row in rows if row["path"] is not None}
    _quality(rows, sessions, sessions.get("fp32") or make_session(src), windows)
    latency: dict[int, dict[str, Any]] = {}
    for tokens in (8, 256):
        feed = {"input_ids": windows[:1, :tokens]}
        runners = {name: (lambda s=s, f=feed: s.run(None, f)) for name, s in sessions.items()}
        latency[tokens] = measure_latency(runners, warmup=2, rounds=args.rounds, per_round=3)
    base = next((r for r in rows if r["variant"] == "fp32" and "ppl" in r), None)
    lines = [environment_section(None), "", f"### {MODEL} weight-only ({len(windows)} windows of "
             f"{windows.shape[1]} tokens)", "",
             "| variant | perplexity | vs fp32 (95% interval) | KL vs fp32 | top-1 = fp32 | size | size/fp32 | 8-token ms | /fp32 | "
             "256-token ms | /fp32 | compile s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["error"]:
            lines.append(f"| {row['variant']} | **failed**: {row['error']} | | | | | | | | | | "
                         f"{row['compile_s']:.1f} | {row['rss']:.0f} |")
            continue
        name = row["variant"]
        t8, t256 = latency[8][name].median, latency[256][name].median
        b8 = latency[8]["fp32"].median if base else math.nan
        b256 = latency[256]["fp32"].median if base else math.nan
        ppl_ratio = row["ppl"] / row["ppl_fp32"] - 1
        half = 1.96 * row["ppl_se"]  # the paired standard error of log(ppl / ppl_fp32) over windows
        interval = "" if name == "fp32" or not math.isfinite(half) else \
            f" ({math.expm1(math.log1p(ppl_ratio) - half) * 100:+.1f}..{math.expm1(math.log1p(ppl_ratio) + half) * 100:+.1f})"
        lines.append(f"| {name} | {row['ppl']:.3f} | {ppl_ratio * 100:+.2f}%{interval} | {row['kl']:.4f} | "
                     f"{row['top1'] * 100:.1f}% | {fmt_bytes(row['size'])} | "
                     f"{fmt_ratio(row['size'] / fp32_size)} | {t8 * 1e3:.2f} | {fmt_ratio(t8 / b8)} | "
                     f"{t256 * 1e3:.1f} | {fmt_ratio(t256 / b256)} | {row['compile_s']:.1f} | {row['rss']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (OUT_DIR / "llm.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
