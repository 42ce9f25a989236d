"""QLoRA (qcompiler.torch.prepare_qlora / export_qlora): the frozen base is the compiler's bytes, the adapter branch
computes what numpy computes, the baked and slots exports agree in ONNX Runtime with each other and with torch,
merging, and refusals."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import onnxruntime as ort  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import qcompiler.torch as qt  # noqa: E402
from qcompiler.api import compile_model  # noqa: E402
from qcompiler.errors import ConfigError  # noqa: E402
from qcompiler.formats import get_format  # noqa: E402
from qcompiler.formats.decode import initializer_arrays  # noqa: E402
from qcompiler.formats.nf4 import quantize_nf4  # noqa: E402
from qcompiler.lora_graph import find_branches, to_slots  # noqa: E402
from qcompiler.torch.frozen import FrozenEmbedding, FrozenLinear, FrozenWeight  # noqa: E402
from qcompiler.torch.lm import LogitsOnly  # noqa: E402
from qcompiler.torch.qlora import LoRALinear, adapter_parameters, lora_layers  # noqa: E402

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)




def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def _train_adapters(model: nn.Module, ids: torch.Tensor, steps: int = 4) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()


def _quantized_bytes(path) -> list[tuple[str, tuple[bytes, ...]]]:
    """(op, bytes of its constant inputs, nf4-dq's computed absmax included) of every quantized weight node."""
    model = onnx.load(str(path))
    inits = {name: array.tobytes() for name, array in initializer_arrays(model).items()}
    found = [(n.op_type, tuple(inits[x] for x in n.input[1:] if x in inits)) for n in model.graph.node
             if n.op_type in ("MatMulBnb4", "MatMulNBits", "GatherBlockQuantized")]
    return sorted(found)


# -- the frozen base ----------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), k=st.integers(1, 300), block=st.sampled_from([16, 32, 64, 128, 256]),
       seed=st.integers(0, 2**31 - 1))
def test_frozen_nf4_codes_are_the_compilers(n, k, block, seed):
    rng = np.random.default_rng(seed)
    wt = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3.0)).astype(np.float32)
    wt[0, : min(k, 5)] = 0.0
    spec = get_format("nf4").spec(block_size=block)
    fq = qt.WeightFakeQuant(spec, torch.from_numpy(wt))
    frozen = FrozenWeight(fq.quantize(torch.from_numpy(wt)), "nf4")
    codes, absmax = quantize_nf4(wt.T.copy(), block)  # the compiler's: W[K, N] = wt^T
    q = frozen.quantize()
    assert np.array_equal(q.scale.numpy(), absmax.astype(np.float32))
    assert np.array_equal(q.codes.numpy(), codes)
    assert frozen.codes.numel() == (n * k + 1) // 2  # two codes a byte
    assert torch.equal(frozen.dequantize(), fq(torch.from_numpy(wt)))  # what QAT's fake quantization computes


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq"])
def test_base_bytes_equal_qcompile_nf4_of_the_float_model(tmp_path, fmt):
    base = _llama()
    ids = torch.randint(0, 96, (2, 12))
    torch.onnx.export(LogitsOnly(base), (ids,), tmp_path / "float.onnx", dynamo=True, input_names=["input_ids"],
                      output_names=["logits"])
    compile_model(tmp_path / "float.onnx", tmp_path / "float.nf4.onnx", recipe="nf4", weight_only={"format": fmt})
    model = copy.deepcopy(base)
    plan = qt.prepare_qlora(model, "nf4", rank=4, alpha=8, format=fmt)
    assert sum(label.startswith(f"{fmt} ") for label in plan.layers.values()) == 14
    assert len(plan.adapters) == 14 and "lm_head" not in plan.adapters  # all-linear but the output projection
    assert plan.trainable_parameters == sum(p.numel() for layer in lora_layers(model).values()
                                            for p in (layer.lora_A, layer.lora_B))
    assert not any(isinstance(p, nn.Parameter) and p.dim() == 2 and p.requires_grad and "lora" not in name
                   for name, p in model.named_parameters())
    _train_adapters(model, ids)
    path, parity = qt.export_qlora(LogitsOnly(model), (ids,), tmp_path / "qlora.onnx", input_names=["input_ids"],
                                   output_names=["logits"], weight_only={"accuracy_level": 0})
    assert parity.codes_identical and parity.max_rel_error < 1e-4, parity.to_markdown()
    assert _quantized_bytes(path) == _quantized_bytes(tmp_path / "float.nf4.onnx")


