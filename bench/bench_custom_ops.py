"""qcompiler's custom ops (ai.qcompiler, onnxruntime-extensions PyOps) against ONNX Runtime's native kernels.

Per op, at SmolLM2-135M's matmul shapes (K x N = 576x576, 576x1536, 1536x576) and 1, 8 and 128 tokens, one
single-node model per variant, all in one run and interleaved (``_common.measure_latency``: medians; ratios to the
fp32 MatMul of the same shape and tokens):

- ``fp32``: MatMul; ``int4 NBits``: ORT's MatMulNBits (block 32, uint8 zero points, accuracy_level 4 as the int4
  recipe writes it); ``int3 PyOp``: our MatMulIntN (block 32, uint8 zero points); ``int3 PyOp lists``: the same with
  the package's own result hook (``rv.flatten().tolist()``) instead of ours (arrays); ``int3 numpy``: the kernel
  alone, called from Python without ORT;
- ``fp8 DQ+MatMul``: DequantizeLinear (E4M3FN, per column) + MatMul, what ``fp8-weight`` writes; ``fp8 PyOp``: our
  fused MatMulFp8.

``--llm`` also compiles SmolLM2-135M (``bench_llm.py``'s model and data, compile jobs in a child process) with int3
(block 32, asymmetric; RTN and GPTQ), int4 (same, RTN) and FP8 both ways, and reports perplexity on the evaluation
windows and whole-model forward latency at 8 and 256 tokens through ``qcompiler.runtime.Session``.

Run: ``python bench/bench_custom_ops.py [--threads 1|2] [--llm]``; prints a markdown section and writes
``bench/out/custom_ops.md``. Threads: ``--threads T`` gives ONNX Runtime ``T`` intra-op threads and numpy's BLAS
(inside the PyOps) ``T`` threads (``OPENBLAS_NUM_THREADS`` and the like, set before numpy loads), with ORT's
spinning workers turned off (``session.intra_op.allow_spinning = 0``): measured here, spinning workers of one
session steal the cores from the BLAS threads of the next one, up to 30x slower PyOps at 8 tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _threads_from_argv() -> int:
    """``--threads T`` read before numpy loads (BLAS reads its thread count once, at load)."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 1


THREADS = _threads_from_argv()
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = str(THREADS)

import numpy as np  # noqa: E402 - after the BLAS thread count is set
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402 - the sibling module of a script
    OUT_DIR,
    environment_section,
    fmt_bytes,
    fmt_ratio,
    measure_latency,
    model_bytes,
    run_job,
)

from qcompiler.formats.blockwise import quantize_rtn  # noqa: E402
from qcompiler.formats.channelwise import quantize_weight_fp8  # noqa: E402
from qcompiler.runtime import Session, custom_ops  # noqa: E402
from qcompiler.runtime.custom_ops import _ortext  # noqa: E402

SHAPES = ((576, 576), (576, 1536), (1536, 576))
TOKENS = (1, 8, 128)
BLOCK = 32
F = TensorProto.FLOAT
VARIANTS = ("fp32", "int4 NBits", "int3 PyOp", "int3 PyOp lists", "int3 numpy", "fp8 DQ+MatMul", "fp8 PyOp")


