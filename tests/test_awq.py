"""AWQ (``weight-only-awq``): folding ``1 / s`` into the preceding normalization leaves the float function unchanged
(ONNX Runtime before and after, float path), Gemm layers (GPT-2 style, with a bias) are scaled, sequential AWQ's
statistics come from the partly quantized model, and the grid step takes the importance-weighted grid where the
sampled rows say it pays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import rel_l2, run
from _weight_only import annotate_weight_only
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration.data import load_calibration_data
from qcompiler.calibration.text import complete_decoder_inputs
from qcompiler.formats import get_format
from qcompiler.passes._common import NameScope
from qcompiler.passes.algorithms import weight_only_awq
from qcompiler.passes.algorithms._awq_fold import scale_input
from qcompiler.passes.algorithms._awq_search import best_codes, clipped_codes
from qcompiler.passes.algorithms.weight_only_awq import WeightOnlyAWQPass
from qcompiler.passes.lower.weight_only import LowerWeightOnlyPass

F = TensorProto.FLOAT
LLAMA = Path(__file__).resolve().parent.parent / "models" / "tiny_llama_kv.onnx"


def _llama_and_data(calib_shape: tuple[int, int] = (8, 16)):  # type: ignore[no-untyped-def]
    model = ir.load(str(LLAMA))
    annotate_weight_only(model, bits=4, block_size=16, symmetric=False)
    rng = np.random.default_rng(1)
    data = load_calibration_data(complete_decoder_inputs(
        model, {"input_ids": rng.integers(0, 128, calib_shape).astype(np.int64)}), model)
    test = complete_decoder_inputs(model, {"input_ids": rng.integers(0, 128, (2, 10)).astype(np.int64)})
    return model, data, test


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


@pytest.mark.parametrize("sequential", [True, False])
def test_folding_into_rmsnorm_keeps_the_float_function(sequential):
    """tiny Llama (RMSNorm written out, weight Mul): Q/K/V and gate/up scales go into the norm weights, o_proj and
    down_proj get a Mul; ONNX Runtime's float outputs (logits and present KV) are unchanged."""
    model, data, test = _llama_and_data()
    before = run(model, test)
    muls = sum(n.op_type == "Mul" for n in model.graph)
    shared = "llm.model.layers.0.input_layernorm.weight"  # the exporter stored the all-ones norm weights once
    weight = model.graph.initializers[shared].const_value.numpy().copy()
    result = WeightOnlyAWQPass(calibration_data=data, sequential=sequential)(model)
    counters = result.stats.counters
    assert counters["groups_scaled"] == counters["scales_folded"] + counters["scales_mul"] == 8
    assert counters["scales_folded"] == 4  # 2 layers x (input, post-attention) RMSNorm
    assert sum(n.op_type == "Mul" for n in model.graph) == muls + counters["scales_mul"]
    copies = [name for name in model.graph.initializers if name.startswith(f"{shared}_awq")]
    assert len(copies) == 4  # a copy per scaled norm; the final norm (before the tied lm_head) keeps the original
    np.testing.assert_array_equal(model.graph.initializers[shared].const_value.numpy(), weight)
    assert [user.op_type for user, _ in model.graph.initializers[shared].uses()] == ["Mul"]
    after = run(model, test)
    for a, b in zip(before, after, strict=True):
        assert rel_l2(b, a) < 1e-5


