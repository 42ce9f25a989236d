"""tests/data/peft_tiny: two LoRA adapters saved by PEFT 0.21.2 over a seeded tiny Llama, with the logits PEFT gave.

Checks, without PEFT, that the data still means what qcompiler/torch/peft_adapter.py's docstring says (the data: tests/data/peft_tiny/make_tiny.py): the seeded base rebuilds
(same logits), and each adapter applied by the spec's forward, ``y = base(x) + (x @ A^T @ B^T) * scaling`` with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rslora), gives PEFT's logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

DATA = Path(__file__).parent / "data" / "peft_tiny"
CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": True, "initializer_range": 0.2, "rms_norm_eps": 1e-5}
PREFIX = "base_model.model."


def _base(**changes: object) -> torch.nn.Module:
    """The seeded base the adapters were made over (``changes``: config fields of another base)."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, **changes})).eval()


def _apply(model: torch.nn.Module, folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and not config["use_dora"]
    assert not config["rank_pattern"] and not config["alpha_pattern"] and config["modules_to_save"] is None
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    tensors = safetensors_torch.load_file(str(folder / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    for key, a in tensors.items():
        assert key.startswith(PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight")), key
        if not key.endswith(".lora_A.weight"):
            continue
        linear = modules[key[len(PREFIX):-len(".lora_A.weight")]]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        assert a.shape == (r, linear.in_features) and b.shape == (linear.out_features, r)
        linear.register_forward_hook(lambda _m, args, out, a=a, b=b: out + (args[0] @ a.T @ b.T) * scaling)


def test_peft_tiny_data_follows_the_spec() -> None:
    expected = np.load(DATA / "logits.npz")
    ids = torch.from_numpy(expected["input_ids"])
    with torch.no_grad():
        np.testing.assert_allclose(_base()(ids).logits[0].numpy(), expected["base"], rtol=0, atol=1e-5)
        for name in ("lora_all", "rslora_qv"):
            model = _base()
            _apply(model, DATA / name)
            got = model(ids).logits[0].numpy()
            np.testing.assert_allclose(got, expected[name], rtol=0, atol=1e-5)
            assert np.abs(expected[name] - expected["base"]).max() > 0.05  # the adapter changes the output
