"""Tests of the fusion passes: fuse-conv-bn, fuse-matmul-add, fuse-conv-activation."""

from __future__ import annotations

import numpy as np
import pytest
from _models import assert_close, init, make_model, op_counts, random_feeds, run_ort
from onnx import TensorProto, helper

from qcompiler.passes.fusion.activation import FuseConvActivationPass, fused_activation, fused_into
from qcompiler.passes.fusion.batchnorm import FuseConvBatchNormPass
from qcompiler.passes.fusion.gemm import FuseMatMulAddPass

F = TensorProto.FLOAT
rng = np.random.default_rng(1234)


def _randn(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _bn_inits(c: int, prefix: str = "bn") -> list:
    return [init(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(np.float32)), init(f"{prefix}_b", _randn(c)),
            init(f"{prefix}_m", _randn(c)), init(f"{prefix}_v", rng.uniform(0.1, 2.0, c).astype(np.float32))]


def _bn(x: str, y: str, prefix: str = "bn", **attrs) -> object:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix, **attrs)


def _vi(name: str, shape: list, elem: int = F):
    return helper.make_tensor_value_info(name, elem, shape)


def _check_pass(pass_cls, model, *, modified: bool = True):
    """Run the pass, compare with the original in ORT, and check that a second run changes nothing."""
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    result = pass_cls()(model)
    assert result.modified is modified
    assert_close(run_ort(model, feeds), expected)
    again = pass_cls()(model)
    assert again.modified is False
    return result


# ---------------------------------------------------------------------------------------------------------------------
# fuse-conv-bn
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("group", "with_bias"), [(1, True), (1, False), (2, True), (8, False), (8, True)])
def test_conv_bn_folds(group: int, with_bias: bool) -> None:
    c_in, c_out = 8, 8
    inputs = ["x", "W", "B"] if with_bias else ["x", "W"]
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
             _bn("c", "y", epsilon=1e-3)]
    inits = [init("W", _randn(c_out, c_in // group, 3, 3))] + ([init("B", _randn(c_out))] if with_bias else [])
    model = make_model(nodes, [_vi("x", [2, c_in, 6, 6])], [_vi("y", [2, c_out, 6, 6])], inits + _bn_inits(c_out))
    result = _check_pass(FuseConvBatchNormPass, model)
    assert op_counts(model) == {"Conv": 1}
    assert result.stats.counters["folded"] == 1
    (conv,) = model.graph
    assert conv.name == "conv" and conv.attributes["group"].as_int() == group
    assert len(model.graph.initializers) == 2  # old weight, bias and BN parameters are gone
    assert model.graph.outputs[0].name == "y"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds(trans_b: int) -> None:
    m, k, n = 4, 6, 5
    w = _randn(n, k) if trans_b else _randn(k, n)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             _bn("g", "y")]
    model = make_model(nodes, [_vi("x", [m, k])], [_vi("y", [m, n])],
                       [init("W", w), init("C", _randn(n))] + _bn_inits(n))
    _check_pass(FuseConvBatchNormPass, model)
    assert op_counts(model) == {"Gemm": 1}
    (gemm,) = model.graph
    assert "beta" not in gemm.attributes and gemm.attributes["alpha"].as_float() == pytest.approx(0.7)


def test_matmul_bn_bn_folds_into_one_gemm() -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), _bn("mm", "y1"), _bn("y1", "y", "bn2")]
    model = make_model(nodes, [_vi("x", [3, 4])], [_vi("y", [3, 6])],
                       [init("W", _randn(4, 6))] + _bn_inits(6) + _bn_inits(6, "bn2"))
    result = _check_pass(FuseConvBatchNormPass, model)
    assert op_counts(model) == {"Gemm": 1}
    assert result.stats.counters["folded"] == 2
    assert model.graph.node(0).name == "mm"


@pytest.mark.parametrize("bias_shape", [[6], [1, 6], [], [3, 6], [3, 1]])
def test_matmul_add_bn_folds_into_gemm(bias_shape: list) -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Add", ["c", "mm"], ["a"], name="add"), _bn("a", "y")]
    model = make_model(nodes, [_vi("x", [3, 4])], [_vi("y", [3, 6])],
                       [init("W", _randn(4, 6)), init("c", _randn(*bias_shape))] + _bn_inits(6))
    _check_pass(FuseConvBatchNormPass, model)
    assert op_counts(model) == {"Gemm": 1}
    assert len(model.graph.initializers) == 2


