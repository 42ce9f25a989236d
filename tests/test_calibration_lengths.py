"""Calibration of text models at their real lengths: padding never shapes a range, masks never get quantized.

A tiny one-head encoder (embedding Gather, Q/K/V MatMuls, an additive mask built from ``attention_mask``, Softmax)
is built in code; ranges are compared across paddings, and the int8 model is run on padded inputs after a
calibration that saw none.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import compile_model
from qcompiler.calibration.data import load_calibration_data
from qcompiler.calibration.lengths import CROP_EVERY, CROP_LENGTHS, length_view, token_layout
from qcompiler.passes._input_derived import integer_derived_values
from qcompiler.passes.algorithms.mixed_precision import _join

VOCAB, HIDDEN = 50, 16


def _encoder(seq: str | int = "sequence") -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "wq"], ["q"]),
        helper.make_node("MatMul", ["emb", "wk"], ["k"]),
        helper.make_node("MatMul", ["emb", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Unsqueeze", ["attention_mask", "axis1"], ["mask3"]),
        helper.make_node("Cast", ["mask3"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "big"], ["additive"]),
        helper.make_node("Add", ["scores", "additive"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("MatMul", ["context", "wo"], ["out"]),
    ]
    inits = [weight("table", VOCAB, HIDDEN, scale=1.0), weight("wq", HIDDEN, HIDDEN), weight("wk", HIDDEN, HIDDEN),
             weight("wv", HIDDEN, HIDDEN), weight("wo", HIDDEN, HIDDEN),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "big")]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", seq, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _texts(count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(3, 11))) for _ in range(count)]


def _padded(texts: list[np.ndarray], width: int, left: bool = False) -> dict[str, np.ndarray]:
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        span = slice(width - len(text), width) if left else slice(0, len(text))
        ids[row, span], mask[row, span] = text, 1
    return {"input_ids": ids, "attention_mask": mask}


def _run(path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _scales(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[1]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits}


# ---------------------------------------------------------------- which values come from the mask


def test_the_additive_mask_and_its_sum_derive_from_the_integer_input_the_embedding_does_not():
    derived = integer_derived_values(ir.serde.deserialize_model(_encoder()))
    names = {value.name for value in derived}
    assert {"mask3", "maskf", "inverted", "additive", "masked"} <= names
    assert not names & {"emb", "q", "scores", "probs", "context", "out"}  # a lookup, and Softmax bounds its output
    assert set(derived.values()) == {"attention_mask", "input_ids"}


def test_int8_leaves_the_mask_add_in_float_and_holds_on_padded_inputs(tmp_path):
    src = tmp_path / "encoder.onnx"
    onnx.save(_encoder(), src)
    texts = _texts(24)
    unpadded = {"input_ids": np.stack([t[:3] for t in texts]), "attention_mask": np.ones((24, 3), np.int64)}
    out = tmp_path / "encoder.q.onnx"
    # every candidate quantized (no screening): before, the Add got the range [0, 0] of an unpadded calibration
    result = compile_model(src, out, recipe="int8", calib=unpadded, disable=["select-precision"])
    skipped = result.report.to_dict()
    assert "a mask" in str(skipped)  # the Add (and the Softmax reading it) were skipped with the reason
    counters = next(p for p in result.report.to_dict()["passes"] if p["name"] == "calibrate")["counters"]
    assert counters["sample_min_tokens"] == 3 and counters["sample_max_tokens"] == 3 and counters.get("sample_crops", 0) == 0
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in add.input)
    feeds = _padded(_texts(8, seed=2), 12)
    real = feeds["attention_mask"].astype(bool)
    expected, actual = _run(src, feeds)[real], _run(out, feeds)[real]
    cosine = np.sum(expected * actual, -1) / np.linalg.norm(expected, axis=-1) / np.linalg.norm(actual, axis=-1)
    assert cosine.min() > 0.9 and cosine.mean() > 0.995  # it was -0.54 and 0.80: tokens attended to the padding


# ---------------------------------------------------------------- the length view


def test_padding_never_shapes_a_range(tmp_path):
    src = tmp_path / "encoder.onnx"
    onnx.save(_encoder(), src)
    texts = _texts(20)
    scales = []
    for width, left in ((10, False), (24, False), (24, True)):
        out = tmp_path / f"q{width}{left}.onnx"
        compile_model(src, out, recipe="int8", calib=_padded(texts, width, left))
        scales.append(_scales(out))
    assert scales[0].keys() == scales[1].keys() == scales[2].keys() and scales[0]
    for name in scales[0]:
        assert np.array_equal(scales[0][name], scales[1][name]) and np.array_equal(scales[0][name], scales[2][name])


def _view(texts: list[np.ndarray], width: int = 12, crops: bool = True, left: bool = False):
    model = ir.serde.deserialize_model(_encoder())
    data = load_calibration_data(_padded(texts, width, left), model)
    return length_view(data, model, crops=crops)


def test_samples_are_cut_to_their_real_span_and_cropped():
    texts = [np.arange(1, 11), np.arange(1, 5), np.arange(1, 5), np.arange(20, 29)]
    view = _view(texts, left=True)
    samples = list(view.iter_batches(1))
    assert view.num_samples == len(texts) + len(range(0, len(texts), CROP_EVERY)) == len(samples)
    first, crop = samples[0], samples[1]
    assert first["input_ids"].tolist() == [list(range(1, 11))]
    length = CROP_LENGTHS[0]
    assert crop["input_ids"].tolist() == [list(range(1, length)) + [10]]  # first L-1 tokens and the last one
    assert (crop["attention_mask"] == 1).all()
    assert view.coverage.summary()["padding_tokens_removed"] == sum(12 - len(t) for t in texts)


def test_equal_lengths_share_a_batch_and_max_samples_counts_crops():
    texts = [np.arange(1, 6)] * 5
    view = _view(texts, crops=False)
    batches = list(view.iter_batches(4))
    assert [b["input_ids"].shape for b in batches] == [(4, 5), (1, 5)]
    assert sum(b["input_ids"].shape[0] for b in _view(texts).iter_batches(16, max_samples=3)) == 3


def test_a_mask_that_is_not_zero_one_is_left_alone():
    model = ir.serde.deserialize_model(_encoder())
    feeds = _padded(_texts(2), 12)
    feeds["attention_mask"][0, 0] = 2
    view = length_view(load_calibration_data(feeds, model), model, crops=False)
    shapes = [b["input_ids"].shape for b in view.iter_batches(1)]
    assert shapes[0] == (1, 12) and shapes[1][1] < 12
    assert view.coverage.summary()["samples_not_cut"] == 1


def test_one_length_only_is_named_without_crops():
    view = _view([np.arange(1, 9)] * 3, width=8, crops=False)
    list(view.iter_batches(2))
    assert "8 real tokens" in view.coverage.warning()
    with_crops = _view([np.arange(1, 9)] * 3, width=8)
    list(with_crops.iter_batches(2))
    assert with_crops.coverage.warning() is None


def test_models_without_a_dynamic_masked_sequence_see_the_data_unchanged():
    fixed = ir.serde.deserialize_model(_encoder(seq=12))
    assert token_layout(fixed) is None
    data = load_calibration_data(_padded(_texts(3), 12), fixed)
    assert length_view(data, fixed) is data
    dynamic = ir.serde.deserialize_model(_encoder())
    data = load_calibration_data(_padded(_texts(3), 12), dynamic)
    assert length_view(data, dynamic, trim_padding=False) is data
    assert token_layout(dynamic).inputs == ("input_ids", "attention_mask")
    other_axis = _encoder()
    other_axis.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "total_sequence"  # a KV-cache decoder's mask
    assert token_layout(ir.serde.deserialize_model(other_axis)) is None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.booleans())
def test_every_real_token_is_kept_and_no_padding(lengths, left):
    rng = np.random.default_rng(len(lengths))
    texts = [rng.integers(1, VOCAB, size=n) for n in lengths]
    view = _view(texts, width=12, crops=False, left=left)
    seen = [row for batch in view.iter_batches(3) for row in batch["input_ids"].tolist()]
    assert seen == [t.tolist() for t in texts]


def test_join_keeps_batches_of_other_lengths_as_rows():
    a, b = np.ones((2, 5, 4)), np.zeros((1, 3, 4))
    assert _join([a, a]).shape == (4, 5, 4)
    assert _join([a, b]).shape == (13, 4)
    assert _join([np.ones((1, 3, 3)), np.ones((1, 5, 5))]).shape == (34,)


@pytest.mark.parametrize("value", ["yes", 1])
def test_the_options_must_be_booleans(tmp_path, value):
    from qcompiler.errors import ConfigError

    with pytest.raises(ConfigError, match="trim_padding"):
        from qcompiler.config import CalibrationOptions

        CalibrationOptions(trim_padding=value)


# ---------------------------------------------------------------- held-back samples for the accuracy budget


def test_the_budget_is_judged_on_samples_that_set_no_range():
    from qcompiler.calibration.holdout import HOLDOUT_EVERY, split_holdout

    model = ir.serde.deserialize_model(_encoder())
    feeds = _padded([np.full(4, i + 1) for i in range(10)], 4)  # sample i holds token i + 1 only
    data = split_holdout(load_calibration_data(feeds, model))
    fit = [int(row[0]) for b in data.iter_batches(3) for row in b["input_ids"]]
    held = [int(row[0]) for b in data.held_out.iter_batches(3) for row in b["input_ids"]]
    assert held == [i + 1 for i in range(10) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    assert sorted(fit + held) == list(range(1, 11)) and not set(fit) & set(held)
    assert (data.num_samples, data.held_out.num_samples) == (len(fit), len(held))
    small = load_calibration_data(_padded(_texts(5), 12), model)
    assert split_holdout(small) is small


def test_compile_with_a_budget_reports_held_out_evaluation(tmp_path, caplog):
    src = tmp_path / "encoder.onnx"
    onnx.save(_encoder(), src)
    feeds = _padded(_texts(16), 10)
    result = compile_model(src, tmp_path / "q.onnx", recipe="int8", calib=feeds,
                           quantization={"max_accuracy_drop": 0.5}, calibration={"short_crops": False})
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]
    passes = {p["name"]: p for p in result.report.to_dict()["passes"]}
    whole = passes["select-precision"]["layers"]["(whole model)"]
    assert whole["held_out"] is True and whole["eval_samples"] == 4
    calibrate = passes["calibrate"]
    assert calibrate["counters"]["samples"] == 12
