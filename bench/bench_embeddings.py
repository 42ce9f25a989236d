"""int8 embedding tables (issue 17, item 3): size and accuracy of the int8 recipes with ``embedding = "int8"``
against ``"float"`` and against ONNX Runtime's ``quantize_dynamic``, in one run.

- ``minilm``: all-MiniLM-L6-v2 (the cache of ``models/export_minilm.py``): model bytes, mean and minimum cosine of
  the mask-mean-pooled embeddings against fp32 over eval.npz (157 sentences), latency at batch 8 x 128 (median of
  interleaved runs, 2 threads). Rows: int8-dynamic with and without ``--calib``, static int8 with ``--calib``
  (``--static``; minutes), the embedding tables alone (``op_types = ["Gemm"]``: no MatMul quantized) per row and
  in blocks of 32/128 (``GatherBlockQuantized``), and ``quantize_dynamic`` on MatMul/Gemm, on Gather alone and
  with its default op types.
- ``smollm2``: SmolLM2-135M (``models/export_smollm2.py``; its embedding is tied to the lm_head): model bytes,
  perplexity, mean KL and top-1 agreement against fp32 on ``--windows`` windows of eval.npz
  (:func:`qcompiler.quality.compare_models`). Rows: int8-dynamic with and without int8 embeddings, int8-weight
  (weight-only, its own GatherBlockQuantized embedding), ``quantize_dynamic`` with its default op types.

Run: ``python bench/bench_embeddings.py minilm [--static]`` or ``python bench/bench_embeddings.py smollm2
[--windows 8]``. Models are written under ``bench/out/embeddings``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, environment_section, make_session, measure_latency, model_bytes  # noqa: E402

from qcompiler.api import compile_model  # noqa: E402
from qcompiler.models._cache import model_dir  # noqa: E402

OUT = OUT_DIR / "embeddings"


def _compile(model: Path, name: str, config: dict[str, Any]) -> tuple[Path, float]:
    """Compile ``model`` with ``config`` (``compile_model`` arguments; ``{"ort": ops}`` for quantize_dynamic)."""
    out = OUT / f"{name}.onnx"
    start = time.perf_counter()
    if "ort" in config:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=config["ort"])
    else:
        config = dict(config)
        recipe = config.pop("block", None)
        if recipe is not None:  # GatherBlockQuantized blocks: a recipe that sets annotate-int8's pass option
            path = Path(tempfile.mkdtemp()) / "recipe.toml"
            path.write_text(f'name = "blocks"\nextends = "int8-dynamic"\n[pass-options.annotate-int8]\n'
                            f"embedding_block_size = {recipe}\n")
            config["recipe"] = str(path)
        compile_model(model, out, **config)
    return out, time.perf_counter() - start


def _minilm(static: bool) -> list[str]:
    folder = model_dir("minilm-l6-v2")
    model, calib = folder / "model.onnx", str(folder / "calib.npz")
    data = dict(np.load(folder / "eval.npz"))
    only_tables = {"op_types": ("Gemm",)}
    configs: dict[str, dict[str, Any]] = {
        "int8-dynamic, embedding float": {"recipe": "int8-dynamic", "quantization": {"embedding": "float"}},
        "int8-dynamic": {"recipe": "int8-dynamic"},
        "int8-dynamic --calib, embedding float": {"recipe": "int8-dynamic", "calib": calib,
                                                  "quantization": {"embedding": "float"}},
        "int8-dynamic --calib": {"recipe": "int8-dynamic", "calib": calib},
        "tables only, per row": {"recipe": "int8-dynamic", "quantization": only_tables},
        "tables only, blocks of 128": {"block": 128, "quantization": only_tables},
        "tables only, blocks of 32": {"block": 32, "quantization": only_tables},
        "ORT quantize_dynamic MatMul/Gemm": {"ort": ["MatMul", "Gemm"]},
        "ORT quantize_dynamic Gather only": {"ort": ["Gather"]},
        "ORT quantize_dynamic (default ops)": {"ort": None},
    }
    if static:
        configs["int8 --calib, embedding float"] = {"recipe": "int8", "calib": calib,
                                                   "quantization": {"embedding": "float"}}
        configs["int8 --calib"] = {"recipe": "int8", "calib": calib}

    def outputs(session: Any) -> np.ndarray:
        names = [i.name for i in session.get_inputs()]
        return np.concatenate([session.run(None, {n: data[n][i:i + 16] for n in names})[0]
                               for i in range(0, len(data["input_ids"]), 16)])

    def pooled(y: np.ndarray) -> np.ndarray:
        mask = data["attention_mask"].astype(np.float64)[..., None]
        return (y * mask).sum(1) / mask.sum(1)

    reference = pooled(outputs(make_session(model)))
    rows, sessions = [], {"fp32": make_session(model)}
    for name, config in configs.items():
        path, seconds = _compile(model, name.replace(" ", "_").replace(",", "").replace("/", "-"), config)
        sessions[name] = make_session(path)
        emb = pooled(outputs(sessions[name]))
        cos = (reference * emb).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(emb, axis=1))
        rows.append((name, model_bytes(path), cos.mean(), cos.min(), seconds))
    feed = {n: data[n][:8] for n in ("input_ids", "attention_mask", "token_type_ids")}
    latency = measure_latency({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, warmup=2,
                              rounds=5, per_round=3)
    base = latency["fp32"].median
    lines = [f"fp32: {model_bytes(model) / 1e6:.2f} MB, {base * 1e3:.1f} ms at batch 8 x 128", "",
             "| configuration | MB | cosine mean | cosine min | latency / fp32 | compile s |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {b / 1e6:.2f} | {m:.5f} | {lo:.5f} | {latency[n].median / base:.2f} | {s:.1f} |"
              for n, b, m, lo, s in rows]
    return lines


def _smollm2(windows: int) -> list[str]:
    from qcompiler import quality

    folder = model_dir("smollm2-135m")
    model = folder / "model.onnx"
    ids = np.load(folder / "eval.npz")["input_ids"][:windows]
    configs: dict[str, dict[str, Any]] = {
        "int8-dynamic, embedding float": {"recipe": "int8-dynamic", "quantization": {"embedding": "float"}},
        "int8-dynamic": {"recipe": "int8-dynamic"},
        "int8-weight": {"recipe": "int8-weight"},
        "ORT quantize_dynamic (default ops)": {"ort": None},
    }
    lines = [f"fp32: {model_bytes(model) / 1e6:.1f} MB; {windows} windows of {ids.shape[1]} tokens", "",
             "| configuration | MB | ppl fp32 | ppl | mean KL | top-1 agreement | latency / fp32 | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, config in configs.items():
        path, seconds = _compile(model, "smollm2_" + name.replace(" ", "_").replace(",", ""), config)
        r = quality.compare_models(model, path, ids, threads=2, latency_runs=3).to_dict()
        lines.append(f"| {name} | {model_bytes(path) / 1e6:.1f} | {r['ppl_float']:.3f} | {r['ppl_quant']:.3f} | "
                     f"{r['kl_mean']:.4f} | {r['top1_agreement']:.4f} | "
                     f"{r['latency_quant_ms'] / r['latency_float_ms']:.2f} | {seconds:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "smollm2"))
    parser.add_argument("--static", action="store_true", help="minilm: also static int8 with --calib (minutes)")
    parser.add_argument("--windows", type=int, default=8, help="smollm2: evaluation windows of 256 tokens")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    lines = _minilm(args.static) if args.model == "minilm" else _smollm2(args.windows)
    print(environment_section(sys.argv))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
