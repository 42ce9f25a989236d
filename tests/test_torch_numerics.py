"""qcompiler.torch.numerics against the compiler's numpy definitions, bit for bit (hypothesis over shapes, block
sizes, K not a multiple of the block, symmetric/asymmetric, int/float zero points, ties and flat blocks)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qcompiler.formats import get_format  # noqa: E402
from qcompiler.formats.channelwise import quantize_weight, quantize_weight_fp8  # noqa: E402
from qcompiler.qspec import quantize as qspec_quantize  # noqa: E402
from qcompiler.qspec import scale_zero_point  # noqa: E402
from qcompiler.torch import numerics  # noqa: E402

#: where the torch side runs: QCOMPILER_TEST_DEVICE=cuda checks the GPU's arithmetic against numpy too
DEVICE = os.environ.get("QCOMPILER_TEST_DEVICE", "cpu")
if DEVICE != "cpu" and not torch.cuda.is_available():
    pytest.skip("QCOMPILER_TEST_DEVICE names a device torch cannot use", allow_module_level=True)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy()


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and bit patterns (so -0.0 vs 0.0 or NaN payloads would count as different)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and a.tobytes() == b.tobytes()


@st.composite
def weights(draw, max_n: int = 5, max_k: int = 300) -> np.ndarray:
    """A float32 ``W[K, N]`` with a mix of magnitudes, repeated values, zero rows and exact half steps."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "uniform", "grid", "sparse", "constant", "tiny", "huge"]))
    if kind == "normal":
        w = rng.standard_normal((k, n)) * draw(st.sampled_from([1e-3, 0.02, 1.0, 30.0]))
    elif kind == "uniform":
        w = rng.uniform(-1, 1, (k, n))
    elif kind == "grid":  # values on half steps of a grid: rounding ties everywhere
        w = rng.integers(-16, 16, (k, n)) * 0.5 * draw(st.sampled_from([0.25, 0.1, 1.0 / 7]))
    elif kind == "sparse":
        w = rng.standard_normal((k, n)) * (rng.random((k, n)) < 0.1)
    elif kind == "constant":
        w = np.full((k, n), draw(st.sampled_from([0.0, 1.5, -0.75])))
    elif kind == "tiny":
        w = rng.standard_normal((k, n)) * 1e-30
    else:
        w = rng.standard_normal((k, n)) * 1e30
    return w.astype(np.float32)


BLOCKS = st.sampled_from([16, 32, 64, 128, 256, 0])


def _grid_spec(name: str, block: int, symmetric: bool, zero_point: str):
    fmt = get_format(name)
    if name == "ternary":
        symmetric = True
    if not symmetric and zero_point not in fmt.zero_points:
        zero_point = "int"
    return fmt, fmt.spec(block_size=block, symmetric=symmetric, zero_point=zero_point)


@SETTINGS
@given(w=weights(), block=BLOCKS, name=st.sampled_from(["int2", "int3", "int4", "int8", "ternary"]),
       symmetric=st.booleans(), zero_point=st.sampled_from(["int", "float"]))
def test_grid_formats_match_the_compiler(w, block, name, symmetric, zero_point):
    fmt, spec = _grid_spec(name, block, symmetric, zero_point)
    ref = fmt.quantize(w, spec)
    wt = _t(w.T)
    scale, zero = numerics.grid(wt, spec)
    codes = numerics.codes_on_grid(wt, scale, zero, spec)
    assert _same(_np(scale), ref.scales)
    if ref.zero_points is not None:
        assert _same(_np(zero), ref.zero_points)
    assert _same(_np(codes), ref.codes)
    deq = numerics.dequantize_grid(codes, scale, zero, spec.block_for(w.shape[0]))
    assert _same(_np(deq), np.ascontiguousarray(ref.dequantize().T))


@SETTINGS
@given(w=weights(), block=st.sampled_from([16, 32, 64, 128, 256]))
def test_nf4_matches_the_compiler(w, block):
    fmt = get_format("nf4")
    spec = fmt.spec(block_size=block)
    ref = fmt.quantize(w, spec)
    wt = _t(w.T)
    absmax = numerics.nf4_absmax(wt, block)
    codes = numerics.nf4_codes(wt, absmax, block)
    assert _same(_np(absmax), ref.absmax)
    assert _same(_np(codes), ref.codes)
    assert _same(_np(numerics.nf4_dequantize(codes, absmax, block)), np.ascontiguousarray(ref.dequantize().T))