def _single_node(path: Path, nodes: list[onnx.NodeProto], k: int, arrays: dict[str, np.ndarray],
                 opsets: dict[str, int]) -> Path:
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("a", F, ["M", k])],
                              [helper.make_tensor_value_info("y", F, None)],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _op_models(folder: Path, k: int, n: int, rng: np.random.Generator) -> tuple[dict[str, Path], Any]:
    """The single-node models of one weight shape, and the numpy call of the int3 kernel."""
    w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32)
    empty = np.zeros(0, np.float32)
    int4 = quantize_rtn(w, 4, BLOCK, False)
    b4, s4, z4 = int4.packed()
    int3 = quantize_rtn(w, 3, BLOCK, False)
    b3, s3, z3 = int3.packed_intn()
    fp8 = quantize_weight_fp8(w, 1)
    codes, scale = np.ascontiguousarray(fp8.q.view(np.uint8).T), fp8.scale.astype(np.float32)  # W^T bytes
    attrs = {"K": k, "N": n, "block_size": BLOCK}
    paths = {
        "fp32": _single_node(folder / "fp32.onnx", [helper.make_node("MatMul", ["a", "w"], ["y"])], k, {"w": w},
                             {"": 17}),
        "int4 NBits": _single_node(folder / "int4.onnx", [helper.make_node(
            "MatMulNBits", ["a", "b", "s", "z"], ["y"], domain="com.microsoft", bits=4, accuracy_level=4, **attrs)],
            k, {"b": b4, "s": s4, "z": z4}, {"": 17, "com.microsoft": 1}),
        "int3 PyOp": _single_node(folder / "int3.onnx", [helper.make_node(
            "MatMulIntN", ["a", "b", "s", "z", "bias"], ["y"], domain="ai.qcompiler", bits=3, **attrs)],
            k, {"b": b3, "s": s3, "z": z3, "bias": empty}, {"": 17, "ai.qcompiler": 1}),
        "fp8 DQ+MatMul": _single_node(folder / "fp8_dq.onnx", [
            helper.make_node("DequantizeLinear", ["w8", "scale"], ["w"], axis=1),
            helper.make_node("MatMul", ["a", "w"], ["y"])], k,
            {"w8": fp8.q, "scale": scale}, {"": 19}),
        "fp8 PyOp": _single_node(folder / "fp8_fused.onnx", [helper.make_node(
            "MatMulFp8", ["a", "b", "scale", "bias"], ["y"], domain="ai.qcompiler", K=k, N=n)], k,
            {"b": codes, "scale": scale, "bias": empty}, {"": 17, "ai.qcompiler": 1}),
    }

    def int3_numpy(a: np.ndarray) -> np.ndarray:
        return custom_ops.matmul_intn(a, b3, s3, z3, empty, K=k, N=n, bits=3, block_size=BLOCK)

    return paths, int3_numpy


