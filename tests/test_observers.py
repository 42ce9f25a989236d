"""Histogram observers: the running histogram (exact counts, min/max, order independence, NaN/Inf), the percentile,
entropy and MSE estimators against analytic distributions and exact numpy quantization errors, their MinMax
fallbacks, the options plumbing (config, observers, CLI), and the int8 recipe calibrated with entropy end to end."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import cnn, mlp, rel_l2, run
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.calibration.estimators import entropy_range, mse_range, percentile_range
from qcompiler.calibration.histogram import Histogram
from qcompiler.calibration.observers import OBSERVERS, MinMaxObserver, PercentileObserver, make_observer
from qcompiler.config import CALIBRATORS, CalibrationOptions, load_recipe, override
from qcompiler.errors import ConfigError
from qcompiler.passes.annotate import AnnotateInt8Pass
from qcompiler.qspec import ObserverSpec, QuantSpec, ValueRange, dequantize, quantize, scale_zero_point

_FMAX = float(np.finfo(np.float32).max)
SYM = QuantSpec(dtype="int8", symmetric=True, observer="entropy")
ASYM = QuantSpec(dtype="uint8", symmetric=False, observer="entropy")
SPECS = [SYM, ASYM]
ESTIMATORS = [percentile_range, entropy_range, mse_range]


def _hist(batches, bins: int = 2048) -> Histogram:
    hist = Histogram(bins)
    for batch in batches:
        hist.update(batch)
    return hist


def _qmse(x: np.ndarray, found: ValueRange, spec: QuantSpec) -> float:
    """Exact mean squared quantization error of the samples with the range's scale and zero point."""
    scale, zp = scale_zero_point(found.min, found.max, spec.dtype, spec.symmetric)
    q = quantize(x, scale, zp, spec.dtype, symmetric=spec.symmetric)
    return float(np.mean((dequantize(q, scale, zp) - x.astype(np.float64)) ** 2))


def _threshold(found: ValueRange) -> float:
    return max(-found.min, found.max)


# -- the histogram ----------------------------------------------------------------------------------------------------
_batch = st.tuples(st.integers(0, 300), st.integers(-6, 8), st.floats(-3, 3), st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(_batch, min_size=1, max_size=8), st.integers(0, 2**32 - 1), st.sampled_from([16, 64, 2048]))
def test_histogram_counts_min_max_exact_and_order_independent(specs, seed, bins):
    rng = np.random.default_rng(seed)
    batches = []
    for size, exp, shift, relu in specs:  # scales from 1e-6 to 1e8: several doublings in one sequence
        b = (rng.standard_normal(size) * 10.0 ** exp + shift * 10.0 ** exp).astype(np.float32)
        batches.append(np.maximum(b, 0) if relu else b)
    data = np.concatenate(batches)
    hist = _hist(batches, bins)
    assert hist.count == data.size and hist.num_batches == len(batches)
    if data.size == 0:
        return
    assert hist.min == float(data.min()) and hist.max == float(data.max())
    assert hist.zeros == int(np.count_nonzero(data == 0))
    if hist.width is None:  # only zeros so far
        assert not data.any() and not hist.counts.any()
        return
    counts = hist.counts
    assert counts.sum() == data.size
    # exactly the histogram built at the final width in one go, and 0 is an edge
    direct = np.floor(data.astype(np.float64) / hist.width).astype(np.int64) - hist.first_cell
    assert direct.min() >= 0 and direct.max() < bins
    np.testing.assert_array_equal(np.bincount(direct, minlength=bins), counts)
    assert hist.edges()[hist.zero_index] == 0.0
    # the same data in another order and another split gives the same histogram
    shuffled = rng.permutation(data)
    other = _hist(np.array_split(shuffled, int(rng.integers(1, 6))), bins)
    assert (other.width, other.first_cell) == (hist.width, hist.first_cell)
    np.testing.assert_array_equal(other.counts, counts)


