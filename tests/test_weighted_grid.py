"""Importance-weighted grids (:mod:`qcompiler.formats.weighted_grid`): never worse than round to nearest's min/max
grid in weighted error, valid grids of the format, and the importance sanitised."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.formats import blockwise, get_format
from qcompiler.formats.weighted_grid import bounded_importance, weighted_error, weighted_grid

SCHEMES = [  # (format, bits, symmetric, float zero point)
    ("int4", 4, False, False), ("int4", 4, True, False), ("int4", 4, False, True), ("int3", 3, False, False),
    ("int2", 2, False, False), ("int8", 8, True, False), ("ternary", 2, True, False),
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 80), n=st.integers(1, 6),
       block=st.sampled_from([16, 32, 64]), scheme=st.sampled_from(SCHEMES),
       importance_kind=st.sampled_from(["ones", "lognormal", "sparse", "outlier"]))
def test_never_worse_than_round_to_nearest(seed, k, n, block, scheme, importance_kind):
    name, bits, symmetric, float_zero = scheme
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((k, n)) * rng.uniform(0.01, 3.0, (1, n))).astype(np.float32)
    if k > 3:
        weight[rng.integers(0, k), :] *= 8  # an outlier weight per column
    importance = {"ones": np.ones(k), "lognormal": rng.lognormal(0, 2, k),
                  "sparse": np.where(rng.random(k) < 0.3, rng.uniform(0, 5, k), 0.0),
                  "outlier": np.r_[1e6, np.ones(k - 1)] if k > 1 else np.ones(1)}[importance_kind]
    ternary = name == "ternary"
    scale, zero = weighted_grid(weight, importance, bits, block, symmetric, float_zero, ternary)
    base_scale, base_zero = blockwise.grid(weight, bits, block, symmetric, float_zero, ternary)
    assert scale.shape == base_scale.shape and scale.dtype == np.float32 and zero.dtype == base_zero.dtype
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    if symmetric or ternary:
        assert np.array_equal(zero, base_zero)  # the format's fixed zero point
    bounded = bounded_importance(importance)
    searched = weighted_error(weight, bounded, scale, zero, bits, block, ternary)
    plain = weighted_error(weight, bounded, base_scale, base_zero, bits, block, ternary)
    assert searched <= plain * (1 + 1e-9) + 1e-30
    fmt = get_format(name)
    spec = fmt.spec(block_size=block, symmetric=symmetric, zero_point="float" if float_zero else "int")
    codes = fmt.codes_on_grid(weight, scale, zero, spec)
    low, high = fmt.code_limits(spec)
    assert codes.min() >= low and codes.max() <= high


def test_it_pays_where_importance_is_uneven():
    rng = np.random.default_rng(0)
    weight = rng.standard_t(3, (256, 64)).astype(np.float32) * 0.05
    importance = rng.lognormal(0, 1.5, 256)
    scale, zero = weighted_grid(weight, importance, 4, 128, False)
    base = blockwise.grid(weight, 4, 128, False)
    searched = weighted_error(weight, importance, scale, zero, 4, 128)
    plain = weighted_error(weight, importance, *base, 4, 128)
    assert searched < 0.85 * plain  # heavy-tailed weights: the min/max grid wastes its levels on the tails


def test_importance_is_sanitised():
    importance = np.r_[np.ones(10), 1e30, np.nan, np.inf, -3.0, 0.0]
    bounded = bounded_importance(importance)
    assert bounded[10] == 1e30 and np.all(bounded[:10] == 1) and np.all(bounded[11:] == 0)
    assert np.array_equal(bounded_importance(np.zeros(4)), np.ones(4))  # nothing seen: plain MSE
