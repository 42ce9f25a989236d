"""The ai.qcompiler custom ops: the generic packing, the numpy kernels, their registration in ONNX Runtime through
onnxruntime-extensions, the model scan and the Session's checks (compiler side: test_weight_only_int3.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.runtime import Session, SessionError, custom_ops, packing
from qcompiler.runtime._onnx_scan import scan_model
from qcompiler.runtime.custom_ops import _ortext

F, U8 = TensorProto.FLOAT, TensorProto.UINT8


# -- packing ---------------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 5), k=st.integers(1, 70), block=st.sampled_from([8, 16, 32, 64]),
       seed=st.integers(0, 2**16))
def test_intn_codes_and_zero_points_round_trip(bits, n, k, block, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    packed = packing.pack_codes_intn(codes, bits, block)
    blocks = packing.block_count(k, block)
    assert packed.shape == (n, blocks, block * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packing.unpack_codes_intn(packed, bits, k), codes)
    padding = packing.unpack_intn(packed, bits).reshape(n, -1)[:, k:]
    assert np.all(padding == packing.middle_code(bits))
    zp = rng.integers(0, 1 << bits, (n, blocks), dtype=np.uint8)
    zp_packed = packing.pack_zero_points_intn(zp, bits)
    assert zp_packed.shape == (n * -(-blocks // 8) * bits,)
    np.testing.assert_array_equal(packing.unpack_zero_points_intn(zp_packed, bits, n, blocks), zp)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_intn_packing_is_matmulnbits_packing_for_2_4_8_bits(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (3, 100), dtype=np.uint8)
    np.testing.assert_array_equal(packing.pack_codes_intn(codes, bits, 32), packing.pack_codes(codes, bits, 32))


def test_intn_packing_is_little_endian_8_codes_per_bits_bytes():
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0])
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert list(packing.pack_intn(codes, 3)) == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert list(packing.pack_intn(np.array([1, 0, 1, 1, 0, 0, 0, 1]), 1)) == [0b10001101]
    for bad in (lambda: packing.pack_intn(np.zeros(8, int), 9), lambda: packing.pack_intn(np.zeros(7, int), 3),
                lambda: packing.pack_intn(np.full(8, 8), 3), lambda: packing.intn_blob_size(12, 3)):
        with pytest.raises(ValueError):
            bad()


def test_e4m3fn_table_is_ml_dtypes_float8():
    import ml_dtypes

    expected = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(packing.E4M3FN_VALUES, expected)
    assert np.nanmax(packing.E4M3FN_VALUES) == 448.0 and np.isnan(packing.E4M3FN_VALUES).sum() == 2


# -- numpy kernels ---------------------------------------------------------------------------------------------------

def _intn_inputs(rng, k, n, bits, block, zero_points, bias):
    blocks = packing.block_count(k, block)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    zp = rng.integers(0, 1 << bits, (n, blocks), dtype=np.uint8) if zero_points else None
    return (packing.pack_codes_intn(codes, bits, block), rng.uniform(0.01, 0.1, n * blocks).astype(np.float32),
            packing.pack_zero_points_intn(zp, bits) if zero_points else np.zeros(0, np.uint8),
            rng.standard_normal(n).astype(np.float32) if bias else np.zeros(0, np.float32))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), k=st.integers(1, 80), n=st.integers(1, 6), block=st.sampled_from([8, 16, 32]),
       zero_points=st.booleans(), bias=st.booleans(), lead=st.sampled_from([(1,), (3,), (2, 3)]),
       seed=st.integers(0, 2**16))
def test_matmul_intn_kernel_is_dequantize_then_matmul(bits, k, n, block, zero_points, bias, lead, seed):
    rng = np.random.default_rng(seed)
    b, scales, zp, extra = _intn_inputs(rng, k, n, bits, block, zero_points, bias)
    a = rng.standard_normal((*lead, k)).astype(np.float32)
    y = custom_ops.matmul_intn(a, b, scales, zp, extra, K=k, N=n, bits=bits, block_size=block)
    w = packing.dequantize_intn(b, scales, zp if zero_points else None, k=k, bits=bits, block_size=block)
    expected = a.astype(np.float64) @ w + (extra if bias else 0.0)
    assert y.shape == (*lead, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_matmul_fp8_kernel_is_dequantize_then_matmul():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (6, 40), dtype=np.uint8)  # W^T
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    scale = rng.uniform(0.001, 0.01, 6).astype(np.float32)
    a = rng.standard_normal((2, 3, 40)).astype(np.float32)
    for bias in (np.zeros(0, np.float32), rng.standard_normal(6).astype(np.float32)):
        y = custom_ops.matmul_fp8(a, codes, scale, bias, K=40, N=6)
        expected = a.astype(np.float64) @ packing.dequantize_fp8(codes, scale) + (bias if bias.size else 0.0)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_kernels_refuse_inconsistent_inputs():
    b, scales, zp, bias = _intn_inputs(np.random.default_rng(0), 64, 4, 3, 32, True, True)
    a = np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="must end in K=32"):
        custom_ops.matmul_intn(a, b, scales, zp, bias, K=32, N=4, bits=3, block_size=32)
    with pytest.raises(ValueError, match="packed weight"):
        custom_ops.matmul_intn(a, b, scales, zp, bias, K=64, N=4, bits=4, block_size=32)
    with pytest.raises(ValueError, match="bias must be empty or hold N=4"):
        custom_ops.matmul_intn(a, b, scales, zp, bias[:3], K=64, N=4, bits=3, block_size=32)
    with pytest.raises(ValueError, match="zero points"):
        custom_ops.matmul_intn(a, b, scales, zp[:-1], bias, K=64, N=4, bits=3, block_size=32)
    with pytest.raises(ValueError, match=r"scale must hold N=4"):
        custom_ops.matmul_fp8(a, np.zeros((4, 64), np.uint8), np.ones(3, np.float32), bias, K=64, N=4)
    with pytest.raises(ValueError, match=r"weight codes W\^T \[N, K\] must be \[4, 64\]"):
        custom_ops.matmul_fp8(a, np.zeros((64, 4), np.uint8), np.ones(4, np.float32), bias, K=64, N=4)


# -- the registered ops in ONNX Runtime ------------------------------------------------------------------------------

def _model(op: str, inputs: dict[str, np.ndarray], attributes: dict[str, int], k: int, *,
           opset: int = 1, n_inputs: int | None = None, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    names = list(inputs)[:n_inputs]
    node = helper.make_node(op, ["a", *names], ["y"], domain="ai.qcompiler", name="layer", **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", F, ["B", "S", k])],
                              [helper.make_tensor_value_info("y", F, None)],
                              [numpy_helper.from_array(v, name) for name, v in inputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.qcompiler", opset)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    return model


def _intn_model(rng, k=100, n=24, bits=3, block=32, zero_points=True, bias=True, **kwargs):
    b, scales, zp, extra = _intn_inputs(rng, k, n, bits, block, zero_points, bias)
    inputs = {"b": b, "scales": scales, "zero_points": zp, "bias": extra}
    model = _model("MatMulIntN", inputs, {"K": k, "N": n, "bits": bits, "block_size": block}, k, **kwargs)
    w = packing.dequantize_intn(b, scales, zp, k=k, bits=bits, block_size=block)
    return model, lambda a: a.astype(np.float64) @ w + (extra if bias else 0.0)


def _fp8_model(rng, k=40, n=12, bias=True):
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)  # W^T
    codes[(codes & 0x7F) == 0x7F] = 1
    scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    extra = rng.standard_normal(n).astype(np.float32) if bias else np.zeros(0, np.float32)
    model = _model("MatMulFp8", {"b": codes, "scale": scale, "bias": extra}, {"K": k, "N": n}, k)
    return model, lambda a: a.astype(np.float64) @ packing.dequantize_fp8(codes, scale) + (extra if bias else 0.0)


@pytest.mark.parametrize(("bits", "zero_points", "bias"), [(3, True, True), (3, False, False), (3, True, False),
                                                           (5, False, True), (2, True, True)])
def test_matmul_intn_in_ort_matches_the_numpy_reference(tmp_path, write_model, bits, zero_points, bias):
    rng = np.random.default_rng(bits)
    model, reference = _intn_model(rng, bits=bits, zero_points=zero_points, bias=bias)  # K = 100: padded blocks
    session = Session(write_model(model, tmp_path), intra_op_threads=1)
    assert session.custom_ops == ("MatMulIntN",) and session.opsets == {"": 17, "ai.qcompiler": 1}
    for shape in ((1, 1, 100), (2, 7, 100)):
        a = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(session.run({"a": a})["y"], reference(a), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_fp8_in_ort_matches_the_numpy_reference(tmp_path, write_model, bias):
    rng = np.random.default_rng(7)
    model, reference = _fp8_model(rng, bias=bias)
    session = Session(write_model(model, tmp_path))
    assert session.custom_ops == ("MatMulFp8",)
    a = rng.standard_normal((3, 5, 40)).astype(np.float32)
    np.testing.assert_allclose(session.run({"a": a})["y"], reference(a), rtol=1e-4, atol=1e-4)


def test_register_works_on_plain_session_options_and_both_result_paths_agree(tmp_path, write_model):
    rng = np.random.default_rng(3)
    model, reference = _intn_model(rng, n=40)
    path = write_model(model, tmp_path)
    options = ort.SessionOptions()
    custom_ops.register(options)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((2, 3, 100)).astype(np.float32)
    arrays = session.run(None, {"a": a})[0]
    try:
        _ortext.use_array_results(False)  # the package's own hook: results as Python lists
        lists = session.run(None, {"a": a})[0]
    finally:
        _ortext.use_array_results(True)
    np.testing.assert_array_equal(arrays, lists)
    np.testing.assert_allclose(arrays, reference(a), rtol=1e-4, atol=1e-4)


def test_external_data_models_load(tmp_path, write_model):
    rng = np.random.default_rng(4)
    model, reference = _intn_model(rng)
    path = write_model(model, tmp_path / "sub", external=True)
    assert (tmp_path / "sub" / "model.onnx.data").is_file()
    session = Session(path)
    a = rng.standard_normal((1, 2, 100)).astype(np.float32)
    np.testing.assert_allclose(session.run({"a": a})["y"], reference(a), rtol=1e-4, atol=1e-4)


def test_a_kernel_failure_at_run_time_is_one_line(tmp_path, write_model):
    rng = np.random.default_rng(5)
    b, scales, zp, bias = _intn_inputs(rng, 64, 8, 3, 32, True, True)
    model = _model("MatMulIntN", {"b": b, "scales": scales, "zero_points": zp, "bias": bias},
                   {"K": 64, "N": 8, "bits": 4, "block_size": 32}, 64)  # bits disagree with the packed shape
    with pytest.raises(SessionError, match=r"custom op failed: MatMulIntN: packed weight \[N, n_blocks, blob\] "
                                           r"must be \[8, 2, 16\]") as info:
        Session(write_model(model, tmp_path)).run({"a": np.zeros((1, 1, 64), np.float32)})  # no crash
    assert "\n" not in str(info.value)


# -- the model scan and the Session's checks -------------------------------------------------------------------------

def test_scan_reads_opsets_metadata_and_nodes_in_subgraphs_and_functions(tmp_path, write_model):
    rng = np.random.default_rng(6)
    model, _ = _intn_model(rng, metadata={"qcompiler.version": "0.1.0", "qcompiler.recipe": "int3"})
    inner = helper.make_graph([helper.make_node("MatMulFp8", ["a", "w", "s", "b"], ["t"], domain="ai.qcompiler",
                                                name="inner")], "then", [], [helper.make_tensor_value_info("t", F, None)])
    other = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, None)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=inner, else_branch=other, name="if"))
    model.functions.append(helper.make_function("local", "F", ["p"], ["q"], [
        helper.make_node("MatMulIntN", ["p", "p", "p", "p", "p"], ["q"], domain="ai.qcompiler", name="in_fn")],
        [helper.make_opsetid("ai.qcompiler", 1)]))
    path = write_model(model, tmp_path, external=True)
    scan = scan_model(path, "ai.qcompiler")
    assert scan.opsets == {"": 17, "ai.qcompiler": 1}
    assert scan.metadata == {"qcompiler.version": "0.1.0", "qcompiler.recipe": "int3"}
    assert sorted(scan.nodes) == [("in_fn", "MatMulIntN", ("p",) * 5), ("inner", "MatMulFp8", ("a", "w", "s", "b")),
                                  ("layer", "MatMulIntN", ("a", "b", "scales", "zero_points", "bias"))]
    assert scan_model(path).nodes == [] and scan_model(path, "com.microsoft").nodes == []
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ValueError):
        scan_model(tmp_path / "junk.onnx")


@pytest.mark.parametrize(("change", "match"), [
    ({"opset": 2}, r"written by qcompiler 9\.0\): it uses ai\.qcompiler opset 2; this runtime runs up to opset 1"),
    ({"op": "MatMulInt7"}, r"node 'layer' uses ai\.qcompiler::MatMulInt7, which ai\.qcompiler opset 1 of this "
                           r"runtime does not have \(known: MatMulFp8, MatMulIntN\)"),
    ({"n_inputs": 2}, r"node 'layer' \(ai\.qcompiler::MatMulIntN\) has 3 inputs; it takes 5 \(A, B, scales, "
                      r"zero_points, bias; an absent one is an empty tensor\)"),
    ({"absent": True}, r"node 'layer' \(ai\.qcompiler::MatMulIntN\) has an absent input; it takes 5"),
])
def test_models_this_runtime_cannot_run_are_refused_in_one_line(tmp_path, write_model, change, match):
    rng = np.random.default_rng(8)
    b, scales, zp, bias = _intn_inputs(rng, 64, 8, 3, 32, True, True)
    model = _model(change.get("op", "MatMulIntN"), {"b": b, "scales": scales, "zero_points": zp, "bias": bias},
                   {"K": 64, "N": 8, "bits": 3, "block_size": 32}, 64, opset=change.get("opset", 1),
                   n_inputs=change.get("n_inputs"), metadata={"qcompiler.version": "9.0"})
    if change.get("absent"):
        model.graph.node[0].input[4] = ""  # ONNX's way to omit an optional input: PyOps have none
    with pytest.raises(SessionError, match=match) as info:
        Session(write_model(model, tmp_path))
    assert "\n" not in str(info.value)


def test_missing_onnxruntime_extensions_is_one_line_naming_pip(tmp_path, write_model, monkeypatch):
    model, _ = _intn_model(np.random.default_rng(9))
    path = write_model(model, tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import onnxruntime_extensions fails
    with pytest.raises(SessionError, match=r"uses qcompiler's custom ops \(MatMulIntN\).*pip install "
                                           r"onnxruntime-extensions==0\.15\.2$") as info:
        Session(path)
    assert "\n" not in str(info.value)


def test_plain_models_need_no_extension(tmp_path, make_mlp, write_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    session = Session(write_model(make_mlp(), tmp_path))
    assert session.custom_ops == () and session.opsets == {"": 17}


def test_registering_custom_ops_imports_no_compiler_dependency(tmp_path, write_model):
    model, _ = _intn_model(np.random.default_rng(10))
    path = write_model(model, tmp_path)
    code = ("import sys, numpy as np\n"
            "from qcompiler.runtime import Session\n"
            f"s = Session({str(path)!r})\n"
            "assert s.custom_ops == ('MatMulIntN',)\n"
            "s.run({'a': np.zeros((1, 2, 100), np.float32)})\n"
            "heavy = [m for m in ('torch', 'networkx', 'onnx', 'onnx_ir', 'onnxscript', 'transformers', "
            "'qcompiler.io', 'qcompiler.api') if m in sys.modules]\n"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", result.stdout


def test_the_extension_keeps_working_for_its_own_ops_after_our_hook():
    """Our invocation hook dispatches every PyOp (ours and anyone's) like the package's own hook."""
    ext = _ortext._extensions()
    calls = []

    @ext.onnx_op(op_type="QcompilerTestTwice", inputs=[ext.PyCustomOpDef.dt_float],
                 outputs=[ext.PyCustomOpDef.dt_float])
    def twice(x):
        calls.append(x.shape)
        return x * 2

    node = helper.make_node("QcompilerTestTwice", ["x"], ["y"], domain="ai.onnx.contrib")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, [2])],
                              [helper.make_tensor_value_info("y", F, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.contrib", 1)])
    options = ort.SessionOptions()
    custom_ops.register(options)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": np.array([1.0, 2.5], np.float32)})[0], [2.0, 5.0])
    assert calls == [(2,)]


def test_session_keeps_its_api_for_paths(tmp_path: Path, write_model):
    model, _ = _intn_model(np.random.default_rng(11))
    session = Session(write_model(model, tmp_path), inter_op_threads=1)
    assert [i.name for i in session.inputs] == ["a"] and session.providers == ["CPUExecutionProvider"]
    assert "Session(" in repr(session)
