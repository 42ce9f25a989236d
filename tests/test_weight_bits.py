"""Mixed-precision weight-only (select-weight-bits, --target-bits): the allocation, the measured sensitivities, the
lowering that follows them, the metadata and the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import rel_l2, run
from _weight_only import annotate_weight_only, rtn_and_lower
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.config import load_recipe, override
from qcompiler.errors import ConfigError
from qcompiler.formats import get_format
from qcompiler.metadata import WEIGHT_SPEC_KEY
from qcompiler.passes.algorithms.weight_bits import SelectWeightBitsPass, allocate_bits
from qcompiler.pipelines import resolve_pass_classes

F = TensorProto.FLOAT


def _cost(noise, choice):
    return sum(n[b] for n, b in zip(noise, choice, strict=True))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), layers=st.integers(1, 5), target=st.floats(2.0, 8.0))
def test_allocation_fits_the_budget_and_beats_every_uniform_choice(data, layers, target):
    candidates = (2, 4, 8)
    noise, sizes = [], []
    for _ in range(layers):
        at2 = data.draw(st.floats(1e-4, 10.0))
        noise.append({2: at2, 4: at2 * data.draw(st.floats(0.01, 1.0)), 8: at2 * 1e-4})
        sizes.append(data.draw(st.integers(1, 500)))  # budget <= 20000 weight-bits: exact DP
    choice = allocate_bits(noise, sizes, target)
    assert all(b in candidates for b in choice)
    assert sum(s * b for s, b in zip(sizes, choice, strict=True)) <= target * sum(sizes) + 1e-6
    for uniform in candidates:
        if uniform <= target:
            assert _cost(noise, choice) <= _cost(noise, [uniform] * layers) + 1e-12
    best = min((c for c in itertools.product(candidates, repeat=layers)
                if sum(s * b for s, b in zip(sizes, c, strict=True)) <= target * sum(sizes) + 1e-6),
               key=lambda c: _cost(noise, c))
    assert _cost(noise, choice) <= _cost(noise, best) * (1 + 1e-9) + 1e-12  # small budgets: the DP is exact


def _two_branches(k: int = 64, n: int = 32, gain: float = 10.0) -> ir.Model:
    """y = gain * (x @ Wa) + x @ Wb: the noise of ``a`` costs gain^2 times more at the output than ``b``'s."""
    rng = np.random.default_rng(0)
    wa, wb = ((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["ya"], name="a"),
             helper.make_node("MatMul", ["x", "wb"], ["yb"], name="b"),
             helper.make_node("Mul", ["ya", "gain"], ["ya_scaled"], name="amplify"),
             helper.make_node("Add", ["ya_scaled", "yb"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", "S", k])],
                              [helper.make_tensor_value_info("y", F, ["B", "S", n])],
                              [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb"),
                               numpy_helper.from_array(np.array(gain, np.float32), "gain")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _data(tmp_path, model, k: int = 64):
    from qcompiler.calibration.data import load_calibration_data

    x = np.random.default_rng(1).standard_normal((4, 8, k)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return load_calibration_data(tmp_path / "calib.npz", model), x


def test_the_layer_that_matters_more_gets_more_bits(tmp_path):
    model = _two_branches()
    data, x = _data(tmp_path, model)
    annotate_weight_only(model, bits=4, block_size=32)
    result = SelectWeightBitsPass(calibration_data=data, target_bits=3.0, candidate_bits=(2, 4))(model)
    layers = result.stats.layers
    assert layers["a"]["chosen_bits"] == 4 and layers["b"]["chosen_bits"] == 2, layers
    assert layers["a"]["noise_db_at_2"] > layers["b"]["noise_db_at_2"] + 15  # gain 10: about 20 dB apart
    meta = json.loads(model.metadata_props["qcompiler.weight_bits"])
    assert meta["bits"] == {"a": 4, "b": 2} and meta["average_bits"] == 3.0 and meta["target_bits"] == 3.0
    expected = run(_two_branches(), {"x": x})[0]
    lowered = rtn_and_lower(model)
    assert {n.name: n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"} == \
        {"a": 4, "b": 2}
    assert lowered.stats.layers["b"]["scheme"] == "int2-weight-only"
    mixed = rel_l2(run(model, {"x": x})[0], expected)
    swapped = _two_branches()  # the opposite choice at the same average is much worse
    annotate_weight_only(swapped, bits=4, block_size=32)
    for node in swapped.graph:
        if node.op_type == "MatMul":
            node.meta[WEIGHT_SPEC_KEY] = get_format(f"int{ {'a': 2, 'b': 4}[node.name]}").spec(block_size=32)
    rtn_and_lower(swapped)
    assert mixed < 0.5 * rel_l2(run(swapped, {"x": x})[0], expected)


def test_ternary_candidates_and_no_budget(tmp_path):
    model = _two_branches()
    data, _ = _data(tmp_path, model)
    assert "select-weight-bits" not in [c.name for c in resolve_pass_classes(load_recipe("ternary"))]
    annotate_weight_only(model, bits=2, ternary=True)
    result = SelectWeightBitsPass(calibration_data=data, target_bits=8.0)(model)
    assert all(layer["chosen_bits"] == 8 for layer in result.stats.layers.values())
    other = _two_branches()
    annotate_weight_only(other, bits=2, ternary=True)
    result = SelectWeightBitsPass(calibration_data=data, target_bits=2.0)(other)
    assert all(layer["chosen_bits"] == 2 for layer in result.stats.layers.values())
    assert {n.meta[WEIGHT_SPEC_KEY].format for n in other.graph if n.op_type == "MatMul"} == {"ternary"}
    assert json.loads(other.metadata_props["qcompiler.weight_bits"])["ternary"] is True


def test_budget_options_are_checked():
    recipe = load_recipe("int4")
    assert override(recipe, weight_only={"target_bits": 3.5}).weight_only.target_bits == 3.5
    for bad in ({"target_bits": 1.5}, {"target_bits": 9}, {"candidate_bits": [3, 5]}, {"target_bits": "x"},
                {"sensitivity_samples": 0}):
        with pytest.raises(ConfigError):
            override(recipe, weight_only=bad)
    with pytest.raises(ConfigError, match="nf4"):
        override(load_recipe("nf4"), weight_only={"target_bits": 4})
    with pytest.raises(ConfigError):
        SelectWeightBitsPass(target_bits=1.0)


def test_cli_target_bits(tmp_path, capsys):
    from qcompiler.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(ir.to_proto(_two_branches()), src)
    _, x = _data(tmp_path, _two_branches())
    code = main([str(src), "-o", str(out), "--recipe", "int4", "--target-bits", "3", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "--calib" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main([str(src), "-o", str(out), "--recipe", "int4", "--target-bits", "5", "--calib",
                 str(tmp_path / "calib.npz"), "-q"]) == 0
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    chosen = json.loads(meta["qcompiler.weight_bits"])
    assert chosen["average_bits"] <= 5 and chosen["bits"]["a"] > chosen["bits"]["b"]
    assert json.loads(meta["qcompiler.weight_only"])["target_bits"] == 5


def test_a_uniform_choice_that_measures_better_is_kept(tmp_path, monkeypatch):
    import qcompiler.passes.algorithms.weight_bits as weight_bits

    model = _two_branches()
    data, _ = _data(tmp_path, model)
    annotate_weight_only(model)
    monkeypatch.setattr(weight_bits, "allocate_bits", lambda noise, sizes, target: [2, 4])  # a bad allocation
    result = SelectWeightBitsPass(calibration_data=data, target_bits=4.0, candidate_bits=(2, 4, 8))(model)
    assert result.stats.counters["uniform_assignment_kept"] == 1
    assert result.stats.counters["assignments_measured"] == 3  # the allocation, uniform 2, uniform 4
    assert {name: layer["chosen_bits"] for name, layer in result.stats.layers.items()} == {"a": 4, "b": 4}