@SETTINGS
@given(w=weights())
def test_fp8_matches_the_compiler(w):
    ref = quantize_weight_fp8(w, 1)
    wt = _t(w.T)
    scale = numerics.fp8_scales(wt)
    values = numerics.fp8_codes(wt, scale)
    assert _same(_np(scale), ref.scale)
    assert _same(_np(values), np.ascontiguousarray(ref.q.astype(np.float32).T))
    fmt = get_format("fp8")
    deq = fmt.quantize(w, fmt.spec()).dequantize()
    assert _same(_np(values * scale[:, None]), np.ascontiguousarray(deq.T))


def test_fp8_rounding_ties_and_double_rounding_cases():
    """Values where rounding through float32 first would give another E4M3FN value than the direct rounding."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    ties = np.array([1.0625, 1.1875, 0.001953125 * 1.5, 0.001953125 * 2.5, 448.0, 464.0, 1e9, -1e9, 0.0, -0.0,
                     2 ** -10, 2 ** -9 * 3.5, 17.0, 19.0], np.float64)
    near = ties + np.array([1, -1]).repeat(ties.size // 2 + 1)[:ties.size] * 1e-12
    x = np.concatenate([ties, near, rng.standard_normal(5000) * 10.0 ** rng.integers(-4, 4, 5000)])
    expect = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = _np(numerics.fp8_round(_t(x)))
    assert np.array_equal(got, expect)


@SETTINGS
@given(w=weights(), axis=st.sampled_from([0, 1]), qmax=st.sampled_from([127, 63]))
def test_int8_channelwise_matches_the_compiler(w, axis, qmax):
    ref = quantize_weight(w, axis, qmax=qmax)
    t = _t(w)
    scale = numerics.int8_scales(t, axis, qmax)
    assert _same(_np(scale), ref.scale)
    assert _same(_np(numerics.int8_codes(t, scale, axis, qmax)), ref.q)


@SETTINGS
@given(low=st.floats(-1e4, 1e4, width=32), width=st.floats(0, 1e4, width=32),
       dtype=st.sampled_from(["uint8", "int8"]), symmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_activation_qparams_and_quantize_match(low, width, dtype, symmetric, seed):
    if dtype == "uint8":
        symmetric = False
    high = low + width
    scale_ref, zero_ref = scale_zero_point(low, high, dtype, symmetric)
    qmin, qmax = (-127 if symmetric else -128, 127) if dtype == "int8" else (0, 255)
    scale, zero = numerics.activation_qparams(torch.tensor(low, dtype=torch.float64, device=DEVICE),
                                              torch.tensor(high, dtype=torch.float64, device=DEVICE), qmin, qmax,
                                              symmetric)
    assert _same(_np(scale), scale_ref)
    assert float(zero) == float(zero_ref)
    rng = np.random.default_rng(seed)
    x = (rng.uniform(low - width * 0.2, high + width * 0.2, 500)).astype(np.float32)
    x = np.concatenate([x, (np.arange(-20, 20) + 0.5).astype(np.float32) * scale_ref])  # ties
    got = _np(numerics.quantize_activation(_t(x), scale, zero, qmin, qmax))
    # ONNX Runtime computes x / s in float32; the compiler's float64 helper differs only off ties
    expect = np.clip(np.rint(x / scale_ref) + zero_ref.astype(np.float32), qmin, qmax)
    assert np.array_equal(got, expect.astype(np.float32))
    assert np.abs(got - qspec_quantize(x, scale_ref, zero_ref, dtype, symmetric=symmetric).astype(np.float32)).max() \
        <= 1


def test_activation_quantize_equals_onnxruntime():
    """The fake-quant's codes are ONNX Runtime's QuantizeLinear codes on the same inputs, ties included."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    scale, zero = np.float32(0.0137), np.uint8(131)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [None])],
        [onnx.numpy_helper.from_array(np.array(scale), "s"), onnx.numpy_helper.from_array(np.array(zero), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-3, 3, 20000), (np.arange(-300, 300) + 0.5) * float(scale)]).astype(np.float32)
    expect = session.run(None, {"x": x})[0]
    got = numerics.quantize_activation(_t(x), torch.tensor(scale, device=DEVICE),
                                         torch.tensor(float(zero), device=DEVICE), 0, 255)
    assert np.array_equal(_np(got).astype(np.uint8), expect)
