"""Tests of the canonicalize passes: infer-shapes, fold-constants, remove-identity, remove-dead-code."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _models import assert_close, from_text, init, make_model, op_counts, random_feeds, run_ort
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import ConfigError
from qcompiler.passes.canonicalize import FoldConstantsPass, InferShapesPass, RemoveDeadCodePass, RemoveIdentityPass

F = TensorProto.FLOAT


def _vi(name: str, shape: list | None, elem: int = F):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(name: str, array: np.ndarray):
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array, name))


def _if_model() -> ir.Model:
    """``out = Identity(If(cond, then: Identity(x * (2 + 3)), else: Identity(x)))``.

    The then-branch has a foldable constant expression and a removable Identity; the else-branch returns an
    outer-scope value through an Identity that must stay.
    """
    then_nodes = [_const("k1", np.full(3, 2.0, np.float32)), _const("k2", np.full(3, 3.0, np.float32)),
                  helper.make_node("Add", ["k1", "k2"], ["k"], name="then_add"),
                  helper.make_node("Mul", ["x", "k"], ["t"], name="then_mul"),
                  helper.make_node("Identity", ["t"], ["t_out"], name="then_identity")]
    then_graph = helper.make_graph(then_nodes, "then", [], [_vi("t_out", [3])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"], name="else_identity")], "else",
                                   [], [_vi("e_out", [3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph),
             helper.make_node("Identity", ["y"], ["out"], name="out_identity")]
    return make_model(nodes, [_vi("x", [3]), _vi("cond", [], TensorProto.BOOL)], [_vi("out", [3])])


def _run_both_branches(model: ir.Model) -> list[np.ndarray]:
    x = np.array([1.0, -2.0, 3.0], np.float32)
    return [out for cond in (True, False) for out in run_ort(model, {"x": x, "cond": np.array(cond)})]


# ---------------------------------------------------------------------------------------------------------------------
# infer-shapes
# ---------------------------------------------------------------------------------------------------------------------
def test_infer_shapes_fills_node_outputs_and_is_idempotent() -> None:
    model = from_text("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x) => (float[3, 2] y) {
            t = Transpose<perm = [1, 0]>(x)
            s = Shape(t)
            r = Reshape(t, s)
            y = Relu(r)
        }""")
    values = {v.name: v for node in model.graph for v in node.outputs}
    assert values["t"].shape is None
    result = InferShapesPass()(model)
    assert result.modified
    assert result.stats.counters["values_updated"] == 3
    assert list(values["t"].shape) == [3, 2] and values["t"].dtype == ir.DataType.FLOAT
    assert list(values["r"].shape) == [3, 2]  # needs data propagation through Shape
    assert list(values["s"].shape) == [2] and values["s"].dtype == ir.DataType.INT64
    assert InferShapesPass()(model).modified is False