def test_histogram_doubling_keeps_memory_fixed_and_resolution():
    hist = Histogram()
    for scale in (1e-3, 1.0, 1e3, 1e6):
        hist.update(np.linspace(-scale, scale, 1000, dtype=np.float32))
    assert hist.counts.shape == (2048,) and hist.count == 4000
    assert 1e6 / 2048 <= hist.width <= 4 * 1e6 / 2048  # the final width: the smallest power of two that fits
    with pytest.raises(ValueError):
        Histogram(bins=7)


def test_histogram_nan_inf_and_empty():
    hist = Histogram()
    hist.update(np.array([], np.float32))
    hist.update(np.array([np.nan, np.nan], np.float32))
    assert hist.count == 0 and hist.saw_nonfinite and hist.width is None
    hist.update(np.array([np.nan, 1.0, -2.0, np.inf, -np.inf, 0.5], np.float32))
    assert hist.count == 5 and hist.counts.sum() == 5
    assert hist.min == -_FMAX and hist.max == _FMAX


# -- percentile -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def normal() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(400_000).astype(np.float32)


@pytest.mark.parametrize("p", [90.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_numpy_within_one_bin(normal, p):
    observer = make_observer("percentile", percentile=p)
    for batch in np.array_split(normal, 9):
        observer.update(batch)
    w = observer.histogram.width
    t = _threshold(observer.range(SYM))
    assert abs(t - np.percentile(np.abs(normal), p)) <= w
    found = observer.range(ASYM)
    tail = (100.0 - p) / 2
    assert abs(found.min - np.percentile(normal, tail)) <= w
    assert abs(found.max - np.percentile(normal, 100.0 - tail)) <= w
    relu = np.maximum(normal, 0)
    hist = _hist([relu])
    found = percentile_range(hist, "uint8", False, percentile=p)
    assert found.min == 0.0 and abs(found.max - np.percentile(relu, p)) <= hist.width


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.sampled_from(SPECS))
def test_ranges_do_not_depend_on_batch_order_or_split(seed, parts, spec):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(20_000), rng.laplace(size=5_000) * 3]).astype(np.float32)
    one = _hist([x])
    other = _hist(np.array_split(rng.permutation(x), parts))
    for estimate in ESTIMATORS:
        a, b = estimate(one, spec.dtype, spec.symmetric), estimate(other, spec.dtype, spec.symmetric)
        assert abs(a.min - b.min) <= one.width and abs(a.max - b.max) <= one.width


# -- entropy and MSE ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outliers() -> tuple[np.ndarray, np.ndarray]:
    """A standard normal bulk of 10**6 and four outliers at +-50 (a 4e-6 fraction)."""
    bulk = np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32)
    return bulk, np.concatenate([bulk, np.array([50.0, -50.0, 49.0, -48.0], np.float32)])


@pytest.mark.parametrize(("estimate", "clip", "gain"), [(entropy_range, 0.25, 0.1), (mse_range, 0.5, 0.25)],
                         ids=["entropy", "mse"])
@pytest.mark.parametrize("spec", SPECS, ids=["int8-sym", "uint8"])
def test_outliers_are_clipped_and_the_bulk_is_finer(outliers, estimate, clip, gain, spec):
    bulk, x = outliers
    hist = _hist(np.array_split(x, 4))
    found = estimate(hist, spec.dtype, spec.symmetric)
    minmax = ValueRange(float(x.min()), float(x.max()))
    # entropy keeps the bulk; MSE trades the outliers' clipping error (4 * (50 - t)**2) against the rounding noise
    assert 3.0 < _threshold(found) < clip * 50.0
    assert x.min() <= found.min <= found.max <= x.max()
    assert _qmse(bulk, found, spec) < gain * _qmse(bulk, minmax, spec)
    if estimate is mse_range:
        assert _qmse(x, found, spec) < 0.6 * _qmse(x, minmax, spec)


