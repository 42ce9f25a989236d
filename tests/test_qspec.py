"""QuantSpec/ValueRange metadata, the scale/zero-point math, the shared weight math and the MinMax observer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler.calibration.observers import MinMaxObserver, make_observer
from qcompiler.formats.channelwise import SQNR_CAP_DB, quantize_weight, sqnr_db
from qcompiler.qspec import (
    MIN_SCALE,
    QuantSpec,
    ValueRange,
    dequantize,
    get_qspec,
    get_range,
    quantize,
    scale_zero_point,
    set_qspec,
    set_range,
)

_floats = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, max_side=6), elements=_floats),
       st.integers(0, 3))
def test_per_channel_round_trip_error_is_at_most_half_a_scale(w, axis):
    axis = axis % w.ndim
    qw = quantize_weight(w, axis)
    assert qw.q.dtype == np.int8 and qw.scale.shape == (w.shape[axis],)
    assert np.all(np.abs(qw.q.astype(np.int32)) <= 127)
    assert np.all(np.isfinite(qw.scale)) and np.all(qw.scale > 0)
    shape = [1] * w.ndim
    shape[axis] = -1
    s = qw.scale.astype(np.float64).reshape(shape)
    err = np.abs(w.astype(np.float64) - qw.q.astype(np.float64) * s)
    assert np.all(err <= s / 2 * (1 + 1e-6) + 1e-30)


@settings(max_examples=60, deadline=None)
@given(_floats, _floats)
def test_asymmetric_uint8_represents_zero_exactly(a, b):
    lo, hi = min(a, b), max(a, b)
    scale, zp = scale_zero_point(lo, hi, "uint8", symmetric=False)
    assert zp.dtype == np.uint8 and np.isfinite(scale) and scale >= np.float32(MIN_SCALE)
    q = quantize(np.zeros(3, np.float32), scale, zp, "uint8")
    assert np.all(dequantize(q, scale, zp) == 0.0)
    # the range (widened to 0) is covered to within half a step
    for r in (lo, hi):
        back = dequantize(quantize(np.array([r], np.float32), scale, zp, "uint8"), scale, zp)
        assert abs(back[0] - r) <= float(scale) * 0.5001 + 1e-6


def test_zero_and_constant_ranges_give_finite_scales():
    for lo, hi in [(0.0, 0.0), (3.5, 3.5), (-2.0, -2.0), (1e-30, 1e-30)]:
        for dtype, sym in [("uint8", False), ("int8", False), ("int8", True)]:
            scale, zp = scale_zero_point(lo, hi, dtype, sym)
            assert np.isfinite(scale) and scale >= np.float32(MIN_SCALE), (lo, hi, dtype)
            q = quantize(np.array([lo, hi], np.float32), scale, zp, dtype, symmetric=sym)
            assert np.all(np.isfinite(dequantize(q, scale, zp)))
    qw = quantize_weight(np.zeros((4, 3), np.float32), 1)
    assert np.all(qw.scale == np.float32(MIN_SCALE)) and not qw.q.any() and qw.sqnr_db == SQNR_CAP_DB
    with pytest.raises(ValueError):
        scale_zero_point(0.0, float("inf"), "uint8", False)


def test_symmetric_int8_formula():
    w = np.array([[0.5, -1.27], [0.0, 0.254]], np.float32)
    qw = quantize_weight(w, 1)
    np.testing.assert_allclose(qw.scale, [0.5 / 127, 1.27 / 127], rtol=1e-6)
    assert qw.q[0, 1] == -127 and qw.q[0, 0] == 127
    per_tensor = quantize_weight(w, None)
    assert per_tensor.scale.shape == () and abs(float(per_tensor.scale) - 1.27 / 127) < 1e-8
    assert 30 < qw.sqnr_db < SQNR_CAP_DB
    assert sqnr_db(w, qw.q, qw.scale, 1) == pytest.approx(qw.sqnr_db)


def test_reduced_range_weights():
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    qw = quantize_weight(w, 1, qmax=63)
    assert np.abs(qw.q).max() == 63
    assert qw.sqnr_db < quantize_weight(w, 1).sqnr_db


@settings(max_examples=40, deadline=None)
@given(st.lists(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), elements=_floats),
                min_size=1, max_size=5))
def test_minmax_observer_equals_numpy_min_max(batches):
    observer = MinMaxObserver()
    for b in batches:
        observer.update(b)
    found = observer.range()
    assert found.min == float(min(b.min() for b in batches))
    assert found.max == float(max(b.max() for b in batches))


def test_minmax_observer_nonfinite_and_empty():
    observer = make_observer("minmax")
    assert observer.range() is None
    observer.update(np.array([np.nan, 1.0, -2.0], np.float32))
    observer.update(np.array([np.inf], np.float32))
    found = observer.range()
    assert found.min == -2.0 and found.max == float(np.finfo(np.float32).max) and observer.saw_nonfinite
    with pytest.raises(ValueError):
        make_observer("no-such-observer")


def test_spec_validation_and_metadata_helpers():
    with pytest.raises(ValueError):
        QuantSpec(dtype="int4")
    with pytest.raises(ValueError):
        QuantSpec(granularity="per_channel")
    with pytest.raises(ValueError):
        QuantSpec(dtype="uint8", symmetric=True)
    with pytest.raises(ValueError):
        QuantSpec(granularity="block", axis=1)
    with pytest.raises(ValueError):
        ValueRange(1.0, 0.0)
    value = ir.Value(name="v")
    spec = QuantSpec(granularity="per_channel", axis=0)
    assert get_qspec(value) is None and set_qspec(value, spec) and not set_qspec(value, QuantSpec(
        granularity="per_channel", axis=0))
    assert get_qspec(value) == spec
    assert set_range(value, ValueRange(-1.0, 2.0)) and not set_range(value, ValueRange(-1.0, 2.0))
    assert get_range(value) == ValueRange(-1.0, 2.0)