def _gemm_model(seed: int = 0) -> ir.Model:
    """GPT-2 style: LayerNormalization -> Reshape to 2-D -> Gemm (transB = 0, bias) -> Relu -> written-out
    LayerNorm affine (Mul gamma, Add beta) -> Gemm (transB = 1, bias)."""
    rng = np.random.default_rng(seed)
    k, hidden, n = 32, 48, 16

    def const(name, *shape, scale=1.0):  # type: ignore[no-untyped-def]
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [const("ln_g", k, scale=0.3), const("ln_b", k, scale=0.1), const("w1", k, hidden, scale=k ** -0.5),
             const("b1", hidden), const("g2", hidden, scale=0.5), const("beta2", hidden, scale=0.2),
             const("w2t", n, hidden, scale=hidden ** -0.5), const("b2", n),
             numpy_helper.from_array(np.array([-1, k], np.int64), "flat")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["ln"], axis=-1, name="ln"),
             helper.make_node("Reshape", ["ln", "flat"], ["ln2d"], name="view"),
             helper.make_node("Gemm", ["ln2d", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "g2"], ["rg"], name="gamma"),
             helper.make_node("Add", ["beta2", "rg"], ["rb"], name="beta"),
             helper.make_node("Gemm", ["rb", "w2t", "b2"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["B", 6, k])],
                              [helper.make_tensor_value_info("y", F, None)], inits)
    return _ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_gemm_layers_are_scaled_with_their_bias_unchanged(tmp_path):
    model = _gemm_model()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 6, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    data = load_calibration_data(tmp_path / "calib.npz", model)
    # a few channels of both layer inputs carry most of the activation (what AWQ is for)
    g2 = model.graph.initializers["g2"]
    g2.const_value = ir.tensor(np.where(np.arange(48) < 4, 20.0, 1.0).astype(np.float32) * g2.const_value.numpy())
    ln_g = model.graph.initializers["ln_g"]
    ln_g.const_value = ir.tensor(np.where(np.arange(32) < 3, 25.0, 1.0).astype(np.float32) * ln_g.const_value.numpy())
    expected = run(model, {"x": x[:4]})[0]
    biases = {name: model.graph.initializers[name].const_value.numpy().copy() for name in ("b1", "b2")}
    ops = [n.op_type for n in model.graph]
    rtn = model.clone()
    annotate_weight_only(model, bits=4, block_size=16, symmetric=False)
    annotate_weight_only(rtn, bits=4, block_size=16, symmetric=False)
    result = WeightOnlyAWQPass(calibration_data=data)(model)
    assert result.stats.counters["groups_scaled"] == result.stats.counters["scales_folded"] == 2
    assert [n.op_type for n in model.graph] == ops  # folded into LayerNormalization (through the Reshape) and Mul/Add
    for name in ("fc1", "fc2"):
        layer = result.stats.layers[name]
        assert layer["awq_alpha"] > 0 and layer["awq_output_error_db"] < layer["rtn_output_error_db"], layer
    for name, bias in biases.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), bias)
    assert rel_l2(run(model, {"x": x[:4]})[0], expected) < 1e-5  # float path unchanged
    from qcompiler.passes.algorithms.weight_only_rtn import WeightOnlyRTNPass

    WeightOnlyRTNPass()(rtn)
    LowerWeightOnlyPass()(rtn)
    LowerWeightOnlyPass()(model)
    assert not any(n.op_type == "Gemm" for n in model.graph)
    awq_error, rtn_error = rel_l2(run(model, {"x": x[:4]})[0], expected), rel_l2(run(rtn, {"x": x[:4]})[0], expected)
    assert awq_error < 0.8 * rtn_error, (awq_error, rtn_error)


NORMS = [  # (domain, op type, inputs after x, attributes)
    ("", "LayerNormalization", ["gamma", "beta"], {"axis": -1}),
    ("", "SimplifiedLayerNormalization", ["gamma"], {"axis": -1}),
    ("com.microsoft", "SkipLayerNormalization", ["skip", "gamma", "beta"], {}),
    ("com.microsoft", "SkipSimplifiedLayerNormalization", ["skip", "gamma"], {}),
]


def _norm_model(domain: str, op: str, inputs: list[str], attributes: dict, extra_reader: bool) -> ir.Model:
    rng = np.random.default_rng(4)
    k, n = 16, 8
    inits = [numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")]
    graph_inputs = [helper.make_tensor_value_info(name, F, [2, 5, k]) for name in ("x", "skip") if
                    name == "x" or name in inputs]
    nodes = [helper.make_node(op, ["x", *inputs], ["normed"], domain=domain, name="norm", **attributes),
             helper.make_node("MatMul", ["normed", "w"], ["y"], name="fc")]
    outputs = [helper.make_tensor_value_info("y", F, None)]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["normed"], ["other"], name="other"))
        outputs.append(helper.make_tensor_value_info("other", F, None))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return _ir(helper.make_model(helper.make_graph(nodes, "g", graph_inputs, outputs, inits), opset_imports=opsets))


