"""QAT (qcompiler.torch): fake quantization equals the compiler's numerics, gradients flow, export -> compile keeps
the trained codes, parity holds on MLP / CNN / tiny Llama models, and bad inputs are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import qcompiler.torch as qt  # noqa: E402
from qcompiler.errors import ConfigError, InvalidModelError, UnsupportedModelError  # noqa: E402
from qcompiler.formats import get_format  # noqa: E402

RECIPES = [
    ("int4", {"block_size": 16}),
    ("int4", {"symmetric": False}),
    ("int4", {"symmetric": False, "zero_point": "float", "block_size": 0}),
    ("int3", {}),
    ("int2", {"symmetric": False}),
    ("ternary", {}),
    ("int8-weight", {}),
    ("nf4", {}),
    ("fp8-weight", {}),
    ("fp8-fused", {}),
]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 10))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("recipe,options", RECIPES, ids=lambda v: str(v))
def test_fake_quant_forward_is_the_formats_dequantized_weight(recipe, options):
    model = _mlp()
    plan = qt.prepare_qat(model, recipe, **options)
    layer = model[0]
    spec = layer.weight_fake_quant.spec
    assert plan.layers["0"] == spec.label()
    w = layer.weight.detach().numpy().T.copy()  # W[K, N]
    expected = get_format(spec.format).quantize(w, spec).dequantize().T
    assert _same(layer.quantized_weight().detach().numpy(), np.ascontiguousarray(expected))


def test_straight_through_gradient_reaches_the_float_weight():
    model = _mlp()
    qt.prepare_qat(model, "int4")
    x = torch.randn(8, 40)
    upstream = torch.randn(48, 40)
    (model[0].quantized_weight() * upstream).sum().backward()
    assert torch.equal(model[0].weight.grad, upstream)
    model.zero_grad()
    model(x).square().mean().backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[2].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("recipe,options", [("int4", {}), ("int4", {"symmetric": False}), ("nf4", {}),
                                            ("fp8-weight", {}), ("ternary", {})], ids=str)
def test_learned_scales_update_and_are_what_the_compiler_writes(tmp_path, recipe, options):
    model = _mlp(1)
    qt.prepare_qat(model, recipe, learn_scale=True, **options)
    fq = model[0].weight_fake_quant
    before = fq.scale.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(64, 40)
    target = torch.randn(64, 10)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        assert fq.scale.grad is not None and torch.isfinite(fq.scale.grad).all()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert not torch.equal(fq.scale.detach(), before)
    _, report = qt.convert(model, (x[:4],), tmp_path / "m.onnx", weight_only={"accuracy_level": 0}, report=False)
    assert report.codes_identical, report.to_markdown()
    derived = fq.quantize(model[0].weight)
    assert torch.equal(derived.scale, fq.scale.detach().abs().clamp_min(1e-12))  # the learned scales, not re-derived


@pytest.mark.parametrize("recipe,options", RECIPES, ids=lambda v: str(v))
def test_export_compile_parity_for_every_format(tmp_path, recipe, options):
    model = _mlp(2)
    qt.prepare_qat(model, recipe, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 40)
    for _ in range(3):  # train a little: the codes are the trained ones, not the initial ones
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    samples = [(torch.randn(5, 40),), (torch.randn(1, 40),)]
    result, report = qt.convert(model, (x[:4],), tmp_path / "m.onnx", sample_inputs=samples,
                                dynamic_shapes=({0: torch.export.Dim("batch")},), weight_only={"accuracy_level": 0})
    assert report.codes_identical, report.to_markdown()
    assert len(report.layers) == 2 and report.outputs_within_tolerance, report.to_markdown()
    counters = {r.name: r.stats.counters for r in result.report.passes}
    assert counters["import-qat"]["trained_Gemm"] == 2 and counters["lower-weight-only"]["codes_trained"] == 2
    saved = json.loads((tmp_path / "m.onnx.parity.json").read_text())
    assert saved["codes_identical"] and saved["layers_identical"] == 2
    assert "identical codes" in (tmp_path / "m.onnx.parity.md").read_text()


def test_accuracy_level_4_is_reported_with_its_bound(tmp_path):
    model = _mlp(3)
    qt.prepare_qat(model, "int4")
    _, report = qt.convert(model, (torch.randn(4, 40),), tmp_path / "m.onnx", report=False)
    assert report.codes_identical and report.accuracy_level == 4
    assert "accuracy_level = 0" in report.note and report.max_rel_error < 5e-2


class _DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(nn.functional.max_pool2d(y, 2).flatten(1))


def test_cnn_weight_only_leaves_convolutions_float_and_keeps_parity(tmp_path):
    torch.manual_seed(4)
    model = _DigitsNet().eval()
    plan = qt.prepare_qat(model, "int4")
    assert set(plan.layers) == {"head"} and {"conv", "bn"} <= set(plan.float_layers)
    _, report = qt.convert(model, (torch.randn(2, 1, 8, 8),), tmp_path / "cnn.onnx",
                           weight_only={"accuracy_level": 0}, report=False)
    assert report.codes_identical and report.outputs_within_tolerance, report.to_markdown()


def test_tiny_llama_tied_embedding_and_int8_lm_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    llm = transformers.LlamaForCausalLM(config).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.llm = llm

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.llm(input_ids=ids, use_cache=False).logits

    plan = qt.prepare_qat(llm, "int4")
    assert plan.layers["lm_head"].startswith("int8") and plan.layers["model.embed_tokens"].startswith("int8")
    assert llm.lm_head.weight is llm.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 96, (2, 10))
    _, report = qt.convert(Logits(), (ids,), tmp_path / "llama.onnx", weight_only={"accuracy_level": 0},
                           sample_inputs=[(ids,), (torch.randint(0, 96, (2, 10)),)], report=False)
    assert report.codes_identical and len(report.layers) == 16, report.to_markdown()
    assert report.outputs_within_tolerance and report.top1_agreement == 1.0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "llama.onnx")).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops


# -- bad inputs ---------------------------------------------------------------------------------------------------
def test_recipes_that_cannot_be_trained_are_refused():
    with pytest.raises(ConfigError, match="cannot be trained"):
        qt.prepare_qat(_mlp(), "int8-dynamic")
    with pytest.raises(ConfigError, match="target_bits"):
        qt.prepare_qat(_mlp(), "int4", target_bits=3.0)
    with pytest.raises(ConfigError, match="lm_head"):
        qt.prepare_qat(_mlp(), "int4", lm_head="nope")


def test_a_module_it_cannot_fake_quantize_is_reported():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    model = nn.Sequential(nn.Linear(4, 4), Odd())
    with pytest.raises(ConfigError, match="'1' \\(Odd\\) holds a matrix weight"):
        qt.prepare_qat(model, "int4")
    assert type(model[0]) is nn.Linear  # nothing replaced on refusal
    plan = qt.prepare_qat(model, "int4", exclude=["1"])
    assert plan.float_layers == {"1": "excluded by name"}
    with pytest.raises(ConfigError, match="already prepared"):
        qt.prepare_qat(model, "int4")


def test_export_without_qat_layers_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="prepare_qat first"):
        qt.export(_mlp(), (torch.randn(2, 40),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture()
def exported(tmp_path) -> Path:
    model = _mlp(6)
    qt.prepare_qat(model, "int4", block_size=16)
    return qt.export(model, (torch.randn(2, 40),), tmp_path / "qat.onnx")


def test_a_qat_model_with_a_recipe_that_does_not_import_it_is_refused(exported, tmp_path):
    from qcompiler import compile_model

    with pytest.raises(UnsupportedModelError,
                       match=r"QAT-trained weight.*recipe int8-dynamic does not import them.*\(int4\)"):
        compile_model(exported, tmp_path / "o.onnx", recipe="int8-dynamic")
    assert not (tmp_path / "o.onnx").exists()


def _tampered(path: Path, tmp_path: Path, edit) -> Path:
    model = onnx.load(str(path))
    edit(model)
    out = tmp_path / "tampered.onnx"
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("case,needle", [
    ("codes", "codes outside"), ("scale", "finite positive"), ("format", "format"), ("reader", "feeds Relu"),
])
def test_tampered_markers_are_refused_with_one_line(exported, tmp_path, case, needle, capfd):
    from onnx import numpy_helper

    from qcompiler.cli import main

    def edit(model: onnx.ModelProto) -> None:
        inits = {t.name: t for t in model.graph.initializer}
        marker = next(n for n in model.graph.node if n.domain == "ai.qcompiler.qat")
        if case == "codes":
            codes = numpy_helper.to_array(inits[marker.input[0]]).copy()
            codes[0, 0] = 200
            inits[marker.input[0]].CopyFrom(numpy_helper.from_array(codes, marker.input[0]))
        elif case == "scale":
            scale = numpy_helper.to_array(inits[marker.input[1]]).copy()
            scale[0, 0] = np.nan
            inits[marker.input[1]].CopyFrom(numpy_helper.from_array(scale, marker.input[1]))
        elif case == "format":
            next(a for a in marker.attribute if a.name == "format").s = b"int9"
        else:
            model.graph.node.append(onnx.helper.make_node("Relu", [marker.output[0]], ["extra"]))
            model.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [48, 40]))

    bad = _tampered(exported, tmp_path, edit)
    code = main([str(bad), "-o", str(tmp_path / "o.onnx"), "--recipe", "int4", "--block-size", "16"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises((InvalidModelError, UnsupportedModelError)):
        from qcompiler import compile_model

        compile_model(bad, recipe="int4")
