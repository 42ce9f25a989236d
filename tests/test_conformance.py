"""ONNX backend conformance through the float recipe, on a fixed, representative subset (see ``bench/conformance.py``
for the full suite), plus unit tests of the harness: the output comparison rule and the per-case time limit.

Each subset case must end ``pass``, ``refused`` or as an ONNX Runtime problem on the original model; ``changed``,
``crash`` and ``timeout`` are compiler bugs. The whole subset runs once per module, in two worker processes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# the harness is a test tool beside the benchmarks (bench/ is scripts, not a package); its spawned workers find it
# through the same sys.path entry
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _conformance import (  # noqa: E402
    ACCEPTABLE_CATEGORIES,
    Case,
    CaseResult,
    compare_outputs,
    discover_cases,
    run_cases,
)

__all__: list[str] = []

#: One or a few cases per op family: elementwise, activations, conv/batchnorm/gemm/matmul (the fusion targets),
#: subgraphs (If/Loop/Scan), sequences and optionals, quantization ops, shape ops, RNNs, functions expanded into
#: primitives, and whole CNNs (Conv+BatchNorm+Relu chains).
CI_CASES: tuple[str, ...] = (
    # elementwise and activations
    "node/test_abs", "node/test_add_bcast", "node/test_div", "node/test_mul", "node/test_pow", "node/test_sqrt",
    "node/test_relu", "node/test_leakyrelu", "node/test_prelu_broadcast", "node/test_sigmoid", "node/test_tanh",
    "node/test_clip", "node/test_clip_default_int8_min", "node/test_softmax_axis_1",
    "node/test_logsoftmax_axis_0", "node/test_celu_expanded", "node/test_hardswish_expanded", "node/test_erf",
    "node/test_where_example", "node/test_mod_mixed_sign_float32",
    # conv / batchnorm / gemm / matmul
    "node/test_basic_conv_with_padding", "node/test_conv_with_strides_padding", "node/test_conv_with_autopad_same",
    "node/test_convtranspose", "node/test_convtranspose_group_2", "node/test_batchnorm_example",
    "node/test_batchnorm_epsilon", "node/test_batchnorm_example_training_mode", "node/test_gemm_all_attributes",
    "node/test_gemm_default_vector_bias", "node/test_gemm_alpha", "node/test_gemm_default_no_bias",
    "node/test_matmul_2d", "node/test_matmul_3d", "node/test_matmul_4d", "node/test_matmulinteger",
    "node/test_einsum_batch_matmul", "node/test_instancenorm_example",
    "node/test_layer_normalization_4d_axis1_expanded",
    # subgraphs
    "node/test_if", "node/test_if_seq", "node/test_if_opt", "node/test_loop11", "node/test_loop13_seq",
    "node/test_loop16_seq_none", "node/test_scan9_sum", "node/test_scan_sum", "node/test_range_float_type_positive_delta_expanded",
    # sequences and optionals
    "node/test_sequence_insert_at_back", "node/test_sequence_map_add_2_sequences",
    "node/test_sequence_map_identity_1_sequence_1_tensor_expanded", "node/test_identity_sequence",
    "node/test_identity_opt", "node/test_optional_has_element_optional_input",
    "node/test_optional_get_element_sequence", "node/test_split_to_sequence_1", "node/test_sequence_insert_at_front",
    # quantization ops
    "node/test_dynamicquantizelinear", "node/test_dynamicquantizelinear_expanded", "node/test_qlinearconv",
    "node/test_qlinearmatmul_2D_uint8_float32", "node/test_quantizelinear", "node/test_dequantizelinear_axis",
    "node/test_cast_FLOAT_to_FLOAT8E4M3FN", "node/test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN",
    # shape and data movement
    "node/test_reshape_negative_dim", "node/test_transpose_default", "node/test_gather_0",
    "node/test_gathernd_example_float32", "node/test_slice", "node/test_slice_neg_steps",
    "node/test_split_equal_parts_2d", "node/test_concat_3d_axis_1", "node/test_constant_pad",
    "node/test_expand_dim_changed", "node/test_constantofshape_float_ones", "node/test_constant", "node/test_shape",
    "node/test_size", "node/test_squeeze", "node/test_unsqueeze_axis_0", "node/test_flatten_axis0",
    "node/test_tile", "node/test_depthtospace_example", "node/test_cast_FLOAT_to_FLOAT16",
    "node/test_castlike_FLOAT_to_FLOAT16_expanded", "node/test_nonzero_example", "node/test_unique_sorted_with_axis",
    "node/test_top_k", "node/test_argmax_default_axis_example", "node/test_cumsum_2d_axis_1",
    "node/test_resize_downsample_scales_linear",
    # pooling, reductions, dropout, RNNs
    "node/test_averagepool_2d_pads", "node/test_maxpool_2d_default", "node/test_globalaveragepool",
    "node/test_reduce_mean_default_axes_keepdims_example", "node/test_reduce_sum_keepdims_random",
    "node/test_dropout_default", "node/test_lstm_defaults", "node/test_gru_defaults", "node/test_rnn_seq_length",
    # models
    "simple/test_sequence_model1", "simple/test_sequence_model5", "simple/test_sequence_model8",
    "simple/test_expand_shape_model1", "simple/test_single_relu_model",
    "pytorch-converted/test_Conv2d", "pytorch-converted/test_Conv2d_groups", "pytorch-converted/test_ConvTranspose2d",
    "pytorch-converted/test_BatchNorm2d_eval", "pytorch-converted/test_Linear", "pytorch-converted/test_PixelShuffle",
    "pytorch-operator/test_operator_conv", "pytorch-operator/test_operator_mm", "pytorch-operator/test_operator_basic",
    "light/light_squeezenet", "light/light_resnet50",
)


@pytest.fixture(scope="module")
def ci_results() -> dict[str, CaseResult]:
    pattern = "^(" + "|".join(re.escape(c) for c in CI_CASES) + ")$"
    cases = discover_cases(pattern=pattern)
    return {r.id: r for r in run_cases(cases, jobs=2, timeout=60.0)}


@pytest.mark.parametrize("case_id", CI_CASES)
def test_conformance_case(ci_results: dict[str, CaseResult], case_id: str) -> None:
    assert case_id in ci_results, f"{case_id} is not among the conformance cases of this onnx version"
    result = ci_results[case_id]
    assert result.category in ACCEPTABLE_CATEGORIES, f"{result.category} [{result.stage}] {result.detail}"


# -- the harness ---------------------------------------------------------------------------------------------------
def test_compare_outputs_rule() -> None:
    x = np.array([1.0, np.nan, 3.0], dtype=np.float32)
    assert compare_outputs([x], [x.copy()]) is None  # NaN equals NaN
    assert compare_outputs([x], [x * (1 + 5e-4)]) is None  # within rtol 1e-3
    assert "elements differ" in compare_outputs([x], [x * 1.01])
    assert "dtype" in compare_outputs([x], [x.astype(np.float64)])
    assert "shape" in compare_outputs([x], [x[:2]])
    assert compare_outputs([[x, x]], [[x, x]]) is None  # sequences
    assert "sequence of 2" in compare_outputs([[x, x]], [[x]])
    assert compare_outputs([None], [None]) is None  # empty optionals
    assert "empty optional" in compare_outputs([None], [x])
    strings = np.array(["a", "b"], dtype=object)
    assert compare_outputs([strings], [strings.copy()]) is None
    assert "strings differ" in compare_outputs([strings], [np.array(["a", "c"], dtype=object)])
    assert compare_outputs([x, x], [x]) is not None


def _write_case(folder, model: onnx.ModelProto, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> Case:
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    data = folder / "test_data_set_0"
    data.mkdir()
    for j, value in enumerate(inputs):
        (data / f"input_{j}.pb").write_bytes(numpy_helper.from_array(value).SerializeToString())
    for j, value in enumerate(outputs):
        (data / f"output_{j}.pb").write_bytes(numpy_helper.from_array(value).SerializeToString())
    return Case(f"local/{folder.name}", "local", str(folder / "model.onnx"), (str(data),))


def test_hung_case_is_killed_and_the_next_case_runs(tmp_path) -> None:
    """A Loop with an enormous trip count hangs ORT; the worker is killed at the limit and replaced."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)], "hang",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array(2**62, dtype=np.int64), "trips"),
                     numpy_helper.from_array(np.array(True), "cond")])
    hang = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    relu = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]), opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    cases = [_write_case(tmp_path / "hang", hang, [x[:1]], [x[:1]]),
             _write_case(tmp_path / "relu", relu, [x], [np.maximum(x, 0)])]
    hung, ok = run_cases(cases, jobs=1, timeout=5.0)
    assert hung.category == "ort-cannot-run-original" and "timeout" in hung.detail, hung
    assert ok.category == "pass", ok