@pytest.mark.parametrize("spec", SPECS, ids=["int8-sym", "uint8"])
def test_entropy_on_relu_output_ignores_the_spike_of_exact_zeros(normal, spec):
    x = np.maximum(normal, 0)  # half of it exactly 0: representable on every grid, left out of P and Q
    found = entropy_range(_hist([x]), spec.dtype, spec.symmetric)
    assert found.min == 0.0 and np.percentile(x, 99.9) <= found.max <= x.max()


_DISTRIBUTIONS = ["normal", "laplace", "uniform", "student3", "relu", "exponential", "mixture"]


def _sample(name: str, rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    """Continuous samples (plus exact zeros for relu): a histogram cannot see an atom inside a bin."""
    if name == "relu":
        return np.maximum(rng.standard_normal(n) + shift, 0.0)
    return shift + _continuous(name, rng, n)


def _continuous(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if name == "normal":
        return rng.standard_normal(n)
    if name == "laplace":
        return rng.laplace(size=n)
    if name == "uniform":
        return rng.uniform(-1.0, 2.0, n)
    if name == "student3":
        return rng.standard_t(3, n)
    if name == "exponential":
        return rng.exponential(1.0, n)
    return np.where(rng.random(n) < 0.95, rng.standard_normal(n) * 0.1, rng.standard_normal(n) * 2.0 + 1.0)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(_DISTRIBUTIONS), st.integers(0, 2**32 - 1), st.integers(2_000, 30_000),
       st.floats(1e-3, 1e3), st.floats(-1.0, 1.0), st.sampled_from(SPECS))
def test_mse_range_is_never_worse_than_minmax(name, seed, n, scale, shift, spec):
    rng = np.random.default_rng(seed)
    x = (_sample(name, rng, n, shift) * scale).astype(np.float32)
    found = mse_range(_hist(np.array_split(x, 3)), spec.dtype, spec.symmetric)
    assert np.isfinite([found.min, found.max]).all() and x.min() <= found.min <= found.max <= x.max()
    minmax = ValueRange(float(x.min()), float(x.max()))
    assert _qmse(x, found, spec) <= _qmse(x, minmax, spec) * (1 + 1e-9)


def test_estimators_are_fast_on_2048_bins():
    x = np.random.default_rng(2).laplace(size=200_000).astype(np.float32)
    hist = _hist([x])
    assert np.count_nonzero(hist.counts) > 1000
    for estimate in ESTIMATORS:
        for spec in SPECS:
            start = time.perf_counter()
            estimate(hist, spec.dtype, spec.symmetric)
            assert time.perf_counter() - start < 0.25, estimate.__name__  # ~5 ms measured; a loose bound


# -- fallbacks and non-finite input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
@pytest.mark.parametrize("data", [np.full(1000, 3.5), np.array([-2.0]), np.zeros(64), np.array([0.0, 1.0, 2.0] * 50),
                                  np.array([7.0, np.nan])], ids=["constant", "single", "zeros", "three-values",
                                                                 "with-nan"])
def test_degenerate_tensors_fall_back_to_minmax(name, data):
    for spec in SPECS:
        observer = make_observer(name)
        minmax = MinMaxObserver()
        for part in np.array_split(data.astype(np.float32), 2):
            observer.update(part)
            minmax.update(part)
        found = observer.range(spec)
        expected = minmax.range()
        assert (found.min, found.max) == (expected.min, expected.max)
        assert observer.fallback in ("constant", "few_bins")
        scale, _ = scale_zero_point(found.min, found.max, spec.dtype, spec.symmetric)
        assert np.isfinite(scale) and scale > 0


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_nan_and_inf_inputs(name):
    observer = make_observer(name)
    assert observer.range(SYM) is None
    observer.update(np.array([np.nan] * 4, np.float32))
    assert observer.range(SYM) is None
    x = np.random.default_rng(3).standard_normal(10_000).astype(np.float32)
    with_nan = x.copy()
    with_nan[::97] = np.nan
    observer.update(with_nan)
    assert observer.saw_nonfinite and observer.fallback is None
    found = observer.range(ASYM)
    assert np.isfinite([found.min, found.max]).all() and np.nanmin(with_nan) <= found.min <= found.max
    observer.update(np.array([np.inf, 1.0], np.float32))  # an Inf stretches the histogram over the float32 range
    for spec in SPECS:
        found = observer.range(spec)
        assert np.isfinite([found.min, found.max]).all() and found.max == _FMAX


# -- options plumbing -----------------------------------------------------------------------------------------------
def test_registry_options_and_validation():
    assert set(OBSERVERS) == set(CALIBRATORS)
    assert make_observer("percentile", percentile=99.0).percentile == 99.0
    assert make_observer("entropy", bins=256).histogram.bins == 256
    assert MinMaxObserver().range(SYM) is None  # MinMax takes (and ignores) the spec
    for bad in (50.0, 100.5, True, "99"):
        with pytest.raises(ValueError):
            PercentileObserver(percentile=bad)
        with pytest.raises(ConfigError, match="calibration.percentile"):
            CalibrationOptions(percentile=bad)
        with pytest.raises(ConfigError, match="percentile"):
            AnnotateInt8Pass(observer="percentile", percentile=bad)
    with pytest.raises(ConfigError, match="calibration.calibrator"):
        CalibrationOptions(calibrator="kl")
    recipe = override(load_recipe("int8"), calibration={"calibrator": "percentile", "percentile": 99.9})
    # the observer is one constructor call in the spec: kind and percentile together, nothing on the side
    assert AnnotateInt8Pass.from_recipe(recipe, None).observer == ObserverSpec("percentile", percentile=99.9)
    assert ObserverSpec("percentile", 99.9).create().percentile == 99.9
    from qcompiler.calibration import histogram, observers

    assert (ObserverSpec().percentile, ObserverSpec().bins) == (observers.DEFAULT_PERCENTILE, histogram.DEFAULT_BINS)


def test_cli_flags(tmp_path, capsys):
    from _cli import run_main

    from qcompiler.cli import build_parser

    args = build_parser().parse_args(["m.onnx", "--calibrator", "mse", "--percentile", "99.5"])
    assert (args.calibrator, args.percentile) == ("mse", 99.5)
    code, _, err = run_main(["m.onnx", "-o", "o.onnx", "--calibrator", "kl"], capsys)
    assert code == 2 and "invalid choice" in err
    model = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(mlp()), model)
    np.savez(tmp_path / "c.npz", x=np.ones((2, 64), np.float32))
    code, _, err = run_main([str(model), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib",
                             str(tmp_path / "c.npz"), "--calibrator", "percentile", "--percentile", "30"], capsys)
    assert code == 2 and "calibration.percentile" in err


