"""Bias correction: the mean shift formula, the measured means, and the int8 lowering that applies them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _int8_models import cnn, mark_fused_activations, rel_l2, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.errors import CalibrationError
from qcompiler.formats.channelwise import quantize_weight
from qcompiler.passes.algorithms.bias_correction import CollectInputMeansPass, get_channel_mean, mean_shift
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.passes.lower.int8_qdq import LowerInt8QDQPass

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _dequantized(w: np.ndarray, axis: int, qmax: int) -> np.ndarray:
    qw = quantize_weight(w, axis, qmax=qmax)
    shape = [1] * w.ndim
    shape[axis] = -1
    return qw.q.astype(np.float32) * qw.scale.reshape(shape)


def _one_layer(op: str, w: np.ndarray, x_shape: list, y_shape: list, **attrs) -> ir.Model:
    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    return _model([node], [helper.make_tensor_value_info("x", F, x_shape)],
                  [helper.make_tensor_value_info("y", F, y_shape)],
                  [helper.make_tensor("w", F, w.shape, w.reshape(-1).tolist())])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["conv", "depthwise", "grouped", "matmul", "gemm_t"]),
       kernel=st.sampled_from([1, 3]))
def test_mean_shift_is_the_exact_mean_output_difference(seed: int, kind: str, kernel: int) -> None:
    """mean(W x) - mean(Wq x) == (W - Wq) . mean(x) exactly for a linear layer whose every tap sees the same
    input mean: MatMul/Gemm, a 1x1 Conv, or a 3x3 Conv without padding over an input constant per channel."""
    rng = np.random.default_rng(seed)
    if kind in ("conv", "depthwise", "grouped"):
        c, m, groups = (4, 6, 1) if kind == "conv" else (4, 4, 4) if kind == "depthwise" else (4, 6, 2)
        w = rng.standard_normal((m, c // groups, kernel, kernel)).astype(np.float32)
        out = 7 - kernel
        model = _one_layer("Conv", w, [8, c, 6, 6], [8, m, out, out], group=groups)
        noise = rng.standard_normal((8, c, 6, 6)) if kernel == 1 else 0.0
        x = (noise + rng.uniform(-2, 2, (1, c, 1, 1)) + np.zeros((8, c, 6, 6))).astype(np.float32)
        axis, reduce_x, reduce_y = 0, (0, 2, 3), (0, 2, 3)
    elif kind == "matmul":
        w = rng.standard_normal((5, 7)).astype(np.float32)
        model = _one_layer("MatMul", w, [3, 8, 5], [3, 8, 7])
        x = (rng.standard_normal((3, 8, 5)) + rng.uniform(-2, 2, 5)).astype(np.float32)
        axis, reduce_x, reduce_y = 1, (0, 1), (0, 1)
    else:
        w = rng.standard_normal((7, 5)).astype(np.float32)
        model = _one_layer("Gemm", w, [16, 5], [16, 7], transB=1)
        x = (rng.standard_normal((16, 5)) + rng.uniform(-2, 2, 5)).astype(np.float32)
        axis, reduce_x, reduce_y = 0, (0,), (0,)
    wq = _dequantized(w, axis, qmax=7)  # coarse, so the shift is large
    node = next(iter(model.graph))
    shift = mean_shift(node, w, wq, x.astype(np.float64).mean(axis=reduce_x))
    (y,) = run(model, {"x": x})
    model.graph.initializers["w"].const_value = ir.tensor(wq, name="w")
    (yq,) = run(model, {"x": x})
    expected = y.astype(np.float64).mean(axis=reduce_y) - yq.astype(np.float64).mean(axis=reduce_y)
    np.testing.assert_allclose(shift, expected, rtol=1e-4, atol=max(1e-4 * np.abs(expected).max(), 1e-6))


def test_mean_shift_rejects_a_mismatched_mean() -> None:
    w = np.ones((4, 3), np.float32)
    node = ir.node("MatMul", [ir.Value(name="x"), ir.Value(name="w")])
    assert mean_shift(node, w, w, np.zeros(5)) is None


def _calib(tmp_path, model, x):
    np.savez(tmp_path / "calib.npz", x=x)
    return load_calibration_data(tmp_path / "calib.npz", model)


def test_collect_input_means_matches_numpy(tmp_path) -> None:
    model = cnn()
    x = (np.random.default_rng(1).standard_normal((10, 3, 16, 16)) + 0.5).astype(np.float32)
    AnnotateInt8Pass()(model)
    result = CollectInputMeansPass(calibration_data=_calib(tmp_path, model, x), batch_size=3)(model)
    assert result.modified and result.stats.counters["means"] == 3
    first = next(n for n in model.graph if n.op_type == "Conv")
    np.testing.assert_allclose(get_channel_mean(first.inputs[0]), x.astype(np.float64).mean(axis=(0, 2, 3)),
                               rtol=1e-12)
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert get_channel_mean(gemm.inputs[0]).shape == (gemm.inputs[1].const_value.shape[0],)  # [K, N], transB=0
    again = CollectInputMeansPass(calibration_data=_calib(tmp_path, model, x), batch_size=5)(model)
    assert again.modified is False  # same data, same means (batching does not matter beyond float64 rounding)


def test_collect_input_means_needs_data() -> None:
    model = cnn()
    AnnotateInt8Pass()(model)
    with pytest.raises(CalibrationError, match="calibration data"):
        CollectInputMeansPass()(model)


def _offset_cnn(seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    """Conv (no bias) -> Relu -> Conv (bias) on inputs with a large channel mean, where rounding shifts the mean."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    b2 = rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [helper.make_tensor(n, F, a.shape, a.reshape(-1).tolist()) for n, a in (("w1", w1), ("w2", w2),
                                                                                 ("b2", b2))]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 12, 12])],
                   [helper.make_tensor_value_info("y", F, ["N", 8, 12, 12])], inits)
    x = (rng.standard_normal((32, 3, 12, 12)) * 0.3 + np.array([3.0, -2.0, 4.0])[None, :, None, None])
    return model, x.astype(np.float32)


