"""Ternary (1.58-bit) blocks and the HQQ algorithm: grids, codes, lowering to MatMulNBits against numpy in ORT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import rel_l2, run
from _weight_only import annotate_weight_only, hqq_codes, lower_weight_only
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_weight_only import _calibrated, _mlp

from qcompiler.config import load_recipe, override
from qcompiler.errors import ConfigError
from qcompiler.formats.blockwise import quantize_rtn
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.passes.algorithms.weight_only_hqq import WeightOnlyHQQPass
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass

_weights = hnp.arrays(np.float32, st.tuples(st.integers(1, 70), st.integers(1, 4)),
                      elements=st.floats(-4, 4, width=32, allow_subnormal=False))


@settings(max_examples=40, deadline=None)
@given(weight=_weights, block=st.sampled_from([16, 32]))
def test_ternary_codes_are_minus_zero_plus_times_the_block_absmean(weight, block):
    q = quantize_rtn(weight, 2, block, True, ternary=True)
    assert set(np.unique(q.codes)) <= {1, 2, 3}
    k = weight.shape[0]
    for b in range(q.scales.shape[1]):
        part = np.abs(weight[b * block:min((b + 1) * block, k)])
        mean = part.mean(axis=0)
        np.testing.assert_allclose(q.scales[:, b], np.where(mean > 0, mean, 1.0), rtol=1e-5)
    deq = q.dequantize()
    scale = np.repeat(q.scales, block, axis=1)[:, :k].T
    assert np.all(np.isclose(np.abs(deq), 0) | np.isclose(np.abs(deq), scale, rtol=1e-6))
    # each value went to the nearest of {-s, 0, +s}
    expected = np.clip(np.rint(weight / scale), -1, 1) * scale
    np.testing.assert_allclose(deq, expected, rtol=1e-6, atol=1e-7)


def test_ternary_lowers_to_2bit_matmulnbits_that_matches_the_reference():
    model = _mlp()  # K = 100: the last block of 32 is padded
    reference = _mlp()
    w1, w2 = (reference.graph.initializers[n].const_value.numpy() for n in ("w1", "w2"))
    x = np.random.default_rng(1).standard_normal((2, 3, 100)).astype(np.float32)
    result = lower_weight_only(bits=2, block_size=32, ternary=True)(model)
    assert result.stats.counters["lowered_MatMul"] == 2
    assert result.stats.layers["fc1"]["scheme"] == "ternary-weight-only"
    assert all(n.attributes["bits"].value == 2 for n in model.graph if n.op_type == "MatMulNBits")
    d1 = quantize_rtn(w1, 2, 32, True, ternary=True).dequantize()
    d2 = quantize_rtn(w2, 2, 32, True, ternary=True).dequantize()
    np.testing.assert_allclose(run(model, {"x": x})[0], np.maximum(x @ d1, 0) @ d2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError):
        lower_weight_only(bits=4, ternary=True)


def test_ternary_recipe_and_refusals():
    recipe = load_recipe("ternary")
    assert recipe.weight_only.format == "ternary" and recipe.weight_only.bits == 2
    with pytest.raises(ConfigError, match="symmetric"):
        override(recipe, weight_only={"symmetric": False})
    for bad in ({"algorithm": "hqq"}, {"algorithm": "gptq"}):
        with pytest.raises(ConfigError):
            override(load_recipe("nf4"), weight_only=bad)


def test_ternary_gptq_stays_on_the_ternary_grid_and_beats_rtn(tmp_path):
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    model = _mlp()
    data, x = _calibrated(tmp_path, model)
    annotate_weight_only(model, bits=2, block_size=32, ternary=True)
    result = WeightOnlyGPTQPass(calibration_data=data)(model)
    for name in ("fc1", "fc2"):
        layer = result.stats.layers[name]
        assert layer["gptq_output_error_db"] < layer["rtn_output_error_db"], layer
    chosen = [n.meta[WEIGHT_CODES_KEY] for n in model.graph if n.op_type == "MatMul"]
    assert all(set(np.unique(c.codes)) <= {1, 2, 3} for c in chosen)
    LowerWeightOnlyPass()(model)
    rtn = _mlp()
    lower_weight_only(bits=2, block_size=32, ternary=True)(rtn)
    expected = run(_mlp(), {"x": x[:16]})[0]
    assert rel_l2(run(model, {"x": x[:16]})[0], expected) < rel_l2(run(rtn, {"x": x[:16]})[0], expected)


def _l1_per_block(weight: np.ndarray, deq: np.ndarray, block: int) -> np.ndarray:
    k = weight.shape[0]
    pad = -k % block
    err = np.pad(np.abs(weight.astype(np.float64) - deq), ((0, pad), (0, 0)))
    return err.reshape(-1, block, weight.shape[1]).sum(axis=1)


@settings(max_examples=30, deadline=None)
@given(weight=_weights, bits=st.sampled_from([2, 4, 8]), block=st.sampled_from([16, 32]),
       grid=st.sampled_from(["sym", "asym", "float", "ternary"]))
def test_hqq_never_ends_a_block_worse_than_round_to_nearest(weight, bits, block, grid):
    symmetric, float_zp, ternary = grid in ("sym", "ternary"), grid == "float", grid == "ternary"
    if ternary:
        bits = 2
    if float_zp and bits == 8:
        float_zp = False
    hqq = hqq_codes(weight, bits, block, symmetric, float_zp, ternary)
    rtn = quantize_rtn(weight, bits, block, symmetric, float_zp, ternary)
    lo, hi = (1, 3) if ternary else (0, (1 << bits) - 1)
    assert hqq.codes.min() >= lo and hqq.codes.max() <= hi
    assert (hqq.zero_points is None) == symmetric
    slack = 1e-5 * (np.abs(weight).max() + 1e-3) * block
    assert np.all(_l1_per_block(weight, hqq.dequantize(), block) <= _l1_per_block(weight, rtn.dequantize(), block)
                  + slack)


def test_hqq_lowers_the_error_of_heavy_tailed_weights_and_keeps_exact_grids():
    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, size=(256, 64)) * 0.02).astype(np.float32)
    for bits, symmetric, float_zp in [(4, False, False), (4, False, True), (4, True, False), (2, False, False)]:
        hqq = hqq_codes(w, bits, 64, symmetric, float_zp).dequantize()
        rtn = quantize_rtn(w, bits, 64, symmetric, float_zp).dequantize()
        assert np.abs(w - hqq).mean() < 0.97 * np.abs(w - rtn).mean(), (bits, symmetric, float_zp)
    # weights that lie exactly on a min + s*q grid (a GGUF Q4_1 file) stay exact with float zero points
    codes = rng.integers(0, 16, size=(64, 8))
    codes[0], codes[1], codes[32], codes[33] = 0, 15, 0, 15  # every block spans the whole grid
    exact = (rng.uniform(-1, 0, (2, 8)).repeat(32, 0) + 0.05 * codes).astype(np.float32)
    np.testing.assert_allclose(hqq_codes(exact, 4, 32, False, True).dequantize(), exact, atol=1e-6)


def test_hqq_pass_hands_its_codes_to_the_lowering():
    model, reference = _mlp(), _mlp()
    x = np.random.default_rng(2).standard_normal((2, 3, 100)).astype(np.float32)
    annotate_weight_only(model, bits=4, block_size=32, symmetric=False)
    result = WeightOnlyHQQPass()(model)
    assert result.stats.counters["layers"] == 2 and result.modified  # codes written
    fc1 = result.stats.layers["fc1"]
    assert fc1["hqq_weight_sqnr_db"] >= fc1["rtn_weight_sqnr_db"] - 0.05
    w1, w2 = (reference.graph.initializers[n].const_value.numpy() for n in ("w1", "w2"))
    d1 = hqq_codes(w1, 4, 32, False).dequantize()
    d2 = hqq_codes(w2, 4, 32, False).dequantize()
    lowered = LowerWeightOnlyPass()(model)
    assert lowered.stats.counters["codes_chosen_by_algorithm"] == 2
    np.testing.assert_allclose(run(model, {"x": x})[0], np.maximum(x @ d1, 0) @ d2, rtol=1e-4, atol=1e-4)


def test_cli_ternary_with_hqq(tmp_path, capsys):
    from qcompiler.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(ir.to_proto(_mlp()), src)
    assert main([str(src), "-o", str(out), "--recipe", "ternary", "--algorithm", "hqq", "-q"]) == 0
    saved = onnx.load(out)
    meta = {p.key: p.value for p in saved.metadata_props}
    assert meta["qcompiler.recipe"] == "ternary"
    assert json.loads(meta["qcompiler.weight_only"])["algorithm"] == "hqq"
    assert {n.op_type for n in saved.graph.node} >= {"MatMulNBits"}
    x = np.random.default_rng(4).standard_normal((1, 2, 100)).astype(np.float32)
    assert rel_l2(run(ir.serde.deserialize_model(saved), {"x": x})[0], run(_mlp(), {"x": x})[0]) < 1.0
    code = main([str(src), "-o", str(out), "--recipe", "ternary", "--asymmetric", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "symmetric" in err and len(err.strip().splitlines()) == 1


def test_fp8_weights_dequantize_before_a_float_matmul():
    import ml_dtypes

    model, reference = _mlp(), _mlp()  # opset 17: converted to 19 for FP8 DequantizeLinear
    w1, w2 = (reference.graph.initializers[n].const_value.numpy() for n in ("w1", "w2"))
    result = lower_weight_only(bits=8, fp8=True)(model)
    assert result.stats.counters["lowered_MatMul_fp8"] == 2 and model.opset_imports[""] == 19
    assert result.stats.counters["opset_17_converted_to_19"] == 1
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and dqs[0].inputs[0].dtype == ir.DataType.FLOAT8E4M3FN

    def reference_fp8(w):
        scale = np.abs(w).max(axis=0) / 448.0
        return (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale

    x = np.random.default_rng(6).standard_normal((2, 3, 100)).astype(np.float32)
    expected = np.maximum(x @ reference_fp8(w1), 0) @ reference_fp8(w2)
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    assert rel_l2(run(model, {"x": x})[0], run(reference, {"x": x})[0]) < 0.06
    with pytest.raises(ConfigError):
        lower_weight_only(bits=4, fp8=True)
    recipe = load_recipe("fp8-weight")
    assert recipe.weight_only.format == "fp8"
    for bad in ({"algorithm": "gptq"}, {"symmetric": False}, {"target_bits": 8}):
        with pytest.raises(ConfigError, match="fp8"):
            override(recipe, weight_only=bad)