@pytest.mark.parametrize("extra_reader", [False, True])
@pytest.mark.parametrize(("domain", "op", "inputs", "attributes"), NORMS)
def test_scale_folds_into_norm_ops(domain, op, inputs, attributes, extra_reader):
    """``1 / s`` goes into the norm's scale (and bias) when the MatMul is its only reader, else into a new Mul that
    only the MatMul reads; either way ONNX Runtime computes what it did."""
    model = _norm_model(domain, op, inputs, attributes, extra_reader)
    rng = np.random.default_rng(5)
    feeds = {v.name: rng.standard_normal((2, 5, 16)).astype(np.float32) for v in model.graph.inputs}
    before = run(model, feeds)
    s = np.exp(rng.uniform(-1.5, 1.5, 16))
    fc = next(node for node in model.graph if node.name == "fc")
    w = fc.inputs[1]
    w.const_value = ir.tensor((w.const_value.numpy() * s[:, None]).astype(np.float32))
    how = scale_input(model, fc.inputs[0], [fc], s, NameScope(model))
    assert how == ("mul" if extra_reader else "folded")
    after = run(model, feeds)
    for a, b in zip(before, after, strict=True):
        assert rel_l2(b, a) < 1e-5


def test_sequential_statistics_come_from_the_partly_quantized_model(monkeypatch):
    """What each group observes (first batch) equals that activation in the compiled model (AWQ's scales, codes
    lowered, float activations in MatMulNBits), and the last group's differs from the float model's."""
    seen: dict[str, np.ndarray] = {}
    update = weight_only_awq._ChannelStats.update

    def record(self, array):  # type: ignore[no-untyped-def]
        seen.setdefault(self.name, array.copy())
        update(self, array)

    monkeypatch.setattr(weight_only_awq._ChannelStats, "update", record)
    model, data, _ = _llama_and_data()
    float_model = model.clone()
    WeightOnlyAWQPass(calibration_data=data, fold=False)(model)  # a Mul: every group's input keeps its name
    LowerWeightOnlyPass(accuracy_level=0)(model)
    first = next(iter(data.iter_batches(4)))
    names = list(seen)
    assert len(names) == 8
    values = {v.name: v for node in model.graph for v in node.outputs}
    from qcompiler import io

    compiled = io.ort_session(model, extra_outputs=[values[name] for name in names]).run(names, first)
    for name, got in zip(names, compiled, strict=True):
        np.testing.assert_allclose(seen[name], got, rtol=1e-4, atol=1e-4 * float(np.abs(got).max()))
    float_values = {v.name: v for node in float_model.graph for v in node.outputs}
    last = io.ort_session(float_model, extra_outputs=[float_values[names[-1]]]).run([names[-1]], first)[0]
    assert rel_l2(seen[names[-1]], last) > 1e-3  # quantization error upstream reached it


def test_weighted_grid_candidate_lowers_the_output_error():
    """Inputs of very unequal energy: some blocks take the importance-weighted grid, and the output error falls
    below clipping alone's."""
    rng = np.random.default_rng(9)
    w = (rng.standard_t(3, size=(96, 12)) * 0.05).astype(np.float32)
    energy = np.exp(rng.uniform(-3, 3, 96))
    x = rng.standard_normal((256, 96)) * np.sqrt(energy)
    fmt = get_format("int4")
    spec = fmt.spec(block_size=32, symmetric=False)
    clipped_codes_, clipped = clipped_codes(fmt, spec, w, x)
    chosen, error, share = best_codes(fmt, spec, w, x, importance=np.mean(x * x, axis=0))
    assert 0 < share < 1 and error < 0.995 * clipped, (share, error, clipped)
    for codes, figure in ((chosen, error), (clipped_codes_, clipped)):  # the error returned is the codes' own
        diff = x @ (w - codes.dequantize())
        assert float(np.vdot(diff, diff)) == pytest.approx(figure, rel=1e-9)


def test_without_scales_only_the_grids_change():
    """``scales = False``: no weight or graph rewrite, every layer's codes chosen by the grid step."""
    model, data, test = _llama_and_data()
    before = run(model, test)
    nodes = len(list(model.graph))
    result = WeightOnlyAWQPass(calibration_data=data, scales=False, weighted_grid=True)(model)
    assert result.stats.counters["groups_scaled"] == 0 and len(list(model.graph)) == nodes
    layers = result.stats.layers
    assert all(layer["awq_alpha"] == 0 for layer in layers.values()) and len(layers) == 14
    assert any(layer["awq_weighted_grid_share"] > 0 for layer in layers.values())
    for a, b in zip(before, run(model, test), strict=True):
        np.testing.assert_array_equal(a, b)
