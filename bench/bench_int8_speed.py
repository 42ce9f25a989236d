"""Calibrate and check ``select-speed``'s cost model: int8 against fp32 latency in ONNX Runtime by model size.

Models (built here, random weights; speed does not depend on the values): small CNNs (3x3 Conv + ReLU stacks,
Flatten, Gemm) from 7 K to 20 M multiply-adds per image, and one-Gemm models from 4 K to 1 M multiply-adds per row.
Each is compiled with the ``int8`` recipe with ``select-speed``'s thresholds at 0 ("all int8", what the recipe
made before the pass), and with its defaults deciding for batch 1 and for ``--batch``; each is timed against fp32 at
the batch it was decided for (2 intra-op threads, interleaved rounds, medians: see :mod:`_common`). The ratios by
size show where int8 stops paying off, which is what ``DEFAULT_MIN_CONV_MACS`` and ``DEFAULT_MIN_MATMUL_MACS``
encode (:mod:`qcompiler.passes.algorithms._speed_cost`).

Run: ``python bench/bench_int8_speed.py [--batch 64] [--rounds 9]`` (about a minute); prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from types import MappingProxyType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_section, make_session, measure_latency  # noqa: E402

# (name, image size, input channels, conv widths (the first stride 1, then 2))
CNNS = (("cnn 8px 4-8", 8, 1, (4, 8)), ("cnn 16px 8-16", 16, 1, (8, 16)),
        ("cnn 32px 16-32-64", 32, 3, (16, 32, 64)), ("cnn 32px 32-64-128", 32, 3, (32, 64, 128)),
        ("cnn 64px 32-64-128-128", 64, 3, (32, 64, 128, 128)))
# (name, K, N)
GEMMS = (("gemm 64x64", 64, 64), ("gemm 128x128", 128, 128), ("gemm 256x256", 256, 256), ("gemm 1024x1024", 1024, 1024))


def _cnn(hw: int, cin: int, widths: tuple[int, ...]) -> tuple[object, int]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, cur, c, h, macs = [], [], "x", cin, hw, 0
    for i, w in enumerate(widths):
        s = 1 if i == 0 else 2
        inits += [numpy_helper.from_array((rng.standard_normal((w, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32),
                                          f"w{i}"), numpy_helper.from_array(np.full(w, 0.01, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4, strides=[s, s],
                                   name=f"conv{i}"), helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        h = (h + s - 1) // s
        macs += h * h * w * c * 9
        cur, c = f"r{i}", w
    inits += [numpy_helper.from_array((rng.standard_normal((10, c * h * h)) / np.sqrt(c * h * h)).astype(np.float32),
                                      "g"), numpy_helper.from_array(np.zeros(10, np.float32), "gb")]
    nodes += [helper.make_node("Flatten", [cur], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, macs


def _gemm(k: int, n: int) -> tuple[object, int]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="fc"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(n, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, k * n


def _recipe(**options: int) -> object:
    from qcompiler.config import load_recipe

    base = load_recipe("int8")
    return dataclasses.replace(base, pass_options=MappingProxyType({"select-speed": MappingProxyType(options)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    import onnx

    from qcompiler.api import compile_model

    print(environment_section(sys.argv))
    print("| model | MACs per image/row | batch | all int8 / fp32 | int8 (select-speed) / fp32 | kept float |")
    print("|---|---:|---:|---:|---:|---|")
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = [(name, *_cnn(hw, cin, widths), (cin, hw, hw)) for name, hw, cin, widths in CNNS]
        cases += [(name, *_gemm(k, n), (k,)) for name, k, n in GEMMS]
        for name, model, macs, shape in cases:
            fp32 = folder / "fp32.onnx"
            onnx.save(model, fp32)
            calib = {"x": rng.random((64, *shape), dtype=np.float32)}
            all_int8 = folder / "all_int8.onnx"
            compile_model(fp32, all_int8, recipe=_recipe(min_conv_macs=0, min_matmul_macs=0), calib=calib)
            for batch in (1, args.batch):
                chosen = folder / f"int8_b{batch}.onnx"
                result = compile_model(fp32, chosen, recipe=_recipe(batch=batch), calib=calib)
                layers = next(r for r in result.report.passes if r.name == "select-speed").stats.layers
                kept = ", ".join(n for n, f in layers.items() if f.get("speed") == "float") or "-"
                sessions = {k: make_session(p) for k, p in (("fp32", fp32), ("all", all_int8), ("int8", chosen))}
                x = rng.random((batch, *shape), dtype=np.float32)
                times = measure_latency({k: (lambda s=s, x=x: s.run(None, {"x": x})) for k, s in sessions.items()},
                                        rounds=args.rounds, per_round=max(3, min(100, int(2e8 / (macs * batch)))))
                base = times["fp32"].median
                print(f"| {name} | {macs:,} | {batch} | {times['all'].median / base:.2f} "
                      f"| {times['int8'].median / base:.2f} | {kept} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