def test_bn_after_other_add_is_not_a_candidate() -> None:
    nodes = [helper.make_node("Add", ["x", "x"], ["a"], name="add"), _bn("a", "y")]
    model = make_model(nodes, [_vi("x", [3, 6])], [_vi("y", [3, 6])], _bn_inits(6))
    result = FuseConvBatchNormPass()(model)
    assert result.modified is False and result.stats.skips == []


def test_float16_matmul_bn_folds_into_matmul_add() -> None:
    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), _bn("mm", "y")]
    inits = [init("W", _randn(4, 6).astype(np.float16))] + [
        init(t.name, np.frombuffer(t.raw_data, np.float32).astype(np.float16)) for t in _bn_inits(6)]
    model = make_model(nodes, [_vi("x", [3, 4], f16)], [_vi("y", [3, 6], f16)], inits)
    feeds = random_feeds(model)
    expected = run_ort(model, feeds)
    assert FuseConvBatchNormPass()(model).modified
    assert op_counts(model) == {"MatMul": 1, "Add": 1}
    assert_close(run_ort(model, feeds), expected, rtol=5e-3)  # float16 rounding of the new weights


def test_bn_with_two_consumers_of_conv_is_skipped() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), _bn("c", "y"),
             helper.make_node("Relu", ["c"], ["z"], name="relu")]
    model = make_model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 4, 4, 4]), _vi("z", [1, 4, 4, 4])],
                       [init("W", _randn(4, 3, 1, 1))] + _bn_inits(4))
    result = _check_pass(FuseConvBatchNormPass, model, modified=False)
    assert op_counts(model) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert result.stats.skip_reasons() == {"Conv output has other consumers": 1}


def test_bn_with_non_constant_parameters_is_skipped() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), _bn("c", "y")]
    inits = [init("W", _randn(4, 3, 1, 1))] + _bn_inits(4)[1:]
    model = make_model(nodes, [_vi("x", [1, 3, 4, 4]), _vi("bn_g", [4])], [_vi("y", [1, 4, 4, 4])], inits)
    result = FuseConvBatchNormPass()(model)
    assert result.modified is False
    assert result.stats.skip_reasons() == {"BatchNormalization parameters are not constant": 1}


def test_bn_in_training_mode_is_skipped() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["y", "rm", "rv"],
                              name="bn", training_mode=1)]
    model = make_model(nodes, [_vi("x", [2, 3, 4, 4])], [_vi("y", [2, 4, 4, 4])],
                       [init("W", _randn(4, 3, 1, 1))] + _bn_inits(4))
    result = FuseConvBatchNormPass()(model)
    assert result.modified is False
    assert result.stats.skip_reasons() == {"BatchNormalization in training mode": 1}


def test_shared_weight_is_copied() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), _bn("c", "y"),
             helper.make_node("Conv", ["x", "W"], ["z"], name="other")]
    model = make_model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 4, 4, 4]), _vi("z", [1, 4, 4, 4])],
                       [init("W", _randn(4, 3, 1, 1))] + _bn_inits(4))
    result = _check_pass(FuseConvBatchNormPass, model)
    assert op_counts(model) == {"Conv": 2}
    assert result.stats.counters["weights_copied"] == 1
    assert "W" in model.graph.initializers  # still read by the other Conv


# ---------------------------------------------------------------------------------------------------------------------
# fuse-matmul-add
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bias_shape", "bias_first"), [([5], False), ([5], True), ([1, 5], False), ([3, 5], False),
                                                         ([3, 1], True), ([], False)])
def test_matmul_add_to_gemm(bias_shape: list, bias_first: bool) -> None:
    add_inputs = ["c", "mm"] if bias_first else ["mm", "c"]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Add", add_inputs, ["y"], name="add")]
    model = make_model(nodes, [_vi("x", [3, 4])], [_vi("y", [3, 5])],
                       [init("W", _randn(4, 5)), init("c", _randn(*bias_shape))])
    result = _check_pass(FuseMatMulAddPass, model)
    assert op_counts(model) == {"Gemm": 1}
    assert result.stats.counters["fused"] == 1
    (gemm,) = model.graph
    assert gemm.name == "mm" and gemm.outputs[0].name == "y"


