"""Weight-only int8/int4/int2: the packed layout, the blockwise grids, MatMulNBits in ONNX Runtime against the
numpy reference, the recipes and CLI flags, provenance metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import rel_l2, run
from _weight_only import annotate_weight_only, lower_weight_only
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from qcompiler.config import load_recipe, override
from qcompiler.errors import ConfigError
from qcompiler.formats.blockwise import quantize_rtn, resolve_block_size
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass
from qcompiler.runtime import packing

F = TensorProto.FLOAT


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 5), k=st.integers(1, 70),
       block=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_codes_and_zero_points_round_trip(bits, n, k, block, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    packed = packing.pack_codes(codes, bits, block)
    blocks = packing.block_count(k, block)
    assert packed.shape == (n, blocks, block * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packing.unpack_codes(packed, bits, k), codes)
    zp = rng.integers(0, 1 << bits, (n, blocks), dtype=np.uint8)
    zp_packed = packing.pack_zero_points(zp, bits)
    assert zp_packed.shape == (n * -(-blocks * bits // 8),)
    np.testing.assert_array_equal(packing.unpack_zero_points(zp_packed, bits, n, blocks), zp)


def test_packing_is_low_bits_first():
    packed = packing.pack_codes(np.array([[1, 2] + [8] * 14]), 4, 16)
    assert packed[0, 0, 0] == 0x21  # code 0 in the low nibble
    two_bit = packing.pack_codes(np.array([[1, 2, 3, 0] + [2] * 12]), 2, 16)
    assert two_bit[0, 0, 0] == 0b00111001
    with pytest.raises(ValueError):
        packing.pack_codes(np.array([[16] * 16]), 4, 16)


@settings(max_examples=30, deadline=None)
@given(weight=hnp.arrays(np.float32, st.tuples(st.integers(1, 80), st.integers(1, 6)),
                         elements=st.floats(-4, 4, width=32)),
       bits=st.sampled_from([2, 4, 8]), symmetric=st.booleans(), block=st.sampled_from([16, 32]),
       float_zp=st.booleans())
def test_rtn_error_is_at_most_half_a_step(weight, bits, symmetric, block, float_zp):
    q = quantize_rtn(weight, bits, block, symmetric, float_zp and not symmetric)
    deq = q.dequantize()
    assert deq.shape == weight.shape and np.all(np.isfinite(deq))
    steps = np.repeat(q.scales, block, axis=1)[:, :weight.shape[0]].T  # [K, N]
    assert np.all(np.abs(deq - weight) <= steps * 0.5 * (1 + 1e-5) + 1e-7)
    packed, scales, zp = q.packed()
    np.testing.assert_allclose(packing.dequantize(packed, scales, zp, k=weight.shape[0], bits=bits,
                                                  block_size=block), deq, rtol=0, atol=0)


def test_all_zero_and_constant_blocks_have_finite_scales():
    weight = np.zeros((32, 2), np.float32)
    weight[:, 1] = 0.25
    for symmetric in (True, False):
        q = quantize_rtn(weight, 4, 16, symmetric)
        assert np.all(q.scales > 0)
        np.testing.assert_allclose(q.dequantize()[:, 0], 0.0)
        np.testing.assert_allclose(q.dequantize()[:, 1], 0.25, rtol=0.07)


def _mlp(k: int = 100, hidden: int = 48, n: int = 10, seed: int = 0, tied: bool = False) -> ir.Model:
    """x[B, S, K] -> MatMul(W1) -> Relu -> Gemm-free MatMul(W2) (or W1's transpose read twice when tied)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, n)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    outputs = [helper.make_tensor_value_info("y", F, ["B", "S", n])]
    if tied:  # a second reader of w1: quantized once, shared
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["h2"], name="fc1_again"))
        outputs.append(helper.make_tensor_value_info("h2", F, ["B", "S", hidden]))
    proto = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", "S", k])],
                                                outputs, [numpy_helper.from_array(w1, "w1"),
                                                          numpy_helper.from_array(w2, "w2")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("symmetric", "float_zp"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("block", [16, 32, 128, 0])
def test_matmulnbits_in_ort_matches_the_numpy_reference(bits, symmetric, float_zp, block):
    if bits == 8 and float_zp:
        with pytest.raises(ConfigError):  # ORT's CPU kernel refuses it: so does the pass
            lower_weight_only(bits=8, symmetric=False, float_zero_point=True)
        return
    model = _mlp()  # K = 100 is no multiple of 16, 32 or 128
    x = np.random.default_rng(1).standard_normal((2, 3, 100)).astype(np.float32)
    reference = _mlp()
    w1, w2 = (reference.graph.initializers[n].const_value.numpy() for n in ("w1", "w2"))
    result = lower_weight_only(bits=bits, block_size=block, symmetric=symmetric, float_zero_point=float_zp)(model)
    assert result.stats.counters["lowered_MatMul"] == 2 and result.stats.counters["float_weights_removed"] == 2
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(n.domain == "com.microsoft" for n in nodes)
    assert (len(nodes[0].inputs) == 4) == (not symmetric)
    # numpy reference: the same math on the dequantized weights
    size = resolve_block_size(block, 100)
    d1 = quantize_rtn(w1, bits, size, symmetric, float_zp).dequantize()
    d2 = quantize_rtn(w2, bits, resolve_block_size(block, 48), symmetric, float_zp).dequantize()
    expected = np.maximum(x @ d1, 0) @ d2
    actual = run(model, {"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    error = rel_l2(actual, run(reference, {"x": x})[0])
    assert error < {8: 0.01, 4: 0.2, 2: 0.8}[bits]


def test_a_shared_weight_is_quantized_once():
    model = _mlp(tied=True)
    result = lower_weight_only(bits=4)(model)
    assert result.stats.counters["weights_shared"] == 1
    fc1, again = (n for n in model.graph if n.name in ("fc1", "fc1_again"))
    assert fc1.inputs[1] is again.inputs[1]


def test_gemm_with_transposed_weight_and_bias():
    rng = np.random.default_rng(2)
    b = (rng.standard_normal((8, 64)) * 0.2).astype(np.float32)  # [N, K], transB=1
    c = rng.standard_normal(8).astype(np.float32)
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["x", "b", "c"], ["y"], name="fc", transB=1)], "g",
        [helper.make_tensor_value_info("x", F, ["B", 64])], [helper.make_tensor_value_info("y", F, ["B", 8])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "c")]), opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    lower_weight_only(bits=8)(model)
    (node,) = list(model.graph)
    assert node.op_type == "MatMulNBits" and node.inputs[-1].name == "c"
    expected = x @ quantize_rtn(np.ascontiguousarray(b.T), 8, 32, True).dequantize() + c
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_skips_with_reasons_and_bad_options():
    model = _mlp()
    result = lower_weight_only(exclude_nodes=("fc2",))(model)
    assert dict(result.stats.skips) == {"fc2": "excluded by name"}
    with pytest.raises(ConfigError):
        lower_weight_only(bits=1)  # 3, 5, 6 and 7 bits go to ai.qcompiler.MatMulIntN (test_weight_only_int3.py)
    with pytest.raises(ConfigError):
        lower_weight_only(block_size=48)
    for bad in ({"format": "int5"}, {"block_size": 8}, {"block_size": 512}, {"algorithm": "magic"},
                {"accuracy_level": 7}, {"symmetric": "yes"}):
        with pytest.raises(ConfigError):
            override(load_recipe("int4"), weight_only=bad)


