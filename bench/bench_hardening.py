"""Bounded resources (issue 12, class 6): a 1,000,000-node compile and shape inference of a huge declared input.

Cases, each compiled by ``qcompile`` in a fresh child process whose wall time and peak RSS (``VmHWM`` through
``/usr/bin/time -v`` when present, else ``ru_maxrss`` of the child) are measured:

- ``chain``: a chain of ``--nodes`` elementwise ops ``h = Relu(Mul(Add(h, a_i), m_i))`` over ``[1, 16]`` float
  activations with 16 shared small constants (no weight work: the pass manager, shape inference, folding,
  dead-code removal, fusion rules, annotation, lowering and the save have to scale);
- ``matmul``: the same chain with one ``MatMul`` by its own 16x16 weight every ``--matmul-every`` nodes (about
  1,000 MatMuls at 1M nodes), so the default recipe quantizes each one;
- ``huge-input``: a model of a few KB whose inputs declare ``[2**14, 2**14]`` and ``[2**28]`` floats (1 GiB each)
  with a Shape/ConstantOfShape/Expand/Tile/Range/Reshape chain and a MatMul: ONNX data propagation would make
  2**28 dims per 1-D value and constant folding would evaluate a 2**28-element Range.

Target (issue 12): the 1M-node cases compile with the default recipe (int8-dynamic) in under 2 minutes and 4 GB of
peak RSS on the 2-core CI machine; the huge-input case in seconds and a few hundred MB.

Usage::

    python bench/bench_hardening.py [--nodes 1000000] [--matmul-every 1000] [--cases chain,matmul,huge-input]
                                    [--log2-elements 28] [--keep DIR] [--pythonpath DIR] [--profile]

Prints a markdown table. ``--pythonpath DIR`` runs the compiles against another copy of the package (e.g. a
baseline: ``git archive HEAD`` unpacked, with ``passes/`` and ``runtime/`` copied into its ``qcompiler/``);
``--profile`` runs the first case in-process under cProfile instead and prints the top functions (for finding what
does not scale). Peak RSS is the child's own high-water mark, Python interpreter and libraries included.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

D = 16  # activation width
N_CONSTANTS = 16  # shared elementwise constants


def _init(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)


def build_chain(n_nodes: int, matmul_every: int = 0, seed: int = 0) -> ir.Model:
    """About ``n_nodes`` nodes: Add/Mul/Relu by shared constants, and a MatMul every ``matmul_every`` nodes."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    consts = [_init(f"c{i}", rng.uniform(0.5, 1.5, D).astype(f32)) for i in range(N_CONSTANTS)]
    initializers = list(consts)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, D]))
    nodes: list[ir.Node] = []
    h = x
    ops = ("Add", "Mul", "Relu")
    for i in range(n_nodes):
        if matmul_every and i % matmul_every == matmul_every - 1:
            w = _init(f"w{i}", (rng.standard_normal((D, D)) / np.sqrt(D)).astype(f32))
            initializers.append(w)
            node = ir.Node("", "MatMul", [h, w], name=f"n{i}")
        else:
            op = ops[i % 3]
            inputs = [h] if op == "Relu" else [h, consts[i % N_CONSTANTS]]
            node = ir.Node("", op, inputs, name=f"n{i}")
        out = node.outputs[0]
        out.name = f"v{i}"
        nodes.append(node)
        h = out
    h.type = ir.TensorType(ir.DataType.FLOAT)
    h.shape = ir.Shape([1, D])
    graph = ir.Graph([x], [h], nodes=nodes, initializers=initializers, opset_imports={"": 17}, name="chain")
    return ir.Model(graph, ir_version=8, producer_name="bench_hardening")