def test_matmul_add_with_dynamic_bias_fuses() -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "c"], ["y"], name="add")]
    model = make_model(nodes, [_vi("x", [3, 4]), _vi("c", [5])], [_vi("y", [3, 5])], [init("W", _randn(4, 5))])
    _check_pass(FuseMatMulAddPass, model)
    assert op_counts(model) == {"Gemm": 1}


def test_rank3_matmul_add_is_skipped() -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "c"], ["y"], name="add")]
    model = make_model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [2, 3, 5])],
                       [init("W", _randn(4, 5)), init("c", _randn(5))])
    result = _check_pass(FuseMatMulAddPass, model, modified=False)
    assert op_counts(model) == {"MatMul": 1, "Add": 1}
    assert result.stats.skip_reasons() == {"MatMul input is rank 3, not 2": 1}


def test_matmul_add_skip_reasons() -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "c"], ["y"], name="add"),
             helper.make_node("MatMul", ["x", "w2"], ["mm2"], name="mm2"),
             helper.make_node("Add", ["mm2", "c"], ["y2"], name="add2"),
             helper.make_node("Add", ["x", "x"], ["y3"], name="not_a_candidate")]
    model = make_model(nodes, [_vi("x", [3, 4]), _vi("w2", [4, 5])],
                       [_vi("y", [3, 5]), _vi("mm", [3, 5]), _vi("y2", [3, 5]), _vi("y3", [3, 4])],
                       [init("W", _randn(4, 5)), init("c", _randn(5))])
    result = _check_pass(FuseMatMulAddPass, model, modified=False)
    assert result.stats.skip_reasons() == {"MatMul output has other consumers": 1,
                                           "MatMul weight is not a constant 2-D tensor": 1}


# ---------------------------------------------------------------------------------------------------------------------
# fuse-conv-activation
# ---------------------------------------------------------------------------------------------------------------------
def test_conv_relu_and_gemm_clip_are_paired() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "G"], ["g"], name="gemm", transB=1),
             helper.make_node("Clip", ["g", "lo", "hi"], ["y"], name="clip")]
    model = make_model(nodes, [_vi("x", [1, 3, 2, 2])], [_vi("y", [1, 5])],
                       [init("W", _randn(4, 3, 1, 1)), init("G", _randn(5, 16)),
                        init("lo", np.float32(0.0)), init("hi", np.float32(6.0))])
    before = op_counts(model)
    result = _check_pass(FuseConvActivationPass, model)
    assert op_counts(model) == before  # the graph is not changed
    assert result.stats.counters["pairs"] == 2
    nodes_by_name = {n.name: n for n in model.graph}
    assert fused_activation(nodes_by_name["conv"]) is nodes_by_name["relu"]
    assert fused_into(nodes_by_name["relu"]) is nodes_by_name["conv"]
    assert fused_activation(nodes_by_name["gemm"]) is nodes_by_name["clip"]
    assert fused_activation(nodes_by_name["flat"]) is None


def test_activation_skips() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MatMul", ["m", "M"], ["mm"], name="mm"),
             helper.make_node("Clip", ["mm", "lo"], ["y"], name="clip")]
    model = make_model(nodes, [_vi("x", [1, 3, 2, 2]), _vi("m", [2, 3]), _vi("lo", [])],
                       [_vi("r", [1, 4, 2, 2]), _vi("c", [1, 4, 2, 2]), _vi("y", [2, 4])],
                       [init("W", _randn(4, 3, 1, 1)), init("M", _randn(3, 4))])
    result = _check_pass(FuseConvActivationPass, model, modified=False)
    assert result.stats.skip_reasons() == {"Conv output has other consumers": 1, "Clip bounds are not constant": 1}


def test_stale_pairing_is_removed() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = make_model(nodes, [_vi("x", [1, 3, 2, 2])], [_vi("y", [1, 4, 2, 2])], [init("W", _randn(4, 3, 1, 1))])
    assert FuseConvActivationPass()(model).modified
    conv, relu = model.graph
    model.graph.outputs.append(conv.outputs[0])  # the Conv output is now returned too: the pair is no longer valid
    assert fused_activation(conv) is None
    result = FuseConvActivationPass()(model)
    assert result.modified and result.stats.counters["stale_removed"] == 2
    assert "qcompiler.fused_activation" not in conv.meta