def test_cli_int4_writes_matmulnbits_and_provenance(tmp_path, capsys):
    from qcompiler.cli import main

    model = _mlp()
    src, out = tmp_path / "m.onnx", tmp_path / "m.q.onnx"
    onnx.save(ir.to_proto(model), src)
    code = main([str(src), "-o", str(out), "--recipe", "int4", "--block-size", "64", "--asymmetric", "-q"])
    assert code == 0
    proto = onnx.load(out)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 2
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 64 and attrs["K"] == 100 and len(node.input) == 4
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["qcompiler.recipe"] == "int4"
    assert json.loads(meta["qcompiler.weight_only"]) == {"format": "int4", "algorithm": "rtn", "block_size": 64,
                                                          "symmetric": False, "zero_point": "int",
                                                          "accuracy_level": 4, "lm_head": "int8",
                                                          "embedding": "int8", "target_bits": None}
    code = main([str(src), "-o", str(tmp_path / "bad.onnx"), "--recipe", "int4", "--block-size", "48", "-q"])
    assert code == 2 and "block_size" in capsys.readouterr().err and not (tmp_path / "bad.onnx").exists()


def test_tied_lm_head_reads_the_embedding_through_a_transpose():
    rng = np.random.default_rng(3)
    emb = (rng.standard_normal((40, 32)) * 0.3).astype(np.float32)  # [vocab, hidden]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="lm_head")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", F, ["B", "S", 40])], [numpy_helper.from_array(emb, "emb")]),
        opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    ids = rng.integers(0, 40, (2, 5)).astype(np.int64)
    result = lower_weight_only(bits=8)(model)
    assert result.stats.counters["tied_weight_transpose_read"] == 1
    assert [n.op_type for n in model.graph] == ["Gather", "MatMulNBits"]
    assert "emb" in model.graph.initializers  # the Gather keeps the float embedding
    expected = emb[ids] @ quantize_rtn(np.ascontiguousarray(emb.T), 8, 32, True).dequantize()
    np.testing.assert_allclose(run(model, {"ids": ids})[0], expected, rtol=1e-4, atol=1e-4)


