"""smooth-quant: exact in float, lower int8 error on a matmul with outlier channels, LayerNorm folding, Mul insertion."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import rel_l2, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.errors import ConfigError
from qcompiler.passes.algorithms.smoothquant import SmoothQuantPass, group_error, smoothing_scales
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.lower.int8_dynamic import LowerInt8DynamicPass
from qcompiler.passes.lower.int8_qdq import LowerInt8QDQPass
from qcompiler.qspec import get_qspec

F = TensorProto.FLOAT
D = 32


def _tensor(name: str, array: np.ndarray):
    return helper.make_tensor(name, F, array.shape, array.reshape(-1).tolist())


def _model(residual: bool, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    """x -> LayerNorm (gamma with 3 outlier channels x40) -> Q/K MatMuls (+ optionally a residual Add)."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(D, np.float32)
    gamma[[3, 11, 20]] = 40.0
    beta = (rng.standard_normal(D) * 0.1).astype(np.float32)
    wq = (rng.standard_normal((D, 16)) / np.sqrt(D)).astype(np.float32)
    wk = (rng.standard_normal((D, 16)) / np.sqrt(D)).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="proj_q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="proj_k")]
    outputs = [helper.make_tensor_value_info("q", F, ["B", 8, 16]), helper.make_tensor_value_info("k", F, ["B", 8, 16])]
    if residual:
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
        outputs.append(helper.make_tensor_value_info("r", F, ["B", 8, D]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", 8, D])], outputs,
                              [_tensor("gamma", gamma), _tensor("beta", beta), _tensor("wq", wq), _tensor("wk", wk)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    x = rng.standard_normal((32, 8, D)).astype(np.float32)
    return ir.serde.deserialize_model(proto), x


def _data(tmp_path, model, x):
    np.savez(tmp_path / "calib.npz", x=x)
    return load_calibration_data(tmp_path / "calib.npz", model)


@pytest.mark.parametrize("residual", [False, True])
def test_exact_in_float_and_placement(tmp_path, residual: bool) -> None:
    model, x = _model(residual)
    expected = run(model, {"x": x})
    AnnotateInt8Pass(static_activations=False, op_types=("MatMul",))(model)
    result = SmoothQuantPass(calibration_data=_data(tmp_path, model, x), weight_qmax=127, min_rows=64)(model)
    assert result.modified
    counters = result.stats.counters
    assert counters["groups_smoothed"] == 1 and counters["layers_smoothed"] == 2
    ops = [n.op_type for n in model.graph]
    if residual:  # the Add still reads the LayerNorm output: the group gets Mul(h, 1/s)
        assert counters["mul_inserted"] == 1 and ops.count("Mul") == 1
        mul = next(n for n in model.graph if n.op_type == "Mul")
        assert {u.name for u, _ in mul.outputs[0].uses()} == {"proj_q", "proj_k"}
        assert get_qspec(mul.outputs[0]) is not None and get_qspec(mul.inputs[0]) is None
    else:  # folded into gamma/beta: no new node
        assert counters["folded_into_layernorm"] == 1 and "Mul" not in ops
    for actual, want in zip(run(model, {"x": x}), expected, strict=True):
        np.testing.assert_allclose(actual, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    layer = result.stats.layers["proj_q"]
    assert layer["smooth_error_after"] < layer["smooth_error_before"]


@pytest.mark.parametrize("static", [False, True])
def test_lowers_int8_error(tmp_path, static: bool) -> None:
    errors = {}
    for smooth in (False, True):
        model, x = _model(residual=False)
        (expected, _) = run(model, {"x": x})
        data = _data(tmp_path, model, x)
        AnnotateInt8Pass(static_activations=static, op_types=("MatMul",))(model)
        if smooth:
            SmoothQuantPass(calibration_data=data, weight_qmax=127, min_rows=64)(model)
        if static:
            CalibratePass(calibration_data=data)(model)
            LowerInt8QDQPass(reduce_range=False)(model)
        else:
            LowerInt8DynamicPass(reduce_range=False)(model)
        errors[smooth] = rel_l2(run(model, {"x": x})[0], expected)
    assert errors[True] < 0.5 * errors[False], errors


def test_no_data_and_no_gain_change_nothing(tmp_path) -> None:
    model, x = _model(residual=False)
    AnnotateInt8Pass(static_activations=False, op_types=("MatMul",))(model)
    result = SmoothQuantPass()(model)
    assert result.modified is False and result.stats.counters["no_calibration_data"] == 1
    # balanced activations: smoothing cannot beat doing nothing at 8 bits, and the group is left alone
    rng = np.random.default_rng(4)
    model, _ = _model(residual=False)
    model.graph.initializers["gamma"].const_value = ir.tensor(np.ones(D, np.float32), name="gamma")
    AnnotateInt8Pass(static_activations=False, op_types=("MatMul",))(model)
    x = rng.standard_normal((8, 8, D)).astype(np.float32)
    result = SmoothQuantPass(calibration_data=_data(tmp_path, model, x), alphas=[1.0], min_rows=64)(model)
    assert result.modified is False and result.stats.counters["groups_left_unsmoothed"] == 1


def test_too_few_rows_is_skipped(tmp_path) -> None:
    model, x = _model(residual=False)
    AnnotateInt8Pass(static_activations=False, op_types=("MatMul",))(model)
    result = SmoothQuantPass(calibration_data=_data(tmp_path, model, x[:4]), min_rows=64)(model)  # 4 x 8 rows
    assert result.modified is False
    assert result.stats.skip_reasons() == {
        "fewer than 64 calibration rows: per-channel maxima unreliable": 1}


def test_options_are_validated() -> None:
    for bad in ({"alphas": [1.5]}, {"alphas": []}, {"search_rows": 0}, {"weight_qmax": 100}):
        with pytest.raises(ConfigError):
            SmoothQuantPass(**bad)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.0, 1.0))
def test_scales_balance_the_ranges(seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    x_absmax = np.exp(rng.uniform(-3, 3, 16))
    w_absmax = np.exp(rng.uniform(-3, 3, 16))
    s = smoothing_scales(x_absmax, w_absmax, alpha)
    # after smoothing, max|X_j| / s_j = max|W_j|^(1-a) * max|X_j|^(1-a) ... ^ both equal (x w)^(1-a) and (x w)^a
    np.testing.assert_allclose(x_absmax / s, (x_absmax ** (1 - alpha)) * (w_absmax ** (1 - alpha)), rtol=1e-9)
    np.testing.assert_allclose(w_absmax * s, (x_absmax ** alpha) * (w_absmax ** alpha), rtol=1e-9)
    zero = smoothing_scales(np.zeros(3), np.ones(3), alpha)
    np.testing.assert_array_equal(zero, np.ones(3))


def test_group_error_is_zero_without_quantization_noise() -> None:
    rows = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)  # exactly representable on both grids
    w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    assert group_error(rows, [w], None, 127) < 1e-4
