"""Bounded resources (issue 12, class 6): no hang on a FIFO, no allocation from a declared size, linear scaling.

- ``--calib``/``--tokenizer``/a calibration folder naming a FIFO: exit 2 with one line, at once (each CLI run is a
  child process with a time limit, so a regression fails instead of hanging the suite);
- ``.npz``/``.npy`` whose headers declare more than the file holds, or more than the memory budget: refused before
  the array is allocated (tracemalloc sees numpy's allocations);
- a model of a few KB declaring 2**28-element inputs: shape inference skips data propagation (counted, with its
  reason) and constant folding skips the 2**28-element results before evaluating them; the compile takes seconds
  and little memory;
- compile time grows about linearly with the graph (a 4x larger chain takes less than 8x as long).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import numpy.lib.format as npformat
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration import _numpy_files
from qcompiler.calibration.cache import load_statistics
from qcompiler.calibration.data import load_calibration_data
from qcompiler.errors import CalibrationError
from qcompiler.passes.canonicalize import FoldConstantsPass, InferShapesPass

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only (FIFOs, /proc)")

K = 8
_CHILD_TIMEOUT = 120  # seconds; a hang is a failure, not a stuck suite


# -- models and files ------------------------------------------------------------------------------------------------
def _mlp(path: Path) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (K, K)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", K])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _token_model(path: Path) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, K)).astype(np.float32), "w")
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "tok", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, K])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _npy_bytes(shape: tuple[int, ...], data: bytes = b"", descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def _npz(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, blob in members.items():
            archive.writestr(f"{name}.npy", blob)
    return path


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``qcompile ARGS`` in a child process that must finish within the time limit."""
    return subprocess.run([sys.executable, "-m", "qcompiler.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=_CHILD_TIMEOUT)


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:") and "Traceback" not in proc.stderr, lines
    assert proc.stdout == ""
    return lines[0]


# -- FIFOs -------------------------------------------------------------------------------------------------------------
def test_fifo_as_calib_is_refused_at_once(tmp_path: Path) -> None:
    model = _mlp(tmp_path / "m.onnx")
    os.mkfifo(tmp_path / "calib.npz")
    start = time.perf_counter()
    line = _one_line(_cli([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib",
                           str(tmp_path / "calib.npz")], tmp_path))
    assert "FIFO" in line and "calib.npz" in line
    assert time.perf_counter() - start < 60
    assert sorted(os.listdir(tmp_path)) == ["calib.npz", "m.onnx"]


def test_fifo_as_tokenizer_is_refused_at_once(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    model = _token_model(tmp_path / "m.onnx")
    (tmp_path / "c.txt").write_text("some calibration text " * 20, encoding="utf-8")
    os.mkfifo(tmp_path / "tokenizer.json")
    line = _one_line(_cli([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib",
                           str(tmp_path / "c.txt"), "--tokenizer", str(tmp_path / "tokenizer.json")], tmp_path))
    assert "FIFO" in line and "tokenizer" in line


def test_fifo_and_symlink_inside_a_calibration_folder_are_refused(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(onnx.load(_mlp(tmp_path / "m.onnx")))
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.ones((2, K), np.float32))
    os.mkfifo(folder / "b.npz")
    with pytest.raises(CalibrationError, match="FIFO"):
        load_calibration_data(folder, model)
    os.remove(folder / "b.npz")
    np.savez(tmp_path / "outside.npz", x=np.ones((2, K), np.float32))
    os.symlink(tmp_path / "outside.npz", folder / "b.npz")
    with pytest.raises(CalibrationError, match="symlink"):
        load_calibration_data(folder, model)
    os.remove(folder / "b.npz")
    assert load_calibration_data(folder, model).num_samples == 2
    # a file the user names is read through a symlink (users link their data)
    assert load_calibration_data(tmp_path / "outside.npz", model).num_samples == 2


def test_fifo_in_the_calibration_cache_is_a_miss(tmp_path: Path) -> None:
    key = "0" * 64
    os.mkfifo(tmp_path / f"calib-{key}.npz")
    start = time.perf_counter()
    assert load_statistics(tmp_path, key, ["v"]) is None
    assert time.perf_counter() - start < 5


# -- zip bombs ---------------------------------------------------------------------------------------------------------
def _refused_small(path: Path, model: ir.Model, needle: str) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(CalibrationError) as info:
            load_calibration_data(path, model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert peak < 8 << 20, f"{peak} bytes allocated before refusing"
    return message


def test_npz_member_declaring_2_40_elements_is_refused_before_allocating(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(onnx.load(_mlp(tmp_path / "m.onnx")))
    bomb = _npz(tmp_path / "bomb.npz", {"x": _npy_bytes((1 << 37, K), b"\0" * 64)})
    assert bomb.stat().st_size < 1024
    message = _refused_small(bomb, model, "declares shape")
    assert "member 'x'" in message


def test_npz_member_declaring_more_than_its_entry_holds_is_refused(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(onnx.load(_mlp(tmp_path / "m.onnx")))
    short = _npz(tmp_path / "short.npz", {"x": _npy_bytes((1000, K), b"\0" * 40)}, zipfile.ZIP_DEFLATED)
    _refused_small(short, model, "holds only 40 bytes")
    npy = tmp_path / "short.npy"
    npy.write_bytes(_npy_bytes((1 << 40, K), b"\0" * 32))
    _refused_small(npy, model, "declares shape")


def test_npz_over_the_memory_budget_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real zip bomb in miniature: 16 MiB of zeros deflated to a few KB, over a budget lowered to 1 MiB."""
    model = ir.serde.deserialize_model(onnx.load(_mlp(tmp_path / "m.onnx")))
    rows = (16 << 20) // (4 * K)
    bomb = _npz(tmp_path / "bomb.npz", {"x": _npy_bytes((rows, K), bytes(rows * K * 4))}, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 64 << 10
    monkeypatch.setattr(_numpy_files, "MEMORY_BUDGET", 1 << 20)
    _refused_small(bomb, model, "more than the memory budget")
    monkeypatch.setattr(_numpy_files, "MEMORY_BUDGET", 1 << 30)
    assert load_calibration_data(bomb, model).num_samples == rows  # within the budget the same file is read


def test_object_arrays_and_foreign_members_are_refused(tmp_path: Path) -> None:
    model = ir.serde.deserialize_model(onnx.load(_mlp(tmp_path / "m.onnx")))
    pickled = _npz(tmp_path / "p.npz", {"x": _npy_bytes((2, K), b"\x80\x04N.", descr="|O")})
    _refused_small(pickled, model, "pickled or object data")
    with zipfile.ZipFile(tmp_path / "f.npz", "w") as archive:
        archive.writestr("x", b"raw bytes")
    _refused_small(tmp_path / "f.npz", model, "is not an .npy array")


def test_bomb_through_the_cli_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from qcompiler.cli import main

    model = _mlp(tmp_path / "m.onnx")
    bomb = _npz(tmp_path / "bomb.npz", {"x": _npy_bytes((1 << 40,), b"")})
    before = sorted(os.listdir(tmp_path))
    code = main([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib", str(bomb)])
    err = capfd.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "declares shape" in err, err
    assert sorted(os.listdir(tmp_path)) == before


# -- shape inference and folding of huge declared sizes ---------------------------------------------------------------
def _huge_model(log2: int = 28) -> onnx.ModelProto:
    """A few KB: x[2**(log2/2), 2**(log2/2)] flattened and shape-derived constants; v[2**log2] added to itself; a
    small MatMul for the quantizer."""
    side = 1 << (log2 // 2)
    inits = [numpy_helper.from_array(np.array([1.0], np.float32), "one"),
             numpy_helper.from_array(np.array(0, np.int64), "start"),
             numpy_helper.from_array(np.array(1, np.int64), "step"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.full((K, 2), 0.5, np.float32), "w")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["zeros"]),
             helper.make_node("Expand", ["one", "s"], ["e"]),
             helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Range", ["start", "n", "step"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["e", "flat"], ["ef"]),
             helper.make_node("Add", ["ef", "rf"], ["sum1"]),
             helper.make_node("ReduceSum", ["sum1"], ["total"], keepdims=0),
             helper.make_node("Mul", ["x", "zeros"], ["xz"]),
             helper.make_node("MatMul", ["z", "w"], ["y"], name="fc"),
             helper.make_node("Add", ["v", "v"], ["vv"])]
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [side, side]),
                                              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1 << log2]),
                                              helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("xz", TensorProto.FLOAT, [side, side]),
                               helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("vv", TensorProto.FLOAT, [1 << log2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_huge_declared_inputs_compile_in_seconds_and_little_memory(tmp_path: Path) -> None:
    onnx.save(_huge_model(), tmp_path / "huge.onnx")
    assert (tmp_path / "huge.onnx").stat().st_size < 16 << 10
    script = ("import sys; from qcompiler.cli import main; code = main(sys.argv[1:]); "
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
              "print('HWM', hwm); sys.exit(code)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "huge.onnx"), "-o", str(tmp_path / "o.onnx"),
                           "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=_CHILD_TIMEOUT)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stdout.split("HWM")[1].split()[0]) / 1024
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
    assert seconds < 60, seconds
    onnx.checker.check_model(onnx.load(tmp_path / "o.onnx"), full_check=True)


def test_data_propagation_skip_is_counted_with_its_reason() -> None:
    model = ir.serde.deserialize_model(_huge_model())
    result = InferShapesPass()(model)
    assert result.stats.counters["data_prop_skipped"] == 1
    [(node, reason)] = result.stats.skips
    assert reason.startswith("data propagation skipped:"), reason
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert list(values["xz"].shape) == [1 << 14, 1 << 14]  # inference without propagation still ran
    # a declared 1-D input alone is enough to skip it
    small = ir.serde.deserialize_model(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[268435456] v, float[2, 3] x) => (float[268435456] w, float[3, 2] y) {
            w = Add(v, v)
            s = Shape(x)
            r = Reshape(x, s)
            y = Transpose<perm = [1, 0]>(r)
        }"""))
    result = InferShapesPass()(small)
    assert result.stats.counters["data_prop_skipped"] == 1
    assert "268435456 elements" in result.stats.skips[0][1]


def test_folding_skips_huge_results_before_evaluating() -> None:
    model = ir.serde.deserialize_model(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y, int64[N] r, float[M] c, float[P, Q] e, float[R, S] t) {
            start = Constant<value = int64 {0}>()
            limit = Constant<value = int64 {268435456}>()
            step = Constant<value = int64 {1}>()
            r = Range(start, limit, step)
            shape = Constant<value = int64[2] {16384, 16384}>()
            c = ConstantOfShape(shape)
            one = Constant<value = float[1, 1] {1.0}>()
            e = Expand(one, shape)
            reps = Constant<value = int64[2] {16384, 16384}>()
            t = Tile(one, reps)
            two = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
            y = Add(x, two)
        }"""))
    tracemalloc.start()
    try:
        result = FoldConstantsPass()(model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
    reasons = {name: reason for name, reason in result.stats.skips}
    assert sorted(reasons) == ["ConstantOfShape", "Expand", "Range", "Tile"], reasons
    assert all("too large to fold (268435456 elements" in r for r in reasons.values()), reasons


# -- scaling -----------------------------------------------------------------------------------------------------------
def _chain_proto(n: int) -> onnx.ModelProto:
    """``n`` elementwise nodes (Add/Mul/Relu by shared constants) and a MatMul every 500."""
    rng = np.random.default_rng(0)
    consts = [numpy_helper.from_array(rng.uniform(0.5, 1.5, K).astype(np.float32), f"c{i}") for i in range(8)]
    inits, nodes, h = list(consts), [], "x"
    for i in range(n):
        if i % 500 == 499:
            inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (K, K)).astype(np.float32), f"w{i}"))
            node = helper.make_node("MatMul", [h, f"w{i}"], [f"v{i}"], name=f"n{i}")
        elif i % 3 == 2:
            node = helper.make_node("Relu", [h], [f"v{i}"], name=f"n{i}")
        else:
            node = helper.make_node("Add" if i % 3 == 0 else "Mul", [h, f"c{i % 8}"], [f"v{i}"], name=f"n{i}")
        nodes.append(node)
        h = f"v{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _chain(path: Path, n: int) -> Path:
    onnx.save(_chain_proto(n), path)
    return path


def test_compile_time_grows_about_linearly(tmp_path: Path) -> None:
    from qcompiler.api import compile_model

    times = {}
    for n in (5_000, 20_000):
        src = _chain(tmp_path / f"c{n}.onnx", n)
        start = time.perf_counter()
        compile_model(src, tmp_path / f"c{n}.q.onnx")
        times[n] = time.perf_counter() - start
    assert times[20_000] < 60, times
    assert times[20_000] < 8 * times[5_000], times  # quadratic growth would be 16x


# -- the linear-time replacements give the same model ------------------------------------------------------------------
_SUBGRAPHS = """
<ir_version: 10, opset_import: ["" : 18, "local": 1]>
g (float[2, 3] x, bool c, float[3] s, float[3] b, float[3] mean, float[3] var) => (float[2, 3] y, float[2, 3] z) {
  d, mask = Dropout(x)
  dead = Relu(x)
  t = Clip(d, , )
  u = BatchNormalization<training_mode = 0>(t, s, b, mean, var)
  f = local.f(u)
  y = If(c) <then_branch = g1 () => (float[2, 3] a) { k = Neg(f) a = Relu(f) },
             else_branch = g2 () => (float[2, 3] q) { q = Neg(f) }>
  z = Abs(t)
}
<domain: "local", opset_import: ["" : 18]>
f (x) => (y) { y = Abs(x) }
"""


def test_chunked_serialization_parses_to_onnx_irs_proto(monkeypatch: pytest.MonkeyPatch) -> None:
    from qcompiler import _serialize

    monkeypatch.setattr(_serialize, "CHUNK_NODES", 2)  # several chunks even for a small graph
    model = ir.serde.deserialize_model(onnx.parser.parse_model(_SUBGRAPHS))
    for node in model.graph:
        for value in node.outputs:
            value.meta["quant_parameter_tensor_names"] = {"scale": "s"}  # annotations travel with their chunk
            break
    parsed = onnx.ModelProto()
    parsed.ParseFromString(_serialize.model_to_bytes(model))
    assert parsed == ir.serde.serialize_model(model)
    chain = ir.serde.deserialize_model(_chain_proto(50))
    parsed.ParseFromString(_serialize.model_to_bytes(chain))
    assert parsed == ir.serde.serialize_model(chain)


def test_dead_code_removal_matches_onnx_ir() -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from qcompiler.passes.canonicalize import RemoveDeadCodePass

    ours = ir.serde.deserialize_model(onnx.parser.parse_model(_SUBGRAPHS))
    theirs = ir.serde.deserialize_model(onnx.parser.parse_model(_SUBGRAPHS))
    result = RemoveDeadCodePass()(ours)
    RemoveUnusedNodesPass()(theirs)
    assert result.modified and result.stats.counters["nodes_removed"] == 2  # Relu and the If branch's Neg
    assert ir.serde.serialize_model(ours) == ir.serde.serialize_model(theirs)