def _calibrated(tmp_path, model: ir.Model, count: int = 64):
    from qcompiler.calibration.data import load_calibration_data

    rng = np.random.default_rng(5)
    mix = rng.standard_normal((100, 100)) * 0.3 + np.eye(100)  # correlated inputs with uneven energy
    x = (rng.standard_normal((count, 3, 100)) * np.linspace(0.1, 3, 100)) @ mix
    np.savez(tmp_path / "calib.npz", x=x.astype(np.float32))
    return load_calibration_data(tmp_path / "calib.npz", model), x.astype(np.float32)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (2, False)])
def test_gptq_lowers_the_layer_output_error_against_rtn(tmp_path, bits, symmetric):
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    model = _mlp()
    data, x = _calibrated(tmp_path, model)
    annotate_weight_only(model, bits=bits, block_size=32, symmetric=symmetric)
    result = WeightOnlyGPTQPass(calibration_data=data)(model)
    layers = result.stats.layers
    assert result.stats.counters["layers"] == 2 and result.modified  # codes written
    for name in ("fc1", "fc2"):
        assert layers[name]["gptq_output_error_db"] < layers[name]["rtn_output_error_db"] - 0.5, layers[name]
    reference = _mlp()
    expected = run(reference, {"x": x[:16]})[0]
    rtn = _mlp()
    lower_weight_only(bits=bits, block_size=32, symmetric=symmetric)(rtn)
    lowered = LowerWeightOnlyPass()(model)
    assert lowered.stats.counters["codes_chosen_by_algorithm"] == 2
    assert rel_l2(run(model, {"x": x[:16]})[0], expected) < rel_l2(run(rtn, {"x": x[:16]})[0], expected)


def test_gptq_codes_for_another_grid_fall_back_to_rtn(tmp_path):
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    model = _mlp()
    data, _ = _calibrated(tmp_path, model, count=8)
    annotate_weight_only(model, bits=4, block_size=32)
    WeightOnlyGPTQPass(calibration_data=data)(model)
    annotate_weight_only(model, bits=4, block_size=64)  # a pass that changed the specs after the codes were chosen
    result = LowerWeightOnlyPass()(model)
    assert result.stats.skip_reasons() == {"codes chosen for another spec: rounded to nearest instead": 2}


