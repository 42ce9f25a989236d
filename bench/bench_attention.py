"""Does ``fuse-attention`` (com.microsoft.MultiHeadAttention) pay on CPU? MiniLM with and without it, same run.

Compiles the cached MiniLM (``models/export_minilm.py``) with the ``float`` and ``int8-dynamic`` recipes, each with
and without ``--plugin fuse-attention``, checks that each pair agrees, and times batch-1 inference over one
128-token sentence, interleaved (2 intra-op threads, medians). Run: ``python bench/bench_attention.py``; prints a
markdown section.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_section, make_session, measure_latency  # noqa: E402 - sibling module

from qcompiler.api import compile_model  # noqa: E402
from qcompiler.models._cache import model_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    folder = model_dir("minilm-l6-v2")
    src = folder / "model.onnx"
    with np.load(folder / "eval.npz") as data:
        feed = {key: data[key][:1] for key in data.files}
    with tempfile.TemporaryDirectory() as work:
        paths = {}
        for recipe in ("float", "int8-dynamic"):
            for fused in (False, True):
                name = f"{recipe}{' + fuse-attention' if fused else ''}"
                paths[name] = Path(work) / f"{name.replace(' ', '_')}.onnx"
                compile_model(src, paths[name], recipe=recipe, plugins=["fuse-attention"] if fused else [])
        sessions = {name: make_session(path) for name, path in paths.items()}
        outputs = {name: s.run(None, feed)[0] for name, s in sessions.items()}
        runners = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
        times = measure_latency(runners, warmup=5, rounds=args.rounds, per_round=5)
    lines = [environment_section(None), "", "| model | ms (p90) | vs without fuse-attention | max abs diff |",
             "|---|---|---|---|"]
    for name in paths:
        plain = name.replace(" + fuse-attention", "")
        ratio = times[name].median / times[plain].median
        diff = float(np.abs(outputs[name] - outputs[plain]).max())
        lines.append(f"| {name} | {times[name].median * 1e3:.2f} ({times[name].p90 * 1e3:.2f}) | {ratio:.3f}x | "
                     f"{diff:.2e} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
