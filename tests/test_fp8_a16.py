"""A16W8 (uint16/int16 activations, int8 weights) and FP8 E4M3FN (weights and activations) in the int8 recipe."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.calibration.data import load_calibration_data
from qcompiler.config import QuantizationOptions, load_recipe
from qcompiler.errors import ConfigError
from qcompiler.qspec import QuantSpec, dequantize, numpy_dtype, onnx_dtype, qrange, quantize, scale_zero_point
from tests._int8_models import cnn, rel_l2, run

_FP8 = "float8e4m3fn"
_finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


def test_spec_validation_and_types():
    assert qrange("uint16") == (0, 65535) and qrange("int16", True) == (-32767, 32767)
    assert qrange(_FP8, True) == (-448, 448)
    assert onnx_dtype("uint16") == ir.DataType.UINT16 and onnx_dtype(_FP8) == ir.DataType.FLOAT8E4M3FN
    assert numpy_dtype(_FP8) == np.dtype(ml_dtypes.float8_e4m3fn)
    QuantSpec(_FP8, "per_channel", axis=0, symmetric=True)
    with pytest.raises(ValueError):
        QuantSpec(_FP8, symmetric=False)
    with pytest.raises(ValueError):
        QuantSpec("uint16", symmetric=True)
    with pytest.raises(ConfigError):
        QuantizationOptions(weight_dtype="int16")
    QuantizationOptions(weight_dtype=_FP8, activation_dtype=_FP8)


def test_scale_zero_point_16bit():
    scale, zp = scale_zero_point(-1.0, 3.0, "uint16", False)
    assert np.isclose(scale, 4.0 / 65535) and zp.dtype == np.uint16
    assert dequantize(quantize(np.array([0.0]), scale, zp, "uint16"), scale, zp)[0] == 0.0
    scale, zp = scale_zero_point(-1.0, 3.0, "int16", True)
    assert np.isclose(scale, 3.0 / 32767) and zp == 0 and zp.dtype == np.int16
    scale, zp = scale_zero_point(-1.0, 3.0, _FP8, True)
    assert np.isclose(scale, 3.0 / 448) and zp.dtype == ml_dtypes.float8_e4m3fn and float(zp) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(_finite, min_size=1, max_size=32), st.floats(1e-3, 1e3))
def test_int16_round_trip(values, extra):
    x = np.array(values)
    lo, hi = float(x.min()) - extra, float(x.max()) + extra
    scale, zp = scale_zero_point(lo, hi, "int16", True)
    back = dequantize(quantize(x, scale, zp, "int16", symmetric=True), scale, zp)
    assert np.all(np.abs(back - x) <= float(scale) / 2 * (1 + 1e-6))
    scale, zp = scale_zero_point(lo, hi, "uint16", False)
    back = dequantize(quantize(x, scale, zp, "uint16"), scale, zp)
    assert np.all(np.abs(back - x) <= float(scale) / 2 * (1 + 1e-6) + 1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(_finite, min_size=1, max_size=32), st.floats(1e-2, 1e3))
def test_fp8_round_trip_and_saturation(values, absmax):
    x = np.array(values)
    scale, zp = scale_zero_point(-absmax, absmax, _FP8, True)
    q = quantize(x, scale, zp, _FP8, symmetric=True)
    assert q.dtype == ml_dtypes.float8_e4m3fn and not np.any(np.isnan(q.astype(np.float64)))
    back = dequantize(q, scale, zp)
    s = float(scale)
    inside = (np.abs(x) <= 448 * s) & (np.abs(x) >= 2.0**-6 * s)  # the normal FP8 range
    assert np.all(np.abs(back[inside] - x[inside]) <= 2.0**-4 * np.abs(x[inside]) * (1 + 1e-6))
    outside = np.abs(x) > 448 * s
    assert np.allclose(np.abs(back[outside]), 448 * s, rtol=1e-6)
    assert np.all(np.sign(back[outside]) == np.sign(x[outside]))


def _compile(tmp_path, model, **quantization):
    from qcompiler.pipelines import BuildContext, build_pipeline

    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    data = load_calibration_data(tmp_path / "calib.npz", model)
    recipe = load_recipe("int8")
    recipe = dataclasses.replace(recipe, quantization=dataclasses.replace(recipe.quantization, **quantization))
    report = build_pipeline(recipe, BuildContext(calibration_data=data)).run(model)
    return {p.name: p for p in report.passes}["lower-int8-qdq"].stats


def _cnn(opset: int) -> ir.Model:
    model = cnn()
    model.opset_imports[""] = opset  # Conv/Relu/GAP/Flatten/Gemm have the same schema in opsets 17-21
    return model


_X = np.random.default_rng(13).standard_normal((4, 3, 16, 16)).astype(np.float32)


def _run_exact_matmul(model: ir.Model) -> np.ndarray:
    """ORT with float activations in MatMulNBits: ORT fuses DQ(int8 W) -> MatMul (the Gemm behind a 16-bit DQ) into
    MatMulNBits whose default accuracy level quantizes its activation to int8 at run time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": _X})[0]