def test_cli_gptq_needs_calibration_data(tmp_path, capsys):
    from qcompiler.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(_mlp()), src)
    code = main([str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", "int4", "--algorithm", "gptq", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "calib" in err and len(err.strip().splitlines()) == 1
    _calibrated(tmp_path, _mlp(), count=8)
    code = main([str(src), "-o", str(tmp_path / "o.onnx"), "--recipe", "int4", "--algorithm", "gptq",
                 "--calib", str(tmp_path / "calib.npz"), "-q"])
    assert code == 0
    meta = {p.key: p.value for p in onnx.load(tmp_path / "o.onnx").metadata_props}
    assert json.loads(meta["qcompiler.weight_only"])["algorithm"] == "gptq"
    assert len(meta["qcompiler.calibration_sha256"]) == 64


def test_float_zero_points_reproduce_a_min_scale_grid_exactly():
    """Weights that are ``min + d * q`` per block of 32 (what a GGUF Q4_1 file holds) come back bit-exact."""
    rng = np.random.default_rng(4)
    k, n = 96, 5
    d = rng.uniform(0.01, 0.1, (n, 3)).astype(np.float32)
    m = rng.uniform(-0.5, 0.2, (n, 3)).astype(np.float32)
    q = rng.integers(0, 16, (n, k)).astype(np.float32)
    q[:, ::32], q[:, 1::32] = 0, 15  # every block uses both ends of its range
    w = (np.repeat(m, 32, axis=1) + np.repeat(d, 32, axis=1) * q).T.astype(np.float32)  # [K, N]
    exact = quantize_rtn(w, 4, 32, symmetric=False, float_zero_point=True).dequantize()
    np.testing.assert_allclose(exact, w, rtol=0, atol=1e-6)
    integer = quantize_rtn(w, 4, 32, symmetric=False).dequantize()
    assert np.abs(integer - w).max() > 1e-3


@pytest.mark.parametrize("lm_head", ["same", "int8", "float"])
def test_lm_head_format_is_chosen_separately(lm_head):
    model = _mlp()  # fc2's output is the graph output: the output projection
    result = lower_weight_only(bits=4, lm_head=lm_head)(model)
    nodes = {n.name: n for n in model.graph}
    assert nodes["fc1"].op_type == "MatMulNBits" and nodes["fc1"].attributes["bits"].as_int() == 4
    if lm_head == "float":
        assert nodes["fc2"].op_type == "MatMul"
        assert dict(result.stats.skips) == {"fc2": "lm_head left in float (lm_head = 'float')"}
    else:
        assert nodes["fc2"].attributes["bits"].as_int() == (4 if lm_head == "same" else 8)


def _tied(vocab: int = 40, hidden: int = 48, seed: int = 3) -> tuple[ir.Model, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = (rng.standard_normal((vocab, hidden)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="lm_head")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", F, ["B", "S", vocab])], [numpy_helper.from_array(emb, "emb")]),
        opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto), emb


@pytest.mark.parametrize("embedding", ["int8", "int4"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_embedding_becomes_gather_block_quantized(embedding, symmetric):
    model, emb = _tied(hidden=40)  # 40 = one full block of 32 and a partial one
    ids = np.random.default_rng(1).integers(0, 40, (2, 5)).astype(np.int64)
    result = lower_weight_only(bits=4, symmetric=symmetric, embedding=embedding, lm_head="int8")(model)
    assert result.stats.counters["lowered_Gather"] == 1
    assert sorted(n.op_type for n in model.graph) == ["GatherBlockQuantized", "MatMulNBits"]
    assert "emb" not in model.graph.initializers  # nothing reads the float table any more
    bits = 8 if embedding == "int8" else 4
    table = quantize_rtn(np.ascontiguousarray(emb.T), bits, 32, symmetric).dequantize().T  # [vocab, hidden]
    head = quantize_rtn(np.ascontiguousarray(emb.T), 8, 32, symmetric).dequantize()
    expected = table[ids] @ head
    np.testing.assert_allclose(run(model, {"ids": ids})[0], expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_bnb4_codes_round_trip(n, k, seed):
    codes = np.random.default_rng(seed).integers(0, 16, (n, k), dtype=np.uint8)
    packed = packing.pack_bnb4(codes)
    assert packed.shape == (-(-n * k // 2),)
    np.testing.assert_array_equal(packing.unpack_bnb4(packed, n, k), codes)


def test_nf4_rounds_to_the_nearest_codebook_value():
    from qcompiler.formats.nf4 import quantize_nf4

    w = np.random.default_rng(6).standard_normal((64, 3)).astype(np.float32)
    codes, absmax = quantize_nf4(w, 64)
    normed = (w.T / absmax[:, None]).reshape(3, 64)
    book = packing.NF4_CODEBOOK
    assert np.array_equal(codes, np.abs(normed[..., None] - book).argmin(axis=-1))


@pytest.mark.parametrize("block", [32, 64])
def test_nf4_lowers_to_matmulbnb4_that_matches_the_reference(block):
    model = _mlp()  # K = 100: blocks of the flattened W^T span two columns
    reference = _mlp()
    x = np.random.default_rng(1).standard_normal((2, 3, 100)).astype(np.float32)
    result = lower_weight_only(bits=4, block_size=block, nf4=True)(model)
    assert result.stats.counters["lowered_MatMul_nf4"] == 2
    assert [n.op_type for n in model.graph if n.domain == "com.microsoft"] == ["MatMulBnb4", "MatMulBnb4"]
    from qcompiler.formats.nf4 import quantize_nf4

    deq = []
    for name in ("w1", "w2"):
        w = reference.graph.initializers[name].const_value.numpy()
        codes, absmax = quantize_nf4(w, block)
        deq.append(packing.dequantize_bnb4(packing.pack_bnb4(codes), absmax, k=w.shape[0], n=w.shape[1],
                                           block_size=block))
    expected = np.maximum(x @ deq[0], 0) @ deq[1]
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    assert rel_l2(run(model, {"x": x})[0], run(reference, {"x": x})[0]) < 0.2


def test_nf4_refuses_what_it_cannot_do():
    for bad in ({"algorithm": "gptq"}, {"symmetric": False}):
        with pytest.raises(ConfigError):
            override(load_recipe("nf4"), weight_only=bad)
    with pytest.raises(ConfigError):
        lower_weight_only(bits=8, nf4=True)


def _outlier_data(tmp_path, model: ir.Model, count: int = 32):
    from qcompiler.calibration.data import load_calibration_data

    rng = np.random.default_rng(8)
    x = rng.standard_normal((count, 3, 100)).astype(np.float32)
    x[..., :4] *= 30.0  # a few input channels carry most of the activation (what AWQ is for)
    np.savez(tmp_path / "calib.npz", x=x)
    return load_calibration_data(tmp_path / "calib.npz", model), x


def test_awq_scaling_keeps_the_float_function_and_lowers_the_error(tmp_path):
    from qcompiler.passes.algorithms.weight_only_awq import WeightOnlyAWQPass

    model = _mlp()
    data, x = _outlier_data(tmp_path, model)
    expected = run(_mlp(), {"x": x[:8]})[0]
    annotate_weight_only(model, bits=4, block_size=32, symmetric=False)
    result = WeightOnlyAWQPass(calibration_data=data)(model)
    assert result.modified and result.stats.counters["groups_scaled"] >= 1
    fc1 = result.stats.layers["fc1"]
    assert fc1["awq_alpha"] > 0 and fc1["awq_output_error_db"] < fc1["rtn_output_error_db"]
    assert any(n.op_type == "Mul" and n.name.endswith("_awq") for n in model.graph)
    np.testing.assert_allclose(run(model, {"x": x[:8]})[0], expected, rtol=1e-4, atol=1e-4)  # before rounding
    rtn = _mlp()
    lower_weight_only(bits=4, block_size=32, symmetric=False)(rtn)
    LowerWeightOnlyPass()(model)
    assert rel_l2(run(model, {"x": x[:8]})[0], expected) < rel_l2(run(rtn, {"x": x[:8]})[0], expected)


def test_awq_runs_only_when_chosen_and_needs_data(tmp_path):
    from qcompiler.errors import CalibrationError
    from qcompiler.passes.algorithms.weight_only_awq import WeightOnlyAWQPass
    from qcompiler.pipelines import resolve_pass_classes

    names = [c.name for c in resolve_pass_classes(load_recipe("int4"))]
    assert "weight-only-rtn" in names and "weight-only-awq" not in names  # the builder picks the algorithm's pass
    chosen = [c.name for c in resolve_pass_classes(override(load_recipe("int4"), weight_only={"algorithm": "awq"}))]
    assert "weight-only-awq" in chosen and "weight-only-rtn" not in chosen
    model = _mlp()
    annotate_weight_only(model)
    with pytest.raises(CalibrationError):
        WeightOnlyAWQPass()(model)


def test_awq_clipping_search_hands_codes_with_less_output_error(tmp_path):
    from qcompiler.formats.blockwise import quantize_rtn as rtn
    from qcompiler.passes.algorithms.weight_only_awq import WeightOnlyAWQPass, clipped_codes

    rng = np.random.default_rng(9)
    w = (rng.standard_t(3, size=(96, 8)) * 0.05).astype(np.float32)  # heavy tails: clipping pays
    x = rng.standard_normal((64, 96)).astype(np.float32)
    from qcompiler.formats import get_format

    chosen, error = clipped_codes(get_format("int4"), get_format("int4").spec(block_size=32, symmetric=False), w, x)
    plain = rtn(w, 4, 32, False)
    diff = x.astype(np.float64) @ (w - plain.dequantize())
    assert error < float(np.vdot(diff, diff))
    assert np.all(chosen.scales <= plain.scales * (1 + 1e-6))  # ranges only ever shrink
    model = _mlp()
    data, _ = _outlier_data(tmp_path, model)
    annotate_weight_only(model, bits=4, block_size=32, symmetric=False)
    WeightOnlyAWQPass(calibration_data=data)(model)
    lowered = LowerWeightOnlyPass()(model)
    assert lowered.stats.counters["codes_chosen_by_algorithm"] == 2