def _lower(model, data, *, correct: bool, **options):
    mark_fused_activations(model)
    AnnotateInt8Pass()(model)
    CalibratePass(calibration_data=data)(model)
    if correct:
        CollectInputMeansPass(calibration_data=data)(model)
    return LowerInt8QDQPass(**options)(model)


def test_bias_correction_removes_the_mean_error(tmp_path) -> None:
    errors, mean_errors = {}, {}
    for correct in (False, True):
        model, x = _offset_cnn()
        (expected,) = run(model, {"x": x})
        result = _lower(model, _calib(tmp_path, model, x), correct=correct)
        (actual,) = run(model, {"x": x})
        errors[correct] = rel_l2(actual, expected)
        mean_errors[correct] = float(np.abs((actual - expected).mean(axis=(0, 2, 3))).mean())
        if correct:
            counters = result.stats.counters
            assert counters["bias_corrected"] == 1 and counters["bias_correction_bias_added"] == 1
            conv1 = next(n for n in model.graph if n.name == "conv1")
            assert len(conv1.inputs) == 3 and conv1.inputs[2].producer().op_type == "DequantizeLinear"
    assert mean_errors[True] < 0.5 * mean_errors[False], mean_errors
    assert errors[True] < errors[False], errors


def test_bias_correction_can_be_turned_off(tmp_path) -> None:
    model, x = _offset_cnn()
    result = _lower(model, _calib(tmp_path, model, x), correct=True, bias_correction=False)
    assert "bias_corrected" not in result.stats.counters
    conv1 = next(n for n in model.graph if n.name == "conv1")
    assert len(conv1.inputs) == 2


def test_matmul_without_bias_is_counted(tmp_path) -> None:
    w = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    model = _one_layer("MatMul", w, ["N", 6], ["N", 4])
    x = (np.random.default_rng(3).standard_normal((16, 6)) + 1).astype(np.float32)
    result = _lower(model, _calib(tmp_path, model, x), correct=True)
    assert result.stats.counters["bias_correction_no_bias"] == 1
    assert result.stats.counters["lowered_MatMul"] == 1
