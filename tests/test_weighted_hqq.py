"""HQQ weighted by the activations (``weight-only-hqq`` given calibration data): each block never ends worse than
the grid it starts from in the importance-weighted ``l1`` error it optimises, the data is read only when given, the
data-free codes are unchanged, and the codes reach the lowering."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.calibration.data import load_calibration_data
from qcompiler.calibration.text import complete_decoder_inputs
from qcompiler.formats import get_format
from qcompiler.formats.blockwise import BlockwiseWeight
from qcompiler.formats.weighted_grid import bounded_importance
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.passes._weight_layers import annotated_layers, layer_weight
from qcompiler.passes.algorithms.weight_only_hqq import WeightOnlyHQQPass, quantize_hqq
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass
from tests._weight_only import annotate_weight_only

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_bad_inputs import _expect_rejected  # noqa: E402

LLAMA = Path(__file__).resolve().parent.parent / "models" / "tiny_llama_kv.onnx"


class _Untouchable:
    def __getattr__(self, name: str):
        raise AssertionError(f"calibration data read ({name})")


def _llama() -> ir.Model:
    model = ir.load(str(LLAMA))
    annotate_weight_only(model, bits=4, block_size=16, symmetric=False)
    return model


def _data(model: ir.Model):
    ids = np.random.default_rng(3).integers(0, 128, (6, 12)).astype(np.int64)
    return load_calibration_data(complete_decoder_inputs(model, {"input_ids": ids}), model)


def _weighted_l1(weight: np.ndarray, q: BlockwiseWeight, importance: np.ndarray, block: int) -> np.ndarray:
    """Per block ``sum_j I_j |w_j - w_q,j|`` (``[N, n_blocks]``)."""
    k, n = weight.shape
    blocks = -(-k // block)
    error = np.zeros((n, blocks * block))
    error[:, :k] = np.abs(weight.T.astype(np.float64) - q.dequantize().T) * bounded_importance(importance)
    return error.reshape(n, blocks, block).sum(axis=2)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 70), n=st.integers(1, 4), block=st.sampled_from([16, 32]),
       scheme=st.sampled_from([("int4", False, "int"), ("int4", False, "float"), ("int4", True, "int"),
                               ("int3", False, "int"), ("int2", False, "int")]),
       start=st.sampled_from(["weighted", "plain"]))
def test_each_block_ends_no_worse_than_its_start_in_weighted_l1(seed, k, n, block, scheme, start) -> None:
    name, symmetric, zero_point = scheme
    rng = np.random.default_rng(seed)
    weight = (rng.standard_t(3, (k, n)) * 0.05).astype(np.float32)
    importance = rng.lognormal(0, 2, k)
    fmt = get_format(name)
    spec = fmt.spec(block_size=block, symmetric=symmetric, zero_point=zero_point)
    chosen = quantize_hqq(fmt, spec, weight, importance=importance, start=start)
    assert fmt.fits(chosen, weight, spec)
    grid = fmt.weighted_grid(weight, spec, importance) if start == "weighted" else fmt.grid(weight, spec)
    first = fmt.from_codes(fmt.codes_on_grid(weight, *grid, spec), *grid, spec, k)
    ends, starts = (_weighted_l1(weight, q, importance, block) for q in (chosen, first))
    assert np.all(ends <= starts * (1 + 1e-5) + 1e-12)


def test_data_free_codes_are_unchanged_and_data_is_read_only_when_given() -> None:
    model = _llama()
    WeightOnlyHQQPass(calibration_data=_Untouchable(), weighted_grid=False)(model)  # switched off: not read
    for node, spec in annotated_layers(model):
        weight = layer_weight(model, node)[0]
        want = quantize_hqq(get_format(spec.format), spec, weight)  # no importance: the paper's objective
        got = node.meta[WEIGHT_CODES_KEY]
        assert np.array_equal(got.codes, want.codes) and np.array_equal(got.scales, want.scales)


@pytest.mark.parametrize("sequential", [True, False])
def test_with_data_every_layer_is_weighted_and_lowered(sequential) -> None:
    model = _llama()
    result = WeightOnlyHQQPass(calibration_data=_data(model), sequential=sequential)(model)
    layers = list(annotated_layers(model))
    assert result.stats.counters["weighted_layers"] == len(layers)
    plain = _llama()
    WeightOnlyHQQPass()(plain)
    moved = 0
    for (node, _), (other, _) in zip(layers, annotated_layers(plain), strict=True):
        record = result.stats.layers[node.name]
        assert {"hqq_weighted_error_db", "rtn_weighted_error_db"} <= set(record)
        moved += not np.array_equal(node.meta[WEIGHT_CODES_KEY].codes, other.meta[WEIGHT_CODES_KEY].codes)
    assert moved > 0
    assert LowerWeightOnlyPass()(model).stats.counters["codes_chosen_by_algorithm"] == len(layers)


@pytest.mark.parametrize(("options", "needle"), [
    ('start = "best"', "start must be 'weighted' or 'plain'"),
    ("sequential = 2", "sequential must be true or false"),
    ('weighted_grid = "no"', "weighted_grid must be true or false"),
    ("objective = 1", "unknown option 'objective' for pass 'weight-only-hqq'"),
])
def test_bad_options_are_one_line_errors(tmp_path, capfd, options, needle) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "int4"\n[weight-only]\nalgorithm = "hqq"\nsymmetric = false\n'
                      f'[pass-options.weight-only-hqq]\n{options}\n', encoding="utf-8")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    _expect_rejected([str(LLAMA), "-o", str(out), "--recipe", str(recipe)], out, [LLAMA, recipe], capfd, needle)
