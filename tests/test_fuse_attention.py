"""fuse-attention: the BERT-style attention core becomes com.microsoft.MultiHeadAttention with the same function."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _int8_models import run
from onnx import TensorProto, helper, numpy_helper

from qcompiler.passes.fusion.attention import FuseAttentionPass

F = TensorProto.FLOAT
N, H = 4, 8
D = N * H


def _attention(mask: str | None = "[B,1,1,T]", scale_op: str = "Mul", dynamic_shape: bool = False,
               seed: int = 0) -> ir.Model:
    """x[B, S, D] -> q/k/v projections -> heads -> softmax(q k^T * c + mask) v -> merge -> output projection."""
    rng = np.random.default_rng(seed)
    w = {n: numpy_helper.from_array((rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), n)
         for n in ("wq", "wk", "wv", "wo")}
    inits = list(w.values()) + [
        numpy_helper.from_array(np.array([0, 0, N, H], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, D], np.int64), "merged_shape"),
        numpy_helper.from_array(np.array(1 / np.sqrt(H) if scale_op == "Mul" else np.sqrt(H), np.float32), "c"),
        numpy_helper.from_array(np.array([N, H], np.int64), "nh")]
    nodes = [helper.make_node("MatMul", ["x", n], [n[1]]) for n in ("wq", "wk", "wv")]
    if dynamic_shape:  # torch's spelling: Concat(Unsqueeze(Gather(Shape(x))) ..., [N], [H])
        nodes += [helper.make_node("Shape", ["x"], ["xs"], start=0, end=2),
                  helper.make_node("Concat", ["xs", "nh"], ["heads_dyn"], axis=0)]
    shape = "heads_dyn" if dynamic_shape else "heads_shape"
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, shape], [f"{name}r"]),
                  helper.make_node("Transpose", [f"{name}r"], [f"{name}h"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["scores"]),
              helper.make_node(scale_op, ["scores", "c"], ["scaled"])]
    inputs = [helper.make_tensor_value_info("x", F, ["B", "S", D])]
    if mask is not None:
        nodes.append(helper.make_node("Add", ["bias", "scaled"], ["masked"]))
        dims = {"[B,1,1,T]": ["B", 1, 1, "S"], "[1,1,1,T]": [1, 1, 1, "S"], "[B,1,S,T]": ["B", 1, "S", "S"]}[mask]
        inputs.append(helper.make_tensor_value_info("bias", F, dims))
    nodes += [helper.make_node("Softmax", ["masked" if mask else "scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctxt", "merged_shape"], ["merged"]),
              helper.make_node("MatMul", ["merged", "wo"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F, ["B", "S", D])],
                                                inits), opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    model = ir.serde.deserialize_model(proto)
    from qcompiler.passes.canonicalize import InferShapesPass

    InferShapesPass()(model)
    return model


def _feeds(mask: str | None, batch: int = 3, seq: int = 6):
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal((batch, seq, D)).astype(np.float32)}
    if mask is not None:
        keep = np.ones((batch, seq), np.float32)
        keep[0, -2:] = 0
        keep[-1, -1:] = 0
        bias = ((1 - keep) * np.float32(np.finfo(np.float32).min))[:, None, None, :]
        if mask == "[1,1,1,T]":
            bias = bias[:1]
        if mask == "[B,1,S,T]":
            bias = np.repeat(bias, seq, axis=2)
        feeds["bias"] = bias.astype(np.float32)
    return feeds


@pytest.mark.parametrize("mask", ["[B,1,1,T]", "[1,1,1,T]", "[B,1,S,T]", None])
@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
def test_attention_core_becomes_multihead_attention(mask, scale_op):
    model = _attention(mask, scale_op)
    feeds = _feeds(mask)
    expected = run(model, feeds)[0]
    result = FuseAttentionPass()(model)
    assert result.modified and result.stats.counters["fused"] == 1
    ops = [n.op_type for n in model.graph]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and "Transpose" not in ops
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert mha.domain == "com.microsoft" and mha.attributes["num_heads"].as_int() == N
    np.testing.assert_allclose(mha.attributes["scale"].as_float(), 1 / np.sqrt(H), rtol=1e-6)
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(model, _feeds(mask, 1, 9))[0], run(_attention(mask, scale_op), _feeds(mask, 1, 9))[0],
                               rtol=1e-5, atol=1e-5)  # other batch and sequence sizes


def test_torch_style_dynamic_reshape_shapes_are_read():
    model = _attention(dynamic_shape=True)
    feeds = _feeds("[B,1,1,T]")
    expected = run(model, feeds)[0]
    assert FuseAttentionPass()(model).modified
    leftover = [n.op_type for n in model.graph if n.op_type in ("Shape", "Concat", "Reshape")
                and not (n.name or "").startswith("attention_mask")]
    assert not leftover  # the head-split shape computations went with the Reshapes
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_exposed_probabilities_are_not_fused():
    model = _attention()
    probs = next(n for n in model.graph if n.op_type == "Softmax").outputs[0]
    model.graph.outputs.append(probs)
    result = FuseAttentionPass()(model)
    assert not result.modified


def test_a_wrong_head_split_is_skipped_with_a_reason():
    model = _attention()
    model.graph.initializers["heads_shape"].const_value = ir.tensor(np.array([0, 0, N, H + 1], np.int64))
    result = FuseAttentionPass()(model)
    assert not result.modified
    assert result.stats.skip_reasons() == {"head count and size do not split the channels": 1}
