"""PEFT LoRA adapters into and out of QLoRA (qcompiler.torch.peft_adapter), on tests/data/peft_tiny (saved by PEFT
0.21.2 over a seeded tiny Llama): loaded weights and scaling exact, the branch PEFT's, export in both forms, a
round trip, and refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import qcompiler.torch as qt  # noqa: E402
from qcompiler.errors import QCompileError  # noqa: E402
from qcompiler.runtime import Session  # noqa: E402
from qcompiler.torch.lm import LogitsOnly  # noqa: E402
from qcompiler.torch.peft_adapter import load_peft_adapter, read_peft_adapter, save_peft_adapter  # noqa: E402
from qcompiler.torch.qlora import lora_layers  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_peft_reference_data import DATA, _base  # noqa: E402  (the seeded base the reference adapters fit)


@pytest.mark.parametrize("name, modules, scaling", [("lora_all", 14, 2.0), ("rslora_qv", 4, 4 / 2 ** 0.5)])
def test_loaded_weights_and_branch_are_pefts(name, modules, scaling):
    model = _base()
    plan = load_peft_adapter(model, DATA / name)
    tensors = safetensors_torch.load_file(str(DATA / name / "adapter_model.safetensors"))
    layers = lora_layers(model)
    assert len(layers) == len(plan.adapters) == modules
    for layer_name, layer in layers.items():
        a = tensors[f"base_model.model.{layer_name}.lora_A.weight"]
        b = tensors[f"base_model.model.{layer_name}.lora_B.weight"]
        assert torch.equal(layer.lora_A, a.t()) and torch.equal(layer.lora_B, b.t())
        assert float(layer.lora_scaling) == np.float32(scaling)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():  # PEFT's forward over this layer's (quantized) base
            expected = layer.base(x) + (x @ a.T @ b.T) * torch.tensor(scaling, dtype=torch.float32)
            torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)  # same order; BLAS may differ


def test_peft_adapter_exports_baked_and_as_slots(tmp_path):
    model = _base()
    load_peft_adapter(model, DATA / "lora_all")
    ids = torch.from_numpy(np.load(DATA / "logits.npz")["input_ids"])
    wrapper = LogitsOnly(model)
    baked, parity = qt.export_qlora(wrapper, (ids,), tmp_path / "baked.onnx", input_names=["input_ids"],
                                    output_names=["logits"], weight_only={"accuracy_level": 0})
    assert parity.codes_identical and parity.max_rel_error < 1e-4, parity.to_markdown()
    slots, _ = qt.export_qlora(wrapper, (ids,), tmp_path / "slots.onnx", form="slots", input_names=["input_ids"],
                               output_names=["logits"], weight_only={"accuracy_level": 0})
    session = Session(str(slots), adapters={"peft": tmp_path / "slots.onnx_adapter"})
    feeds = {"input_ids": ids.numpy()}
    with torch.no_grad():
        expected = wrapper(ids).numpy()
    np.testing.assert_allclose(session.run(feeds, adapter="peft")["logits"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(session.run(feeds, adapter="peft")["logits"],
                                  Session(str(baked)).run(feeds)["logits"])


def test_save_then_read_round_trip(tmp_path):
    model = _base()
    load_peft_adapter(model, DATA / "rslora_qv")
    save_peft_adapter(model, tmp_path / "out")
    again, original = read_peft_adapter(tmp_path / "out"), read_peft_adapter(DATA / "rslora_qv")
    assert again.rank == original.rank and np.float32(again.scaling) == np.float32(original.scaling)
    assert sorted(again.weights) == sorted(original.weights)
    for name, (a, b) in original.weights.items():
        assert np.array_equal(again.weights[name][0], a) and np.array_equal(again.weights[name][1], b)
    reloaded = _base()
    load_peft_adapter(reloaded, tmp_path / "out")
    for name, layer in lora_layers(reloaded).items():
        assert torch.equal(layer.lora_A, lora_layers(model)[name].lora_A)


def _edited(tmp_path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(DATA / "lora_all", folder)
    if config is not None:
        base = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    if tensors is not None:
        safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("config, message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "base biases"),
    ({"modules_to_save": ["lm_head"]}, "replacement modules"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"),
    ({"init_lora_weights": "pissa"}, "rewrites the base"),
    ({"peft_type": "IA3"}, "not a LoRA adapter"),
    ({"r": 8}, "not rank r=8"),
])
def test_config_features_are_refused(tmp_path, config, message):
    with pytest.raises(QCompileError, match=message):
        load_peft_adapter(_base(), _edited(tmp_path, config=config))


def test_adapter_for_another_base_is_refused(tmp_path):
    with pytest.raises(QCompileError, match="another base"):
        load_peft_adapter(_base(hidden_size=64), DATA / "lora_all")  # other shapes
    with pytest.raises(QCompileError, match="another base"):
        load_peft_adapter(_base(num_hidden_layers=1), DATA / "lora_all")  # layers.1 is missing
    tensors = safetensors_torch.load_file(str(DATA / "lora_all" / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    with pytest.raises(QCompileError, match="not a LoRA A/B weight"):
        load_peft_adapter(_base(), _edited(tmp_path, tensors=tensors))


def test_an_adapted_layer_the_recipe_leaves_float_is_refused_before_any_change(tmp_path):
    model = _base()
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(QCompileError, match="leaves float"):
        load_peft_adapter(model, DATA / "rslora_qv", exclude_nodes=["model.layers.0.self_attn.q_proj"])
    assert {name: type(m) for name, m in model.named_modules()} == before


def test_missing_or_corrupt_files_are_refused(tmp_path):
    with pytest.raises(QCompileError, match="adapter_config.json"):
        read_peft_adapter(tmp_path)
    folder = _edited(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(QCompileError, match="not a safetensors file"):
        read_peft_adapter(folder)