def test_infer_shapes_keeps_large_weights_and_visits_subgraphs() -> None:
    weight = np.arange(512 * 512, dtype=np.float32).reshape(512, 512)
    then_graph = helper.make_graph([helper.make_node("Relu", ["h"], ["t1"]), helper.make_node("Neg", ["t1"], ["t"])],
                                   "then", [], [_vi("t", ["M", "N"])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [], [_vi("e", ["M", "N"])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [_vi("x", [4, 512]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", ["M", "N"])],
                       [init("W", weight)])
    tensor = model.graph.initializers["W"].const_value
    assert InferShapesPass()(model).modified
    assert model.graph.initializers["W"].const_value is tensor  # weights restored untouched
    assert list(model.graph.inputs) == [v for v in model.graph.inputs if not v.is_initializer()]
    if_node = model.graph.node("if")
    assert list(if_node.attributes["then_branch"].as_graph().node(0).outputs[0].shape) == [4, 512]
    assert InferShapesPass()(model).modified is False


def test_infer_shapes_failure_is_counted_not_raised() -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["c"], name="add")]
    model = make_model(nodes, [_vi("a", [2, 3]), _vi("b", [4, 5])], [_vi("c", [2, 3])])
    result = InferShapesPass(strict=True)(model)
    assert result.modified is False
    assert result.stats.counters["failed"] == 1
    InferShapesPass()(model)  # lenient mode does not raise either


def test_infer_shapes_rejects_bad_options() -> None:
    with pytest.raises(ConfigError):
        InferShapesPass(strict="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# fold-constants
# ---------------------------------------------------------------------------------------------------------------------
def test_fold_constants_folds_a_constant_chain() -> None:
    nodes = [_const("a", np.arange(4, dtype=np.float32)), _const("b", np.full(4, 0.5, np.float32)),
             helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
             helper.make_node("Sqrt", ["ab"], ["s"], name="sqrt"),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    model = make_model(nodes, [_vi("x", [4])], [_vi("y", [4])])
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    result = FoldConstantsPass()(model)
    assert result.modified
    assert result.stats.counters["folded_nodes"] == 2
    RemoveDeadCodePass()(model)
    assert op_counts(model) == {"Add": 1}
    assert_close(run_ort(model, feeds), expected)
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]
    assert FoldConstantsPass()(model).modified is False


def test_fold_constants_folds_small_computed_pads() -> None:
    """Exported 'same' padding: pads = Concat(c, ConstantOfShape(n)) -> Pad. Small fills fold; big ones stay."""
    nodes = [_const("n", np.array([4], np.int64)), _const("c", np.array([1, 1, 1, 1], np.int64)),
             helper.make_node("ConstantOfShape", ["n"], ["zeros"], name="fill",
                              value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
             helper.make_node("Concat", ["c", "zeros"], ["pads"], name="concat", axis=0),
             helper.make_node("Pad", ["x", "pads"], ["y"], name="pad")]
    model = make_model(nodes, [_vi("x", [1, 2, 3, 3])], [_vi("y", [2, 3, 3, 3])])
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    assert FoldConstantsPass()(model).modified
    RemoveDeadCodePass()(model)
    assert op_counts(model) == {"Pad": 1}
    assert_close(run_ort(model, feeds), expected)
    big = [_const("shape", np.array([512, 512], np.int64)),
           helper.make_node("ConstantOfShape", ["shape"], ["fill"], name="fill",
                            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
           helper.make_node("Add", ["x", "fill"], ["y"], name="add")]
    model = make_model(big, [_vi("x", [512, 512])], [_vi("y", [512, 512])])
    FoldConstantsPass()(model)
    assert op_counts(model).get("ConstantOfShape") == 1  # a 256k-element fill is not written into the file


def test_fold_constants_respects_the_output_size_limit() -> None:
    nodes = [_const("a", np.ones(64, np.float32)),
             helper.make_node("Concat", ["a", "a", "a", "a"], ["big"], name="concat", axis=0),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    model = make_model(nodes, [_vi("x", [256])], [_vi("y", [256])])
    assert FoldConstantsPass(output_size_limit=100)(model).modified is False
    assert op_counts(model)["Concat"] == 1
    assert FoldConstantsPass(output_size_limit=1000)(model).modified
    with pytest.raises(ConfigError):
        FoldConstantsPass(output_size_limit=-1)


def test_fold_constants_keeps_constant_graph_output() -> None:
    nodes = [_const("a", np.arange(3, dtype=np.float32)), helper.make_node("Neg", ["a"], ["c"], name="neg"),
             helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = make_model(nodes, [_vi("x", [3])], [_vi("y", [3]), _vi("c", [3])])
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    assert FoldConstantsPass()(model).modified
    RemoveDeadCodePass()(model)
    assert [v.name for v in model.graph.outputs] == ["y", "c"]
    assert_close(run_ort(model, feeds), expected)


# ---------------------------------------------------------------------------------------------------------------------
# remove-identity
# ---------------------------------------------------------------------------------------------------------------------
def test_identity_chain_and_graph_output() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["i1"], name="id1"),
             helper.make_node("Identity", ["i1"], ["i2"], name="id2"),
             helper.make_node("Neg", ["i2"], ["n"], name="neg"),
             helper.make_node("Identity", ["n"], ["y"], name="id_out")]
    model = make_model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])])
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    result = RemoveIdentityPass()(model)
    assert result.modified and result.stats.counters["removed"] == 3
    assert op_counts(model) == {"Relu": 1, "Neg": 1}
    assert [v.name for v in model.graph.outputs] == ["y"] and model.graph.outputs[0].producer().op_type == "Neg"
    assert_close(run_ort(model, feeds), expected)
    assert RemoveIdentityPass()(model).modified is False


def test_identity_that_must_stay() -> None:
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="input_to_output"),
             helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["r2"], name="output_to_output")]
    model = make_model(nodes, [_vi("x", [2])], [_vi("y", [2]), _vi("r", [2]), _vi("r2", [2])])
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    result = RemoveIdentityPass()(model)
    assert result.modified is False
    assert result.stats.skip_reasons() == {"graph output fed by a graph input or initializer": 1,
                                           "both values are graph outputs": 1}
    assert_close(run_ort(model, feeds), expected)


