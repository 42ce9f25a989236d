"""Round to nearest on the importance-weighted grid (RTN with an imatrix, ``weight-only-rtn`` given calibration data):
never worse than plain rounding in weighted error, calibration data read only when given and useful, importance
equal to ``E[x^2]`` of the float (one pass) or partly quantized (sequential) model, codes lowered as chosen, and
its options validated with one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import io
from qcompiler.calibration.data import load_calibration_data
from qcompiler.calibration.text import complete_decoder_inputs
from qcompiler.formats import RoundToNearest, get_format
from qcompiler.formats.blockwise import BlockwiseWeight
from qcompiler.formats.weighted_grid import bounded_importance, weighted_error
from qcompiler.metadata import WEIGHT_CODES_KEY
from qcompiler.passes._weight_layers import annotated_layers, layer_weight
from qcompiler.passes.algorithms import _importance
from qcompiler.passes.algorithms.sequential import layer_groups
from qcompiler.passes.algorithms.weight_only_rtn import WeightOnlyRTNPass, imatrix_quantize
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass
from tests._weight_only import annotate_weight_only

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_bad_inputs import _expect_rejected  # noqa: E402

LLAMA = Path(__file__).resolve().parent.parent / "models" / "tiny_llama_kv.onnx"

SCHEMES = [  # (format, symmetric, zero point)
    ("int4", False, "int"), ("int4", True, "int"), ("int4", False, "float"), ("int3", False, "int"),
    ("int2", False, "int"), ("int8", True, "int"), ("ternary", True, "int"),
]


class _Untouchable:
    """Calibration data that fails any read: proves a pass did not use it."""

    def __getattr__(self, name: str):
        raise AssertionError(f"calibration data read ({name})")


def _llama(**options) -> ir.Model:
    model = ir.load(str(LLAMA))
    annotate_weight_only(model, **{"bits": 4, "block_size": 16, "symmetric": False, **options})
    return model


def _data(model: ir.Model, samples: int = 6, seed: int = 1):
    ids = np.random.default_rng(seed).integers(0, 128, (samples, 12)).astype(np.int64)
    return load_calibration_data(complete_decoder_inputs(model, {"input_ids": ids}), model)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 70), n=st.integers(1, 5), block=st.sampled_from([16, 32]),
       scheme=st.sampled_from(SCHEMES), kind=st.sampled_from(["lognormal", "sparse", "outlier", "zeros"]))
def test_never_worse_than_round_to_nearest_in_weighted_error(seed, k, n, block, scheme, kind) -> None:
    name, symmetric, zero_point = scheme
    rng = np.random.default_rng(seed)
    weight = (rng.standard_t(3, (k, n)) * rng.uniform(0.01, 2.0, (1, n))).astype(np.float32)
    importance = {"lognormal": rng.lognormal(0, 2, k), "sparse": np.where(rng.random(k) < 0.3, rng.random(k), 0.0),
                  "outlier": np.r_[1e9, np.ones(k - 1)], "zeros": np.zeros(k)}[kind]
    fmt = get_format(name)
    spec = fmt.spec(block_size=block, symmetric=symmetric, zero_point=zero_point)
    chosen = imatrix_quantize(fmt, spec, weight, importance)
    plain = fmt.quantize(weight, spec)
    assert fmt.fits(chosen, weight, spec)
    low, high = fmt.code_limits(spec)
    assert chosen.codes.min() >= low and chosen.codes.max() <= high
    ternary, bounded = name == "ternary", bounded_importance(importance)
    zero = chosen.zero_points if chosen.zero_points is not None else fmt.grid(weight, spec)[1]
    plain_zero = plain.zero_points if plain.zero_points is not None else zero
    searched = weighted_error(weight, bounded, chosen.scales, zero, spec.bits, block, ternary)
    rounded = weighted_error(weight, bounded, plain.scales, plain_zero, spec.bits, block, ternary)
    assert searched <= rounded * (1 + 1e-9) + 1e-30
    # the error of the codes it hands over is that of its grid: codes are round to nearest on it
    dequantized = chosen.dequantize()
    direct = float(bounded @ np.sum((weight.astype(np.float64) - dequantized) ** 2, axis=1))
    signal = float(bounded @ np.sum(weight.astype(np.float64) ** 2, axis=1))
    assert direct == pytest.approx(searched, rel=1e-5, abs=1e-9 * signal + 1e-30)


def test_without_data_or_a_grid_it_only_marks_and_reads_nothing() -> None:
    model = _llama()
    result = WeightOnlyRTNPass()(model)
    assert result.modified and not WeightOnlyRTNPass()(model).modified
    assert all(isinstance(n.meta[WEIGHT_CODES_KEY], RoundToNearest) for n, _ in annotated_layers(model))
    WeightOnlyRTNPass(calibration_data=_Untouchable(), weighted_grid=False)(model)  # switched off: not read
    nf4 = _llama(nf4=True, symmetric=True, block_size=64)
    WeightOnlyRTNPass(calibration_data=_Untouchable())(nf4)  # NF4 has no grid to search: not read
    assert all(isinstance(n.meta[WEIGHT_CODES_KEY], RoundToNearest) for n, _ in annotated_layers(nf4))


@pytest.mark.parametrize("sequential", [False, True])
def test_codes_go_to_metadata_beat_rtn_and_are_lowered(sequential) -> None:
    model = _llama()
    result = WeightOnlyRTNPass(calibration_data=_data(model), sequential=sequential)(model)
    layers = list(annotated_layers(model))
    assert result.modified and result.stats.counters["imatrix_layers"] == len(layers) == len(result.stats.layers)
    differ = 0
    for node, spec in layers:
        codes = node.meta[WEIGHT_CODES_KEY]
        weight = layer_weight(model, node)[0]
        plain = get_format(spec.format).quantize(weight, spec)
        assert isinstance(codes, BlockwiseWeight) and get_format(spec.format).fits(codes, weight, spec)
        differ += not np.array_equal(codes.scales, plain.scales)
        record = result.stats.layers[node.name]
        assert record["imatrix_weighted_error_db"] <= record["rtn_weighted_error_db"] + 1e-9, record
    assert differ > 0  # the search moved some grids
    chosen = {node.name: node.meta[WEIGHT_CODES_KEY] for node, _ in layers}
    rerun = WeightOnlyRTNPass(calibration_data=_data(model), sequential=sequential)(model)
    assert not rerun.modified  # the same codes again
    lowered = LowerWeightOnlyPass()(model)
    assert lowered.stats.counters["codes_chosen_by_algorithm"] == len(layers)
    packed = {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "MatMulNBits"}
    for name, codes in chosen.items():
        match = [p for p in packed.values() if p.shape == codes.packed()[0].shape and np.array_equal(p, codes.packed()[0])]
        assert match, name


def _square_means(model: ir.Model, sources: list[ir.Value], feeds, replaced: dict[str, np.ndarray]) -> dict:
    """``E[x^2]`` of each source over ``feeds`` from the whole model with the weights in ``replaced`` swapped."""
    clone = model.clone()
    for node in clone.graph:
        if node.name in replaced:
            value = ir.Value(name=f"{node.name}_q", const_value=ir.tensor(replaced[node.name].astype(np.float32)))
            clone.graph.register_initializer(value)
            node.replace_input_with(1, value)
    by_name = {v.name: v for v in clone.graph.inputs} | {v.name: v for n in clone.graph for v in n.outputs}
    session = io.ort_session(clone, extra_outputs=[by_name[s.name] for s in sources])
    rows: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for source, out in zip(sources, session.run([s.name for s in sources], feed), strict=True):
            rows.setdefault(source.name, []).append(out.reshape(-1, out.shape[-1]).astype(np.float64))
    return {name: np.mean(np.concatenate(r) ** 2, axis=0) for name, r in rows.items()}


@pytest.mark.parametrize("sequential", [False, True])
def test_importance_is_the_mean_square_of_the_layer_input(sequential) -> None:
    model = _llama()
    data = _data(model)
    nodes = [node for node, _ in annotated_layers(model)]
    specs = dict(annotated_layers(model))
    seen: dict[str, np.ndarray] = {}
    dequantized: dict[str, np.ndarray] = {}

    def choose(node, importance):
        seen[node.name] = importance
        chosen = imatrix_quantize(get_format(specs[node].format), specs[node], layer_weight(model, node)[0],
                                  importance)
        dequantized[node.name] = chosen.dequantize()
        return chosen

    feeds = list(data.iter_batches(4, None))
    if not sequential:
        _importance.one_pass(model, nodes, iter(feeds), choose)
        want = _square_means(model, list(dict.fromkeys(n.inputs[0] for n in nodes)), feeds, {})
        for node in nodes:
            np.testing.assert_allclose(seen[node.name], want[node.inputs[0].name], rtol=1e-6)
        return
    _importance.sequential(model, nodes, iter(feeds), choose)
    earlier: dict[str, np.ndarray] = {}
    floats = _square_means(model, [g.source for g in layer_groups(model, nodes)], feeds, {})
    moved = 0
    for group in layer_groups(model, nodes):
        want = _square_means(model, [group.source], feeds, earlier)[group.source.name]
        for node in group.nodes:
            np.testing.assert_allclose(seen[node.name], want, rtol=1e-5)
            earlier[node.name] = dequantized[node.name]
        moved += not np.allclose(want, floats[group.source.name], rtol=1e-6)
    assert moved > 0  # the later groups saw the quantized model, not the float one


def test_nan_activations_are_refused_naming_them() -> None:
    from qcompiler.errors import CalibrationError

    folder = _importance.SquareMean("act")
    with pytest.raises(CalibrationError, match="'act'"):
        folder.add(np.array([1.0, np.inf]), 1)
    big = np.full((2, 3), 1e30, np.float32)  # squares overflow float32, not the float64 sums
    folder.update(big)
    assert np.all(np.isfinite(folder.mean())) and folder.rows == 2


# -- the CLI surface ----------------------------------------------------------------------------------------------
@pytest.fixture
def llama_calib(tmp_path: Path) -> Path:
    path = tmp_path / "ids.npz"
    np.savez(path, input_ids=np.random.default_rng(0).integers(0, 128, (8, 16), dtype=np.int64))
    return path


def test_cli_uses_calibration_data_when_given(tmp_path, llama_calib, capsys) -> None:
    from qcompiler.cli import main

    base = [str(LLAMA), "--recipe", "int4", "--asymmetric", "--block-size", "16", "-q"]
    assert main([*base, "-o", str(tmp_path / "plain.onnx")]) == 0
    assert main([*base, "-o", str(tmp_path / "imx.onnx"), "--calib", str(llama_calib)]) == 0
    capsys.readouterr()
    plain, imx = (onnx.load(str(tmp_path / f"{n}.onnx")) for n in ("plain", "imx"))
    assert "qcompiler.calibration_sha256" in {p.key for p in imx.metadata_props}  # the data was used
    assert "qcompiler.calibration_sha256" not in {p.key for p in plain.metadata_props}
    scales = [(a.name, a, b) for a, b in zip(plain.graph.initializer, imx.graph.initializer, strict=True)
              if a.name.endswith("scales")]
    assert scales and any(not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
                          for _, a, b in scales)


@pytest.mark.parametrize(("options", "needle"), [
    ('[pass-options.weight-only-rtn]\nsequential = "yes"', "sequential must be true or false"),
    ("[pass-options.weight-only-rtn]\nweighted_grid = 1", "weighted_grid must be true or false"),
    ("[pass-options.weight-only-rtn]\nclip = true", "unknown option 'clip' for pass 'weight-only-rtn'"),
    ("[pass-options.weight-only-gptq]\nsequential = false", "names a pass that is not in the pipeline"),
])
def test_bad_rtn_options_are_one_line_errors(tmp_path, llama_calib, capfd, options, needle) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "int4"\n{options}\n', encoding="utf-8")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    _expect_rejected([str(LLAMA), "-o", str(out), "--recipe", str(recipe), "--calib", str(llama_calib)], out,
                     [LLAMA, recipe, llama_calib], capfd, needle)


def test_the_algorithm_pass_takes_recipe_options_by_its_own_name(tmp_path, llama_calib, capsys) -> None:
    from qcompiler.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "int4"\n[pass-options.weight-only-rtn]\nsequential = true\n', encoding="utf-8")
    report = tmp_path / "r.json"
    assert main([str(LLAMA), "-o", str(tmp_path / "m.onnx"), "--recipe", str(recipe), "--calib", str(llama_calib),
                 "--report", str(report), "-q"]) == 0
    assert "imatrix_layers" in report.read_text()
