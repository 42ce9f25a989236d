"""``nf4-dq`` (NF4 with double-quantized absmax): the second level's bounds, ONNX Runtime rebuilding the absmax
bit for bit from the stored bytes, the decode used by parity reports, and a smaller file than ``nf4``."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import compile_model
from qcompiler.formats import get_format
from qcompiler.formats.decode import initializer_arrays, layer_codes
from qcompiler.formats.nf4 import nf4_absmax, quantize_nf4
from qcompiler.formats.nf4_dq import GROUP, double_quantize_absmax, quantize_nf4_dq, served_absmax


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 3 * GROUP + 7), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["spread", "equal", "tiny", "huge"]))
def test_second_level_bounds(n, seed, kind):
    rng = np.random.default_rng(seed)
    absmax = {"spread": rng.uniform(0.01, 3.0, n), "equal": np.full(n, 0.37), "tiny": rng.uniform(1e-30, 1e-29, n),
              "huge": rng.uniform(1e30, 3e30, n)}[kind].astype(np.float32)
    codes, step, offset, served = double_quantize_absmax(absmax)
    groups = -(-n // GROUP)
    assert codes.shape == (groups * GROUP,) and step.shape == offset.shape == (groups,)
    assert served.dtype == np.float32 and served.shape == (n,) and np.all(served > 0)
    group = np.arange(n) // GROUP
    assert np.all(served >= offset[group])  # never below the group's smallest absmax
    error = np.abs(served.astype(np.float64) - absmax.astype(np.float64))
    gap = (2 * codes[:n].astype(np.float64) + 1) * step[group]  # the quadratic grid's gap around the chosen code
    assert np.all(error <= gap * 0.5 * (1 + 1e-6) + np.spacing(served) * 4)
    if kind == "spread":  # dense near the smallest: relative error at most sqrt(R - 1) / 510 for a spread of R
        spread = float(absmax.max()) / float(absmax.min()) - 1
        assert np.all(error / absmax <= spread ** 0.5 / 510 + spread / 255**2 / 2 + 1e-6)
    if kind == "equal":
        assert np.array_equal(served, absmax)
    squared = codes.reshape(groups, GROUP).astype(np.float32) ** 2
    rebuilt = (squared * step[:, None] + offset[:, None]).reshape(-1)[:n]
    assert np.array_equal(rebuilt, served)  # what the ONNX graph computes
    assert np.array_equal(served_absmax(codes.reshape(groups, GROUP), step, offset).reshape(-1)[:n], served)


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_compiled_nf4_dq_serves_the_double_quantized_absmax(tmp_path):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((640, 200)) * rng.uniform(0.2, 2.0, (1, 200))).astype(np.float32)
    onnx.save(_matmul_model(weight), tmp_path / "m.onnx")
    sizes = {}
    for name in ("nf4", "nf4-dq"):
        compile_model(tmp_path / "m.onnx", tmp_path / f"{name}.onnx", recipe="nf4",
                      weight_only={"format": name, "lm_head": "same"})
        sizes[name] = (tmp_path / f"{name}.onnx").stat().st_size
    assert sizes["nf4-dq"] < sizes["nf4"] - 5000  # 2,000 absmax: 8 kB as float32, about 2 kB as bytes
    expected = quantize_nf4_dq(weight, 64)
    compiled = onnx.load(str(tmp_path / "nf4-dq.onnx"))
    node = next(n for n in compiled.graph.node if n.op_type == "MatMulBnb4")
    decoded = layer_codes(node, initializer_arrays(compiled))
    assert np.array_equal(decoded.codes, expected.codes) and np.array_equal(decoded.scales, expected.absmax)
    x = rng.standard_normal((3, 640)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "nf4-dq.onnx")).run(None, {"x": x})[0]
    reference = np.maximum(x.astype(np.float64) @ expected.dequantize().astype(np.float64), 0)
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)
    codes, absmax = quantize_nf4(weight, 64)
    assert np.array_equal(nf4_absmax(weight, 64), absmax)
    assert np.mean(expected.codes != codes) < 0.05  # mostly the same codes; the served absmax moved some


def test_nf4_dq_is_a_registered_format():
    fmt = get_format("nf4-dq")
    assert fmt.bits == 4 and fmt.kernels(fmt.spec(block_size=64)) == ("com.microsoft.MatMulBnb4",)


def test_gpu_executor_runs_nf4_dq_on_its_cpu_path(tmp_path):
    import pytest

    pytest.importorskip("torch")
    from qcompiler.runtime import Session

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((256, 96)).astype(np.float32)
    onnx.save(_matmul_model(weight), tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", tmp_path / "dq.onnx", recipe="nf4",
                  weight_only={"format": "nf4-dq", "lm_head": "same"})
    x = rng.standard_normal((2, 256)).astype(np.float32)
    expected = Session(str(tmp_path / "dq.onnx")).run({"x": x})["y"]
    got = Session(str(tmp_path / "dq.onnx"), device="torch-cpu").run({"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