# ---------------------------------------------------------------------------------------------------------------------
# subgraphs: If branches are visited
# ---------------------------------------------------------------------------------------------------------------------
def test_if_branches_are_canonicalized() -> None:
    model = _if_model()
    expected = _run_both_branches(model)
    assert op_counts(model) == {"If": 1, "Identity": 3, "Constant": 2, "Add": 1, "Mul": 1}

    result = RemoveIdentityPass()(model)
    assert result.modified and result.stats.counters["removed"] == 2  # then-branch Identity and the outer one
    assert result.stats.skip_reasons() == {"graph output fed by an outer-scope value": 1}
    assert op_counts(model) == {"If": 1, "Identity": 1, "Constant": 2, "Add": 1, "Mul": 1}
    assert [v.name for v in model.graph.outputs] == ["out"]

    result = FoldConstantsPass()(model)
    assert result.modified and result.stats.counters["folded_nodes"] == 1  # then-branch Add(k1, k2)
    dce = RemoveDeadCodePass()(model)
    assert dce.modified and dce.stats.counters["nodes_removed"] == 2  # the two Constants
    assert op_counts(model) == {"If": 1, "Identity": 1, "Mul": 1}
    assert_close(_run_both_branches(model), expected)
    for pass_cls in (RemoveIdentityPass, FoldConstantsPass, RemoveDeadCodePass):
        assert pass_cls()(model).modified is False


# ---------------------------------------------------------------------------------------------------------------------
# remove-dead-code
# ---------------------------------------------------------------------------------------------------------------------
def test_dead_code_nodes_initializers_and_opsets() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("MatMul", ["x", "W"], ["dead"], name="dead_mm"),
             helper.make_node("Neg", ["dead"], ["dead2"], name="dead_neg")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 2])], [_vi("y", [2, 2])],
                              [init("W", np.eye(2, dtype=np.float32)), init("unused", np.zeros(3, np.float32))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.x", 1)],
                              ir_version=10)
    model = ir.serde.deserialize_model(proto)
    result = RemoveDeadCodePass()(model)
    assert result.modified
    assert dict(result.stats.counters) == {"nodes_removed": 2, "initializers_removed": 2, "opsets_removed": 1,
                                           "functions_removed": 0}
    assert op_counts(model) == {"Relu": 1} and not model.graph.initializers
    assert dict(model.opset_imports) == {"": 21}
    assert RemoveDeadCodePass()(model).modified is False


def test_fold_constants_keeps_castlike_saturate() -> None:
    nodes = [helper.make_node("CastLike", ["x", "like"], ["y"], name="castlike", saturate=0)]
    model = make_model(nodes, [_vi("x", [3])], [_vi("y", [3], TensorProto.FLOAT16)],
                       [init("like", np.zeros((), np.float16))])
    result = FoldConstantsPass()(model)
    assert op_counts(model) == {"CastLike": 1}
    assert result.stats.skip_reasons() == {"CastLike with saturate is kept": 1}


def test_fold_constants_respects_an_old_opset() -> None:
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], name="split", axis=0),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], name="concat", axis=0)]
    model = make_model(nodes, [_vi("x", [6])], [_vi("y", [6])], [init("split", np.array([2, 4], np.int64))], opset=11)
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    result = FoldConstantsPass()(model)
    assert result.stats.skip_reasons() == {"folded form needs opset 13 (model has 11)": 1}
    assert_close(run_ort(model, feeds), expected)