def _session(path: Path) -> Any:
    """An ORT session with :data:`THREADS` intra-op threads, no spinning, our ops registered when the model needs
    them (what :class:`qcompiler.runtime.Session` does for models with our ops; here for every variant alike)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if Session(path).custom_ops:
        custom_ops.register(options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _lists(session: Any, feed: dict[str, np.ndarray]) -> Any:
    _ortext.use_array_results(False)
    try:
        return session.run(None, feed)
    finally:
        _ortext.use_array_results(True)


def op_latency(rounds: int) -> list[str]:
    """The per-op table (markdown lines)."""
    rng = np.random.default_rng(0)
    folder = OUT_DIR / "custom_ops"
    folder.mkdir(parents=True, exist_ok=True)
    ms = ["| K x N | tokens | " + " | ".join(VARIANTS) + " |", "|---|---:|" + "---:|" * len(VARIANTS)]
    ratios = ["| K x N | tokens | int4 NBits | int3 PyOp | int3 PyOp lists | int3 numpy | fp8 DQ+MatMul | fp8 PyOp | "
              "fp8 PyOp / DQ+MatMul |", "|---|---:|" + "---:|" * 7]
    for k, n in SHAPES:
        paths, int3_numpy = _op_models(folder, k, n, rng)
        sessions = {name: _session(path) for name, path in paths.items()}
        for m in TOKENS:
            a = rng.standard_normal((m, k)).astype(np.float32)
            feed = {"a": a}
            reference = sessions["fp32"].run(None, feed)[0]
            for name, session in sessions.items():  # every variant computes the same product, up to its error
                error = np.linalg.norm(session.run(None, feed)[0] - reference) / np.linalg.norm(reference)
                assert error < 0.3, (name, error)
            runners = {name: (lambda s=s, f=feed: s.run(None, f)) for name, s in sessions.items()}
            runners["int3 PyOp lists"] = lambda s=sessions["int3 PyOp"], f=feed: _lists(s, f)
            runners["int3 numpy"] = lambda kernel=int3_numpy, x=a: kernel(x)
            result = measure_latency({v: runners[v] for v in VARIANTS}, warmup=3, rounds=rounds, per_round=5)
            med = {v: result[v].median for v in VARIANTS}
            ms.append(f"| {k}x{n} | {m} | " + " | ".join(f"{med[v] * 1e3:.3f}" for v in VARIANTS) + " |")
            ratios.append(f"| {k}x{n} | {m} | " + " | ".join(fmt_ratio(med[v] / med["fp32"]) for v in VARIANTS[1:])
                          + f" | {fmt_ratio(med['fp8 PyOp'] / med['fp8 DQ+MatMul'])} |")
    return ["### Per op: median ms", "", *ms, "", "### Per op: ratio to fp32 MatMul (same shape and tokens)", "",
            *ratios]


# ---------------------------------------------------------------- --llm: SmolLM2 perplexity and forward latency

LLM_VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "int4 b32 asym RTN (MatMulNBits)": {"recipe": "int4", "weight_only": {"block_size": 32, "symmetric": False}},
    "int3 b32 asym RTN (MatMulIntN)": {"recipe": "int3", "weight_only": {"block_size": 32, "symmetric": False}},
    "int3 b32 asym GPTQ (MatMulIntN)": {"recipe": "int3", "weight_only": {"block_size": 32, "symmetric": False,
                                                                          "algorithm": "gptq"}},
    "fp8-weight (DQ+MatMul)": {"recipe": "fp8-weight", "weight_only": {}},
    "fp8-fused (MatMulFp8)": {"recipe": "fp8-fused", "weight_only": {}},
}


def llm(eval_windows: int, rounds: int) -> list[str]:
    """Compile SmolLM2 with each of :data:`LLM_VARIANTS`, then perplexity and forward latency (markdown lines)."""
    import bench_llm

    from qcompiler.models._cache import cache_dir

    folder = bench_llm._ensure_model(cache_dir())
    work = OUT_DIR / "custom_ops_llm"
    work.mkdir(parents=True, exist_ok=True)
    src = folder / "model.onnx"
    rows: list[dict[str, Any]] = []
    for name, job in LLM_VARIANTS.items():
        row: dict[str, Any] = {"variant": name, "path": src, "compile_s": math.nan}
        rows.append(row)
        if job is None:
            continue
        dst = work / (name.split(" (")[0].replace(" ", "_") + ".onnx")
        print(f"[smollm2] {name}: compiling", file=sys.stderr)
        scratch = work / "scratch"
        scratch.mkdir(exist_ok=True)
        result = run_job(bench_llm.__file__, {"tool": "qcompile", **job, "input": str(src), "output": str(dst),
                                              "calib": str(folder / "calib.npz")}, cwd=scratch, timeout_s=1800)
        shutil.rmtree(scratch, ignore_errors=True)
        if not result.ok:
            raise RuntimeError(f"{name}: {result.error}")
        row.update(compile_s=result.seconds, path=dst)
    with np.load(folder / "eval.npz", allow_pickle=False) as data:
        windows = data["input_ids"][:eval_windows]
    sessions = {}
    for row in rows:
        print(f"[smollm2] {row['variant']}: perplexity", file=sys.stderr)
        sessions[row["variant"]] = session = _session(row["path"])
        start = time.perf_counter()
        row["ppl"] = bench_llm.perplexity(session, windows)
        row["eval_s"] = time.perf_counter() - start
        row["size"] = model_bytes(row["path"])
        row["custom_ops"] = ", ".join(Session(row["path"]).custom_ops) or "-"
    latency = {}
    for tokens in (8, 256):
        feed = {"input_ids": windows[:1, :tokens]}
        latency[tokens] = measure_latency({n: (lambda s=s, f=feed: s.run(None, f)) for n, s in sessions.items()},
                                          warmup=1, rounds=rounds, per_round=2)
    base = rows[0]
    lines = [f"### SmolLM2-135M ({len(windows)} windows of {windows.shape[1]} tokens)", "",
             "| variant | custom ops | perplexity | vs fp32 | size | 8-token ms | /fp32 | 256-token ms | /fp32 | "
             "compile s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        name = row["variant"]
        t8, t256 = latency[8][name].median, latency[256][name].median
        lines.append(f"| {name} | {row['custom_ops']} | {row['ppl']:.2f} | {(row['ppl'] / base['ppl'] - 1) * 100:+.1f}% "
                     f"| {fmt_bytes(row['size'])} | {t8 * 1e3:.1f} | {fmt_ratio(t8 / latency[8]['fp32'].median)} | "
                     f"{t256 * 1e3:.0f} | {fmt_ratio(t256 / latency[256]['fp32'].median)} | "
                     f"{'-' if math.isnan(row['compile_s']) else round(row['compile_s'])} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown section and write it to bench/out/custom_ops.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op and BLAS threads (read at start)")
    parser.add_argument("--llm", action="store_true", help="also SmolLM2-135M perplexity and forward latency")
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args(argv)
    lines = [environment_section(None), f"- onnxruntime-extensions {_ortext._extensions().__version__}; here "
             f"{THREADS} ORT intra-op thread(s) without spinning and {THREADS} BLAS thread(s)", "",
             *op_latency(args.rounds)]
    if args.llm:
        lines += ["", *llm(args.eval_windows, max(3, args.rounds // 2))]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "custom_ops.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
