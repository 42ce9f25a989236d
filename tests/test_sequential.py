"""True-sequential calibration (:mod:`qcompiler.passes.algorithms.sequential`): what each layer group sees equals
a reference run of the whole model with every earlier group's weights replaced by their quantized values; GPTQ on
those statistics is never worse than round to nearest on the layer outputs of the partly quantized model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler import io
from qcompiler.calibration.text import complete_decoder_inputs
from qcompiler.formats import get_format
from qcompiler.passes._weight_layers import annotated_layers, layer_weight
from qcompiler.passes.algorithms.sequential import layer_groups, run_sequentially
from tests._weight_only import annotate_weight_only

LLAMA = Path(__file__).resolve().parent.parent / "models" / "tiny_llama_kv.onnx"


def _llama() -> ir.Model:
    model = ir.load(str(LLAMA))
    annotate_weight_only(model, bits=4, block_size=16, symmetric=False)
    return model


def _batches(model: ir.Model, count: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    vocab = 128
    return [complete_decoder_inputs(model, {"input_ids": rng.integers(0, vocab, (2, 12)).astype(np.int64)})
            for _ in range(count)]


def _reference(model: ir.Model, source: ir.Value, replaced: dict[str, np.ndarray],
               feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """``source`` from the whole model with the weights of the nodes named in ``replaced`` swapped."""
    clone = model.clone()
    for node in clone.graph:
        if node.name in replaced:
            value = ir.Value(name=f"{node.name}_ref_q", const_value=ir.tensor(replaced[node.name]))
            clone.graph.register_initializer(value)
            node.replace_input_with(1, value)
    target = next(v for n in clone.graph for v in n.outputs if v.name == source.name) \
        if source.producer() is not None else next(v for v in clone.graph.inputs if v.name == source.name)
    session = io.ort_session(clone, extra_outputs=[target])
    return [session.run([source.name], feed)[0] for feed in feeds]


def test_each_group_sees_the_partly_quantized_model() -> None:
    model = _llama()
    layers = [node for node, _ in annotated_layers(model)]
    groups = layer_groups(model, layers)
    assert len(groups) < len(layers)  # Q/K/V and gate/up share their input
    assert [g.position for g in groups] == sorted(g.position for g in groups)
    feeds = _batches(model)
    seen: dict[str, list[np.ndarray]] = {}
    replaced: dict[str, np.ndarray] = {}
    order: list[str] = []

    def observe(group, activation):
        seen.setdefault(group.source.name, []).append(activation.copy())

    specs = dict(annotated_layers(model))

    def quantize(group):
        order.append(group.source.name)
        out = {}
        for node in group.nodes:
            weight = layer_weight(model, node)[0]
            out[node] = get_format(specs[node].format).quantize(weight, specs[node]).dequantize()
        return out

    references: dict[str, list[np.ndarray]] = {}

    def quantize_and_reference(group):
        references[group.source.name] = _reference(model, group.source, dict(replaced), feeds)
        out = quantize(group)
        replaced.update((node.name, w) for node, w in out.items())
        return out

    run_sequentially(model, groups, feeds, observe, quantize_and_reference)
    assert order == [g.source.name for g in groups]
    for name, arrays in seen.items():
        assert len(arrays) == len(feeds)
        for got, want in zip(arrays, references[name], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the last groups saw a model different from the float one (quantization error upstream)
    float_last = _reference(model, groups[-1].source, {}, feeds)
    assert not np.allclose(seen[groups[-1].source.name][0], float_last[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_pass_beats_rtn_on_every_layer_output(sequential) -> None:
    from qcompiler.calibration.data import load_calibration_data
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    model = _llama()
    ids = np.random.default_rng(1).integers(0, 128, (8, 16)).astype(np.int64)
    data = load_calibration_data(complete_decoder_inputs(model, {"input_ids": ids}), model)
    result = WeightOnlyGPTQPass(calibration_data=data, sequential=sequential)(model)
    layers = result.stats.layers
    assert result.stats.counters["layers"] == len(layers) == len(list(annotated_layers(model)))
    for name, record in layers.items():
        assert record["gptq_output_error_db"] <= record["rtn_output_error_db"] + 1e-9, (name, record)


def test_constant_subgraphs_are_not_carried_between_segments() -> None:
    """A tied lm_head reads ``Transpose(E)``: computed from initializers alone, never carried per batch (it is
    113 MB a batch for SmolLM2), yet the segment that needs it still gets it."""
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.passes.algorithms.sequential import _Liveness

    rng = np.random.default_rng(0)
    w1, table = rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Transpose", ["table"], ["t"], perm=[1, 0]),
         helper.make_node("MatMul", ["r", "t"], ["y"], name="head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(table, "table")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    annotate_weight_only(model, bits=4, block_size=16, symmetric=False)
    specs = dict(annotated_layers(model))
    assert len(specs) == 2
    groups = layer_groups(model, list(specs))
    liveness = _Liveness(model)
    assert [v.name for v in liveness.live_at(groups[1].position)] == ["r"]  # not "t"
    feeds = [{"x": rng.standard_normal((3, 32)).astype(np.float32)} for _ in range(2)]
    seen = []
    quantized = {}

    def quantize(group):
        out = {n: get_format(specs[n].format).quantize(layer_weight(model, n)[0], specs[n]).dequantize()
               for n in group.nodes}
        quantized.update((n.name, w) for n, w in out.items())
        return out

    run_sequentially(model, groups, feeds, lambda g, a: seen.append((g.source.name, a)), quantize)
    expected = [np.maximum(f["x"] @ quantized["fc"], 0) for f in feeds]
    got = [a for name, a in seen if name == "r"]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_observe_float_gets_the_float_models_values_beside_the_quantized_ones() -> None:
    """GPTAQ's statistics: each group gets its input from the partly quantized model and from the float model."""
    model = _llama()
    specs = dict(annotated_layers(model))
    groups = layer_groups(model, list(specs))
    feeds = _batches(model, count=2, seed=3)
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    plain: dict[str, list[np.ndarray]] = {}

    def quantize(group):
        return {n: get_format(specs[n].format).quantize(layer_weight(model, n)[0], specs[n]).dequantize()
                for n in group.nodes}

    def observe_float(group, activation, reference):
        pairs.setdefault(group.source.name, []).append((activation.copy(), reference.copy()))

    run_sequentially(model, groups, feeds, lambda g, a: plain.setdefault(g.source.name, []).append(a.copy()),
                     quantize, observe_float=observe_float)
    assert list(pairs) == [g.source.name for g in groups]
    for group in groups:
        want_float = _reference(model, group.source, {}, feeds)
        for (quant, ref), seen, want in zip(pairs[group.source.name], plain[group.source.name], want_float,
                                            strict=True):
            np.testing.assert_array_equal(quant, seen)  # the same quantized-model value observe got
            np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-6)
    last_q, last_f = pairs[groups[-1].source.name][0]
    assert not np.allclose(last_q, last_f, rtol=1e-6, atol=1e-7)