def _error(tmp_path, opset: int, exact_matmul: bool = False, **quantization) -> tuple[float, ir.Model, object]:
    model = _cnn(opset)
    expected = run(model, {"x": _X})[0]
    stats = _compile(tmp_path, model, **quantization)
    actual = _run_exact_matmul(model) if exact_matmul else run(model, {"x": _X})[0]
    return rel_l2(actual, expected), model, stats


def _initializer_types(model: ir.Model) -> set[ir.DataType]:
    return {v.const_value.dtype for v in model.graph.initializers.values()}


@pytest.mark.parametrize("dtype", ["uint16", "int16"])
def test_a16w8_runs_in_ort_and_beats_uint8(tmp_path, dtype):
    err8, _, _ = _error(tmp_path, 21, exact_matmul=True)
    err16, model, stats = _error(tmp_path, 21, exact_matmul=True, activation_dtype=dtype)
    err16_default = _error(tmp_path, 21, activation_dtype=dtype)[0]  # ORT's int8 MatMulNBits activations
    assert err16_default < 0.02
    assert stats.counters["lowered_Conv"] == 2
    assert onnx_dtype(dtype) in _initializer_types(model) and ir.DataType.INT8 in _initializer_types(model)
    assert err16 < err8, (err16, err8)
    assert err16 < 0.02


def test_fp8_weights_and_activations_run_in_ort(tmp_path):
    err, model, stats = _error(tmp_path, 21, activation_dtype=_FP8, weight_dtype=_FP8)
    assert stats.counters["lowered_Conv"] == 2 and stats.counters["lowered_Gemm"] == 1
    assert ir.DataType.FLOAT8E4M3FN in _initializer_types(model)
    assert ir.DataType.INT32 not in _initializer_types(model)  # the bias stays float
    assert err < 0.1, err
    assert not any(n.op_type == "Relu" and n.inputs[0].producer().op_type == "Conv" for n in model.graph)


@pytest.mark.parametrize(("quantization", "need"), [({"activation_dtype": "int16"}, 21),
                                                    ({"activation_dtype": _FP8, "weight_dtype": _FP8}, 19)])
def test_old_opset_skips_with_reason(tmp_path, quantization, need):
    err, model, stats = _error(tmp_path, 17, **quantization)
    reasons = stats.skip_reasons()
    assert any(f"opset below {need}" in r for r in reasons), reasons
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph)
    assert err < 0.01  # float passes of the recipe (e.g. equalization) only


def test_fp8_mlp_through_compile_model(tmp_path):
    from qcompiler.api import compile_model
    from tests._int8_models import mlp

    model = mlp(opset=21)
    ir.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    compile_model(tmp_path / "m.onnx", tmp_path / "o.onnx", recipe="int8", calib=tmp_path / "c.npz",
                  quantization={"activation_dtype": _FP8, "weight_dtype": _FP8})
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    out = ir.load(tmp_path / "o.onnx")
    assert ir.DataType.FLOAT8E4M3FN in _initializer_types(out)
    assert rel_l2(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 0.1


def test_cli_dtype_flags():
    from qcompiler.cli import build_parser

    args = build_parser().parse_args(["m.onnx", "-o", "o.onnx", "--activation-dtype", "int16",
                                      "--weight-dtype", _FP8])
    assert args.activation_dtype == "int16" and args.weight_dtype == _FP8