def build_huge_input(log2_elements: int = 28) -> ir.Model:
    """A tiny model whose input declares 2**log2_elements float elements, with shape-derived constants."""
    side = 1 << (log2_elements // 2)
    other = 1 << (log2_elements - log2_elements // 2)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([side, other]))
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value | None], **attrs: object) -> ir.Value:
        node = ir.Node("", op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                       name=f"{op.lower()}{len(nodes)}")
        node.outputs[0].name = f"{node.name}_out"
        nodes.append(node)
        return node.outputs[0]

    shape = add("Shape", [x])
    zeros = add("ConstantOfShape", [shape], value=ir.tensor(np.array([1.0], np.float32)))
    one = _init("one", np.array([1.0], np.float32))
    expanded = add("Expand", [one, shape])
    size = add("Size", [x])
    start = _init("start", np.array(0, np.int64))
    step = _init("step", np.array(1, np.int64))
    ramp = add("Range", [start, size, step])
    ramp_f = add("Cast", [ramp], to=ir.DataType.FLOAT)
    reps = _init("reps", np.array([1, 1], np.int64))
    tiled = add("Tile", [expanded, reps])
    flat = add("Reshape", [tiled, _init("flat", np.array([-1], np.int64))])
    y = add("Add", [add("Mul", [x, zeros]), tiled])
    total = add("ReduceSum", [add("Add", [flat, ramp_f])], keepdims=0)
    w = _init("w", np.full((other, 4), 0.5, np.float32))
    projected = add("MatMul", [y, w])
    v = ir.Value(name="v", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([side * other]))
    doubled = add("Cast", [add("Add", [v, v])], to=ir.DataType.FLOAT)
    for out, shape in ((projected, [side, 4]), (total, []), (doubled, [side * other])):
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(shape)
    initializers = [one, start, step, reps, flat.producer().inputs[1], w]
    graph = ir.Graph([x, v], [projected, total, doubled], nodes=nodes, initializers=initializers,
                     opset_imports={"": 17}, name="huge")
    return ir.Model(graph, ir_version=8, producer_name="bench_hardening")


def _time_child(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS MiB, last stderr line) of ``command`` in a child process."""
    timer = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None  # GNU time: -v reports the peak RSS
    start = time.perf_counter()
    if timer:
        proc = subprocess.run([timer, "-v", *command], cwd=cwd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = int(match.group(1)) / 1024 if match else float("nan")
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith("qcompile")]
    else:  # pragma: no cover - no GNU time
        import resource

        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        err = proc.stderr.splitlines()
    return proc.returncode, wall, peak, (err[-1] if err else "")


def _profile(path: Path, out: Path) -> None:
    import cProfile
    import pstats

    from qcompiler.api import compile_model

    profiler = cProfile.Profile()
    profiler.enable()
    compile_model(path, out)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--matmul-every", type=int, default=1000)
    parser.add_argument("--log2-elements", type=int, default=28)
    parser.add_argument("--cases", default="chain,matmul,huge-input")
    parser.add_argument("--recipe", default="int8-dynamic")
    parser.add_argument("--keep", help="build the models in this folder and keep them")
    parser.add_argument("--pythonpath", help="run the compiles with this PYTHONPATH first (a baseline tree)")
    parser.add_argument("--profile", action="store_true", help="profile the first case in-process")
    args = parser.parse_args(argv)
    env = None
    if args.pythonpath:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.pythonpath, os.environ.get("PYTHONPATH", "")]))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-hardening-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for case in args.cases.split(","):
            path = work / f"{case}.onnx"
            t0 = time.perf_counter()
            if case == "chain":
                model = build_chain(args.nodes)
            elif case == "matmul":
                model = build_chain(args.nodes, args.matmul_every)
            elif case == "huge-input":
                model = build_huge_input(args.log2_elements)
            else:
                parser.error(f"unknown case {case!r}")
            n_nodes = len(model.graph)
            ir.save(model, path)
            del model
            build_s = time.perf_counter() - t0
            out = work / f"{case}.q.onnx"
            if args.profile:
                _profile(path, out)
                return 0
            command = [sys.executable, "-m", "qcompiler.cli", str(path), "-o", str(out), "--recipe", args.recipe,
                       "-q"]
            code, wall, peak, err = _time_child(command, work, env)
            out_nodes = "–"
            if code == 0:
                import onnx

                out_nodes = f"{len(onnx.load(str(out), load_external_data=False).graph.node):,}"
            rows.append((case, f"{n_nodes:,}", f"{path.stat().st_size / 1e6:.2f} MB", f"{build_s:.1f}", code,
                         f"{wall:.1f}", f"{peak:.0f}", out_nodes, err))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"recipe {args.recipe}; python {sys.version.split()[0]}; nproc {os.cpu_count()}"
          f"{'; PYTHONPATH ' + args.pythonpath if args.pythonpath else ''}")
    print("| case | nodes | file | build s | exit | compile wall s | peak RSS MiB | output nodes | stderr |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