def test_asymmetric_target_is_the_least_squares_fit_to_the_float_output() -> None:
    """At alpha = 1 and negligible damping, ``W*`` minimises ``||x_f W - x_q W*||`` (numpy's lstsq); alpha 0 is W."""
    from qcompiler.passes.algorithms._gptq_core import asymmetric_target

    rng = np.random.default_rng(5)
    x_f = rng.standard_normal((400, 24))
    x_q = x_f + 0.1 * rng.standard_normal((400, 24))
    weight = rng.standard_normal((24, 7)).astype(np.float32)
    h, drift = x_q.T @ x_q, x_q.T @ (x_f - x_q)
    got = asymmetric_target(weight, h, drift, 1.0, damp=1e-12)
    want = np.linalg.lstsq(x_q, x_f @ weight.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(asymmetric_target(weight, h, drift, 0.0), weight)
    half = asymmetric_target(weight, h, drift, 0.5, damp=1e-12)
    np.testing.assert_allclose(half, weight + 0.5 * (want - weight), rtol=1e-4, atol=1e-4)


def _error_against_float_outputs(model: ir.Model, codes: dict[str, np.ndarray],
                                 feeds: list[dict[str, np.ndarray]]) -> float:
    """``sum ||x_f W - x_q Q||^2`` over every layer: quantized layers on the partly quantized model's inputs against
    the float layers on the float model's."""
    total = 0.0

    def observe_float(group, activation, reference):
        nonlocal total
        for node in group.nodes:
            weight = layer_weight(model, node)[0].astype(np.float64)
            total += float(np.sum((reference @ weight - activation @ codes[node.name]) ** 2))

    groups = layer_groups(model, [n for n, _ in annotated_layers(model)])
    run_sequentially(model, groups, feeds, lambda g, a: None, lambda g: {n: codes[n.name] for n in g.nodes},
                     observe_float=observe_float)
    return total


def test_gptaq_lowers_the_error_against_the_float_models_outputs() -> None:
    """The pass with ``gptaq``: every layer's output on the partly quantized model's inputs is closer to the float
    model's output (the objective GPTAQ adds) than plain sequential GPTQ's is, summed over the model."""
    from qcompiler.calibration.data import load_calibration_data
    from qcompiler.errors import ConfigError
    from qcompiler.metadata import WEIGHT_CODES_KEY
    from qcompiler.passes.algorithms.weight_only_gptq import WeightOnlyGPTQPass

    ids = np.random.default_rng(1).integers(0, 128, (16, 16)).astype(np.int64)
    errors = {}
    for gptaq in (False, True):
        model = _llama()
        data = load_calibration_data(complete_decoder_inputs(model, {"input_ids": ids}), model)
        result = WeightOnlyGPTQPass(calibration_data=data, gptaq=gptaq, gptaq_alpha=1.0)(model)
        assert result.stats.counters["layers"] == len(list(annotated_layers(model)))
        if gptaq:
            assert all("gptaq_shift_db" in r for r in result.stats.layers.values())
        specs = dict(annotated_layers(model))
        codes = {n.name: n.meta[WEIGHT_CODES_KEY].dequantize() for n in specs}
        feeds = [complete_decoder_inputs(model, {"input_ids": ids[i:i + 4]}) for i in range(0, 16, 4)]
        errors[gptaq] = _error_against_float_outputs(model, codes, feeds)
    assert errors[True] < errors[False]
    with pytest.raises(ConfigError, match="sequential"):
        WeightOnlyGPTQPass(gptaq=True, sequential=False)
    with pytest.raises(ConfigError, match="gptaq_alpha"):
        WeightOnlyGPTQPass(gptaq_alpha=1.5)
