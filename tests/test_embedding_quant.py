"""int8 embedding tables (annotate-int8 + lower-int8-dynamic / lower-int8-qdq): the lowered Gather against a numpy
reference of the dequantized table, index semantics kept, tied tables, the off switch, property tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _cli import one_error_line, run_main
from _int8_models import op_counts, optimized_op_counts, rel_l2, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_cli_bad_inputs import _expect_rejected

from qcompiler.api import compile_model
from qcompiler.errors import ConfigError, InvalidModelError
from qcompiler.passes._finite import check_quantization_parameters
from qcompiler.passes.annotate import AnnotateInt8Pass, clear_node_quant, is_embedding
from qcompiler.passes.lower.int8_dynamic import LowerInt8DynamicPass
from qcompiler.passes.lower.int8_qdq import LowerInt8QDQPass


def _table(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 1.0, (rows, 1))).astype(np.float32)
    if rows > 2:
        table[1] = 0.0  # an all-zero row: scale MIN_SCALE, codes 0, dequantized exactly
    return table


def _gather_model(table: np.ndarray, index_type: int = TensorProto.INT64, opset: int = 17) -> ir.Model:
    """ids[B, S] -> Gather(E) -> y[B, S, cols] (E also read by nothing else)."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["y"], name="embed", axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", index_type, ["B", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", table.shape[1]])],
                              [numpy_helper.from_array(table, "E")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _tied_model(table: np.ndarray, extra_reader: str | None = None) -> ir.Model:
    """ids -> Gather(E) -> x * g (an RMSNorm-like scale) -> MatMul(., Transpose(E)) -> logits: a tied lm_head."""
    rows, cols = table.shape
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("Mul", ["h", "g"], ["x"], name="norm"),
             helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Et"], ["logits"], name="lm_head")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", rows])]
    if extra_reader == "Mul":  # something else reads the table: it must stay float
        nodes.append(helper.make_node("ReduceSum", ["E", "axis0"], ["total"], name="reads_table", keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, [cols]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                              outputs, [numpy_helper.from_array(table, "E"),
                                        numpy_helper.from_array(np.full(cols, 1.5, np.float32), "g"),
                                        numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _annotate_and_lower(model: ir.Model, *, block: int = 0, dynamic: bool = True, **options):
    annotate = AnnotateInt8Pass(static_activations=not dynamic, embedding_block_size=block,
                                embedding_min_elements=0, **options)
    first = annotate(model)
    lowering = LowerInt8DynamicPass() if dynamic else LowerInt8QDQPass()
    return first, lowering(model)


def _reference(table: np.ndarray, ids: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(the dequantized rows numpy computes for ``ids``, the elementwise bound s/2 of each)."""
    rows, cols = table.shape
    if block == 0:  # per row, s = max|row| / 127, codes in [-127, 127]
        scale = np.maximum(np.abs(table).max(axis=1).astype(np.float64) / 127, 1e-12).astype(np.float32)
        codes = np.clip(np.rint(table.astype(np.float64) / scale[:, None]), -127, 127)
        deq = codes.astype(np.float32) * scale[:, None]
        bound = np.broadcast_to(scale[:, None] / 2, table.shape)
    else:  # blocks along the row, s = max|block| / 127.5, uint8 codes around 128
        blocks = -(-cols // block)
        padded = np.zeros((rows, blocks * block), np.float32)
        padded[:, :cols] = table
        absmax = np.abs(padded.reshape(rows, blocks, block)).max(axis=2).astype(np.float64)
        scale = (absmax / 127.5).astype(np.float32)
        scale = np.where(scale == 0, np.float32(1), scale)
        per_value = np.repeat(scale, block, axis=1)[:, :cols]
        codes = np.clip(np.rint(table.astype(np.float64) / per_value) + 128, 0, 255)
        deq = (codes.astype(np.float32) - np.float32(128)) * per_value
        bound = per_value / 2
    return deq[ids], bound[ids]


@pytest.mark.parametrize("block", [0, 32])
@pytest.mark.parametrize("dynamic", [True, False])
def test_lowered_gather_is_the_dequantized_table(block, dynamic):
    table = _table(300, 96)
    model = _gather_model(table)
    annotated, lowered = _annotate_and_lower(model, block=block, dynamic=dynamic)
    assert annotated.modified and lowered.modified
    assert annotated.stats.counters["annotated_embedding"] == 1
    ops = op_counts(model)
    if block == 0:
        assert ops == {"Gather": 2, "Cast": 1, "Mul": 1}
        assert lowered.stats.counters["lowered_embedding_Gather"] == 1
    else:
        assert ops == {"Range": 1, "Gather": 1, "GatherBlockQuantized": 1}
        assert model.opset_imports["com.microsoft"] == 1
    assert "E" not in model.graph.initializers  # the float table is gone
    stored = [v.const_value.numpy() for v in model.graph.initializers.values() if v.const_value.size == table.size]
    assert len(stored) == 1 and stored[0].dtype == (np.int8 if block == 0 else np.uint8)
    ids = np.random.default_rng(1).integers(0, 300, (3, 7), dtype=np.int64)
    ids[0, :3] = [1, 0, 299]
    expected, bound = _reference(table, ids, block)
    actual = run(model, {"ids": ids})[0]
    np.testing.assert_array_equal(actual, expected)  # ORT computes exactly what numpy does
    assert np.all(np.abs(actual - table[ids]) <= bound * (1 + 1e-4))  # s/2, up to the float32 rounding of s
    np.testing.assert_array_equal(actual[0, 0], 0.0)  # the zero row stays exactly zero
    layer = lowered.stats.layers["embed"]
    assert layer["scheme"] == "int8-embedding" and layer["weight_sqnr_db"] > 35


@pytest.mark.parametrize("block", [0, 16])
@pytest.mark.parametrize("index_type", [TensorProto.INT64, TensorProto.INT32])
def test_index_semantics_match_the_float_gather(block, index_type):
    """Negative indices wrap as in the float Gather; an out-of-range one is refused by ONNX Runtime as in the float
    model (GatherBlockQuantized alone would return zeros: the form checks the indices through a Gather)."""
    table = _table(40, 32)
    np_type = np.int64 if index_type == TensorProto.INT64 else np.int32
    float_model = _gather_model(table, index_type)
    model = _gather_model(table, index_type)
    _annotate_and_lower(model, block=block)
    ids = np.array([[-1, -40, 0, 39, -7]], np_type)
    expected, bound = _reference(table, ids, block)
    actual = run(model, {"ids": ids})[0]
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_allclose(actual, run(float_model, {"ids": ids})[0], atol=float(bound.max()) * 1.001)
    for bad in (40, -41, 10**6):
        ids = np.array([[0, bad]], np_type)
        with pytest.raises(Exception, match="out of .*bounds|out of range|INVALID_ARGUMENT"):
            run(float_model, {"ids": ids})
        with pytest.raises(Exception, match="out of .*bounds|out of range|INVALID_ARGUMENT"):
            run(model, {"ids": ids})


@pytest.mark.parametrize("dynamic", [True, False])
def test_tied_table_is_stored_once_and_shared_with_the_lm_head(dynamic, tmp_path):
    table = _table(1024, 64, seed=3)  # 65,536 elements: the smallest table quantized by default
    model = _tied_model(table)
    ids = np.random.default_rng(4).integers(0, 1024, (4, 16), dtype=np.int64)
    expected = run(model, {"ids": ids})[0]
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    calib = None if dynamic else {"ids": ids}
    result = compile_model(path, tmp_path / "q.onnx", recipe="int8-dynamic" if dynamic else "int8", calib=calib,
                           quantization={"op_types": ("MatMul",)} if not dynamic else None)
    lowered = onnx.load(tmp_path / "q.onnx")
    tables = [i for i in lowered.graph.initializer if tuple(i.dims) in ((1024, 64), (64, 1024))]
    assert [(t.name, t.data_type) for t in tables] == [("E_quantized", TensorProto.INT8)]  # one int8 copy, no float
    readers = [n for n in lowered.graph.node if "E_quantized" in n.input]
    assert sorted(n.op_type for n in readers) == ["Gather", "Transpose"]
    head = "MatMulInteger" if dynamic else "DequantizeLinear"
    assert any(n.op_type == head for n in lowered.graph.node)
    counters = next(p for p in result.report.passes if p.name.startswith("lower-int8")).stats.counters
    assert counters["lowered_tied_head"] == 1 and counters["lowered_embedding_Gather"] == 1
    compiled = ir.load(tmp_path / "q.onnx")
    fused = optimized_op_counts(compiled)  # ORT folds Transpose(E_q) at load and runs an integer kernel
    assert "MatMul" not in fused and fused.get("DynamicQuantizeMatMul" if dynamic else "MatMulIntegerToFloat") == 1
    actual = run(compiled, {"ids": ids})[0]
    assert rel_l2(actual, expected) < 0.03


def test_table_read_by_another_op_stays_float():
    table = _table(512, 64)
    model = _tied_model(table, extra_reader="Mul")
    annotated, lowered = _annotate_and_lower(model)
    assert not any(is_embedding(n) for n in model.graph)
    assert [reason for name, reason in annotated.stats.skips if name == "embed"] == [
        "the table is also read by ReduceSum node 'reads_table': an int8 copy would sit next to the float one "
        "(left float)"]
    assert "E" in model.graph.initializers
    assert not any(v.name.startswith("E_") for v in model.graph.initializers.values())  # no int8 copy
    assert op_counts(model)["Gather"] == 1 and "lm_head" in [n.name for n in model.graph]  # head float too


def test_tied_table_stays_float_when_a_later_pass_unannotates_one_reader():
    """select-precision may leave the head (or a Gather) in float: the lowering then keeps the whole table float."""
    model = _tied_model(_table(1024, 64))
    AnnotateInt8Pass(static_activations=False)(model)
    clear_node_quant(next(n for n in model.graph if n.name == "lm_head"))
    result = LowerInt8DynamicPass()(model)
    assert dict(result.stats.skips) == {"embed": "its tied projection 'lm_head' stays float: the table stays float"}
    assert not result.modified and op_counts(model) == {"Gather": 1, "Mul": 1, "Transpose": 1, "MatMul": 1}
    assert model.graph.initializers["E"].const_value.dtype == ir.DataType.FLOAT


def test_excluded_lm_head_keeps_the_tied_table_float():
    model = _tied_model(_table(512, 64))
    annotated, _ = _annotate_and_lower(model, exclude_nodes=("lm_head",))
    reasons = dict(annotated.stats.skips)
    assert "tied projection 'lm_head' stays float" in reasons["embed"]
    assert "E" in model.graph.initializers and op_counts(model)["MatMul"] == 1


def test_embedding_off_and_small_tables(tmp_path):
    table = _table(300, 96)
    path = tmp_path / "m.onnx"
    ir.save(_gather_model(table), path)
    off = compile_model(path, tmp_path / "off.onnx", recipe="int8-dynamic", quantization={"embedding": "float"})
    on = compile_model(path, tmp_path / "on.onnx", recipe="int8-dynamic")  # 28,800 elements: below the threshold
    for result in (off, on):
        assert op_counts(result.model) == {"Gather": 1}
        assert result.model.graph.initializers["E"].const_value.dtype == ir.DataType.FLOAT
    skips = [r for p in on.report.passes for _, r in p.stats.skips if p.name == "annotate-int8"]
    assert skips == ["small embedding table (28800 elements, fewer than 65536): left float"]
    big = tmp_path / "big.onnx"
    ir.save(_gather_model(_table(1024, 64)), big)
    assert op_counts(compile_model(big, tmp_path / "b.onnx", recipe="int8-dynamic").model)["Cast"] == 1
    with pytest.raises(ConfigError, match="embedding must be 'int8' or 'float'"):
        compile_model(path, tmp_path / "x.onnx", recipe="int8-dynamic", quantization={"embedding": "int4"})
    with pytest.raises(ConfigError, match="embedding_block_size"):
        AnnotateInt8Pass(embedding_block_size=24)


def test_cli_embedding_flag_reaches_the_int8_recipes(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    ir.save(_gather_model(_table(1024, 64)), path)
    code, _, _ = run_main([str(path), "-o", str(tmp_path / "f.onnx"), "--recipe", "int8-dynamic", "--embedding",
                           "float", "-q"], capsys)
    assert code == 0 and op_counts(ir.load(tmp_path / "f.onnx")) == {"Gather": 1}
    code, _, _ = run_main([str(path), "-o", str(tmp_path / "i.onnx"), "--recipe", "int8-dynamic", "-q"], capsys)
    assert code == 0 and op_counts(ir.load(tmp_path / "i.onnx")) == {"Gather": 2, "Cast": 1, "Mul": 1}
    code, _, err = run_main([str(path), "-o", str(tmp_path / "x.onnx"), "--recipe", "int8-dynamic", "--embedding",
                             "int4"], capsys)
    assert code == 2 and "--embedding int4 (weight_only.embedding) has no effect" in one_error_line(err)
    assert not (tmp_path / "x.onnx").exists()


def test_nonfinite_table_is_refused():
    table = _table(64, 32)
    table[5, 7] = np.nan
    model = _gather_model(table)
    AnnotateInt8Pass(static_activations=False, embedding_min_elements=0)(model)
    with pytest.raises(InvalidModelError, match=r"embedding table 'E' of node 'embed' holds NaN at index \[5, 7\]"):
        LowerInt8DynamicPass()(model)


@pytest.mark.parametrize("recipe", ["int8-dynamic", "int8"])
def test_cli_refuses_a_nonfinite_table(recipe, tmp_path, capfd):
    table = _table(1024, 64)
    table[3, 2] = np.inf
    path = tmp_path / "m.onnx"
    ir.save(_gather_model(table), path)
    np.savez(tmp_path / "calib.npz", ids=np.arange(64, dtype=np.int64).reshape(4, 16))
    calib = ["--calib", str(tmp_path / "calib.npz")] if recipe == "int8" else []
    _expect_rejected([str(path), "-o", str(tmp_path / "q.onnx"), "--recipe", recipe, *calib], tmp_path / "q.onnx",
                     [path], capfd, needle="embedding table 'E' of node 'embed' holds +Inf at index [3, 2]")


def test_final_check_reads_the_row_scales():
    """finalize's invariant knows the per-row form: a non-finite row scale is refused by name."""
    model = _gather_model(_table(64, 32))
    _annotate_and_lower(model)
    assert check_quantization_parameters(model) == 1
    scales = model.graph.initializers["E_row_scale"]
    bad = scales.const_value.numpy().copy()
    bad[9, 0] = np.nan
    scales.const_value = ir.tensor(bad, name=scales.name)
    with pytest.raises(InvalidModelError, match=r"scale 'E_row_scale' \(input 0 of Gather node .*\) holds NaN"):
        check_quantization_parameters(model)


def test_annotation_is_idempotent():
    model = _tied_model(_table(512, 64))
    annotate = AnnotateInt8Pass(static_activations=False, embedding_min_elements=0)
    assert annotate(model).modified
    assert not annotate(model).modified


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), block=st.sampled_from([0, 16, 32]),
       seed=st.integers(0, 2**16))
def test_any_table_shape_round_trips(rows, cols, block, seed):
    table = _table(rows, cols, seed)
    model = _gather_model(table)
    _annotate_and_lower(model, block=block)
    ids = np.random.default_rng(seed).integers(-rows, rows, (2, 5), dtype=np.int64)
    expected, bound = _reference(table, ids, block)
    actual = run(model, {"ids": ids})[0]
    np.testing.assert_array_equal(actual, expected)
    assert np.all(np.abs(actual - table[ids]) <= bound * (1 + 1e-4))  # s/2, up to the float32 rounding of s
