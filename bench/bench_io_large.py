"""Benchmark: load and round-trip a ~2.7 GB float model with external data, measuring time and peak RSS.

The generator streams the weights to disk in 16 MiB chunks (it never holds a whole tensor), then each measurement
runs in a fresh subprocess so that ``ru_maxrss`` is that step's peak:

- ``qcompiler.io.load_model`` (external tensors stay lazy),
- ``load_model`` + ``check_model`` (the checker without copying weights),
- ``load_model`` + ``save_model`` (the >2 GB path: streamed external data, atomic rename),
- ``onnx.load`` with external data, for comparison;
- ``qcompile`` weight-only int4 and int8 (RTN) of the whole model: weights are read, quantized and dropped one at a
  time, so the peak is about one weight's working set, not the model.

Disk use is bounded by two copies of the model (input and round-trip output; the output is deleted right after it
is verified) and everything is removed at the end. Prints a markdown table.

Usage: ``python bench/bench_io_large.py [--gib 2.5] [--dir /tmp] [--skip-onnx]``
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

__all__ = ["generate_model", "main"]

logger = logging.getLogger(__name__)

_CHUNK = 16 << 20
_DIM = 8192  # each weight is 8192 x 8192 float32 = 256 MiB

_STEPS = {
    "load": "from qcompiler import io\nmodel = io.load_model(SRC)",
    "load+check": "from qcompiler import io\nmodel = io.load_model(SRC)\nio.check_model(model)",
    "load+save": "from qcompiler import io\nmodel = io.load_model(SRC)\nio.save_model(model, OUT, input_path=SRC)",
    "onnx.load (all weights)": "import onnx\nmodel = onnx.load(SRC)",
    "qcompile --recipe int4 (RTN, block 32)": "from qcompiler.api import compile_model\n"
                                              "compile_model(SRC, OUT, recipe='int4')",
    "qcompile --recipe int8-weight (RTN)": "from qcompiler.api import compile_model\n"
                                           "compile_model(SRC, OUT, recipe='int8-weight')",
}

_RUNNER = """
import json, resource, sys, time
SRC, OUT = sys.argv[1], sys.argv[2]
import onnx, onnx_ir, qcompiler.io, qcompiler.api  # imports are not part of the measurement
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
{body}
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_kib": peak, "base_kib": base}}))
"""


def generate_model(folder: Path, gib: float) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data``: a chain of MatMuls over 8192x8192 float32 weights."""
    count = max(1, round(gib * (1 << 30) / (_DIM * _DIM * 4)))
    nbytes = _DIM * _DIM * 4
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal(_CHUNK // 4).astype(np.float32) * 0.01).tobytes()
    initializers, nodes = [], []
    with open(folder / "model.onnx.data", "wb") as f:
        for i in range(count):
            offset = f.tell()
            written = 0
            while written < nbytes:
                n = min(_CHUNK, nbytes - written)
                f.write(chunk[:n])
                written += n
            tensor = onnx.TensorProto(name=f"W{i}", data_type=onnx.TensorProto.FLOAT, dims=[_DIM, _DIM],
                                      data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(nbytes))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [f"h{i}" if i else "x", f"W{i}"], [f"h{i + 1}"], name=f"mm{i}"))
    graph = helper.make_graph(
        nodes, "big_chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, _DIM])],
        [helper.make_tensor_value_info(f"h{count}", onnx.TensorProto.FLOAT, [1, _DIM])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(model, path)
    return path


def _measure(step: str, src: Path, out: Path) -> dict[str, float]:
    code = _RUNNER.format(body=_STEPS[step])
    result = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.5, help="size of the weights in GiB (default 2.5)")
    parser.add_argument("--dir", default=None, help="where to put the temporary folder (default: system temp)")
    parser.add_argument("--skip-onnx", action="store_true", help="skip the onnx.load comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    work = Path(tempfile.mkdtemp(prefix="qcompiler-bench-io-", dir=args.dir))
    try:
        (work / "in").mkdir()
        (work / "out").mkdir()
        t0 = time.perf_counter()
        src = generate_model(work / "in", args.gib)
        size = _folder_bytes(work / "in")
        logger.info("generated %.2f GB in %.1f s", size / 1e9, time.perf_counter() - t0)
        out = work / "out" / "model.onnx"
        rows = []
        for step in _STEPS:
            if step.startswith("onnx.load") and args.skip_onnx:
                continue
            if step == "load+save":
                os.sync()
            if step.startswith("qcompile"):
                shutil.rmtree(work / "out", ignore_errors=True)
                (work / "out").mkdir()
            stats = _measure(step, src, out)
            rows.append((step, stats))
            logger.info("%s: %.2f s", step, stats["seconds"])
            if step == "load+save":
                (out_data,) = out.parent.glob("model.onnx.*.data")  # named by its content's sha256
                same = filecmp.cmp(src.with_name("model.onnx.data"), out_data, shallow=False)
                logger.info("round-trip output %.2f GB, data identical to the input: %s",
                            _folder_bytes(work / "out") / 1e9, same)
                if not same:
                    raise SystemExit("round trip changed the weights")
                shutil.rmtree(work / "out")
        lines = [f"Model: {size / 1e9:.2f} GB of float32 weights ({size / (1 << 30):.2f} GiB) in one external data "
                 f"file; CPU count {os.cpu_count()}; python {sys.version.split()[0]}.", "",
                 "| step | wall time (s) | peak RSS (MiB) | peak RSS above imports (MiB) |",
                 "|---|---:|---:|---:|"]
        for step, stats in rows:
            lines.append(f"| {step} | {stats['seconds']:.2f} | {stats['peak_kib'] / 1024:.0f} | "
                         f"{(stats['peak_kib'] - stats['base_kib']) / 1024:.0f} |")
        sys.stdout.write("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