# -- the adapter branch -------------------------------------------------------------------------------------------
def test_lora_linear_matches_numpy_and_only_adapters_learn():
    torch.manual_seed(1)
    linear = nn.Linear(70, 24)
    module = nn.Sequential(linear)
    qt.prepare_qlora(module, "nf4", rank=3, alpha=6)
    layer = module[0]
    assert isinstance(layer, LoRALinear) and "weight" not in layer._parameters  # no float weight kept
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 70, dtype=torch.float32)
    w = layer.weight_fake_quant.dequantize().double().numpy()
    a, b = layer.lora_A.detach().double().numpy(), layer.lora_B.detach().double().numpy()
    expected = x.double().numpy() @ w.T + linear.bias.detach().double().numpy() + (x.double().numpy() @ a) @ b * 2.0
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()
    expected_grad = np.ones((5, 24)) @ (w + (a @ b * 2.0).T)  # through the base (rebuilt) and the branch
    np.testing.assert_allclose(x.grad.double().numpy(), expected_grad, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.bias is not None and not layer.bias.requires_grad


def test_prepared_model_starts_as_the_quantized_base():
    base = _llama(2)
    ids = torch.randint(0, 96, (1, 9))
    qat = copy.deepcopy(base)
    qt.prepare_qat(qat, "nf4")
    qlora = copy.deepcopy(base)
    qt.prepare_qlora(qlora, "nf4", rank=8)
    with torch.no_grad():
        assert torch.equal(qat(input_ids=ids).logits, qlora(input_ids=ids).logits)  # lora_B starts at zero
    assert isinstance(qlora.model.embed_tokens, FrozenEmbedding) and isinstance(qlora.lm_head, FrozenLinear)


# -- export forms -------------------------------------------------------------------------------------------------
def test_slots_export_serves_adapters_per_run_and_matches_baked(tmp_path):
    model = _llama(3)
    qt.prepare_qlora(model, "nf4", rank=4, alpha=4, target_modules=["q_proj", "v_proj"])
    assert len(lora_layers(model)) == 4
    ids = torch.randint(0, 96, (2, 11))
    _train_adapters(model, ids)
    wrapper = LogitsOnly(model)
    baked, _ = qt.export_qlora(wrapper, (ids,), tmp_path / "baked.onnx", input_names=["input_ids"],
                               output_names=["logits"], weight_only={"accuracy_level": 0})
    layers = ["llm." + n for n in lora_layers(model)]
    slots, params = to_slots(onnx.load(str(baked)), layers)
    for name, tensor in adapter_parameters(model).items():
        assert np.array_equal(params["llm." + name].reshape(tensor.shape), tensor.numpy())  # bit for bit
    session = ort.InferenceSession(slots.SerializeToString())
    x = ids.numpy()
    with torch.no_grad():
        trained = wrapper(ids).numpy()
        other = {k: (v * 0.5 if k.endswith("lora_B") else v) for k, v in params.items()}
        for layer in lora_layers(model).values():
            layer.lora_B.mul_(0.5)
        halved = wrapper(ids).numpy()
        for layer in lora_layers(model).values():
            layer.lora_B.zero_()
        alone = wrapper(ids).numpy()
    baked_out = ort.InferenceSession(str(baked)).run(None, {"input_ids": x})[0]
    for _ in range(2):  # alternate on one session
        np.testing.assert_allclose(session.run(None, {"input_ids": x, **params})[0], baked_out, rtol=0, atol=0)
        np.testing.assert_allclose(session.run(None, {"input_ids": x, **other})[0], halved, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(session.run(None, {"input_ids": x})[0], alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(baked_out, trained, rtol=1e-4, atol=1e-5)


def test_merged_copy_folds_the_adapters():
    model = _llama(4)
    qt.prepare_qlora(model, "nf4", rank=4, alpha=16)
    ids = torch.randint(0, 96, (2, 8))
    _train_adapters(model, ids)
    merged = qt.merged_float_copy(model)
    assert not any(isinstance(m, (FrozenLinear, FrozenEmbedding)) for m in merged.modules())
    with torch.no_grad():
        np.testing.assert_allclose(merged(input_ids=ids).logits.numpy(), model(input_ids=ids).logits.numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_find_branches_refuses_a_graph_without_them(tmp_path):
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    with pytest.raises(ConfigError, match="no 'x.lora_A'"):
        find_branches(model, ["x"])


# -- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 4, "alpha": -1.0}, "alpha must be a positive number"),
    ({"rank": 4, "dropout": 1.0}, "dropout must be in"),
    ({"rank": 4, "adapter_dtype": "float16"}, "adapter_dtype must be one of"),
    ({"rank": 4, "target_modules": ["q_projection"]}, "matches no quantized linear layer"),
    ({"rank": 10**9}, "exceeds layer"),
    ({"recipe": "int8", "rank": 4}, "quantizes activations"),
])
def test_bad_settings_are_refused(kwargs, message):
    model = _llama(5)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ConfigError, match=message):
        qt.prepare_qlora(model, **kwargs)
    assert {name: type(m) for name, m in model.named_modules()} == before  # the model left as it came
    assert all(p.requires_grad for p in model.parameters())


def test_preparing_twice_is_refused():
    model = _llama(6)
    qt.prepare_qlora(model, rank=2)
    with pytest.raises(ConfigError, match="already prepared"):
        qt.prepare_qlora(model, rank=2)


def test_chunked_loss_and_activation_checkpointing_change_nothing():
    from qcompiler.torch.lm import causal_lm_loss, set_activation_checkpointing

    model = _llama(7)
    qt.prepare_qlora(model, rank=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    ids = torch.randint(0, 96, (3, 40))
    results = []
    for chunk in (None, 16):  # the second also recomputes every decoder layer in the backward pass
        assert set_activation_checkpointing(model, chunk is not None)
        model.train().zero_grad()
        loss = causal_lm_loss(chunk_tokens=chunk)(model, ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for whole, chunked in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-6)


def test_bfloat16_adapters_train_and_export_in_float32(tmp_path):
    model = _llama(8)
    qt.prepare_qlora(model, rank=4, adapter_dtype="bfloat16")
    assert all(layer.lora_A.dtype == torch.bfloat16 for layer in lora_layers(model).values())
    ids = torch.randint(0, 96, (2, 10))
    _train_adapters(model, ids, steps=2)
    _, parity = qt.export_qlora(LogitsOnly(model), (ids,), tmp_path / "bf16.onnx", input_names=["input_ids"],
                                output_names=["logits"], weight_only={"accuracy_level": 0})
    assert parity.codes_identical and parity.max_rel_error < 1e-4, parity.to_markdown()
    assert all(layer.lora_A.dtype == torch.bfloat16 for layer in lora_layers(model).values())  # restored
    adapters = [t for t in onnx.load(str(tmp_path / "bf16.onnx")).graph.initializer if ".lora_" in t.name]
    assert adapters and all(t.data_type == onnx.TensorProto.FLOAT for t in adapters)
