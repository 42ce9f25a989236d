"""A decoder with a KV cache through the int4 recipe: the cache inputs and outputs survive with their names and
dynamic dims, and a prefill then decode steps that feed the cache back stay close to the float model.

The model is one attention layer shaped like the real export (``models/export_smollm2_kv.py``), built with the
onnx helper API: ``input_ids`` -> Gather(embedding) -> q/k/v MatMuls with constant weights -> heads ->
``present_key = Concat(past_key, k)`` along the past axis (and the same for v) -> softmax attention with a causal and
padding mask built from the shapes and ``attention_mask`` -> output projection -> residual -> tied lm_head
``MatMul(h, Transpose(embedding))``. No torch, no real model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _int8_models import rel_l2
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import CompileResult, compile_model

F, I64 = TensorProto.FLOAT, TensorProto.INT64
VOCAB, HIDDEN, HEADS = 128, 64, 2
HEAD_DIM = HIDDEN // HEADS
KV_NAMES = ("past_key_values.0.key", "past_key_values.0.value")
PRESENT_NAMES = ("present.0.key", "present.0.value")


def _decoder(seed: int = 0) -> onnx.ModelProto:
    """The one-layer KV-cache decoder (batch, sequence, past_sequence and total_sequence dynamic)."""
    rng = np.random.default_rng(seed)
    weights = {name: (rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
               for name in ("wq", "wk", "wv", "wo")}
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()] + [
        numpy_helper.from_array((rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32), "embedding"),
        numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, HIDDEN], np.int64), "hidden_shape"),
        numpy_helper.from_array(np.array(1 / np.sqrt(HEAD_DIM), np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
        numpy_helper.from_array(np.array(0.0, np.float32), "no_penalty"),
        numpy_helper.from_array(np.array(-1e9, np.float32), "penalty"),
    ]
    node = helper.make_node
    nodes = [node("Gather", ["embedding", "input_ids"], ["x"], name="embed")]
    for name in ("q", "k", "v"):
        nodes += [node("MatMul", ["x", f"w{name}"], [f"{name}_flat"], name=f"proj_{name}"),
                  node("Reshape", [f"{name}_flat", "heads_shape"], [f"{name}_split"], name=f"split_{name}"),
                  node("Transpose", [f"{name}_split"], [f"{name}_heads"], name=f"heads_{name}", perm=[0, 2, 1, 3])]
    nodes += [
        node("Concat", [KV_NAMES[0], "k_heads"], [PRESENT_NAMES[0]], name="cache_k", axis=2),
        node("Concat", [KV_NAMES[1], "v_heads"], [PRESENT_NAMES[1]], name="cache_v", axis=2),
        # mask [B, 1, S, T]: key t is seen by query s (absolute position T - S + s) when t <= it and mask[b, t] = 1
        node("Shape", [PRESENT_NAMES[0]], ["total_1d"], start=2, end=3),
        node("Shape", ["input_ids"], ["seq_1d"], start=1, end=2),
        node("Squeeze", ["total_1d"], ["total"]),
        node("Squeeze", ["seq_1d"], ["seq"]),
        node("Sub", ["total", "seq"], ["past"]),
        node("Range", ["past", "total", "one"], ["rows"]),
        node("Range", ["zero", "total", "one"], ["cols"]),
        node("Unsqueeze", ["rows", "axis1"], ["rows_col"]),
        node("Unsqueeze", ["cols", "axis0"], ["cols_row"]),
        node("LessOrEqual", ["cols_row", "rows_col"], ["causal"]),  # [S, T]
        node("Cast", ["attention_mask"], ["keep"], to=TensorProto.BOOL),
        node("Unsqueeze", ["keep", "axes12"], ["keep_4d"]),  # [B, 1, 1, T]
        node("And", ["causal", "keep_4d"], ["allowed"]),
        node("Where", ["allowed", "no_penalty", "penalty"], ["bias"]),
        node("Transpose", [PRESENT_NAMES[0]], ["keys_t"], name="keys_t", perm=[0, 1, 3, 2]),
        node("MatMul", ["q_heads", "keys_t"], ["scores_raw"], name="qk"),
        node("Mul", ["scores_raw", "scale"], ["scores_scaled"]),
        node("Add", ["scores_scaled", "bias"], ["scores"]),
        node("Softmax", ["scores"], ["probs"], axis=-1),
        node("MatMul", ["probs", PRESENT_NAMES[1]], ["context_heads"], name="pv"),
        node("Transpose", ["context_heads"], ["context_split"], perm=[0, 2, 1, 3]),
        node("Reshape", ["context_split", "hidden_shape"], ["context"]),
        node("MatMul", ["context", "wo"], ["attn_out"], name="proj_o"),
        node("Add", ["x", "attn_out"], ["h"], name="residual"),
        node("Transpose", ["embedding"], ["embedding_t"], name="tie", perm=[1, 0]),
        node("MatMul", ["h", "embedding_t"], ["logits"], name="lm_head"),
    ]
    kv = ["batch", HEADS, "past_sequence", HEAD_DIM]
    present = ["batch", HEADS, "past_sequence + sequence", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("input_ids", I64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", I64, ["batch", "total_sequence"])]
    inputs += [helper.make_tensor_value_info(name, F, kv) for name in KV_NAMES]
    outputs = [helper.make_tensor_value_info("logits", F, ["batch", "sequence", VOCAB])]
    outputs += [helper.make_tensor_value_info(name, F, present) for name in PRESENT_NAMES]
    proto = helper.make_model(helper.make_graph(nodes, "kv_decoder", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _signature(values) -> list[tuple[str, list[int | str]]]:  # type: ignore[no-untyped-def]
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def _generate(session: ort.InferenceSession, prompt: np.ndarray, steps: int,
              forced: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], list[tuple[int, ...]], list]:
    """Prefill ``prompt`` [B, S] from empty caches, then ``steps`` one-token steps feeding the cache back.

    Each step feeds the previous logits' argmax, or ``forced[i]`` when given (so two models see the same tokens).
    Returns each call's logits, each call's present key shape and the tokens fed to the steps."""
    batch = prompt.shape[0]
    feed = {name: np.zeros((batch, HEADS, 0, HEAD_DIM), np.float32) for name in KV_NAMES}
    ids, length, logits, shapes, fed = prompt, 0, [], [], []
    for step in range(1 + steps):
        if step:
            ids = forced[step - 1] if forced is not None else logits[-1][:, -1:].argmax(-1).astype(np.int64)
            fed.append(ids)
        length += ids.shape[1]
        out = session.run(None, {"input_ids": ids, "attention_mask": np.ones((batch, length), np.int64), **feed})
        logits.append(out[0])
        shapes.append(out[1].shape)
        feed = dict(zip(KV_NAMES, out[1:], strict=True))
    return logits, shapes, fed


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto, CompileResult]:
    """The float decoder, its ``int4`` compilation (default options) and the compile result."""
    folder = tmp_path_factory.mktemp("kv")
    proto = _decoder()
    onnx.save(proto, folder / "kv.onnx")
    result = compile_model(folder / "kv.onnx", folder / "kv.int4.onnx", recipe="int4")
    return proto, onnx.load(folder / "kv.int4.onnx"), result


def test_int4_keeps_the_cache_interface_and_lowers_every_constant_weight(compiled):
    proto, lowered, result = compiled
    assert _signature(lowered.graph.input) == _signature(proto.graph.input)
    assert _signature(lowered.graph.output) == _signature(proto.graph.output)
    ops = [(n.domain or "ai.onnx", n.op_type) for n in lowered.graph.node]
    assert ops.count(("com.microsoft", "MatMulNBits")) == 5  # q, k, v, o and the tied lm_head
    assert ops.count(("com.microsoft", "GatherBlockQuantized")) == 1
    assert ops.count(("ai.onnx", "MatMul")) == 2  # QK^T and PV read the cache: activations, left float
    assert ("ai.onnx", "Concat") in ops
    bits = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in lowered.graph.node if n.op_type == "MatMulNBits"}
    assert sorted(bits.values()) == [4, 4, 4, 4, 8]  # the lm_head gets int8 by default
    assert {init.name for init in lowered.graph.initializer}.isdisjoint({"wq", "wk", "wv", "wo", "embedding"})
    annotation = next(r for r in result.report.passes if r.name == "annotate-weight-only")
    assert dict(annotation.stats.skips) == {"qk": "non-constant weight", "pv": "non-constant weight"}


def test_prefill_then_decode_with_the_cache_stays_close_to_float(compiled):
    proto, lowered, _ = compiled
    float_session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    int4_session = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    prompt = np.random.default_rng(1).integers(0, VOCAB, (2, 5)).astype(np.int64)
    expected, float_shapes, tokens = _generate(float_session, prompt, steps=2)
    actual, shapes, _ = _generate(int4_session, prompt, steps=2, forced=tokens)
    assert shapes == float_shapes == [(2, HEADS, 5, HEAD_DIM), (2, HEADS, 6, HEAD_DIM), (2, HEADS, 7, HEAD_DIM)]
    assert [a.shape for a in actual] == [(2, 5, VOCAB), (2, 1, VOCAB), (2, 1, VOCAB)]
    errors = [rel_l2(a, e) for a, e in zip(actual, expected, strict=True)]
    assert max(errors) < 0.1, errors
    # The cache is used, not just passed through: a decode step equals the same tokens run without a cache.
    sequence = np.concatenate([prompt, *tokens], axis=1)
    empty = {name: np.zeros((2, HEADS, 0, HEAD_DIM), np.float32) for name in KV_NAMES}
    full = int4_session.run(None, {"input_ids": sequence, "attention_mask": np.ones((2, 7), np.int64), **empty})[0]
    np.testing.assert_allclose(np.concatenate(actual, axis=1), full, rtol=1e-4, atol=1e-4)


TINY_LLAMA = Path(__file__).resolve().parents[1] / "models" / "tiny_llama_kv.onnx"


@pytest.mark.parametrize("recipe", ["int4", "int3"])
def test_verify_each_runs_an_exported_kv_decoder(tmp_path: Path, recipe: str) -> None:
    """The verifier's sample inputs for a KV-cache decoder are a consistent prefill (random masks and cache
    lengths made ORT fail inside the exporter's GatherND), and its ORT sessions register our custom ops (int3)."""
    import onnx_ir as ir

    from qcompiler.sample_inputs import random_inputs

    feeds = random_inputs(ir.load(TINY_LLAMA))
    assert feeds["input_ids"].shape == (1, 4) and feeds["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert feeds["past_key_values.0.key"].shape == (1, 2, 0, 16)
    ort.InferenceSession(str(TINY_LLAMA)).run(None, feeds)
    result = compile_model(TINY_LLAMA, tmp_path / "out.onnx", recipe=recipe, verify_each=True)
    assert isinstance(result, CompileResult)