# -- end to end -------------------------------------------------------------------------------------------------------
def _activation_scales(path) -> list[float]:
    proto = onnx.load(path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    return sorted(float(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear")


@pytest.mark.parametrize(("build", "shape"), [(cnn, (3, 16, 16)), (mlp, (64,))], ids=["cnn", "mlp"])
def test_int8_recipe_with_entropy_end_to_end(tmp_path, build, shape):
    from qcompiler.api import compile_model

    model_path = tmp_path / "model.onnx"
    onnx.save(ir.to_proto(build()), model_path)
    rng = np.random.default_rng(4)
    calib = rng.standard_normal((64, *shape)).astype(np.float32)
    calib.reshape(-1)[::5000] *= 8.0  # a few outliers for entropy to clip
    np.savez(tmp_path / "calib.npz", x=calib)
    out = {}
    for calibrator in ("minmax", "entropy"):
        out[calibrator] = tmp_path / f"{calibrator}.onnx"
        result = compile_model(model_path, out[calibrator], recipe="int8", calib=tmp_path / "calib.npz",
                               calibration={"calibrator": calibrator})
        assert result.recipe.calibration.calibrator == calibrator
    assert _activation_scales(out["entropy"]) != _activation_scales(out["minmax"])  # entropy really ran
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    expected = run(build(), {"x": x})[0]
    got = run(ir.load(out["entropy"]), {"x": x})[0]
    assert rel_l2(got, expected) < 0.05
