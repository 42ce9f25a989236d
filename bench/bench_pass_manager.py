"""Time the float recipe's passes (canonicalize + fuse + finalize) on a generated 50,000-node graph.

The graph does no weight work: a chain of blocks ``h = Tanh(Identity(Relu(MatMul(h, W) + b)))`` over ``[1, 16]``
activations with one shared 16x16 weight, plus, every ``conv_every`` blocks, a Conv + BatchNormalization + Relu
block (Reshape to ``[1, 4, 2, 2]`` and back) and a constant subexpression ``h * sqrt(k1 + k2)``. So every pass has
work at scale: shape inference of 50k nodes, folding, 10k Identity removals, 10k MatMul+Add -> Gemm fusions, BN
folds, 10k activation pairings, and the final sort and naming.

Usage::

    python bench/bench_pass_manager.py [--nodes 50000] [--conv-every 500] [--check] [--json PATH]

Prints a markdown table of per-pass seconds (target: under 10 s in total). ``--check`` also runs the model before
and after in ONNX Runtime and reports the largest relative difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.config import load_recipe
from qcompiler.pipelines import build_pipeline

logger = logging.getLogger("bench_pass_manager")

D = 16  # activation width
BLOCK_NODES = 5  # MatMul, Add, Relu, Identity, Tanh (keeps the 10k-deep chain bounded)
CONV_BLOCK_NODES = 5  # Reshape, Conv, BatchNormalization, Relu, Reshape
CONST_BLOCK_NODES = 5  # Constant, Constant, Add, Sqrt, Mul


def _init(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)


def build_graph(n_nodes: int, conv_every: int = 500, seed: int = 0) -> ir.Model:
    """A model of about ``n_nodes`` nodes (see the module docstring)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = {
        "W": _init("W", (rng.standard_normal((D, D)) * 0.5).astype(f32)),
        "b": _init("b", (rng.standard_normal(D) * 0.05).astype(f32)),
        "Wc": _init("Wc", (rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(f32)),
        "bn_g": _init("bn_g", rng.uniform(0.5, 1.5, 4).astype(f32)),
        "bn_b": _init("bn_b", rng.uniform(-0.1, 0.1, 4).astype(f32)),
        "bn_m": _init("bn_m", rng.uniform(-0.1, 0.1, 4).astype(f32)),
        "bn_v": _init("bn_v", rng.uniform(0.5, 1.5, 4).astype(f32)),
        "to_image": _init("to_image", np.array([1, 4, 2, 2], np.int64)),
        "to_row": _init("to_row", np.array([1, D], np.int64)),
    }
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, D]))
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], name: str, **attrs) -> ir.Value:
        node = ir.Node("", op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                       name=name)
        node.outputs[0].name = f"{name}_out"
        nodes.append(node)
        return node.outputs[0]

    h = x
    i = 0
    while len(nodes) + BLOCK_NODES <= n_nodes:
        mm = add("MatMul", [h, inits["W"]], f"mm{i}")
        biased = add("Add", [mm, inits["b"]], f"bias{i}")
        act = add("Relu", [biased], f"relu{i}")
        ident = add("Identity", [act], f"id{i}")
        h = add("Tanh", [ident], f"tanh{i}")
        i += 1
        if i % conv_every == 0 and len(nodes) + CONV_BLOCK_NODES + CONST_BLOCK_NODES <= n_nodes:
            img = add("Reshape", [h, inits["to_image"]], f"to_img{i}")
            conv = add("Conv", [img, inits["Wc"]], f"conv{i}")
            bn = add("BatchNormalization", [conv, inits["bn_g"], inits["bn_b"], inits["bn_m"], inits["bn_v"]],
                     f"bn{i}")
            act = add("Relu", [bn], f"conv_relu{i}")
            h = add("Reshape", [act, inits["to_row"]], f"to_row{i}")
            k1 = add("Constant", [], f"k1_{i}", value=ir.tensor(np.full(D, 0.5, f32)))
            k2 = add("Constant", [], f"k2_{i}", value=ir.tensor(np.full(D, 0.5, f32)))
            k = add("Sqrt", [add("Add", [k1, k2], f"ksum{i}")], f"ksqrt{i}")
            h = add("Mul", [h, k], f"kmul{i}")
    while len(nodes) < n_nodes:  # pad to the exact count
        h = add("Relu", [h], f"pad{len(nodes)}")
    graph = ir.Graph([x], [h], nodes=nodes, initializers=list(inits.values()), opset_imports={"": 21}, name="bench")
    return ir.Model(graph, ir_version=10)


def _run_ort(model: ir.Model, feed: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": feed})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50_000)
    parser.add_argument("--conv-every", type=int, default=500)
    parser.add_argument("--check", action="store_true", help="compare outputs before/after in ONNX Runtime")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = build_graph(args.nodes, args.conv_every)
    build_s = time.perf_counter() - start
    ops_before = len(model.graph)
    feed = np.random.default_rng(1).standard_normal((1, D)).astype(np.float32)
    expected = _run_ort(model, feed) if args.check else None

    pipeline = build_pipeline(load_recipe("float"))
    start = time.perf_counter()
    report = pipeline.run(model)
    total = time.perf_counter() - start

    rows = []
    for record in report.passes:
        counters = ", ".join(f"{k}={v}" for k, v in sorted(record.stats.counters.items()) if v)
        skips = ", ".join(f"{r}: {n}" for r, n in sorted(record.stats.skip_reasons().items()))
        rows.append((record.name, record.seconds, record.modified, counters, skips))
    print(f"float pipeline on a generated graph of {ops_before:,} nodes "
          f"(built in {build_s:.2f} s; Python {platform.python_version()}, {platform.machine()})\n")
    print("| pass | seconds | modified | counters | skipped |")
    print("|---|---:|---|---|---|")
    for name, seconds, modified, counters, skips in rows:
        print(f"| {name} | {seconds:.3f} | {modified} | {counters} | {skips} |")
    print(f"| **total** | **{total:.3f}** | | {len(model.graph):,} nodes after | |")
    result = {"nodes_before": ops_before, "nodes_after": len(model.graph), "total_seconds": total,
              "passes": [{"name": n, "seconds": s, "modified": m, "counters": c, "skipped": k}
                         for n, s, m, c, k in rows]}
    if expected is not None:
        actual = _run_ort(model, feed)
        rel = float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-12))
        print(f"\nmax relative difference vs the original in ONNX Runtime: {rel:.2e}")
        result["max_rel_diff"] = rel
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if total < 10.0 else 1


if __name__ == "__main__":
    sys.exit(main())
